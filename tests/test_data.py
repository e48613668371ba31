import json
import logging

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from prefixtune.training.data import (
    DataError,
    PadCollator,
    length_grouped_batches,
    tokenize_dataset,
)
from prefixtune.training.sources import load_records, split_train_eval

ROWS = [{"text": f"the movie was {w}", "label": lab} for w, lab in
        [("great", "positive"), ("awful", "negative"), ("fine", "neutral"), ("good", "positive")]]


def ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- loading

def test_load_csv_utf8_and_latin1(tmp_path):
    (tmp_path / "u.csv").write_text("text,label\ncafé,positive\nNA,negative\n", encoding="utf-8")
    (tmp_path / "l.csv").write_bytes("sentiment,text\npositive,caf\xe9 cr\xe8me\n".encode("latin-1"))
    u = load_records(str(tmp_path / "u.csv"))
    assert u["text"] == ["café", "NA"]  # "NA" stays text
    assert load_records(str(tmp_path / "l.csv"))["text"] == ["café crème"]


def test_load_jsonl_parquet_and_disk(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_records(str(p))["text"] == [r["text"] for r in ROWS]
    ds = Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert load_records(str(tmp_path / "d.parquet"))["label"] == ds["label"]
    ds.save_to_disk(str(tmp_path / "ds"))
    assert isinstance(load_records(str(tmp_path / "ds")), Dataset)
    DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(tmp_path / "dd"))
    dd = load_records(str(tmp_path / "dd"))
    assert isinstance(dd, DatasetDict) and set(dd) == {"train", "test"}
    assert len(load_records(str(tmp_path / "dd"), split="test")) == 1
    with pytest.raises(DataError, match="split 'nope'.*train, test"):
        load_records(str(tmp_path / "dd"), split="nope")


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match="missing.csv"):
        load_records(str(tmp_path / "missing.csv"))


# ----------------------------------------------------------------------------- splitting

def test_split_seeded_and_deterministic():
    ds = Dataset.from_dict({"text": [str(i) for i in range(50)]})
    a_tr, a_ev = split_train_eval(ds, eval_fraction=0.2, seed=1)
    b_tr, b_ev = split_train_eval(ds, eval_fraction=0.2, seed=1)
    assert a_ev["text"] == b_ev["text"] and len(a_ev) == 10 and len(a_tr) == 40
    assert set(a_tr["text"]).isdisjoint(a_ev["text"])
    assert split_train_eval(ds, eval_fraction=0.2, seed=2)[1]["text"] != a_ev["text"]


def test_split_uses_dict_splits_and_explicit_eval_wins(tmp_path):
    tr, va = Dataset.from_dict({"x": [1, 2, 3]}), Dataset.from_dict({"x": [9]})
    assert split_train_eval(DatasetDict(train=tr, validation=va))[1]["x"] == [9]
    other = Dataset.from_dict({"x": [7, 8]})
    assert split_train_eval(DatasetDict(train=tr, validation=va), eval_source=other)[1]["x"] == [7, 8]
    (tmp_path / "e.jsonl").write_text('{"x": 5}\n')
    assert split_train_eval(tr, eval_source=str(tmp_path / "e.jsonl"))[1]["x"] == [5]


def test_split_empty_raises():
    with pytest.raises(DataError, match="empty"):
        split_train_eval(Dataset.from_dict({"text": []}))


# ----------------------------------------------------------------------------- tasks

def test_classify_causal_masks_prompt(tiny_tokenizer):
    tok = tiny_tokenizer()
    out, info = tokenize_dataset(Dataset.from_list(ROWS), tok, "classify", is_encoder_decoder=False)
    assert info["label_words"] == ["negative", "neutral", "positive"]
    ex = out[0]
    prompt = ids(tok, "the movie was great\nLabel:")
    target = ids(tok, "positive") + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + target
    assert ex["labels"] == [-100] * len(prompt) + target
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_classify_seq2seq_and_classlabel(tiny_tokenizer):
    tok = tiny_tokenizer()
    feats = Features(text=Value("string"), label=ClassLabel(names=["negative", "positive"]))
    ds = Dataset.from_dict({"text": ["the movie was great", "the movie was bad"], "label": [1, 0]}, features=feats)
    out, info = tokenize_dataset(ds, tok, "classify", is_encoder_decoder=True, prompt_template="{text} !")
    assert info["label_words"] == ["negative", "positive"]  # ClassLabel order, not sorted values
    assert out[0]["input_ids"] == ids(tok, "the movie was great !")
    assert out[0]["labels"] == ids(tok, "positive") + [tok.eos_token_id]
    assert out[1]["labels"] == ids(tok, "negative") + [tok.eos_token_id]


