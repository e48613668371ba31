"""Knowledge prefixes as a user judges them (issue 32): facts, served == offline, and the serving comparison.

    python benchmarks/distill_facts.py                                  # SmolLM2-135M-Instruct on CPU, all parts
    python benchmarks/distill_facts.py --parts facts,served --run runs/facts   # reuse a distilled run

Document: benchmarks/data/knowledge_facts.json (a made-up club handbook: 30 stated facts, 30 held-out questions
with a reference string each). The prefix is made by `prefixtune distill`'s own run (self-study only: the questions
are never trained on), unless --run already holds one.
- facts: greedy chat answers (up to --max-tokens) for the document as the system message (full), the prefix,
  the first P document tokens (truncated) and no context; the share of answers containing the reference (case folded).
- served: the first 20 questions through /v1/chat/completions (user turn only) on the torch engine, against the
  student's offline answers (the same ids through PrefixModel.generate); on llama.cpp (--gguf) against llama.cpp's
  own offline generation of the same ids (its quantized weights may answer otherwise than torch: reported apart).
- compose: the handbook's halves distilled separately (P/2 each) and composed, against each alone and the whole
  prefix: facts and KL to the whole-document teacher.
- sizes: prefixes of each --sizes length trained on the main run's own examples (examples.pt), beside the truncated
  document of that length.
- capacity: a check, not a result: a --capacity-P prefix trained on the teacher's answers to the 30 questions
  themselves. When it holds the full context's facts, the self-study questions limit the prefix, not P.
- serving: one torch engine, --concurrency concurrent streamed chat requests, the document (--serving-document:
  h11's README, 2,000+ tokens, or the facts handbook) as the system message vs a P-token prefix of it (its values do
  not change the speed, so it is not trained here): completion tokens/s, time to first token p50, KV bytes per request.

Results: benchmarks/results/distill_facts.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prefixtune import knowledge as K  # noqa: E402
from prefixtune.loading import load_model  # noqa: E402
from prefixtune.model import PrefixModel  # noqa: E402
from prefixtune.training import distill as D  # noqa: E402
from prefixtune.training import selfstudy as S  # noqa: E402
from prefixtune.training.distill_config import DistillConfig  # noqa: E402
from prefixtune.training.distill_run import distill  # noqa: E402

HERE = Path(__file__).resolve().parent
FACTS = HERE / "data" / "knowledge_facts.json"
_DEFAULTS = DistillConfig.__dataclass_fields__  # flags not given here take `prefixtune distill`'s defaults


def say(*a):
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}]", *a, flush=True)


def make_prefix(args, text: str, run: Path, P: int, examples=None, **more) -> tuple[Path, float | None]:
    """`prefixtune distill`'s run on `text` into `run` (reused when it already holds an adapter); -> (run, seconds).
    `examples`: another run's self-study examples with their teacher answers (examples.pt), not made again; `more`:
    other DistillConfig fields."""
    if (run / "adapter" / "task.json").is_file():
        say(f"prefix from {run}")
        return run, None
    run.mkdir(parents=True, exist_ok=True)
    (run.parent / f"{run.name}-doc.txt").write_text(text)
    cfg = DistillConfig(model=args.model, context=[str(run.parent / f"{run.name}-doc.txt")], output=str(run),
                        overwrite=True, num_virtual_tokens=P, self_study=args.self_study, max_steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, answer_tokens=args.answer_tokens,
                        chunk_tokens=args.chunk_tokens, families=args.families, conversation_turns=args.turns,
                        progress=False, **more)
    t = time.time()
    distill(cfg, examples=examples)
    return run, round(time.time() - t, 1)


@torch.no_grad()
def greedy(model, tok, rows: list[list[int]], names: list, max_tokens: int, batch: int = 8) -> list[str]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for s in range(0, len(rows), batch):
        ids, mask = S.left_pad(rows[s : s + batch], pad)
        gen = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names[s : s + batch], do_sample=False,
                             max_new_tokens=max_tokens, pad_token_id=pad)
        out += [t.strip() for t in tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)]
    return out


def share(facts, answers: list[str]) -> dict:
    hits = [f["answer"].lower() in a.lower() for f, a in zip(facts["facts"], answers)]
    return {"correct": sum(hits), "share": sum(hits) / len(hits)}


def facts_part(model, tok, doc, facts, args) -> tuple[dict, list[str]]:
    qs = [f["question"] for f in facts["facts"]]
    rows = [K.query_ids(tok, q, doc.layout) for q in qs]
    D.teacher_adapters(model, doc)  # context-0: the document as the system message, its key/values computed once
    S.context_adapter(model, "truncated", doc.window_ids(0)[: args.P])
    result, answers = {}, {}
    for method, name in (("full", "context-0"), ("prefix", "manual"), ("truncated", "truncated"), ("none", None)):
        answers[method] = greedy(model, tok, rows, [name] * len(rows), args.max_tokens)
        result[method] = share(facts, answers[method])
        say(f"facts {method}: {result[method]['correct']}/{len(rows)}")
    result["prefix_vs_full"] = result["prefix"]["share"] / max(result["full"]["share"], 1e-9)
    result["answers"] = [{"question": q, "reference": f["answer"], **{m: answers[m][i] for m in answers}}
                         for i, (q, f) in enumerate(zip(qs, facts["facts"]))]
    return result, answers["prefix"]


def sizes_part(args, model, tok, doc, facts) -> dict:
    """The facts against the prefix's length: for each P of --sizes ("all" = the whole document's length, header
    included), a prefix distilled from the same self-study examples as the main run (its examples.pt, so only the
    training differs) and the truncated document of that length."""
    shared = torch.load(Path(args.run) / "examples.pt", weights_only=False)
    rows = [K.query_ids(tok, f["question"], doc.layout) for f in facts["facts"]]
    out = {"context_tokens": doc.context_len, "examples": len(shared), "rows": []}
    for size in args.sizes.split(","):
        P = doc.context_len if size == "all" else int(size)
        run, secs = make_prefix(args, facts["document"], Path(args.run).parent / f"size-{P}", P, examples=shared)
        model.load_adapter(run / "adapter", f"size-{P}")
        S.context_adapter(model, f"truncated-{P}", doc.window_ids(0)[:P])
        row = {"P": P, "train_seconds": secs,
               "prefix": share(facts, greedy(model, tok, rows, [f"size-{P}"] * len(rows), args.max_tokens)),
               "truncated": share(facts, greedy(model, tok, rows, [f"truncated-{P}"] * len(rows), args.max_tokens))}
        for name in (f"size-{P}", f"truncated-{P}"):
            model.delete_adapter(name)
        out["rows"].append(row)
        say(f"sizes P={P}: prefix {row['prefix']['correct']}, truncated {row['truncated']['correct']} ({secs} s)")
    return out


def capacity_part(args, model, tok, doc, facts) -> dict:
    """A check of what P can hold, not a result (it trains on the benchmark's own questions): a P-token prefix trained
    on the teacher's answers to the 30 questions themselves, all of them (--eval-fraction 0). When it holds the full
    context's facts, P is not what limits the self-study prefix: its questions are."""
    held = S.given_examples(tok, doc, [f["question"] for f in facts["facts"]])
    D.teacher_answers(model, tok, held, args.answer_tokens, progress=False, top_k=_DEFAULTS["top_k"].default)
    P = args.capacity_P
    run, secs = make_prefix(args, facts["document"], Path(args.run).parent / f"capacity-{P}", P, examples=held,
                            eval_fraction=0.0)
    model.load_adapter(run / "adapter", f"capacity-{P}")
    rows = [e["query_ids"] for e in held]
    out = {"P": P, "train_seconds": secs,
           "facts": share(facts, greedy(model, tok, rows, [f"capacity-{P}"] * len(rows), args.max_tokens))}
    model.delete_adapter(f"capacity-{P}")
    say(f"capacity P={P}: {out['facts']['correct']} facts after training on the questions themselves ({secs} s)")
    return out


def compose_part(args, model, tok, doc, facts) -> dict:
    """The handbook's two halves (by paragraph) distilled separately with P/2 each, composed ("a+b"), against each
    alone and the whole-document prefix of the same total length: facts and held-out KL to the whole-document teacher."""
    from prefixtune.training import distill_eval as E

    paras = facts["document"].split("\n\n")
    halves = ["\n\n".join(paras[: len(paras) // 2]), "\n\n".join(paras[len(paras) // 2 :])]
    out = {"P_each": args.P // 2, "make_seconds": []}
    for i, text in enumerate(halves):
        run, secs = make_prefix(args, text, Path(args.run).parent / f"half-{i + 1}", args.P // 2)
        out["make_seconds"].append(secs)
        model.load_adapter(run / "adapter", f"half-{i + 1}")
    rows = [K.query_ids(tok, f["question"], doc.layout) for f in facts["facts"]]
    methods = {"first half alone": "half-1", "second half alone": "half-2", "halves composed": ("half-1", "half-2"),
               f"whole document, P={args.P}": "manual"}
    for method, name in methods.items():
        out[method] = {"facts": share(facts, greedy(model, tok, rows, [name] * len(rows), args.max_tokens))}
    held = S.given_examples(tok, doc, [f["question"] for f in facts["facts"]])
    D.teacher_adapters(model, doc)
    D.teacher_answers(model, tok, held, args.answer_tokens, progress=False)
    kl = E.score(model, tok, held, {m: list(n) if isinstance(n, tuple) else n for m, n in methods.items()},
                 progress=False)
    for method in methods:
        out[method]["kl"] = kl[method]["kl"]
        say(f"compose {method}: {json.dumps(out[method])}")
    return out


def _client(app):
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=600)


async def _chats(app, model: str, conversations: list[list[dict]], max_tokens: int) -> list[str]:
    async with _client(app) as c:
        rs = await asyncio.gather(*(c.post("/v1/chat/completions", json={"model": model, "messages": m, "temperature": 0,
                                                                          "max_tokens": max_tokens}) for m in conversations))
    return [r.json()["choices"][0]["message"]["content"].strip() if r.status_code == 200 else f"HTTP {r.status_code}"
            for r in rs]


def served_part(args, run: Path, tok, doc, offline: list[str], facts) -> dict:
    from prefixtune.serving.api import create_app
    from prefixtune.serving.backends import build_engine

    qs = [f["question"] for f in facts["facts"]][: args.served]
    convs = [[{"role": "user", "content": q}] for q in qs]
    adapters = run.parent / "served-adapters"
    adapters.mkdir(exist_ok=True)
    link = adapters / "manual"
    if not link.exists():
        link.symlink_to(run.resolve())
    eng = build_engine(args.model, str(adapters))
    eng.start()
    try:
        got = asyncio.run(_chats(create_app(eng), "manual", convs, args.max_tokens))
    finally:
        eng.stop()
    res = {"torch": {"questions": len(qs), "equal": sum(a == b for a, b in zip(got, offline)), "served": got}}
    say(f"served == offline (torch): {res['torch']['equal']}/{len(qs)}")
    if args.gguf:
        from prefixtune.serving.llamacpp_engine import build_llamacpp_engine, load

        gen = load(args.gguf, {"manual": str(run / "adapter")}, max_batch_size=8)
        try:
            ids = [K.query_ids(gen.engine.tokenizer, q, doc.layout) for q in qs]
            want = [t.strip() for t in gen.generate(ids, "manual", max_tokens=args.max_tokens)]
        finally:
            gen.close()
        eng = build_llamacpp_engine(args.gguf, str(adapters), max_batch_size=8)
        eng.start()
        try:
            got = asyncio.run(_chats(create_app(eng), "manual", convs, args.max_tokens))
        finally:
            eng.close()
        res["llamacpp"] = {"questions": len(qs), "equal": sum(a == b for a, b in zip(got, want)),
                           "equal_to_torch_offline": sum(a == b for a, b in zip(got, offline)), "served": got}
        say(f"served == offline (llama.cpp): {res['llamacpp']['equal']}/{len(qs)}")
    return res


class Loopback:
    """The app on a real loopback socket (uvicorn in a thread), so streamed tokens arrive as they are made."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()


async def _stream_all(url: str, model: str, conversations: list[list[dict]], max_tokens: int) -> dict:
    import httpx

    async def one(c, messages):
        t0, first, tokens, prompt = time.perf_counter(), None, 0, 0
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise SystemExit(f"{model}: HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if first is None and ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                    prompt = ev["usage"]["prompt_tokens"]
        return first, tokens, prompt

    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        t0 = time.perf_counter()
        rows = await asyncio.gather(*(one(c, m) for m in conversations))
        wall = time.perf_counter() - t0
    made = sum(t for _, t, _ in rows)
    return {"requests": len(rows), "wall_s": round(wall, 2), "completion_tokens": made, "tokens_per_s": made / wall,
            "ttft_p50_s": statistics.median(f for f, _, _ in rows if f is not None),
            "prompt_tokens_per_request": statistics.mean(p for _, _, p in rows)}


def serving_part(args, model, tok, facts) -> dict:
    """The document as the system message vs a P-token prefix of it, on one torch engine."""
    import tempfile

    from prefixtune.serving.api import create_app
    from prefixtune.serving.backends import build_engine

    if args.serving_document == "h11":
        text = importlib.metadata.metadata("h11").get_payload()
    elif args.serving_document == "facts":
        text = facts["document"]
    else:
        text = Path(args.serving_document).read_text()
    doc = S.build_document(tok, text, 8000)
    cfg = DistillConfig(num_virtual_tokens=args.P, init="context")
    D.add_student(model, doc, cfg, "serving-prefix")
    qs = [f["question"] for f in facts["facts"]]
    qs = [qs[i % len(qs)] for i in range(args.concurrency)]
    c = model.base_model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * heads * (c.hidden_size // c.num_attention_heads) * model.base_model.dtype.itemsize
    out = {"document": args.serving_document, "context_tokens": doc.context_len, "P": args.P,
           "kv_bytes_per_token": per_token, "concurrency": args.concurrency, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(Path(tmp) / "adapters" / "prefix", "serving-prefix")
        (Path(tmp) / "adapters" / "prefix" / "task.json").write_text(json.dumps({"task": "distill", "layout": doc.layout}))
        eng = build_engine(args.model, str(Path(tmp) / "adapters"), dtype="fp32", max_batch_size=args.concurrency,
                           max_prompt_tokens=doc.context_len + 256, max_total_tokens=doc.context_len + 256 + args.max_tokens)
        with Loopback(create_app(eng)) as url:
            for method, name, convs in (
                    ("document as system message", eng.model_name,
                     [[{"role": "system", "content": text}, {"role": "user", "content": q}] for q in qs]),
                    ("knowledge prefix", "prefix", [[{"role": "user", "content": q}] for q in qs])):
                r = asyncio.run(_stream_all(url, name, convs, args.max_tokens))
                own = r["prompt_tokens_per_request"] + r["completion_tokens"] / r["requests"]
                r["kv_bytes_per_request"] = int(own * per_token)  # the prefix's P key/values are shared, not counted
                out[method] = r
                say(f"serving {method}: {json.dumps(r)}")
    model.delete_adapter("serving-prefix")
    out["prefix_P_kv_bytes_shared"] = args.P * per_token
    out["speedup_tokens_per_s"] = out["knowledge prefix"]["tokens_per_s"] / out["document as system message"]["tokens_per_s"]
    return out


def markdown(r: dict) -> str:
    lines = [f"# Knowledge prefixes as a user judges them: {r['model']}", "",
             f"Document: {r['document']}; P = {r['P']}; made in {r.get('make_seconds')} s (None: reused)."]
    if "facts" in r:
        f = r["facts"]
        lines += ["", "| context | facts right | share |", "|---|---|---|"]
        lines += [f"| {m} | {f[m]['correct']} | {f[m]['share']:.0%} |" for m in ("full", "prefix", "truncated", "none")]
        lines += ["", f"Prefix / full context: {f['prefix_vs_full']:.0%}."]
    if "served" in r:
        lines += [""] + [f"Served == offline ({b}): {v['equal']}/{v['questions']}." for b, v in r["served"].items()]
    if "compose" in r:
        c = r["compose"]
        lines += ["", f"Composition (P = {c['P_each']} per half; KL to the whole-document teacher on the 30 questions):",
                  "", "| prefix | facts right | KL |", "|---|---|---|"]
        lines += [f"| {m} | {v['facts']['correct']} | {v['kl']:.3f} |" for m, v in c.items() if isinstance(v, dict)]
    if "sizes" in r:
        z = r["sizes"]
        full = r["facts"]["full"]["correct"]
        lines += ["", f"Facts against the prefix's length (the same {z['examples']} self-study examples for every P; "
                  f"the document is {z['context_tokens']} tokens; full context: {full}):", "",
                  "| P | share of the document | prefix: facts right | prefix / full | truncated: facts right | training s |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {x['P']} | {x['P'] / z['context_tokens']:.0%} | {x['prefix']['correct']} | "
                  f"{x['prefix']['correct'] / max(full, 1):.0%} | {x['truncated']['correct']} | {x['train_seconds']} |"
                  for x in z["rows"]]
    if "capacity" in r:
        c = r["capacity"]
        lines += ["", f"Capacity check (not a result: P = {c['P']} trained on the teacher's answers to these 30 questions "
                  f"themselves, {r['args']['steps']} steps): {c['facts']['correct']} facts right, against "
                  f"{r['facts']['full']['correct']} with the full document."]
    if "serving" in r:
        s = r["serving"]
        lines += ["", f"Serving ({s['concurrency']} concurrent chat requests, {s['max_tokens']} tokens each, "
                  f"{s['document']} document of {s['context_tokens']} tokens):", "",
                  "| method | tokens/s | TTFT p50 s | prompt tokens | KV bytes per request |", "|---|---|---|---|---|"]
        for m in ("document as system message", "knowledge prefix"):
            v = s[m]
            lines.append(f"| {m} | {v['tokens_per_s']:.1f} | {v['ttft_p50_s']:.2f} | {v['prompt_tokens_per_request']:.0f} | "
                         f"{v['kv_bytes_per_request']:,} |")
        lines += ["", f"Tokens/s ratio: {s['speedup_tokens_per_s']:.1f}x; the prefix's own key/values "
                  f"({s['prefix_P_kv_bytes_shared']:,} bytes) are shared by every request."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct via prefixtune's assets)")
    p.add_argument("--gguf", help="the same model as GGUF for the llama.cpp check (default: SmolLM2's Q4_1 GGUF "
                   "when --model is not given; none otherwise)")
    p.add_argument("--parts", default="facts,served,serving,compose", help="comma-separated: facts (always with "
                   "served/compose/sizes/capacity), served, serving, compose, sizes, capacity")
    p.add_argument("--sizes", default="128,256,all", help="--parts sizes: the prefix lengths (all = the document's)")
    p.add_argument("--capacity-P", type=int, default=128, help="--parts capacity: the prefix length")
    p.add_argument("--facts", default=str(FACTS))
    p.add_argument("--run", default="/tmp/prefixtune-distill-facts/run", help="distill run to make (or reuse)")
    p.add_argument("--P", type=int, default=64)
    p.add_argument("--self-study", type=int, default=256)
    p.add_argument("--turns", type=int, default=1, choices=[1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--answer-tokens", type=int, default=48)
    p.add_argument("--chunk-tokens", type=int, default=_DEFAULTS["chunk_tokens"].default,
                   help="self-study chunk size (default: DistillConfig's)")
    p.add_argument("--families", default=_DEFAULTS["families"].default,
                   help="self-study seed-prompt families and weights (default: DistillConfig's)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy answer length")
    p.add_argument("--served", type=int, default=20, help="questions for the served == offline check")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--serving-document", default="h11", help="h11 (its README, 2,000+ tokens), facts (the handbook) "
                   "or a text file")
    p.add_argument("--out", default=str(HERE / "results" / "distill_facts"))
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if args.model is None:
        from prefixtune.cli.assets import smollm2_dir, smollm2_gguf

        args.model, args.gguf = str(smollm2_dir()), args.gguf or str(smollm2_gguf())
    facts = json.loads(Path(args.facts).read_text())
    report = {"model": Path(args.model).name, "document": facts["title"], "P": args.P, "args": vars(args)}
    torch.manual_seed(0)
    if parts & {"facts", "served", "compose", "sizes", "capacity"}:
        run, report["make_seconds"] = make_prefix(args, facts["document"], Path(args.run), args.P)
    base, tok = load_model(args.model, "fp32", "cpu")
    model = PrefixModel(base)
    doc = S.build_document(tok, facts["document"], 8000)
    if parts & {"facts", "served", "compose", "sizes", "capacity"}:
        model.load_adapter(run / "adapter", "manual")
        report["facts"], offline = facts_part(model, tok, doc, facts, args)
        if "served" in parts:
            report["served"] = served_part(args, run, tok, doc, offline[: args.served], facts)
        if "compose" in parts:
            report["compose"] = compose_part(args, model, tok, doc, facts)
        if "sizes" in parts:
            report["sizes"] = sizes_part(args, model, tok, doc, facts)
        if "capacity" in parts:
            report["capacity"] = capacity_part(args, model, tok, doc, facts)
    if "serving" in parts:
        report["serving"] = serving_part(args, model, tok, facts)
    report["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    Path(args.out + ".md").write_text(markdown(report))
    say(markdown(report))


if __name__ == "__main__":
    main()
