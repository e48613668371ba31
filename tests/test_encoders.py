"""Encoder classifiers (BERT family) through the command line: prefix + classification head, evaluated by the head,
saved in peft's SEQ_CLS layout; model/task pairs that cannot train correctly are refused."""

import json

import helpers
import pytest
import torch
from helpers import WORDS, classify_rows, run_cli, write_jsonl
from peft import PeftModel

import prefixtune as pt

ENCODERS = ("bert", "roberta", "electra")


def encoder_tokenizer(kind: str):
    """Word-level tokenizer with the family's special tokens around every text ([CLS] x [SEP] / <s> x </s>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "roberta":  # RoBERTa: <s>=0, <pad>=1 (its padding_idx), </s>=2
        specials, names = ["<s>", "<pad>", "</s>", "<unk>"], dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")
    else:
        specials, names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], dict(pad_token="[PAD]", unk_token="[UNK]",
                                                                      cls_token="[CLS]", sep_token="[SEP]")
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS.split())))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cls, sep = names["cls_token"], names["sep_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def encoder_body(kind: str, seed: int = 0):
    """A tiny random encoder without a head (as a sentence encoder like MiniLM ships)."""
    from transformers import BertConfig, BertModel, ElectraConfig, ElectraModel, RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  initializer_range=0.2)  # the default 0.02 makes a tiny random encoder's [CLS] output nearly constant
    if kind == "roberta":
        return RobertaModel(RobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, **common))
    if kind == "electra":
        return ElectraModel(ElectraConfig(embedding_size=16, pad_token_id=0, **common))
    return BertModel(BertConfig(pad_token_id=0, **common))


def encoder_dir(tmp_path, kind: str):
    d = tmp_path / f"model-{kind}"
    if not d.exists():
        encoder_body(kind).save_pretrained(d)
        encoder_tokenizer(kind).save_pretrained(d)
    return d




def _train(tmp_path, capsys, mdir, data, *extra):
    return run_cli(["train", "--model", mdir, "--train", data, "--task", "classify", "--output", tmp_path / "o",
                    "--num-virtual-tokens", 4, "--batch-size", 8, "--no-progress", *extra], capsys)


# ---- train -> eval -> info -> peft ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ENCODERS)
def test_encoder_classifier_end_to_end(kind, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    mdir = encoder_dir(tmp_path, kind)
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows(64))
    code, out, err = _train(tmp_path, capsys, mdir, data, "--eval", data, "--max-steps", 80, "--eval-every", 80)
    assert code == 0, err
    assert "2-way classification head" in out
    run = tmp_path / "o"
    report = json.loads((run / "eval.json").read_text())
    assert report["method"] == "head" and report["n"] == len((run / "predictions.jsonl").read_text().splitlines())
    assert "single_class_warning" not in report
    # the head's cross-entropy is what trained: it falls well below chance (ln 2) on this separable data
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    assert report["accuracy"] > 0.75  # the classes are balanced: chance is 0.5

    adapter = run / "adapter"
    task = json.loads((adapter / "task.json").read_text())
    assert task["head"] == "sequence-classification" and task["label_words"] == ["negative", "positive"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors["base_model.classifier.weight" if kind == "bert" else "base_model.classifier.out_proj.weight"].shape[0] == 2
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert "num_labels=2" in (adapter / "README.md").read_text()

    # eval (labels from task.json) reproduces the training run's final evaluation on the same rows
    code, out, err = run_cli(["eval", "--model", mdir, "--adapter", adapter, "--data", data, "--task", "classify",
                              "--output", tmp_path / "ev"], capsys)
    assert code == 0, err and "accuracy" in out
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["method"] == "head" and ev["n"] == 64 and ev["accuracy"] > 0.75
    first = json.loads((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()[0])
    assert set(first["probs"]) == {"negative", "positive"}

    code, out, err = run_cli(["info", adapter, "--model", mdir], capsys)
    assert code == 0, err
    assert "task           classify / SEQ_CLS" in out and "2 labels: negative, positive" in out and "fits --model   yes" in out

    # peft loads the adapter (prefix + trained head as modules_to_save) with the same logits as ours
    tok = encoder_tokenizer(kind)
    batch = tok(["the movie was great i think", "the movie was awful"], return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None)

    def base():
        return AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2).eval()

    ours = pt.load_adapter(base(), adapter).eval()(**batch).logits
    theirs = helpers.peft_logits(PeftModel.from_pretrained(base(), adapter).eval(), **batch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (base()(**batch).logits - ours).abs().max() > 1e-2  # the trained head/prefix are really in there


@pytest.mark.parametrize("kind", ENCODERS)
def test_padded_batch_matches_peft(kind, tmp_path):
    """Right padding and prefix positions as peft (RoBERTa numbers positions from padding_idx + 1)."""
    from transformers import AutoModelForSequenceClassification

    mdir = encoder_dir(tmp_path, kind)
    base = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=3).eval()
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=5)).eval()
    with torch.no_grad():
        for p in [*model.prefixes["default"].parameters(), *model.heads["default"].parameters()]:
            p.add_(torch.randn_like(p))
    tok = encoder_tokenizer(kind)
    batch = tok(["the movie was great", "bad", "i loved this film , it was good"], return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None)
    ours = model(**batch).logits
    model.save_adapter(tmp_path / "a")
    ref = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=3), tmp_path / "a")
    torch.testing.assert_close(ours, helpers.peft_logits(ref.eval(), **batch), atol=1e-5, rtol=0)


def test_hf_trainer_trains_prefix_and_head(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from prefixtune.training import data as D
    from prefixtune.training.hf_trainer import PrefixTrainer

    mdir = encoder_dir(tmp_path, "bert")
    tok = encoder_tokenizer("bert")
    tokd, info = D.tokenize_dataset(Dataset.from_list(classify_rows(32)), tok, "classify", is_encoder_decoder=False, head=True)
    assert info["label_words"] == ["negative", "positive"] and set(tokd["labels"]) == {0, 1}
    base = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2)
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=4))
    head0 = model.heads["default"].weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], logging_steps=1, save_strategy="no", use_cpu=True)
    trainer = PrefixTrainer(model=model, args=args, train_dataset=tokd, data_collator=D.PadCollator(tok))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and result.training_loss > 0
    assert not torch.equal(model.heads["default"].weight, head0)  # the head trains with the prefix
    trainer.save_model(str(tmp_path / "saved"))
    batch = {k: v for k, v in D.PadCollator(tok)(tokd.to_list()[:4]).items() if k != "labels"}
    ref = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2), tmp_path / "saved")
    torch.testing.assert_close(model.eval()(**batch).logits, helpers.peft_logits(ref.eval(), **batch), atol=1e-5, rtol=0)


def test_encoder_trains_without_the_base_models_dropout_by_default(tmp_path, capsys):
    """The same encoder saved with dropout 0.3 trains to the same adapter as with dropout 0 (the default zeroes it
    during training); --base-dropout keeps it, and then the adapter differs."""
    from safetensors.torch import load_file

    plain = encoder_dir(tmp_path, "bert")
    noisy = tmp_path / "model-noisy"
    body = encoder_body("bert")
    body.config.update(dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3))
    body.save_pretrained(noisy)
    encoder_tokenizer("bert").save_pretrained(noisy)
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows(32))

    def adapter(mdir, name, *extra):
        code, _, err = run_cli(["train", "--model", mdir, "--train", data, "--eval", data, "--task", "classify",
                                "--output", tmp_path / name, "--num-virtual-tokens", 4, "--batch-size", 8,
                                "--max-steps", 4, "--no-progress", *extra], capsys)
        assert code == 0, err
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    want = adapter(plain, "plain")
    got = adapter(noisy, "noisy")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    kept = adapter(noisy, "kept", "--base-dropout")
    assert not torch.allclose(kept["prompt_embeddings"], want["prompt_embeddings"])
    assert json.loads((tmp_path / "noisy" / "run.json").read_text())["config"]["base_dropout"] is False


# ---- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["instruct", "chat", "lm"])
def test_encoder_with_a_generation_task_is_refused(task, tmp_path, capsys):
    mdir = encoder_dir(tmp_path, "bert")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the movie", "instruction": "x", "output": "y"}] * 4)
    code, _, err = run_cli(["train", "--model", mdir, "--train", data, "--task", task, "--output", tmp_path / "o",
                            "--max-steps", 1, "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"task {task!r} does not apply to bert (encoder model)" in err and "encoder models: classify" in err
    assert not (tmp_path / "o" / "adapter").exists()


def test_encoder_without_a_cache_is_refused(tmp_path, capsys):
    from transformers import DistilBertConfig, DistilBertModel

    d = tmp_path / "distil"
    DistilBertModel(DistilBertConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(d)
    encoder_tokenizer("bert").save_pretrained(d)
    code, _, err = _train(tmp_path, capsys, d, write_jsonl(tmp_path / "c.jsonl", classify_rows(16)), "--max-steps", 1)
    assert code == 2 and "'distilbert' is not supported" in err and "takes no key/value cache" in err and "roberta" in err


def test_causal_lm_head_over_an_encoder_is_refused():
    from transformers import BertConfig

    from prefixtune.inject import kind_of_config

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    assert kind_of_config(cfg, "classify") == "encoder"
    with pytest.raises(pt.ConfigError, match="supported model/task pairs: causal models: classify, instruct, chat, lm"):
        kind_of_config(cfg, "lm")
    cfg.is_decoder = True  # BertLMHeadModel as a causal decoder: not something the engine trains
    with pytest.raises(pt.ConfigError, match="is_decoder=True"):
        kind_of_config(cfg)


def test_train_refuses_an_encoder_without_a_head(tmp_path):
    from transformers import BertConfig, BertModel

    from prefixtune.training.config import TrainConfig
    from prefixtune.training.loop import train

    data = write_jsonl(tmp_path / "c.jsonl", classify_rows(16))
    body = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(pt.ConfigError, match="num_labels=2.*no classification head"):
        train(TrainConfig(model="x", train=str(data), task="classify", output=str(tmp_path / "o"), max_steps=1,
                          progress=False), model=body, tokenizer=encoder_tokenizer("bert"))


def test_generate_and_label_less_eval_are_refused(tmp_path, capsys):
    mdir = encoder_dir(tmp_path, "bert")
    code, _, err = run_cli(["generate", "--model", mdir, "--prompt", "the movie"], capsys)
    assert code == 2 and "generate does not apply" in err and len(err.strip().splitlines()) == 1
    data = write_jsonl(tmp_path / "c.jsonl", classify_rows(8))
    code, _, err = run_cli(["eval", "--model", mdir, "--data", data, "--task", "classify"], capsys)
    assert code == 2 and "--label-words" in err
    code, _, err = run_cli(["eval", "--model", mdir, "--data", data, "--task", "classify", "--label-words",
                            "negative,positive", "--method", "generate", "--output", tmp_path / "e"], capsys)
    assert code == 2 and "--method generate does not apply" in err


# ---- the label-leak guard --------------------------------------------------------------------------------------
def _report(pred_counts, gold=(50, 30, 20)):
    from prefixtune.training.evaluate import classification_report

    labels = ["negative", "neutral", "positive"]
    g = [l for l, n in zip(labels, gold) for _ in range(n)]
    p = [l for l, n in zip(labels, pred_counts) for _ in range(n)]
    return classification_report(g, p, labels)


def test_single_class_guard():
    from prefixtune.training.evaluate import single_class_warning

    one = _report((100, 0, 0))  # everything "negative": accuracy 0.5, the majority share
    msg = single_class_warning(one, 0.02)
    assert msg and "'negative'" in msg and "accuracy 0.5000" in msg
    assert single_class_warning(one, 1.0) is None  # loss at the label entropy (1.03): an honest majority guess
    assert single_class_warning(_report((40, 40, 20)), 0.02) is None  # several classes predicted
    assert single_class_warning(_report((100, 0, 0), gold=(100, 0, 0)), 0.0) is None  # one gold class: nothing to say


def test_guard_is_recorded_in_eval_json(tmp_path, capsys, monkeypatch):
    """A run whose predictions are one class while its loss is near zero says so in the log and eval.json."""
    from prefixtune.training import evaluate as E

    mdir = encoder_dir(tmp_path, "bert")
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows(32))
    real = E.evaluate_classify

    def one_class(*a, **k):  # what the label leak produced: every prediction the same class
        result, preds = real(*a, **k)
        gold = [p["label"] for p in preds]
        return {**result, **E.classification_report(gold, ["negative"] * len(gold), ["negative", "positive"])}, preds

    monkeypatch.setattr(E, "evaluate_classify", one_class)
    monkeypatch.setattr(E, "evaluate_loss", lambda *a, **k: {"loss": 0.01, "perplexity": 1.01, "n_tokens": 4, "n": 4})
    code, _, err = _train(tmp_path, capsys, mdir, data, "--max-steps", 2)
    assert code == 0, err
    assert "every prediction is 'negative'" in json.loads((tmp_path / "o" / "eval.json").read_text())["single_class_warning"]


# ---- the real MiniLM encoder (opt-in) ----------------------------------------------------------------------------
@pytest.mark.assets
def test_minilm_tweets_beats_the_majority_class(tmp_path, capsys):
    from prefixtune.cli import assets

    csv = assets.tweets_csv()
    code, out, err = run_cli(["train", "--model", assets.minilm_dir(), "--train", csv, "--task", "classify",
                              "--text-column", "text", "--label-column", "sentiment", "--max-steps", 300,
                              "--batch-size", 32, "--max-train-examples", 2000, "--max-eval-examples", 600,
                              "--max-length", 64, "--output", tmp_path / "o", "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    support = [c["support"] for c in report["per_class"].values()]
    majority = max(support) / sum(support)
    assert report["method"] == "head" and report["accuracy"] > majority + 0.1, (report["accuracy"], majority)


def test_head_tokenization_keeps_special_tokens_and_applies_on_truncate():
    from datasets import Dataset

    from prefixtune.training import data as D

    tok = encoder_tokenizer("bert")
    ds = Dataset.from_list([{"text": "the movie was great i loved it", "label": "positive"},
                            {"text": "bad", "label": "negative"}])
    tokd, info = D.tokenize_dataset(ds, tok, "classify", is_encoder_decoder=False, head=True, max_length=5)
    first = tok.convert_ids_to_tokens(tokd[0]["input_ids"])
    assert first == ["[CLS]", "the", "movie", "was", "[SEP]"] and info["n_truncated"] == 1  # cut at the end, [SEP] kept
    assert tokd["labels"] == [1, 0] and info["prompt_template"] == "{text}"
    with pytest.raises(D.DataError, match="longer than max_length=5"):
        D.tokenize_dataset(ds, tok, "classify", is_encoder_decoder=False, head=True, max_length=5, on_truncate="error")
    dropped, info = D.tokenize_dataset(ds, tok, "classify", is_encoder_decoder=False, head=True, max_length=5, on_truncate="drop")
    assert len(dropped) == 1 and info["n_dropped"] == 1
