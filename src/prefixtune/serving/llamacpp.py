"""Prefix adapters on llama.cpp (through llama-cpp-python's C API): the model side of the llama.cpp backend.

A prefix is P key/value cache entries per layer, written into llama.cpp's KV cache as P cells at positions
0..P-1 of a request's sequence (see llamacpp_cache for the state blob). Real tokens start at position P, as
in our PyTorch engine and peft, so one `llama_decode` can step requests of different adapters together.
Two cache modes (`kv_unified`), each a strategy in llamacpp_modes: per-sequence (default: each request's
sequence gets a copy of its adapter's P cells; each token attends only over its own sequence) and unified (one
shared stream; each adapter's cells are written once and shared; every token of a step attends, masked, over the
used cells of all sequences, which makes decoding many rows slower: benchmarks/results/llamacpp.md).
"""

from __future__ import annotations

import ctypes
import heapq
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .. import inject
from ..extras import install_command
from . import llamacpp_cache
from .llamacpp_modes import LlamaCppError, PerSequenceCache, UnifiedCache

log = logging.getLogger("prefixtune.llamacpp")

INSTALL_HINT = install_command("llamacpp")
# GGUF general.architecture -> transformers model_type (Mistral GGUFs report "llama"). Rope style decides
# whether prefix keys are permuted (see llamacpp_cache.fill): llama.cpp reports it per model.
SUPPORTED_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
KV_TYPES = {"f32": 0, "f16": 1}  # ggml type ids for the cache
LLAMA_ROPE_TYPE_NORM = 0


def import_llama_cpp():
    """llama_cpp's low-level module, or a LlamaCppError with the install command."""
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppError(
            f"the llama.cpp backend needs llama-cpp-python, which is not installed: {INSTALL_HINT} "
            "(it builds llama.cpp from source, a few minutes)"
        ) from None
    logger = logging.getLogger("llama-cpp-python")  # llama.cpp's own chatter goes through this logger
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    return llama_cpp


