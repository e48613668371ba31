"""Everything architecture-specific lives here: what a model looks like, and how a prefix gets into it.

A prefix reaches the model the way peft does it, as key/values already sitting in a `transformers` Cache,
so attention, masking, RoPE/ALiBi and `generate()` stay the model's own code. The differences from peft:
- training uses `FrozenPrefixCache`, whose layers return cat(prefix, new) without storing anything, so a
  gradient-checkpointing recompute sees exactly what the first pass saw (peft refuses checkpointing);
- the prefix is expanded over the batch (a view), and a batch can mix prefixes per row: each row's prefix is
  right-aligned in a window of the longest prefix, unused slots are masked, and positions are derived from
  the full mask so every row sees the positions it would see alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.cache_utils import DynamicLayer

from .config import ConfigError

# model_type -> kind. "causal": decoder-only; "seq2seq": encoder-decoder, prefix in decoder self-attention;
# "encoder": bidirectional encoder (BERT family), prefix in every self-attention layer.
SUPPORTED = {
    **dict.fromkeys(("gpt2", "llama", "mistral", "qwen2", "qwen3", "bloom", "gemma", "phi3"), "causal"),
    **dict.fromkeys(("t5", "mt5", "bart"), "seq2seq"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), "encoder"),
}
# Encoders whose attention takes no cache in transformers 5 (the prefix cannot get in): refused with a reason.
ENCODERS_WITHOUT_CACHE = {"distilbert", "deberta", "deberta-v2", "albert", "mpnet", "modernbert"}
# ALiBi / relative-bias models take no position_ids: their positions already follow the mask or the cache.
# RoBERTa-family embeddings number tokens from padding_idx + 1 + cache length; left to themselves they match
# peft (which passes no position_ids), our mask-derived ids would be off by padding_idx + 1.
NO_POSITION_IDS = {"bloom", "t5", "mt5", "bart", "roberta", "xlm-roberta", "camembert"}
# Decoders that number positions from the cache length and take no position_ids: rows with different prefix
# lengths cannot share a batch without shifting positions, so they run as sub-batches.
POSITIONS_FROM_CACHE_LENGTH = {"bart"}
# Where encoder classifiers keep their (randomly initialised) head, which trains with the prefix as in peft
# (peft's modules_to_save): BERT-style `classifier`, Llama-style `score`.
CLASSIFIER_HEADS = ("classifier", "score")
# Where attention and feed-forward modules keep a dropout rate as a plain float rather than an nn.Dropout
# (T5/mT5 `dropout`, BART `dropout`/`activation_dropout`, Llama-family `attention_dropout`): what
# `base_dropout=False` zeroes besides the nn.Dropout modules (training.loop.base_dropout_off).
DROPOUT_RATE_ATTRS = ("dropout", "attention_dropout", "activation_dropout", "dropout_rate")

# Config fields of models that post-process the LM head's output (Gemma-2's soft-capping, Cohere's scale): for
# them the output embedding alone does not give the logits, so label-only scoring runs the full forward.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale")


def lm_head_gives_logits(config) -> bool:
    """Whether `config`'s model returns exactly its output embedding's result as logits (no capping or scaling)."""
    return all(getattr(config, name, None) is None for name in LOGIT_POSTPROCESSING)


def head_name(model) -> str | None:
    """The attribute holding an encoder classifier's head on `model` (None if it has none)."""
    return next((n for n in CLASSIFIER_HEADS if hasattr(model, n)), None)


@dataclass(frozen=True)
class Arch:
    """The facts about a base model that a prefix needs."""

    model_type: str
    kind: str
    num_layers: int  # (decoder) self-attention layers that receive a prefix
    num_heads: int  # query heads
    kv_heads: int
    head_dim: int
    num_encoder_layers: int = 0  # seq2seq only: used by placement="full"

    @property
    def token_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def takes_position_ids(self) -> bool:
        return self.model_type not in NO_POSITION_IDS

    @property
    def peft_task_type(self) -> str:
        return {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "encoder": "SEQ_CLS"}[self.kind]

    @property
    def num_transformer_submodules(self) -> int:
        return 2 if self.kind == "seq2seq" else 1


