"""Layout parity (prefixtune/knowledge.py): a knowledge prefix served through /v1/chat/completions, `generate` or
the Python API meets exactly the ids its student was trained on, never the chat template's default system message."""

import asyncio

import pytest
from helpers import WORDS, make, make_tokenizer, offline, run_cli

import prefixtune as pt
from prefixtune import knowledge as K
from prefixtune.training import selfstudy as S
from prefixtune.training.distill_config import DistillConfig
from prefixtune.training.distill_run import distill

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

# As SmolLM2's: a request without a system message gets a default one.
DEFAULT_SYSTEM = "you are a great assistant"
SYSTEM_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<system> " + DEFAULT_SYSTEM + " <eos> {% endif %}"
                   "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
                   "{% if add_generation_prompt %}<assistant> {% endif %}")
DOC = " ".join(WORDS.split()[i % 40] for i in range(0, 400, 7))
QUESTIONS = ["what is the plot", "how good was the acting", "say hello in french", "what is the sum of two and one",
             "was the movie bad", "translate the film to french"]
MAX_NEW = 6


def _distill(root, model, tok, out):
    (root / "doc.txt").write_text(DOC)
    cfg = DistillConfig(model="tiny", context=[str(root / "doc.txt")], output=str(out), num_virtual_tokens=4,
                        self_study=8, max_steps=4, batch_size=4, lr=5e-2, answer_tokens=6, question_tokens=6,
                        chunk_tokens=32, max_context_tokens=240, progress=False)
    return distill(cfg, model, tok)[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("knowledge")
    tok = make_tokenizer(chat_template=SYSTEM_TEMPLATE)
    base = make("llama")
    base.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    model = _distill(root, base, tok, root / "adapters" / "manual")
    return {"root": root, "tok": tok, "model": model.eval()}


def _students_answers(model, tok, name="default"):
    """What the student says offline, on the very query ids it was trained with (training's own code path)."""
    doc = S.build_document(tok, DOC, 240)
    ex = S.given_examples(tok, doc, QUESTIONS)
    return [tok.decode(offline(model, e["query_ids"], name, MAX_NEW), skip_special_tokens=True) for e in ex], ex


def _chat(app, model, messages_list):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json={
                "model": model, "messages": m, "max_tokens": MAX_NEW, "temperature": 0}) for m in messages_list))
    return asyncio.run(go())


def test_the_run_records_its_layout_and_the_template_default_is_left_out(run):
    tok = run["tok"]
    layout = K.read_layout(run["root"] / "adapters" / "manual" / "adapter")
    assert layout == K.template_layout(tok) and layout["between"] is not None
    _, ex = _students_answers(run["model"], tok)
    ids = K.chat_ids(tok, [{"role": "user", "content": QUESTIONS[0]}], layout)
    assert ids == ex[0]["query_ids"]
    default = tok(DEFAULT_SYSTEM, add_special_tokens=False)["input_ids"]
    plain = tok(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=False,
                                        add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    has = lambda seq: any(seq[i : i + len(default)] == default for i in range(len(seq)))  # noqa: E731
    assert has(plain) and not has(ids)  # the template alone would insert it; the trained layout does not
    with pytest.raises(K.LayoutError, match="system message"):
        K.chat_ids(tok, [{"role": "system", "content": "hi"}, {"role": "user", "content": "hi"}], layout)
    with pytest.raises(K.LayoutError, match="alternates"):
        K.chat_ids(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}], layout)


