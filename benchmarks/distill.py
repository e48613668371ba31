"""Knowledge prefixes on a real model and a real document (issue 27): held-out KL and agreement vs baselines.

    python benchmarks/distill.py                      # SmolLM2-135M-Instruct on CPU, h11's README
    python benchmarks/distill.py --steps 20 --sizes 32

Document: h11 0.16.0's README, the long description in the installed wheel's METADATA (2,101 tokens).
Training questions: self-study, seed 0; held-out questions: self-study, seed 1, minus any training question.
For each P: a prefix distilled with top-k KL, scored on the held-out questions against the teacher (the model
with the whole README in view): KL and teacher-forced greedy agreement (training/distill_eval.py), beside
no-context and truncated-context (first P tokens) baselines. Composition: prefixes distilled from the two halves
of the README (teacher: that half in view), composed, against each alone and the whole-document prefix of the
same total length. Teacher data is cached (--cache) so a rerun only trains and scores.

Results: benchmarks/results/distill.json and distill.md (with the machine's load average).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import add_device_args, check_device_args  # noqa: E402

from prefixtune.loading import load_model  # noqa: E402
from prefixtune.model import PrefixModel  # noqa: E402
from prefixtune.training import distill as D  # noqa: E402
from prefixtune.training import distill_eval as E  # noqa: E402
from prefixtune.training import selfstudy as S  # noqa: E402
from prefixtune.training.distill_config import DistillConfig  # noqa: E402
from prefixtune.training.distill_run import distill  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TIMES: dict[str, float] = {}  # seconds spent making the prefix: self-study, teacher answers, top-k, training per P
DOC_PACKAGE = "h11"


def say(*a):
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}]", *a, flush=True)


def data(model, tok, doc, args) -> tuple[list[dict], list[dict]]:
    cache = Path(args.cache)
    if cache.is_file():
        say(f"teacher data from {cache}")
        return torch.load(cache, weights_only=False)
    cfg = DistillConfig(question_tokens=args.question_tokens, chunk_tokens=args.chunk_tokens, progress=False)
    t = time.time()
    train = S.self_study(model, tok, doc, args.train_questions, seed=0, chunk_tokens=cfg.chunk_tokens,
                         question_tokens=cfg.question_tokens, say=say, progress=False)
    TIMES["self_study_train"] = round(time.time() - t, 1)
    seen = {e["query"] for e in train}
    held = [e for e in S.self_study(model, tok, doc, args.heldout_questions, seed=1,
                                    chunk_tokens=cfg.chunk_tokens, question_tokens=cfg.question_tokens, say=say,
                                    progress=False) if e["query"] not in seen]
    D.teacher_adapters(model, doc)
    t = time.time()
    D.teacher_answers(model, tok, train + held, args.answer_tokens, batch_size=8, progress=False)
    TIMES["teacher_answers_train_and_heldout"] = round(time.time() - t, 1)
    say(f"teacher answers: {len(train) + len(held)} in {time.time() - t:.0f}s")
    t = time.time()
    D.teacher_topk(model, tok, train, args.top_k, progress=False)
    TIMES["teacher_topk_train"] = round(time.time() - t, 1)
    say(f"teacher top-{args.top_k}: {time.time() - t:.0f}s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save((train, held), cache)
    return train, held


def train_prefix(model, tok, doc, examples, P, name, args) -> float:
    """Distil `examples` into adapter `name` with `prefixtune distill`'s own run (training/distill_run.py)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "doc.txt").write_text(tok.decode(doc.body))  # the run records it; the student starts from doc
        cfg = DistillConfig(model=args.model, context=[str(Path(tmp) / "doc.txt")], output=str(Path(tmp) / "run"),
                            num_virtual_tokens=P, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            eval_fraction=0.0, top_k=args.top_k, max_context_tokens=doc.context_len + 1,
                            eval_every=args.steps, save_every=None, progress=False)
        t = time.time()
        distill(cfg, model, tok, examples=examples)
        secs = time.time() - t
        model.delete_adapter("default")
        model.load_adapter(Path(tmp) / "run" / "adapter", name)
    return secs


def half(doc: S.Document, lo: int, hi: int) -> S.Document:
    return S.Document(doc.header, doc.body[lo:hi], [(0, hi - lo)], doc.layout)


def train_halves(model, tok, doc, train, args) -> list[int]:
    """Prefixes `half-first` / `half-second` from the two halves (teacher: that half in view)."""
    mid = len(doc.body) // 2
    P = args.compose_p
    names = []
    for tag, (lo, hi) in (("first", (0, mid)), ("second", (mid, len(doc.body)))):
        part = half(doc, lo, hi)
        rows = [copy.copy(e) for e in train if lo <= e["chunk"][0] < hi]
        for e in rows:
            e["window"] = 0
        D.teacher_adapters(model, part)  # context-0 = this half
        D.teacher_topk(model, tok, rows, args.top_k, progress=False)
        secs = train_prefix(model, tok, part, rows, P, f"half-{tag}", args)
        say(f"half {tag}: {len(rows)} questions, P={P}, {secs:.0f}s")
        names.append(len(rows))
    D.teacher_adapters(model, doc)  # the held-out teacher: the whole document again
    return names


