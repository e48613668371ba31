"""Knowledge prefixes (training/distill*.py, selfstudy.py, distill_eval.py, `prefixtune distill`) on tiny models."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import WORDS, make, make_tokenizer, model_dir

from prefixtune import knowledge as K
from prefixtune.cli.main import main
from prefixtune.model import PrefixModel
from prefixtune.training import distill as D
from prefixtune.training import distill_eval as E
from prefixtune.training import selfstudy as S
from prefixtune.training.distill_run import distill


def _text(n=300, seed=0):
    rng, words = random.Random(seed), WORDS.split()
    return " ".join(rng.choice(words) for _ in range(n))


def _setup(kind="llama", n=300, max_context=480):
    tok = make_tokenizer()
    model = PrefixModel(make(kind))
    return model, tok, S.build_document(tok, _text(n), max_context)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen3"])
def test_teacher_prefix_equals_the_document_in_the_prompt(kind):
    """The context's key/values, computed once and reused as a prefix, give what re-reading the document gives."""
    model, tok, doc = _setup(kind, n=60)
    D.teacher_adapters(model, doc)
    ex = S.given_examples(tok, doc, ["what is the plot", "how good was the acting"])
    for e in ex:
        e["answer_ids"] = tok("the film was great", add_special_tokens=False)["input_ids"]
    got, mask = D.answer_logits(model.eval(), ex, ["context-0"] * 2, pad=0)
    for i, e in enumerate(ex):
        full = torch.tensor([doc.window_ids(0) + e["query_ids"] + e["answer_ids"]])
        ref = model.base_model(input_ids=full).logits[0]
        start = len(doc.window_ids(0)) + len(e["query_ids"]) - 1
        torch.testing.assert_close(got[i, : len(e["answer_ids"])], ref[start : start + len(e["answer_ids"])],
                                   atol=1e-4, rtol=1e-4)


def test_teacher_top_k_from_generate_equals_the_second_forward():
    """prepare() takes the teacher's top-k from the logits generate() scored the answer with; teacher_topk (a second
    forward over query + answer, right-padded) must give the same ids and log-probabilities."""
    model, tok, doc = _setup("llama", n=60)
    D.teacher_adapters(model, doc)
    fused = S.given_examples(tok, doc, ["what is the plot", "how good was the acting in it", "why"])
    D.teacher_answers(model.eval(), tok, fused, 7, progress=False, top_k=5)
    again = [{k: e[k] for k in ("query", "query_ids", "window", "answer_ids")} for e in fused]
    D.teacher_topk(model, tok, again, 5, progress=False)
    for e, r in zip(fused, again):
        assert e["topk_ids"].shape == (len(e["answer_ids"]), 5)
        assert torch.equal(e["topk_ids"][:, 0], torch.tensor(e["answer_ids"]))  # greedy: the answer is the top-1
        torch.testing.assert_close(e["topk_logp"], r["topk_logp"], atol=1e-4, rtol=1e-4)
        assert torch.equal(e["topk_ids"], r["topk_ids"])


def test_kl_topk_is_the_kl_with_all_tokens_and_zero_for_the_teacher():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    mask = torch.ones(2, 3)
    logp, idx = t.log_softmax(-1).topk(11, dim=-1)
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(D.kl_topk(s, idx, logp, mask), ref.mean())
    assert D.kl_topk(t, idx, logp, mask).abs() < 1e-6
    logp5, idx5 = t.log_softmax(-1).topk(5, dim=-1)  # top-5 + the rest: zero at the teacher, below the full KL
    assert D.kl_topk(t, idx5, logp5, mask).abs() < 1e-6
    assert 0.01 < D.kl_topk(s, idx5, logp5, mask) < ref.mean()


def test_long_document_is_cut_into_windows_and_queries_find_theirs():
    tok = make_tokenizer()
    doc = S.build_document(tok, "the movie was great " * 30 + "bonjour french translate " * 30 + "hello", 100)
    assert len(doc.windows) == 3 and all(len(doc.window_ids(w)) <= 100 for w in range(3))
    assert doc.windows[0][0] == 0 and doc.windows[-1][1] == len(doc.body)
    assert S.nearest_window(doc, tok("hello bonjour", add_special_tokens=False)["input_ids"]) == 2
    assert S.nearest_window(doc, tok("great movie", add_special_tokens=False)["input_ids"]) == 0


