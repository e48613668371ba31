"""LlamaCppEngine: continuous batching on llama.cpp, behind the same engine surface as the PyTorch engine.

Queueing, sampling (per-request temperature/top_p/seed, penalties, logit_bias, logprobs), stop strings, text
streaming and timeouts are the PyTorch engine's own code (inherited); only the model side differs:
- each admitted request gets a llama.cpp sequence that already shares its adapter's prefix cells
  (LlamaCppModel.open_sequence), its prompt starting at position P;
- every step is ONE `llama_decode` over all rows, whatever their adapter: new prompts and one token for each
  running row (more calls only when the step has more tokens than n_batch);
- admission also counts KV cells: a request reserves prompt + max_tokens cells of the shared context and
  waits in the queue until they are free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import torch

from ..config import ConfigError, check_adapter_name
from .engine import Engine, EngineError, Request
from .llamacpp import LlamaCppModel

log = logging.getLogger("prefixtune.serve")

# OpenAI request fields this engine cannot honour (the API answers 400 naming them). Everything else is
# computed from llama.cpp's logits by the shared sampling code, so it behaves as on the PyTorch engine.
UNSUPPORTED_FIELDS: dict[str, str] = {}


class LlamaCppEngine(Engine):
    backend = "llamacpp"

    def __init__(
        self,
        gguf_path: str | Path,
        tokenizer=None,
        *,
        model_name: str | None = None,
        adapters_dir: str | Path | None = None,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_prompt_tokens: int = 2048,
        max_total_tokens: int | None = None,
        request_timeout: float | None = 600.0,
        max_n: int = 8,
        n_ctx: int = 8192,
        max_adapters: int = 16,
        kv_type: str = "f16",
        flash_attn: bool = False,
        n_threads: int | None = None,
    ):
        self.model = LlamaCppModel(gguf_path, n_ctx=n_ctx, max_sequences=max_batch_size, max_adapters=max_adapters,
                                   kv_type=kv_type, flash_attn=flash_attn, n_threads=n_threads)
        if tokenizer is None:
            from ..loading import load_tokenizer  # the same tokenizer (and chat template) the PyTorch path uses

            tokenizer = load_tokenizer(str(gguf_path))
        self.tokenizer = tokenizer
        self.model_name = model_name or Path(gguf_path).stem
        self.vocab_size = self.model.n_vocab
        self.base = SimpleNamespace(config=SimpleNamespace(vocab_size=self.model.n_vocab))  # what the API reads
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.max_positions = self.model.n_ctx_train
        self.max_total_tokens = max_total_tokens or min(self.model.n_ctx_train, self.model.n_ctx)
        self.request_timeout = request_timeout
        self.max_n = max_n
        self.eos_ids = {self.model.lib.llama_vocab_eos(self.model.vocab)}
        self.lock = threading.RLock()
        self._cond = threading.Condition()
        self._pending: deque[Request] = deque()
        self._rows: list[Request] = []
        self._thread = None
        self._stopping = False
        self._reserved = 0  # KV cells promised to running rows (prompt + max_tokens each)
        self.stats = {"prompt_tokens": 0, "completion_tokens": 0, "steps": 0, "rows_stepped": 0}
        self.batch_hist: dict[int, int] = {}

    @property
    def capabilities(self) -> dict[str, str]:
        """Request fields this engine refuses, with the reason (empty: it honours what the PyTorch engine does)."""
        return dict(UNSUPPORTED_FIELDS)

    # ---- adapters -----------------------------------------------------------------------------------
    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.model.prefixes:
            raise EngineError(f"unknown model {name!r}; available: {self.model_names()}", 404)

    def model_names(self) -> list[str]:
        return [self.model_name] + sorted(self.model.prefixes)

    def load_adapter(self, name: str, path: str) -> None:
        """The API's hot load: `path` must lie inside adapters_dir."""
        self.add_adapter(name, self.resolve_adapter_path(path))

    def add_adapter(self, name: str, directory: str | Path) -> None:
        """Write the adapter at `directory` (any path: Python callers) into the cache as `name`."""
        try:
            check_adapter_name(name)
        except ConfigError as e:
            raise EngineError(str(e)) from None
        if name == self.model_name:
            raise EngineError(f"adapter name {name!r} is the base model's name; pick another", 409)
        with self.lock:
            if name in self.model.prefixes:
                raise EngineError(f"adapter {name!r} is already loaded; DELETE /v1/adapters/{name} first", 409)
            try:
                layers = self.model.adapter_layers(directory)
                P = layers[0][0].shape[1]
                if self.model.used_cells + self._reserved + P > self.model.n_ctx > self.model.used_cells + P:
                    raise EngineError(f"cannot load adapter {name!r} now: {P} of the context's cells are promised to "
                                      "running requests; retry when they finish", 503)
                self.model.load_prefix(name, layers)
            except ConfigError as e:  # another model's adapter, not a prefix adapter, too long for the context
                raise EngineError(f"cannot load adapter {name!r}: {e}", 422) from None

    def unload_adapter(self, name: str) -> None:
        """Rows already running keep their prefix cells until they finish; queued ones fail with 404."""
        with self.lock:
            if name not in self.model.prefixes:
                raise EngineError(f"unknown adapter {name!r}; loaded: {sorted(self.model.prefixes)}", 404)
            self.model.unload_prefix(name)

    # ---- limits -------------------------------------------------------------------------------------
    def check_limits(self, prompt_len: int, max_tokens: int, adapter: str | None = None) -> None:
        if prompt_len == 0:
            raise EngineError("prompt is empty: send at least one token of text")
        if prompt_len > self.max_prompt_tokens:
            raise EngineError(
                f"prompt has {prompt_len} tokens; the limit is {self.max_prompt_tokens} prompt tokens "
                f"and {self.max_total_tokens} tokens in total (prompt + max_tokens)"
            )
        if prompt_len + max_tokens > self.max_total_tokens:
            raise EngineError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} exceeds the "
                f"limit of {self.max_total_tokens} tokens in total; lower max_tokens to at most "
                f"{max(self.max_total_tokens - prompt_len, 0)}"
            )
        prefix = self.model.prefixes[adapter][1] if adapter in self.model.prefixes else 0
        if self.max_positions and prefix + prompt_len + max_tokens > self.max_positions:
            raise EngineError(
                f"prefix ({prefix}) + prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the model's "
                f"{self.max_positions} positions; lower max_tokens to at most {max(self.max_positions - prefix - prompt_len, 0)}"
            )
        cells = self.model.n_ctx - self.model.used_cells
        if prompt_len + max_tokens > cells:
            raise EngineError(
                f"prompt ({prompt_len}) + max_tokens ({max_tokens}) needs more KV cells than the llama.cpp context has "
                f"beside the loaded prefixes ({cells} of {self.model.n_ctx}); lower max_tokens or start the server "
                "with a larger --ctx-size"
            )

    # ---- worker -------------------------------------------------------------------------------------
    def _need(self, r: Request) -> int:
        return len(r.prompt_ids) + r.params.max_tokens

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._rows and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._rows:
                    return
                self._expire_pending()
                new = []
                with self.lock:  # adapter loads change the free cells; decide admissions against a settled count
                    free = self.model.n_ctx - self.model.used_cells - self._reserved
                    # FIFO: the head of the queue waits for cells rather than being overtaken forever
                    while self._pending and len(self._rows) + len(new) < self.max_batch_size and self._need(self._pending[0]) <= free:
                        r = self._pending.popleft()
                        free -= self._need(r)
                        new.append(r)
                    if not new and not self._rows and self._pending:  # nothing runs, yet the head does not fit:
                        r = self._pending.popleft()  # adapters loaded since it was accepted took its cells
                        self._finish(r, "error", status=503, error=f"prompt + max_tokens ({self._need(r)}) no longer fits "
                                     f"the llama.cpp context beside the loaded prefixes ({free} free cells); retry with fewer tokens")
                        continue
            try:
                with self.lock, torch.inference_mode():
                    self._step(new)
            except Exception as e:  # a failed step fails its rows, never the server
                log.exception("engine step failed")
                for r in self._rows + new:
                    if not r.finished:
                        self._finish(r, "error", error=f"generation failed: {type(e).__name__}: {e}", status=500)
            self._drop_finished()

    def _admit(self, new: list[Request]) -> list[Request]:
        ready = []
        for r in new:
            if r.cancelled:
                r.finished = True
            elif r.adapter is not None and r.adapter not in self.model.prefixes:
                self._finish(r, "error", error=f"adapter {r.adapter!r} was unloaded; available: {self.model_names()}", status=404)
            elif r.deadline and time.monotonic() > r.deadline:
                self._finish(r, "timeout", error=f"request timed out after {r.timeout:g}s in the queue", status=408)
            else:
                r.seq, r.pos = self.model.open_sequence(r.adapter)
                self._reserved += self._need(r)
                self._rows.append(r)  # at once: a failure later in the step still closes its sequence
                ready.append(r)
        return ready

    def _step(self, new: list[Request]) -> None:
        running = [r for r in self._rows if not r.finished]
        fresh = self._admit(new)
        rows = fresh + running
        if not rows:
            return
        items = [(r.seq, list(r.prompt_ids), r.pos) for r in fresh] + [(r.seq, [r.last], r.pos) for r in running]
        logits = torch.from_numpy(self.model.decode(items))
        for r, (_, toks, _) in zip(rows, items):
            r.pos += len(toks)
        self.stats["prompt_tokens"] += sum(len(r.prompt_ids) for r in fresh)
        if running:
            self.stats["steps"] += 1
            self.stats["rows_stepped"] += len(rows)
            self.batch_hist[len(rows)] = self.batch_hist.get(len(rows), 0) + 1
        self._step_rows(rows, logits)

    def _drop_finished(self) -> None:
        for r in self._rows:
            if r.cancelled:
                r.finished = True
        done = [r for r in self._rows if r.finished]
        if not done:
            return
        with self.lock:
            for r in done:
                self.model.close_sequence(r.seq)
                self._reserved -= self._need(r)
        self._rows = [r for r in self._rows if not r.finished]

    def close(self) -> None:
        self.stop()
        self.model.close()