def markdown(report: dict) -> str:
    r = report
    lines = [f"# Knowledge prefixes: {r['model']} on {r['document']}", "",
             f"Context {r['context_tokens']} tokens; {r['train_questions']} self-study training questions (seed 0), "
             f"{r['heldout_questions']} held-out (seed 1), teacher answers up to {r['answer_tokens']} tokens "
             f"({r['heldout_answer_tokens']} held-out answer tokens); top-{r['top_k']} KL, {r['steps']} steps x batch "
             f"{r['batch_size']}, lr {r['lr']}. CPU; the load average at each row is in the JSON; figures come from quiet-run.", "",
             "| P | P / context | prefix KL | prefix agreement | truncated KL | truncated agreement | no-context KL | "
             "no-context agreement | gap recovered | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["sizes"]:
        lines.append(f"| {row['P']} | 1/{r['context_tokens'] / row['P']:.0f} | {row['prefix']['kl']:.3f} | "
                     f"{row['prefix']['agreement']:.3f} | {row['truncated']['kl']:.3f} | "
                     f"{row['truncated']['agreement']:.3f} | {row['no_context']['kl']:.3f} | "
                     f"{row['no_context']['agreement']:.3f} | {row['gap_recovered']:.1%} | {row['train_seconds']:.0f} |")
    if "composition" in r:
        c = r["composition"]
        lines += ["", f"Composition (P = {c['P_each']} per half; half-teacher training questions {c['train_questions']}):",
                  "", "| method | KL | agreement |", "|---|---|---|"]
        lines += [f"| {m} | {v['kl']:.3f} | {v['agreement']:.3f} |" for m, v in c["results"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct via prefixtune's assets)")
    p.add_argument("--sizes", default="32,128,512")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--train-questions", type=int, default=120)
    p.add_argument("--heldout-questions", type=int, default=260, help="held-out drafts (seed 1); duplicates and "
                   "training questions are dropped, leaving 200+ on SmolLM2")
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--question-tokens", type=int, default=24)
    p.add_argument("--chunk-tokens", type=int, default=DistillConfig.__dataclass_fields__["chunk_tokens"].default,
                   help="self-study chunk size (default: DistillConfig's)")
    p.add_argument("--compose-p", type=int, default=64, help="P of each half's prefix (0: skip composition)")
    p.add_argument("--cache", default="/tmp/prefixtune-distill-bench/data.pt")
    p.add_argument("--out", default=str(RESULTS / "distill"))
    add_device_args(p)
    args = p.parse_args()
    dtype = check_device_args(p, args)
    torch.manual_seed(0)
    if args.model is None:
        from prefixtune.cli.assets import smollm2_dir

        args.model = str(smollm2_dir())
    base, tok = load_model(args.model, dtype=dtype, device=args.device)
    model = PrefixModel(base)
    text = importlib.metadata.metadata(DOC_PACKAGE).get_payload()
    doc = S.build_document(tok, text, 8000)
    say(f"document: {DOC_PACKAGE} {importlib.metadata.version(DOC_PACKAGE)} README, {doc.context_len} tokens")
    train, held = data(model, tok, doc, args)
    D.teacher_adapters(model, doc)
    report = {"model": Path(args.model).name, "device": args.device, "dtype": args.dtype,
              "document": f"{DOC_PACKAGE} {importlib.metadata.version(DOC_PACKAGE)} "
              "README (wheel METADATA long description)", "context_tokens": doc.context_len,
              "train_questions": len(train), "heldout_questions": len(held),
              "heldout_answer_tokens": sum(len(e["answer_ids"]) for e in held), "answer_tokens": args.answer_tokens,
              "top_k": args.top_k, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "sizes": [],
              "examples": [{k: e[k] for k in ("query", "answer")} for e in held[:5]]}

    def write():
        RESULTS.mkdir(exist_ok=True)
        report["loadavg_end"] = os.getloadavg()
        report["make_seconds"] = TIMES  # empty when the teacher data came from --cache
        Path(args.out + ".json").write_text(json.dumps(report, indent=2))
        Path(args.out + ".md").write_text(markdown(report))

    # Each prefix is scored right after it trains (results written as they come); no-context is scored once.
    sizes = [int(x) for x in args.sizes.split(",")]
    base_res = None
    for P in sizes:
        secs = train_prefix(model, tok, doc, train, P, f"p{P}", args)
        S.context_adapter(model, f"truncated-{P}", doc.window_ids(0)[:P])
        methods = {"prefix": f"p{P}", "truncated": f"truncated-{P}", **({} if base_res else {"no_context": None})}
        t = time.time()
        res = E.score(model, tok, held, methods, progress=False)
        base_res = base_res or res.pop("no_context")
        gap = base_res["kl"]
        report["sizes"].append({"P": P, **res, "no_context": base_res, "gap_recovered": (gap - res["prefix"]["kl"]) / gap,
                                "train_seconds": secs, "score_seconds": time.time() - t, "loadavg": os.getloadavg()})
        say(f"P={P}", json.dumps(report["sizes"][-1]))
        write()
    if args.compose_p:
        counts = train_halves(model, tok, doc, train, args)
        comp = E.score(model, tok, held, {"first half alone": "half-first", "second half alone": "half-second",
                                          "halves composed": ["half-first", "half-second"]}, progress=False)
        comp["no_context"] = base_res
        whole = next((r for r in report["sizes"] if r["P"] == 2 * args.compose_p), None)
        if whole:
            comp[f"whole document, P={2 * args.compose_p}"] = whole["prefix"]
        report["composition"] = {"P_each": args.compose_p, "train_questions": counts, "results": comp}
        write()
    say(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
