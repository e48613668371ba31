"""The official `openai` client against `prefixtune serve`'s HTTP layer on a real uvicorn server (127.0.0.1, a free
port), used the way its docs use it: `for ch in stream: ch.choices[0].delta`, sync and async, streaming and not,
n > 1, logprobs. The torch and llama.cpp engines run here, on one tiny GGUF and one adapter; vLLM is the same tests
marked `vllm` (its own environment: `python -m pytest -m vllm tests/test_openai_client.py`).

Served == offline: greedy text through the client equals PrefixModel.generate with the same adapter.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from gguf_models import write_tiny_gguf  # noqa: E402
from helpers import LiveServer, id_tokenizer, offline  # noqa: E402

import prefixtune as pt  # noqa: E402

ADAPTER, P = "sent", 5
SECOND = "faq"  # a second adapter (P = 3) for composed names: "sent+faq"
CHAT = [{"role": "user", "content": "the movie was great"}]


def _two_adapters(base, root):
    """ADAPTER and SECOND with random prefixes (zero-init ones change nothing) so each adapter matters, saved."""
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=P), ADAPTER)
    model.add_adapter(SECOND, pt.PrefixConfig(num_virtual_tokens=3))
    with torch.no_grad():
        for p in model.prefixes.parameters():
            p.copy_(torch.randn_like(p) * 2)
    for name in (ADAPTER, SECOND):
        model.save_adapter(root / "adapters" / name, name)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    path, _ = write_tiny_gguf(root / "tiny-llama.gguf", "llama")
    from prefixtune.loading import load_model

    base, tok = load_model(str(path), "fp32", "cpu")
    torch.manual_seed(0)
    model = _two_adapters(base, root)
    return {"root": root, "gguf": path, "model": model, "tokenizer": tok, "prompt": "the movie was great"}


def _vllm_setup(tmp_path_factory):
    """vLLM serves an HF directory: a tiny Llama its CPU kernels take (head size 64) with the id tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("openai-vllm")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                                      pad_token_id=0, eos_token_id=2, bos_token_id=3)).eval()
    tok = id_tokenizer()
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    model = _two_adapters(hf, root)
    from prefixtune.serving.vllm_engine import build_vllm_engine

    engine = build_vllm_engine(str(root / "model"), str(root / "adapters"), dtype="float32", enforce_eager=True, block_size=32,
                               max_model_len=256, kv_cache_gib=1, max_prompt_tokens=64, max_total_tokens=128)
    return engine, {"model": model, "tokenizer": tok, "prompt": "w5 w9 w10 w11"}


@pytest.fixture(scope="module", params=["torch", "llamacpp", pytest.param("vllm", marks=pytest.mark.vllm)])
def served(request, tiny, tmp_path_factory):
    """(base url of a live server, the offline reference: model, tokenizer, prompt)."""
    if request.param == "vllm":
        engine, ref = _vllm_setup(tmp_path_factory)
    else:
        from prefixtune.serving.backends import build_backend

        kw = {"kv_type": "f32", "n_threads": 1} if request.param == "llamacpp" else {}
        engine = build_backend(request.param, str(tiny["gguf"]), str(tiny["root"] / "adapters"), max_prompt_tokens=64,
                               max_total_tokens=128, **kw)
        ref = tiny
    with LiveServer(engine) as url:
        yield url, ref
    assert not engine.is_alive()  # the app's shutdown closed the engine


def reference(ref, ids, max_tokens):
    with torch.no_grad():
        toks = offline(ref["model"], ids, ADAPTER, max_tokens)
    return ref["tokenizer"].decode(toks, skip_special_tokens=True)


def chat_ids(ref):
    tok = ref["tokenizer"]
    return tok(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_chat_stream_the_documented_loop_equals_non_streamed_and_offline(served):
    url, ref = served
    c = client(url)
    stream = c.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=8, temperature=0, stream=True)
    parts, finishes = [], []
    for ch in stream:  # the loop of OpenAI's docs: no usage chunk unless asked, so choices[0] always exists
        parts.append(ch.choices[0].delta.content or "")
        finishes.append(ch.choices[0].finish_reason)
        assert ch.object == "chat.completion.chunk" and ch.usage is None
    full = c.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=8, temperature=0)
    assert "".join(parts) == full.choices[0].message.content == reference(ref, chat_ids(ref), 8)
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason in ("stop", "length")
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    assert full.usage.prompt_tokens == len(chat_ids(ref)) and full.usage.completion_tokens >= 1


