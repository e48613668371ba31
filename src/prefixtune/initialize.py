"""How a fresh prefix starts.

- "peft": peft's default, N(0, 1) for every key/value (nn.Embedding's init). Far off the scale of real
  key/values, which is why a fresh peft prefix disturbs the base model so much.
- "zero": peft's init_weights="zero" (the table, or the MLP's last layer, is zero).
- "random": N(0, init_scale * sigma), sigma measured per layer and per key/value from the key/values the model
  makes for random tokens (real key norms differ by an order of magnitude across layers). At full scale random
  directions give large attention logits (step-0 loss as bad as peft's); at 0.1 it is about "zero": the P
  slots, at logit ~0, still take attention mass from the real tokens. Only real key/values avoid both.
- "vocab" / "text": the key/values the frozen model computes for sampled vocabulary tokens / for a task
  description (Li & Liang), so the prefix starts out as something the model has seen.
- "examples": the same for a few formatted training examples (prompt and answer): the prefix starts as an
  in-context demonstration of the task, which training then refines (the classification default, by measurement:
  benchmarks/README.md).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache

from .config import PrefixConfig
from .encoder import PrefixEncoder
from .inject import num_groups, slot_index


@torch.no_grad()
def real_key_values(model, token_ids: torch.Tensor, placement: str = "decoder") -> torch.Tensor:
    """Run the frozen base on `token_ids` [P] and return its key/values laid out as a prefix table [P, L*2*kv*hd]."""
    arch, base = model.arch, model.base_model
    ids = token_ids.to(model._device)[None]
    if arch.kind == "seq2seq":
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        base(input_ids=ids, decoder_input_ids=ids, use_cache=True, **{model.cache_kw: cache})
        cache = cache.self_attention_cache
    else:
        cache = DynamicCache()
        base(input_ids=ids, use_cache=True, **{model.cache_kw: cache})
    P, L = ids.shape[1], arch.num_layers
    G = num_groups(arch, placement)
    table = torch.zeros(2 * G, arch.kv_heads, P, arch.head_dim, device=ids.device)
    # "full" also feeds cross-attention and the encoder: start those from the decoder layers' key/values too.
    for g in reversed(range(G)):  # seq2seq "decoder" ties layers i and i+L/2 (peft layout): the lower wins
        layer = cache.layers[min(g % L if g < 2 * L else g - 2 * L, L - 1)]
        k, v = slot_index(arch, placement, g)  # the layout inject.split_layers reads
        table[k] = layer.keys[0].float()
        table[v] = layer.values[0].float()
    return table.permute(2, 0, 1, 3).reshape(P, -1)


def _sample_tokens(model, n: int, seed: int = 0) -> torch.Tensor:
    vocab = model.base_model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    # Skip the first ids: special tokens live there in most vocabularies.
    low = min(100, vocab // 2)
    return torch.randint(low, vocab, (n,), generator=g)


@torch.no_grad()
def initialise(model, enc: PrefixEncoder, cfg: PrefixConfig, example_ids=None) -> None:
    if cfg.init == "peft":
        return  # nn.Embedding / nn.Linear defaults, as peft (a layer_scale stays 1: exactly peft's table)
    last = enc.transform[-1] if cfg.projection else None
    if cfg.init == "zero" and last is not None:
        last.weight.zero_()
        last.bias.zero_()
        return
    P = cfg.num_virtual_tokens
    if cfg.init in ("text", "examples"):
        ids = torch.as_tensor(cfg.extra["init_token_ids"] if cfg.init == "text" else example_ids)[:P]
        if len(ids) < P:  # repeat the description to fill all P slots
            ids = ids.repeat((P + len(ids) - 1) // len(ids))[:P]
    else:
        ids = _sample_tokens(model, P)
    target = real_key_values(model, ids, cfg.placement)
    std = _layer_std(model, target)
    if cfg.init == "random":
        target = torch.randn_like(target) * std * cfg.init_scale
    elif cfg.init == "zero":  # a zero table; a layer_scale still takes the real key/value stds
        target = torch.zeros_like(target)
    if last is not None:
        fit_projection(enc, target)
    elif enc.scale is not None:
        enc.scale.copy_(std)
        enc.embedding.weight.copy_(target / std)
    else:
        enc.embedding.weight.copy_(target)


def _layer_std(model, table: torch.Tensor) -> torch.Tensor:
    """Std of a prefix table [P, G*2*token_dim] per layer and per key/value, broadcast back to one row."""
    P, D = table.shape[0], model.arch.token_dim
    slots = table.view(P, -1, D)
    std = slots.std(dim=(0, 2), keepdim=True).clamp_min(1e-6)  # [1, G*2, 1]
    return std.expand(1, slots.shape[1], D).reshape(-1)


@torch.no_grad()
def fit_projection(enc: PrefixEncoder, target: torch.Tensor) -> None:
    """Set the MLP's last layer so the projected prefix equals `target` exactly.

    The hidden activations h = tanh(W1 e + b1) of the P virtual tokens are P vectors in a 512-wide space, so
    [h, 1] W = target has an exact (minimum-norm) solution when P <= projection_dim: the MLP starts out
    producing real key/values and keeps all its capacity to move away from them.
    """
    hidden = enc.transform[:-1](enc.embedding.weight)
    h1 = torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1).double()
    solution = torch.linalg.pinv(h1) @ target.double()  # [(mid+1), out]
    last = enc.transform[-1]
    last.weight.copy_(solution[:-1].T.to(last.weight.dtype))
    last.bias.copy_(solution[-1].to(last.bias.dtype))


def example_token_ids(rows, tokenizer, n_tokens: int, seed: int = 0) -> list[int]:
    """`n_tokens` token ids of whole training examples (prompt and answer, blank-line separated) for init="examples";
    `rows`: tokenized training rows (input_ids, labels: a dataset or a dict of lists).

    Examples are taken a label at a time in turn (classify; one of each answer before a second of any), short
    ones first so several fit, in a seeded order; the last one is cut at n_tokens.
    """
    rng = random.Random(seed)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    drop = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id} - {None}
    groups: dict[Any, list[list[int]]] = {}
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        answer = [t for t in labels if t != -100] if isinstance(labels, list) else [labels]  # head: a class index
        text = list(ids) if isinstance(labels, int) or len(labels) == len(ids) else list(ids) + answer  # seq2seq
        text = [t for t in text if t not in drop]
        groups.setdefault(tuple(answer), []).append(text)
    if len(groups) > 32:  # free-form answers (instruct, chat, lm): one pool
        groups = {None: [t for g in groups.values() for t in g]}
    short = max(8, n_tokens // 3)
    pools = []
    for g in groups.values():
        rng.shuffle(g)
        pools.append(sorted(g, key=lambda t: len(t) > short))  # stable: the short ones first, in the seeded order
    out: list[int] = []
    for i in range(max(len(p) for p in pools)):
        for p in pools:
            if i < len(p) and len(out) < n_tokens:
                out += (sep if out else []) + p[i]
    return out[:n_tokens]