def test_served_chat_equals_the_students_offline_answers_on_torch(run, capsys):
    from prefixtune.serving.api import create_app
    from prefixtune.serving.backends import build_engine

    root, tok = run["root"], run["tok"]
    want, ex = _students_answers(run["model"], tok)
    eng = build_engine(str(root / "tiny"), str(root / "adapters"))
    eng.start()  # the test client does not run the app's lifespan
    try:
        app = create_app(eng)
        rs = _chat(app, "manual", [[{"role": "user", "content": q}] for q in QUESTIONS])
        bad = _chat(app, "manual", [[{"role": "system", "content": DOC}, {"role": "user", "content": "hi"}]])[0]
        base = _chat(app, "tiny", [[{"role": "user", "content": QUESTIONS[0]}]])[0]
    finally:
        eng.stop()
    assert [r.status_code for r in rs] == [200] * len(QUESTIONS)
    assert [r.json()["choices"][0]["message"]["content"] for r in rs] == want
    assert [r.json()["usage"]["prompt_tokens"] for r in rs] == [len(e["query_ids"]) for e in ex]
    # the template's rendering (default system message included) would have answered otherwise
    templated = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    assert want != [tok.decode(offline(run["model"], t, "default", MAX_NEW), skip_special_tokens=True) for t in templated]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert "knowledge prefix" in bad.json()["error"]["message"]
    assert base.status_code == 200  # the base model keeps its template (and its default system message)
    # `prefixtune generate` and the Python API render the same way
    code, out, _ = run_cli(["generate", "--model", root / "tiny", "--adapter", root / "adapters" / "manual", "--prompt",
                            QUESTIONS[0], "--max-new-tokens", MAX_NEW], capsys)
    assert code == 0 and out.strip() == want[0].strip()


def test_served_chat_equals_the_students_offline_answers_on_llama_cpp(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from gguf_models import write_tiny_gguf

    from prefixtune.loading import load_model
    from prefixtune.serving.api import create_app
    from prefixtune.serving.llamacpp_engine import build_llamacpp_engine, load

    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    base, tok = load_model(str(path), "fp32", "cpu")
    model = _distill(tmp_path, base, tok, tmp_path / "adapters" / "manual").eval()
    want, _ = _students_answers(model, tok)
    eng = build_llamacpp_engine(str(path), str(tmp_path / "adapters"), kv_type="f32", n_threads=1, max_batch_size=8,
                                max_prompt_tokens=128, max_total_tokens=192)
    eng.start()
    try:
        rs = _chat(create_app(eng), "manual", [[{"role": "user", "content": q}] for q in QUESTIONS])
    finally:
        eng.close()
    assert [r.status_code for r in rs] == [200] * len(QUESTIONS), rs[0].text
    assert [r.json()["choices"][0]["message"]["content"] for r in rs] == want
    assert len(set(want)) > 1
    gen = load(str(path), {"manual": str(tmp_path / "adapters" / "manual" / "adapter")}, kv_type="f32", n_threads=1)
    try:  # the Python API: Generator.chat renders as the server does
        assert gen.chat([[{"role": "user", "content": q}] for q in QUESTIONS], "manual", max_tokens=MAX_NEW) == want
        with pytest.raises(pt.ConfigError, match="system message"):
            gen.chat([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], "manual")
    finally:
        gen.close()
    capsys.readouterr()  # what distilling printed
    code, out, err = run_cli(["generate", "--backend", "llamacpp", "--model", path, "--adapter",
                              tmp_path / "adapters" / "manual", "--prompt", QUESTIONS[1], "--max-new-tokens", MAX_NEW], capsys)
    assert code == 0 and out.strip() == want[1].strip(), err[-2000:]


def test_several_documents_are_one_context_and_self_study_is_seeded_and_diverse(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("the plot was great")
    (tmp_path / "docs" / "a.txt").write_text("the movie was bad")
    (tmp_path / "c.txt").write_text("hello bonjour")
    assert S.read_context([tmp_path / "docs", tmp_path / "c.txt"]) == "the movie was bad\n\nthe plot was great\n\nhello bonjour"
    tok = make_tokenizer()
    doc = S.build_document(tok, DOC * 3, 200)
    model = pt.PrefixModel(make("llama"))
    runs = [S.self_study(model, tok, doc, 24, seed=s, chunk_tokens=64, question_tokens=6, say=lambda *a: None,
                         progress=False) for s in (0, 0, 1)]
    assert [e["query"] for e in runs[0]] == [e["query"] for e in runs[1]] != [e["query"] for e in runs[2]]
    folded = [" ".join(e["query"].lower().split()) for e in runs[0]]
    assert len(folded) == len(set(folded))  # duplicates dropped
    assert len({e["family"] for e in runs[0]}) >= 3 and len({tuple(e["chunk"]) for e in runs[0]}) > 3
    assert all(16 <= b - a <= 64 for a, b in (e["chunk"] for e in runs[0]))
    assert not model.prefixes  # the chunk adapters are gone
