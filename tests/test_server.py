"""The OpenAI-compatible server: parity with offline generation, streaming, bad input, hot loading, limits,
metrics, graceful shutdown, and a bounded loopback load test."""

import asyncio
import json
import random
import time

import pytest
import torch

pytest.importorskip("fastapi")  # before the imports it guards
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from helpers import LiveServer, lively, make, metric, offline, offline_seq2seq  # noqa: E402
from helpers import id_tokenizer as word_tokenizer  # noqa: E402

import prefixtune as pt  # noqa: E402
from prefixtune.model import PrefixModel  # noqa: E402
from prefixtune.serving.api import create_app  # noqa: E402
from prefixtune.serving.backends import build_engine  # noqa: E402
from prefixtune.serving.torch_engine import TorchEngine as Engine  # noqa: E402

BASE = "tiny-llama"
ADAPTERS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = make("llama")
    base.save_pretrained(root / BASE)
    word_tokenizer().save_pretrained(root / BASE)
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=4), "alpha")
    model.add_adapter("beta", pt.PrefixConfig(num_virtual_tokens=7))
    model.add_adapter("gamma", pt.PrefixConfig(num_virtual_tokens=3, projection=True, projection_dim=32))
    for name in ADAPTERS:
        model.save_adapter(root / "adapters" / name, name)
    # Made for another model (3 layers): skipped at startup, refused on hot load.
    pt.attach(make("llama", layers=3), pt.PrefixConfig(num_virtual_tokens=4)).save_adapter(root / "adapters" / "wrong")
    pickled = root / "adapters" / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((root / "adapters" / "alpha" / "adapter_config.json").read_text())
    torch.save({"prompt_embeddings": torch.zeros(4, 256)}, pickled / "adapter_model.bin")
    model.save_adapter(root / "outside", "alpha")
    return root


@pytest.fixture(scope="module")
def engine(dirs):
    eng = build_engine(str(dirs / BASE), str(dirs / "adapters"), max_prompt_tokens=64, max_total_tokens=128)
    assert eng.load_dir() == list(ADAPTERS)  # eagerly, so the offline references below can use eng.model
    eng.start()
    yield eng
    eng.stop()


def call(app, fn):
    """Run `fn(client)` against the ASGI app in a fresh event loop."""

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as c:
            return await fn(c)

    return asyncio.run(go())