def test_completions_greedy_equals_prefix_model_generate(served):
    url, ref = served
    c = client(url)
    ids = ref["tokenizer"](ref["prompt"])["input_ids"]
    want = reference(ref, ids, 10)
    r = c.completions.create(model=ADAPTER, prompt=ref["prompt"], max_tokens=10, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=ADAPTER, prompt=ref["prompt"], max_tokens=10,
                                                                            temperature=0, stream=True))
    assert r.choices[0].text == streamed == want and r.usage.prompt_tokens == len(ids)


def test_composed_name_equals_prefix_model_generate(served):
    """`model: "sent+faq"` (both prefixes, in that order) on every backend, vLLM included, equals PrefixModel.generate
    with the composed entry; streamed too."""
    url, ref = served
    c = client(url)
    ids = ref["tokenizer"](ref["prompt"])["input_ids"]
    for names in ([ADAPTER, SECOND], [SECOND, ADAPTER]):
        want = ref["tokenizer"].decode(offline(ref["model"], ids, names, 10), skip_special_tokens=True)
        r = c.completions.create(model="+".join(names), prompt=ref["prompt"], max_tokens=10, temperature=0)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="+".join(names), prompt=ref["prompt"], max_tokens=10, temperature=0, stream=True))
        assert r.choices[0].text == streamed == want, names
    assert want != reference(ref, ids, 10)  # the second prefix changes the answer: both were applied


def test_n_choices_stream_with_include_usage(served):
    """n = 2 seeded samples: streamed per index equal the non-streamed ones; with include_usage every chunk has
    usage None but the last, which has empty choices and the usage (OpenAI's contract)."""
    url, ref = served
    c = client(url)
    kw = dict(model=ADAPTER, prompt=ref["prompt"], max_tokens=6, n=2, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    full = c.completions.create(**kw)
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 12 and last.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(ch.usage is None and len(ch.choices) == 1 for ch in body)
    texts, finish = ["", ""], [None, None]
    for ch in body:
        texts[ch.choices[0].index] += ch.choices[0].text
        finish[ch.choices[0].index] = finish[ch.choices[0].index] or ch.choices[0].finish_reason
    assert texts == [ch.text for ch in sorted(full.choices, key=lambda x: x.index)]
    assert finish == ["length", "length"] and full.usage.completion_tokens == 12
    chat = list(c.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=4, n=2, temperature=1.0, seed=3,
                                          stream=True, extra_body={"ignore_eos": True}))
    assert sorted({ch.choices[0].index for ch in chat}) == [0, 1]
    assert [ch.choices[0].delta.role for ch in chat[:2]] == ["assistant", "assistant"]


def test_logprobs_chat_and_completions(served):
    url, ref = served
    c = client(url)
    chat = c.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                     extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)  # greedy: the top
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob and e.logprob <= 0
    streamed = [x.logprob for ch in c.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=5, temperature=0,
                                                              logprobs=True, top_logprobs=2, stream=True,
                                                              extra_body={"ignore_eos": True})
                if ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-5)
    comp = c.completions.create(model=ADAPTER, prompt=ref["prompt"], max_tokens=5, temperature=0, logprobs=2,
                                extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-4)  # two ids may print alike


def test_async_client_streams_concurrently(served):
    url, ref = served

    async def run():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        async def streamed():
            stream = await c.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=8, temperature=0, stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])

        async def whole():
            r = await c.completions.create(model=ADAPTER, prompt=ref["prompt"], max_tokens=8, temperature=0)
            return r.choices[0].text

        out = await asyncio.gather(streamed(), whole(), streamed())
        await c.close()
        return out

    a, b, a2 = asyncio.run(run())
    assert a == a2 == reference(ref, chat_ids(ref), 8)
    assert b == reference(ref, ref["tokenizer"](ref["prompt"])["input_ids"], 8)


def test_client_errors_name_the_field(served):
    url, _ = served
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="'temperature' must be between 0 and 2, got 5"):
        c.chat.completions.create(model=ADAPTER, messages=CHAT, temperature=5)
    with pytest.raises(openai.NotFoundError, match="unknown adapter|available"):
        c.completions.create(model="nope", prompt="hi")