# What the command line can train on each kind of model. An encoder attends both ways, so a causal-LM head over
# it sees the label it must predict (a near-zero loss that learns nothing): encoders train a classification head.
TASKS_BY_KIND = {
    "causal": ("classify", "instruct", "chat", "lm"),
    "seq2seq": ("classify", "instruct", "lm"),
    "encoder": ("classify",),
}


def _supported_pairs() -> str:
    return "; ".join(f"{kind} models: {', '.join(tasks)}" for kind, tasks in TASKS_BY_KIND.items())


def _refuse_cacheless(mt: str) -> None:
    if mt in ENCODERS_WITHOUT_CACHE:
        encoders = sorted(m for m, k in SUPPORTED.items() if k == "encoder")
        raise ConfigError(
            f"model type {mt!r} is not supported for prefix tuning: its attention takes no key/value cache in "
            f"transformers, so a prefix cannot reach it. Supported encoders: {', '.join(encoders)}; "
            f"supported model types: {', '.join(sorted(SUPPORTED))}"
        )


def kind_of_config(config, task: str | None = None) -> str:
    """"causal" / "seq2seq" / "encoder" for a base model's config; with `task`, also check the CLI can train it.

    The one place that decides which head a model is loaded with (`loading.load_model`) and how its data is
    tokenized and scored, read from a raw config without building the model. Model types we do not know follow
    `is_encoder_decoder`, so loaders can pick the right Auto class before `arch_of` checks support.
    """
    mt = getattr(config, "model_type", None)
    _refuse_cacheless(mt)
    if mt in SUPPORTED:
        kind = SUPPORTED[mt]
    else:
        kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    if kind == "encoder" and getattr(config, "is_decoder", False):
        raise ConfigError(f"{mt} config has is_decoder=True (a causal-attention variant); prefixtune trains {mt} "
                          "only as a bidirectional encoder with a classification head: set is_decoder false")
    if task is not None and task not in TASKS_BY_KIND[kind]:
        hint = " (an encoder reads the whole text at once: a language-model head over it would see the answer)" if kind == "encoder" else ""
        raise ConfigError(f"task {task!r} does not apply to {mt} ({kind} model){hint}; supported model/task pairs: "
                          f"{_supported_pairs()}")
    return kind


def _get(cfg, *names):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def arch_of(model) -> Arch:
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    _refuse_cacheless(mt)
    if mt not in SUPPORTED:
        raise ConfigError(
            f"model type {mt!r} ({type(model).__name__}) is not supported for prefix tuning; "
            f"supported model types: {', '.join(sorted(SUPPORTED))}"
        )
    kind = SUPPORTED[mt]
    enc_layers = 0
    if kind == "seq2seq":
        layers = _get(cfg, "num_decoder_layers", "decoder_layers", "num_layers")
        enc_layers = _get(cfg, "encoder_layers", "num_layers")
        heads = _get(cfg, "decoder_attention_heads", "num_heads", "num_attention_heads")
        head_dim = _get(cfg, "d_kv") or cfg.d_model // heads
        kv_heads = heads
        enc_heads = _get(cfg, "encoder_attention_heads") or heads
        if enc_heads != heads:
            raise ConfigError(f"{mt}: encoder ({enc_heads}) and decoder ({heads}) head counts differ; not supported")
    else:
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        layers = _get(cfg, "num_hidden_layers", "n_layer")
        heads = _get(cfg, "num_attention_heads", "n_head")
        kv_heads = _get(cfg, "num_key_value_heads") or heads
        head_dim = _get(cfg, "head_dim") or _get(cfg, "hidden_size", "n_embd") // heads
    return Arch(mt, kind, int(layers), int(heads), int(kv_heads), int(head_dim), int(enc_layers))