def sse_events(text):
    events = [block[len("data: "):] for block in text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def reference_text(engine, prompt, adapter, max_tokens):
    ids = engine.tokenizer(prompt)["input_ids"]
    with engine.lock:
        toks = offline(engine.model, ids, adapter, max_tokens)
    return engine.tokenizer.decode(toks, skip_special_tokens=True), len(ids), len(toks)


PROMPTS = ["w5 w9 w10", "w40 w41", "w7 w8 w9 w10 w11 w12 w13"]


def test_models_lists_base_and_adapter_directories(engine):
    """Every adapter directory is listed (indexed, not loaded); 'wrong' and 'pickled' fail their own requests with
    a 422 naming why, and the server goes on."""
    async def run(c):
        bad = {m: await c.post("/v1/completions", json={"model": m, "prompt": "hello", "max_tokens": 2})
               for m in ("wrong", "pickled")}
        good = await c.post("/v1/completions", json={"model": "alpha", "prompt": "hello", "max_tokens": 2})
        return bad, good, (await c.get("/v1/models")).json()

    bad, good, body = call(create_app(engine), run)
    ids = [m["id"] for m in body["data"]]
    assert ids == [BASE, *sorted([*ADAPTERS, "pickled", "wrong"])]
    assert body["data"][1]["parent"] == BASE
    assert bad["wrong"].status_code == 422 and "num_layers: adapter 3 vs model 2" in bad["wrong"].json()["error"]["message"]
    assert bad["pickled"].status_code == 422, bad["pickled"].text
    assert bad["pickled"].status_code == 422 and "pickles are not loaded" in bad["pickled"].json()["error"]["message"]
    assert good.status_code == 200, good.text
    resident = {m["id"]: m["resident"] for m in body["data"][1:]}
    assert resident["alpha"] and not resident["wrong"] and not resident["pickled"]


def test_greedy_output_equals_offline_generation_alone_and_in_mixed_batches(engine):
    app = create_app(engine)
    cases = [(p, m, 6 + i % 5) for i, (p, m) in enumerate((p, m) for p in PROMPTS for m in (BASE, *ADAPTERS))]
    expected = [reference_text(engine, p, None if m == BASE else m, k) for p, m, k in cases]

    async def one(c, p, m, k, stream=False):
        body = {"model": m, "prompt": p, "max_tokens": k, "temperature": 0, "stream": stream}
        r = await c.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}} if stream else body)
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["choices"][0]["text"], r.json()["usage"]
        ev = sse_events(r.text)
        return "".join(e["choices"][0]["text"] for e in ev if e["choices"]), ev[-1]["usage"]

    async def alone(c):
        return [await one(c, *case) for case in cases[:6]]

    async def mixed(c):  # all at once, every adapter and the bare model in the same batches, half streamed
        return await asyncio.gather(*(one(c, *case, stream=i % 2 == 1) for i, case in enumerate(cases)))

    for (text, usage), (ref, n_prompt, n_out) in zip(call(app, alone), expected):
        assert text == ref
        assert usage == {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
    batch_hist_before = dict(engine.stats.batch_sizes)
    got = call(app, mixed)
    assert [t for t, _ in got] == [e[0] for e in expected]
    assert max(k for k, v in engine.stats.batch_sizes.items() if v > batch_hist_before.get(k, 0)) > 4  # really batched


def test_chat_uses_the_template_and_counts_usage(engine):
    messages = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": [{"type": "text", "text": "w30 w31"}]}]
    ids = engine.tokenizer(engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w30 w31"}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)["input_ids"]
    with engine.lock:
        toks = offline(engine.model, ids, "beta", 8)
    ref = engine.tokenizer.decode(toks, skip_special_tokens=True)
    app = create_app(engine)
    body = {"model": "beta", "messages": messages, "max_tokens": 8, "temperature": 0}
    r = call(app, lambda c: c.post("/v1/chat/completions", json=body)).json()
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": ref}
    assert r["usage"]["prompt_tokens"] == len(ids) == 9 and r["usage"]["completion_tokens"] == len(toks)
    s = call(app, lambda c: c.post("/v1/chat/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}}))
    ev = sse_events(s.text)
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev if e["choices"]) == ref
    # OpenAI's include_usage contract: every chunk has "usage", null but in the last one, whose choices are empty
    assert all(e["usage"] is None and len(e["choices"]) == 1 for e in ev[:-1])
    assert ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] == len(toks)
    plain = sse_events(call(app, lambda c: c.post("/v1/chat/completions", json={**body, "stream": True})).text)
    assert all(len(e["choices"]) == 1 and "usage" not in e for e in plain)  # not asked: no usage chunk, no field


def test_n_seed_and_stop(engine):
    app = create_app(engine)
    body = {"model": "gamma", "prompt": "w5 w6", "max_tokens": 10, "temperature": 1.2, "seed": 7, "n": 3, "ignore_eos": True}
    a = call(app, lambda c: c.post("/v1/completions", json=body)).json()
    b = call(app, lambda c: c.post("/v1/completions", json=body)).json()
    texts = [ch["text"] for ch in a["choices"]]
    assert [ch["index"] for ch in a["choices"]] == [0, 1, 2]
    assert texts == [ch["text"] for ch in b["choices"]]  # seeded: reproducible
    assert len(set(texts)) > 1  # choice i uses seed + i
    assert a["usage"]["completion_tokens"] == 30

    full, _, _ = reference_text(engine, "w5 w6", "gamma", 10)
    stop = full.split()[2]
    r = call(app, lambda c: c.post("/v1/completions", json={"model": "gamma", "prompt": "w5 w6", "max_tokens": 10,
                                                            "temperature": 0, "stop": [stop]})).json()
    assert r["choices"][0]["text"] == full[: full.find(stop)] and r["choices"][0]["finish_reason"] == "stop"


BAD = [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, "must be a JSON object"),
    ("/v1/completions", {"prompt": "w5"}, 400, "missing required field 'model'"),
    ("/v1/completions", {"model": "alpha"}, 400, "missing required field 'prompt'"),
    ("/v1/completions", {"model": 5, "prompt": "w5"}, 400, "'model' must be a str"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "max_tokens": "9"}, 400, "'max_tokens' must be an int"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "max_tokens": -3}, 400, "'max_tokens' must be at least 1"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "max_tokens": 10**12}, 400, "exceeds the limit of 128 tokens"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "max_tokens": True}, 400, "'max_tokens' must be an int"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "temperature": 9}, 400, "'temperature' must be between 0 and 2"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "n": 0}, 400, "'n' must be between 1 and 8"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "stop": [""]}, 400, "'stop' must be"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "stream": "yes"}, 400, "'stream' must be a bool"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5", "seed": 1.5}, 400, "'seed' must be an int"),
    ("/v1/completions", {"model": "nope", "prompt": "w5"}, 404, "available: ['tiny-llama', 'alpha', 'beta', 'gamma', 'pickled', 'wrong']"),
    ("/v1/completions", {"model": "alpha", "prompt": ""}, 400, "'prompt' is empty"),
    ("/v1/completions", {"model": "alpha", "prompt": []}, 400, "'prompt' is empty"),
    ("/v1/completions", {"model": "alpha", "prompt": [5, 500]}, 400, "token ids must be in [0, 128)"),
    ("/v1/completions", {"model": "alpha", "prompt": {"a": 1}}, 400, "'prompt' must be a string or a list of token ids"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5 " * 65}, 400, "limit is 64 prompt tokens and 128 tokens in total"),
    ("/v1/completions", {"model": "alpha", "prompt": "w5 " * 2_000_000}, 413, "the limit is"),
    ("/v1/chat/completions", {"model": "alpha"}, 400, "missing required field 'messages'"),
    ("/v1/chat/completions", {"model": "alpha", "messages": []}, 400, "non-empty list"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "wizard", "content": "w5"}]}, 400, "needs a 'role'"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": 5}]}, 400, "content must be a string"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": ""}]}, 400, "all empty"),
    ("/v1/adapters", {"name": "../evil", "path": "alpha"}, 400, "not a plain name"),
    ("/v1/adapters", {"name": "evil", "path": "../outside"}, 400, "leaves the adapters directory"),
    ("/v1/adapters", {"name": "evil", "path": "/etc"}, 400, "leaves the adapters directory"),
    ("/v1/adapters", {"name": "evil", "path": "alpha/../../outside"}, 400, "leaves the adapters directory"),
    ("/v1/adapters", {"name": "evil", "path": "missing"}, 404, "no adapter at 'missing'"),
    ("/v1/adapters", {"name": "evil", "path": "wrong"}, 422, "shapes differ: num_layers: adapter 3 vs model 2"),
    ("/v1/adapters", {"name": "evil", "path": "pickled"}, 422, "pickles are not loaded"),
    ("/v1/adapters", {"name": "alpha", "path": "alpha"}, 409, "already loaded"),
    ("/v1/adapters", {"name": BASE, "path": "alpha"}, 409, "base model's name"),
    ("/v1/adapters", {"name": "evil"}, 400, "missing required field 'path'"),
]


