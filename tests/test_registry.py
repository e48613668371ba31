"""Many adapters on one engine: index without loading, load on first use, LRU eviction under a budget that never
drops an adapter in use, pins, rescans, corrupted and removed adapters failing only their own requests."""

import shutil

import pytest
import torch
from helpers import Collector, id_tokenizer, make, metric

import prefixtune as pt
from prefixtune.config import ConfigError
from prefixtune.serving.errors import AdapterLoadFailed, CapacityUnavailable, UnknownAdapter
from prefixtune.serving.registry import AdapterRegistry, parse_size
from prefixtune.serving.request import Request, SamplingParams
from prefixtune.serving.torch_engine import TorchEngine

N = 6


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """N adapters of different lengths for one tiny Llama, with N(0, 1) tables so outputs depend on the adapter."""
    root = tmp_path_factory.mktemp("many")
    torch.manual_seed(0)
    base = make("llama")
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=2, init="random", layer_scale=False), "a0")
    for i in range(1, N):
        model.add_adapter(f"a{i}", pt.PrefixConfig(num_virtual_tokens=2 + i, init="random", layer_scale=False))
    with torch.no_grad():
        for p in model.prefixes.parameters():
            p.normal_()
    for i in range(N):
        model.save_adapter(root / "adapters" / f"a{i}", f"a{i}")
    return {"root": root, "base": base.state_dict()}


def engine(adapters, **kw):
    base = make("llama")
    base.load_state_dict(adapters["base"])
    return TorchEngine(pt.PrefixModel(base), id_tokenizer(), model_name="m", adapters_dir=adapters["root"] / "adapters", **kw)


def run(eng, work):
    """Greedy tokens for [(adapter, prompt ids)], submitted together."""
    got = Collector(len(work))
    eng.submit([Request(a, p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), got(i))
                for i, (a, p) in enumerate(work)])
    got.wait()
    return [got.tokens[i] if not got.final[i].error else got.final[i].error for i in range(len(work))]


WORK = [(f"a{i % N}" if i % 7 else None, [3 + i, 9, 4 + (i * 5) % 50]) for i in range(24)]


def test_index_reads_no_weights_and_lazy_equals_eager(adapters):
    eager = engine(adapters)
    assert eager.load_dir() == [f"a{i}" for i in range(N)]
    lazy = engine(adapters)
    assert lazy.index() == [f"a{i}" for i in range(N)]
    assert lazy.registry.resident_names() == [] and lazy.model.prefixes.keys() == set()
    assert [e.num_virtual_tokens for e in lazy.registry.entries()] == [2 + i for i in range(N)]
    eager.start(), lazy.start()
    try:
        ref, got = run(eager, WORK), run(lazy, WORK)
    finally:
        eager.stop(), lazy.stop()
    assert got == ref and len({tuple(t) for t in ref}) > N  # adapters change the output
    assert lazy.registry.resident_names() == [f"a{i}" for i in range(N)]
    assert lazy.registry.stats.adapter_misses == N and lazy.registry.stats.adapter_hits == len([a for a, _ in WORK if a]) - N


def test_a_large_directory_is_indexed_in_the_background_and_served_meanwhile(adapters, monkeypatch):
    """Past BACKGROUND_INDEX_OVER directories, index() returns before the index is complete; a request for an
    adapter not indexed yet is found by name and gives the same tokens as an engine that indexed everything."""
    import threading

    from prefixtune.serving import registry as reg

    ref_eng = engine(adapters)
    ref_eng.index()
    monkeypatch.setattr(reg, "BACKGROUND_INDEX_OVER", 2)
    gate, read = threading.Event(), reg.read_entry

    def gated(*a, **kw):  # the background indexer waits at the gate; a request's own lookup does not
        if threading.current_thread().name == "adapter-index":
            assert gate.wait(30)
        return read(*a, **kw)

    monkeypatch.setattr(reg, "read_entry", gated)
    lazy = engine(adapters)
    assert lazy.index() == [] and lazy.registry.indexing
    work = [(f"a{N - 1}", [3, 9, 4]), ("a2", [5, 9, 4])]
    ref_eng.start(), lazy.start()
    try:
        assert run(lazy, work) == run(ref_eng, work)
        assert lazy.registry.names() == ["a2", f"a{N - 1}"]  # found by name while the index waits
        gate.set()
        assert lazy.registry.wait_indexed(30) and not lazy.registry.indexing
        assert lazy.adapter_names() == ref_eng.adapter_names() == [f"a{i}" for i in range(N)]
        assert [e.num_virtual_tokens for e in lazy.registry.entries()] == [2 + i for i in range(N)]
    finally:
        gate.set()
        ref_eng.stop(), lazy.stop()


