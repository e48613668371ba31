"""PrefixModel benchmark: prefixtune vs peft prefix tuning, side by side in one run.

    python benchmarks/prefix_model.py [--layers 12 --hidden 768 --batch 8 --seq 128 --steps 5] [--device cuda --dtype bfloat16]

Train step (forward + backward + AdamW) time and peak memory on a random-init Llama with grouped-query
attention, and greedy generation latency with a prefix vs the bare model. Each variant runs in its own
subprocess so peak memory (CUDA: max_memory_allocated; CPU: peak RSS growth) is not polluted by the others.
Targets: step time <= 1.0x peft; generation with a prefix <= 1.05x the bare model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import add_device_args, check_device_args, peak_mb, sync


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 64 // 4), max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).to(args.device, args.torch_dtype).eval()


def run_variant(args) -> dict:
    base = build(args)
    ids = torch.randint(100, 32000, (args.batch, args.seq), device=args.device)
    if args.variant in ("prefixtune", "peft"):
        if args.variant == "prefixtune":
            import prefixtune as pt

            model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=args.prefix))
        else:
            from peft import PrefixTuningConfig, get_peft_model

            model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before any step: weights only
        step()  # warm-up
        sync(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(args.device)
        return {"step_s": (time.perf_counter() - t) / args.steps, "peak_mb": peak_mb(args.device, rss0)}
    # generation latency: bare vs prefixtune prefix, greedy, batch 1
    import prefixtune as pt

    prompt = ids[:1, :32]
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=args.prefix)).eval()
    names = {"gen-bare": None, "gen-prefix": "default"}[args.variant]
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    model.generate(input_ids=prompt, adapter_names=[names], **kw)
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t = time.perf_counter()
        model.generate(input_ids=prompt, adapter_names=[names], **kw)
        sync(args.device)
        times.append(time.perf_counter() - t)
    return {"gen_s": sorted(times)[len(times) // 2]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prefix", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    add_device_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch default)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.torch_dtype = check_device_args(p, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("peft", "prefixtune", "gen-bare", "gen-prefix"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant}: {results[variant]}", file=sys.stderr)
    pe, pt_ = results["peft"], results["prefixtune"]
    gb, gp = results["gen-bare"]["gen_s"], results["gen-prefix"]["gen_s"]
    print(f"\nLlama {args.layers} layers, hidden {args.hidden}, GQA, batch {args.batch} x {args.seq}, "
          f"{args.prefix} virtual tokens, {args.device} {args.dtype}, torch {torch.__version__}\n")
    print("| measure | peft | prefixtune | ratio (target) |")
    print("|---|---|---|---|")
    print(f"| train step (s) | {pe['step_s']:.3f} | {pt_['step_s']:.3f} | {pt_['step_s'] / pe['step_s']:.2f}x (<= 1.0x) |")
    print(f"| peak memory growth over the weights (MiB) | {pe['peak_mb']:.0f} | {pt_['peak_mb']:.0f} | "
          f"{pt_['peak_mb'] / max(pe['peak_mb'], 1e-9):.2f}x |")
    print(f"| generate {args.new_tokens} tokens, bare vs prefix (s) | {gb:.3f} (bare) | {gp:.3f} | "
          f"{gp / gb:.2f}x (<= 1.05x) |")


if __name__ == "__main__":
    main()
