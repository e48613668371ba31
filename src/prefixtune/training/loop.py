"""The training loop: a short recipe (prepare -> steps -> finish) over parts with one job each.

    from prefixtune.training.config import TrainConfig
    from prefixtune.training.loop import train
    summary = train(TrainConfig(model=..., train=..., task="classify", output="runs/x", max_steps=100))

    config.py       TrainConfig: validate() checks it, resolve() fills the task's defaults (logged, in run.json)
    sources.py      the rows: read, split, cap, tokenize (data.py formats and batches them)
    optim.py        parameter groups and the learning-rate schedule
    checkpoints.py  the output directory, checkpoints and resume
    reporting.py    messages, progress bar, metrics.jsonl, trackers, curves
    evaluate.py     the loss and the classification scores

Output directory: run.json, task.json, metrics.jsonl, curves, checkpoint-NNNNNN/ (+ `latest`), best/ (the best
adapter by eval accuracy (classify) or eval loss), adapter/ (the final one, peft format; with --ema, it and best/
hold the moving average), eval.json and predictions.jsonl (the final evaluation).

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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapter_io import write_text_atomic
from ..config import PrefixConfig
from ..initialize import example_token_ids
from ..inject import DROPOUT_RATE_ATTRS, kind_of_config
from . import data as D
from . import evaluate as E
from .checkpoints import TrainingError, check_output_dir, latest_checkpoint, load_checkpoint, save_checkpoint, write_run_record
from .config import TrainConfig, resolve
from .ema import ParamEMA
from .optim import make_scheduler, param_groups
from .reporting import Reporter, adapter_bytes, dir_bytes, human_bytes, plot_curves, recent_train_loss, tracker, truncate_metrics
from .sources import RunData, load_run_data

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, model=None, tokenizer=None, *, stop_after: int | None = None) -> dict:
    """Train a prefix as `cfg` says; -> a plain, JSON-ready summary (steps, best, last_eval, report, output).

    `model`/`tokenizer` skip loading (tests, demo); `stop_after` returns after that many optimizer steps (after any
    checkpoint at that step), as if the run had been killed there. `fit` also hands back the trained PrefixModel."""
    return fit(cfg, model, tokenizer, stop_after=stop_after)[0]


def fit(cfg: TrainConfig, model=None, tokenizer=None, *, stop_after: int | None = None):
    """`train`, returning (summary, the trained PrefixModel) for callers that go on using the model in-process."""
    run = prepare(cfg, model, tokenizer)
    # zeroed only here, so every exit after this point passes the finally below that puts it back
    restore_dropout = (lambda: None) if run.cfg.base_dropout else base_dropout_off(run.model.base_model)
    try:
        stopped_early = run_steps(run, stop_after)
    finally:  # also on a NaN stop or an interrupt: the model handed back has its own dropout again
        run.report.close_bar()
        restore_dropout()
    if stop_after is not None and run.state["step"] < run.plan.total and not stopped_early:
        return {"stopped_at": run.state["step"]}, run.model
    return finish(run, stopped_early), run.model


# ----------------------------------------------------------------------------- prepare

@dataclass
class StepPlan:
    """How many optimizer steps, and when to evaluate."""

    total: int
    steps_per_epoch: int
    eval_every: int
    world: int  # processes

    @classmethod
    def of(cls, cfg: TrainConfig, n_examples: int, world: int) -> StepPlan:
        steps_per_epoch = math.ceil(n_examples / cfg.batch_size) // (cfg.grad_accum * world)
        if steps_per_epoch < 1:
            raise D.DataError(f"{n_examples} training examples are fewer than one optimizer step needs "
                              f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} process(es)); "
                              "lower --batch-size/--grad-accum or add data")
        total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
        return cls(total, steps_per_epoch, cfg.eval_every or steps_per_epoch, world)


@dataclass
class Run:
    """What `prepare` built: the parts the steps go through and `finish` saves."""

    cfg: TrainConfig  # resolved: every default filled in
    acc: object  # accelerate.Accelerator
    report: Reporter
    out: Path
    data: RunData
    tokenizer: object
    model: nn.Module  # the PrefixModel
    lossmod: nn.Module  # LossModule, prepared by accelerate
    optimizer: object
    scheduler: object
    ema: ParamEMA
    plan: StepPlan
    kind: str  # the base model's: "causal", "seq2seq" or "encoder"
    state: dict  # step, best, bad_evals, tokens: what a checkpoint stores besides the weights
    last_eval: dict | None = None
    last_preds: list | None = None
    # Another task on the same steps (training/distill_run.py): its rows' lengths, collate and evaluation.
    # None: the dataset's (`data.train["input_ids"]`, PadCollator, run_eval).
    lengths: list[int] | None = None
    collate: Callable[[list], dict] | None = None
    evaluate: Callable[[nn.Module], tuple[dict, list | None]] | None = None


def prepare(cfg: TrainConfig, model=None, tokenizer=None) -> Run:
    """Check and resolve the config, claim the output directory, read the data, attach the prefix, build the
    optimizer and resume from the latest checkpoint if asked."""
    from accelerate.utils import set_seed

    from ..loading import load_config, load_tokenizer

    cfg.validate()
    # the model kind decides the data format, and the task's defaults (encoder classifiers have their own)
    kind = kind_of_config(model.config if model is not None else load_config(cfg.model), cfg.task)
    resolved = resolve(cfg, kind)
    cfg = resolved.config
    acc = make_accelerator(cfg)
    report = Reporter(Path(cfg.output), acc, cfg.progress)
    report.say(resolved.describe(kind))
    out, resuming = claim_output(cfg, acc)
    set_seed(cfg.seed)
    report.start_tracker(cfg)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    data = load_run_data(cfg, tokenizer, kind, say=report.say)
    pm = _attach(cfg, kind, model, tokenizer, data, acc, report)
    if report.main:
        write_run_record(out, cfg, resolved.defaults, data.task_info)
    groups = param_groups(pm, cfg.lr, cfg.projection_lr, cfg.weight_decay, cfg.head_lr)
    plan, lossmod, optimizer, scheduler, ema, state = optimise(cfg, pm, groups, len(data.train), LossModule(pm), acc, report,
                                                               out, resuming)
    report.say(pm.parameter_summary())
    report.say(f"adapter size: {human_bytes(adapter_bytes(pm))} (fp32, projection folded) | {len(data.train)} train / "
               f"{len(data.eval_raw)} eval examples | {plan.total} steps of {cfg.batch_size * cfg.grad_accum * plan.world} "
               f"examples ({plan.steps_per_epoch} per epoch) | {plan.world} process(es) on {acc.device}")
    return Run(cfg, acc, report, out, data, tokenizer, pm, lossmod, optimizer, scheduler, ema, plan, kind, state)


def optimise(cfg, pm, groups, n_train: int, lossmod: nn.Module, acc, report, out: Path, resuming: bool) -> tuple:
    """The step plan, AdamW over `groups`, the schedule, the EMA and the step state (restored from the latest
    checkpoint when resuming), and `lossmod` prepared by accelerate (or over a sharded base under --fsdp): the part
    of `prepare` that train and distill (training/distill_run.py) share.
    -> (plan, lossmod, optimizer, scheduler, ema, state)"""
    plan = StepPlan.of(cfg, n_train, acc.num_processes)
    optimizer = torch.optim.AdamW(groups)
    scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.warmup_ratio, plan.total)
    # evaluated and saved in place of the live weights (--ema 0: a no-op)
    ema = ParamEMA([p for p in pm.parameters() if p.requires_grad], cfg.ema)
    state = {"step": 0, "best": None, "bad_evals": 0, "tokens": 0}
    ckpt = latest_checkpoint(out) if resuming else None
    if ckpt is not None:
        state.update(load_checkpoint(ckpt, pm, optimizer, scheduler))
        if cfg.ema:
            ema.load_state_dict(state.pop("ema"))
        report.say(f"resuming from {ckpt.name} (step {state['step']} of {plan.total})")
    if report.main:
        truncate_metrics(out, state["step"])
    acc.wait_for_everyone()
    if cfg.fsdp:  # the base sharded (training/sharding.py); accelerate must not wrap it in DDP
        from .sharding import shard_frozen_base
        lossmod, optimizer = shard_frozen_base(lossmod, acc), acc.prepare(optimizer)
    else:
        lossmod, optimizer = acc.prepare(lossmod, optimizer)
    return plan, lossmod, optimizer, scheduler, ema, state


def make_accelerator(cfg):
    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # accelerate uses DeepSpeed only off CPU (cpu=False), and a CPU multi-process run needs cpu=True: on CPUs the
        # run would be plain data parallel without a word, and on GPUs nothing here gathers a ZeRO-3-partitioned prefix.
        raise TrainingError("DeepSpeed (accelerate launch --use_deepspeed) is not supported; shard the frozen base "
                            "with --fsdp under torchrun or `accelerate launch --multi_gpu` (docs/multi-device.md)")
    _, mixed = precision_plan(cfg.precision)
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed, cpu=_cpu_multiprocess(),
                      log_with=tracker(cfg.report_to), project_dir=cfg.output)
    if acc.num_processes == 1 and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        # `accelerate launch --num_processes N` (with or without --cpu) on a machine without GPUs starts ONE process
        log.warning("a multi-process launch started only this one process; on a machine without GPUs use "
                    "`accelerate launch --multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N -m prefixtune ...`")
    return acc


def claim_output(cfg, acc) -> tuple[Path, bool]:
    """-> (the output directory, whether it holds a run to resume); --overwrite empties it first."""
    out = Path(cfg.output)
    resuming = check_output_dir(cfg)
    acc.wait_for_everyone()  # every rank has read the directory before the main one changes it
    if acc.is_main_process and cfg.overwrite and out.exists():
        shutil.rmtree(out)
    acc.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)
    return out, resuming


def _attach(cfg: TrainConfig, kind: str, model, tokenizer, data: RunData, acc, report: Reporter):
    """The base model (loaded unless given) with a fresh prefix as cfg.prefix says -> the PrefixModel."""
    from ..loading import check_classifier, load_model
    from ..model import attach

    head = kind == "encoder"  # an encoder's head size comes from the data's label set
    labels = data.task_info["label_words"]
    if model is None:
        model, _ = load_model(cfg.model, dtype=precision_plan(cfg.precision)[0], device=str(acc.device), task=cfg.task,
                              label_names=labels if head else None, new_head=cfg.new_head, quantize=cfg.quantize)
    if head:
        check_classifier(model, labels)
        report.say(f"encoder classifier: training the prefix and the {len(labels)}-way classification "
                   "head (loss: the head's cross-entropy; evaluation: the head's argmax)")
    pcfg = PrefixConfig.from_dict(cfg.prefix.to_dict())  # a copy: attach and init_token_ids fill it in
    if pcfg.init == "text":  # the engine needs the description as token ids of this model's tokenizer
        pcfg.extra["init_token_ids"] = tokenizer(pcfg.init_text, add_special_tokens=False)["input_ids"]
    pcfg.extra["task"] = cfg.task  # shown by `prefixtune info` and the model card
    if head:
        pcfg.extra["labels"] = list(labels)
    # init="examples": whole training rows as the prefix's start; their ids are used here and not saved
    examples = example_token_ids(data.train, tokenizer, pcfg.num_virtual_tokens, cfg.seed) if pcfg.init == "examples" else None
    pm = attach(model, pcfg, init_token_ids=examples)
    if cfg.gradient_checkpointing:
        pm.gradient_checkpointing_enable()
    return pm


# ----------------------------------------------------------------------------- steps

def run_steps(run: Run, stop_after: int | None = None) -> bool:
    """Optimizer steps until the plan's total (or early stopping, or `stop_after`); -> whether it stopped early."""
    cfg, plan, state = run.cfg, run.plan, run.state
    run.report.open_bar(plan.total, state["step"])
    run.model.train()
    batches, batches_epoch = None, None
    stopped_early = False
    lengths = run.lengths if run.lengths is not None else [len(x) for x in run.data.train["input_ids"]]
    collate = run.collate or D.PadCollator(run.tokenizer, is_encoder_decoder=run.kind == "seq2seq")
    while state["step"] < plan.total:
        t_start = time.perf_counter()
        epoch, k = divmod(state["step"], plan.steps_per_epoch)
        if batches_epoch != epoch:  # a fresh seeded order per epoch; also what makes resume exact
            batches, batches_epoch = D.length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch), epoch
        micro = [batches[(k * cfg.grad_accum + j) * plan.world + run.acc.process_index] for j in range(cfg.grad_accum)]
        loss, tokens = _optimizer_step(run, [collate([run.data.train[i] for i in idx]) for idx in micro])
        lr = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
        state["step"] = step = state["step"] + 1
        state["tokens"] += tokens * plan.world
        tok_s = tokens * plan.world / max(time.perf_counter() - t_start, 1e-9)
        epochs = round(step / plan.steps_per_epoch, 4)
        run.report.step(step, epochs, loss, lr, tok_s, log=step % cfg.log_every == 0 or step == plan.total)
        if step % plan.eval_every == 0 or step % plan.steps_per_epoch == 0 or step == plan.total:
            evaluate(run, step, epochs)
            if cfg.patience and state["bad_evals"] >= cfg.patience and step < plan.total:
                run.report.write(f"early stopping: no improvement in {cfg.patience} evals")
                stopped_early = True
        if cfg.save_every and (step % cfg.save_every == 0 or stopped_early) and step < plan.total:
            if run.report.main:
                opt = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer
                save_checkpoint(run.out, run.model, opt, run.scheduler,
                                {**state, **({"ema": run.ema.state_dict()} if cfg.ema else {})})
            run.acc.wait_for_everyone()
        if stopped_early or (stop_after is not None and step >= stop_after):
            break
    return stopped_early