def test_classify_eval_unknown_label(tiny_tokenizer):
    tok = tiny_tokenizer()
    ev = Dataset.from_list([{"text": "good", "label": "positive"}, {"text": "hmm", "label": "mixed"}])
    with pytest.raises(DataError, match="'mixed'.*training label set"):
        tokenize_dataset(ev, tok, "classify", is_encoder_decoder=False, label_words=["negative", "positive"])


def test_classify_column_errors(tiny_tokenizer):
    tok = tiny_tokenizer()
    ds = Dataset.from_list(ROWS)
    with pytest.raises(DataError, match=r"column 'sentence' not found.*available columns: text, label.*--text-column"):
        tokenize_dataset(ds, tok, "classify", is_encoder_decoder=False, text_column="sentence")
    with pytest.raises(DataError, match="label column.*available columns: body.*--label-column"):
        tokenize_dataset(Dataset.from_dict({"body": ["x"]}), tok, "classify", is_encoder_decoder=False,
                         text_column="body")


def test_instruct_masks_and_templates(tiny_tokenizer):
    tok = tiny_tokenizer(bos=True)
    ds = Dataset.from_list([
        {"instruction": "add two and three", "input": "", "output": "five"},
        {"instruction": "translate to french", "input": "hello", "output": "bonjour"},
    ])
    out, _ = tokenize_dataset(ds, tok, "instruct", is_encoder_decoder=False)
    p0 = tok("Human: add two and three\n\nAssistant:")["input_ids"]  # starts with <bos>
    t0 = ids(tok, "five") + [tok.eos_token_id]
    assert out[0]["input_ids"] == p0 + t0 and p0[0] == tok.bos_token_id
    assert out[0]["labels"] == [-100] * len(p0) + t0
    p1 = tok("Human: translate to french\nhello\n\nAssistant:")["input_ids"]
    assert out[1]["labels"] == [-100] * len(p1) + ids(tok, "bonjour") + [tok.eos_token_id]
    s2s, _ = tokenize_dataset(ds, tok, "instruct", is_encoder_decoder=True)
    assert s2s[1]["labels"] == ids(tok, "bonjour") + [tok.eos_token_id]
    with pytest.raises(DataError, match="needs column.*output"):
        tokenize_dataset(ds.remove_columns("output"), tok, "instruct", is_encoder_decoder=False)


def test_chat_labels_only_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer()
    msgs = [{"role": "system", "content": "say hi"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "how are you"},
            {"role": "assistant", "content": "good"}]
    out, _ = tokenize_dataset(Dataset.from_dict({"messages": [msgs]}), tok, "chat", is_encoder_decoder=False)
    toks = tok.convert_ids_to_tokens(out[0]["input_ids"])
    labelled = [t for t, l in zip(toks, out[0]["labels"]) if l != -100]
    assert labelled == ["hi", "<eos>", "good", "<eos>"]  # content + end marker; never headers/user/system
    assert [l for l in out[0]["labels"] if l != -100] == [i for i, l in zip(out[0]["input_ids"], out[0]["labels"])
                                                         if l != -100]


def test_chat_errors(tiny_tokenizer):
    ds = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]]})
    with pytest.raises(DataError, match="no chat_template"):
        tokenize_dataset(ds, tiny_tokenizer(chat_template=None), "chat", is_encoder_decoder=False)
    no_asst = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(DataError, match="no assistant message"):
        tokenize_dataset(no_asst, tiny_tokenizer(), "chat", is_encoder_decoder=False)


def test_lm_labels_equal_inputs(tiny_tokenizer):
    tok = tiny_tokenizer()
    out, info = tokenize_dataset(Dataset.from_dict({"content": ["i loved this film"]}), tok, "lm",
                                 is_encoder_decoder=False)
    assert out[0]["labels"] == out[0]["input_ids"] == ids(tok, "i loved this film")
    assert info["text_column"] == "content"


def test_unknown_task_and_empty(tiny_tokenizer):
    with pytest.raises(DataError, match="classify, instruct, chat, lm"):
        tokenize_dataset(Dataset.from_list(ROWS), tiny_tokenizer(), "summarize", is_encoder_decoder=False)
    with pytest.raises(DataError, match="empty"):
        tokenize_dataset(Dataset.from_dict({"text": [], "label": []}), tiny_tokenizer(), "classify",
                         is_encoder_decoder=False)


# ----------------------------------------------------------------------------- truncation

LONG = [{"text": "the movie was great " * 5, "label": "positive"}, {"text": "bad", "label": "negative"}]