def test_bad_input_gets_a_specific_4xx_and_the_server_stays_up(engine):
    app = create_app(engine)

    async def run(c):
        out = []
        for path, body, status, msg in BAD:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            out.append((path, body, status, msg, await c.post(path, **kw)))
        out.append(("delete", None, 404, "unknown adapter 'nope'", await c.delete("/v1/adapters/nope")))
        out.append(("delete", None, 400, "is the base model", await c.delete(f"/v1/adapters/{BASE}")))
        out.append(("health", None, 200, "", await c.get("/health")))
        return out

    for path, body, status, msg, r in call(app, run):
        assert r.status_code == status, (path, str(body)[:80], r.text)
        if msg:
            assert msg in r.json()["error"]["message"], (path, str(body)[:80], r.json())
    models = call(app, lambda c: c.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [BASE, *sorted([*ADAPTERS, "pickled", "wrong"])]


def test_hot_load_and_unload(engine):
    app = create_app(engine)
    ref, _, _ = reference_text(engine, "w5 w9", "beta", 6)
    req = {"model": "beta2", "prompt": "w5 w9", "max_tokens": 6, "temperature": 0}

    async def run(c):
        assert (await c.post("/v1/completions", json=req)).status_code == 404
        r = await c.post("/v1/adapters", json={"name": "beta2", "path": "beta"})
        assert r.status_code == 201, r.text
        got = (await c.post("/v1/completions", json=req)).json()["choices"][0]["text"]
        assert "beta2" in [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        assert (await c.delete("/v1/adapters/beta2")).json()["deleted"] is True
        after = await c.post("/v1/completions", json=req)
        return got, after

    got, after = call(app, run)
    assert got == ref
    assert after.status_code == 404 and "beta2" not in after.json()["error"]["message"].split("available")[1]


def test_queue_full_is_429_with_retry_after_and_timeouts_are_408():
    model = PrefixModel(make("llama"))
    eng = Engine(model, word_tokenizer(), model_name="m", max_queue=2, request_timeout=30)  # not started yet
    app = create_app(eng)
    body = {"model": "m", "prompt": "w5 w6", "max_tokens": 3}

    # Fill the queue while the worker is not running, see 429, then start it and see the queued ones finish.
    async def simple(c):
        waiting = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(2)]
        while eng.queue_depth < 2:
            await asyncio.sleep(0.005)
        full = await c.post("/v1/completions", json=body)
        eng.start()
        return full, await asyncio.gather(*waiting)

    full, ok = call(app, simple)
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"
    assert "queue is full" in full.json()["error"]["message"]
    assert [r.status_code for r in ok] == [200, 200]
    eng.stop()

    eng2 = Engine(PrefixModel(make("llama")), word_tokenizer(), model_name="m", request_timeout=0.05)  # not started

    async def timeout(c):
        t = asyncio.create_task(c.post("/v1/completions", json=body))
        s = asyncio.create_task(c.post("/v1/completions", json={**body, "stream": True}))
        await asyncio.sleep(0.2)
        eng2.start()
        return await t, await s

    t, s = call(create_app(eng2), timeout)
    eng2.stop()
    assert t.status_code == 408 and "timed out after 0.05s" in t.json()["error"]["message"]
    assert s.status_code == 200 and "timed out" in s.text and s.text.rstrip().endswith("[DONE]")


def test_health_and_metrics(engine):
    app = create_app(engine)

    async def run(c):
        await c.post("/v1/completions", json={"model": "alpha", "prompt": "w5", "max_tokens": 3})
        await c.post("/v1/completions", json={"model": "nope", "prompt": "w5"})
        return await c.get("/health"), await c.get("/metrics")

    health, metrics = call(app, run)
    assert health.json()["status"] == "ok" and health.json()["adapters"] == sorted([*ADAPTERS, "pickled", "wrong"])
    text = metrics.text
    assert metric(text, "prefixtune_requests_total", endpoint="/v1/completions", status=200) == 1
    assert metric(text, "prefixtune_requests_total", endpoint="/v1/completions", status=404) == 1
    assert metric(text, "prefixtune_queue_depth") == 0 and metric(text, "prefixtune_adapters_loaded") == 3
    assert metric(text, "prefixtune_request_latency_seconds_bucket", le="+Inf") == 1
    assert metric(text, "prefixtune_generation_tokens_total") >= 3
    steps = metric(text, "prefixtune_decode_steps_total")
    assert steps >= 1 and metric(text, "prefixtune_step_batch_size_count") == steps
    assert metric(text, "prefixtune_step_batch_size_bucket", le="+Inf") == steps
    assert metrics.headers["content-type"].startswith("text/plain")
    om = call(app, lambda c: c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}))
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.rstrip().endswith("# EOF")