def test_eviction_under_a_budget_keeps_outputs_exact(adapters):
    ref_eng = engine(adapters)
    ref_eng.load_dir()
    small = engine(adapters, max_loaded_adapters=2, max_batch_size=4)
    small.index()
    ref_eng.start(), small.start()
    try:
        ref, got = run(ref_eng, WORK), run(small, WORK)
    finally:
        ref_eng.stop(), small.stop()
    assert got == ref
    assert len(small.registry.resident_names()) <= 2 and small.registry.stats.adapter_evictions >= N - 2
    assert len(small.model.prefixes) <= 2  # evicted adapters left the model too
    # the registry's resident set (what its budget counts) is exactly what the model holds
    assert small.registry.resident_names() == sorted(small.model.prefixes)
    assert small.registry.resident_names() == sorted(e.name for e in small.registry.entries() if e.resident)


def test_eviction_never_drops_an_adapter_a_request_holds(adapters):
    loaded = []
    reg = AdapterRegistry(lambda n, d: loaded.append(n) or 100, lambda n: loaded.remove(n), max_loaded=2)
    for n in "abc":
        reg.register(n, adapters["root"] / "adapters" / "a0")  # the hooks above stand in for a backend
    reg.hold(["a"])
    assert reg.ensure(["a"]) and reg.ensure(["b"]) and loaded == ["a", "b"]
    assert reg.ensure(["c"]) and loaded == ["a", "c"]  # b was idle: evicted; a is held: kept
    reg.hold(["c"])
    assert reg.ensure(["b"]) is False and loaded == ["a", "c"]  # both held: b waits, nothing is dropped
    reg.release(["a"])
    assert reg.ensure(["b"]) and loaded == ["c", "b"]
    assert reg.stats.adapter_evictions == 2


def test_byte_budget_pin_and_serving_dtype(adapters):
    eng = engine(adapters, adapter_memory="8KB")
    eng.index(pin=("a5",))
    assert eng.registry.resident_names() == ["a5"]
    with eng.lock:
        for i in range(N - 1):
            assert eng.registry.ensure([f"a{i}"])
            assert eng.registry.resident_bytes() <= 8000 and "a5" in eng.registry.resident_names()
    assert eng.registry.stats.adapter_evictions > 0
    half = TorchEngine(pt.PrefixModel(make("llama").to(torch.bfloat16)), id_tokenizer(), adapters_dir=adapters["root"] / "adapters")
    with half.lock:
        half.registry.ensure(["a3"])
    assert half.model.prefixes["a3"].embedding.weight.dtype == torch.bfloat16  # not fp32
    with pytest.raises(ConfigError, match="adapter-memory"):
        parse_size("lots")
    assert parse_size("2GiB") == 2 << 30 and parse_size("512MB") == 512_000_000


