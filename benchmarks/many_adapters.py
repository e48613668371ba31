"""Thousands of adapters on one server (issue 26): lazy loading, a memory budget, flat latency.

    python benchmarks/serve.py --num-adapters 1000 [--requests 64] [--output 128] [--startup 10000] [--pressure 2000]

On the real SmolLM2-135M-Instruct (fp32, CPU; the demo's weights), the PyTorch engine that `prefixtune serve` runs,
driven in-process (no HTTP in the timings). Adapters are random P=16 prefixes saved in the peft format.
  1. throughput: `--requests` concurrent requests, each for a random adapter, `--output` new tokens, over 8 adapters
     and over N; N twice (cold: every adapter loads on its first request; warm: all resident). tokens/s, p50/p95
     latency, and the first-request load cost per adapter from the engine's own load-time histogram.
  2. start-up: indexing `--startup` adapter directories vs 8 (the model's own load is not counted), and RSS growth
     under a load over many adapters with --max-loaded-adapters 256. The directories share one weights file through
     hard links (the contents do not matter for indexing or memory), so the test takes little disk.
  3. pressure: `--pressure` adapters, budget 256, 4 x --requests short requests over random adapters: no errors,
     greedy outputs equal to an engine with every adapter resident, evictions counted.
--startup 0 / --pressure 0 skip tests 2 / 3.

    python benchmarks/serve.py --num-adapters 100000 --distinct 256 --budget 256 --startup 0 --pressure 0 --threads 2

100,000 adapters (issue 35): 100k real P=16 tables are 73 GB, so `--distinct 256` writes 256 random tables once and
every other directory hard-links one of them (config and safetensors): each directory is a real adapter on disk
(indexed, loaded and evicted like any other), only the bytes are shared. Test 1 then also reports the start-up
(indexing) of the N-adapter server over the 8-adapter one and the first-request load p50 (every load timed), both
engines under --max-loaded-adapters (--budget).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import prefixtune as pt
from prefixtune.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from prefixtune.cli.assets import smollm2_dir
from prefixtune.loading import load_model
from prefixtune.serving.request import Request, SamplingParams
from prefixtune.serving.torch_engine import TorchEngine

P = 16


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_adapters(base, root: Path, n: int, distinct: int | None = None) -> list[str]:
    """n adapter directories; the first `distinct` get their own random table, the rest hard-link to those files."""
    distinct = n if distinct is None else distinct
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=P, init="random", layer_scale=False), "proto")
    enc = model.prefixes["proto"]
    names = [f"ad{i:05d}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    std = enc.embedding.weight.std().item()
    proto = root / "_proto"
    model.save_adapter(proto, "proto")  # the config (and card) every copy shares; only the table differs
    for i, name in enumerate(names):
        d = root / name
        if i < distinct:
            d.mkdir(parents=True)
            shutil.copy(proto / CONFIG_NAME, d / CONFIG_NAME)
            table = torch.randn(enc.embedding.weight.shape, generator=g) * std
            save_file({"prompt_embeddings": table}, d / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            src = root / names[i % distinct]
            d.mkdir()
            for f in src.iterdir():
                os.link(f, d / f.name)
    model.delete_adapter("proto")
    shutil.rmtree(proto)
    return names


def engine(base, tok, root, **kw) -> TorchEngine:
    return TorchEngine(pt.PrefixModel(base), tok, model_name="smollm2", adapters_dir=root, max_total_tokens=2048, **kw)


def drive(eng, work, max_tokens) -> dict:
    """Submit all (adapter, prompt ids) at once; -> tokens/s, latencies, outputs, errors."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    done, lock = threading.Event(), threading.Lock()
    left, lat, out, errors = [len(work)], [0.0] * len(work), [None] * len(work), []
    t0 = time.perf_counter()

    def sink(i):
        toks = []

        def on_event(ev):
            toks.extend(ev.token_ids)
            if ev.finish_reason:
                lat[i], out[i] = time.perf_counter() - t0, toks
                with lock:
                    if ev.error:
                        errors.append(str(ev.error))
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return on_event

    eng.submit([Request(a, p, params, sink(i)) for i, (a, p) in enumerate(work)])
    done.wait()
    secs = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20)
    return {"tokens_per_s": len(work) * max_tokens / secs, "p50_s": statistics.median(lat), "p95_s": q[18],
            "seconds": secs, "outputs": out, "errors": errors}


