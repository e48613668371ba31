"""`prefixtune distill` and `prefixtune distill-eval` (knowledge prefixes).

`distill` flags are generated from DistillConfig (cli/flags.py) and the run goes through training/distill_run.py on
the training loop's parts; `distill-eval` scores a knowledge prefix against its teacher (training/distill_eval.py).
`train --task distill` / `eval --task distill` stop with a one-line pointer here (training/config.py MOVED_TASKS).

A run directory (--output) holds: adapter/ (peft prefix or CARTRIDGE format, with task.json: the layout requests are
rendered in), best/, run.json, task.json, examples.pt, data.jsonl, metrics.jsonl, loss_curve.png, eval.json;
distill-eval writes eval.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_distill(sub) -> None:
    from ..training.distill_config import DistillConfig
    from .flags import add_config_flags

    p = sub.add_parser("distill", help="distil a document into a knowledge prefix",
                       description="Distil a document into a P-token prefix (teacher: the model with the document as "
                       "its system message; student: the prefix instead; loss: top-k KL on the teacher's answers to "
                       "self-study and given questions).")
    add_config_flags(p, DistillConfig)
    p.set_defaults(fn=cmd_distill)


def cmd_distill(args) -> int:
    from ..training.distill_config import DistillConfig
    from ..training.distill_run import distill
    from .flags import config_from_flags

    summary, _ = distill(config_from_flags(args, DistillConfig))
    print(json.dumps(summary))
    return 0


def add_distill_eval(sub) -> None:
    p = sub.add_parser("distill-eval", help="score a knowledge prefix against its teacher",
                       description="Score a knowledge prefix against its teacher (the model with the document in "
                       "view) on held-out queries: KL and greedy agreement, with no-context and truncated-context "
                       "baselines; writes eval.json.")
    p.add_argument("--model", required=True, help="base model: directory, Hub id or .gguf file (required)")
    p.add_argument("--adapter", required=True, help="the adapter, or the run directory `distill --output` wrote "
                   "(its final adapter/; --best for best/) (required)")
    p.add_argument("--best", action="store_true", help="with a run directory as --adapter: its best/ adapter (lowest "
                   "held-out KL) instead of the final one (default: the final adapter)")
    p.add_argument("--context", required=True, action="extend", nargs="+", help="the document(s) the prefix was "
                   "distilled from, as given to distill (required)")
    p.add_argument("--queries", required=True, help="held-out queries: text (one per line) or JSONL (required)")
    p.add_argument("--output", help="where eval.json goes (default: <adapter>/eval)")
    p.add_argument("--answer-tokens", type=int, help="longest teacher answer (default: the run's, else 48)")
    p.add_argument("--max-context-tokens", type=int, help="teacher window (default: the run's, else as distill)")
    p.add_argument("--batch-size", type=int, default=8, help="queries per forward (default: %(default)s)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars "
                   "(default: --progress)")
    p.set_defaults(fn=cmd_distill_eval)


def cmd_distill_eval(args) -> int:
    from ..adapter_io import write_text_atomic
    from ..loading import load_model
    from ..model import PrefixModel
    from ..training import distill as D
    from ..training import distill_eval as E
    from ..training import selfstudy as S
    from .adapter_args import read_task_info, resolve_adapter

    adapter = Path(resolve_adapter(args))
    info = read_task_info(str(adapter))
    text, queries = S.read_context(args.context), S.read_queries(args.queries)
    base, tok = load_model(args.model)
    model = PrefixModel(base)
    model.load_adapter(adapter, "default")
    answer_tokens = args.answer_tokens or info.get("answer_tokens") or 48
    cfg = D.DistillConfig(answer_tokens=answer_tokens, max_context_tokens=args.max_context_tokens or info.get("max_context_tokens"))
    doc = S.build_document(tok, text, D.max_context(base, cfg))
    result = E.evaluate(model, tok, doc, queries, answer_tokens=answer_tokens, batch_size=args.batch_size,
                        progress=args.progress)
    out = Path(args.output or adapter / "eval")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(result, indent=2))
    print(E.format_report(result))
    print(f"wrote {out / 'eval.json'}")
    return 0