def test_metrics_registries_are_per_app(engine):
    """Two apps in one process count their own requests (prometheus_client's global registry would mix them)."""
    a, b = create_app(engine), create_app(engine)
    call(a, lambda c: c.get("/v1/models"))
    call(a, lambda c: c.post("/v1/completions", json={"model": "nope", "prompt": "w5"}))
    text_a, text_b = (call(app, lambda c: c.get("/metrics")).text for app in (a, b))
    assert metric(text_a, "prefixtune_requests_total", endpoint="/v1/completions", status=404) == 1
    with pytest.raises(KeyError):
        metric(text_b, "prefixtune_requests_total", endpoint="/v1/completions", status=404)


# ---- real server on loopback --------------------------------------------------------------------------------
async def complete_request(c, model, prompt, max_tokens, stream, n=1):
    """One request; returns (status, completion_tokens, finish_reasons) after checking it is complete."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": 1, "stream": stream,
            "n": n, "ignore_eos": True}
    if not stream:
        r = await c.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, 0, []
        j = r.json()
        return 200, j["usage"]["completion_tokens"], [ch["finish_reason"] for ch in j["choices"]]
    async with c.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
        raw = (await r.aread()).decode()
    if r.status_code != 200:
        return r.status_code, 0, []
    ev = sse_events(raw)
    return 200, ev[-1]["usage"]["completion_tokens"], [e["choices"][0]["finish_reason"] for e in ev if e["choices"] and e["choices"][0]["finish_reason"]]  # noqa: E501


def rss_mb():
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def test_load_loopback_mixed_adapters_and_streaming(dirs):
    eng = build_engine(str(dirs / BASE), str(dirs / "adapters"), max_batch_size=32, max_queue=64)
    models = [BASE, *ADAPTERS]
    rng = random.Random(0)
    jobs = [(rng.choice(models), " ".join(f"w{rng.randrange(3, 128)}" for _ in range(rng.randrange(1, 20))),
             rng.randrange(1, 24), i % 2 == 0, 2 if i % 17 == 0 else 1) for i in range(320)]

    async def run(url):
        sem = asyncio.Semaphore(32)
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            async def one(job):
                async with sem:
                    return await complete_request(c, *job)
            return await asyncio.gather(*(one(j) for j in jobs))

    with LiveServer(eng) as url:
        asyncio.run(run(url))  # warm-up: first-time allocations are not growth
        before = rss_mb()
        t0 = time.monotonic()
        results = asyncio.run(run(url))
        elapsed = time.monotonic() - t0
        after = rss_mb()
    assert not eng._thread.is_alive()  # lifespan shutdown stopped the worker
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == len(jobs), {s: statuses.count(s) for s in set(statuses)}
    for (model, prompt, max_tokens, stream, n), (_, tokens, finishes) in zip(jobs, results):
        assert finishes == ["length"] * n and tokens == max_tokens * n
    assert eng._cache is None and eng.running == 0 and eng.queue_depth == 0
    assert after - before < 200, f"RSS grew {after - before:.0f} MB over a repeat of the same load"
    assert max(eng.stats.batch_sizes) > 8
    print(f"load: {len(jobs)} requests in {elapsed:.1f}s")


def test_graceful_shutdown_finishes_in_flight_requests(dirs):
    eng = build_engine(str(dirs / BASE), str(dirs / "adapters"))
    live = LiveServer(eng)

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            tasks = [asyncio.create_task(complete_request(c, m, "w5 w6 w7", 60, i % 2 == 0)) for i, m in enumerate([BASE, *ADAPTERS] * 2)]
            while eng.running < 8:
                await asyncio.sleep(0.005)
            live.server.should_exit = True  # what SIGTERM does
            return await asyncio.gather(*tasks)

    with live as url:
        results = asyncio.run(run(url))
        live.thread.join(30)
    assert [r[:2] for r in results] == [(200, 60)] * 8
    assert not eng._thread.is_alive()


def test_cli_arguments_default_to_loopback(monkeypatch):
    import prefixtune.cli.serve as serve

    seen = {}
    monkeypatch.setattr(serve, "run_server", lambda *a, **k: seen.update(args=a, kw=k))
    assert serve.main(["--model", "m", "--adapters", "d", "--max-queue", "5"]) == 0
    assert seen["args"] == ("m", "d") and seen["kw"]["host"] == "127.0.0.1" and seen["kw"]["port"] == 8000
    assert seen["kw"]["max_queue"] == 5


def test_client_disconnect_frees_the_row(dirs):
    eng = build_engine(str(dirs / BASE), str(dirs / "adapters"))

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"model": "alpha", "prompt": "w5 w6", "max_tokens": 100, "stream": True, "ignore_eos": True}
            async with c.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # first token arrived; hang up
        deadline = time.monotonic() + 10
        while eng.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return eng.running

    with LiveServer(eng) as url:
        assert asyncio.run(run(url)) == 0
    assert eng.stats.completion_tokens < 100


# ---- OpenAI extras: logprobs, penalties, logit_bias, echo, stream_options ----------------------------------
def generate_with_scores(engine, prompt, adapter, max_new, **kw):
    ids = engine.tokenizer(prompt)["input_ids"]
    with engine.lock:
        out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    adapter_names=[adapter], do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                                    output_logits=True, return_dict_in_generate=True, **kw)
    toks = out.sequences[0, len(ids):].tolist()
    return toks, [torch.log_softmax(l[0].float(), -1) for l in out.logits]


def test_completion_logprobs_are_the_models_own_and_stream_the_same(engine):
    toks, logp = generate_with_scores(engine, "w5 w9 w10", "beta", 6)
    body = {"model": "beta", "prompt": "w5 w9 w10", "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    app = create_app(engine)
    r = call(app, lambda c: c.post("/v1/completions", json=body)).json()["choices"][0]
    lp = r["logprobs"]
    assert lp["tokens"] == [engine.tokenizer.decode([t]) for t in toks]
    assert lp["token_logprobs"] == pytest.approx([float(logp[i][t]) for i, t in enumerate(toks)], abs=1e-5)
    for i, top in enumerate(lp["top_logprobs"]):
        ref = logp[i].topk(3)
        assert list(top) == [engine.tokenizer.decode([t]) for t in ref.indices.tolist()]
        assert list(top.values()) == pytest.approx(ref.values.tolist(), abs=1e-5)
        assert max(top.values()) == pytest.approx(lp["token_logprobs"][i], abs=1e-6)  # greedy picks the top one
    assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:i]) for i in range(len(toks))]
    ev = sse_events(call(app, lambda c: c.post("/v1/completions", json={**body, "stream": True})).text)
    streamed = [x for e in ev if e["choices"] and e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-6)


def test_chat_logprobs_and_stream_options(engine):
    app = create_app(engine)
    body = {"model": "alpha", "messages": [{"role": "user", "content": "w30 w31"}], "max_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    r = call(app, lambda c: c.post("/v1/chat/completions", json=body)).json()["choices"][0]
    content = r["logprobs"]["content"]
    assert [e["token"] for e in content] == r["message"]["content"].split()  # a word-level tokenizer: one word a token
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"]) for e in content)
    assert all(e["bytes"] == list(e["token"].encode()) for e in content)
    plain = call(app, lambda c: c.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None})).json()
    assert plain["choices"][0]["logprobs"] is None
    ev = sse_events(call(app, lambda c: c.post("/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": False}})).text)
    assert all(e["choices"] for e in ev) and "usage" not in ev[-1]  # no usage chunk when asked not to
    assert [x["logprob"] for e in ev if e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"]["content"]] == \
        pytest.approx([e["logprob"] for e in content], abs=1e-6)


def test_repetition_penalty_matches_generate_and_logit_bias_forces_a_token(engine):
    app = create_app(engine)
    toks, _ = generate_with_scores(engine, "w5 w6 w5 w6", "gamma", 8, repetition_penalty=1.8)
    plain, _ = generate_with_scores(engine, "w5 w6 w5 w6", "gamma", 8)
    assert toks != plain  # the penalty really changes this generation, so the comparison below means something
    body = {"model": "gamma", "prompt": "w5 w6 w5 w6", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    got = call(app, lambda c: c.post("/v1/completions", json={**body, "repetition_penalty": 1.8})).json()
    assert got["choices"][0]["text"] == engine.tokenizer.decode(toks, skip_special_tokens=True)
    forced = engine.tokenizer("w77", add_special_tokens=False)["input_ids"][0]
    r = call(app, lambda c: c.post("/v1/completions", json={**body, "logit_bias": {str(forced): 100}})).json()
    assert r["choices"][0]["text"].split() == ["w77"] * 8


def test_presence_and_frequency_penalties_follow_openai_formula():
    from prefixtune.serving.request import Request, SamplingParams

    r = Request(None, [1, 2], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((9, -3.0),)), lambda ev: None)
    r.generated = [4, 4, 4, 7]
    row = r.shaping(torch.tensor([r.prompt_ids + r.generated]), torch.zeros(1, 16))[0]
    want = torch.zeros(16)
    want[4], want[7], want[9] = -(0.5 + 3 * 0.25), -(0.5 + 0.25), -3.0
    assert torch.equal(row, want)  # prompt tokens 1, 2 are not penalised by OpenAI's penalties


def test_seeded_sampling_equals_generate_with_the_same_seed(engine):
    """Sampling goes through transformers' own processors, so one seeded request draws what generate() draws."""
    prompt, k = "w5 w9 w10", 10
    ids = engine.tokenizer(prompt)["input_ids"]
    kw = dict(temperature=0.7, top_p=0.8, repetition_penalty=1.3)
    with engine.lock:
        torch.manual_seed(11)
        out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    adapter_names=["beta"], do_sample=True, top_k=0, max_new_tokens=k, min_new_tokens=k, **kw)
    ref = engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    body = {"model": "beta", "prompt": prompt, "max_tokens": k, "seed": 11, "ignore_eos": True, **kw}
    r = call(create_app(engine), lambda c: c.post("/v1/completions", json=body)).json()
    assert r["choices"][0]["text"] == ref
    greedy = call(create_app(engine), lambda c: c.post("/v1/completions", json={**body, "temperature": 0})).json()
    assert greedy["choices"][0]["text"] != ref  # the draw is a real sample, not the argmax path


