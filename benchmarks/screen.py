"""Screening: variants of our prefix on one (unscored) split, before the multi-split runs of quality.py.

    python benchmarks/screen.py 'd20=0.01={}' 'p64=0.01={"num_virtual_tokens":64}' 'drop=0.01={"dropout":0.1}' \
        'fs3=0.01={"fewshot":3,"num_virtual_tokens":120}' 'LoRA=0.001={}'

Each spec is NAME=LR=JSON (PrefixConfig fields; "fewshot": N starts the prefix from the text of N training tweets
with their labels, one label at a time, as init="text"; "init": "examples" starts it as `prefixtune train` does;
"ema": D evaluates a moving average of the weights with decay D, as `prefixtune train --ema D`; a NAME containing LoRA
runs quality.py's LoRA r=8).
Same loop, batches and scorer as quality.py; 300 steps x 8 on the seed-0 split, 600 held-out by default.
One JSON line per run is appended to --out (results: benchmarks/results/quality300/screen-seed0.jsonl).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import quality as q  # noqa: E402

import prefixtune as pt  # noqa: E402
from prefixtune.training import data  # noqa: E402


def fewshot_text(train_ds, n: int) -> str:
    """n short training tweets with their labels, a label at a time, from the end of the training rows."""
    picked = []
    for r in reversed(list(train_ds)):
        if r["sentiment"] == q.LABELS[len(picked) % 3] and len(r["text"]) < 140:
            picked.append(q.TEMPLATE.format(text=r["text"]) + r["sentiment"] + "\n\n")
        if len(picked) == n:
            break
    return "".join(picked)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="+")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--eval", type=int, default=600)
    p.add_argument("--out", default="runs/screen.jsonl")
    args = p.parse_args()
    base, tok, csv = q.load_base()
    train_ds, eval_ds = q.balanced_split(csv, args.train, args.eval, args.seed)
    train_tok, _ = data.tokenize_dataset(train_ds, tok, "classify", is_encoder_decoder=False, text_column="text",
                                         label_column="sentiment", label_words=q.LABELS, prompt_template=q.TEMPLATE,
                                         max_length=96)
    for spec in args.spec:
        name, lr, kw = spec.split("=", 2)
        kw = json.loads(kw)
        ema = kw.pop("ema", 0.0)
        if kw.get("fewshot"):
            kw.update(init="text", init_text=fewshot_text(train_ds, kw.pop("fewshot")))
        if "LoRA" in name:
            build = q.peft_lora
        elif kw.get("init") == "examples":  # as `prefixtune train` starts it (initialize.example_token_ids)
            build = q.examples_init(**kw)
        else:
            kw.setdefault("init_text", q.TASK_TEXT)
            build = lambda b, t, rows, kw=kw: pt.attach(b, pt.PrefixConfig(**kw), tokenizer=t)  # noqa: E731
        t0 = time.time()
        r = q.run_variant(name, build, float(lr), base, tok, train_tok, eval_ds, args, ema=ema)
        r.update(name=name, spec=spec, seed=args.seed, eval=args.eval, wall=time.time() - t0)
        print("RESULT", name, lr, [(c[0], round(c[1], 3)) for c in r["curve"]], flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