def _cfg(tmp_path, out="run", **kw):
    (tmp_path / "doc.txt").write_text(_text(300))
    base = dict(model="tiny", context=[str(tmp_path / "doc.txt")], output=str(tmp_path / out), num_virtual_tokens=6,
                self_study=12, max_steps=15, batch_size=4, lr=5e-2, eval_fraction=0.0, answer_tokens=8,
                question_tokens=8, chunk_tokens=64, max_context_tokens=480, progress=False, save_every=4, eval_every=5)
    return D.DistillConfig(**{**base, **kw})


def test_init_from_context_equals_the_truncated_document_and_fit_lowers_the_kl_and_keeps_the_sink(tmp_path):
    model, tok, _ = _setup()
    cfg = _cfg(tmp_path)
    doc = S.build_document(tok, (tmp_path / "doc.txt").read_text(), 480)
    examples = D.prepare(model, tok, doc, cfg, queries=["what is the plot"], say=lambda *a: None)
    assert {e["source"] for e in examples} == {"given", "self_study"}
    assert all(e["topk_ids"].shape == (len(e["answer_ids"]), 20) for e in examples)
    D.add_student(model, doc, cfg)
    S.context_adapter(model, "truncated", doc.window_ids(0)[:6])
    res = E.score(model.eval(), tok, examples, {"student": "default", "truncated": "truncated"}, progress=False)
    assert res["student"] == pytest.approx(res["truncated"], abs=1e-5)  # same start
    sink = model.prefixes["default"].embedding.weight[0].detach().clone()
    before = D.mean_loss(model, examples, pad=0)
    summary, model = distill(cfg, model, tok, examples=examples)  # the training loop's steps
    assert summary["steps"] == 15 and D.mean_loss(model, examples, pad=0) < 0.7 * before
    w = model.prefixes["default"].embedding.weight
    assert torch.equal(w[0], sink) and not torch.equal(w[1:], w[1:].detach() * 0)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 16)) and any("eval_loss" in r for r in recs)


def test_the_start_is_scored_and_kept_when_training_only_makes_it_worse(tmp_path, capsys):
    """A prefix as long as the document starts as the teacher's own key/values (held-out KL near 0); a learning rate
    far too high moves it away. The start is scored at step 0, best/ keeps it, eval.json records it and the run ends
    with a one-line warning; at a sane learning rate no warning."""
    tok = make_tokenizer()
    (tmp_path / "doc.txt").write_text(_text(300))
    P = S.build_document(tok, (tmp_path / "doc.txt").read_text(), 480).context_len
    cfg = _cfg(tmp_path, "hot", num_virtual_tokens=P, lr=4.0, eval_fraction=0.25, max_steps=8, progress=True,
               scheduler="constant")
    distill(cfg, make("llama"), tok)
    said = "".join(capsys.readouterr())
    recs = [json.loads(line) for line in (tmp_path / "hot" / "metrics.jsonl").read_text().splitlines()]
    start = next(r["eval_loss"] for r in recs if r["step"] == 0)
    res = json.loads((tmp_path / "hot" / "eval.json").read_text())
    assert start < 1e-3 and res["start_eval_loss"] == start and res["eval_loss"] > 10 * start
    assert "warning: training made the held-out KL worse than the start" in said and "(step 0)" in said
    start_model = PrefixModel(make("llama"))  # best/ is the start: the student as add_student makes it
    D.add_student(start_model, S.build_document(tok, (tmp_path / "doc.txt").read_text(), 480), cfg)
    start_model.save_adapter(tmp_path / "start" / "adapter", "default")
    best = _adapter(tmp_path / "hot", "best")
    torch.testing.assert_close(best, _adapter(tmp_path / "start"), rtol=0, atol=0)
    assert not torch.equal(best, _adapter(tmp_path / "hot"))  # the final adapter moved away
    distill(_cfg(tmp_path, "calm", num_virtual_tokens=6, eval_fraction=0.25, max_steps=8, progress=True),
            make("llama"), tok)
    assert "warning" not in "".join(capsys.readouterr())


def _adapter(path, sub="adapter"):
    from safetensors.torch import load_file

    return load_file(path / sub / "adapter_model.safetensors")["prompt_embeddings"]


