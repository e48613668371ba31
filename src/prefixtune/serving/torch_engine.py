"""TorchEngine: continuous batching for many prefixes on one PyTorch base model (api.py is the web side).

Decoder-only models (below) batch continuously; encoder-decoder models (T5, BART) run each admitted group
through PrefixModel.generate (see _generate_seq2seq). Encoder classifiers are refused.

One worker thread owns the model. It keeps a single running batch: a DynamicCache whose rows are
left-padded to a common length, plus a 2D mask [B, S] over every cached slot (prefix slots included). Its layers
are GrowingLayers from the prefill on: the prompt is written after the prefix, and each decode step its new column,
into spare room instead of concatenating.
Each iteration it
  1. admits queued requests (up to max_batch_size rows) and prefills them, grouped by prompt length so no
     padding enters a prefill (a row computes exactly what it would alone), then merges their caches into
     the running batch by left-padding keys/values and masks;
  2. runs ONE decode forward for all rows, whatever their adapter: prefixes already sit in the cache, so
     mixing adapters costs nothing per step;
  3. samples per row (engine.Engine._step_rows), emits text, and drops finished rows with index_select,
     trimming columns that no remaining row uses.
Prefix key/values, masks and position ids come from PrefixModel.prefixed_inputs (the one path, shared with
forward() and generate()); this module only merges and trims the running batch's cache rows.
Adapters are the PrefixModel's own (`load_adapter` / `delete_adapter`), their tables kept in the model's dtype.
A row may compose several adapters (a tuple of names): their prefixes are concatenated in order.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import DynamicCache, DynamicLayer, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .. import inject
from ..config import ConfigError
from .engine import Engine, eos_ids
from .request import Request


def _pad_left(x: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad the sequence dim (-2 for key/values, -1 for masks) with zeros up to `length`."""
    dim = -1 if x.dim() == 2 else -2
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return torch.nn.functional.pad(x, pad)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of buffers with spare columns, so a decode step writes its one new
    column in place. DynamicLayer concatenates, copying the whole cache of every layer at every step: on CPU that
    copy was a fifth of a decode step at 64 rows, and the larger part of what a prefix cost (P more columns copied
    per layer per step). The buffers grow by half when full; keys/values replaced from outside (row selection,
    merging, trimming in TorchEngine) are not views of the buffer any more and are moved into a new one on the
    next update."""

    _key_buf: torch.Tensor | None = None
    _value_buf: torch.Tensor | None = None

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> GrowingLayer:
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        n, add = self.keys.shape[-2], key_states.shape[-2]
        buf = self._key_buf
        if (buf is None or n + add > buf.shape[-2] or self.keys.data_ptr() != buf.data_ptr()
                or self.keys.stride() != buf.stride() or self.keys.shape[:2] != buf.shape[:2]):
            self._key_buf = self._rehome(self.keys, n + add)
            self._value_buf = self._rehome(self.values, n + add)
        self._key_buf[:, :, n:n + add] = key_states
        self._value_buf[:, :, n:n + add] = value_states
        self.keys, self.values = self._key_buf[:, :, :n + add], self._value_buf[:, :, :n + add]
        return self.keys, self.values

    @staticmethod
    def _rehome(x: torch.Tensor, need: int) -> torch.Tensor:
        """A buffer of `need` columns plus spare room (half again, at least 64), holding `x` in its first columns."""
        b, h, n, d = x.shape
        buf = x.new_empty(b, h, need + max(64, need // 2), d)
        buf[:, :, :n] = x
        return buf


def _growing(cache: DynamicCache) -> DynamicCache:
    """A prefill's cache, before its forward, in GrowingLayers: the prompt's key/values are written after the prefix in
    one buffer (no concatenation of the two), and the decode steps go on writing into that buffer's spare room."""
    cache.layers = [GrowingLayer.holding(layer.keys, layer.values) for layer in cache.layers]  # the prefix, if any
    cache.layer_class_to_replicate = GrowingLayer  # a bare prefill's cache has no layers until its first update
    return cache


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model, tokenizer=None, *, model_name: str = "base", **limits):
        if model.arch.kind == "encoder":
            raise ConfigError(
                f"{model.arch.model_type} is an encoder (classifier) model: it does not generate text, so it cannot be "
                "served; serve a decoder-only or encoder-decoder model (load encoder adapters with prefixtune.load_adapter)"
            )
        base = model.base_model
        cfg = base.config
        self.model = model.eval()
        stop_ids = eos_ids(getattr(base, "generation_config", None), cfg, tokenizer)
        super().__init__(tokenizer, model_name=model_name, vocab_size=cfg.vocab_size, eos_ids=stop_ids,
                         max_positions=inject.max_positions(model.arch, cfg), **limits)
        for name in model.prefixes:  # attached before serving: resident for good (no directory to reload from)
            self.registry.register_resident(name, model.configs[name].num_virtual_tokens, self._resident_bytes(name))
        self.base = base
        self._logits_to_keep = "logits_to_keep" in self.model._fwd_params
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, S], prefix slots included

    # ---- adapters --------------------------------------------------------------------------------------
    def _load_prefix(self, name: str, directory: Path) -> int:
        with torch.inference_mode(False), torch.no_grad():  # the worker loads under inference mode: plain tensors here
            return self._load_prefix_now(name, directory)

    def _load_prefix_now(self, name: str, directory: Path) -> int:
        self.model.load_adapter(directory, name=name)
        # Serving never trains: a plain table (what saved adapters hold) is kept in the model's dtype (bf16/fp16 on
        # a GPU), not fp32; the key/values are cast to it anyway, so this changes no output.
        enc = self.model.prefixes[name]
        if not enc.projection and enc.scale is None:
            enc.to(self.model._dtype)
        return self._resident_bytes(name)

    def _resident_bytes(self, name: str) -> int:
        """The adapter's parameters plus the per-layer key/values computed from them (kept for reuse), each storage
        once: a plain table's key/values are views of it."""
        tensors = [*self.model.prefixes[name].parameters(), *(t for kv in self.model.prefix_layers(name) for t in kv)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def _unload_prefix(self, name: str) -> None:
        self.model.delete_adapter(name)

    # ---- worker ----------------------------------------------------------------------------------------
    def _step(self, new: list[Request]) -> None:
        if self.model.arch.kind == "seq2seq":
            self._generate_seq2seq(new)
            return
        if new:
            self._prefill(new)
        if self._rows:
            self._decode()

    # ---- encoder-decoder: admitted requests run through PrefixModel.generate, one group at a time -----------
    def _generate_seq2seq(self, ready: list[Request]) -> None:
        """Greedy output equals PrefixModel.generate by construction: generate() runs the model (with the model's
        generation config, as offline), and a logits processor samples each row by its own request
        (Engine._step_rows) and forces generate() to take that token. Groups share a prompt length (no padding
        enters the encoder) and, for BART, a prefix length (its decoder numbers positions from the cache
        length). A group runs to its end; requests that arrive meanwhile wait."""
        bart_like = self.model.arch.model_type in inject.POSITIONS_FROM_CACHE_LENGTH
        # A generation config with forced_eos_token_id (BART's) forces that token at the last allowed step, so
        # rows that share a generate() call must share max_tokens too.
        forced_eos = getattr(self.base.generation_config, "forced_eos_token_id", None) is not None
        groups: dict[tuple[int, int, int], list[Request]] = {}
        for r in ready:
            key = (len(r.prompt_ids), self.prefix_length(r.adapter) if bart_like else 0, r.params.max_tokens if forced_eos else 0)
            groups.setdefault(key, []).append(r)
        for rows in groups.values():
            self._generate_group(rows)

    def _generate_group(self, rows: list[Request]) -> None:
        engine = self

        class Drive(LogitsProcessor):
            def __call__(self, input_ids, scores):
                active = [i for i, r in enumerate(rows) if not r.finished]
                if active:
                    engine._count_step(len(active))
                    engine._step_rows([rows[i] for i in active], scores[active])
                forced = torch.full_like(scores, float("-inf"))
                for i, r in enumerate(rows):
                    forced[i, r.last if r.last is not None else 0] = 0.0  # finished rows: any token, never read
                return forced

        class Done(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.tensor([r.finished or r.cancelled for r in rows], device=input_ids.device)

        ids = torch.tensor([r.prompt_ids for r in rows], device=self.model.device)
        cfg = copy.deepcopy(self.base.generation_config)
        # Our requests decide when a row ends (EOS unless ignore_eos, stop strings, max_tokens): generate() must
        # not end a row on its own, so it runs without an EOS of its own and stops on `Done`.
        # eos_token_id None would fall back to the model config's EOS inside generate(); vocab_size is an id that
        # no row can be forced to (the scores have vocab_size columns)
        cfg.eos_token_id, cfg.do_sample, cfg.num_beams, cfg.num_return_sequences = scores_width(self.base), False, 1, 1
        cfg.max_new_tokens, cfg.max_length, cfg.min_length, cfg.min_new_tokens = max(r.params.max_tokens for r in rows), None, 0, None
        self.stats.prefilled(ids.numel())
        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[r.adapter for r in rows],
                            generation_config=cfg, logits_processor=LogitsProcessorList([Drive()]),
                            stopping_criteria=StoppingCriteriaList([Done()]))

    def _after_failure(self) -> None:
        self._rows, self._cache, self._mask = [], None, None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, names: list) -> tuple:
        """One forward through PrefixModel.prefixed_inputs, the one path by which prefix key/values, masks and
        position ids reach the model: for a prefill `cache` is empty and `names` the rows' adapters (the prefix
        is put in the cache and in front of `mask`); for a decode step the prefix is in `cache` and `mask` already,
        so every row is named None and only the mask-derived positions are added.
        -> (next-token logits [B, vocab], the cache, the mask over every cached slot)."""
        kw = self.model.prefixed_inputs(ids, mask, adapter_names=names, past_key_values=cache, use_cache=True)
        if cache is not self._cache:  # a prefill: a prefix is in the cache prefixed_inputs made, bare rows have none
            _growing(kw[self.model.cache_kw])
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1  # as generate() does: same logits, no [T, vocab] waste
        out = self.base(**kw)
        return out.logits[:, -1].float(), kw[self.model.cache_kw], kw["attention_mask"]

    def _prefill(self, ready: list[Request]) -> None:
        by_len: dict[int, list[Request]] = {}
        for r in ready:
            by_len.setdefault(len(r.prompt_ids), []).append(r)
        for group in by_len.values():
            ids = torch.tensor([r.prompt_ids for r in group], device=self.model.device)
            logits, cache, mask = self._forward(ids, torch.ones_like(ids), DynamicCache(), [r.adapter for r in group])
            self.stats.prefilled(ids.numel())
            self._step_rows(group, logits)
            keep = [i for i, r in enumerate(group) if not r.finished]
            if keep:
                self._merge([group[i] for i in keep], cache, mask, keep)

    def _merge(self, rows, cache, mask, keep) -> None:
        if len(keep) != mask.shape[0]:
            idx = torch.tensor(keep, device=mask.device)
            cache, mask = self._select(cache, mask, idx)
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, list(rows)
            return
        length = max(self._mask.shape[1], mask.shape[1])
        for old, add in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, length), _pad_left(add.keys, length)])
            old.values = torch.cat([_pad_left(old.values, length), _pad_left(add.values, length)])
        self._mask = torch.cat([_pad_left(self._mask, length), _pad_left(mask, length)])
        self._rows += rows

    @staticmethod
    def _select(cache, mask, idx):
        cache.batch_select_indices(idx)
        return cache, mask.index_select(0, idx)

    def _decode(self) -> None:
        ids = torch.tensor([[r.last] for r in self._rows], device=self._mask.device)
        mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        logits, self._cache, self._mask = self._forward(ids, mask, self._cache, [None] * len(self._rows))
        self._count_step(len(self._rows))
        self._step_rows(self._rows, logits)

    def _drop_finished(self) -> None:
        """Remove finished/cancelled rows and the leading columns nobody attends to any more."""
        self._close_cancelled()
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._cache, self._mask = self._select(self._cache, self._mask, torch.tensor(keep, device=self._mask.device))
        self._rows = [self._rows[i] for i in keep]
        first = int(self._mask.any(0).nonzero()[0])
        if first:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def scores_width(base) -> int:
    """The number of logits per step (an id past the last one is no token)."""
    return base.get_output_embeddings().weight.shape[0]
