"""The two llama.cpp KV cache modes as strategies, chosen once when the model is built (llamacpp.LlamaCppModel).

Each mode answers the same questions: where an adapter's P cells live, how a request's sequence gets them (and
a composed request the cells of several adapters, in order), what memory an adapter holds, and how many of the
context's cells a request needs before it may start.

- PerSequenceCache (default): every sequence has its own stream of `seq_cells` cells; an adapter is a state blob
  built once (in scratch sequence 0) and written into each request's sequence: a copy of P cells per request.
  A composed request gets a blob built from its parts' key/values concatenated, kept until a part unloads.
- UnifiedCache: one stream of n_ctx cells shared by all sequences; each adapter's P cells sit once in a sequence
  reserved for it (ids 0..max_adapters-1) and are shared with requests by `llama_memory_seq_cp` (no copy).
  Requests reserve prompt + max_tokens cells of the shared stream before they start.
"""

from __future__ import annotations

import ctypes

import torch

from ..config import ConfigError

Layers = list[tuple[torch.Tensor, torch.Tensor]]
KV_BYTES = {"f32": 4, "f16": 2}


class LlamaCppError(ConfigError):
    """Bad input for the llama.cpp backend (file, adapter, sizes): one line naming what and the fix."""


class PerSequenceCache:
    unified = False

    def __init__(self, model):
        self.m = model
        self.first_request_seq = 1  # sequence 0 is scratch space for building blobs
        self.blobs: dict[str | tuple[str, ...], ctypes.Array] = {}  # an adapter (or a composition) -> its blob
        self.layers: dict[str, Layers] = {}  # host copies, for building compositions

    @property
    def used_cells(self) -> int:
        return 0  # each request's prefix lives in its own stream

    def nbytes(self, name: str) -> int:
        return len(self.blobs[name]) + sum(k.numel() * k.element_size() * 2 for k, _ in self.layers[name])

    def load(self, name: str, layers: Layers, P: int) -> None:
        self._check_room(name, P)
        self.blobs[name] = self._build(name, layers, P)
        dtype = torch.float16 if self.m.kv_type == "f16" else torch.float32
        self.layers[name] = [(k.to(dtype), v.to(dtype)) for k, v in layers]

    def _check_room(self, name, P: int) -> None:
        if P >= self.m.seq_cells:
            raise LlamaCppError(
                f"prefix {name!r} has {P} virtual tokens, but a llama.cpp sequence has {self.m.seq_cells} cells; "
                "start with a larger context (n_ctx / seq_cells) or use a shorter prefix")

    def _build(self, name, layers: Layers, P: int) -> ctypes.Array:
        try:
            return self.m.write_prefix(0, layers, P, name)  # set_data once: llama.cpp accepts it
        finally:
            self.m.lib.llama_memory_seq_rm(self.m.mem, 0, -1, -1)

    def unload(self, name: str) -> None:
        del self.blobs[name], self.layers[name]
        for key in [k for k in self.blobs if isinstance(k, tuple) and name in k]:
            del self.blobs[key]  # compositions that used it

    def open(self, seq: int, names: tuple[str, ...]) -> int:
        key = names[0] if len(names) == 1 else names
        if key not in self.blobs:
            parts = [self.layers[n] for n in names]
            layers = [(torch.cat([p[i][0] for p in parts], 1), torch.cat([p[i][1] for p in parts], 1))
                      for i in range(len(parts[0]))]
            P = layers[0][0].shape[1]
            self._check_room("+".join(names), P)
            self.blobs[key] = self._build("+".join(names), layers, P)
        self.m.set_state(seq, self.blobs[key], "+".join(names))
        return sum(self.m.prefixes[n][1] for n in names)

    def close(self, seq: int) -> None:
        pass

    def request_cells(self, prompt_len: int, max_tokens: int) -> int:
        return 0  # a request's own stream: checked once, in check_request

    def check_request(self, prompt_len: int, max_tokens: int, prefix: int, parts: int = 1) -> str | None:
        cells = self.m.seq_cells - prefix
        if prompt_len + max_tokens > cells:
            return (f"prompt ({prompt_len}) + max_tokens ({max_tokens}) needs more KV cells than a llama.cpp sequence "
                    f"has beside the adapter's prefix ({cells} of {self.m.seq_cells}); lower max_tokens or start "
                    "the server with more cells per sequence (seq_cells, or a larger n_ctx)")
        return None