def num_groups(arch: Arch, placement: str) -> int:
    """How many attention layers a prefix feeds: "full" adds cross-attention and encoder self-attention."""
    return arch.num_layers if placement == "decoder" else 2 * arch.num_layers + arch.num_encoder_layers


def slot_index(arch: Arch, placement: str, group: int) -> tuple[int, int]:
    """(key slot, value slot) of prefix group `group` in the flat table's 2*G slots of token_dim each.

    Decoder-only and encoder models: layer i uses slots 2i (key) and 2i+1 (value), as peft.
    Seq2seq "decoder": peft duplicates the table for two "submodules" and splits by 4, then drops the
    cross-attention half, so decoder layer i reads slots 4i and 4i+1 (mod 2L). We reproduce that so peft
    adapters load with identical outputs (it ties layers i and i+L/2; the price of compatibility).
    Seq2seq "full" (ours, Li & Liang): decoder self-attention layers, then cross-attention, then encoder.
    """
    slots = 2 * num_groups(arch, placement)
    stride = 4 if arch.kind == "seq2seq" and placement == "decoder" else 2
    return (stride * group) % slots, (stride * group + 1) % slots


def split_layers(flat: torch.Tensor, arch: Arch, placement: str = "decoder") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[P, G*2*kv*hd] -> per attention layer (key, value), each [kv_heads, P, head_dim] (views, no copy);
    the slot layout is `slot_index`'s."""
    G, P = num_groups(arch, placement), flat.shape[0]
    kv = flat.view(P, 2 * G, arch.kv_heads, arch.head_dim).permute(1, 2, 0, 3)
    return [(kv[k], kv[v]) for k, v in (slot_index(arch, placement, i) for i in range(G))]


