"""Does a long output slow serving down? Tokens/s of the PyTorch engine at 64 streams x 1,024 new tokens vs x 128,
and the share of a decode step spent outside the model (sampling, output processing, batch bookkeeping) at 64 rows.

    python benchmarks/decode_steps.py [--model tiny|smollm2|DIR] [--streams 64] [--long 1024] [--short 128] [--threads 2]

--model tiny (default): a random-init Llama (4 layers, hidden 256) with SmolLM2's real tokenizer and vocabulary, so
a step is cheap and what happens outside the model shows (the case where output processing matters most; about a
minute per length on 2 cores). --model smollm2: the demo's SmolLM2-135M-Instruct, fp32 (64 x 1,024 tokens take
many minutes on 2 cores). Greedy, eos ignored, random prompts of --prompt tokens, two never-matching stop strings
per request (as chat clients send), one engine for both lengths. The model's time is
timed around the base model's forward(); a step's time around the engine's `_step`. Only the engine's long-standing
surface is used (TorchEngine(model, tokenizer, ...), submit, `_step`, `base`), so the same script measures the
commit before the incremental output processor and after ("before and after" in issue 35).
Target from issue 35: tokens/s at x 1,024 close to x 128 (output processing does not grow with the output).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from common import DTYPES, add_device_args, check_device_args, sync

import prefixtune as pt
from prefixtune.serving.request import Request, SamplingParams
from prefixtune.serving.torch_engine import TorchEngine

STOPS = ("<never-stop-1>", "\n\n\n\n\n\n")


class StepClock:
    """Wall time of the engine's steps and of the model's forward inside them, per step, with the rows it ran."""

    def __init__(self, engine, device: str):
        self.steps: list[tuple[int, bool, float, float]] = []  # (rows, decode only, step s, forward s)
        self._fwd = 0.0
        forward, step = engine.base.forward, engine._step

        def timed_forward(*a, **kw):
            sync(device)
            t0 = time.perf_counter()
            out = forward(*a, **kw)
            sync(device)
            self._fwd += time.perf_counter() - t0
            return out

        def timed_step(new):
            rows, self._fwd = len(engine._rows) + len(new), 0.0
            t0 = time.perf_counter()
            step(new)
            sync(device)
            self.steps.append((rows, not new, time.perf_counter() - t0, self._fwd))

        engine.base.forward, engine._step = timed_forward, timed_step

    def outside_share(self, rows: int) -> tuple[float, int]:
        """(share of decode-step time outside the model, steps counted) over decode-only steps with `rows` rows."""
        sel = [(s, f) for r, dec, s, f in self.steps if dec and r == rows]
        total = sum(s for s, _ in sel)
        return (1 - sum(f for _, f in sel) / total if total else float("nan")), len(sel)


def run(engine, prompts, new_tokens: int) -> float:
    """All prompts at once, each for exactly `new_tokens` tokens; -> seconds."""
    done, left, lock = threading.Event(), [len(prompts)], threading.Lock()

    def on_event(ev):
        if ev.finish_reason:
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, stop=STOPS)
    t0 = time.perf_counter()
    engine.submit([Request(None, p, params, on_event) for p in prompts])
    done.wait()
    return time.perf_counter() - t0


def load(args):
    """-> (base model, tokenizer) for --model."""
    from prefixtune.cli import assets
    from prefixtune.loading import load_model

    if args.model != "tiny":
        path = str(assets.smollm2_dir()) if args.model == "smollm2" else args.model
        return load_model(path, "fp32" if args.dtype == "float32" else args.dtype, args.device)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(assets.smollm2_dir()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=682, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).to(args.device, DTYPES[args.dtype]).eval(), tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (random Llama, SmolLM2's tokenizer), smollm2, or an HF model directory")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--long", type=int, default=1024)
    ap.add_argument("--short", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_args(ap)
    args = ap.parse_args()
    check_device_args(ap, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = load(args)
    engine = TorchEngine(pt.PrefixModel(base), tok, max_batch_size=args.streams, max_queue=args.streams,
                         max_total_tokens=args.prompt + max(args.long, args.short, 4)).start()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(100, base.config.vocab_size, (args.streams, args.prompt), generator=g).tolist()
    run(engine, prompts[:2], 4)  # warm-up
    clock = StepClock(engine, args.device)
    rows = {}
    for n in (args.short, args.long):
        clock.steps.clear()
        secs = run(engine, prompts, n)
        share, counted = clock.outside_share(args.streams)
        rows[n] = (secs, args.streams * n / secs, share, counted)
    engine.stop()
    print(f"\n{args.model.rstrip('/').split('/')[-1]}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.streams} streams, prompt {args.prompt}, greedy, {len(STOPS)} stop strings\n")
    print(f"| new tokens | wall s | tokens/s | outside the model at {args.streams} rows | decode steps counted |")
    print("|---:|---:|---:|---:|---:|")
    for n, (secs, tps, share, counted) in rows.items():
        print(f"| {n:,} | {secs:.1f} | {tps:,.1f} | {share:.1%} | {counted} |")
    print(f"\ntokens/s x {args.long:,} / x {args.short:,}: {rows[args.long][1] / rows[args.short][1]:.2f}x")


if __name__ == "__main__":
    main()
