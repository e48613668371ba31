"""Serving throughput: mixed-prefix continuous batching vs one adapter at a time (the PEFT way).

    python benchmarks/serve.py [--adapters 8] [--requests 64] [--prompt 32] [--output 128] [--layers 4] [--hidden 256]
                               [--device cuda --dtype bfloat16]

Same load three ways on one random-init Llama (CPU is fine), greedy, fixed lengths (eos ignored):
  mixed        all requests at once, 8 adapters in one running batch (prefixtune's scheduler)
  per-adapter  the PEFT way: one adapter active at a time; its requests batched, adapters served in turn
               (measured with our scheduler, and with HF generate() per adapter group)
  single       the same number of requests, all on one adapter (the ceiling for mixing)
Targets from the issue: mixed >= 4x per-adapter, mixed >= 0.8x single.

    python benchmarks/serve.py --num-adapters 1000 [--startup 10000] [--pressure 2000]

Thousands of adapters on one engine (lazy loading, memory budget, flat latency): see many_adapters.py.

    python benchmarks/serve.py --backends torch,llamacpp-q4_1,llamacpp-f16 [--gguf model.gguf] [--threads 2]

The backend column: the same load on real GGUF weights (default: the demo's SmolLM2-135M-Instruct Q4_1; F16 is
that file requantized), each backend in its own process: tokens/s and resident memory of the PyTorch engine
(fp32, dequantized) vs the llama.cpp engine. Target from issue 11: llama.cpp >= 3x the tokens/s at <= half the memory.
llamacpp-<type> for another weight type (f16, q8_0, q4_0) requantizes the Q4_1 file to it (throughput only: a
requantized file is not a better model than its source). A `-unified` suffix (llamacpp-q4_1-unified) runs llama.cpp
with its unified KV cache instead of the per-sequence
default; --lcpp-threads / --lcpp-threads-batch / --n-batch / --n-ubatch set llama.cpp's own knobs. --repeat N runs
the whole backend list N times in turn (interleaved, so machine load hits them alike) and keeps each one's best.
--paired N measures the cost of a prefix more tightly: each backend's process runs the same wave with prefixes and
bare N times back to back (ABBA order) and reports the median of the N ratios.

    python benchmarks/serve.py --backends torch,llamacpp-q4_1,vllm,vllm-bare --vllm-python /work/venv-vllm/bin/python

vllm: the same load on vLLM through our engine (VllmEngine, fp32, prefixes through our KV connector); vllm-bare: the
same prompts on vLLM without adapters (the cost of prefixes is vllm / vllm-bare). torch-bare and llamacpp-q4_1-bare
(any `<backend>-bare`) are the same for the other engines: the cost of a prefix on every engine is

    python benchmarks/serve.py --backends torch,torch-bare,llamacpp-q4_1,llamacpp-q4_1-bare,vllm,vllm-bare ...

vLLM runs in its own environment
(--vllm-python); its model is the SmolLM2 HF directory (a copy whose config drops the GGUF quantization note) or
--vllm-model. Its RSS is summed over its processes (engine core, worker), sampled every 0.2 s for the peak.
--vllm-compile uses vLLM's compiled mode (slower start, faster decode); the default is eager.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch
from common import add_device_args, check_device_args, sync
from transformers import LlamaConfig, LlamaForCausalLM

import prefixtune as pt
from prefixtune.serving.request import Request, SamplingParams
from prefixtune.serving.torch_engine import TorchEngine as Engine


def build(args):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
                      max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    base = LlamaForCausalLM(cfg).to(args.device, args.torch_dtype).eval()
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=args.prefix), "a0")
    for i in range(1, args.adapters):
        model.add_adapter(f"a{i}", pt.PrefixConfig(num_virtual_tokens=args.prefix))
    return model.eval()


def run_engine(engine, waves, params):
    """Submit each wave of (adapter, prompt) at once and wait for it before the next; return seconds."""
    t0 = time.perf_counter()
    for wave in waves:
        done, left = threading.Event(), [len(wave)]
        lock = threading.Lock()

        def on_event(ev):
            if ev.finish_reason:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        engine.submit([Request(a, p, params, on_event) for a, p in wave])
        done.wait()
    return time.perf_counter() - t0


def run_generate(model, waves, new_tokens):
    t0 = time.perf_counter()
    for wave in waves:
        ids = torch.tensor([p for _, p in wave], device=model.device)
        model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=[a for a, _ in wave], do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    sync(str(model.device))
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--output", type=int, default=128, help="new tokens per request (128: vLLM benchmark_serving's default)")
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--backends", type=lambda s: s.split(","), default=None,
                    help=f"compare serving backends on real GGUF weights instead: comma list of {','.join(BACKENDS)}")
    ap.add_argument("--gguf", default=None, help="--backends: the model (default: the demo's SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--repeat", type=int, default=1, help="--backends: run the list this many times, interleaved")
    ap.add_argument("--paired", type=int, default=0,
                    help="--backends: the cost of a prefix, as N back-to-back pairs (prefixed, bare) in each backend's process")
    ap.add_argument("--lcpp-threads", type=int, default=None, help="llama.cpp n_threads (default: --threads)")
    ap.add_argument("--lcpp-threads-batch", type=int, default=None, help="llama.cpp n_threads_batch (default: n_threads)")
    ap.add_argument("--n-batch", type=int, default=512, help="llama.cpp n_batch")
    ap.add_argument("--n-ubatch", type=int, default=None, help="llama.cpp n_ubatch (default: n_batch)")
    ap.add_argument("--num-adapters", type=int, default=None, help="many-adapter benchmark on SmolLM2 (many_adapters.py)")
    ap.add_argument("--startup", type=int, default=10000, help="--num-adapters: adapters on disk for the start-up test")
    ap.add_argument("--pressure", type=int, default=2000, help="--num-adapters: adapters for the eviction test")
    ap.add_argument("--budget", type=int, default=256, help="--num-adapters: --max-loaded-adapters (every test)")
    ap.add_argument("--distinct", type=int, default=None,
                    help="--num-adapters: random tables written for test 1; the other directories hard-link them (default: all)")
    ap.add_argument("--save", default=None, help="--num-adapters: write the results as JSON here")
    ap.add_argument("--vllm-python", default=sys.executable, help="--backends vllm*: the Python of the vLLM environment")
    ap.add_argument("--vllm-model", default=None, help="--backends vllm*: HF model directory (default: SmolLM2's)")
    ap.add_argument("--vllm-compile", action="store_true", help="--backends vllm*: vLLM's compiled mode (default: eager)")
    ap.add_argument("--backend-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    add_device_args(ap)
    args = ap.parse_args()
    args.torch_dtype = check_device_args(ap, args)
    if args.backend_child:
        return _backend_prep(args) if args.backend_child == "prep" else _backend_child(args)
    if args.backends:
        return backend_table(args)
    if args.num_adapters:
        import many_adapters

        return many_adapters.run(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]
    names = [f"a{i % args.adapters}" for i in range(args.requests)]
    mixed = [list(zip(names, prompts))]
    grouped = [[(n, p) for n, p in zip(names, prompts) if n == a] for a in dict.fromkeys(names)]
    single = [[("a0", p) for p in prompts]]
    params = SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True)
    engine = Engine(model, max_batch_size=args.requests, max_queue=args.requests, max_total_tokens=1024).start()
    tokens = args.requests * args.output

    modes = {
        "mixed-prefix batching (prefixtune)": lambda: run_engine(engine, mixed, params),
        "per-adapter, scheduler (PEFT way)": lambda: run_engine(engine, grouped, params),
        "per-adapter, HF generate (PEFT way)": lambda: run_generate(model, grouped, args.output),
        "single adapter, same load": lambda: run_engine(engine, single, params),
    }
    run_engine(engine, mixed, params)  # warm-up
    best = {label: float("inf") for label in modes}
    for _ in range(args.rounds):  # interleaved rounds, best of each: a busy machine slows whichever runs then
        for label, fn in modes.items():
            best[label] = min(best[label], fn())
    engine.stop()
    rows = [(label, secs, tokens / secs) for label, secs in best.items()]

    mixed_tps, per_tps, single_tps = rows[0][2], rows[1][2], rows[3][2]
    print(f"\n{args.adapters} adapters x P={args.prefix}, {args.requests} concurrent requests, prompt {args.prompt} / output "
          f"{args.output} tokens; Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {args.device} "
          f"{args.dtype}, {torch.get_num_threads()} CPU threads\n")
    print("| mode | wall s | tokens/s | mixed speed-up |")
    print("|---|---:|---:|---:|")
    for label, secs, tps in rows:
        print(f"| {label} | {secs:.2f} | {tps:,.0f} | {mixed_tps / tps:.2f}x |")
    print(f"\nmixed / per-adapter = {mixed_tps / per_tps:.2f}x (target >= 4x): {'PASS' if mixed_tps >= 4 * per_tps else 'FAIL'}")
    print(f"mixed / single      = {mixed_tps / single_tps:.2f}x (target >= 0.8x): {'PASS' if mixed_tps >= 0.8 * single_tps else 'FAIL'}")


# ---- backend column: the same load on real weights, PyTorch server vs llama.cpp (Q4_1, F16) ------------------
BACKENDS = ("torch", "torch-bare", "llamacpp-q4_1", "llamacpp-q4_1-bare", "llamacpp-f16", "vllm", "vllm-bare")
BARE = "-bare"  # the same prompts with no adapter (the adapters are still loaded: same memory, same engine)


class TreeRss:
    """Resident memory summed over this process and its children (vLLM's engine core and workers), sampled."""

    def __init__(self, every: float = 0.2):
        import psutil

        self.proc, self.peak, self.every = psutil.Process(), 0, every
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> int:
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except Exception:  # a child that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        return max(self.peak, self.now())



def _backend_child(args) -> None:
    """One backend in its own process (so its RSS is its own): load, warm up, time one wave, print a JSON line."""
    import json
    import resource
    from pathlib import Path

    import psutil

    work = Path(args.workdir)
    prompts = json.loads((work / "prompts.json").read_text())
    names = [f"a{i % args.adapters}" for i in range(len(prompts))]
    params = SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    tree = TreeRss() if args.backend_child.startswith("vllm") else None
    if args.backend_child.startswith("vllm"):
        from prefixtune.serving.vllm_engine import VllmEngine

        engine = VllmEngine(args.vllm_model or work / "vllm-model", adapters_dir=work / "adapters", max_batch_size=len(prompts),
                            max_queue=len(prompts), max_total_tokens=1024, dtype="float32", kv_cache_gib=2,
                            enforce_eager=not args.vllm_compile)
    elif args.backend_child.startswith("torch"):
        from prefixtune.loading import load_model

        base, tok = load_model(args.gguf, dtype="fp32", device="cpu")
        engine = Engine(pt.PrefixModel(base), tok, adapters_dir=work / "adapters", max_batch_size=len(prompts),
                        max_queue=len(prompts), max_total_tokens=1024)
    else:
        from prefixtune.serving.llamacpp_engine import LlamaCppEngine

        wtype = args.backend_child.split("-")[1]
        gguf = args.gguf if wtype == "q4_1" else work / f"model-{wtype}.gguf"
        unified = "-unified" in args.backend_child
        cells = len(prompts) * (args.prompt + args.output) + args.adapters * args.prefix
        engine = LlamaCppEngine(gguf, adapters_dir=work / "adapters", max_batch_size=len(prompts), max_queue=len(prompts),
                                n_ctx=cells + 256, kv_unified=unified, seq_cells=args.prefix + args.prompt + args.output,
                                n_threads=args.lcpp_threads or args.threads or torch.get_num_threads(),
                                n_threads_batch=args.lcpp_threads_batch, n_batch=args.n_batch, n_ubatch=args.n_ubatch)
    assert len(engine.load_dir()) == args.adapters
    if args.backend_child.endswith(BARE):
        names = [None] * len(prompts)
    engine.start()
    load_s = time.perf_counter() - t0
    run_engine(engine, [list(zip(names, prompts))[:4]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    if args.paired:
        return _paired(args, engine, names, prompts, params)
    secs = min(run_engine(engine, [list(zip(names, prompts))], params) for _ in range(args.rounds))
    if tree is not None:
        rss = tree.now()
        peak = tree.stop()
    else:
        rss = psutil.Process().memory_info().rss
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    getattr(engine, "close", engine.stop)()
    print("RESULT " + json.dumps({"backend": args.backend_child, "secs": secs, "tps": len(prompts) * args.output / secs,
                                  "rss": rss, "peak": peak, "load_s": load_s}))


def _paired(args, engine, names, prompts, params) -> None:
    """The cost of a prefix measured in one process on one engine: the same wave with prefixes and bare, back to back,
    in ABBA order (prefixed-bare, then bare-prefixed) so a drift in machine speed hits both sides alike."""
    import json

    sides = {"prefixed": names, "bare": [None] * len(prompts)}
    pairs = []
    for i in range(args.paired):
        order = ["prefixed", "bare"] if i % 2 == 0 else ["bare", "prefixed"]
        secs = {side: run_engine(engine, [list(zip(sides[side], prompts))], params) for side in order}
        pairs.append(secs)
        print(f"pair {i + 1}: prefixed / bare = {secs['bare'] / secs['prefixed']:.3f}x tokens/s", file=sys.stderr, flush=True)
    getattr(engine, "close", engine.stop)()
    print("RESULT " + json.dumps({"backend": args.backend_child, "pairs": pairs, "tokens": len(prompts) * args.output}))


def paired_table(args, run_child) -> None:
    """--paired N: per backend, N back-to-back pairs of the same wave with prefixes and bare (see _paired)."""
    import statistics

    rows = []
    for b in args.backends:
        r = run_child(b)
        ratios = [p["bare"] / p["prefixed"] for p in r["pairs"]]
        tps = {side: statistics.median(r["tokens"] / p[side] for p in r["pairs"]) for side in ("prefixed", "bare")}
        rows.append(f"| {b} | {tps['prefixed']:,.1f} | {tps['bare']:,.1f} | **{statistics.median(ratios):.3f}x** | "
                    f"{min(ratios):.3f}x | {max(ratios):.3f}x |")
    print(f"\n{args.adapters} adapters x P={args.prefix}, {args.requests} concurrent requests, prompt {args.prompt} / "
          f"output {args.output} tokens (greedy, eos ignored), {args.threads or torch.get_num_threads()} threads; "
          f"{args.paired} pairs per backend, in one process, ABBA order\n")
    print("| backend | tokens/s with prefixes (median) | bare (median) | prefixed / bare: median of pairs | min | max |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\n(target: prefixed >= 0.97x bare on each engine)")


def _backend_prep(args) -> None:
    """Random adapters of the model's shape, random prompts, and (if asked) the model requantized to F16."""
    import json
    from pathlib import Path

    from prefixtune.loading import load_model

    work = Path(args.workdir)
    base, tok = load_model(args.gguf, dtype="fp32", device="cpu")
    torch.manual_seed(0)
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=args.prefix, init="random"), "a0")
    for i in range(args.adapters):
        if i:
            model.add_adapter(f"a{i}", pt.PrefixConfig(num_virtual_tokens=args.prefix, init="random"))
        model.save_adapter(work / "adapters" / f"a{i}", f"a{i}")
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(100, base.config.vocab_size, (args.requests, args.prompt), generator=g)  # above the special-token ids
    (work / "prompts.json").write_text(json.dumps(prompts.tolist()))
    if any(b.startswith("vllm") for b in args.backends or []) and not args.vllm_model:
        from prefixtune.cli import assets
        from prefixtune.serving.vllm_engine import vllm_model_dir

        vllm_model_dir(assets.smollm2_dir(), work / "vllm-model")
    for wtype in sorted({b.split("-")[1] for b in args.backends or [] if b.startswith("llamacpp-")} - {"q4_1"}):
        from prefixtune.serving.llamacpp import requantize  # the same weights requantized (F16: dequantized)

        requantize(args.gguf, work / f"model-{wtype}.gguf", wtype)


def backend_table(args) -> None:
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if args.gguf is None:
        from prefixtune.cli import assets

        args.gguf = str(assets.smollm2_gguf())
    work = Path(tempfile.mkdtemp(prefix="serve-backends-"))
    # Children inherit their parent's peak RSS across exec (ru_maxrss), so this process stays small: the
    # preparation (adapters, prompts, the F16 file) runs in a child of its own too.
    common = ["--workdir", str(work), "--gguf", args.gguf, "--adapters", str(args.adapters), "--prompt", str(args.prompt),
              "--output", str(args.output), "--prefix", str(args.prefix), "--rounds", str(args.rounds),
              "--requests", str(args.requests), "--n-batch", str(args.n_batch)] + \
        [f for k, v in (("--threads", args.threads), ("--lcpp-threads", args.lcpp_threads),
                        ("--lcpp-threads-batch", args.lcpp_threads_batch), ("--n-ubatch", args.n_ubatch)) if v for f in (k, str(v))]
    prep_for = ["--backends", ",".join(args.backends)]  # prep requantizes the weight types they name
    prep = subprocess.run([sys.executable, __file__, "--backend-child", "prep"] + common + prep_for, capture_output=True, text=True)
    if prep.returncode:
        raise SystemExit(f"preparation failed:\n{prep.stderr[-3000:]}")

    def run_child(b: str) -> dict:
        python = args.vllm_python if b.startswith("vllm") else sys.executable
        cmd = [python, __file__, "--backend-child", b] + common + (["--paired", str(args.paired)] if args.paired else []) + \
            (["--vllm-model", args.vllm_model] if args.vllm_model else []) + (["--vllm-compile"] if args.vllm_compile else [])
        load0 = os.getloadavg()[0]
        out = subprocess.run(cmd, capture_output=True, text=True)
        print("".join(f"{b} {l}\n" for l in out.stderr.splitlines() if l.startswith("pair ")), end="", flush=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{b} failed:\n{out.stderr[-3000:]}")
        return json.loads(line[7:]) | {"load": (load0 + os.getloadavg()[0]) / 2}

    if args.paired:
        return paired_table(args, run_child)
    best: dict[str, dict] = {}
    for rep in range(args.repeat):
        for b in args.backends:
            r = run_child(b)
            print(f"[{rep + 1}/{args.repeat}] {b}: {r['tps']:.1f} tokens/s, load average {r['load']:.2f}", flush=True)
            if b not in best or r["tps"] > best[b]["tps"]:
                best[b] = r
    results = [best[b] for b in args.backends]
    ref = results[0]
    print(f"\n{Path(args.gguf).name}: {args.adapters} adapters x P={args.prefix}, {args.requests} concurrent requests, "
          f"prompt {args.prompt} / output {args.output} tokens (greedy, eos ignored), {args.threads or torch.get_num_threads()} threads\n")
    print("| backend | wall s | tokens/s | vs torch | RSS after run MiB | peak RSS MiB | vs torch | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['backend']} | {r['secs']:.1f} | {r['tps']:,.1f} | {r['tps'] / ref['tps']:.2f}x | {r['rss'] / 2**20:,.0f} | "
              f"{r['peak'] / 2**20:,.0f} | {r['peak'] / ref['peak']:.2f}x | {r['load']:.2f} |")
    print()
    for b in args.backends:
        if b.endswith(BARE) and b[:-len(BARE)] in best:
            print(f"{b[:-len(BARE)]} with {args.adapters} prefix adapters / bare: "
                  f"{best[b[:-len(BARE)]]['tps'] / best[b]['tps']:.2f}x tokens/s (target >= 0.97x)")


if __name__ == "__main__":
    main()