def test_echo_prepends_the_prompt(engine):
    app = create_app(engine)
    body = {"model": "alpha", "prompt": "w5 w9", "max_tokens": 4, "temperature": 0, "echo": True}
    ref, _, _ = reference_text(engine, "w5 w9", "alpha", 4)
    r = call(app, lambda c: c.post("/v1/completions", json=body)).json()
    assert r["choices"][0]["text"] == "w5 w9" + ref
    ev = sse_events(call(app, lambda c: c.post("/v1/completions", json={**body, "stream": True})).text)
    assert "".join(e["choices"][0]["text"] for e in ev if e["choices"]) == "w5 w9" + ref


BAD_EXTRAS = [
    ({"best_of": 3}, "'best_of' is not supported"),
    ({"suffix": "w9"}, "'suffix' (insertion) is not supported"),
    ({"tools": [{"type": "function"}]}, "'tools' (function calling) is not supported"),
    ({"response_format": {"type": "json_object"}}, "'response_format' other than"),
    ({"echo": True, "logprobs": 2}, "'echo' together with 'logprobs'"),
    ({"logprobs": 50}, "'logprobs' must be between 0 and 20"),
    ({"presence_penalty": 3}, "'presence_penalty' must be between -2 and 2"),
    ({"frequency_penalty": "x"}, "'frequency_penalty' must be a number"),
    ({"repetition_penalty": 0}, "'repetition_penalty' must be in (0, 10]"),
    ({"logit_bias": {"w5": 1}}, "'logit_bias' must map token ids"),
    ({"logit_bias": {"5": 500}}, "'logit_bias' must map token ids"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "'stream_options.include_usage' must be a bool"),
    ({"stream_options": {"include_usage": True}}, "'stream_options' is only allowed with 'stream': true"),
    ({"top_p": 1.5}, "'top_p' must be in (0, 1], got 1.5"),
    ({"max_completion_tokens": 0}, "'max_completion_tokens' must be at least 1, got 0"),
]


