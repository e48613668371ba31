"""TrainConfig: everything a training run needs, from a YAML recipe overridden by command-line flags.

    cfg = TrainConfig.from_sources("examples/financial_phrasebank_t5.yaml", {"max_steps": 10})

The prefix itself is a nested PrefixConfig (`cfg.prefix`), declared once in prefixtune/config.py; recipes and
flags name its fields flat (`num_virtual_tokens: 10`, `--num-virtual-tokens 10`) or, in recipes, under
`prefix:`. Each field's metadata (group, help, choices) is what `prefixtune train --help` shows (cli/flags.py).
Unknown YAML keys and bad values raise RecipeError naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..config import ConfigError, PrefixConfig

TASKS = ("classify", "instruct", "chat", "lm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
EVAL_METHODS = ("rank", "generate", "head")  # head: encoder classifiers (rank means head there too)
ON_TRUNCATE = ("warn", "error", "drop")
QUANTIZE = ("8bit", "4bit")
# tasks that became commands of their own: --task VALUE stops with this pointer (cli/flags.py, validate)
MOVED_TASKS = {"distill": "knowledge prefixes have their own commands: `prefixtune distill --model M --context FILE "
               "--output RUN` and `prefixtune distill-eval` (docs/knowledge-prefixes.md)"}


# Each task's defaults, chosen by measurement (benchmarks/README.md; raw results in benchmarks/results/). "prefix":
# PrefixConfig fields that differ from the library's defaults. "TASK:KIND" entries (kind as inject.kind_of_config
# says) replace the task's for that kind of model. A recipe or flag always wins; `resolve` fills in the rest.
TASK_DEFAULTS = {
    "classify": {"lr": 1e-2, "prefix": {"num_virtual_tokens": 64, "init": "examples"}},
    "classify:seq2seq": {"lr": 3e-2, "prefix": {}},  # the examples start is not measured on T5/BART yet
    "classify:encoder": {"lr": 3e-2, "prefix": {}, "base_dropout": False},  # encoder classifiers: own table
    "instruct": {"lr": 3e-2},
    "chat": {"lr": 3e-2},  # chat and lm: not measured separately, as instruct
    "lm": {"lr": 3e-2},
}


def task_defaults(task: str | None, kind: str | None = None) -> dict:
    """{"lr": ..., "prefix": {...}} for `task` on a model of `kind` (None: not known yet, the task's own)."""
    return TASK_DEFAULTS.get(f"{task}:{kind}") or TASK_DEFAULTS.get(task, {})


class RecipeError(ConfigError):
    """A bad recipe key/value or flag combination."""


def _f(default, group: str, help: str, **meta):
    """A TrainConfig field: its flag's argparse group and help live here, next to the default (cli/flags.py)."""
    kind = "default_factory" if callable(default) else "default"
    return field(**{kind: default}, metadata={"group": group, "help": help, **meta})


@dataclass
class TrainConfig:
    """A training run. The `prefixtune train` flags are generated from these fields (cli/flags.py)."""

    # what to train on
    model: str | None = _f(None, "data", "base model: directory, Hub id or .gguf file", required=True)
    train: str | None = _f(None, "data", "training data: CSV/JSONL/Parquet file, save_to_disk directory or Hub dataset",
                           required=True)
    eval: str | None = _f(None, "data", "evaluation data (same formats as --train)", default_text="split "
                          "--eval-fraction off --train")
    data_config: str | None = _f(None, "data", "Hub dataset config name, e.g. sentences_allagree")
    task: str | None = _f(None, "data", "what the prefix learns", choices=TASKS, required=True, moved=MOVED_TASKS)
    text_column: str | None = _f(None, "data", "input text column", default_text="guessed from the data")
    label_column: str | None = _f(None, "data", "classify: label column", default_text="guessed from the data")
    label_words: list[str] | None = _f(None, "data", "classify: comma-separated label set, e.g. "
                                       "negative,neutral,positive", default_text="the labels found in the data")
    prompt_template: str | None = _f(None, "data", "prompt with {text} (classify) or {instruction}/{input} (instruct)",
                                     default_text="the task's built-in template")
    max_length: int = _f(256, "data", "longest tokenized example (prompt + target)")
    # "warn": cut long prompts from the left (logged), but a target that does not fit is an error, never
    # silently cut; "error": any overflow is an error; "drop": skip examples that do not fit
    on_truncate: str = _f("warn", "data", "an example longer than --max-length: warn = cut the prompt from the left "
                          "(a target that does not fit is an error), error = stop, drop = skip it",
                          choices=ON_TRUNCATE)
    eval_fraction: float = _f(0.1, "data", "share of --train held out for evaluation when there is no --eval")
    max_train_examples: int | None = _f(None, "data", "use at most this many training rows", default_text="all")
    max_eval_examples: int | None = _f(None, "data", "use at most this many evaluation rows", default_text="all")
    # The split taken from --train can be thousands of rows; scoring them all can outlast the training itself.
    max_auto_eval_examples: int = _f(500, "data", "without --eval (and --max-eval-examples), evaluate at most this "
                                     "many of the rows split off --train; 0 = all")
    # An empty label would train as a class of its own, an empty output teaches stopping at once (training/clean.py).
    drop_incomplete: bool = _f(False, "data", "skip rows with an empty text or label (classify) or instruction or output "
                               "(instruct), counted in the log; without it such rows are an error")
    fix_text: bool = _f(False, "data", "repair mojibake (UTF-8 read as Latin-1, e.g. \"Ã©\" for \"é\") in the text "
                        "columns with ftfy; the log says how many rows changed")
    # the prefix: PrefixConfig's own fields (flags --num-virtual-tokens, --projection, ...; recipe keys flat or
    # under `prefix:`). A dict holds the fields a recipe or flag gave, the task's defaults fill the rest (`resolve`);
    # None is an empty dict; a PrefixConfig is taken whole, as the caller's.
    prefix: PrefixConfig | dict | None = field(default=None, metadata={"group": "prefix", "nested": True})
    # optimisation
    max_steps: int | None = _f(None, "optimisation", "optimizer steps (instead of --epochs)")
    epochs: float | None = _f(None, "optimisation", "passes over the training data", default_text="1 unless "
                              "--max-steps is given")
    batch_size: int = _f(8, "optimisation", "examples per forward pass (per device)")
    grad_accum: int = _f(1, "optimisation", "forward passes per optimizer step")
    lr: float | None = _f(None, "optimisation", "learning rate",
                          default_text="per task: TASK_DEFAULTS, " + ", ".join(
                              f"{t} {v['lr']:g}" for t, v in TASK_DEFAULTS.items()))
    projection_lr: float | None = _f(None, "optimisation", "learning rate of the projection MLP", default_text="--lr")
    new_head: bool = _f(False, "optimisation", "encoder classifiers: start a new classification head when the model's "
                        "own head has another number of labels than the data (its head is reused when they match)")
    head_lr: float | None = _f(None, "optimisation", "learning rate of an encoder classifier's head", default_text="--lr")
    weight_decay: float = _f(0.0, "optimisation", "AdamW weight decay")
    warmup_ratio: float = _f(0.06, "optimisation", "share of the steps spent warming the learning rate up")
    scheduler: str = _f("linear", "optimisation", "learning-rate schedule after warmup", choices=SCHEDULERS)
    max_grad_norm: float = _f(1.0, "optimisation", "clip the gradient norm to this")
    # averaging the prefix over recent steps (training/ema.py); off by default: it smoothed the curve but did not
    # end higher (benchmarks/README.md)
    ema: float = _f(0.0, "optimisation", "evaluate and save a moving average of the trainable weights with this "
                    "decay, e.g. 0.98 (0 = off: the last step's weights)")
    base_dropout: bool | None = _f(None, "optimisation", "keep the frozen model's own dropout while training "
                                   "(--no-base-dropout: zero it; the prefix's --dropout is separate)",
                                   default_text="per task: off for encoder classifiers, else on")
    seed: int = _f(0, "optimisation", "random seed (data order, split, prefix init)")
    precision: str = _f("auto", "optimisation", "compute dtype (auto: bf16 where supported, else fp32)",
                        choices=PRECISIONS)
    gradient_checkpointing: bool = _f(False, "optimisation", "recompute activations in backward to save memory")
    # training/sharding.py; the prefix stays whole on every process (DDP's job is done by a gradient hook)
    fsdp: bool = _f(False, "optimisation", "shard the frozen model's weights over the processes (torch FSDP2) instead "
                    "of a full copy each; needs several processes (torchrun --nproc-per-node N)")
    quantize: str | None = _f(None, "optimisation", "load the frozen model's Linear weights in 8 or 4 bits "
                              "(optimum-quanto; the prefix trains in --precision and loads on the full model)",
                              choices=QUANTIZE, default_text="off: full precision")
    # evaluation / checkpoints / logging
    eval_every: int | None = _f(None, "evaluation", "evaluate every N steps (also at the end of every epoch)",
                                default_text="end of every epoch")
    eval_method: str = _f("rank", "evaluation", "classify: rank = label log-likelihood, generate = free generation",
                          choices=EVAL_METHODS)
    eval_batch_size: int = _f(16, "evaluation", "examples per evaluation batch")
    patience: int | None = _f(None, "evaluation", "stop after this many evaluations without improvement",
                              default_text="never stop early")
    output: str | None = _f(None, "output", "run directory: adapter/, best/, checkpoints, metrics", required=True)
    save_every: int | None = _f(50, "output", "checkpoint every N steps (for --resume)")
    log_every: int = _f(1, "output", "write metrics every N steps")
    resume: bool = _f(False, "output", "continue the run in --output from its latest checkpoint")
    overwrite: bool = _f(False, "output", "replace the run in --output")
    progress: bool = _f(True, "output", "show a progress bar")
    report_to: str = _f("none", "output", "also log metrics and the run config to an experiment tracker, through "
                        "accelerate (tensorboard writes under <output>/prefixtune)", choices=REPORT_TO)

    def validate(self) -> TrainConfig:
        """Check every field the recipe, flags or caller gave (the one place a run config is checked); -> self.

        Unset fields (None) stay unset: `resolve` fills them once the model's kind is known."""
        for name in ("model", "train", "task", "output"):
            if not getattr(self, name):
                raise RecipeError(f"missing {name}: pass --{name} or set `{name}:` in the recipe")
        if self.task in MOVED_TASKS:
            raise RecipeError(f"task {self.task!r}: {MOVED_TASKS[self.task]}")
        for name, allowed in (("task", TASKS), ("precision", PRECISIONS), ("scheduler", SCHEDULERS),
                              ("eval_method", EVAL_METHODS), ("on_truncate", ON_TRUNCATE), ("report_to", REPORT_TO)):
            if getattr(self, name) not in allowed:
                what = f"unknown task {self.task!r}" if name == "task" else f"{name} {getattr(self, name)!r}"
                raise RecipeError(f"{what}: use {'--task ' if name == 'task' else ''}one of {', '.join(allowed)}")
        if self.max_steps is not None and self.epochs is not None:
            raise RecipeError("give either max_steps or epochs, not both (a flag overrides the recipe's other one)")
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RecipeError(f"{name} must be a positive integer, got {v!r}")
        for name in ("max_steps", "eval_every", "save_every", "patience"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise RecipeError(f"{name} must be a positive integer, got {v!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise RecipeError(f"epochs must be > 0, got {self.epochs!r}")
        for name in ("lr", "projection_lr", "head_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise RecipeError(f"{name} must be a positive number, got {v!r}")
        if not (isinstance(self.ema, (int, float)) and 0.0 <= self.ema < 1.0):
            raise RecipeError(f"ema must be a decay in [0, 1), e.g. 0.95 (0 = off), got {self.ema!r}")
        if self.base_dropout is not None and not isinstance(self.base_dropout, bool):
            raise RecipeError(f"base_dropout must be true or false, got {self.base_dropout!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise RecipeError(f"quantize {self.quantize!r}: use one of {', '.join(QUANTIZE)} (or leave it out)")
        if self.quantize and self.fsdp:
            raise RecipeError("--quantize and --fsdp cannot be combined: FSDP2 shards plain tensors, not quantized ones; "
                              "drop one of them")
        if self.resume and self.overwrite:
            raise RecipeError("--resume and --overwrite contradict each other; pick one")
        if not isinstance(self.prefix, (PrefixConfig, dict, type(None))):
            raise RecipeError(f"prefix must be a PrefixConfig or a mapping of its fields, got {type(self.prefix).__name__}")
        if isinstance(self.prefix, dict):
            check_keys(self.prefix, "key under 'prefix:'", known=list(PREFIX_KEYS))
            PrefixConfig(**self.prefix)  # its own checks (ConfigError naming the field)
        return self

    # Fields that define a run: resuming with different values would not continue the same run. Flat names (the
    # prefix's ones read from self.prefix), so a run.json written before the prefix was nested compares equal.
    RUN_KEYS = ("model", "train", "eval", "task", "num_virtual_tokens", "projection", "projection_dim", "layer_scale", "init",
                "batch_size", "grad_accum", "lr", "projection_lr", "seed", "max_steps", "epochs", "max_length", "scheduler")

    def run_identity(self) -> dict:
        ident = {k: getattr(self.prefix if k in PREFIX_KEYS else self, k) for k in self.RUN_KEYS}
        # placement changes the adapter's shapes; older runs could only be "decoder", so it joins only when not
        # the default and an old run.json still matches a default-placement resume
        if self.prefix.placement != PrefixConfig.placement:
            ident["placement"] = self.prefix.placement
        if self.ema:  # likewise: runs from before ema was a setting had none
            ident["ema"] = self.ema
        if self.quantize:  # another frozen model: a resume must load it the same way
            ident["quantize"] = self.quantize
        if self.base_dropout is False:
            ident["base_dropout"] = False
        for key in ("drop_incomplete", "fix_text"):  # they change the rows trained on; absent from older runs
            if getattr(self, key):
                ident[key] = True
        return ident

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def fields(cls) -> list[str]:
        """Every key a recipe or flag may set: TrainConfig's own and the prefix's (flat)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "prefix"] + list(PREFIX_KEYS)

    @classmethod
    def from_dict(cls, values: dict, where: str = "key") -> TrainConfig:
        """Flat keys (`num_virtual_tokens: 10`) and/or a nested `prefix:` mapping -> TrainConfig (not validated);
        its `prefix` is the dict of the prefix fields given."""
        values = dict(values)
        nested = values.pop("prefix", None) or {}
        if not isinstance(nested, (dict, PrefixConfig)):
            raise RecipeError(f"{where} 'prefix' must be a mapping of PrefixConfig fields, got {type(nested).__name__}")
        if isinstance(nested, PrefixConfig):
            nested = {k: getattr(nested, k) for k in PREFIX_KEYS}
        nested = {str(k).replace("-", "_"): v for k, v in nested.items()}
        check_keys(values, where)
        check_keys(nested, f"{where} under 'prefix:'", known=list(PREFIX_KEYS))
        flat_prefix = {k: values.pop(k) for k in list(values) if k in PREFIX_KEYS}
        both = sorted(k for k in flat_prefix if k in nested and flat_prefix[k] != nested[k])
        if both:
            raise RecipeError(f"{where} {both[0]!r} is given both flat and under 'prefix:' with different values; keep one")
        return cls(**values, prefix={**nested, **flat_prefix})  # the task's defaults fill the rest (resolve)

    @classmethod
    def from_sources(cls, recipe: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
        """Recipe values, then every override that is not None (flags win); not validated yet (`validate`)."""
        values = load_recipe(recipe) if recipe else {}
        over = {k: v for k, v in (overrides or {}).items() if v is not None}
        check_keys(over, "flag")
        # --max-steps on top of a recipe's epochs (or the reverse) means "use this one instead"
        if "max_steps" in over:
            values.pop("epochs", None)
        if "epochs" in over:
            values.pop("max_steps", None)
        # a flag for a prefix field overrides the recipe's value, flat or nested
        nested = dict(values.get("prefix") or {})
        for k in over:
            if k in PREFIX_KEYS:
                nested.pop(k, None)
        values["prefix"] = nested
        return cls.from_dict({**values, **over}, "recipe")


@dataclass
class EvalConfig:
    """`prefixtune eval`: an adapter (or the bare model) scored on a dataset. Its flags are generated from these
    fields (cli/flags.py); the adapter's own task.json fills what is left None (columns, template, labels, length)."""

    model: str | None = _f(None, "eval", "base model: directory, Hub id or .gguf file", required=True)
    data: str | None = _f(None, "eval", "CSV/JSONL/Parquet file, save_to_disk directory or Hub dataset; a DatasetDict "
                          "is evaluated on its validation/test split", required=True)
    task: str | None = _f(None, "eval", "the task the adapter was trained for", choices=TASKS, required=True,
                          moved=MOVED_TASKS)
    method: str = _f("rank", "eval", "classify: rank = label log-likelihood, generate = free generation; encoder "
                     "classifiers are always scored by their head", choices=EVAL_METHODS)
    output: str | None = _f(None, "eval", "where eval.json / predictions.jsonl go", default_text="<adapter>/eval or ./eval")
    text_column: str | None = _f(None, "eval", "input text column", default_text="from the adapter's task.json, else guessed")
    label_column: str | None = _f(None, "eval", "classify: label column",
                                  default_text="from the adapter's task.json, else guessed")
    prompt_template: str | None = _f(None, "eval", "prompt template",
                                     default_text="from the adapter's task.json, else the task's")
    label_words: list[str] | None = _f(None, "eval", "classify: comma-separated label set",
                                       default_text="from the adapter's task.json, else the data")
    max_length: int | None = _f(None, "eval", "longest tokenized example", default_text="the training run's, else 256")
    batch_size: int = _f(16, "eval", "examples per batch")
    max_examples: int | None = _f(None, "eval", "evaluate at most this many rows", default_text="all")
    drop_incomplete: bool = _f(False, "eval", "skip rows with an empty text or label (classify) or instruction or output "
                               "(instruct), counted in the log; without it such rows are an error")
    fix_text: bool = _f(False, "eval", "repair mojibake in the text columns with ftfy, as train --fix-text does")

    def validate(self) -> EvalConfig:
        for name in ("model", "data", "task"):
            if not getattr(self, name):
                raise RecipeError(f"missing {name}: pass --{name}")
        if self.task not in TASKS:
            raise RecipeError(f"unknown task {self.task!r}: use --task one of {', '.join(TASKS)}")
        if self.method not in EVAL_METHODS:
            raise RecipeError(f"unknown --method {self.method!r}: use one of {', '.join(EVAL_METHODS)}")
        for name in ("batch_size", "max_length", "max_examples"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise RecipeError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        return self


class Resolved(NamedTuple):
    """A run config with every default filled in, and which values came from the task's defaults."""

    config: TrainConfig
    defaults: dict  # field -> value the task (or the library) chose; prefix fields as "prefix.NAME"

    def describe(self, kind: str | None = None) -> str:
        """One line for the run's log: which values the task's defaults set."""
        on = f"{self.config.task} on a {kind} model" if kind else self.config.task
        if not self.defaults:
            return f"defaults for {on}: none used (every value was given)"
        used = ", ".join(f"{k.removeprefix('prefix.')} {v}" for k, v in self.defaults.items())
        return f"defaults for {on}: {used} (a flag or recipe key overrides each)"


def resolve(cfg: TrainConfig, kind: str | None = None) -> Resolved:
    """Fill what the recipe, flags and caller left unset from task_defaults(cfg.task, kind): lr, base_dropout, the
    prefix fields not given, epochs (1 unless max_steps). -> a filled copy and the filled values; `cfg` is unchanged.

    `kind` is the model's ("causal", "seq2seq", "encoder"; None: not known, the task's own defaults). The training
    loop calls this once, after `validate` and before anything trains, and logs and records the result."""
    d = task_defaults(cfg.task, kind)
    filled: dict = {}
    changes: dict = {}
    for key, value in (("lr", d.get("lr")), ("base_dropout", d.get("base_dropout", True))):
        if getattr(cfg, key) is None and value is not None:
            changes[key] = filled[key] = value
    if cfg.max_steps is None and cfg.epochs is None:
        changes["epochs"] = filled["epochs"] = 1
    if isinstance(cfg.prefix, PrefixConfig):  # the caller's whole prefix
        changes["prefix"] = PrefixConfig.from_dict(cfg.prefix.to_dict())
    else:
        given = cfg.prefix or {}
        task_prefix = {k: v for k, v in d.get("prefix", {}).items() if k not in given}
        filled.update({f"prefix.{k}": v for k, v in task_prefix.items()})
        changes["prefix"] = PrefixConfig(**{**task_prefix, **given})
    return Resolved(dataclasses.replace(cfg, **changes), filled)


# PrefixConfig fields a user sets; the rest are filled in by `attach` (base model, task type) or internal.
PREFIX_KEYS = tuple(f.name for f in dataclasses.fields(PrefixConfig) if not f.metadata.get("internal"))


def check_keys(d: dict, where: str, known: list[str] | None = None) -> None:
    known = known or TrainConfig.fields()
    for k in d:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"unknown {where} key {k!r}: {hint}known keys: {', '.join(known)}")


def load_recipe(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"--config {p} is a directory; pass a YAML recipe file")
    if not p.is_file():
        raise RecipeError(f"--config {p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"--config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"--config {p} must be a mapping of key: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "prefix" in data:
        if not isinstance(data["prefix"], dict):
            raise RecipeError(f"--config {p}: 'prefix' must be a mapping of PrefixConfig fields "
                              f"({', '.join(PREFIX_KEYS)}), got {type(data['prefix']).__name__}")
        data["prefix"] = {str(k).replace("-", "_"): v for k, v in data["prefix"].items()}
        check_keys(data["prefix"], f"recipe ({p.name}) under 'prefix:'", known=list(PREFIX_KEYS))
    check_keys({k: v for k, v in data.items() if k != "prefix"}, f"recipe ({p.name})")
    # YAML reads 1e-2 as a string; accept it as a number
    for where, d in (("", data), ("prefix.", data.get("prefix") or {})):
        for k in NUMBER_KEYS:
            if isinstance(d.get(k), str):
                try:
                    d[k] = float(d[k])
                except ValueError:
                    raise RecipeError(f"recipe key {where + k!r} must be a number, got {d[k]!r}") from None
    return data


NUMBER_KEYS = ("lr", "projection_lr", "head_lr", "ema", "weight_decay", "warmup_ratio", "dropout", "init_scale", "eval_fraction", "epochs")