def extend_masks(arch: Arch, prefix_mask: torch.Tensor, attention_mask: torch.Tensor | None, *, query_len: int,
                 past_len: int = 0, full_placement: bool = False, decoder_mask: torch.Tensor | None = None,
                 decoder_len: int | None = None, device=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The one place prefix slots enter masks: -> (attention_mask, decoder_attention_mask).

    `prefix_mask` [B, Pmax] (from `batch_prefix`) goes in front of the mask of every attention that sees the
    prefix: the (self-attention) `attention_mask` of decoder-only and encoder models, which then covers
    past_len + query_len tokens (all ones if None); for seq2seq the decoder's mask (created, covering
    `decoder_len` tokens, only when some row has unused prefix slots to hide) and, with placement "full", the
    encoder's `attention_mask` (its keys then carry the prefix too). Masks the prefix does not reach are
    returned as given.
    """
    device = device if device is not None else prefix_mask.device

    def extend(mask, length):
        if mask is None:
            mask = torch.ones(prefix_mask.shape[0], length, dtype=torch.long, device=device)
        return torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)

    if arch.kind != "seq2seq":
        return extend(attention_mask, past_len + query_len), decoder_mask
    if full_placement:
        attention_mask = extend(attention_mask, query_len)
    if decoder_mask is not None or not bool(prefix_mask.all()):
        decoder_mask = extend(decoder_mask, decoder_len)
    return attention_mask, decoder_mask


def layer_devices(model, arch: Arch) -> list[torch.device] | None:
    """Where each prefix group must live when `device_map` spreads the model over devices (else None).

    Groups follow `split_layers`' order: decoder self-attention, then (placement "full") cross-attention on
    the same decoder layers, then the encoder's layers.
    """
    device_map = getattr(model, "hf_device_map", None)
    if not device_map or len({str(d) for d in device_map.values()}) <= 1:
        return None
    from transformers.modeling_layers import GradientCheckpointingLayer

    devices = [next(m.parameters()).device for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if arch.kind != "seq2seq":
        return devices
    enc, dec = devices[: arch.num_encoder_layers], devices[arch.num_encoder_layers :]
    return dec + dec + enc


def max_positions(arch: Arch, config) -> int | None:
    """Positions the model can number (prefix + prompt + output), or None where there is no limit: T5 numbers
    positions relatively (its n_positions is no limit); BART and decoders have a position table."""
    return getattr(config, "max_position_embeddings", None) or (
        getattr(config, "n_positions", None) if arch.kind == "causal" else None)


def batch_prefix(per_row: list, batch_size: int):
    """Per-row prefixes -> per-layer (K, V) [B, kv, Pmax, hd], prefix mask [B, Pmax].

    `per_row` holds, for each row, None (bare model) or that row's per-layer (key, value) list; rows that
    share a prefix share the same list object. One prefix shared by all rows is expanded (a view, no copy).
    """
    distinct = {id(r): r for r in per_row if r is not None}
    p_max = max(r[0][0].shape[1] for r in distinct.values())
    ref = next(iter(distinct.values()))[0][0]
    if len(distinct) == 1 and all(r is not None for r in per_row):
        layers = [
            (k.unsqueeze(0).expand(batch_size, -1, -1, -1), v.unsqueeze(0).expand(batch_size, -1, -1, -1))
            for k, v in next(iter(distinct.values()))
        ]
        mask = torch.ones(batch_size, p_max, dtype=torch.long, device=ref.device)
        return layers, mask
    # Mixed batch: a bank of [distinct prefixes + one empty], right-aligned into p_max slots, picked per row.
    keys = list(distinct)
    bank_index = torch.tensor([keys.index(id(r)) if r is not None else len(keys) for r in per_row], device=ref.device)
    lengths = torch.tensor([distinct[k][0][0].shape[1] for k in keys] + [0], device=ref.device)
    mask = (torch.arange(p_max, device=ref.device) >= (p_max - lengths[:, None])).long()[bank_index]
    layers = []
    for i in range(len(next(iter(distinct.values())))):
        ks, vs = [], []
        for k in keys:
            pk, pv = distinct[k][i]
            pad = p_max - pk.shape[1]
            ks.append(torch.nn.functional.pad(pk, (0, 0, pad, 0)))
            vs.append(torch.nn.functional.pad(pv, (0, 0, pad, 0)))
        ks.append(torch.zeros_like(ks[0]))
        vs.append(torch.zeros_like(vs[0]))
        layers.append((torch.stack(ks)[bank_index], torch.stack(vs)[bank_index]))
    return layers, mask


class FrozenPrefixLayer(DynamicLayer):
    """A cache layer that holds only the prefix and never stores new tokens (training / one-shot forward).

    `update` returns cat(prefix, new) and leaves the layer as it was, so recomputation under gradient
    checkpointing gives the same keys as the first pass, and gradients flow into the prefix.
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        if keys is not None:
            self.keys, self.values = keys, values
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class FrozenPrefixCache(DynamicCache):
    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | int):
        super().__init__()
        if isinstance(layers, int):
            self.layers = [FrozenPrefixLayer() for _ in range(layers)]
        else:
            self.layers = [FrozenPrefixLayer(k, v) for k, v in layers]


class _NeverUpdated(dict):
    """`EncoderDecoderCache.is_updated` that stays False: cross-attention key/values are recomputed each call
    rather than read back from a cache that (being frozen) never stored them."""

    def __setitem__(self, key, value):
        pass


def build_cache(arch: Arch, layers, mode: str, config=None, max_cache_len: int | None = None):
    """Wrap per-layer prefix key/values in the Cache object the model expects.

    mode: "frozen" (forward/training), "dynamic" (generation), "static" (generation with StaticCache).
    With placement "full" (more groups than decoder layers), the cross-attention cache starts with the
    cross prefix; the encoder part is injected by `EncoderPrefixHooks`.
    """
    L = arch.num_layers
    layers, cross = layers[:L], layers[L : 2 * L]
    if mode == "frozen":
        self_cache = FrozenPrefixCache(layers)
    elif mode == "dynamic":
        self_cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            self_cache.update(k, v, i)
    elif mode == "static":
        self_cache = StaticCache(config=config, max_cache_len=max_cache_len)
        for i, (k, v) in enumerate(layers):
            self_cache.layers[i].update(k.contiguous(), v.contiguous())
    else:
        raise ValueError(mode)
    if arch.kind != "seq2seq":
        return self_cache
    if mode == "frozen":
        cache = EncoderDecoderCache(self_cache, FrozenPrefixCache(cross or len(layers)))
        cache.is_updated = _NeverUpdated()
        return cache
    cross_cache = DynamicCache()
    for i, (k, v) in enumerate(cross):
        cross_cache.update(k, v, i)
    cache = EncoderDecoderCache(self_cache, cross_cache)
    # A prefilled cross cache is not "updated": the layer must still append the encoder's key/values once.
    cache.is_updated = {i: False for i in range(L)}
    return cache