@pytest.mark.parametrize("extra,msg", BAD_EXTRAS)
def test_unsupported_or_bad_openai_fields_are_400_not_ignored(engine, extra, msg):
    r = call(create_app(engine), lambda c: c.post("/v1/completions", json={"model": "alpha", "prompt": "w5", **extra}))
    assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text


def test_chat_top_logprobs_needs_logprobs(engine):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2}
    r = call(create_app(engine), lambda c: c.post("/v1/chat/completions", json=body))
    assert r.status_code == 400 and "'top_logprobs' needs 'logprobs': true" in r.json()["error"]["message"]


@pytest.mark.parametrize("extra,param", [
    ({"max_tokens": "9"}, "max_tokens"), ({"temperature": True}, "temperature"), ({"stop": 5}, "stop"),
    ({"best_of": 3}, "best_of"), ({"echo": True, "logprobs": 2}, "echo"), ({"model": None}, "model"),
    ({"prompt": None}, "prompt"), ({"logit_bias": {"5": 500}}, "logit_bias"),
])
def test_validation_errors_are_openai_400s_naming_the_param(engine, extra, param):
    r = call(create_app(engine), lambda c: c.post("/v1/completions", json={"model": "alpha", "prompt": "w5", **extra}))
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error", r.text
    assert f"'{param}'" in err["message"]