def extra_bufts_default(lib) -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffer types (AMX, CPU_REPACK).

    Off where llama.cpp was built with AMX: its AMX matmul segfaults on the first quantized decode on some
    Sapphire Rapids machines, this one among them (ggml-org/llama.cpp#20824, still open; any Q4_0/Q4_1/Q8_0
    GGUF, with or without prefixes). Without extra buffers the same weights run on the plain CPU kernels.
    """
    return "AMX_INT8 = 1" not in lib.llama_print_system_info().decode(errors="replace")


def requantize(src, dst, wtype: str) -> Path:
    """Write the GGUF `src` with its weights converted to `wtype` ("q4_0", "q8_0", "f16", ...) as `dst`."""
    lib = import_llama_cpp()
    qp = lib.llama_model_quantize_default_params()
    qp.ftype, qp.allow_requantize = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{wtype.upper()}"), True
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), qp) != 0:
        raise LlamaCppError(f"llama.cpp could not convert {src} to {wtype}")
    return Path(dst)


def _meta(lib, model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(512)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def _check_file(path) -> Path:
    p = Path(path).expanduser()
    if p.suffix.lower() != ".gguf":
        raise LlamaCppError(f"--model {path}: the llama.cpp backend takes a .gguf file")
    if not p.is_file():
        raise LlamaCppError(f"--model {path}: GGUF file not found; check the path")
    return p


class LlamaCppModel:
    """One GGUF model in llama.cpp with named prefixes. Not thread-safe: one thread (the engine's) drives it.

    Sequence ids: unified, 0..max_adapters-1 hold prefixes; per-sequence, 0 is scratch space for building prefix
    blobs. The rest are handed out to requests (`open_sequence`).
    seq_cells (per-sequence mode): cells of each sequence's stream, prefix included (default n_ctx //
    max_sequences; llama.cpp rounds it up to a multiple of 256). n_threads_batch: threads for prompt batches
    (default n_threads). extra_bufts: let llama.cpp repack weights into its extra CPU buffers (None: on unless
    this llama.cpp has AMX, see extra_bufts_default).
    """

    def __init__(self, gguf_path, *, n_ctx: int = 4096, max_sequences: int = 32, max_adapters: int = 16,
                 kv_type: str = "f16", flash_attn: bool = False, n_threads: int | None = None, n_batch: int = 512,
                 n_ubatch: int | None = None, n_threads_batch: int | None = None, kv_unified: bool = False,
                 seq_cells: int | None = None, extra_bufts: bool | None = None):
        lib = self.lib = import_llama_cpp()
        self.path = _check_file(gguf_path)
        if kv_type not in KV_TYPES:
            raise LlamaCppError(f"kv_type {kv_type!r}: use one of {sorted(KV_TYPES)}")
        self.kv_type = kv_type
        lib.llama_backend_init()
        self.arch = self._read_arch()  # before the weights: an unsupported file is refused cheaply

        mp = lib.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts_default(lib) if extra_bufts is None else extra_bufts
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise LlamaCppError(f"--model {self.path}: llama.cpp could not load this GGUF (corrupt or unsupported tensors)")
        self.interleave_rope = lib.llama_model_rope_type(self.model) == LLAMA_ROPE_TYPE_NORM
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.model)

        self.unified = kv_unified
        n_seq = (max_adapters if kv_unified else 1) + max_sequences  # prefix sequences / one scratch sequence
        if n_seq > lib.llama_max_parallel_sequences():
            raise LlamaCppError(f"max_adapters + max_sequences = {n_seq} exceeds llama.cpp's "
                                f"{lib.llama_max_parallel_sequences()} sequences; lower one of them")
        cp = lib.llama_context_default_params()
        # per-sequence: llama.cpp gives each of the n_seq streams n_ctx / n_seq cells
        cp.n_ctx = n_ctx if kv_unified else (seq_cells or max(1, n_ctx // max_sequences)) * n_seq
        cp.n_batch, cp.n_ubatch = n_batch, min(n_ubatch or n_batch, n_batch)
        cp.n_seq_max = n_seq
        cp.kv_unified = kv_unified
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        cp.n_threads, cp.n_threads_batch = threads, n_threads_batch or threads
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LlamaCppError(f"llama.cpp could not create a context of {n_ctx} cells for {self.path.name}; lower n_ctx")
        self.n_ctx = lib.llama_n_ctx(self.ctx)
        self.seq_cells = lib.llama_n_ctx_seq(self.ctx)  # the cells one sequence can hold (n_ctx when unified)
        self.n_batch = lib.llama_n_batch(self.ctx)  # llama.cpp clamps it to n_ctx; decode() chunks by it
        self.mem = lib.llama_get_memory(self.ctx)
        self.max_adapters = max_adapters if kv_unified else 0
        self._batch = lib.llama_batch_init(n_batch, 0, 1)

        self.mode = UnifiedCache(self, max_adapters) if kv_unified else PerSequenceCache(self)
        self.prefixes: dict[str, tuple[int, int]] = {}  # name -> (prefix sequence id, P); per-sequence: (-1, P)
        # a min-heap: the lowest free ids first, so running sequences stay a dense run of ids (see decode)
        self._free_req = list(range(self.mode.first_request_seq, n_seq))

    # ---- model facts --------------------------------------------------------------------------------
    def _read_arch(self) -> inject.Arch:
        lib = self.lib
        mp = lib.llama_model_default_params()
        mp.vocab_only = True  # metadata only: no weights read
        m = lib.llama_model_load_from_file(str(self.path).encode(), mp)
        if not m:
            raise LlamaCppError(f"--model {self.path}: llama.cpp cannot read this GGUF (corrupt, or an architecture "
                                f"this llama.cpp does not know); supported here: {', '.join(SUPPORTED_ARCHS)}")
        try:
            arch = _meta(lib, m, "general.architecture")
            if arch not in SUPPORTED_ARCHS:
                raise LlamaCppError(
                    f"--model {self.path.name}: GGUF architecture {arch!r} is not supported by the llama.cpp prefix "
                    f"backend; supported: {', '.join(SUPPORTED_ARCHS)} (Mistral and SmolLM2 GGUFs report 'llama')"
                )

            def num(key, default=None):
                v = _meta(lib, m, f"{arch}.{key}")
                return int(v) if v is not None else default

            layers, heads = num("block_count"), num("attention.head_count")
            kv_heads = num("attention.head_count_kv", heads)
            head_dim = num("attention.key_length") or num("embedding_length") // heads
            if num("attention.value_length", head_dim) != head_dim:
                raise LlamaCppError(f"{self.path.name}: key and value head sizes differ; prefixes need them equal")
        finally:
            lib.llama_model_free(m)
        return inject.Arch(SUPPORTED_ARCHS[arch], "causal", layers, heads, kv_heads, head_dim)

    @property
    def used_cells(self) -> int:
        """Cells of the shared context that prefixes hold (requests' own cells are the engine's to count);
        0 per-sequence, where each request's prefix lives in its own stream."""
        return self.mode.used_cells

    # ---- prefixes -----------------------------------------------------------------------------------
    def prefix_bytes(self, name: str) -> int:
        """Host memory an adapter holds (per-sequence: its state blob and key/values; unified: its cells)."""
        return self.mode.nbytes(name)

    def check_adapter_fits(self, directory) -> None:
        """Compare an adapter's shapes with this GGUF, naming every field that differs."""
        cfg_path = Path(directory) / "adapter_config.json"
        try:
            pc = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError):
            return  # read_adapter gives the precise error
        layers, kv, token_dim = pc.get("num_layers"), pc.get("num_attention_heads"), pc.get("token_dim")
        if None in (layers, kv, token_dim) or not kv:
            return
        a = self.arch
        diffs = [f"{what}: adapter {mine} vs model {theirs}" for what, mine, theirs in (
            ("layers", layers, a.num_layers), ("kv heads", kv, a.kv_heads), ("head size", token_dim // kv, a.head_dim))
            if mine != theirs]
        if diffs:
            raise LlamaCppError(f"adapter {directory} was made for another model ({pc.get('base_model_name_or_path')}), "
                                f"not {self.path.name}: " + "; ".join(diffs))

    def adapter_layers(self, directory) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """An adapter directory (ours or peft's) -> per-layer (key, value) [kv_heads, P, head_dim]."""
        from ..adapter_io import read_adapter
        from ..encoder import PrefixEncoder

        self.check_adapter_fits(directory)
        cfg, state, _ = read_adapter(directory, self.arch, None)
        if cfg.placement != "decoder":
            raise LlamaCppError(f"adapter {directory}: placement {cfg.placement!r} is for encoder-decoder models")
        enc = PrefixEncoder(cfg, self.arch.num_layers, self.arch.token_dim)
        enc.load_state_dict(state)
        with torch.no_grad():
            return [(k.clone(), v.clone()) for k, v in inject.split_layers(enc.eval()(), self.arch)]

    def load_prefix(self, name: str, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Prepare one adapter's key/values in the cache mode's way (llamacpp_modes)."""
        a = self.arch
        if len(layers) != a.num_layers or tuple(layers[0][0].shape[::2]) != (a.kv_heads, a.head_dim):
            got = (len(layers),) + tuple(layers[0][0].shape[::2])
            raise LlamaCppError(f"prefix {name!r} has (layers, kv heads, head size) {got}, the model "
                                f"{(a.num_layers, a.kv_heads, a.head_dim)}")
        if name in self.prefixes:
            raise LlamaCppError(f"adapter {name!r} is already loaded; unload it first")
        P = layers[0][0].shape[1]
        seq = self.mode.load(name, layers, P)
        self.prefixes[name] = (-1 if seq is None else seq, P)

    def write_prefix(self, seq: int, layers, P: int, name: str) -> ctypes.Array:
        """Give `seq` the prefix as P cells at positions 0..P-1; returns the blob that did it."""
        lib = self.lib
        lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
        # P dummy tokens give a blob with llama.cpp's own headers for P cells at positions 0..P-1.
        self.decode([(seq, [0] * P, 0)], logits=False)
        size = lib.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data(self.ctx, buf, size, seq) != size:
            raise RuntimeError("llama_state_seq_get_data returned a short blob")
        blob = llamacpp_cache.parse(bytes(buf), self.arch.num_layers, self.arch.token_dim)
        if blob.positions != list(range(P)):
            raise llamacpp_cache.BlobLayoutError(f"dummy prefix positions {blob.positions[:4]}..., expected 0..{P - 1}")
        data = llamacpp_cache.fill(blob, layers, self.interleave_rope)
        src = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        self.set_state(seq, src, name)
        return src

    def set_state(self, seq: int, blob: ctypes.Array, name: str) -> None:
        if self.lib.llama_state_seq_set_data(self.ctx, blob, len(blob), seq) != len(blob):
            self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
            raise RuntimeError(f"llama.cpp refused the prefix state of {name!r}")

    def unload_prefix(self, name: str) -> None:
        """Forget `name`; unified, its cells are freed once no running sequence shares them (per-sequence, each
        running request keeps its own copy)."""
        self.mode.unload(name)
        del self.prefixes[name]

    # ---- sequences ----------------------------------------------------------------------------------
    def open_sequence(self, adapter) -> tuple[int, int]:
        """-> (sequence id, first position): the sequence already holds the adapter's prefix cells (or, for a
        tuple of adapter names, their cells in that order)."""
        if not self._free_req:
            raise RuntimeError("no free llama.cpp sequence (the engine admits at most max_sequences requests)")
        seq = heapq.heappop(self._free_req)
        self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
        names = () if adapter is None else (adapter,) if isinstance(adapter, str) else tuple(adapter)
        if not names:
            return seq, 0
        try:
            return seq, self.mode.open(seq, names)
        except Exception:
            heapq.heappush(self._free_req, seq)
            raise

    def close_sequence(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.mode.close(seq)
        heapq.heappush(self._free_req, seq)

    # ---- compute ------------------------------------------------------------------------------------
    def decode(self, items: list[tuple[int, list[int], int]], logits: bool = True) -> np.ndarray | None:
        """One step over several sequences: items are (sequence, new tokens, position of the first one).

        Returns the next-token logits after each item's last token, [len(items), vocab] float32. The tokens
        go to llama.cpp in as few `llama_decode` calls as n_batch allows (one, in a decode step).
        Items go in order of sequence id: with per-sequence streams llama.cpp splits a batch into ubatches of
        consecutive sequence ids only (llama_batch_allocr::split_equal, sequential), one weight pass each.
        """
        lib, b = self.lib, self._batch
        order = sorted(range(len(items)), key=lambda i: items[i][0])
        flat = [(seq, tok, pos + j, j == len(toks) - 1) for seq, toks, pos in (items[i] for i in order)
                for j, tok in enumerate(toks)]
        out = np.empty((len(items), self.n_vocab), dtype=np.float32) if logits else None
        row = 0
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start : start + self.n_batch]
            outputs = []
            for i, (seq, tok, pos, last) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                b.seq_id[i][0] = seq
                b.logits[i] = bool(last and logits)
                if last and logits:
                    outputs.append(i)
            b.n_tokens = len(chunk)
            rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}): "
                                   + ("no free KV cells (context full)" if rc == 1 else "see llama.cpp's log"))
            for i in outputs:
                ptr = lib.llama_get_logits_ith(self.ctx, i)
                out[order[row]] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
                row += 1
        return out

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