def test_new_corrupt_and_removed_adapters_fail_only_their_own_requests(adapters, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(adapters["root"] / "adapters", root)
    eng = TorchEngine(pt.PrefixModel(make("llama")), id_tokenizer(), model_name="m", adapters_dir=root)
    eng.index()
    shutil.copytree(root / "a1", root / "late")  # appears after start-up: found when a request names it
    (root / "a2" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    eng.start()
    try:
        out = run(eng, [("late", [5, 6]), ("a2", [5, 6]), ("a0", [5, 6]), (None, [5, 6])])
        assert isinstance(out[1], AdapterLoadFailed) and "a2" in str(out[1])
        assert all(isinstance(t, list) and len(t) == 6 for i, t in enumerate(out) if i != 1)
        shutil.rmtree(root / "a3")
        assert eng.rescan() == {"added": [], "removed": ["a3"]}
        with pytest.raises(UnknownAdapter, match="'a3'"):
            eng.submit([Request("a3", [5], SamplingParams(), lambda ev: None)])
        shutil.rmtree(root / "a4")  # gone without a rescan: the load fails, the request gets a clear error
        assert isinstance(run(eng, [("a4", [5, 6])])[0], UnknownAdapter)
        assert run(eng, [("a0", [5, 6])])[0] == out[2]  # and the engine goes on
    finally:
        eng.stop()


def test_a_request_bigger_than_the_budget_is_refused_up_front(adapters):
    eng = engine(adapters, adapter_memory=100)
    eng.index()
    with pytest.raises(CapacityUnavailable, match="adapter-memory"):
        eng.submit([Request("a5", [5], SamplingParams(), lambda ev: None)])


def test_server_lists_every_adapter_rescans_and_reports_residency(adapters, tmp_path):
    pytest.importorskip("httpx")
    import asyncio

    import httpx

    from prefixtune.serving.api import create_app

    root = tmp_path / "adapters"
    shutil.copytree(adapters["root"] / "adapters", root)
    eng = engine(adapters, max_loaded_adapters=2)
    eng.registry.root = root.resolve()
    eng.index()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(eng)), base_url="http://t") as c:
            before = (await c.get("/v1/models")).json()["data"]
            for name in ("a0", "a1", "a2", "a0+a1"):
                r = await c.post("/v1/completions", json={"model": name, "prompt": [5, 6], "max_tokens": 2})
                assert r.status_code == 200, r.text  # "a0+a1": both prefixes, in that order
            shutil.copytree(root / "a1", root / "fresh")
            rescan = (await c.post("/v1/adapters/rescan")).json()
            after = (await c.get("/v1/models")).json()["data"]
            metrics = (await c.get("/metrics")).text
        return before, rescan, after, metrics

    eng.start()
    try:
        before, rescan, after, metrics = asyncio.run(go())
    finally:
        eng.stop()
    assert [m["id"] for m in before] == ["m"] + [f"a{i}" for i in range(N)] and not any(m.get("resident") for m in before)
    assert before[3]["num_virtual_tokens"] == 4
    assert rescan["added"] == ["fresh"] and "fresh" in [m["id"] for m in after]
    assert sum(m.get("resident", False) for m in after) == 2  # the budget
    # a0, a1, a2 (evicts a0, the least recent), then a0+a1: a1 is resident (a hit), a0 loads and evicts a2
    want = {"prefixtune_adapters_loaded": 2, "prefixtune_adapter_misses_total": 4, "prefixtune_adapter_hits_total": 1,
            "prefixtune_adapter_evictions_total": 2, "prefixtune_adapter_load_seconds_count": 4,
            "prefixtune_adapters_known": N + 1}
    assert {name: metric(metrics, name) for name in want} == want
    assert metric(metrics, "prefixtune_adapter_load_seconds_bucket", le="+Inf") == 4


def test_every_engine_error_has_its_status():
    import inspect

    from prefixtune.serving import errors
    from prefixtune.serving.api import STATUS, status_of

    kinds = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.EngineError)]
    assert set(kinds) <= set(STATUS)
    assert status_of(errors.UnknownAdapter("x")) == 404 and status_of(errors.QueueFull("x")) == 429
    assert status_of(errors.AdapterLoadFailed("x")) == 422 and status_of(errors.RequestTimeout("x")) == 408