def load_ms(eng) -> float:
    return 1000 * eng.stats.mean_adapter_load_seconds()


def time_loads(eng) -> list[float]:
    """Every adapter load of `eng` from now on, in ms (the registry's own load callback, timed)."""
    times, load = [], eng.registry._load

    def timed(name, directory):
        t0 = time.perf_counter()
        out = load(name, directory)
        times.append(1000 * (time.perf_counter() - t0))
        return out

    eng.registry._load = timed
    return times


def run(args) -> int:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = load_model(str(smollm2_dir()), "fp32", "cpu")
    base.eval()
    work_root = Path(tempfile.mkdtemp(prefix="many-adapters-", dir=args.workdir))
    rng = random.Random(0)
    vocab = base.config.vocab_size
    prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt)] for _ in range(4 * args.requests)]
    results = {"load": f"os.getloadavg() at start {os.getloadavg()}", "P": P}
    try:
        # ---- 1. throughput, 8 vs N adapters ---------------------------------------------------------------
        big = work_root / f"n{args.num_adapters}"
        t0 = time.perf_counter()
        names = make_adapters(base, big, args.num_adapters, distinct=getattr(args, "distinct", None))
        print(f"wrote {args.num_adapters} adapters in {time.perf_counter() - t0:.0f}s", flush=True)
        small = work_root / "n8"
        small.mkdir()
        for n in names[:8]:
            shutil.copytree(big / n, small / n)
        limits = dict(max_batch_size=args.requests, max_loaded_adapters=args.budget)
        eng8, engN = engine(base, tok, small, **limits), engine(base, tok, big, **limits)
        index_s = {}
        for label, e in (("8", eng8), (str(args.num_adapters), engN)):
            t0 = time.perf_counter()
            e.index()
            index_s[label] = time.perf_counter() - t0
        results["index_s"] = index_s
        print(f"start-up (index): {args.num_adapters} adapters {index_s[str(args.num_adapters)]:.2f}s, 8 adapters "
              f"{index_s['8']:.2f}s: {index_s[str(args.num_adapters)] - index_s['8']:+.2f}s (target <= +5 s)", flush=True)
        t0 = time.perf_counter()
        engN.registry.wait_indexed()  # a large directory is indexed on a thread after start-up: the full listing's time
        results["full_listing_s"] = index_s[str(args.num_adapters)] + time.perf_counter() - t0
        print(f"full listing (background index done): {results['full_listing_s']:.2f}s", flush=True)
        loads = time_loads(engN)
        eng8.start(), engN.start()
        work8 = [(rng.choice(names[:8]), p) for p in prompts[: args.requests]]
        workN = [(rng.choice(names), p) for p in prompts[: args.requests]]
        drive(eng8, work8[:4], 4)  # warm-up: first forward passes, the 8 adapters' loads
        drive(eng8, [(n, prompts[0]) for n in names[:8]], 1)
        rows = {}
        rows["8 adapters"] = drive(eng8, work8, args.output)
        rows[f"{args.num_adapters} adapters, cold (loads on first request)"] = drive(engN, workN, args.output)
        cold_load_ms = load_ms(engN)
        rows[f"{args.num_adapters} adapters, warm (resident)"] = drive(engN, workN, args.output)
        rows["8 adapters, again"] = drive(eng8, work8, args.output)
        eng8.stop(), engN.stop()
        distinct = len({a for a, _ in workN})
        results["throughput"] = {k: {m: v[m] for m in ("tokens_per_s", "p50_s", "p95_s")} for k, v in rows.items()}
        results["throughput_note"] = (f"{args.requests} concurrent requests x {args.output} tokens, prompt {args.prompt}; "
                                      f"{distinct} distinct adapters in the N-adapter load")
        results["first_request_load_ms_per_adapter"] = cold_load_ms
        results["first_request_load_ms_p50"] = statistics.median(loads) if loads else None
        print_table("throughput", rows, ("tokens_per_s", "p50_s", "p95_s"))
        print(f"first-request load: {cold_load_ms:.1f} ms per adapter (mean over {engN.stats.adapter_loads}), "
              f"p50 {results['first_request_load_ms_p50'] or float('nan'):.1f} ms over {len(loads)} loads (target <= 10 ms)")
        cold, ref8 = rows[f"{args.num_adapters} adapters, cold (loads on first request)"], rows["8 adapters"]
        print(f"cold {args.num_adapters} / 8 adapters: {cold['tokens_per_s'] / ref8['tokens_per_s']:.2f}x tokens/s "
              f"(target >= 0.95x), p50 latency {cold['p50_s'] / ref8['p50_s']:.2f}x")
        del engN, eng8

        shutil.rmtree(big, ignore_errors=True)  # before test 2 writes its own directories
        # ---- 2. start-up and RSS with many adapters on disk -------------------------------------------------
        if not args.startup:
            return finish(args, results, work_root)
        many = work_root / f"n{args.startup}"
        make_adapters(base, many, args.startup, distinct=64)
        rows = {}
        for label, root in (("8 adapters", small), (f"{args.startup} adapters", many)):
            t0 = time.perf_counter()
            e = engine(base, tok, root, max_loaded_adapters=args.budget, max_batch_size=args.requests)
            e.index()
            rows[label] = {"index_s": time.perf_counter() - t0}
        e.start()
        rss0 = rss_mb()
        all_names = e.adapter_names()
        for wave in range(4):
            drive(e, [(rng.choice(all_names), p) for p in prompts[: args.requests]], 8)
        rows[f"{args.startup} adapters"]["rss_growth_mb"] = rss_mb() - rss0
        rows[f"{args.startup} adapters"]["resident"] = len(e.registry.resident_names())
        rows[f"{args.startup} adapters"]["resident_mb"] = e.registry.resident_bytes() / 2**20
        e.stop()
        results["startup"] = rows
        print_table(f"start-up (index) and memory, --max-loaded-adapters {args.budget}", rows,
                    ("index_s", "rss_growth_mb", "resident", "resident_mb"))
        del e

        # ---- 3. pressure: working set > budget, exact outputs --------------------------------------------------
        if not args.pressure:
            return finish(args, results, work_root)
        press = work_root / f"p{args.pressure}"
        pnames = make_adapters(base, press, args.pressure)
        work = [(rng.choice(pnames), p) for p in prompts[: 4 * args.requests]]
        ref_eng = engine(base, tok, press, max_batch_size=args.requests).start()
        ref_eng.index()
        ref = drive(ref_eng, work, 8)
        ref_eng.stop()
        del ref_eng
        budget = engine(base, tok, press, max_loaded_adapters=args.budget, max_batch_size=args.requests).start()
        budget.index()
        got = drive(budget, work, 8)
        budget.stop()
        results["pressure"] = {"adapters": args.pressure, "requests": len(work),
                               "distinct_adapters": len({a for a, _ in work}), "errors": len(got["errors"]),
                               "outputs_equal": got["outputs"] == ref["outputs"],
                               "evictions": budget.stats.adapter_evictions,
                               "max_resident": args.budget, "resident_after": len(budget.registry.resident_names())}
        print("pressure:", json.dumps(results["pressure"]))
        return finish(args, results, work_root)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)


def finish(args, results, work_root) -> int:
    shutil.rmtree(work_root, ignore_errors=True)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1))
    return 0


def print_table(title, rows, cols):
    print(f"\n{title}")
    print("| load | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for k, v in rows.items():
        print(f"| {k} | " + " | ".join(f"{v[c]:.3f}" if isinstance(v.get(c), float) else str(v.get(c, "")) for c in cols) + " |")
