"""LlamaCppEngine: continuous batching on llama.cpp, behind the same engine surface as the PyTorch engine.

Queueing, adapters (registry), sampling (per-request temperature/top_p/seed, penalties, logit_bias, logprobs), stop
strings, text streaming and timeouts are engine.Engine's, shared with the PyTorch engine; only the model side differs:
- each admitted request gets a llama.cpp sequence that already holds its adapter's prefix cells
  (LlamaCppModel.open_sequence; copied in per-sequence mode, shared in unified mode), its prompt at position P;
- every step is ONE `llama_decode` over all rows, whatever their adapter: new prompts and one token for each
  running row (more calls only when the step has more tokens than n_batch);
- unified cache: admission also counts KV cells: a request reserves prompt + max_tokens cells of the shared
  context and waits in the queue until they are free. Per-sequence cache (default): each request has its own
  stream of seq_cells cells, checked when it is submitted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import ConfigError
from .engine import Engine
from .errors import CapacityUnavailable, EngineError, InvalidRequest
from .llamacpp import LlamaCppModel
from .request import FEATURES, Request

log = logging.getLogger("prefixtune.serve")


class LlamaCppEngine(Engine):
    backend = "llamacpp"
    # Every optional feature is honoured: sampling runs on llama.cpp's logits through the shared sampler (sampler.py).
    capabilities = FEATURES

    def __init__(
        self,
        gguf_path: str | Path,
        tokenizer=None,
        *,
        model_name: str | None = None,
        max_batch_size: int = 32,
        max_total_tokens: int | None = None,
        n_ctx: int = 8192,
        max_adapters: int = 16,
        kv_type: str = "f16",
        flash_attn: bool = False,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        kv_unified: bool = False,
        seq_cells: int | None = None,
        extra_bufts: bool | None = None,
        **limits,
    ):
        """kv_unified / seq_cells / n_*: see LlamaCppModel (per-sequence cache by default; n_ctx is then split
        into max_batch_size sequences of seq_cells cells unless seq_cells is given)."""
        self.model = LlamaCppModel(gguf_path, n_ctx=n_ctx, max_sequences=max_batch_size, max_adapters=max_adapters,
                                   kv_type=kv_type, flash_attn=flash_attn, n_threads=n_threads,
                                   n_threads_batch=n_threads_batch, n_batch=n_batch, n_ubatch=n_ubatch,
                                   kv_unified=kv_unified, seq_cells=seq_cells,
                                   extra_bufts=extra_bufts)
        if tokenizer is None:
            from ..loading import load_tokenizer  # the same tokenizer (and chat template) the PyTorch path uses

            tokenizer = load_tokenizer(str(gguf_path))
        m = self.model
        super().__init__(tokenizer, model_name=model_name or Path(gguf_path).stem, vocab_size=m.n_vocab,
                         eos_ids={m.lib.llama_vocab_eos(m.vocab)}, max_positions=m.n_ctx_train,
                         max_batch_size=max_batch_size, max_total_tokens=max_total_tokens or min(m.n_ctx_train, m.seq_cells),
                         **limits)
        self._reserved = 0  # KV cells promised to running rows (prompt + max_tokens each)
        if m.unified:  # each resident adapter holds one of the sequences reserved for prefixes
            self.registry.max_loaded = min(self.registry.max_loaded or max_adapters, max_adapters)

    # ---- adapters -----------------------------------------------------------------------------------
    def _load_prefix(self, name: str, directory: Path) -> int:
        layers = self.model.adapter_layers(directory)  # ConfigError naming what differs from this GGUF
        P = layers[0][0].shape[1]
        m = self.model  # cells promised to running rows (unified cache; none per-sequence) come first
        if m.used_cells + self._reserved + P > m.n_ctx > m.used_cells + P:
            raise CapacityUnavailable(f"cannot load adapter {name!r} now: {P} of the context's cells are promised to "
                                      "running requests; retry when they finish")
        self.model.load_prefix(name, layers)
        return self.model.prefix_bytes(name)

    def _unload_prefix(self, name: str) -> None:
        self.model.unload_prefix(name)  # running rows keep the cells until they finish

    # ---- limits and admission -----------------------------------------------------------------------
    def check_limits(self, prompt_len: int, max_tokens: int, adapter=None) -> None:
        super().check_limits(prompt_len, max_tokens, adapter)
        parts = 1 if adapter is None or isinstance(adapter, str) else len(adapter)
        problem = self.model.mode.check_request(prompt_len, max_tokens, self.prefix_length(adapter), parts)
        if problem:
            raise InvalidRequest(problem)

    def _need(self, r: Request) -> int:
        """Cells of the shared context a request reserves before it starts (0 with per-sequence streams)."""
        return self.model.mode.request_cells(len(r.prompt_ids), r.params.max_tokens)

    def _admissible(self, r: Request, taken: list[Request]) -> bool:
        """Unified cache: only while the request's cells are free (the head waits rather than being overtaken)."""
        free = self.model.n_ctx - self.model.used_cells - self._reserved - sum(self._need(t) for t in taken)
        return self._need(r) <= free

    # ---- worker -------------------------------------------------------------------------------------
    def _step(self, new: list[Request]) -> None:
        running = [r for r in self._rows if not r.finished]
        fresh = []
        for r in new:
            r.seq, r.pos = self.model.open_sequence(r.adapter)
            self._reserved += self._need(r)
            self._rows.append(r)  # at once: a failure later in the step still closes its sequence
            fresh.append(r)
        rows = fresh + running
        if not rows:
            return
        items = [(r.seq, list(r.prompt_ids), r.pos) for r in fresh] + [(r.seq, [r.last], r.pos) for r in running]
        logits = torch.from_numpy(self.model.decode(items))
        for r, (_, toks, _) in zip(rows, items):
            r.pos += len(toks)
        self.stats.prefilled(sum(len(r.prompt_ids) for r in fresh))
        if running:
            self._count_step(len(rows))
        self._step_rows(rows, logits)

    def _drop_finished(self) -> None:
        self._close_cancelled()
        done = [r for r in self._rows if r.finished]
        if not done:
            return
        with self.lock:
            for r in done:
                self.model.close_sequence(r.seq)
                self._reserved -= self._need(r)
            self._rows = [r for r in self._rows if not r.finished]

    def close(self) -> None:
        super().close()
        self.model.close()


