"""Continuous-batching engine: greedy parity with offline generate() in mixed batches, sampling, stops, limits."""

import time

import pytest
import torch
from helpers import Collector, id_tokenizer, lively, make, offline, offline_seq2seq, random_workload, three_adapters

import prefixtune as pt
from prefixtune.config import ConfigError
from prefixtune.serving.errors import EngineError, QueueFull, RequestTimeout, UnknownAdapter
from prefixtune.serving.request import Request, SamplingParams
from prefixtune.serving.torch_engine import TorchEngine as Engine


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen3", "bloom", "mistral"])
def test_greedy_matches_offline_generate_in_mixed_continuous_batches(kind):
    model = three_adapters(kind)
    prompts, names, max_new = random_workload(16)
    ref = [offline(model, p, n, m) for p, n, m in zip(prompts, names, max_new)]
    # A small batch limit forces rows to join and leave between decode steps.
    eng = Engine(model, max_batch_size=5).start()
    got = Collector(len(prompts))
    try:
        for i, (p, n, m) in enumerate(zip(prompts, names, max_new)):
            eng.submit([Request(n, p, SamplingParams(max_tokens=m, temperature=0), got(i))])
            time.sleep(0.002 * (i % 3))  # arrive while others are mid-generation
        got.wait()
    finally:
        eng.stop()
    assert [got.tokens[i] for i in range(len(prompts))] == ref
    assert max(eng.stats.batch_sizes) == 5 and len(eng.stats.batch_sizes) > 1  # really batched, with joins/leaves
    assert eng.running == 0 and eng._cache is None  # finished rows left; nothing is held


def test_seeded_sampling_does_not_depend_on_batch_mates():
    model = three_adapters()
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=123, ignore_eos=True)
    eng = Engine(model, max_batch_size=16).start()
    try:
        alone = Collector(1)
        eng.submit([Request("b", prompt, params, alone("x"))])
        alone.wait()
        crowd = Collector(6)
        others = [Request(n, [9, 10, 11], SamplingParams(max_tokens=12, temperature=1.0), crowd(i)) for i, n in enumerate("aacc")]
        eng.submit(others[:2] + [Request("b", prompt, params, crowd("x"))] + others[2:])
        eng.submit([Request("b", prompt, SamplingParams(max_tokens=12, temperature=1.5, seed=124, ignore_eos=True), crowd("y"))])
        crowd.wait()
    finally:
        eng.stop()
    assert crowd.tokens["x"] == alone.tokens["x"]
    assert crowd.tokens["y"] != crowd.tokens["x"]  # another seed samples something else
    assert len(alone.tokens["x"]) == 12 and alone.final["x"].finish_reason == "length"


def test_tiny_top_p_is_greedy():
    model = three_adapters()
    eng = Engine(model).start()
    try:
        got = Collector(2)
        eng.submit([Request("a", [4, 5, 6], SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=1), got("p")),
                    Request("a", [4, 5, 6], SamplingParams(max_tokens=8, temperature=0), got("g"))])
        got.wait()
    finally:
        eng.stop()
    assert got.tokens["p"] == got.tokens["g"]


def test_stop_strings_truncate_and_are_never_streamed():
    model = three_adapters()
    tok = id_tokenizer()
    eng = Engine(model, tok).start()
    try:
        first = Collector(1)
        eng.submit([Request("a", [4, 5, 6], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), first(0))])
        full = first.wait().text[0]
        words = full.split()
        assert len(words) >= 4
        stop = words[3]
        cut = full[: full.find(stop)]
        second = Collector(1)
        deltas = []
        def record(ev, inner=second(0)):
            deltas.append(ev.text)
            inner(ev)
        eng.submit([Request("a", [4, 5, 6], SamplingParams(max_tokens=10, temperature=0, stop=(stop, "zzz"), ignore_eos=True), record)])
        second.wait()
    finally:
        eng.stop()
    assert second.text[0] == cut and second.final[0].finish_reason == "stop"
    assert all(stop not in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def test_cancelled_rows_leave_and_padding_is_trimmed():
    model = three_adapters()
    eng = Engine(model, max_batch_size=8).start()
    try:
        long = Request("b", list(range(3, 40)), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), lambda ev: None)
        eng.submit([long])
        while len(long.generated) < 5:
            time.sleep(0.005)
        short = Collector(1)
        eng.submit([Request("a", [4, 5], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), short(0))])
        while eng.running < 2:
            time.sleep(0.001)
        wide = eng._mask.shape[1]
        long.cancel()
        while eng.running != 1:
            time.sleep(0.001)
        time.sleep(0.02)
        # The short row alone: its own prefix + prompt + generated, none of the long row's padding.
        assert eng._mask.shape[1] < wide and bool(eng._mask.all())
        short.wait()
    finally:
        eng.stop()
    assert len(long.generated) < 400