def build_llamacpp_engine(model_path: str, adapters_dir: str | None = None, **kw) -> LlamaCppEngine:
    """The llama.cpp twin of api.build_engine: load the GGUF, then every adapter under adapters_dir."""
    engine = LlamaCppEngine(model_path, adapters_dir=adapters_dir, **kw)
    loaded = engine.load_dir()
    log.info("llama.cpp: serving %s with adapters %s", engine.model_name, loaded)
    return engine


def load(gguf_path, adapters=None, **engine_kw):
    """A GGUF model on llama.cpp with prefix adapters, ready for `generate` (see serving.offline.Generator).

    adapters: {name: directory}, one adapter directory (named "default"), or a directory of adapter directories.
    engine_kw: LlamaCppEngine options (max_batch_size, n_ctx, kv_type "f16"/"f32", flash_attn, n_threads, ...).
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


def cli_generate(args, prompts: list[str]) -> int:
    """`prefixtune generate --backend llamacpp`: the same prompts and printing as the torch path."""
    from ..training.data import encode_pair

    if args.num_beams != 1:
        raise ConfigError("--num-beams: beam search is not available with --backend llamacpp; use --num-beams 1")
    if args.temperature > 0 and args.top_k != 50:
        raise ConfigError("--top-k is not applied by --backend llamacpp (it samples with temperature and --top-p); drop --top-k")
    gen = load(args.model, {"default": args.adapter} if args.adapter else None, max_batch_size=8)
    try:
        ids, _ = encode_pair(gen.engine.tokenizer, prompts, [], False)  # tokenized exactly as the torch path does
        texts = gen.generate([list(x) for x in ids], "default" if args.adapter else None, max_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    finally:
        gen.close()
    for p, text in zip(prompts, texts):
        print(f"### {p}\n{text.strip()}\n") if len(prompts) > 1 else print(text.strip())
    return 0
