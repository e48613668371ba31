"""A quantized frozen base vs the full-precision one: the same prefix run (`prefixtune train --quantize`) on each.

    python benchmarks/quantized.py [--steps 12 --batch 4 --train 200 --eval 48 --threads 2] [--only full,8bit,4bit]
                                   [--random] [--device cuda --dtype bfloat16] [--output benchmarks/results/quantized.md]

Variants, each in its own subprocess (its peak memory is its own): full (--precision weights as loaded), 8bit and
4bit (optimum-quanto through transformers' QuantoConfig: every Linear but the LM head stored in int8 / int4).
Each trains the same prefix (20 virtual tokens, same rows, seed and steps) through training.loop.fit, then reports:
  weights MiB      the base model's parameter storage (a quantized tensor counted by its own int data and scales)
  peak MiB         CPU: peak RSS of the process (load + train + eval); CUDA: max_memory_allocated
  held-out loss    the run's final eval loss (label tokens, on the base it trained on)
  on full base     the same adapter's held-out loss on the full-precision base (quantized variants): what a user
                   who trains on the small base and serves on the full one gets
  tokens/s         mean training throughput (the run's metrics.jsonl, after the first step)
Model/data: SmolLM2-135M-Instruct on the tweet sentiment CSV (prefixtune.cli.assets, cached); --random or no
assets: a random-init 4-layer Llama with generated data (timings and memory only).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_device_args, check_device_args

HERE = Path(__file__).resolve().parent
VARIANTS = ("full", "8bit", "4bit")
TEMPLATE = "Tweet: {text}\nSentiment (negative, neutral or positive): "
LABELS = ["negative", "neutral", "positive"]


def storage_bytes(model) -> int:
    """Parameter bytes as stored: a tensor subclass (quanto's int8/int4 weights, whose int4 data is itself a packed
    uint8 tensor subclass) by its inner tensors, recursively."""
    def nbytes(t) -> int:
        if hasattr(t, "__tensor_flatten__"):
            return sum(nbytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()
    return sum(nbytes(p) for p in model.parameters())


def assets(args, tmp: Path) -> tuple[str, str, str]:
    """-> (model directory, data file, description)."""
    if not args.random:
        try:
            from prefixtune.cli import assets as A

            return str(A.smollm2_dir()), str(A.tweets_csv()), "SmolLM2-135M-Instruct, tweet sentiment"
        except Exception as e:  # noqa: BLE001 - any failure to get the assets means: use the fallback
            print(f"  (assets unavailable: {type(e).__name__}: {str(e)[:200]}; using a random-init Llama)", flush=True)
    sys.path.insert(0, str(HERE))
    from train import random_assets

    model, tok, data = random_assets(tmp, args.train + args.eval + 50, 0)
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    return str(tmp / "model"), data, "random-init Llama 4x768 GQA, generated data"


def run_variant(args) -> dict:
    from prefixtune.loading import load_model
    from prefixtune.training import evaluate as E
    from prefixtune.training.config import TrainConfig
    from prefixtune.training.loop import fit

    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    out = Path(args.workdir) / args.variant
    cfg = TrainConfig(model=args.model, train=args.data, task="classify", output=str(out), text_column="text",
                      label_column="sentiment", label_words=LABELS, prompt_template=TEMPLATE, max_length=128,
                      max_train_examples=args.train, max_eval_examples=args.eval, batch_size=args.batch, seed=0,
                      lr=1e-2, max_steps=args.steps, save_every=None, progress=False, precision=precision,
                      prefix={"num_virtual_tokens": 20, "init": "random"},
                      quantize=None if args.variant == "full" else args.variant)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    summary, pm = fit(cfg)
    weights = storage_bytes(pm.base_model)
    peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    tps = [r["tokens_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "tokens_per_s" in r]
    res = {"variant": args.variant, "weights_mib": weights / 2**20, "peak_mib": peak / 2**20,
           "eval_loss": summary["last_eval"]["eval_loss"], "accuracy": summary["last_eval"].get("eval_accuracy"),
           "tokens_per_s": sum(tps[1:]) / (len(tps) - 1) if len(tps) > 1 else None}
    if args.variant != "full":  # the adapter on the full-precision base, the same held-out rows
        import prefixtune as pt
        from prefixtune.training.loop import resolve
        from prefixtune.training.sources import load_run_data

        del pm
        full, tok = load_model(args.model, dtype=args.dtype, device=args.device)
        data = load_run_data(resolve(cfg, "causal").config, tok, "causal", say=lambda *a: None)
        res["on_full_base"] = E.evaluate_loss(pt.load_adapter(full, out / "adapter").eval(), tok, data.eval)["loss"]
    return res


def table(results: list[dict], what: str, args) -> str:
    full = next((r for r in results if r["variant"] == "full"), None)
    lines = [f"{what}; {args.steps} steps of {args.batch}, {args.train} train / {args.eval} held-out rows, "
             f"{args.device} {args.dtype}, {args.threads} thread(s)", "",
             "| base | weights (MiB) | peak memory (MiB) | held-out loss | same adapter on the full base | accuracy | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        rel = f" ({r['weights_mib'] / full['weights_mib']:.2f}x)" if full else ""
        on_full = f"{r['on_full_base']:.4f}" if "on_full_base" in r else "-"
        acc = f"{r['accuracy']:.3f}" if r.get("accuracy") is not None else "-"
        sps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") is not None else "-"
        lines.append(f"| {r['variant']} | {r['weights_mib']:.1f}{rel} | {r['peak_mib']:.0f} | {r['eval_loss']:.4f} | "
                     f"{on_full} | {acc} | {sps} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--eval", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--random", action="store_true", help="a random-init model and generated data (no assets)")
    p.add_argument("--output", default=None, help="also write the table (Markdown) here")
    add_device_args(p)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    check_device_args(p, args)
    torch.set_num_threads(args.threads)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    from prefixtune.extras import require

    require("quant", "benchmarks/quantized.py")
    only = [v.strip() for v in args.only.split(",") if v.strip()]
    if bad := [v for v in only if v not in VARIANTS]:
        p.error(f"--only {','.join(bad)}: choose from {', '.join(VARIANTS)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    model, data, what = assets(args, tmp)
    results = []
    for v in only:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--variant", v, "--model", model, "--data", data, "--workdir", str(tmp),
               *(f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "train", "eval", "threads", "device", "dtype"))]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
        if res.returncode != 0 or line is None:
            sys.exit(f"variant {v} failed:\n{res.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(f"  {v}: {time.perf_counter() - t0:.0f}s", flush=True)
    text = table(results, what, args)
    print(text)
    if args.output:
        from prefixtune.adapter_io import write_text_atomic

        write_text_atomic(Path(args.output), text)


if __name__ == "__main__":
    main()
