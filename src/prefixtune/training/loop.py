"""The training loop: data -> prefix -> AdamW on accelerate, with eval, best/periodic checkpoints and resume.

    from prefixtune.recipes import TrainConfig
    from prefixtune.train import train
    summary = train(TrainConfig(model=..., train=..., task="classify", output="runs/x", max_steps=100))

Output directory:
    run.json            what run this is (refuse to mix runs in one directory)
    task.json           task, label words, template: what eval/generate need to format inputs the same way
    metrics.jsonl       one line per logged step / eval
    loss_curve.png, accuracy_curve.png
    checkpoint-NNNNNN/  adapter (MLP kept) + optimizer/scheduler/RNG/position (+ the --ema average); `latest` names
                        the newest
    best/               the best adapter by eval accuracy (classify) or eval loss
    adapter/            the final adapter (peft format); with --ema, it and best/ hold the moving average
    eval.json, predictions.jsonl    the final evaluation

Determinism: batches come from a seeded order per epoch, and a checkpoint stores everything else that
changes during training, so a resumed run ends with the same adapter as an uninterrupted one (on CPU).
Multi-process (`accelerate launch`): each optimizer step consumes batch_size * grad_accum * processes
examples, rank r taking every world-th micro-batch, so 2 processes x accumulation 1 see exactly the same
batches per step as 1 process x accumulation 2. Without GPUs, start the processes with torchrun or
`accelerate launch --multi_gpu` (accelerate's --cpu launcher starts one process); they then train on CPU with gloo.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..adapter_io import write_text_atomic as _write_text_atomic
from ..config import ConfigError, PrefixConfig
from ..inject import DROPOUT_RATE_ATTRS, kind_of_config
from ..paths import writable_dir
from . import data as D
from . import evaluate as E
from .config import TrainConfig
from .ema import ParamEMA

CKPT_PREFIX = "checkpoint-"
log = logging.getLogger(__name__)


class TrainingError(ConfigError):
    """Training cannot go on (non-finite loss, an output dir that holds another run, ...)."""


# ----------------------------------------------------------------------------- output directory

def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def check_output_dir(cfg: TrainConfig) -> bool:
    """Decide what to do with cfg.output; -> True if there is a run here to resume. Reads only."""
    out = writable_dir(cfg.output, "--output")
    if not out.exists() or not any(out.iterdir()):
        if cfg.resume:  # asked to continue: starting afresh instead would be a silent surprise (transformers' Trainer too)
            why = "it does not exist" if not out.exists() else "it is empty"
            raise TrainingError(f"--resume: no checkpoint found in --output {out} ({why}); pass the --output of the run to "
                                "continue, or drop --resume to start a new run")
        return False
    marker = out / "run.json"
    if not marker.is_file():
        raise TrainingError(f"--output {out} is not empty and holds no prefixtune run; choose an empty or new directory")
    prev = json.loads(marker.read_text()).get("identity", {})
    if cfg.overwrite:
        return False
    if not cfg.resume:
        raise TrainingError(f"--output {out} already holds a run; pass --resume to continue it or --overwrite to start over")
    mine = _jsonable(cfg.run_identity())
    diff = sorted(k for k in set(prev) | set(mine) if prev.get(k) != mine.get(k))
    if diff:
        raise TrainingError(f"--output {out} holds a different run (differs in {', '.join(diff)}), so --resume cannot "
                            "continue it; use the same settings, another --output, or --overwrite")
    if latest_checkpoint(out) is None:
        when = f"written every --save-every {cfg.save_every} steps" if cfg.save_every else "--save-every was off"
        raise TrainingError(f"--resume: no checkpoint found in --output {out}: the run stopped before its first one "
                            f"({when}); start it over with --overwrite")
    return True


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    if pointer.is_file():
        p = out / pointer.read_text().strip()
        if (p / "state.pt").is_file():
            return p
    found = sorted(p for p in out.glob(f"{CKPT_PREFIX}*") if (p / "state.pt").is_file())
    return found[-1] if found else None


def save_checkpoint(out: Path, model, optimizer, scheduler, state: dict) -> Path:
    """checkpoint-NNNNNN/ built in a temp dir and renamed into place; then `latest` is repointed atomically."""
    from ..adapter_io import atomic_dir

    def fill(tmp: Path) -> None:
        model.save_adapter(tmp / "adapter", keep_projection=True)
        torch.save({
            **state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }, tmp / "state.pt")

    final = atomic_dir(out / f"{CKPT_PREFIX}{state['step']:06d}", fill)
    _write_text_atomic(out / "latest", final.name)
    for old in out.glob(f"{CKPT_PREFIX}*"):  # keep only the newest
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    model.load_adapter_weights(ckpt / "adapter")
    state = torch.load(ckpt / "state.pt", weights_only=False)  # our own checkpoint: optimizer state, RNG
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = state.pop("rng")
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# ----------------------------------------------------------------------------- data

def load_source(source: str, config_name: str | None = None):
    """data.load_records, plus Hub dataset configs (e.g. financial_phrasebank / sentences_allagree)."""
    p = Path(source)
    if p.is_file() and not p.read_bytes()[:4096].strip():  # `datasets` fails on empty files with StopIteration
        raise D.DataError(f"data file {p} is empty; nothing to train on")
    if config_name and not Path(source).exists():
        import datasets

        try:
            return datasets.load_dataset(source, config_name)
        except Exception as e:
            raise D.DataError(f"could not load Hub dataset {source!r} (config {config_name!r}): {type(e).__name__}: "
                              f"{str(e)[:200]}. Pass a local .csv/.jsonl/.parquet file or save_to_disk directory") from None
    return D.load_records(source)


def load_data(cfg: TrainConfig, tokenizer, is_encoder_decoder: bool, head: bool = False, say=print):
    """-> (train tokenized, eval tokenized, eval records, task_info). head: encoder classifier (class-index labels)."""
    from .clean import prepare

    # --fix-text and the incomplete-row check see the files' own row order (messages give the files' row numbers)
    kw = dict(text_column=cfg.text_column, label_column=cfg.label_column, drop_incomplete=cfg.drop_incomplete,
              repair_text=cfg.fix_text, say=say)
    raw = prepare(load_source(cfg.train, cfg.data_config), cfg.task, where=f"--train {cfg.train}", **kw)
    eval_source = prepare(load_source(cfg.eval), cfg.task, where=f"--eval {cfg.eval}", **kw) if cfg.eval else None
    train_raw, eval_raw = D.split_train_eval(raw, cfg.eval_fraction, cfg.seed, eval_source=eval_source)
    if cfg.max_train_examples and len(train_raw) > cfg.max_train_examples:
        train_raw = train_raw.shuffle(seed=cfg.seed).select(range(cfg.max_train_examples))
    cap = cfg.max_eval_examples
    if cap is None and cfg.eval is None and cfg.max_auto_eval_examples and len(eval_raw) > cfg.max_auto_eval_examples:
        cap = cfg.max_auto_eval_examples
        say(f"evaluating {cap} of the {len(eval_raw)} evaluation rows taken from --train (--max-auto-eval-examples 0 for all, "
            "or --eval FILE / --max-eval-examples N)")
    if cap and len(eval_raw) > cap:
        eval_raw = eval_raw.select(range(cap))
    kw = dict(is_encoder_decoder=is_encoder_decoder, text_column=cfg.text_column, label_column=cfg.label_column,
              prompt_template=cfg.prompt_template, max_length=cfg.max_length, on_truncate=cfg.on_truncate, head=head)
    train_tok, info = D.tokenize_dataset(train_raw, tokenizer, cfg.task, label_words=cfg.label_words, **kw)
    _no_silent_cuts(info, cfg, "training")
    kw.update(text_column=info.get("text_column", cfg.text_column), label_column=info.get("label_column", cfg.label_column))
    eval_tok, einfo = D.tokenize_dataset(eval_raw, tokenizer, cfg.task, label_words=info.get("label_words"), **kw)
    _no_silent_cuts(einfo, cfg, "eval")
    task_info = {"task": cfg.task, "max_length": cfg.max_length,
                 **{k: info.get(k) for k in ("label_words", "text_column", "label_column", "prompt_template")}}
    if head:  # eval / info / generate read this to know the adapter carries a classification head
        task_info["head"] = "sequence-classification"
    return train_tok, eval_tok, eval_raw, task_info


def _no_silent_cuts(info: dict, cfg: TrainConfig, which: str) -> None:
    # With on_truncate="warn" the data layer cuts prompts but drops examples whose target alone is too long;
    # a dropped target is a silent loss of data, so say so and stop.
    if cfg.on_truncate == "warn" and info.get("n_dropped"):
        raise D.DataError(
            f"{info['n_dropped']} {which} example(s) have a target longer than max_length={cfg.max_length}; "
            "raise --max-length (max_length in the recipe) or set on_truncate: drop to skip them"
        )


# ----------------------------------------------------------------------------- model pieces

def base_dropout_off(model: nn.Module):
    """Set every dropout rate in `model` to 0 (nn.Dropout modules and the float rates of DROPOUT_RATE_ATTRS);
    -> a function that puts them back. For `--no-base-dropout`: the frozen model trains in train mode (gradient
    checkpointing needs it), but its dropout only adds noise to what the prefix sees."""
    saved = []
    for m in model.modules():
        names = ("p",) if isinstance(m, nn.Dropout) else DROPOUT_RATE_ATTRS
        for name in names:
            v = getattr(m, name, None)
            if isinstance(v, float) and v > 0:
                saved.append((m, name, v))
                setattr(m, name, 0.0)

    def restore():
        for m, name, v in saved:
            setattr(m, name, v)
    return restore


class LossModule(nn.Module):
    """Wraps the PrefixModel so DDP sees the forward that computes the loss (label positions only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        nll, n = E.token_nll(self.model, batch)
        return nll / max(n, 1)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """transformers' warmup schedules: linear / cosine decay to 0, or constant after warmup."""
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def precision_plan(precision: str) -> tuple[torch.dtype, str]:
    """-> (base weights dtype, accelerate mixed_precision). bf16 weights need no autocast; fp16 keeps fp32
    weights with autocast + loss scaling (fp16 weights would underflow the prefix gradients)."""
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": (torch.float32, "no"), "bf16": (torch.bfloat16, "no"), "fp16": (torch.float32, "fp16")}[precision]


def adapter_bytes(model) -> int:
    enc = model.prefixes[model.active_adapter]
    return enc.num_virtual_tokens * enc.out_dim * 4


def _human(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- metrics & curves

def log_metrics(out: Path, record: dict, acc=None) -> None:
    """One line of metrics.jsonl; the same numbers go to the experiment tracker, if any (--report-to)."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if acc is not None and acc.trackers:
        acc.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=record["step"])


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def tracker(report_to: str) -> str | None:
    """accelerate's log_with for --report-to, after checking its package is installed (else one clear error)."""
    if report_to in (None, "none"):
        return None
    import importlib.util

    package = TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"--report-to {report_to} needs the {package} package: pip install {package}")
    return report_to


def tracker_config(cfg: TrainConfig) -> dict:
    """The run config as flat scalars (trackers such as TensorBoard's hparams take nothing else)."""
    flat = {}
    for k, v in cfg.to_dict().items():
        for k2, v2 in (v.items() if isinstance(v, dict) else [(None, v)]):
            key = k if k2 is None else f"{k}.{k2}"
            flat[key] = v2 if isinstance(v2, (int, float, str, bool)) else str(v2)
    return flat


def truncate_metrics(out: Path, step: int) -> None:
    """On resume, forget what the crashed run logged after the checkpoint (it will be logged again)."""
    path = out / "metrics.jsonl"
    if path.exists():
        keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        _write_text_atomic(path, "".join(l + "\n" for l in keep))


def plot_curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out / "metrics.jsonl"
    if not path.exists():
        return
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    tr = [r for r in recs if "loss" in r]
    ev = [r for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss", alpha=0.8)
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(out / "loss_curve.png", dpi=100), plt.close(fig)
    acc = [r for r in ev if r.get("eval_accuracy") is not None]
    if acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in acc], [r["eval_accuracy"] for r in acc], "o-", label="eval accuracy")
        ax.set_xlabel("step"), ax.set_ylabel("accuracy"), ax.set_ylim(0, 1), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out / "accuracy_curve.png", dpi=100), plt.close(fig)


