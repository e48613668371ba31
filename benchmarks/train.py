"""Training benchmark: prefixtune vs peft prefix tuning, same model, data, batches, steps and seed, in one run.

    python benchmarks/train.py [--steps 20 --warmup 2 --batch 8 --train 400 --eval 150] [--random]
                               [--device cuda --dtype bfloat16] [--only abcf]

Variants (each in its own subprocess, so peak memory is its own):
  (a) prefixtune, trainer path: what `prefixtune train` does per step: the loop's data path (load_run_data,
      length-grouped batches, PadCollator dynamic padding) and its loss (LossModule: logits at label positions only)
  (b) peft prefix tuning, seed-style: every batch padded to max_length 128, `model(**batch).loss` (full-vocab logits
      at every position), which is what the seed scripts do
  (c) prefixtune engine, seed-style: (b)'s data and loss on prefixtune's engine (isolates engine from data path)
  (f) the floor: the frozen base model's forward plus the input-only backward on (a)'s batches, with the prefix
      as bare leaf key/values in a plain transformers DynamicCache (gradients reach only them, none the weights),
      the LM head only at label positions; no prefix encoder, no optimizer. The least any prefix trainer must
      spend per step; (a) over (f) is our overhead (target <= 1.15x). It trains nothing, so it has no accuracy.
      With both (a) and (f) selected, a third process also times them alternately step by step on the same
      batches: the ratio printed against the target, robust to a shared machine's load drifting between runs.
All of them run on the same batches (same examples per step, same order) with AdamW lr 1e-2, grad clip 1.0;
`--warmup` steps are trained but not timed. Accuracy: rank classification over the label words' first token at
the last prompt position, one function (a plain forward) for all three, on the same held-out rows.

Model/data: SmolLM2-135M-Instruct on the tweet-sentiment CSV (prefixtune.cli.assets, cached after the first fetch);
with --random or when the assets cannot be had, a random-init Llama (12 layers, hidden 768, GQA 12/4 heads,
vocab 32000) with generated word-level data (its accuracy means little; the timings do).
Memory: CUDA max_memory_allocated; on CPU the growth of peak RSS (ru_maxrss) from just before the first step to
after the last one (0 when loading the model peaked higher than training).
Targets: (a) step time <= 0.6x (b) and <= 1.15x (f).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_device_args, check_device_args, peak_mb, rank_accuracy, sync

from prefixtune.training import data as D
from prefixtune.training.config import TrainConfig
from prefixtune.training.loop import LossModule
from prefixtune.training.sources import load_run_data

TEMPLATE = "Tweet: {text}\nSentiment (negative, neutral or positive): "
LABELS = ["negative", "neutral", "positive"]
VARIANTS = {
    "a": "prefixtune, trainer path (dynamic pad, length-grouped, label-only logits)",
    "b": "peft prefix, seed-style (pad to 128, full logits)",
    "c": "prefixtune engine, seed-style (pad to 128, full logits)",
    "f": "floor: frozen forward + input-only backward, label-only logits",
}


# ----------------------------------------------------------------------------- model + data

def random_assets(tmp: Path, n_rows: int, seed: int):
    """A random-init GQA Llama, a word-level tokenizer and a generated sentiment CSV (learnable from cue words)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cues = {"negative": "bad awful hated terrible sad angry".split(), "neutral": "okay average plain usual normal so-so".split(),
            "positive": "great good loved wonderful happy fine".split()}
    filler = "the a movie film plot acting day phone game food trip show today it was is this that really very".split()
    words = sorted({*filler, *(w for ws in cues.values() for w in ws), *LABELS,
                    *"tweet sentiment negative , neutral or positive ( ) : .".split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", "<bos>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0, eos_token_id=2, bos_token_id=3)
    model = LlamaForCausalLM(cfg).eval()
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        lab = rng.choice(LABELS)
        text = " ".join(rng.choice(filler) for _ in range(rng.randint(8, 60)))
        pos = rng.randint(0, len(text.split()))
        t = text.split()
        t.insert(pos, rng.choice(cues[lab]))
        rows.append({"sentiment": lab, "text": " ".join(t)})
    csv = tmp / "random_tweets.jsonl"
    csv.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, tok, str(csv)


def load_assets(args, tmp: Path):
    """-> (base model, tokenizer, data file, description). Falls back to the random setup."""
    if not args.random:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from prefixtune.cli import assets

            d = assets.smollm2_dir()
            csv = str(assets.tweets_csv())
            return (AutoModelForCausalLM.from_pretrained(d, dtype=args.torch_dtype).eval(), AutoTokenizer.from_pretrained(d),
                    csv, "SmolLM2-135M-Instruct, tweet sentiment")
        except Exception as e:  # noqa: BLE001 - any failure to get the assets means: use the fallback
            print(f"  (assets unavailable: {type(e).__name__}: {str(e)[:200]}; using the random-init Llama)", flush=True)
    model, tok, csv = random_assets(tmp, args.train + args.eval + 200, args.seed)
    return model, tok, csv, "random-init Llama 12x768 GQA, generated data"


# ----------------------------------------------------------------------------- scoring (same for every variant)

def prepare(args):
    """-> (base, tokenizer, tokenized train rows, raw eval rows, batch order, description): the same for every variant."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base, tok, source, what = load_assets(args, tmp)
    base.to(args.device, args.torch_dtype)
    cfg = TrainConfig(model="bench", train=source, task="classify", output=str(tmp / "out"), text_column="text",
                      label_column="sentiment", label_words=LABELS, prompt_template=TEMPLATE, max_length=args.max_length,
                      max_train_examples=args.train, max_eval_examples=args.eval, batch_size=args.batch, seed=args.seed,
                      lr=args.lr, max_steps=args.warmup + args.steps)
    data = load_run_data(cfg, tok, "causal")  # the training loop's data path: same rows for every variant
    train_tok, eval_raw = data.train, data.eval_raw
    lengths = [len(x) for x in train_tok["input_ids"]]
    order = D.length_grouped_batches(lengths, args.batch, args.seed)
    order = [order[i % len(order)] for i in range(args.warmup + args.steps)]
    return base, tok, train_tok, eval_raw, order, what


def make_step(args, variant, base, tok, train_tok):
    """-> (model, trainable params, step(batch indices) -> (loss, real tokens, computed tokens)) for one variant."""
    import prefixtune as pt

    torch.manual_seed(args.seed)
    opt = None
    if variant == "b":
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix))
    elif variant != "f":
        model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=args.prefix), tokenizer=tok)
    if variant == "f":
        collate = D.PadCollator(tok, is_encoder_decoder=False)  # (a)'s batches
        params, loss_fn = floor_prefix(base, args.prefix, args.seed)
        model = base
    elif variant == "a":
        collate = D.PadCollator(tok, is_encoder_decoder=False)  # as train.py: dynamic padding
        lossmod = LossModule(model)  # as train.py: token_nll over the label positions only
        loss_fn = lambda b: lossmod(b)  # noqa: E731
    else:  # seed-style: padding="max_length", full logits, plain .loss
        collate = D.PadCollator(tok, pad_to_multiple_of=args.max_length, padding_side="right", is_encoder_decoder=False)
        loss_fn = lambda b: model(**b).loss  # noqa: E731
    if variant != "f":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def step(idx):
        batch = {k: v.to(args.device) for k, v in collate([train_tok[i] for i in idx]).items()}
        loss = loss_fn(batch)
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:  # the floor: gradients computed, nothing updated
            for p in params:
                p.grad = None
        return loss.item(), int(batch["attention_mask"].sum()), batch["input_ids"].numel()

    return model, params, step


def run_variant(args) -> dict:
    base, tok, train_tok, eval_raw, order, what = prepare(args)
    model, params, step = make_step(args, args.variant, base, tok, train_tok)
    model.train()
    sync(args.device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, losses, real, padded = [], [], 0, 0
    for i, idx in enumerate(order):
        t0 = time.perf_counter()
        loss, n_real, n_pad = step(idx)
        sync(args.device)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= args.warmup:
            times.append(dt)
            real, padded = real + n_real, padded + n_pad
        print(f"  [{args.variant}] step {i + 1}/{len(order)}{' (warm-up)' if i < args.warmup else ''} "
              f"loss {loss:.3f} {dt:.2f}s", flush=True)
    mem = peak_mb(args.device, rss0)
    acc = None
    if args.variant != "f":
        t = time.perf_counter()
        acc = rank_accuracy(model, tok, [TEMPLATE.format(text=t) for t in eval_raw["text"]],
                            [LABELS.index(x) for x in eval_raw["sentiment"]], LABELS, args.device)
        print(f"  [{args.variant}] held-out accuracy {acc:.3f} ({len(eval_raw)} rows, {time.perf_counter() - t:.0f}s)", flush=True)
    total = sum(times)
    # median: robust to other jobs on a shared machine; tokens/s = real (non-pad) tokens over the mean step time
    return {"what": what, "s_per_step": sorted(times)[len(times) // 2], "mean_s_per_step": total / len(times),
            "tokens_per_s": real / total, "padded_tokens_per_step": padded / len(times),
            "real_tokens_per_step": real / len(times), "peak_mb": mem, "accuracy": acc, "n_eval": len(eval_raw),
            "final_loss": sum(losses[-5:]) / len(losses[-5:]), "trainable": sum(p.numel() for p in params)}


def run_paired(args) -> dict:
    """(a) and (f) step by step in one process on the same batch, alternating which goes first: their ratio
    holds on a machine whose load drifts between the separate runs (memory is theirs, not measured here)."""
    base, tok, train_tok, _, order, _ = prepare(args)
    model, _, ours = make_step(args, "a", base, tok, train_tok)
    _, _, floor = make_step(args, "f", base, tok, train_tok)
    model.train()
    ratios = []
    for i, idx in enumerate(order):
        dt = {}
        for name, fn in (("a", ours), ("f", floor))[:: 1 if i % 2 == 0 else -1]:
            sync(args.device)
            t0 = time.perf_counter()
            fn(idx)
            sync(args.device)
            dt[name] = time.perf_counter() - t0
        if i >= args.warmup:
            ratios.append(dt["a"] / dt["f"])
        print(f"  [paired] step {i + 1}/{len(order)} (a) {dt['a']:.2f}s (f) {dt['f']:.2f}s", flush=True)
    return {"ratio": sorted(ratios)[len(ratios) // 2], "ratios": ratios}


def floor_prefix(base, n_prefix: int, seed: int):
    """-> (leaf prefix key/values, loss(batch)) for variant (f), in plain transformers + torch (none of our code).

    Per layer one [kv_heads, P, head_dim] key and value leaf, expanded over the batch into a DynamicCache (a cat
    per layer, as any cache-based prefix needs); positions and mask cover the prefix; the body's last hidden
    state goes through the LM head only where a label is, as (a)'s loss does. The weights are frozen (attach()
    is not called here, so freeze them explicitly): backward computes input gradients only.
    """
    from transformers import DynamicCache

    for p in base.parameters():
        p.requires_grad_(False)
    cfg = base.config
    kv, hd = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dev, dtype = base.device, base.dtype
    g = torch.Generator().manual_seed(seed)
    leaves = [(torch.randn(kv, n_prefix, hd, generator=g).to(dev, dtype).requires_grad_(),
               torch.randn(kv, n_prefix, hd, generator=g).to(dev, dtype).requires_grad_())
              for _ in range(cfg.num_hidden_layers)]
    body, head = getattr(base, base.base_model_prefix), base.get_output_embeddings()

    def loss(batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        b = ids.shape[0]
        cache = DynamicCache()
        for i, (k, v) in enumerate(leaves):
            cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
        full = torch.cat([mask.new_ones(b, n_prefix), mask], dim=1)
        pos = (full.cumsum(-1) - 1).clamp(min=0)[:, n_prefix:]
        hidden = body(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=cache).last_hidden_state
        targets = labels[:, 1:]
        sel = targets != -100
        return torch.nn.functional.cross_entropy(head(hidden[:, :-1][sel]).float(), targets[sel])

    return [t for kv_pair in leaves for t in kv_pair], loss


# ----------------------------------------------------------------------------- driver

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (trained too)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--prefix", type=int, default=20, help="virtual tokens")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--train", type=int, default=400, help="training rows (>= batch x steps covers each once)")
    p.add_argument("--eval", type=int, default=150, help="held-out rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random", action="store_true", help="random-init Llama + generated data instead of SmolLM2 tweets")
    p.add_argument("--only", default="abcf", help="variants to run, e.g. af")
    p.add_argument("--threads", type=int, help="torch CPU threads per variant (1 is faster on a machine shared with other jobs)")
    add_device_args(p)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.torch_dtype = check_device_args(p, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        Path(args.json_out).write_text(json.dumps(run_paired(args) if args.variant == "p" else run_variant(args)))
        return

    results, t_all = {}, time.perf_counter()
    for v in args.only + ("p" if "a" in args.only and "f" in args.only else ""):
        print(f"({v}) {VARIANTS.get(v, 'paired: (a) and (f) alternating, step by step, in one process')}", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        code = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", v, "--json-out", out]).returncode
        if code != 0:
            sys.exit(f"variant {v} failed (exit {code})")
        results[v] = json.loads(Path(out).read_text())
        os.unlink(out)
        took = f"(a)/(f) {results[v]['ratio']:.2f}x" if v == "p" else f"{results[v]['s_per_step']:.3f} s/step"
        print(f"({v}) done: {took}  [{time.perf_counter() - t_all:.0f}s so far]", flush=True)
    paired = results.pop("p", None)

    r0 = next(iter(results.values()))
    ref = results.get("b")
    floor = results.get("f")
    mem_kind = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"\n{r0['what']}: {args.warmup} warm-up + {args.steps} timed steps x batch {args.batch}, {args.prefix} virtual "
          f"tokens, lr {args.lr:g}, seed {args.seed}, {args.device} {args.dtype} ({torch.get_num_threads()} threads), torch "
          f"{torch.__version__}; accuracy on {r0['n_eval']} held-out rows\n")
    print(f"| variant | s/step (median) | tokens/s | tokens per step (real / computed) | {mem_kind} (MiB) | final loss | "
          "held-out acc | step time vs (b) | tokens/s vs (b) | memory vs (b) | step time vs (f) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v, r in results.items():
        ratio = lambda k, to=ref: f"{r[k] / to[k]:.2f}x" if to and to[k] > 0 else "-"  # noqa: E731
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"| ({v}) {VARIANTS[v]} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {r['real_tokens_per_step']:.0f} / "
              f"{r['padded_tokens_per_step']:.0f} | {r['peak_mb']:.0f} | {r['final_loss']:.3f} | {acc} | "
              f"{ratio('s_per_step')} | {ratio('tokens_per_s')} | {ratio('peak_mb')} | {ratio('s_per_step', floor)} |")
    if "a" in results and ref:
        x = results["a"]["s_per_step"] / ref["s_per_step"]
        print(f"\nprefixtune trainer path step time = {x:.2f}x peft seed-style (target <= 0.6x: {'met' if x <= 0.6 else 'NOT met'})")
    if "a" in results and floor:
        x = results["a"]["s_per_step"] / floor["s_per_step"]
        print(f"prefixtune trainer path step time = {x:.2f}x the floor (f), separate runs")
    if paired:
        x = paired["ratio"]
        print(f"prefixtune trainer path step time = {x:.2f}x the floor (f), paired step by step (median of "
              f"{', '.join(f'{r:.2f}' for r in paired['ratios'])}; target <= 1.15x: {'met' if x <= 1.15 else 'NOT met'})")
    if "c" in results and ref:
        print(f"PrefixModel alone (same seed-style data path) = {results['c']['s_per_step'] / ref['s_per_step']:.2f}x peft")
    print(f"total {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
