"""The llama.cpp backend: prefixes written into llama.cpp's KV cache give our PyTorch path's outputs.

Tiny random models are written as F32 GGUF files (tests/gguf_models.py), so llama.cpp and transformers run the
same weights; llama.cpp's cache is F32 where logits are compared at 1e-3 (its default f16 cache is checked
separately with a looser bound). Needs the `[llamacpp]` extra (CI installs it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf_models import make_model, write_tiny_gguf
from helpers import metric

import prefixtune as pt
from prefixtune.serving import llamacpp_cache
from prefixtune.serving.llamacpp import LlamaCppError, LlamaCppModel, requantize

ADAPTERS = {"short": 3, "mid": 7, "long": 12}  # name -> prefix length
N_PROMPTS = 20


def _randomise(model: pt.PrefixModel) -> pt.PrefixModel:
    """Zero-init prefixes change nothing; random ones (at the model's key/value scale) change every logit."""
    with torch.no_grad():
        for enc in model.prefixes.values():
            for p in enc.parameters():
                p.copy_(torch.randn_like(p) * 2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GQA Llama as GGUF, the same weights in transformers with three saved adapters of different lengths."""
    root = tmp_path_factory.mktemp("llamacpp")
    path, hf = write_tiny_gguf(root / "tiny-llama.gguf", "llama")
    first, *rest = ADAPTERS
    model = pt.attach(hf, pt.PrefixConfig(num_virtual_tokens=ADAPTERS[first]), first)
    for name in rest:
        model.add_adapter(name, pt.PrefixConfig(num_virtual_tokens=ADAPTERS[name]))
    _randomise(model)
    for name in ADAPTERS:
        model.save_adapter(root / "adapters" / name, name)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, hf.config.vocab_size, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N_PROMPTS)]
    return {"root": root, "gguf": path, "model": model, "prompts": prompts}


# The two cache modes: per-sequence streams with the prefix copied in (default), one unified stream with it shared.
MODES = {"per-sequence": False, "unified": True}


@pytest.fixture(scope="module", params=list(MODES))
def lcpp(tiny, request):
    m = LlamaCppModel(tiny["gguf"], n_ctx=4096, max_sequences=3 * N_PROMPTS + 4, max_adapters=4, kv_type="f32", n_threads=1,
                      kv_unified=MODES[request.param])
    assert m.unified is MODES[request.param]
    for name in ADAPTERS:
        m.load_prefix(name, m.adapter_layers(tiny["root"] / "adapters" / name))
    yield m
    m.close()


def greedy(m: LlamaCppModel, rows, new_tokens: int):
    """Greedy decode of all rows at once (one llama_decode per step) -> (first-step logits, generated ids)."""
    seqs = [m.open_sequence(name) for name, _ in rows]
    try:
        logits = m.decode([(s, ids, p) for (s, p), (_, ids) in zip(seqs, rows)])
        first = logits.copy()
        pos = [p + len(ids) for (_, p), (_, ids) in zip(seqs, rows)]
        out = [[t] for t in logits.argmax(-1).tolist()]
        for _ in range(new_tokens - 1):
            logits = m.decode([(s, [o[-1]], q) for (s, _), o, q in zip(seqs, out, pos)])
            pos = [q + 1 for q in pos]
            for o, t in zip(out, logits.argmax(-1).tolist()):
                o.append(t)
    finally:
        for s, _ in seqs:
            m.close_sequence(s)
    return first, out


def reference(model: pt.PrefixModel, name, ids, new_tokens: int):
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x, adapter_names=[name]).logits[0, -1].numpy()
    out = model.generate(input_ids=x, adapter_names=[name], max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return logits, out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_writer_gives_llama_cpp_the_transformers_logits(tmp_path, arch):
    path, hf = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch)
    m = LlamaCppModel(path, n_ctx=64, max_sequences=1, max_adapters=1, kv_type="f32", n_threads=1)
    ids = [5, 17, 40, 99, 200, 300, 11, 7]
    seq, pos = m.open_sequence(None)
    got = m.decode([(seq, ids, pos)])[0]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(got - want).max() < 1e-4
    assert m.arch.kv_heads == 2 and m.arch.num_heads == 4 and m.arch.head_dim == (getattr(hf.config, "head_dim", None) or 16)
    m.close()


def test_transformers_loads_the_same_weights_from_the_gguf(tiny):
    """The PyTorch engine loads GGUFs through loading.load_model: same weights, same tokenizer as llama.cpp."""
    from prefixtune.loading import load_model

    model, tok = load_model(str(tiny["gguf"]), dtype="fp32", device="cpu")
    ids = torch.tensor([tiny["prompts"][0]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny["model"].base_model(ids).logits)
    assert tok("the movie was great", add_special_tokens=False)["input_ids"]  # builds from the file's vocab


def test_each_adapter_alone_matches_pytorch_greedy_and_logits(tiny, lcpp):
    model = tiny["model"]
    for name in ADAPTERS:
        for ids in tiny["prompts"]:
            first, out = greedy(lcpp, [(name, ids)], 8)
            want_logits, want = reference(model, name, ids, 8)
            assert np.abs(first[0] - want_logits).max() < 1e-3, name
            assert out[0] == want, (name, ids)


def test_all_adapters_and_the_bare_model_in_one_batch_match_pytorch(tiny, lcpp):
    model = tiny["model"]
    rows = [(name, ids) for ids in tiny["prompts"] for name in ADAPTERS] + [(None, ids) for ids in tiny["prompts"][:4]]
    first, out = greedy(lcpp, rows, 8)
    for i, (name, ids) in enumerate(rows):
        want_logits, want = reference(model, name, ids, 8)
        assert np.abs(first[i] - want_logits).max() < 1e-3, (name, ids)
        assert out[i] == want, (name, ids)
    # The check has teeth: prefixes change the continuations, and they are not one repeated token.
    by_name = {name: [o for (n, _), o in zip(rows, out) if n == name] for name in ADAPTERS}
    assert len({tuple(map(tuple, v)) for v in by_name.values()}) == len(ADAPTERS)
    assert sum(len(set(o)) > 1 for o in out) > len(out) // 2


def test_decode_order_does_not_matter(tiny, lcpp):
    """decode() feeds llama.cpp in sequence-id order (dense ubatches) and hands logits back in the caller's order."""
    rows = [(name, ids) for ids in tiny["prompts"][:3] for name in ADAPTERS]
    seqs = [lcpp.open_sequence(name) for name, _ in rows]
    try:
        items = [(s, ids, p) for (s, p), (_, ids) in zip(seqs, rows)]
        got = lcpp.decode(items[::-1])[::-1]
        for i, (name, ids) in enumerate(rows):
            assert np.abs(got[i] - reference(tiny["model"], name, ids, 1)[0]).max() < 1e-3, (name, ids)
    finally:
        for s, _ in seqs:
            lcpp.close_sequence(s)


@pytest.mark.parametrize("arch,mode", [("qwen2", "per-sequence"), ("qwen3", "unified")])
def test_neox_rope_models_take_prefix_keys_unpermuted(tmp_path, arch, mode):
    path, hf = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch)
    model = _randomise(pt.attach(hf, pt.PrefixConfig(num_virtual_tokens=5)))
    m = LlamaCppModel(path, n_ctx=128, max_sequences=2, max_adapters=1, kv_type="f32", n_threads=1, kv_unified=MODES[mode])
    assert not m.interleave_rope
    m.load_prefix("default", model.prefix_layers("default"))
    ids = [7, 30, 99, 5]
    first, out = greedy(m, [("default", ids)], 6)
    want_logits, want = reference(model, "default", ids, 6)
    assert np.abs(first[0] - want_logits).max() < 1e-3 and out[0] == want
    m.close()


@pytest.mark.parametrize("flash_attn,mode", [(False, "unified"), (True, "unified"), (False, "per-sequence"), (True, "per-sequence")])
def test_f16_cache_and_both_v_layouts(tiny, flash_attn, mode):
    """llama.cpp's default f16 cache, with V transposed (flash attention off) or row-wise (on)."""
    m = LlamaCppModel(tiny["gguf"], n_ctx=256, max_sequences=2, max_adapters=1, kv_type="f16", flash_attn=flash_attn, n_threads=1,
                      kv_unified=MODES[mode])
    layers = tiny["model"].prefix_layers("mid")
    m.load_prefix("mid", layers)
    if m.unified:
        seq, _ = m.prefixes["mid"]
        size = m.lib.llama_state_seq_get_size(m.ctx, seq)
        buf = (__import__("ctypes").c_uint8 * size)()
        m.lib.llama_state_seq_get_data(m.ctx, buf, size, seq)
    else:
        buf = m.mode.blobs["mid"]  # the blob every request's sequence receives (one stream per sequence listed)
    blob = llamacpp_cache.parse(bytes(buf), m.arch.num_layers, m.arch.token_dim)
    assert blob.v_trans is (not flash_attn) and blob.keys[0].dtype is np.float16
    ids = tiny["prompts"][1]
    first, _ = greedy(m, [("mid", ids)], 1)
    want_logits, _ = reference(tiny["model"], "mid", ids, 1)
    assert np.abs(first[0] - want_logits).max() < 2e-2  # f16 rounding of keys/values (and FA's f16 math)
    m.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_unload_keeps_running_sequences_and_frees_cells(tiny, mode):
    m = LlamaCppModel(tiny["gguf"], n_ctx=256, max_sequences=2, max_adapters=1, kv_type="f32", n_threads=1,
                      kv_unified=MODES[mode])
    shared = ADAPTERS["long"] if m.unified else 0  # per-sequence: the prefix lives in each request's stream
    layers = tiny["model"].prefix_layers("long")
    m.load_prefix("long", layers)
    assert m.used_cells == shared
    ids = tiny["prompts"][2]
    seq, pos = m.open_sequence("long")
    assert pos == ADAPTERS["long"] and m.lib.llama_memory_seq_pos_max(m.mem, seq) == pos - 1
    m.unload_prefix("long")
    assert "long" not in m.prefixes and m.used_cells == shared  # still shared by the running sequence
    got = m.decode([(seq, ids, pos)])[0]
    want, _ = reference(tiny["model"], "long", ids, 1)
    assert np.abs(got - want).max() < 1e-3
    m.close_sequence(seq)
    assert m.used_cells == 0 and m.lib.llama_memory_seq_pos_max(m.mem, 0) == -1
    assert m.lib.llama_memory_seq_pos_max(m.mem, seq) == -1
    m.load_prefix("long", layers)  # the freed slot is reusable
    m.close()


# ---- bad input -----------------------------------------------------------------------------------------------
def test_adapter_for_another_model_names_what_differs(tiny, tmp_path):
    other = pt.attach(make_model("llama", layers=3), pt.PrefixConfig(num_virtual_tokens=4))
    other.save_adapter(tmp_path / "other")
    m = LlamaCppModel(tiny["gguf"], n_ctx=64, max_sequences=1, max_adapters=1, n_threads=1)
    with pytest.raises(LlamaCppError, match=r"layers: adapter 3 vs model 2"):
        m.adapter_layers(tmp_path / "other")
    qwen3 = pt.attach(make_model("qwen3"), pt.PrefixConfig(num_virtual_tokens=4))  # head size 24 vs 16
    qwen3.save_adapter(tmp_path / "qwen3")
    with pytest.raises(LlamaCppError, match=r"head size: adapter 24 vs model 16"):
        m.adapter_layers(tmp_path / "qwen3")
    m.close()


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    import gguf
    from gguf_models import byte_bpe

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")  # metadata only: refused before any weights load
    for add, v in ((w.add_context_length, 64), (w.add_embedding_length, 64), (w.add_block_count, 2),
                   (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_layer_norm_eps, 1e-5)):
        add(v)
    tokens, merges, types = byte_bpe()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LlamaCppError, match=r"architecture 'gpt2' is not supported.*llama, qwen2, qwen3"):
        LlamaCppModel(tmp_path / "gpt2.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LlamaCppError, match=r"cannot read this GGUF"):
        LlamaCppModel(tmp_path / "junk.gguf")
    with pytest.raises(LlamaCppError, match=r"GGUF file not found"):
        LlamaCppModel(tmp_path / "missing.gguf")


@pytest.mark.parametrize("mode,msg", [("unified", r"free cells of 256.*larger context"),
                                      ("per-sequence", r"a llama.cpp sequence has 256 cells.*larger context")])
def test_prefix_longer_than_the_context_is_refused(tiny, mode, msg):
    m = LlamaCppModel(tiny["gguf"], n_ctx=256, max_sequences=1, max_adapters=1, n_threads=1, kv_unified=MODES[mode])
    a = m.arch
    layers = [(torch.randn(a.kv_heads, 300, a.head_dim), torch.randn(a.kv_heads, 300, a.head_dim))] * a.num_layers
    with pytest.raises(LlamaCppError, match=r"300 virtual tokens.*" + msg):
        m.load_prefix("huge", layers)
    assert m.used_cells == 0 and not m.prefixes
    m.close()


def test_missing_llama_cpp_python_gives_the_install_command(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    with pytest.raises(LlamaCppError, match=r"pip install 'prefixtune\[llamacpp\]'"):
        LlamaCppModel(tiny["gguf"])


# ---- the engine, the notebook entry and the HTTP layer ---------------------------------------------------
WORDS = "the a movie film was is great good bad awful fine i it this that loved hated plot acting hello how are you".split()


def text_prompts(n: int, seed: int = 0) -> list[str]:
    rnd = np.random.default_rng(seed)
    return [" ".join(rnd.choice(WORDS, size=int(rnd.integers(2, 8)))) for _ in range(n)]


@pytest.fixture(scope="module")
def backends(tiny):
    """The same GGUF and adapters on both engines, each behind the notebook Generator."""
    import prefixtune.llamacpp as ptl
    from prefixtune.loading import load_model
    from prefixtune.serving.offline import Generator
    from prefixtune.serving.torch_engine import TorchEngine as Engine

    lc = ptl.load(tiny["gguf"], tiny["root"] / "adapters", kv_type="f32", max_batch_size=64, n_threads=1)
    base, tok = load_model(str(tiny["gguf"]), dtype="fp32", device="cpu")
    torch_engine = Engine(pt.PrefixModel(base), tok, model_name="tiny-llama", adapters_dir=tiny["root"] / "adapters",
                          max_batch_size=64)
    assert torch_engine.load_dir() == sorted(ADAPTERS)
    pyt = Generator(torch_engine)
    yield lc, pyt
    lc.close()
    pyt.close()


def test_backend_greedy_equals_the_pytorch_engine_per_adapter_and_mixed(backends):
    lc, pyt = backends
    prompts = text_prompts(N_PROMPTS)
    for name in ADAPTERS:  # each adapter alone (its 20 prompts batched)
        assert lc.generate(prompts, name, max_tokens=8, return_tokens=True) == \
            pyt.generate(prompts, name, max_tokens=8, return_tokens=True), name
    names = [n for n in ADAPTERS for _ in prompts] + [None] * 4
    rows = prompts * len(ADAPTERS) + prompts[:4]
    got = lc.generate(rows, names, max_tokens=8)
    assert got == pyt.generate(rows, names, max_tokens=8)
    assert max(lc.engine.stats.batch_sizes) > 2 * N_PROMPTS  # decode steps held rows of every adapter at once
    assert len(set(got)) > len(rows) // 2


def test_generate_takes_sampling_params_like_the_server(backends):
    lc, pyt = backends
    kw = dict(max_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    a = lc.generate(["the movie was"] * 2, ["mid", None], **kw)
    assert a == lc.generate(["the movie was"] * 2, ["mid", None], **kw)  # seeded: reproducible whatever the batch
    assert lc.generate("the movie was", "mid", max_tokens=6, stop=" ") == \
        pyt.generate("the movie was", "mid", max_tokens=6, stop=" ")
    with pytest.raises(pt.ConfigError, match="unknown adapter"):
        lc.generate("hi", "nope")


@pytest.fixture(scope="module")
def server(tiny):
    from prefixtune.serving.llamacpp_engine import build_llamacpp_engine

    eng = build_llamacpp_engine(str(tiny["gguf"]), str(tiny["root"] / "adapters"), kv_type="f32", n_threads=1,
                                max_batch_size=16, max_prompt_tokens=64, max_total_tokens=128)
    assert eng.load_dir() == sorted(ADAPTERS)  # eagerly (the default indexes and loads on first use)
    eng.start()
    yield eng
    eng.close()


def call(app, fn):
    import asyncio

    import httpx

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as c:
            return await fn(c)

    return asyncio.run(go())


def test_server_on_llama_cpp_serves_the_pytorch_engines_text(server, backends, tiny):
    import asyncio
    import json

    from prefixtune.serving.api import create_app

    _, pyt = backends
    app = create_app(server)
    prompts = text_prompts(6, seed=1)
    cases = [(p, n) for p in prompts for n in ("tiny-llama", *ADAPTERS)]
    want = [pyt.generate(p, None if n == "tiny-llama" else n, max_tokens=7) for p, n in cases]

    async def one(c, p, n, stream):
        r = await c.post("/v1/completions", json={"model": n, "prompt": p, "max_tokens": 7, "temperature": 0, "stream": stream})
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["choices"][0]["text"]
        events = [json.loads(b[6:]) for b in r.text.strip().split("\n\n")[:-1]]
        return "".join(e["choices"][0]["text"] for e in events if e["choices"])

    async def run(c):
        models = (await c.get("/v1/models")).json()
        texts = await asyncio.gather(*(one(c, p, n, i % 2 == 1) for i, (p, n) in enumerate(cases)))
        chat = await c.post("/v1/chat/completions", json={"model": "mid", "max_tokens": 5, "temperature": 0,
                                                           "messages": [{"role": "user", "content": "hello how are you"}]})
        return models, texts, chat

    models, texts, chat = call(app, run)
    assert [m["id"] for m in models["data"]] == ["tiny-llama", *sorted(ADAPTERS)]
    assert texts == want
    ids = pyt.engine.tokenizer.apply_chat_template([{"role": "user", "content": "hello how are you"}],
                                                   add_generation_prompt=True, tokenize=False)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == \
        pyt.generate([pyt.engine.tokenizer(ids, add_special_tokens=False)["input_ids"]], "mid", max_tokens=5)[0]


def test_server_hot_load_unload_and_bad_adapters(server, tiny, tmp_path):
    from prefixtune.serving.api import create_app

    pt.attach(make_model("llama", layers=3), pt.PrefixConfig(num_virtual_tokens=4)).save_adapter(
        tiny["root"] / "adapters" / "wrong-model")
    app = create_app(server)
    req = {"model": "again", "prompt": "the movie was", "max_tokens": 5, "temperature": 0}

    async def run(c):
        out = {"before": await c.post("/v1/completions", json=req)}
        out["load"] = await c.post("/v1/adapters", json={"name": "again", "path": "long"})
        out["after"] = await c.post("/v1/completions", json=req)
        out["long"] = await c.post("/v1/completions", json={**req, "model": "long"})
        out["delete"] = await c.delete("/v1/adapters/again")
        out["gone"] = await c.post("/v1/completions", json=req)
        out["wrong"] = await c.post("/v1/adapters", json={"name": "w", "path": "wrong-model"})
        out["too_long"] = await c.post("/v1/completions", json={**req, "model": "long", "max_tokens": 1000})
        out["health"] = await c.get("/health")
        out["metrics"] = await c.get("/metrics")
        return out

    out = call(app, run)
    assert out["before"].status_code == 404 and out["load"].status_code == 201
    assert out["after"].json()["choices"][0]["text"] == out["long"].json()["choices"][0]["text"]
    assert out["delete"].status_code == 200 and out["gone"].status_code == 404
    assert out["wrong"].status_code == 422 and "layers: adapter 3 vs model 2" in out["wrong"].json()["error"]["message"]
    assert out["too_long"].status_code == 400 and "max_tokens" in out["too_long"].json()["error"]["message"]
    assert out["health"].json()["status"] == "ok" and metric(out["metrics"].text, "prefixtune_adapters_loaded") == 3
    assert server.model.used_cells == 0 and sorted(server.model.mode.blobs) == sorted(ADAPTERS)  # per-sequence: no shared
    # cells; the unloaded copy's blob is gone and the reloaded one is kept


def test_cli_generate_backend_llamacpp_prints_what_the_torch_backend_prints(tiny, capsys, monkeypatch):
    from prefixtune.cli.main import main

    argv = ["generate", "--model", str(tiny["gguf"]), "--adapter", str(tiny["root"] / "adapters" / "mid"),
            "--prompt", "the movie was great", "--max-new-tokens", "6"]
    assert main(argv) == 0
    torch_out = capsys.readouterr().out
    assert main(argv + ["--backend", "llamacpp"]) == 0
    assert capsys.readouterr().out == torch_out and torch_out.strip()
    with pytest.raises(SystemExit, match="2"):
        main(argv + ["--backend", "llamacpp", "--num-beams", "2"])
    assert "--num-beams" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(SystemExit, match="2"):
        main(argv + ["--backend", "llamacpp"])
    assert "pip install 'prefixtune[llamacpp]'" in capsys.readouterr().err


def test_requests_wait_for_kv_cells_and_a_failed_step_frees_its_sequences(tiny, backends, monkeypatch):
    """Unified cache: the engine shares n_ctx cells among requests (the per-sequence default gives each its own)."""
    import prefixtune.llamacpp as ptl

    _, pyt = backends
    gen = ptl.load(tiny["gguf"], {"mid": tiny["root"] / "adapters" / "mid"}, kv_type="f32", n_ctx=256, max_batch_size=4,
                   n_threads=1, kv_unified=True)
    eng = gen.engine
    prompts = text_prompts(4, seed=2)
    # 4 x (prompt + 100) cells do not fit 256 - 7 at once: admission holds some back until cells free up.
    got = gen.generate(prompts, "mid", max_tokens=100, ignore_eos=True, return_tokens=True)
    assert got == pyt.generate(prompts, "mid", max_tokens=100, ignore_eos=True, return_tokens=True)
    assert max(eng.stats.batch_sizes) < 4 and eng._reserved == 0

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(eng.model, "decode", boom)
    with pytest.raises(RuntimeError, match="generation failed: RuntimeError: injected"):
        gen.generate(prompts[:2], "mid", max_tokens=3)
    monkeypatch.undo()
    import time

    for _ in range(500):  # the worker closes the failed rows' sequences just after their error events
        if len(eng.model._free_req) == 4:
            break
        time.sleep(0.01)
    assert len(eng.model._free_req) == 4 and eng._reserved == 0 and eng.model.used_cells == 7
    assert gen.generate(prompts[0], "mid", max_tokens=3) == pyt.generate(prompts[0], "mid", max_tokens=3)
    gen.close()


def test_per_sequence_engine_checks_each_requests_cells(tiny, backends):
    """Per-sequence cache: prompt + max_tokens must fit one sequence's stream beside the prefix (not the sum)."""
    import prefixtune.llamacpp as ptl

    _, pyt = backends
    gen = ptl.load(tiny["gguf"], {"mid": tiny["root"] / "adapters" / "mid"}, kv_type="f32", n_ctx=256, max_batch_size=4,
                   n_threads=1, seq_cells=256)
    m = gen.engine.model
    assert not m.unified and m.seq_cells == 256 and m.used_cells == 0
    prompts = text_prompts(4, seed=2)
    # 4 x (prompt + 100) cells: more than 256 in all, yet each request has its own 256 cells, so all run at once.
    got = gen.generate(prompts, "mid", max_tokens=100, ignore_eos=True, return_tokens=True)
    assert got == pyt.generate(prompts, "mid", max_tokens=100, ignore_eos=True, return_tokens=True)
    assert max(gen.engine.stats.batch_sizes) == 4
    n = len(gen.engine.tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
    with pytest.raises(pt.ConfigError, match=r"more KV cells than a llama.cpp sequence has beside the adapter's prefix \(249 of 256\)"):
        gen.generate(prompts[0], "mid", max_tokens=250 - n)
    gen.close()


def test_prefixtune_serve_backend_llamacpp_builds_this_engine(tiny, monkeypatch):
    """`prefixtune serve --backend llamacpp --model X.gguf --adapters DIR` serves every adapter on llama.cpp."""
    import prefixtune.cli.serve as serve_cli
    import prefixtune.serving.backends as backends
    from prefixtune.config import ConfigError
    from prefixtune.serving.llamacpp_engine import LlamaCppEngine

    built = {}

    def fake_serve(server):  # instead of serving: look at the engine the command built, before serve closes it
        eng = built["engine"]
        built.update(indexed=set(eng.adapter_names()), resident=eng.registry.resident_names(), loaded=eng.load_dir())

    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", fake_serve)
    real = backends.build_backend
    monkeypatch.setattr(backends, "build_backend", lambda *a, **k: built.setdefault("engine", real(*a, **k, n_threads=1)))
    assert serve_cli.main(["--backend", "llamacpp", "--model", str(tiny["gguf"]), "--adapters", str(tiny["root"] / "adapters")]) == 0
    eng = built["engine"]
    assert isinstance(eng, LlamaCppEngine) and set(ADAPTERS) <= built["indexed"]  # indexed
    assert built["resident"] == [] and built["loaded"] == sorted(ADAPTERS)  # all load ('wrong-model' not)
    assert not eng.is_alive() and eng.model.ctx is None  # serve closed the engine (llama.cpp's memory) on its way out
    with pytest.raises(ConfigError, match="serves a .gguf file"):
        backends.build_backend("llamacpp", str(tiny["root"]))


QUANTIZED_CHILD = """
import json, sys
from prefixtune.serving.llamacpp import LlamaCppModel
m = LlamaCppModel(sys.argv[1], n_ctx=2048, max_sequences=8, n_threads=1)
m.load_prefix("mid", m.adapter_layers(sys.argv[2]))
rows = json.loads(sys.argv[3])
seqs = [m.open_sequence("mid") for _ in rows]
print("LOGITS " + json.dumps(m.decode([(s, ids, p) for (s, p), ids in zip(seqs, rows)]).tolist()))
"""


@pytest.mark.parametrize("wtype,min_corr", [("Q8_0", 0.999), ("Q4_0", 0.9)])
def test_quantized_gguf_decodes_with_prefixes(tiny, tmp_path, wtype, min_corr):
    """Quantized weights (the demo's GGUF is Q4_1): llama.cpp built with AMX segfaults in its AMX matmul on
    some machines (ggml-org/llama.cpp#20824; this test reproduced it before extra buffers were turned off
    there), so the decode runs in a child process where a crash fails the test instead of killing pytest."""
    quantized = requantize(tiny["gguf"], tmp_path / f"tiny-{wtype}.gguf", wtype)
    rows = tiny["prompts"][:8]
    out = subprocess.run([sys.executable, "-c", QUANTIZED_CHILD, str(quantized), str(tiny["root"] / "adapters" / "mid"),
                          json.dumps(rows)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"llama.cpp child exited {out.returncode}: {out.stderr[-2000:]}"
    got = np.array(json.loads(next(line for line in out.stdout.splitlines() if line.startswith("LOGITS "))[7:]))
    want = np.stack([reference(tiny["model"], "mid", ids, 1)[0] for ids in rows])
    assert got.shape == want.shape
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > min_corr  # quantization moves logits, the prefix still counts


def test_composed_prefixes_equal_one_adapter_holding_both(tiny, tmp_path):
    """A request for ("short", "mid") on llama.cpp gets short's cells then mid's: the same greedy tokens as one
    adapter whose table is the two tables stacked, alone and beside other rows; the unified cache refuses it."""
    import prefixtune.llamacpp as ptl

    model = tiny["model"]
    stacked = pt.attach(model.base_model, pt.PrefixConfig(num_virtual_tokens=ADAPTERS["short"] + ADAPTERS["mid"],
                                                          layer_scale=False), "both")
    with torch.no_grad():
        stacked.prefixes["both"].embedding.weight.copy_(torch.cat([model.prefixes["short"].folded(),
                                                                    model.prefixes["mid"].folded()]))
    stacked.save_adapter(tmp_path / "both", "both")
    stacked.delete_adapter("both")
    gen = ptl.load(tiny["gguf"], {**{n: tiny["root"] / "adapters" / n for n in ADAPTERS}, "both": tmp_path / "both"},
                   kv_type="f32", n_threads=1)
    try:
        prompts = tiny["prompts"][:6]
        composed = gen.generate(prompts, [("short", "mid")] * 6, max_tokens=6, return_tokens=True)
        assert composed == gen.generate(prompts, "both", max_tokens=6, return_tokens=True)
        mixed = gen.generate(prompts, [("short", "mid"), None, "long", ("short", "mid"), "mid", ("short", "mid")],
                             max_tokens=6, return_tokens=True)
        assert [mixed[i] for i in (0, 3, 5)] == [composed[i] for i in (0, 3, 5)]
        assert composed != gen.generate(prompts, "mid", max_tokens=6, return_tokens=True)
    finally:
        gen.close()
    uni = ptl.load(tiny["gguf"], {n: tiny["root"] / "adapters" / n for n in ADAPTERS}, kv_type="f32", n_threads=1,
                   kv_unified=True)
    try:
        with pytest.raises(pt.ConfigError, match="composing prefixes is not available with the unified"):
            uni.generate(prompts[:1], [("short", "mid")], max_tokens=2)
    finally:
        uni.close()