# ----------------------------------------------------------------------------- evaluation during training

def run_eval(model, tokenizer, eval_tok, eval_raw, task_info: dict, cfg: TrainConfig) -> tuple[dict, list | None]:
    res = E.evaluate_loss(model, tokenizer, eval_tok, batch_size=cfg.eval_batch_size)
    out = {"eval_loss": res["loss"], "eval_perplexity": res["perplexity"]}
    preds = None
    if cfg.task == "classify":
        cls, preds = E.evaluate_classify(model, tokenizer, eval_raw, task_info, method=cfg.eval_method,
                                         batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
        out.update(eval_accuracy=cls["accuracy"], eval_macro_f1=cls["macro_f1"], report=cls)
    else:
        out["report"] = {"task": cfg.task, **res}
    return out, preds


def _recent_train_loss(out: Path, last: int = 10) -> float:
    """Mean training loss of the last logged steps (inf if none were logged)."""
    path = out / "metrics.jsonl"
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    losses = [r["loss"] for r in recs if "loss" in r][-last:]
    return sum(losses) / len(losses) if losses else math.inf


def _score(ev: dict) -> float:
    return ev["eval_accuracy"] if "eval_accuracy" in ev else -ev["eval_loss"]


def best_message(state: dict, task: str) -> str:
    """The best evaluation as the user knows the metric: accuracy, or the loss (the score is its negative)."""
    at = f" at step {state['best_step']}" if state.get("best_step") is not None else ""  # not in older checkpoints
    if task == "classify":
        return f"best eval accuracy {state['best']:.4f}{at}"
    return f"best eval loss {-state['best']:.4f}{at}"


# ----------------------------------------------------------------------------- the loop

def _cpu_multiprocess() -> bool:
    """True when a launcher (torchrun, `accelerate launch --multi_gpu`) started several processes on a machine
    with no GPU. accelerate only sets up a CPU process group (gloo) when told cpu=True; without it, it finds
    no device backend, ignores WORLD_SIZE/RANK, and every process trains alone as "1 process"."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        dev = torch.accelerator.current_accelerator()
    else:
        dev = torch.device("cuda") if torch.cuda.is_available() else None
    return dev is None or dev.type == "mps"  # accelerate has no multi-process MPS backend either


def train(cfg: TrainConfig, model=None, tokenizer=None, *, stop_after: int | None = None) -> dict:
    """Train a prefix as `cfg` says; -> a plain, JSON-ready summary (steps, best, last_eval, report, output).

    `model`/`tokenizer` skip loading (tests, demo); `stop_after` returns after that many optimizer steps (after any
    checkpoint at that step), as if the run had been killed there. `fit` also hands back the trained PrefixModel."""
    return fit(cfg, model, tokenizer, stop_after=stop_after)[0]


def fit(cfg: TrainConfig, model=None, tokenizer=None, *, stop_after: int | None = None):
    """`train`, returning (summary, the trained PrefixModel) for callers that go on using the model in-process."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..loading import check_classifier, load_config, load_model, load_tokenizer
    from ..model import attach

    cfg.validate()
    # the model kind decides the data format, and the task's defaults (encoder classifiers have their own)
    kind = kind_of_config(model.config if model is not None else load_config(cfg.model), cfg.task)
    cfg.validate(kind)
    dtype, mixed = precision_plan(cfg.precision)
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed, cpu=_cpu_multiprocess(),
                      log_with=tracker(cfg.report_to), project_dir=cfg.output)
    main = acc.is_main_process
    say = print if main else (lambda *a, **k: None)
    if acc.num_processes == 1 and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        # `accelerate launch --num_processes N` (with or without --cpu) on a machine without GPUs starts ONE process
        log.warning("a multi-process launch started only this one process; on a machine without GPUs use "
                    "`accelerate launch --multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N -m prefixtune ...`")
    out = Path(cfg.output)
    resuming = check_output_dir(cfg)
    acc.wait_for_everyone()  # every rank has read the directory before the main one changes it
    if main and cfg.overwrite and out.exists():
        shutil.rmtree(out)
    acc.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    if acc.log_with:
        acc.init_trackers("prefixtune", config=tracker_config(cfg), init_kwargs={"wandb": {"name": out.name}})

    # an encoder's head size comes from the data's label set
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    is_ed, head = kind == "seq2seq", kind == "encoder"
    train_tok, eval_tok, eval_raw, task_info = load_data(cfg, tokenizer, is_ed, head=head, say=say)
    if model is None:
        base, _ = load_model(cfg.model, dtype=dtype, device=str(acc.device), task=cfg.task,
                             label_names=task_info["label_words"] if head else None, new_head=cfg.new_head)
    else:
        base = model
    if head:
        check_classifier(base, task_info["label_words"])
        say(f"encoder classifier: training the prefix and the {len(task_info['label_words'])}-way classification "
            "head (loss: the head's cross-entropy; evaluation: the head's argmax)")

    pcfg = PrefixConfig.from_dict(cfg.prefix.to_dict())  # a copy: attach and init_token_ids fill it in
    if pcfg.init == "text":  # the engine needs the description as token ids of this model's tokenizer
        pcfg.extra["init_token_ids"] = tokenizer(pcfg.init_text, add_special_tokens=False)["input_ids"]
    pcfg.extra["task"] = cfg.task  # shown by `prefixtune info` and the model card
    if head:
        pcfg.extra["labels"] = list(task_info["label_words"])
    # init="examples": whole training rows as the prefix's start; their ids are used here and not saved
    examples = D.example_token_ids(train_tok, tokenizer, pcfg.num_virtual_tokens, cfg.seed) if pcfg.init == "examples" else None
    pm = attach(base, pcfg, init_token_ids=examples)
    if cfg.gradient_checkpointing:
        pm.gradient_checkpointing_enable()
    if main:
        _write_text_atomic(out / "run.json", json.dumps({"identity": _jsonable(cfg.run_identity()),
                                                         "config": _jsonable(cfg.to_dict())}, indent=2))
        _write_text_atomic(out / "task.json", json.dumps(task_info, indent=2))

    world = acc.num_processes
    per_step = cfg.batch_size * cfg.grad_accum * world
    lengths = [len(x) for x in train_tok["input_ids"]]
    n_batches = math.ceil(len(lengths) / cfg.batch_size)
    steps_per_epoch = n_batches // (cfg.grad_accum * world)
    if steps_per_epoch < 1:
        raise D.DataError(f"{len(lengths)} training examples are fewer than one optimizer step needs "
                          f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} process(es)); "
                          "lower --batch-size/--grad-accum or add data")
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every or steps_per_epoch

    params = [p for p in pm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(pm.param_groups(cfg.lr, cfg.projection_lr, cfg.weight_decay, cfg.head_lr))
    scheduler = make_scheduler(optimizer, cfg, total)
    ema = ParamEMA(params, cfg.ema)  # evaluated and saved in place of the live weights (--ema 0: a no-op)
    state = {"step": 0, "best": None, "bad_evals": 0, "tokens": 0}
    ckpt = latest_checkpoint(out) if resuming else None
    if ckpt is not None:
        state.update(load_checkpoint(ckpt, pm, optimizer, scheduler))
        if cfg.ema:
            ema.load_state_dict(state.pop("ema"))
        say(f"resuming from {ckpt.name} (step {state['step']} of {total})")
    if main:
        truncate_metrics(out, state["step"])
    acc.wait_for_everyone()

    lossmod, optimizer = acc.prepare(LossModule(pm), optimizer)
    collate = D.PadCollator(tokenizer, is_encoder_decoder=is_ed)
    say(pm.parameter_summary())
    say(f"adapter size: {_human(adapter_bytes(pm))} (fp32, projection folded) | {len(lengths)} train / "
        f"{len(eval_raw)} eval examples | {total} steps of {per_step} examples ({steps_per_epoch} per epoch) | "
        f"{world} process(es) on {acc.device}")

    bar = tqdm(total=total, initial=state["step"], disable=not (main and cfg.progress), desc="train", dynamic_ncols=True)
    write = bar.write if main else say  # tqdm.write prints even on a disabled bar: once per process
    pm.train()
    last_eval, last_preds = None, None
    stopped_early = False
    batches, batches_epoch = None, None
    # zeroed only here, so every exit after this point passes the finally below that puts it back
    restore_dropout = (lambda: None) if cfg.base_dropout else base_dropout_off(pm.base_model)
    try:
        while state["step"] < total:
            t_start = time.perf_counter()
            step = state["step"]
            epoch, k = divmod(step, steps_per_epoch)
            if batches_epoch != epoch:  # a fresh seeded order per epoch; also what makes resume exact
                batches = D.length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch)
                batches_epoch = epoch
            step_loss, step_tokens = torch.zeros((), device=acc.device), 0
            for j in range(cfg.grad_accum):
                idx = batches[(k * cfg.grad_accum + j) * world + acc.process_index]
                batch = {t: v.to(acc.device) for t, v in collate([train_tok[i] for i in idx]).items()}
                step_tokens += int(batch["attention_mask"].sum())
                with acc.accumulate(lossmod):
                    with acc.autocast():
                        loss = lossmod(batch)
                    acc.backward(loss)
                    step_loss += loss.detach() / cfg.grad_accum
                    if acc.sync_gradients:
                        bad = acc.reduce((~torch.isfinite(step_loss)).float(), "sum")
                        if bad.item() > 0:
                            good = latest_checkpoint(out)
                            raise TrainingError(
                                f"loss became {step_loss.item()} at step {step + 1}; stopped. The last good checkpoint is "
                                f"{good or 'none (none was saved yet)'}. Lower --lr, use --precision fp32, or check the data")
                        if cfg.max_grad_norm:
                            acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        ema.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state["step"] = step = step + 1
            loss_val = acc.reduce(step_loss, "mean").item()
            tok_s = step_tokens * world / max(time.perf_counter() - t_start, 1e-9)
            state["tokens"] += step_tokens * world
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            if main and (step % cfg.log_every == 0 or step == total):
                log_metrics(out, {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss_val, "lr": lr,
                                  "tokens_per_s": round(tok_s, 1)}, acc)

            if step % eval_every == 0 or step % steps_per_epoch == 0 or step == total:
                t_eval = time.perf_counter()
                with ema.applied():
                    ev, last_preds = run_eval(pm, tokenizer, eval_tok, eval_raw, task_info, cfg)
                    ev["eval_seconds"] = round(time.perf_counter() - t_eval, 2)  # what evaluating costs the run
                    better = state["best"] is None or _score(ev) > state["best"]
                    if better and main:
                        pm.save_adapter(out / "best")
                        _write_text_atomic(out / "best" / "task.json", json.dumps(task_info, indent=2))
                last_eval = ev
                pm.train()
                rec = {k2: v for k2, v in ev.items() if k2 != "report"}
                if better:
                    state["best"], state["best_step"], state["bad_evals"] = _score(ev), step, 0
                else:
                    state["bad_evals"] += 1
                if main:
                    log_metrics(out, {"step": step, "epoch": round(step / steps_per_epoch, 4), **rec}, acc)
                    plot_curves(out)
                write(f"step {step}: " + "  ".join(f"{k2} {v:.4f}" for k2, v in rec.items() if k2 != "eval_seconds")
                      + f"  ({ev['eval_seconds']:.0f}s)" + ("  (best)" if better else ""))
                if cfg.patience and state["bad_evals"] >= cfg.patience and step < total:
                    write(f"early stopping: no improvement in {cfg.patience} evals")
                    stopped_early = True
            if cfg.save_every and (step % cfg.save_every == 0 or stopped_early) and step < total:
                if main:
                    save_checkpoint(out, pm, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                    scheduler, {**state, **({"ema": ema.state_dict()} if cfg.ema else {})})
                acc.wait_for_everyone()
            if stopped_early or (stop_after is not None and step >= stop_after):
                break
    finally:  # also on a NaN stop or an interrupt: the model handed back has its own dropout again
        bar.close()
        restore_dropout()
    if stop_after is not None and state["step"] < total and not stopped_early:
        return {"stopped_at": state["step"]}, pm
    ema.copy_to_params()  # the result is the average: the final adapter, and the model handed back

    # final artefacts
    if main:
        pm.save_adapter(out / "adapter")
        _write_text_atomic(out / "adapter" / "task.json", json.dumps(task_info, indent=2))
        if last_eval is None:
            last_eval, last_preds = run_eval(pm, tokenizer, eval_tok, eval_raw, task_info, cfg)
        report, preds = dict(last_eval["report"]), last_preds
        report["eval_loss"] = last_eval["eval_loss"]
        if cfg.task == "classify":
            warning = E.single_class_warning(report, min(_recent_train_loss(out), last_eval["eval_loss"]))
            if warning:
                log.warning("%s", warning)
                report["single_class_warning"] = warning
        E.write_results(out, report, preds)
        plot_curves(out)
        say(pm.parameter_summary())
        say(f"adapter saved to {out / 'adapter'} ({_human(_dir_bytes(out / 'adapter'))} on disk); "
            f"{best_message(state, cfg.task)} in {out / 'best'}")
    for t in acc.trackers:  # not acc.end_training(): it also tears down the process group a caller may still use
        t.finish()
    acc.wait_for_everyone()
    summary = {"steps": state["step"], "best": state["best"], "best_step": state.get("best_step"),
               "stopped_early": stopped_early, "output": str(out),
               "last_eval": {k: v for k, v in (last_eval or {}).items() if k != "report"},
               "report": (last_eval or {}).get("report")}
    return summary, pm
