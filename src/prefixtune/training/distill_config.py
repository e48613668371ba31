"""DistillConfig: a knowledge-prefix run (`prefixtune distill`); its flags are generated from these fields (cli/flags.py).

    cfg = DistillConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", context=["manual.txt"], output="runs/manual")

The fields the training loop reads (batch_size, grad_accum, max_steps, epochs, eval_every, save_every, log_every,
patience, ema, max_grad_norm, precision, seed, scheduler, warmup_ratio, lr, output, resume, overwrite, progress,
report_to) mean what they mean for TrainConfig: the same loop (training/loop.py run_steps) runs both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ConfigError
from .config import PRECISIONS, REPORT_TO, SCHEDULERS, RecipeError, _f  # the one field-with-flag-metadata maker

INITS = ("context", "vocab")
SAVE_FORMATS = ("prefix", "cartridge")


@dataclass
class DistillConfig:
    """A knowledge-prefix run: the teacher is the model with the document in view, the student a P-token prefix."""

    model: str | None = _f(None, "data", "base model: directory, Hub id or .gguf file", required=True)
    context: list[str] | None = _f(None, "data", "the document: a UTF-8 text file, or a directory of .txt/.md files; "
                                   "comma-separated or repeated for several documents, distilled as one", required=True)
    queries: str | None = _f(None, "data", "queries about it: text file (one per line) or JSONL",
                             default_text="self-study only")
    self_study: int | None = _f(None, "data", "self-study questions to generate about the document",
                                default_text="256 without --queries, 0 with them")
    conversation_turns: int = _f(1, "data", "self-study: 2 = also a follow-up question on the teacher's first answer "
                                 "(a two-turn conversation; the student learns the second answer too)", choices=[1, 2])
    question_tokens: int = _f(40, "data", "longest self-study question")
    chunk_tokens: int = _f(256, "data", "most document tokens in view while a self-study question is written (each "
                           "question samples its chunk size between a quarter of this and this)")
    families: str = _f("answers:3,facts,structure,summary,use_case,creative", "data", "self-study seed-prompt "
                       "families, with weights (name:w; default 1): answers (a question for a name or number picked from "
                       "the chunk), and the paper's facts, structure, summary, use_case, creative")
    answer_tokens: int = _f(48, "data", "longest teacher answer")
    top_k: int = _f(20, "data", "teacher log-probabilities kept per answer token (plus one bucket for the rest)")
    max_context_tokens: int | None = _f(None, "data", "longest window the teacher sees; longer documents are cut into "
                                        "windows", default_text="the model's position range less room for query and answer")
    eval_fraction: float = _f(0.1, "data", "share of the queries held out for the eval KL")
    num_virtual_tokens: int = _f(128, "student", "prefix length P")
    init: str = _f("context", "student", "context = the key/values of the document's first P tokens; vocab = of sampled "
                   "vocabulary tokens", choices=list(INITS))
    freeze_first: int = _f(1, "student", "prefix slots kept at their start as an attention sink")
    layer_scale: bool = _f(True, "student", "a learnt per-layer scale on the prefix (PrefixConfig.layer_scale)")
    max_steps: int | None = _f(None, "optimisation", "optimizer steps (instead of --epochs)",
                               default_text="200 unless --epochs is given")
    epochs: float | None = _f(None, "optimisation", "passes over the examples", default_text="--max-steps")
    batch_size: int = _f(4, "optimisation", "examples per forward pass (per device)")
    grad_accum: int = _f(1, "optimisation", "forward passes per optimizer step")
    lr: float = _f(2e-2, "optimisation", "learning rate (AdamW)")
    warmup_ratio: float = _f(0.05, "optimisation", "share of the steps spent warming the learning rate up")
    scheduler: str = _f("cosine", "optimisation", "learning-rate schedule after warmup", choices=list(SCHEDULERS))
    max_grad_norm: float = _f(1.0, "optimisation", "clip the gradient norm to this")
    ema: float = _f(0.0, "optimisation", "save a moving average of the prefix with this decay (0 = off)")
    seed: int = _f(0, "optimisation", "self-study, split and data-order seed")
    precision: str = _f("auto", "optimisation", "compute dtype (auto: bf16 where supported, else fp32)",
                        choices=list(PRECISIONS))
    fsdp: bool = _f(False, "optimisation", "shard the frozen model's weights over the processes (torch FSDP2; "
                    "training/sharding.py) once the examples are made; needs several processes (torchrun)")
    eval_every: int | None = _f(50, "evaluation", "steps between held-out KL evaluations")
    patience: int | None = _f(None, "evaluation", "stop after this many evaluations without improvement",
                              default_text="never stop early")
    output: str | None = _f(None, "output", "run directory: adapter/, best/, checkpoints, data, metrics", required=True)
    save_every: int | None = _f(50, "output", "checkpoint every N steps (for --resume)")
    log_every: int = _f(1, "output", "write metrics every N steps")
    resume: bool = _f(False, "output", "continue the run in --output from its latest checkpoint")
    overwrite: bool = _f(False, "output", "replace the run in --output")
    progress: bool = _f(True, "output", "show progress bars")
    report_to: str = _f("none", "output", "also log to an experiment tracker through accelerate", choices=list(REPORT_TO))
    save_format: str = _f("prefix", "output", "adapter/ in peft's prefix-tuning format or peft's CARTRIDGE format "
                          "(num_frozen_tokens = --freeze-first); prefixtune loads both", choices=list(SAVE_FORMATS))

    def __post_init__(self):
        if isinstance(self.context, str):
            self.context = [self.context]

    def validate(self) -> DistillConfig:
        """The one place a distill config is checked (ConfigError naming the flag and the fix); -> self."""
        for name in ("model", "context", "output"):
            if not getattr(self, name):
                raise RecipeError(f"missing {name}: pass --{name}")
        for name, allowed in (("init", INITS), ("save_format", SAVE_FORMATS), ("scheduler", SCHEDULERS),
                              ("precision", PRECISIONS), ("report_to", REPORT_TO), ("conversation_turns", (1, 2))):
            if getattr(self, name) not in allowed:
                raise RecipeError(f"--{_flag(name)} {getattr(self, name)!r}: use one of {', '.join(map(str, allowed))}")
        for name in ("num_virtual_tokens", "batch_size", "grad_accum", "top_k", "answer_tokens", "question_tokens",
                     "chunk_tokens", "log_every"):
            _positive(self, name)
        for name in ("max_steps", "eval_every", "save_every", "patience", "max_context_tokens"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if self.max_steps is not None and self.epochs is not None:
            raise RecipeError("give either --max-steps or --epochs, not both")
        if self.max_steps is None and self.epochs is None:
            self.max_steps = 200
        if self.epochs is not None and not self.epochs > 0:
            raise RecipeError(f"--epochs must be > 0, got {self.epochs!r}")
        if self.self_study is not None and (not isinstance(self.self_study, int) or self.self_study < 0):
            raise RecipeError(f"--self-study must be 0 or more, got {self.self_study!r}")
        if not 0 <= self.freeze_first <= self.num_virtual_tokens:
            raise ConfigError(f"--freeze-first {self.freeze_first}: use 0..--num-virtual-tokens")
        # here, not at the top: selfstudy pulls in the data layer ([train] extra), and the parser imports this module
        from .selfstudy import parse_families  # without it to name the missing extra

        parse_families(self.families)  # DataError naming --families
        if not 0 <= self.eval_fraction < 1:
            raise RecipeError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction!r}")
        if not 0 <= self.ema < 1:
            raise RecipeError(f"--ema must be a decay in [0, 1) (0 = off), got {self.ema!r}")
        if self.resume and self.overwrite:
            raise RecipeError("--resume and --overwrite contradict each other; pick one")
        return self

    # Fields that define the run: --resume with other values would not continue the same run.
    RUN_KEYS = ("model", "context", "queries", "self_study", "conversation_turns", "question_tokens", "chunk_tokens",
                "families", "answer_tokens", "top_k", "max_context_tokens", "eval_fraction", "num_virtual_tokens", "init",
                "freeze_first", "layer_scale", "max_steps", "epochs", "batch_size", "grad_accum", "lr", "scheduler",
                "seed", "ema")

    def run_identity(self) -> dict:
        return {k: getattr(self, k) for k in self.RUN_KEYS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _positive(cfg, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise RecipeError(f"--{_flag(name)} must be a positive integer, got {v!r}")