def _optimizer_step(run: Run, micro_batches: list[dict]) -> tuple[float, int]:
    """Forward/backward over the (collated) micro-batches, then one optimizer step; -> (mean loss over processes,
    tokens of this process)."""
    acc, cfg = run.acc, run.cfg
    step_loss, step_tokens = torch.zeros((), device=acc.device), 0
    for cpu_batch in micro_batches:
        batch = {t: v.to(acc.device) for t, v in cpu_batch.items()}
        step_tokens += int(batch["attention_mask"].sum())
        with acc.accumulate(run.lossmod):
            with acc.autocast():
                loss = run.lossmod(batch)
            acc.backward(loss)
            step_loss += loss.detach() / cfg.grad_accum
            if acc.sync_gradients:
                bad = acc.reduce((~torch.isfinite(step_loss)).float(), "sum")
                if bad.item() > 0:
                    good = latest_checkpoint(run.out)
                    raise TrainingError(
                        f"loss became {step_loss.item()} at step {run.state['step'] + 1}; stopped. The last good checkpoint "
                        f"is {good or 'none (none was saved yet)'}. Lower --lr, use --precision fp32, or check the data")
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], cfg.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                run.ema.update()
    return acc.reduce(step_loss, "mean").item(), step_tokens


def evaluate(run: Run, step: int, epochs: float) -> None:
    """Evaluate (the EMA average if any), keep best/ if it is the best so far, log. At step 0 the start is recorded
    too (state["start_eval"]): `distill` scores its start, the document's own key/values, this way."""
    state, t_eval = run.state, time.perf_counter()
    with run.ema.applied():
        if run.evaluate is not None:
            ev, run.last_preds = run.evaluate(run.model)
        else:
            ev, run.last_preds = run_eval(run.model, run.tokenizer, run.data, run.cfg)
        ev["eval_seconds"] = round(time.perf_counter() - t_eval, 2)  # what evaluating costs the run
        better = state["best"] is None or _score(ev) > state["best"]
        if better and run.report.main:
            run.model.save_adapter(run.out / "best")
            write_text_atomic(run.out / "best" / "task.json", json.dumps(run.data.task_info, indent=2))
    run.last_eval = ev
    run.model.train()
    if step == 0:
        state["start_eval"] = {k: v for k, v in ev.items() if k != "report"}
    if better:
        state["best"], state["best_step"], state["bad_evals"] = _score(ev), step, 0
    else:
        state["bad_evals"] += 1
    run.report.eval(step, epochs, {k: v for k, v in ev.items() if k != "report"}, better)


