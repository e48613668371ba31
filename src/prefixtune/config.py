"""PrefixConfig: the few numbers that define a prefix, and nothing else."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

PLACEMENTS = ("decoder", "full")
INITS = ("random", "zero", "peft", "vocab", "text", "examples")

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
        "text" (the same for `init_text`, Li & Liang), "examples" (the same for a few formatted training
        examples, prompt and answer, given as token ids: `prefixtune train` picks them; they are not saved),
        "random" (N(0, init_scale * the std of the model's own key/values, per layer and per key/value)), "zero",
        "peft" (peft's N(0, 1)). The library default is "vocab"; `prefixtune train` has per-task defaults
        (training/config.py task_defaults: "examples" for classification on causal LMs).
    """

    # metadata["help"]: the `prefixtune train` flag's help (cli/flags.py); "internal": not a flag or recipe key
    num_virtual_tokens: int = field(default=20, metadata={"help": "prefix length: key/value slots added to every "
                                                          "attention layer"})
    projection: bool = field(default=False, metadata={"help": "train through an MLP (Li & Liang's "
                                                      "reparameterisation), folded away at save time"})
    projection_dim: int = field(default=512, metadata={"help": "the projection MLP's hidden width"})
    # on: it trained better in the benchmarks (benchmarks/README.md)
    layer_scale: bool = field(default=True, metadata={"help": "train the table in each layer's own key/value scale "
                                                      "(--no-layer-scale: plain key/value units, as peft)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the prefix key/values while training"})
    placement: str = field(default="decoder", metadata={
        "help": "seq2seq only: decoder = decoder self-attention (loads in peft), full = encoder + decoder + "
                "cross-attention", "choices": PLACEMENTS})
    # "vocab": the lowest step-0 loss and the best accuracy after training (benchmarks/README.md)
    init: str = field(default="vocab", metadata={
        "help": "prefix start: vocab = the model's key/values for sampled vocabulary tokens, text = the same for "
                "--init-text, examples = the same for a few training examples (prompt and answer; not saved), "
                "random = N(0, init_scale x the model's key/value std), zero, peft = N(0, 1)",
        "choices": INITS})
    init_text: str | None = field(default=None, metadata={"help": "init=text: a short task description whose "
                                                          "key/values start the prefix"})
    # 1.0 is the real key/value scale (why not 1.0: initialize.py)
    init_scale: float = field(default=0.1, metadata={"help": "init=random: the start's scale relative to the "
                                                     "model's own key/values"})
    # Filled in by `attach` from the base model; kept so a saved adapter says what it was made for.
    base_model_name_or_path: str | None = field(default=None, metadata={"internal": True})
    task_type: str | None = field(default=None, metadata={"internal": True})
    extra: dict = field(default_factory=dict, metadata={"internal": True})

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
    def from_dict(cls, d: dict) -> PrefixConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown PrefixConfig field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)