def test_truncate_warn_cuts_prompt_from_left_keeps_target(tiny_tokenizer, caplog):
    tok = tiny_tokenizer(bos=True)
    with caplog.at_level(logging.WARNING):
        out, info = tokenize_dataset(Dataset.from_list(LONG), tok, "classify", is_encoder_decoder=False,
                                     max_length=8)
    assert info["n_truncated"] == 1 and info["n_dropped"] == 0 and "truncated" in caplog.text
    ex = out[0]
    assert len(ex["input_ids"]) == 8
    target = ids(tok, "positive") + [tok.eos_token_id]
    assert ex["input_ids"][0] == tok.bos_token_id  # BOS survives the left cut
    assert ex["input_ids"][-len(target) - 2:] == ids(tok, "Label:") + target  # prompt end + target intact
    assert ex["labels"] == [-100] * 6 + target


def test_evaluation_cuts_prompts_as_training_does(tiny_tokenizer):
    """One left cut (data.left_cut) for both: the scored prompt is the prompt the model was trained on."""
    from prefixtune.training import data as D
    from prefixtune.training.evaluate import _fit, classify_prompts

    tok = tiny_tokenizer(bos=True)
    ds = Dataset.from_list(LONG)
    out, info = tokenize_dataset(ds, tok, "classify", is_encoder_decoder=False, max_length=8)
    prompts, gold = classify_prompts(ds, info)
    assert gold == ["positive", "negative"]
    p_ids, t_ids = D.encode_pair(tok, prompts, gold, False)
    for ex, p, t in zip(out, p_ids, t_ids):
        assert _fit(p, len(t), 8, tok.bos_token_id) == ex["input_ids"][: len(ex["input_ids"]) - len(t)]
    assert D.left_cut([3, 5, 6, 7], 2, bos=3) == [0, 3] and D.left_cut([5, 6, 7], 2, bos=3) == [1, 2]
    assert D.left_cut([3, 5, 6], 1, bos=3) == [0] and D.left_cut([5, 6], 5, bos=None) == [0, 1]


def test_truncate_drop_and_error(tiny_tokenizer):
    tok = tiny_tokenizer()
    out, info = tokenize_dataset(Dataset.from_list(LONG), tok, "classify", is_encoder_decoder=False,
                                 max_length=8, on_truncate="drop")
    assert len(out) == 1 and info["n_dropped"] == 1
    with pytest.raises(DataError, match="example 0: prompt 22 \\+ target 2 tokens > max_length=8"):
        tokenize_dataset(Dataset.from_list(LONG), tok, "classify", is_encoder_decoder=False,
                         max_length=8, on_truncate="error")


def test_target_too_long(tiny_tokenizer):
    tok = tiny_tokenizer()
    ds = Dataset.from_list([{"instruction": "say", "output": "hi " * 10}, {"instruction": "say", "output": "hi"}])
    with pytest.raises(DataError, match="example 0: the target alone is 11 tokens, longer than max_length=8"):
        tokenize_dataset(ds, tok, "instruct", is_encoder_decoder=False, max_length=8, on_truncate="error")
    for mode in ("warn", "drop"):  # a target that can't fit is never cut, only dropped
        out, info = tokenize_dataset(ds, tok, "instruct", is_encoder_decoder=False, max_length=8, on_truncate=mode)
        assert len(out) == 1 and info["n_dropped"] == 1
    s2s, info = tokenize_dataset(ds, tok, "instruct", is_encoder_decoder=True, max_length=8, on_truncate="drop")
    assert len(s2s) == 1 and info["n_dropped"] == 1


# ----------------------------------------------------------------------------- collation / batching

def test_collator_right_and_left(tiny_tokenizer):
    tok = tiny_tokenizer()
    feats = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
             {"input_ids": [5], "attention_mask": [1], "labels": [5]}]
    b = PadCollator(tok)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    b = PadCollator(tok, padding_side="left", pad_to_multiple_of=4)(feats)
    assert b["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 5]]
    assert b["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 5]]
    assert b["input_ids"].dtype == torch.long


def test_collator_seq2seq_and_eos_fallback(tiny_tokenizer):
    tok = tiny_tokenizer(pad=False)
    feats = [{"input_ids": [5, 6, 7], "labels": [9, 2]}, {"input_ids": [5], "labels": [8, 8, 2]}]
    b = PadCollator(tok, padding_side="left")(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [2, 2, 5]]  # no pad token -> eos
    assert b["labels"].tolist() == [[9, 2, -100], [8, 8, 2]]  # decoder labels: own length, right-padded


def test_length_grouped_batches():
    lengths = [(i * 37) % 101 for i in range(1000)]
    a = length_grouped_batches(lengths, batch_size=8, seed=3)
    assert a == length_grouped_batches(lengths, batch_size=8, seed=3)
    assert a != length_grouped_batches(lengths, batch_size=8, seed=4)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert max(lengths[i] for i in a[0]) == max(lengths)
    # within a batch lengths are close; a random batch would span most of 0..100
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 10
