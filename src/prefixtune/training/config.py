"""TrainConfig: everything a training run needs, from a YAML recipe overridden by command-line flags.

    cfg = TrainConfig.from_sources("examples/financial_phrasebank_t5.yaml", {"max_steps": 10})

Unknown YAML keys and bad values raise RecipeError naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError

TASKS = ("classify", "instruct", "chat", "lm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant")
EVAL_METHODS = ("rank", "generate", "head")  # head: encoder classifiers (rank means head there too)


# Defaults measured per task type with benchmarks/quality.py (SmolLM2-135M-Instruct, tweets; see the README).
TASK_DEFAULTS = {
    "classify": {"lr": 3e-2},
    "instruct": {"lr": 3e-2},  # README "Benchmarks", instruct rows
    "chat": {"lr": 3e-2},  # chat and lm: not measured separately, as instruct
    "lm": {"lr": 3e-2},
}


class RecipeError(ConfigError):
    """A bad recipe key/value or flag combination."""


@dataclass
class TrainConfig:
    # what to train on
    model: str | None = None
    train: str | None = None
    eval: str | None = None
    data_config: str | None = None  # Hub dataset config name, e.g. sentences_allagree
    task: str | None = None
    output: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    label_words: list[str] | None = None
    prompt_template: str | None = None
    max_length: int = 256
    # "warn": cut long prompts from the left (logged), but a target that does not fit is an error, never
    # silently cut; "error": any overflow is an error; "drop": skip examples that do not fit
    on_truncate: str = "warn"
    eval_fraction: float = 0.1
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # the prefix
    num_virtual_tokens: int = 20
    projection: bool = False
    projection_dim: int = 512
    layer_scale: bool = True  # train the table in each layer's own key/value units (PrefixConfig.layer_scale)
    init: str = "vocab"  # engine default, chosen by measurement (benchmarks/quality.py)
    init_text: str | None = None
    dropout: float = 0.0
    # optimisation
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: the task's measured default (TASK_DEFAULTS)
    projection_lr: float | None = None  # the projection MLP's rate (None: lr)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    # evaluation / checkpoints / logging
    eval_every: int | None = None  # steps; evals also run at the end of every epoch
    eval_method: str = "rank"
    eval_batch_size: int = 16
    save_every: int | None = 50
    patience: int | None = None  # evals without improvement before stopping early
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        for name in ("model", "train", "task", "output"):
            if not getattr(self, name):
                raise RecipeError(f"missing {name}: pass --{name} or set `{name}:` in the recipe")
        if self.task not in TASKS:
            raise RecipeError(f"unknown task {self.task!r}: use --task one of {', '.join(TASKS)}")
        if self.precision not in PRECISIONS:
            raise RecipeError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.scheduler not in SCHEDULERS:
            raise RecipeError(f"scheduler {self.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
        if self.eval_method not in EVAL_METHODS:
            raise RecipeError(f"eval_method {self.eval_method!r}: use one of {', '.join(EVAL_METHODS)}")
        if self.max_steps is not None and self.epochs is not None:
            raise RecipeError("give either max_steps or epochs, not both (a flag overrides the recipe's other one)")
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1
        for name in ("batch_size", "grad_accum", "max_length", "num_virtual_tokens", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RecipeError(f"{name} must be a positive integer, got {v!r}")
        for name in ("max_steps", "eval_every", "save_every", "patience"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise RecipeError(f"{name} must be a positive integer, got {v!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise RecipeError(f"epochs must be > 0, got {self.epochs!r}")
        for key, value in TASK_DEFAULTS.get(self.task, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise RecipeError(f"lr must be a positive number, got {self.lr!r}")
        if self.projection_lr is not None and not (isinstance(self.projection_lr, (int, float)) and self.projection_lr > 0):
            raise RecipeError(f"projection_lr must be a positive number, got {self.projection_lr!r}")
        if self.resume and self.overwrite:
            raise RecipeError("--resume and --overwrite contradict each other; pick one")
        return self

    # fields that define a run: resuming with different values would not continue the same run
    RUN_KEYS = ("model", "train", "eval", "task", "num_virtual_tokens", "projection", "projection_dim", "layer_scale", "init",
                "batch_size", "grad_accum", "lr", "projection_lr", "seed", "max_steps", "epochs", "max_length", "scheduler")

    def run_identity(self) -> dict:
        return {k: getattr(self, k) for k in self.RUN_KEYS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(cls, recipe: str | Path | None = None, overrides: dict | None = None) -> "TrainConfig":
        """Recipe values, then every override that is not None (flags win)."""
        values = load_recipe(recipe) if recipe else {}
        over = {k: v for k, v in (overrides or {}).items() if v is not None}
        # --max-steps on top of a recipe's epochs (or the reverse) means "use this one instead"
        if "max_steps" in over:
            values.pop("epochs", None)
        if "epochs" in over:
            values.pop("max_steps", None)
        check_keys(over, "flag")
        return cls(**{**values, **over}).validate()


def check_keys(d: dict, where: str) -> None:
    known = TrainConfig.fields()
    for k in d:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"unknown {where} key {k!r}: {hint}known keys: {', '.join(known)}")


def load_recipe(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"--config {p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"--config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"--config {p} must be a mapping of key: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    check_keys(data, f"recipe ({p.name})")
    # YAML reads 1e-2 as a string; accept it as a number
    for k in ("lr", "projection_lr", "weight_decay", "warmup_ratio", "dropout", "eval_fraction", "epochs"):
        if isinstance(data.get(k), str):
            try:
                data[k] = float(data[k])
            except ValueError:
                raise RecipeError(f"recipe key {k!r} must be a number, got {data[k]!r}") from None
    return data