class UnifiedCache:
    unified = True

    def __init__(self, model, max_adapters: int):
        self.m = model
        self.max_adapters = max_adapters
        self.first_request_seq = max_adapters  # 0..max_adapters-1 hold prefixes
        self.users: dict[int, int] = {}  # prefix sequence -> running sequences sharing its cells
        self.retired: set[int] = set()  # unloaded prefixes whose cells still serve running sequences
        self.seq_prefix: dict[int, int] = {}  # request sequence -> its prefix sequence
        self.plen: dict[int, int] = {}  # prefix sequence -> P, until its cells are freed

    @property
    def used_cells(self) -> int:
        return sum(self.plen.values())

    def nbytes(self, name: str) -> int:
        a = self.m.arch
        return self.m.prefixes[name][1] * a.num_layers * 2 * a.token_dim * KV_BYTES[self.m.kv_type]

    def load(self, name: str, layers: Layers, P: int) -> int:
        m = self.m
        if self.used_cells + P >= m.n_ctx:
            raise LlamaCppError(
                f"prefix {name!r} has {P} virtual tokens, but the llama.cpp context has {m.n_ctx - self.used_cells} "
                f"free cells of {m.n_ctx}; start with a larger context (n_ctx / --ctx-size) or unload adapters")
        taken = {s for s, _ in m.prefixes.values()} | self.retired
        free = [s for s in range(self.max_adapters) if s not in taken]
        if not free:
            raise LlamaCppError(f"{self.max_adapters} adapters are loaded (the limit); unload one first")
        seq = free[0]
        try:
            m.write_prefix(seq, layers, P, name)
        except Exception:
            m.lib.llama_memory_seq_rm(m.mem, seq, -1, -1)
            raise
        self.users[seq], self.plen[seq] = 0, P
        return seq

    def unload(self, name: str) -> None:
        seq, _ = self.m.prefixes[name]
        if self.users.get(seq):
            self.retired.add(seq)
        else:
            self._free(seq)

    def _free(self, seq: int) -> None:
        self.m.lib.llama_memory_seq_rm(self.m.mem, seq, -1, -1)
        self.users.pop(seq, None)
        self.retired.discard(seq)
        self.plen.pop(seq, None)

    def open(self, seq: int, names: tuple[str, ...]) -> int:
        pseq, P = self.m.prefixes[names[0]]
        self.m.lib.llama_memory_seq_cp(self.m.mem, pseq, seq, -1, -1)
        self.users[pseq] += 1
        self.seq_prefix[seq] = pseq
        return P

    def close(self, seq: int) -> None:
        pseq = self.seq_prefix.pop(seq, None)
        if pseq is not None:
            self.users[pseq] -= 1
            if pseq in self.retired and self.users[pseq] == 0:
                self._free(pseq)

    def request_cells(self, prompt_len: int, max_tokens: int) -> int:
        return prompt_len + max_tokens

    def check_request(self, prompt_len: int, max_tokens: int, prefix: int, parts: int = 1) -> str | None:
        if parts > 1:
            return ("composing prefixes is not available with the unified llama.cpp cache (kv_unified); serve with "
                    "the default per-sequence cache")
        cells = self.m.n_ctx - self.used_cells
        if prompt_len + max_tokens > cells:
            return (f"prompt ({prompt_len}) + max_tokens ({max_tokens}) needs more KV cells than the llama.cpp context has "
                    f"beside the loaded prefixes ({cells} of {self.m.n_ctx}); lower max_tokens or start the server "
                    "with a larger context (n_ctx)")
        return None