def test_resume_matches_uninterrupted_and_reuses_the_examples(tmp_path):
    kw = dict(grad_accum=2, eval_fraction=0.25, ema=0.5, max_steps=10)
    distill(_cfg(tmp_path, "a", **kw), make("llama"), make_tokenizer())
    stopped, _ = distill(_cfg(tmp_path, "b", **kw), make("llama"), make_tokenizer(), stop_after=6)
    assert stopped == {"stopped_at": 6} and (tmp_path / "b" / "examples.pt").is_file()
    made = (tmp_path / "b" / "examples.pt").stat().st_mtime_ns
    with pytest.raises(D.ConfigError, match="--resume"):
        distill(_cfg(tmp_path, "b", **kw), make("llama"), make_tokenizer())
    with pytest.raises(D.ConfigError, match="differs in lr"):
        distill(_cfg(tmp_path, "b", resume=True, **{**kw, "lr": 1e-3}), make("llama"), make_tokenizer())
    distill(_cfg(tmp_path, "b", resume=True, **kw), make("llama"), make_tokenizer())
    assert (tmp_path / "b" / "examples.pt").stat().st_mtime_ns == made  # not made again
    torch.testing.assert_close(_adapter(tmp_path / "a"), _adapter(tmp_path / "b"), rtol=0, atol=1e-6)
    task = json.loads((tmp_path / "b" / "adapter" / "task.json").read_text())
    assert task["task"] == "distill" and task["layout"] == K.template_layout(make_tokenizer())


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """A real crash: `prefixtune distill` is SIGKILLed once a checkpoint exists; --resume ends with the adapter of an
    uninterrupted run."""
    import subprocess
    import sys
    import time

    from prefixtune.training.checkpoints import latest_checkpoint

    d = model_dir(tmp_path)
    (tmp_path / "doc.txt").write_text(_text(250))
    args = [sys.executable, "-m", "prefixtune", "distill", "--model", str(d), "--context", str(tmp_path / "doc.txt"),
            "--self-study", "16", "--num-virtual-tokens", "4", "--max-steps", "300", "--save-every", "3",
            "--eval-every", "1000", "--answer-tokens", "6", "--question-tokens", "6", "--no-progress"]
    p = subprocess.Popen(args + ["--output", str(tmp_path / "b")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while latest_checkpoint(tmp_path / "b") is None and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.kill()
    assert p.wait() == -9, "the run ended before a checkpoint could be interrupted: " + p.stderr.read().decode()[-2000:]
    assert not (tmp_path / "b" / "adapter").exists()
    for out, extra in (("b", ["--resume"]), ("a", [])):
        q = subprocess.run(args + ["--output", str(tmp_path / out)] + extra, capture_output=True, text=True)
        assert q.returncode == 0, q.stderr[-2000:]
    torch.testing.assert_close(_adapter(tmp_path / "a"), _adapter(tmp_path / "b"), rtol=0, atol=1e-6)


def test_cli_train_then_eval_writes_the_run_and_eval_json(tmp_path, capsys):
    d = model_dir(tmp_path)
    (tmp_path / "doc.txt").write_text(_text(250))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": _text(5, s)}) + "\n" for s in range(8)))
    run = tmp_path / "run"
    main(["distill", "--model", str(d), "--context", str(tmp_path / "doc.txt"), "--queries",
          str(tmp_path / "q.jsonl"), "--self-study", "8", "--output", str(run), "--num-virtual-tokens", "4",
          "--max-steps", "4", "--eval-every", "2", "--answer-tokens", "6", "--question-tokens", "6",
          "--save-format", "cartridge", "--no-progress"])
    for f in ("adapter/adapter_config.json", "adapter/task.json", "best/task.json", "run.json", "task.json",
              "data.jsonl", "examples.pt", "metrics.jsonl", "loss_curve.png", "eval.json"):
        assert (run / f).is_file(), f
    assert json.loads((run / "adapter/adapter_config.json").read_text())["peft_type"] == "CARTRIDGE"
    main(["distill-eval", "--model", str(d), "--adapter", str(run), "--context", str(tmp_path / "doc.txt"),
          "--queries", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "ev"), "--no-progress"])
    r = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(r["baselines"]) == {"no_context", "truncated"} and r["queries"] == 8
    for m in (r, r["baselines"]["no_context"], r["baselines"]["truncated"]):
        assert m["kl"] >= 0 and 0 <= m["agreement"] <= 1


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    d = model_dir(tmp_path)
    capsys.readouterr()  # saving the model may draw a progress bar
    with pytest.raises(SystemExit) as e:
        main(["distill", "--model", str(d), "--context", str(tmp_path / "nope.txt"), "--output",
              str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--context" in err and "not found" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "q.jsonl").write_text('{"foo": 1}\n')
    (tmp_path / "doc.txt").write_text("the movie")
    with pytest.raises(SystemExit) as e:
        main(["distill", "--model", str(d), "--context", str(tmp_path / "doc.txt"), "--queries",
              str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "r2")])
    assert e.value.code == 2 and "no 'query'" in capsys.readouterr().err
    for argv in (["train", "--task", "distill", "--model", str(d), "--context", "doc.txt"],
                 ["eval", "--task=distill", "--model", str(d)]):  # the old spellings: a pointer to the new commands
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # argparse's usage, then its one error line: the pointer
        assert e.value.code == 2 and "--task: knowledge prefixes have their own commands: `prefixtune distill" in last


def test_self_study_families_follow_their_weights_and_answers_ask_for_a_span_of_the_chunk(tmp_path, capsys):
    assert D.DistillConfig.__dataclass_fields__["families"].default == S.FAMILIES  # the default, written twice
    text = "The club was founded in 1987 by Maria Okonkwo. Rides leave at 8:30 from Fenwick Lane; it has 1,450 m.\nPip."
    assert S.answer_spans(text) == ["1987", "Maria Okonkwo", "8:30", "Fenwick Lane", "1,450"]  # not "The", "Rides", "Pip"
    model, tok, doc = _setup()
    only = S.self_study(model, tok, doc, 12, chunk_tokens=64, question_tokens=6, families="structure:2,summary:0",
                        say=lambda *a: None, progress=False)
    assert only and {e["family"] for e in only} == {"structure"}
    # the tiny tokenizer's words hold no number or name: "answers" falls back to "facts" instead of asking for nothing
    fallback = S.self_study(model, tok, doc, 12, chunk_tokens=64, question_tokens=6, families="answers",
                            say=lambda *a: None, progress=False)
    assert fallback and {e["family"] for e in fallback} == {"facts"}
    rng = random.Random(0)
    real = S.Document([], list(range(40)), [(0, 40)])
    fake_tok = type("T", (), {"decode": staticmethod(lambda ids: text)})
    chunk, fam, _, prompt = S._plan(real, fake_tok, rng, 16, {"answers": 1.0})
    assert fam == "answers" and any(f'answer is "{s}"' in prompt for s in S.answer_spans(text))
    for bad, says in (("answers:3,bogus", "--families 'bogus': use some of"), ("facts:x", "must be a number"),
                      ("facts:0", "no family a weight above 0")):
        with pytest.raises(SystemExit) as e:
            main(["distill", "--model", "x", "--context", str(tmp_path), "--output", str(tmp_path / "o"),
                  "--families", bad])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and says in last and "Traceback" not in last


def test_two_turn_self_study_trains_on_whole_conversations_in_the_served_layout(tmp_path):
    model, tok, doc = _setup()
    cfg = _cfg(tmp_path, conversation_turns=2, self_study=8)
    examples = D.prepare(model, tok, doc, cfg, say=lambda *a: None)
    second = [e for e in examples if e["source"] == "self_study_turn2"]
    assert second and all(e["topk_ids"].shape[0] == len(e["answer_ids"]) for e in second)
    for e in second:
        first = e["messages"][0]["content"]
        assert [m["role"] for m in e["messages"]] == ["user", "assistant", "user"]
        assert e["query_ids"] == K.chat_ids(tok, e["messages"], doc.layout)  # what the server renders for them
        assert e["query_ids"][: len(K.query_ids(tok, first, doc.layout)) - len(K.encode(tok, doc.layout["footer"]))] == \
            K.query_ids(tok, first, doc.layout)[: -len(K.encode(tok, doc.layout["footer"]))]
    assert not any(n.startswith("chunk-") for n in model.prefixes)