class _OneLayerCache(DynamicCache):
    """One frozen prefix layer that answers for whatever layer_idx the attention module believes it has."""

    def __init__(self, k, v):
        super().__init__()
        self.layers = [FrozenPrefixLayer(k, v)]

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.layers[0].update(key_states, value_states)

    def get_seq_length(self, layer_idx=0):
        return self.layers[0].get_seq_length()


def cache_arg(module) -> str:
    """The keyword a transformers forward (model, layer or attention module) takes its KV cache by.

    transformers 5.24 renamed `past_key_values` to `cache` in every forward and in `generate`; the old name still
    reaches top-level forwards with a FutureWarning until 5.40, but an attention module given the old name
    silently ignores it (its **kwargs swallow it). So the name is read from the signature, never assumed.
    """
    params = inspect.signature(module.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    inner = getattr(module, "base_model", None)  # heads that pass **kwargs on (BertForSequenceClassification): the body's
    return cache_arg(inner) if isinstance(inner, torch.nn.Module) and inner is not module else "past_key_values"


def encoder_self_attentions(model) -> list:
    """The encoder's self-attention modules of a seq2seq model, in layer order."""
    if model.config.model_type in ("t5", "mt5"):
        return [block.layer[0].SelfAttention for block in model.encoder.block]
    if model.config.model_type == "bart":
        return [layer.self_attn for layer in model.model.encoder.layers]
    raise ConfigError(f"placement='full' is not available for {model.config.model_type}; use placement='decoder'")


class EncoderPrefixHooks:
    """Feeds encoder self-attention its prefix (seq2seq, placement="full").

    The encoder stack never passes a cache to its layers, so each self-attention module gets one through a
    forward pre-hook. The hooks stay registered and read `self.layers`, which the model sets before each
    call and leaves in place, so a gradient-checkpointing recompute in backward sees the same prefix.
    """

    def __init__(self, model):
        self.layers = None
        self.handles = [
            m.register_forward_pre_hook(self._hook(i, cache_arg(m)), with_kwargs=True)
            for i, m in enumerate(encoder_self_attentions(model))
        ]

    def _hook(self, i, key: str):
        def inject(module, args, kwargs):
            if self.layers is not None:
                kwargs[key] = _OneLayerCache(*self.layers[i])
            return args, kwargs

        return inject


def positions_from_mask(full_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Position ids of the last `query_len` slots, counting only unmasked slots (prefix included).

    A row with a P-token prefix numbers its tokens from P (as with peft); a bare row in a mixed batch from 0,
    exactly what it would get alone; left padding is skipped as `generate()` does.
    """
    pos = full_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -query_len:]


# Models whose body (not the layer) hands the layers `None` instead of the cache under checkpointing.
BODY_DROPS_CACHE_WHEN_CHECKPOINTING = {"gpt2"}


def allow_checkpointing_with_prefix(model) -> None:
    """transformers drops `past_key_values` inside checkpointed layers (a cache would be appended twice on
    recompute). Our frozen cache is read-only, so the layers may keep it. Call after enabling checkpointing."""
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    body_drops = model.config.model_type in BODY_DROPS_CACHE_WHEN_CHECKPOINTING
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m._can_checkpoint_with_cache = True
        elif body_drops and isinstance(m, PreTrainedModel) and getattr(m, "gradient_checkpointing", False):
            m.gradient_checkpointing = False  # the layers still checkpoint: their own flag stays on