def run_eval(model, tokenizer, data: RunData, cfg: TrainConfig) -> tuple[dict, list | None]:
    res = E.evaluate_loss(model, tokenizer, data.eval, batch_size=cfg.eval_batch_size)
    out = {"eval_loss": res["loss"], "eval_perplexity": res["perplexity"]}
    preds = None
    if cfg.task == "classify":
        cls, preds = E.evaluate_classify(model, tokenizer, data.eval_raw, data.task_info, method=cfg.eval_method,
                                         batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
        out.update(eval_accuracy=cls["accuracy"], eval_macro_f1=cls["macro_f1"], report=cls)
    else:
        out["report"] = {"task": cfg.task, **res}
    return out, preds


def _score(ev: dict) -> float:
    return ev["eval_accuracy"] if "eval_accuracy" in ev else -ev["eval_loss"]


def best_message(state: dict, task: str) -> str:
    """The best evaluation as the user knows the metric: accuracy, or the loss (the score is its negative)."""
    at = f" at step {state['best_step']}" if state.get("best_step") is not None else ""  # not in older checkpoints
    if task == "classify":
        return f"best eval accuracy {state['best']:.4f}{at}"
    return f"best eval loss {-state['best']:.4f}{at}"


# ----------------------------------------------------------------------------- finish

def finish(run: Run, stopped_early: bool) -> dict:
    """The final adapter (the EMA average if any), the final evaluation and curves; -> the run's summary."""
    cfg, out, pm, report = run.cfg, run.out, run.model, run.report
    run.ema.copy_to_params()  # the result is the average: the final adapter, and the model handed back
    if report.main:
        pm.save_adapter(out / "adapter")
        write_text_atomic(out / "adapter" / "task.json", json.dumps(run.data.task_info, indent=2))
        if run.last_eval is None:
            run.last_eval, run.last_preds = run_eval(pm, run.tokenizer, run.data, cfg)
        result = dict(run.last_eval["report"])
        result["eval_loss"] = run.last_eval["eval_loss"]
        if cfg.task == "classify":
            warning = E.single_class_warning(result, min(recent_train_loss(out), run.last_eval["eval_loss"]))
            if warning:
                log.warning("%s", warning)
                result["single_class_warning"] = warning
        E.write_results(out, result, run.last_preds)
        plot_curves(out)
        report.say(pm.parameter_summary())
        report.say(f"adapter saved to {out / 'adapter'} ({human_bytes(dir_bytes(out / 'adapter'))} on disk); "
                   f"{best_message(run.state, cfg.task)} in {out / 'best'}")
    report.end()
    run.acc.wait_for_everyone()
    last = run.last_eval or {}
    return {"steps": run.state["step"], "best": run.state["best"], "best_step": run.state.get("best_step"),
            "stopped_early": stopped_early, "output": str(out),
            "last_eval": {k: v for k, v in last.items() if k != "report"}, "report": last.get("report")}


# ----------------------------------------------------------------------------- parts

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


def precision_plan(precision: str) -> tuple[torch.dtype, str]:
    """-> (base weights dtype, accelerate mixed_precision). bf16 weights need no autocast; fp16 keeps fp32
    weights with autocast + loss scaling (fp16 weights would underflow the prefix gradients)."""
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": (torch.float32, "no"), "bf16": (torch.bfloat16, "no"), "fp16": (torch.float32, "fp16")}[precision]


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
