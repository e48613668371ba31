"""PrefixConfig: the few numbers that define a prefix, and nothing else."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

PLACEMENTS = ("decoder", "full")
INITS = ("random", "zero", "peft", "vocab", "text")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A prefix configuration or adapter that cannot be used, with a message saying why and what to do."""


def check_adapter_name(name: str) -> str:
    """Adapter names become directory names and API model ids: keep them plain."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(
            f"adapter name {name!r} is not a plain name: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (no slashes, no spaces)"
        )
    return name


@dataclass
class PrefixConfig:
    """What a prefix is.

    num_virtual_tokens: prefix length P (key/value slots added to every attention layer).
    projection: train through an MLP (Li & Liang's reparameterisation); folded away at save time.
    projection_dim: the MLP's hidden width (512 as in the paper).
    layer_scale: without projection, train the table in units of each layer's own key/value scale (see
        encoder.py); one learning rate then moves every layer by the same relative amount. Folded at save.
    dropout: dropout on the prefix key/values while training.
    placement: seq2seq only. "decoder" = decoder self-attention only (what peft does, loads in peft);
        "full" is reserved for encoder + decoder + cross-attention prefixes.
    init: "vocab" (default: key/values the frozen model computes for sampled vocabulary tokens),
        "text" (the same for `init_text`, Li & Liang), "random" (N(0, init_scale * the std of the model's own
        key/values, per layer and per key/value)), "zero", "peft" (peft's N(0, 1)).
    """

    num_virtual_tokens: int = 20
    projection: bool = False
    projection_dim: int = 512
    # on by measurement (benchmarks/quality.py): README "Benchmarks", numbers in benchmarks/results/quality.json
    layer_scale: bool = True
    dropout: float = 0.0
    placement: str = "decoder"
    # "vocab" by measurement (benchmarks/quality.py): the lowest step-0 loss and the best accuracy after training
    # (README "Benchmarks", benchmarks/results/quality.json).
    init: str = "vocab"
    init_text: str | None = None
    init_scale: float = 0.1  # "random" only: 1.0 is the real key/value scale (why not 1.0: initialize.py)
    # Filled in by `attach` from the base model; kept so a saved adapter says what it was made for.
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(
                f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}: "
                "use e.g. num_virtual_tokens=20"
            )
        if self.projection and (not isinstance(self.projection_dim, int) or self.projection_dim < 1):
            raise ConfigError(f"projection_dim must be a positive integer, got {self.projection_dim!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if not float(self.init_scale) > 0.0:
            raise ConfigError(f"init_scale must be > 0, got {self.init_scale!r}")
        if self.init == "text" and not self.init_text:
            raise ConfigError("init='text' needs init_text='a short task description'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PrefixConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown PrefixConfig field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)