def test_failed_step_fails_its_rows_but_engine_keeps_serving(monkeypatch):
    model = three_adapters()
    eng = Engine(model).start()
    real = eng.base.forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(eng.base, "forward", flaky)
    try:
        bad = Collector(1)
        eng.submit([Request("a", [4, 5], SamplingParams(max_tokens=3, temperature=0), bad(0))])
        assert bad.wait().final[0].finish_reason == "error" and "boom" in str(bad.final[0].error)
        good = Collector(1)
        eng.submit([Request("a", [4, 5], SamplingParams(max_tokens=3, temperature=0), good(0))])
        assert good.wait().final[0].finish_reason == "length"
    finally:
        eng.stop()


def test_queue_limit_timeout_and_unloaded_adapter():
    model = three_adapters()
    eng = Engine(model, max_queue=2)  # not started: requests stay queued
    got = Collector(2)
    eng.submit([Request("a", [4], SamplingParams(max_tokens=2), got("t"), timeout=0.01)])
    eng.submit([Request("c", [4], SamplingParams(max_tokens=2), got("gone"))])
    with pytest.raises(QueueFull):
        eng.submit([Request("a", [4], SamplingParams(max_tokens=2), lambda ev: None)])
    eng.unload_adapter("c")
    time.sleep(0.05)
    eng.start()
    got.wait()
    eng.stop()
    assert got.final["t"].finish_reason == "timeout" and isinstance(got.final["t"].error, RequestTimeout)
    assert isinstance(got.final["gone"].error, UnknownAdapter)
    assert "unloaded" in str(got.final["gone"].error)


def test_limits_and_unknown_adapter_are_refused_up_front():
    eng = Engine(three_adapters(), max_prompt_tokens=8, max_total_tokens=12)
    with pytest.raises(EngineError, match="limit is 8 prompt tokens"):
        eng.submit([Request("a", list(range(3, 12)), SamplingParams(), lambda ev: None)])
    with pytest.raises(EngineError, match="lower max_tokens to at most 7"):
        eng.submit([Request("a", [3, 4, 5, 6, 7], SamplingParams(max_tokens=8), lambda ev: None)])
    with pytest.raises(EngineError, match="empty"):
        eng.submit([Request("a", [], SamplingParams(), lambda ev: None)])
    with pytest.raises(EngineError, match=r"available: \['base', 'a', 'b', 'c'\]") as e:
        eng.submit([Request("nope", [3], SamplingParams(), lambda ev: None)])
    assert isinstance(e.value, UnknownAdapter)


def test_adapter_paths_stay_inside_the_adapters_dir(tmp_path):
    model = three_adapters()
    (tmp_path / "adapters").mkdir()
    model.save_adapter(tmp_path / "adapters" / "good", "a")
    model.save_adapter(tmp_path / "outside", "a")
    eng = Engine(model, adapters_dir=tmp_path / "adapters")
    for bad in ("../outside", str(tmp_path / "outside"), "good/../../outside"):
        with pytest.raises(EngineError, match="leaves the adapters directory"):
            eng.load_adapter(bad, "x")
    for name in ("../x", "a/b", "", ".."):
        with pytest.raises(EngineError, match="not a plain name"):
            eng.load_adapter("good", name)
    eng.load_adapter("good", "x")  # PrefixModel.load_adapter's order: (directory, name)
    assert "x" in eng.model.prefixes
    assert Engine(three_adapters(), adapters_dir=tmp_path / "adapters").load_dir() == ["good"]


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_greedy_matches_prefix_model_generate_alone_and_mixed(kind):
    model = lively(three_adapters(kind))
    prompts, names, max_new = random_workload(12, seed=1)
    # One prompt for rows 0 (adapter a), 1, 5, 9 (b): T5 decodes them as one mixed group; BART groups rows by
    # prefix length and max_tokens (see TorchEngine._generate_seq2seq), so 1, 5, 9 share max_tokens too.
    prompts[1] = prompts[5] = prompts[9] = prompts[0]
    max_new[5] = max_new[9] = max_new[1]
    ref = [offline_seq2seq(model, p, n, m) for p, n, m in zip(prompts, names, max_new)]
    assert len({tuple(r) for r in ref}) > 6  # adapters and prompts really change the outputs
    eng = Engine(model, max_batch_size=16).start()
    try:
        alone = Collector(3)
        for i in range(3):
            eng.submit([Request(names[i], prompts[i], SamplingParams(max_tokens=max_new[i], temperature=0), alone(i))])
            alone.done.wait(0.5) if i == 2 else time.sleep(0.3)
        alone.wait()
        mixed = Collector(len(prompts))
        eng.submit([Request(n, p, SamplingParams(max_tokens=m, temperature=0), mixed(i))
                    for i, (p, n, m) in enumerate(zip(prompts, names, max_new))])
        mixed.wait()
    finally:
        eng.stop()
    assert [alone.tokens[i] for i in range(3)] == ref[:3]
    assert [mixed.tokens[i] for i in range(len(prompts))] == ref
    assert max(eng.stats.batch_sizes) >= 3  # the mixed group of one prompt length decoded together
    assert eng.running == 0 and eng.stats.completion_tokens == sum(len(t) for t in ref[:3] + ref)


