"""PrefixModel: a frozen base model plus named prefixes. Same inputs and outputs as the base model.

    model = attach(base, PrefixConfig(num_virtual_tokens=20))
    model(input_ids=..., attention_mask=..., labels=...)          # like base(...)
    model.generate(input_ids=..., adapter_names=["a", None, "b"])  # one prefix per row
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from . import compose, inject
from .adapters import AdapterSetMixin
from .config import ConfigError, PrefixConfig
from .hf_integration import HFIntegrationMixin


class PrefixModel(AdapterSetMixin, HFIntegrationMixin, nn.Module):
    """The prefix engine: how the prefixes get into forward() and generate(). Adding, loading, saving and switching
    named prefixes comes from AdapterSetMixin (adapters.py); what transformers.Trainer, TRL and the Hub expect of a
    model from HFIntegrationMixin (hf_integration.py)."""

    def __init__(self, base_model: nn.Module):
        super().__init__()
        self.base_model = base_model
        self.arch = inject.arch_of(base_model)
        self.prefixes = nn.ModuleDict()
        self.heads = nn.ModuleDict()  # per-adapter classifier heads (encoder classifiers only)
        self.configs: dict[str, PrefixConfig] = {}
        self.active_adapter: str | None = None
        self._eval_memo: dict[str, tuple[tuple, list]] = {}
        self._encoder_hooks: inject.EncoderPrefixHooks | None = None  # seq2seq placement="full" only
        for p in base_model.parameters():
            p.requires_grad_(False)
        inject.allow_checkpointing_with_prefix(base_model)
        self._fwd_params = set(inspect.signature(base_model.forward).parameters)
        self.cache_kw = inject.cache_arg(base_model)  # "cache" from transformers 5.24, "past_key_values" before
        self._advertise_forward()

    # ---- prefix key/values --------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.base_model.get_input_embeddings().weight.dtype

    @property
    def _head_name(self) -> str | None:
        if self.arch.kind != "encoder":
            return None
        return inject.head_name(self.base_model)

    def _base_head(self):
        return getattr(self.base_model, self._head_name) if self._head_name else None

    def prefix_layers(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (key, value) [kv_heads, P, head_dim] of one adapter, in the base model's dtype.

        In eval mode the result is memoised until the adapter's parameters change, so the projection MLP
        does not run per generation step or per request.
        """
        if isinstance(name, tuple):  # a composed entry (compose.py): its parts' prefixes in order
            return compose.concat([self.prefix_layers(n) for n in name])
        enc = self.prefixes[name]
        if not self.training:
            # In-place updates bump _version; .to(device/dtype) and `.data =` swap the storage instead, and the
            # base model's dtype/device decide the cached layers' own.
            version = (self._dtype, self._device, *((p._version, p.data_ptr()) for p in enc.parameters()))
            hit = self._eval_memo.get(name)
            if hit is not None and hit[0] == version:
                return hit[1]
            with torch.no_grad():
                layers = self._split(name)
            self._eval_memo[name] = (version, layers)
            return layers
        return self._split(name)

    def _split(self, name: str):
        layers = inject.split_layers(self.prefixes[name]().to(self._dtype), self.arch, self.configs[name].placement)
        devices = inject.layer_devices(self.base_model, self.arch)  # device_map over several GPUs
        if devices is not None:
            layers = [(k.to(d), v.to(d)) for (k, v), d in zip(layers, devices)]
        return layers

    def _row_names(self, adapter_names, batch_size: int) -> list[str | None]:
        if adapter_names is None:
            if self.active_adapter is None:
                return [None] * batch_size
            return [self.active_adapter] * batch_size
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names] * batch_size
        if len(adapter_names) != batch_size:
            raise ConfigError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} rows")
        adapter_names = [compose.normalize(n) for n in adapter_names]
        compose.check(self.arch, adapter_names)
        unknown = sorted({n for e in adapter_names for n in compose.parts(e) if n not in self.prefixes})
        if unknown:
            raise ConfigError(f"unknown adapter(s) {unknown} in adapter_names; loaded: {sorted(self.prefixes)}")
        return list(adapter_names)

    def prefix_batch(self, names: list[str | None]):
        """Per-layer (K, V) for the batch and the prefix mask; also points the encoder hooks at this batch.
        An entry is None, an adapter name or a list of names (composed, concatenated in order: compose.py)."""
        names = [compose.normalize(n) for n in names]
        compose.check(self.arch, names)
        per_name = {n: self.prefix_layers(n) for n in set(names) if n is not None}
        placements = {self.configs[p].placement for n in per_name for p in compose.parts(n)}
        if len(placements) > 1:
            raise ConfigError(
                f"one batch cannot mix placements {sorted(placements)}: run 'full' and 'decoder' adapters separately"
            )
        layers, mask = inject.batch_prefix([per_name[n] if n is not None else None for n in names], len(names))
        if self._encoder_hooks is not None:
            self._encoder_hooks.layers = layers[2 * self.arch.num_layers :] if placements == {"full"} else None
        return layers, mask

    def _clear_encoder_prefix(self) -> None:
        if self._encoder_hooks is not None:
            self._encoder_hooks.layers = None

    def _full_placement(self, names) -> bool:
        return any(self.configs[p].placement == "full" for n in names for p in compose.parts(n))

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, adapter_names=None, past_key_values=None, labels=None, **kwargs):
        if labels is not None:  # named here so transformers' find_labels(PrefixModel) sees it; the base computes the loss
            kwargs["labels"] = labels
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        names = self._row_names(adapter_names, ref.shape[0])
        if self._needs_grouping(names):
            return self._forward_grouped(names, input_ids, attention_mask, **kwargs)
        if self.heads and names[0] is not None and names[0] != self.active_adapter:
            self.set_adapter(names[0])
        return self.base_model(**self.prefixed_inputs(input_ids, attention_mask, names, past_key_values, **kwargs))

    def prefixed_inputs(self, input_ids=None, attention_mask=None, adapter_names=None, past_key_values=None, **kwargs) -> dict:
        """The base model's keyword inputs with the prefix put in: cache, extended masks, position ids.

        `forward` is `base_model(**prefixed_inputs(...))`; code that needs the base model's body rather than
        its head (e.g. label-only logits in training) calls this and hands the result to the body.
        """
        past_key_values = kwargs.pop("cache", past_key_values)  # transformers >= 5.24 callers name it `cache`
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        batch, q_len = ref.shape[0], ref.shape[1]
        names = self._row_names(adapter_names, batch)
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask)
        if past_key_values is not None:
            kwargs[self.cache_kw] = past_key_values
        if all(n is None for n in names):
            self._clear_encoder_prefix()
            # Bare rows are numbered from the mask too, as in a mixed batch and as `generate()` numbers a
            # left-padded prompt; the bare model's forward would count the pads (0..L-1), so a row's logits
            # would depend on its padding and its batch-mates.
            if attention_mask is not None:
                self._put_positions(kwargs, attention_mask, q_len)
            return kwargs

        layers, prefix_mask = self.prefix_batch(names)
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            mode = "frozen" if self.training or kwargs.get("use_cache") is False else "dynamic"
            kwargs[self.cache_kw] = past_key_values = inject.build_cache(self.arch, layers, mode)

        dec = kwargs.get("decoder_input_ids", kwargs.get("decoder_inputs_embeds", kwargs.get("labels")))
        dec_len = dec.shape[1] if self.arch.kind == "seq2seq" and dec is not None else None
        past = past_key_values.get_seq_length() - prefix_mask.shape[1] if attention_mask is None else 0
        kwargs["attention_mask"], dam = inject.extend_masks(
            self.arch, prefix_mask, attention_mask, query_len=q_len, past_len=past,
            full_placement=self._full_placement(names), decoder_mask=kwargs.get("decoder_attention_mask"),
            decoder_len=dec_len, device=ref.device,
        )
        if self.arch.kind == "seq2seq":
            if dam is not None:
                kwargs["decoder_attention_mask"] = dam
            return kwargs
        self._put_positions(kwargs, kwargs["attention_mask"], q_len)
        return kwargs

    def _put_positions(self, kwargs: dict, full_mask: torch.Tensor, q_len: int) -> None:
        """Mask-derived position ids (see `inject.positions_from_mask`) unless the caller gave some."""
        if self.arch.takes_position_ids and kwargs.get("position_ids") is None and "position_ids" in self._fwd_params:
            kwargs["position_ids"] = inject.positions_from_mask(full_mask, q_len)

    def _needs_grouping(self, names) -> bool:
        """Rows that cannot share one forward: encoder classifiers with a head per adapter, and models whose
        decoder positions follow the cache length (BART) when prefix lengths differ."""
        distinct = {n for n in names if n is not None}
        if self.heads:
            return len(set(names)) > 1
        if self.arch.model_type in inject.POSITIONS_FROM_CACHE_LENGTH:
            return len({self.configs[n].num_virtual_tokens for n in distinct} | ({0} if None in names else set())) > 1
        return False

    def _forward_grouped(self, names, input_ids, attention_mask, **kwargs):
        """Run each adapter's rows as a sub-batch and reassemble (see `_needs_grouping`)."""
        labels = kwargs.pop("labels", None)
        if labels is not None and self.arch.kind == "seq2seq":
            kwargs["labels"] = labels  # sub-batches need them for decoder inputs; the loss is recomputed below
        logits = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=input_ids.device)
            sub = {k: (v[rows] if torch.is_tensor(v) and v.shape[:1] == input_ids.shape[:1] else v) for k, v in kwargs.items()}
            out = self.forward(
                input_ids=input_ids[rows],
                attention_mask=None if attention_mask is None else attention_mask[rows],
                adapter_names=[name] * len(rows),
                **sub,
            )
            if logits is None:
                logits = out.logits.new_zeros((len(names),) + out.logits.shape[1:])
            logits[rows] = out.logits
        loss = None
        if labels is not None:  # the mean over all rows, as one forward would give
            loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return type(out)(loss=loss, logits=logits)

    # ---- generate ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, adapter_names=None, **kwargs):
        if self.arch.kind == "encoder":
            raise ConfigError("encoder classifiers do not generate; call the model for logits")
        batch = input_ids.shape[0]
        names = self._row_names(adapter_names, batch)
        if self._needs_grouping(names):
            return self._generate_grouped(names, input_ids, attention_mask, **kwargs)
        if all(n is None for n in names):
            self._clear_encoder_prefix()  # generate() numbers positions from the mask itself, as prefixed_inputs does
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        gen_cfg = kwargs.get("generation_config") or self.base_model.generation_config
        if attention_mask is None:
            pad = gen_cfg.pad_token_id
            attention_mask = (input_ids != pad).long() if pad is not None else torch.ones_like(input_ids)
        # generate() expands tensors for beams / num_return_sequences but not a cache we pass: expand rows here.
        expand = max(kwargs.get("num_beams", gen_cfg.num_beams) or 1, kwargs.get("num_return_sequences", gen_cfg.num_return_sequences) or 1)
        rows = [n for n in names for _ in range(expand)]
        layers, prefix_mask = self.prefix_batch(rows)
        prefix_mask = prefix_mask[::expand]  # generate() expands the mask itself

        static = kwargs.pop("cache_implementation", gen_cfg.cache_implementation) == "static"
        max_len = None
        if static:
            new = kwargs.get("max_new_tokens", gen_cfg.max_new_tokens)
            max_len = prefix_mask.shape[1] + (input_ids.shape[1] + new if new else kwargs.get("max_length", gen_cfg.max_length))
        cache = inject.build_cache(
            self.arch, layers, "static" if static else "dynamic", self.base_model.config, max_len
        )
        # seq2seq: the decoder starts from one token (decoder_start_token_id), which follows the prefix slots.
        start = torch.ones(batch, 1, dtype=prefix_mask.dtype, device=prefix_mask.device)
        attention_mask, dam = inject.extend_masks(
            self.arch, prefix_mask, attention_mask, query_len=input_ids.shape[1],
            full_placement=self._full_placement(names), decoder_mask=start if self.arch.kind == "seq2seq" else None,
        )
        if dam is not None:
            kwargs["decoder_attention_mask"] = dam
        return self.base_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **{self.cache_kw: cache}, **kwargs
        )

    def _generate_grouped(self, names, input_ids, attention_mask, **kwargs):
        """generate() per adapter group, outputs right-padded with the pad token to one tensor."""
        pad = kwargs.get("pad_token_id", self.base_model.generation_config.pad_token_id) or 0
        outs, order = [], []
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            mask = None if attention_mask is None else attention_mask[rows]
            outs.append(self.generate(input_ids=input_ids[rows], attention_mask=mask, adapter_names=[name] * len(rows), **kwargs))
            order += rows
        width = max(o.shape[1] for o in outs)
        out = torch.cat([nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outs])
        return out[torch.argsort(torch.tensor(order, device=out.device))]

    # ---- conveniences ---------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self._eval_memo.clear()
        return self

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def parameter_summary(self) -> str:
        trainable, total = self.trainable_parameters()
        return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"

    def print_trainable_parameters(self) -> None:
        print(self.parameter_summary())

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        """Checkpoint the base model's layers (transformers >= 5 name; what Trainer calls).

        Non-reentrant: the prefix reaches the layers through kwargs, which reentrant checkpointing cuts off.
        """
        kw = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if hasattr(self.base_model, "activation_checkpointing_enable"):
            self.base_model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kw, every_n_layers=every_n_layers, offload=offload
            )
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        inject.allow_checkpointing_with_prefix(self.base_model)

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self._device


def attach(base_model: nn.Module, cfg: PrefixConfig | None = None, name: str = "default", tokenizer=None,
           init_token_ids=None) -> PrefixModel:
    """Freeze `base_model` and give it a trainable prefix called `name` (arguments: PrefixModel.add_adapter)."""
    model = PrefixModel(base_model)
    model.add_adapter(name, cfg or PrefixConfig(), tokenizer=tokenizer, init_token_ids=init_token_ids)
    return model


def load_adapter(base_model: nn.Module, directory: str | Path, name: str = "default", trainable: bool = False) -> PrefixModel:
    """Attach a saved adapter (ours or peft's) to `base_model`."""
    model = PrefixModel(base_model)
    model.load_adapter(directory, name=name, trainable=trainable)
    return model
