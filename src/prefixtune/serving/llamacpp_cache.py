"""llama.cpp's sequence-state blob, read and rewritten so a prefix's key/values become cache cells.

`llama_state_seq_get_data(ctx, buf, size, seq)` serialises one sequence of a llama.cpp KV cache. The layout
(llama.cpp `src/llama-context.cpp` state_seq_get_data and `src/llama-kv-cache.cpp` state_write /
state_write_meta / state_write_data, as vendored in llama-cpp-python 0.3.36), all little-endian:

    u32 magic 0xaf143cd8, i32 seq_id                      (context; both ignored by set_data on the host)
    u32 n_stream                                          (1 with kv_unified, else one stream per sequence)
    per stream: u32 cell_count, then if cell_count > 0:   (one sequence's blob: only its own stream has cells)
      cell_count x (i32 pos, u32 n_seq_id, n_seq_id x i32 seq_id)   (no per-cell ext for llama/qwen2/qwen3)
      u32 v_trans, u32 n_layer
      n_layer x K block: i32 ggml type, u64 row bytes, cell_count rows (row = kv_heads x head_dim, head-major)
      v_trans == 0: n_layer x V block, laid out like K
      v_trans == 1: n_layer x (i32 type, u32 element bytes, u32 n_embd_v_gqa, then for each of the n_embd_v_gqa
                    channels its cell_count elements), i.e. V transposed

We never invent this layout: the caller decodes P dummy tokens into a sequence, `parse` checks that the blob
is exactly what the layout above predicts (sizes add up to the last byte), and `fill` overwrites only the
K/V payloads, keeping every header as llama.cpp wrote it. A llama.cpp version that changes the layout then
fails loudly here instead of computing with misplaced numbers.

`llama_state_seq_set_data(ctx, blob, size, dest)` reads the cells into `dest`'s stream, discarding the seq ids
the blob names (llama-kv-cache.cpp state_read_meta: "we will use dest_seq_id instead"), so one filled blob can
be written into any sequence of the same context unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import torch

MAGIC = 0xAF143CD8
GGML_TYPES = {0: np.float32, 1: np.float16}  # the cache types a prefix can be written into (ggml_type ids)


class BlobLayoutError(RuntimeError):
    """The state blob does not have the layout this module knows (another llama.cpp version?)."""


@dataclass
class Block:
    offset: int  # byte offset of the payload in the blob
    dtype: type
    shape: tuple[int, int]  # K and row-wise V: (cells, row elems); transposed V: (row elems, cells)


@dataclass
class SeqBlob:
    raw: bytearray
    cells: int
    positions: list[int]
    v_trans: bool
    keys: list[Block] = field(default_factory=list)
    values: list[Block] = field(default_factory=list)


class _Reader:
    def __init__(self, raw: bytes):
        self.raw, self.pos = raw, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.raw):
            raise BlobLayoutError(f"blob ends at byte {len(self.raw)} while reading {fmt!r} at {self.pos}")
        vals = struct.unpack_from(fmt, self.raw, self.pos)
        self.pos += size
        return vals if len(vals) > 1 else vals[0]

    def skip(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.raw):
            raise BlobLayoutError(f"blob ends at byte {len(self.raw)}, a payload of {n} bytes at {start} does not fit")
        self.pos += n
        return start


def _dtype(type_id: int, what: str):
    if type_id not in GGML_TYPES:
        raise BlobLayoutError(f"{what} cache type is ggml type {type_id}; prefixes can be written into f32 (0) or f16 (1) caches")
    return GGML_TYPES[type_id]


def _parse_stream(r: _Reader, raw: bytes, cells: int, n_layer: int, row_elems: int) -> SeqBlob:
    """One stream's cells (after its cell_count): cell headers, then the K and V blocks of every layer."""
    positions = []
    for _ in range(cells):
        pos, n_seq = r.take("<iI")
        if n_seq != 1:
            raise BlobLayoutError(f"a cell lists {n_seq} sequences; a one-sequence state lists 1")
        r.take("<i")
        positions.append(pos)
    v_trans, layers = r.take("<II")
    if layers != n_layer:
        raise BlobLayoutError(f"state has {layers} layers, the model {n_layer}")
    blob = SeqBlob(bytearray(raw), cells, positions, bool(v_trans))
    for _ in range(layers):
        dtype = _dtype(r.take("<i"), "K")
        row = r.take("<Q")
        if row != row_elems * np.dtype(dtype).itemsize:
            raise BlobLayoutError(f"K rows are {row} bytes, expected {row_elems} x {np.dtype(dtype).itemsize}")
        blob.keys.append(Block(r.skip(cells * row), dtype, (cells, row_elems)))
    for _ in range(layers):
        dtype = _dtype(r.take("<i"), "V")
        if not v_trans:
            row = r.take("<Q")
            if row != row_elems * np.dtype(dtype).itemsize:
                raise BlobLayoutError(f"V rows are {row} bytes, expected {row_elems} x {np.dtype(dtype).itemsize}")
            blob.values.append(Block(r.skip(cells * row), dtype, (cells, row_elems)))
        else:
            el, n_embd = r.take("<II")
            if el != np.dtype(dtype).itemsize or n_embd != row_elems:
                raise BlobLayoutError(f"transposed V: {n_embd} channels of {el} bytes, expected {row_elems} of {np.dtype(dtype).itemsize}")
            blob.values.append(Block(r.skip(cells * n_embd * el), dtype, (row_elems, cells)))
    return blob