# ---- how the PyTorch engine loads its model: GGUF, dtype, encoder-decoder, encoders refused -----------------
def test_serve_loads_a_gguf_like_train_does_and_serves_it(tmp_path):
    pytest.importorskip("gguf")
    from gguf_models import write_tiny_gguf

    from prefixtune.loading import load_model

    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    base, tok = load_model(str(path), "fp32", "cpu")
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=5), "sent")
    model.save_adapter(tmp_path / "adapters" / "sent", "sent")
    eng = build_engine(str(path), str(tmp_path / "adapters"))
    assert eng.model_name == "tiny" and eng.adapter_names() == ["sent"] and eng.base.dtype == torch.float32
    ids = tok("the movie was great")["input_ids"]
    ref = tok.decode(offline(model, ids, "sent", 8), skip_special_tokens=True)
    eng.start()  # the test client does not run the app's lifespan
    try:
        r = call(create_app(eng), lambda c: c.post("/v1/completions", json={"model": "sent", "prompt": "the movie was great",
                                                                             "max_tokens": 8, "temperature": 0}))
    finally:
        eng.stop()
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref
    assert build_engine(str(path), dtype="bf16").base.dtype == torch.bfloat16  # what --dtype bf16 (or auto on a GPU) gives


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_adapters_are_served_equal_to_generate(tmp_path, kind):

    model = lively(pt.attach(make(kind), pt.PrefixConfig(num_virtual_tokens=4), "alpha"))
    model.add_adapter("beta", pt.PrefixConfig(num_virtual_tokens=6))
    lively(model, seed=1)
    model.base_model.save_pretrained(tmp_path / kind)
    word_tokenizer().save_pretrained(tmp_path / kind)
    for name in ("alpha", "beta"):
        model.save_adapter(tmp_path / "adapters" / name, name)
    eng = build_engine(str(tmp_path / kind), str(tmp_path / "adapters"))
    assert eng.load_dir() == ["alpha", "beta"]  # eagerly: the references below use eng.model
    tok = eng.tokenizer
    cases = [(p, m) for p in ("w5 w9 w10", "w40 w41 w7") for m in ("alpha", "beta", kind)]
    with eng.lock:
        refs = [tok.decode(offline_seq2seq(eng.model, tok(p)["input_ids"], None if m == kind else m, 6), skip_special_tokens=True)
                for p, m in cases]

    async def run(c):
        rs = await asyncio.gather(*(c.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": 6, "temperature": 0,
                                                                     "stream": i % 2 == 1}) for i, (p, m) in enumerate(cases)))
        return [r.json()["choices"][0]["text"] if i % 2 == 0 else
                "".join(e["choices"][0]["text"] for e in sse_events(r.text) if e["choices"]) for i, r in enumerate(rs)]

    eng.start()  # the test client does not run the app's lifespan
    try:
        assert call(create_app(eng), run) == refs
    finally:
        eng.stop()
    assert len(set(refs)) > 3


def test_encoder_classifiers_are_refused_at_build_time(tmp_path):
    make("bert").save_pretrained(tmp_path / "bert")
    word_tokenizer().save_pretrained(tmp_path / "bert")
    with pytest.raises(pt.ConfigError, match="encoder .*cannot be served"):
        build_engine(str(tmp_path / "bert"))
