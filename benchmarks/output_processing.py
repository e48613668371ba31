"""Output processing per token (serving/output.py): its cost at output position 20 vs 2,000.

    python benchmarks/output_processing.py [--tokenizer DIR] [--streams 16] [--tokens 2100] [--stop 4]

Feeds a real text's tokens (SmolLM2's tokenizer by default, the demo's) one at a time to OutputProcessor.accept, as
the engine does after each sampled token, with `--stop` stop strings that never match (a chat client sends a few),
and reports the median time of one accept() around output positions 20 and 2,000, over `--streams` requests.
Target from issue 35: position 2,000 within 2x of position 20 (a processor that decodes the whole output again is
hundreds of times slower there).
Only OutputProcessor's public surface (OutputProcessor(tokenizer, eos_ids, stats).accept(request, token)) is used,
the same before and after the incremental rewrite, so the lead can run it on both commits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from prefixtune.serving.output import OutputProcessor
from prefixtune.serving.request import Request, SamplingParams

POSITIONS = (20, 2000)
WINDOW = 10  # positions p-10 .. p+9 count as "around p"


def engine_stats():
    """The engine's counters as OutputProcessor takes them: EngineStats, or the dict of commits before it."""
    try:
        from prefixtune.serving.stats import EngineStats
    except ImportError:
        return {"completion_tokens": 0}
    return EngineStats()


def text_ids(tokenizer, n: int) -> list[int]:
    """At least `n` token ids of real prose and code (this repository's docs and sources, repeated if short)."""
    root = Path(__file__).resolve().parent.parent
    parts = [p.read_text(errors="ignore") for p in sorted(root.glob("docs/**/*.md")) + [root / "README.md"]
             + sorted((root / "src" / "prefixtune" / "serving").glob("*.py")) if p.is_file()]
    ids = tokenizer.encode("\n".join(parts), add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the demo's SmolLM2)")
    ap.add_argument("--streams", type=int, default=16, help="requests measured (one after another)")
    ap.add_argument("--tokens", type=int, default=2100, help="output tokens per request")
    ap.add_argument("--stop", type=int, default=4, help="stop strings per request (never matching)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from prefixtune.cli import assets

        args.tokenizer = str(assets.smollm2_dir())
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = text_ids(tok, args.tokens)
    stops = tuple(f"<never-{i}-stop>" for i in range(args.stop))
    per_pos: dict[int, list[float]] = {p: [] for p in POSITIONS if p + WINDOW <= args.tokens}
    total = 0.0
    for s in range(args.streams):
        out = OutputProcessor(tok, set(), engine_stats())
        r = Request(None, [1], SamplingParams(max_tokens=args.tokens + 1, stop=stops, ignore_eos=True), lambda ev: None,
                    index=s)
        for i, t in enumerate(ids):
            t0 = time.perf_counter_ns()
            out.accept(r, t)
            dt = time.perf_counter_ns() - t0
            total += dt
            for p in per_pos:
                if p - WINDOW <= i < p + WINDOW:
                    per_pos[p].append(dt / 1e3)
    med = {p: statistics.median(v) for p, v in per_pos.items()}
    print(f"tokenizer {Path(args.tokenizer).name}, {args.streams} streams x {args.tokens} tokens, {len(stops)} stop strings")
    print("| output position | median µs per token |")
    print("|---:|---:|")
    for p, m in med.items():
        print(f"| {p:,} | {m:,.1f} |")
    print(f"mean over all positions: {total / 1e3 / (args.streams * len(ids)):,.1f} µs per token")
    if len(med) == 2:
        ratio = med[POSITIONS[1]] / med[POSITIONS[0]]
        print(f"position {POSITIONS[1]:,} / position {POSITIONS[0]}: {ratio:.2f}x (target <= 2x): {'PASS' if ratio <= 2 else 'FAIL'}")


if __name__ == "__main__":
    main()
