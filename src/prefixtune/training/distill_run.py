"""`prefixtune distill`: a knowledge-prefix run on the training loop's own parts (training/loop.py).

    from prefixtune.training.distill_run import distill
    summary = distill(DistillConfig(model=M, context=["manual.txt"], output="runs/manual"))

prepare (here): the output directory rules, accelerate, the tracker, the examples (self-study, teacher answers and
top-k: made once, by the main process, and kept in examples.pt so --resume never redoes them), the student, AdamW +
schedule, the latest checkpoint -> loop.run_steps (the same steps, accumulation, clipping, EMA, checkpoints, metrics
as `train`) -> finish (here): adapter/ with task.json holding the layout (prefixtune/knowledge.py), data.jsonl,
eval.json, curves.

Output directory: run.json, task.json, examples.pt, data.jsonl, metrics.jsonl, loss_curve.png,
checkpoint-NNNNNN/ (+ latest), best/ (lowest held-out KL), adapter/ (the final one), eval.json.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_io import write_text_atomic
from . import distill as D
from . import loop as L
from . import selfstudy as S
from .checkpoints import write_run_record
from .distill_config import DistillConfig
from .optim import param_groups
from .reporting import Reporter, dir_bytes, human_bytes, plot_curves

EXAMPLES = "examples.pt"


@dataclass
class DistillData:
    train: list[dict]
    eval_raw: list[dict]
    task_info: dict  # task.json: the layout and the document's shape


def distill(cfg: DistillConfig, model=None, tokenizer=None, *, examples: list[dict] | None = None,
            stop_after: int | None = None):
    """Distil cfg.context into a prefix; -> (summary, the PrefixModel with adapter "default"). `model` (a base model or
    PrefixModel) / `tokenizer` skip loading; `examples` (from distill.prepare) skip making them; `stop_after` returns
    after that many steps, as if killed there."""
    run = prepare(cfg, model, tokenizer, examples)
    restore_dropout = L.base_dropout_off(run.model.base_model)  # the teacher answered without dropout
    try:
        if run.state["step"] == 0:  # the start is a prefix too (the document's own key/values): scored, and best/
            L.evaluate(run, 0, 0.0)  # keeps it if training only makes it worse (a learning rate too high for it)
        stopped_early = L.run_steps(run, stop_after)
    finally:
        run.report.close_bar()
        restore_dropout()
    if stop_after is not None and run.state["step"] < run.plan.total and not stopped_early:
        return {"stopped_at": run.state["step"]}, run.model
    return finish(run, stopped_early), run.model


def prepare(cfg: DistillConfig, model=None, tokenizer=None, examples=None) -> L.Run:
    from accelerate.utils import set_seed

    from ..loading import load_model
    from ..model import PrefixModel

    cfg.validate()
    acc = L.make_accelerator(cfg)
    report = Reporter(Path(cfg.output), acc, cfg.progress)
    out, resuming = L.claim_output(cfg, acc)
    set_seed(cfg.seed)
    report.start_tracker(cfg)
    text = S.read_context(cfg.context)
    queries = S.read_queries(cfg.queries) if cfg.queries else None
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=L.precision_plan(cfg.precision)[0], device=str(acc.device))
    pm = model if isinstance(model, PrefixModel) else PrefixModel(model)
    doc = S.build_document(tokenizer, text, D.max_context(pm.base_model, cfg))
    examples = _examples(cfg, pm, tokenizer, doc, queries, examples, out, resuming, acc, report)
    D.add_student(pm, doc, cfg)
    train_rows, eval_rows = D.split(examples, cfg.eval_fraction, cfg.seed)
    info = {"task": "distill", "layout": doc.layout, "context": [str(c) for c in cfg.context],
            "context_tokens": doc.context_len, "windows": len(doc.windows), "num_virtual_tokens": cfg.num_virtual_tokens,
            "top_k": cfg.top_k, "max_context_tokens": D.max_context(pm.base_model, cfg), "answer_tokens": cfg.answer_tokens}
    if report.main:
        write_run_record(out, cfg, {}, info)
    # the teacher's work is done by now: under --fsdp the frozen base can be sharded
    plan, lossmod, optimizer, scheduler, ema, state = L.optimise(cfg, pm, param_groups(pm, cfg.lr), len(train_rows),
                                                                 D.DistillLoss(pm), acc, report, out, resuming)
    report.say(f"distill: P = {cfg.num_virtual_tokens} over a {doc.context_len}-token document in {len(doc.windows)} "
               f"window(s) | {len(train_rows)} train / {len(eval_rows)} held-out examples | {plan.total} steps of "
               f"{cfg.batch_size * cfg.grad_accum * plan.world} | {plan.world} process(es) on {acc.device}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    scored = eval_rows or train_rows[:64]  # without held-out examples (--eval-fraction 0): the first training ones

    def evaluate(m):
        return {"eval_loss": D.mean_loss(m.eval(), scored, pad)}, None

    return L.Run(cfg, acc, report, out, DistillData(train_rows, eval_rows, info), tokenizer, pm, lossmod, optimizer,
                 scheduler, ema, plan, "causal", state, lengths=[len(e["query_ids"]) + len(e["answer_ids"]) for e in
                                                                   train_rows],
                 collate=lambda rows: D.collate(rows, pad), evaluate=evaluate)


def _examples(cfg, pm, tokenizer, doc, queries, given, out: Path, resuming: bool, acc, report) -> list[dict]:
    """The training examples with their teacher answers and top-k: made once by the main process and kept in
    examples.pt (a resumed run, and every other process, reads them back)."""
    path = out / EXAMPLES
    if not (resuming and path.is_file()) and acc.is_main_process:
        t0 = time.perf_counter()
        made = given
        if made is None:
            made = D.prepare(pm, tokenizer, doc, cfg, queries, say=report.say)
            for name in [n for n in pm.prefixes if n.startswith("context-")]:  # the teacher's: every process must
                pm.delete_adapter(name)  # hold the same modules for DDP, and they are not needed any more
        tmp = path.with_name(path.name + ".tmp")
        torch.save(made, tmp)
        os.replace(tmp, path)
        with open(out / "data.jsonl", "w") as f:
            for e in made:
                f.write(json.dumps({k: e[k] for k in ("query", "answer", "window", "source", "messages") if k in e}) + "\n")
        report.say(f"examples: {len(made)} made in {time.perf_counter() - t0:.0f}s (self-study and teacher)")
    acc.wait_for_everyone()
    return torch.load(path, weights_only=False)  # our own file: lists of dicts with tensors


def finish(run: L.Run, stopped_early: bool) -> dict:
    cfg, out, pm, report = run.cfg, run.out, run.model, run.report
    run.ema.copy_to_params()
    if report.main:
        from ..adapter_io import RUN_FINAL

        pm.save_adapter(out / RUN_FINAL, format=cfg.save_format)
        write_text_atomic(out / RUN_FINAL / "task.json", json.dumps(run.data.task_info, indent=2))
        if run.last_eval is None:
            run.last_eval, _ = run.evaluate(pm)
        start = run.state.get("start_eval", {}).get("eval_loss")
        result = {"task": "distill", **(run.last_eval or {}), "start_eval_loss": start, "steps": run.state["step"]}
        write_text_atomic(out / "eval.json", json.dumps(result, indent=2))
        plot_curves(out)
        scored = "held-out" if run.data.eval_raw else "training-example"  # --eval-fraction 0: training rows
        best = f"; lowest {scored} KL {-run.state['best']:.4f} in {out / 'best'}" if run.state["best"] is not None else ""
        report.say(f"adapter saved to {out / RUN_FINAL} ({human_bytes(dir_bytes(out / RUN_FINAL))} on disk){best}")
        # worse by more than noise (a KL near 0 moves by 1e-4 from step to step)
        if start is not None and result.get("eval_loss") is not None and result["eval_loss"] > 1.05 * start + 1e-3:
            report.say(f"warning: training made the {scored} KL worse than the start ({start:.4f} -> "
                       f"{result['eval_loss']:.4f}): the learning rate moved the prefix away from a better start (--init "
                       f"{cfg.init}); best/ holds the best one (step {run.state.get('best_step')}). "
                       f"Lower --lr (2e-3 kept a whole-document start on SmolLM2-135M) or use best/")
    report.end()
    run.acc.wait_for_everyone()
    return {"steps": run.state["step"], "stopped_early": stopped_early, "output": str(out),
            "eval_kl": (run.last_eval or {}).get("eval_loss"), "best_eval_kl": None if run.state["best"] is None else
            -run.state["best"], "adapter": str(out / "adapter")}