def build_llamacpp_engine(model_path: str, adapters_dir: str | None = None, pin: tuple[str, ...] = (),
                          **kw) -> LlamaCppEngine:
    """The llama.cpp twin of backends.build_torch_engine: load the GGUF, then index the adapters under adapters_dir."""
    engine = LlamaCppEngine(model_path, adapters_dir=adapters_dir, **kw)
    names = engine.index(pin)
    log.info("llama.cpp: serving %s with %d adapter(s) indexed", engine.model_name, len(names))
    return engine


def load(gguf_path, adapters=None, **engine_kw):
    """A GGUF model on llama.cpp with prefix adapters, ready for `generate` (see serving.offline.Generator).

    adapters: {name: directory}, one adapter directory (named "default"), or a directory of adapter directories.
    engine_kw: LlamaCppEngine options (max_batch_size, n_ctx, kv_type "f16"/"f32", flash_attn, n_threads,
    kv_unified (False: per-sequence cache, the faster default), seq_cells, ...).
    """
    from .offline import Generator, adapter_dirs

    dirs = adapter_dirs(adapters)
    engine = LlamaCppEngine(gguf_path, **engine_kw)
    try:
        for name, d in dirs.items():
            engine.add_adapter(name, d)
    except EngineError as e:
        engine.model.close()
        raise ConfigError(str(e)) from None
    return Generator(engine)