def parse(raw: bytes, n_layer: int, row_elems: int) -> SeqBlob:
    """Check and index a one-sequence blob whose layers hold rows of `row_elems` (= kv_heads * head_dim)."""
    r = _Reader(bytes(raw))
    magic, _seq = r.take("<Ii")
    if magic != MAGIC:
        raise BlobLayoutError(f"state magic {magic:#x}, expected {MAGIC:#x}")
    n_stream = r.take("<I")
    blob = None
    for _ in range(n_stream):
        cells = r.take("<I")
        if cells == 0:
            continue  # a non-unified cache lists every stream; only the sequence's own holds cells
        if blob is not None:
            raise BlobLayoutError("two KV streams hold cells; a one-sequence state has one")
        blob = _parse_stream(r, raw, cells, n_layer, row_elems)
    if blob is None:
        raise BlobLayoutError("the state holds no cells")
    if r.pos != len(raw):
        raise BlobLayoutError(f"{len(raw) - r.pos} bytes left over after the last layer")
    return blob


def _write(blob: SeqBlob, block: Block, data: np.ndarray) -> None:
    arr = np.ascontiguousarray(data, dtype=block.dtype)
    assert arr.shape == block.shape, (arr.shape, block.shape)
    blob.raw[block.offset : block.offset + arr.nbytes] = arr.tobytes()


def fill(blob: SeqBlob, layers: list[tuple[torch.Tensor, torch.Tensor]], interleave_rope: bool) -> bytes:
    """Put per-layer (key, value) [kv_heads, P, head_dim] (transformers' cache layout) into the blob's cells.

    interleave_rope: llama.cpp's Llama-family GGUFs store Q/K rows permuted so that each head's rotary pairs are
    neighbours (2i, 2i+1) instead of transformers' halves (i, i + d/2); the keys llama.cpp caches are in that
    permuted order, so a prefix key written there must be permuted the same way (values are not).
    """
    if len(layers) != len(blob.keys):
        raise BlobLayoutError(f"prefix has {len(layers)} layers, the state {len(blob.keys)}")
    for (k, v), kb, vb in zip(layers, blob.keys, blob.values):
        kv_heads, P, hd = k.shape
        if P != blob.cells:
            raise BlobLayoutError(f"prefix has {P} positions, the state {blob.cells} cells")
        k = k.detach().float().cpu()
        if interleave_rope:
            k = torch.stack([k[..., : hd // 2], k[..., hd // 2 :]], dim=-1).reshape(kv_heads, P, hd)
        rows_k = k.permute(1, 0, 2).reshape(P, kv_heads * hd).numpy()  # cell row: head 0 dims, head 1 dims, ...
        rows_v = v.detach().float().cpu().permute(1, 0, 2).reshape(P, kv_heads * hd).numpy()
        _write(blob, kb, rows_k)
        _write(blob, vb, rows_v.T if blob.v_trans else rows_v)
    return bytes(blob.raw)