def test_encoder_decoder_sampling_and_stops_follow_the_request():
    model = three_adapters("t5")
    eng = Engine(model).start()
    try:
        got = Collector(3)
        seeded = SamplingParams(max_tokens=9, temperature=1.3, seed=5, ignore_eos=True)
        eng.submit([Request("a", [5, 6, 7], seeded, got(0)), Request("a", [5, 6, 7], seeded, got(1)),
                    Request("b", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), got(2))])
        got.wait()
    finally:
        eng.stop()
    assert got.tokens[0] == got.tokens[1] and len(got.tokens[0]) == 9  # seeded, ignore_eos: full length
    assert len(got.tokens[2]) == 4 and got.final[2].finish_reason == "length"


def test_encoder_models_are_refused():
    model = pt.attach(make("bert"), pt.PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="encoder .*cannot be served"):
        Engine(model)


def test_prefix_counts_against_the_models_positions():
    eng = Engine(three_adapters(), max_total_tokens=10_000)  # tiny llama: 512 positions; adapter b has 9 prefix tokens
    with pytest.raises(EngineError, match=r"prefix \(9\) \+ prompt \(3\) \+ max_tokens \(505\) exceeds the model's 512"):
        eng.submit([Request("b", [3, 4, 5], SamplingParams(max_tokens=505), lambda ev: None)])
    eng.submit([Request(None, [3, 4, 5], SamplingParams(max_tokens=505), lambda ev: None)])  # bare: fits


def test_composed_prefixes_match_prefix_model_in_mixed_batches():
    """A row may name several adapters: the engine's greedy tokens equal PrefixModel.generate with the same tuple
    (tests/test_compose.py checks that against one stacked adapter), beside single-adapter and bare rows."""
    model = three_adapters()
    prompts, _, max_new = random_workload(8, seed=3)
    names = [("a", "b"), None, "c", ("b", "a"), ("a", "b", "c"), "a", ("c", "a"), None]
    ref = [offline(model, p, n, m) for p, n, m in zip(prompts, names, max_new)]
    eng = Engine(model).start()
    got = Collector(len(prompts))
    try:
        eng.submit([Request(n, p, SamplingParams(max_tokens=m, temperature=0), got(i))
                    for i, (p, n, m) in enumerate(zip(prompts, names, max_new))])
        got.wait()
    finally:
        eng.stop()
    assert [got.tokens[i] for i in range(len(prompts))] == ref
    assert ref[0] != offline(model, prompts[0], ("b", "a"), max_new[0]) or ref[0] != offline(model, prompts[0], "a", max_new[0])


def test_running_cache_writes_in_place_and_equals_concatenation():
    """The running batch's GrowingLayer gives the keys/values DynamicLayer's concatenation gives, through decode
    steps, row selection (finished rows leaving), trimming of leading columns and growth past its spare room, and
    a decode step writes into the buffer it already has (no copy of the cache per step)."""
    from transformers import DynamicLayer

    from prefixtune.serving.torch_engine import GrowingLayer

    torch.manual_seed(0)
    k0, v0 = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8)
    grown, ref = GrowingLayer.holding(k0, v0), DynamicLayer()
    ref.update(k0, v0)
    rehomed, last = 0, None
    for step in range(150):  # past the first buffer's spare room (5 + 1 + 64 columns)
        if step == 20:  # finished rows leave (TorchEngine._select) and unused leading columns go
            idx = torch.tensor([0, 2, 3])
            grown.batch_select_indices(idx), ref.batch_select_indices(idx)
            for layer in (grown, ref):
                layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]
        k, v = torch.randn(ref.keys.shape[0], 2, 1, 8), torch.randn(ref.keys.shape[0], 2, 1, 8)
        gk, gv = grown.update(k, v)
        rk, rv = ref.update(k, v)
        assert torch.equal(gk, rk) and torch.equal(gv, rv)
        # the buffer object, not its address: the allocator may hand a freed address out again
        rehomed, last = rehomed + (grown._key_buf is not last), grown._key_buf
    # one buffer at the start, one after the selection, one after growing: not one per step
    assert rehomed == 3 and grown.get_seq_length() == ref.get_seq_length() == 5 + 150 - 3
