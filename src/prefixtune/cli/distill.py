"""`prefixtune train --task distill` and `prefixtune eval --task distill` (knowledge prefixes, issue 27).

These take a document (--context) rather than a dataset, so they parse their own flags; cli/main.py routes here
when it sees `--task distill`. The work is in training/distill.py, selfstudy.py and distill_eval.py.

A run directory (--output) holds: adapter/ (peft prefix format), run.json, task.json, data.jsonl (queries,
teacher answers, window), metrics.jsonl, loss_curve.png; eval writes eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _train_parser() -> argparse.ArgumentParser:
    from ..training.distill import DistillConfig

    d = DistillConfig()
    p = argparse.ArgumentParser(prog="prefixtune train --task distill",
                                description="Distil a document into a P-token prefix (teacher: the model with the "
                                "document before each query; student: the prefix instead; loss: top-k KL).")
    p.add_argument("--task", choices=["distill"], required=True)
    p.add_argument("--model", required=True, help="base model: directory, Hub id or .gguf file (required)")
    p.add_argument("--context", required=True, help="the document: a UTF-8 text file (required)")
    p.add_argument("--queries", help="queries about it: text file (one per line) or JSONL (default: self-study only)")
    p.add_argument("--output", required=True, help="run directory to write (required)")
    p.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens, help="prefix length P (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate, AdamW, cosine after warmup (default: %(default)s)")
    p.add_argument("--self-study", type=int, help="questions to generate about the document (default: 256 without "
                   "--queries, 0 with them)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="teacher logits kept per answer token (default: %(default)s)")
    p.add_argument("--answer-tokens", type=int, default=d.answer_tokens, help="longest teacher answer (default: %(default)s)")
    p.add_argument("--question-tokens", type=int, default=d.question_tokens, help="longest self-study question "
                   "(default: %(default)s)")
    p.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, help="document tokens in view while a self-study "
                   "question is written (default: %(default)s)")
    p.add_argument("--max-context-tokens", type=int, help="longest window the teacher sees; longer documents are cut "
                   "into windows (default: the model's position range less room for query and answer)")
    p.add_argument("--init", choices=["context", "vocab"], default=d.init, help="context = the key/values of the "
                   "document's first P tokens; vocab = of sampled vocabulary tokens (default: %(default)s)")
    p.add_argument("--freeze-first", type=int, default=d.freeze_first, help="prefix slots kept at their start as an "
                   "attention sink (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="share of the queries held out for "
                   "the eval loss (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between eval losses (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="self-study and data-order seed (default: %(default)s)")
    p.add_argument("--save-format", choices=["prefix", "cartridge"], default=d.save_format, help="adapter/ in peft's "
                   "prefix-tuning format or peft's CARTRIDGE format (num_frozen_tokens = --freeze-first); prefixtune "
                   "loads both (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def train(argv: list[str]) -> int:
    from ..adapter_io import RUN_FINAL, RUN_MARKER, write_text_atomic
    from ..loading import load_model
    from ..model import PrefixModel
    from ..training import distill as D
    from ..training import selfstudy as S
    from ..training.loop import plot_curves

    args = vars(_train_parser().parse_args(argv))
    args.pop("task")
    cfg = D.DistillConfig(**args)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    text = S.read_context(cfg.context)
    queries = S.read_queries(cfg.queries) if cfg.queries else None
    t0 = time.time()
    base, tok = load_model(cfg.model)
    model = PrefixModel(base)
    doc = S.build_document(tok, text, D.max_context(base, cfg))
    examples = D.prepare(model, tok, doc, cfg, queries)
    with open(out / "data.jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps({k: e[k] for k in ("query", "answer", "window", "source")}) + "\n")
    D.add_student(model, doc, cfg)
    summary = D.fit(model, tok, examples, cfg, out)
    model.save_adapter(out / RUN_FINAL, "default", format=cfg.save_format)
    plot_curves(out)
    info = {"task": "distill", "context": str(cfg.context), "context_tokens": doc.context_len,
            "windows": len(doc.windows), "num_virtual_tokens": cfg.num_virtual_tokens, "top_k": cfg.top_k,
            "max_context_tokens": D.max_context(base, cfg), "answer_tokens": cfg.answer_tokens}
    write_text_atomic(out / "task.json", json.dumps(info, indent=2))
    summary.update(info, seconds=round(time.time() - t0, 1), adapter=str(out / RUN_FINAL))
    write_text_atomic(out / RUN_MARKER, json.dumps({"config": D.config_dict(cfg), "summary": summary}, indent=2, default=str))
    print(json.dumps(summary))
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefixtune eval --task distill",
                                description="Score a knowledge prefix against its teacher (the model with the document "
                                "in view) on held-out queries: KL and greedy agreement, with no-context and "
                                "truncated-context baselines; writes eval.json.")
    p.add_argument("--task", choices=["distill"], required=True)
    p.add_argument("--model", required=True, help="base model: directory, Hub id or .gguf file (required)")
    p.add_argument("--adapter", required=True, help="the adapter, or the run directory `train --output` wrote (required)")
    p.add_argument("--best", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--context", required=True, help="the document the prefix was distilled from (required)")
    p.add_argument("--queries", required=True, help="held-out queries: text (one per line) or JSONL (required)")
    p.add_argument("--output", help="where eval.json goes (default: <adapter>/eval)")
    p.add_argument("--answer-tokens", type=int, help="longest teacher answer (default: the run's, else 48)")
    p.add_argument("--max-context-tokens", type=int, help="teacher window (default: the run's, else as train)")
    p.add_argument("--batch-size", type=int, default=8, help="queries per forward (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def evaluate(argv: list[str]) -> int:
    from ..adapter_io import write_text_atomic
    from ..loading import load_model
    from ..model import PrefixModel
    from ..training import distill as D
    from ..training import distill_eval as E
    from ..training import selfstudy as S
    from .adapter_args import read_task_info, resolve_adapter

    args = _eval_parser().parse_args(argv)
    args.adapter = resolve_adapter(args)
    info = read_task_info(args.adapter)
    text, queries = S.read_context(args.context), S.read_queries(args.queries)
    base, tok = load_model(args.model)
    model = PrefixModel(base)
    model.load_adapter(args.adapter, "default")
    answer_tokens = args.answer_tokens or info.get("answer_tokens") or 48
    cfg = D.DistillConfig(answer_tokens=answer_tokens, max_context_tokens=args.max_context_tokens or info.get("max_context_tokens"))
    doc = S.build_document(tok, text, D.max_context(base, cfg))
    result = E.evaluate(model, tok, doc, queries, answer_tokens=answer_tokens, batch_size=args.batch_size,
                        progress=args.progress)
    out = Path(args.output or Path(args.adapter) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(result, indent=2))
    print(E.format_report(result))
    print(f"wrote {out / 'eval.json'}")
    return 0


def main(command: str, argv: list[str]) -> int:
    return {"train": train, "eval": evaluate}[command](argv)


def wants_distill(argv: list[str]) -> bool:
    """`train`/`eval` with --task distill (either spelling)."""
    return bool(argv) and argv[0] in ("train", "eval") and (
        any(a == "--task=distill" for a in argv) or any(a == "--task" and b == "distill" for a, b in zip(argv, argv[1:]))
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
