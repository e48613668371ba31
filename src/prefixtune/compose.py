"""Composed prefixes: one row may name several adapters, whose prefixes are concatenated in order.

    model(input_ids=..., adapter_names=[["manual", "faq"], None, "sentiment"])

A row naming ("manual", "faq") sees manual's P1 key/values, then faq's P2, then its own tokens (numbered from
P1 + P2), exactly as a single adapter whose table is the two tables stacked. Each part keeps its own memo
(`PrefixModel.prefix_layers`); the concatenation is redone per call (a copy of P1 + P2 slots per layer).

Supported on decoder-only (causal LM) models, grouped-query attention included. Refused, with a reason, on
encoder-decoder models (peft's seq2seq layout ties decoder layers and `placement="full"` also feeds the encoder,
so "concatenate in order" is not one well-defined cache) and on encoder classifiers (each adapter has its own
head: a composed row would have two).
"""

from __future__ import annotations

import torch

from .config import ConfigError


def normalize(entry):
    """One `adapter_names` entry -> None, a name, or a tuple of 2+ names (a one-name list is that name)."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, (list, tuple)):
        if not entry:
            raise ConfigError("adapter_names has an empty list; use None for the bare model or name 1+ adapters")
        if not all(isinstance(n, str) for n in entry):
            raise ConfigError(f"adapter_names entry {list(entry)!r}: a composed entry lists adapter names (strings)")
        return entry[0] if len(entry) == 1 else tuple(entry)
    raise ConfigError(f"adapter_names entry {entry!r}: use an adapter name, a list of names (composed) or None")


def parts(entry) -> tuple[str, ...]:
    """The adapter names an entry uses, in order (() for None)."""
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


def check(arch, entries) -> None:
    """Refuse composed entries on models where composition is not supported (see the module docstring)."""
    if arch.kind != "causal" and any(isinstance(e, tuple) for e in entries):
        why = ("each adapter carries its own classifier head" if arch.kind == "encoder"
               else "peft's seq2seq prefix layout ties decoder layers, so stacking two tables is not one prefix")
        raise ConfigError(f"composed adapter_names (a list of adapters per row) work on decoder-only models only; "
                          f"{arch.model_type} is a {arch.kind} model ({why}): name one adapter per row")


def concat(per_part: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-part per-layer (key, value) [kv, P_i, hd] -> per-layer [kv, sum P_i, hd], in part order."""
    return [
        (torch.cat([p[i][0] for p in per_part], dim=1), torch.cat([p[i][1] for p in per_part], dim=1))
        for i in range(len(per_part[0]))
    ]
