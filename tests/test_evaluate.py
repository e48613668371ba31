"""Scoring on label positions, rank/generate classification, reports."""

import helpers
import pytest
import torch
from datasets import Dataset
from helpers import make_tokenizer

import prefixtune as pt
from prefixtune.training import evaluate as E


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bloom", "t5", "bart"])
def test_label_position_loss_equals_full_forward(kind):
    pm = pt.attach(helpers.make(kind), pt.PrefixConfig(num_virtual_tokens=3, init="random")).eval()
    b = helpers.batch(kind)
    if kind in helpers.CAUSAL:
        b["labels"][:, :4] = -100
        b["attention_mask"][0, -2:] = 0
        b["labels"][0, -2:] = -100
    nll, n = E.token_nll(pm, b)
    torch.testing.assert_close(nll / n, pm(**b).loss, rtol=1e-5, atol=1e-5)


def test_rank_picks_the_likeliest_label_and_single_token_fast_path_agrees():
    tok = make_tokenizer()
    m = helpers.make("llama")
    prompts = ["the movie was great label : ", "the film was bad label : "]
    fast, t1 = E.rank_predict(m, tok, prompts, ["positive", "negative"])
    slow, t2 = E.rank_predict(m, tok, prompts, ["positive", "negative neutral"])  # multi-token: generic path
    assert len(t1) == 2 and len(t1[0]) == 2
    torch.testing.assert_close(torch.tensor(t1)[:, 0], torch.tensor(t2)[:, 0], rtol=1e-5, atol=1e-5)
    assert fast == [max(range(2), key=r.__getitem__) for r in t1]


def test_classification_report():
    r = E.classification_report(["a", "a", "b", "c"], ["a", "b", "b", E.OTHER], ["a", "b", "c"])
    assert r["accuracy"] == 0.5
    assert r["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert r["per_class"]["c"]["f1"] == 0.0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert r["confusion_matrix"]["labels"] == ["a", "b", "c", E.OTHER]
    assert r["confusion_matrix"]["rows_gold_cols_pred"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert "macro-F1" in E.format_report({"task": "classify", "method": "rank", **r})


def test_match_label():
    words = ["negative", "neutral", "positive"]
    assert E.match_label(" Positive\n", words) == "positive"
    assert E.match_label("neutral, I think", words) == "neutral"
    assert E.match_label("it is negative", words) == "negative"
    assert E.match_label("no idea", words) == E.OTHER


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_evaluate_classify_both_methods(kind):
    tok = make_tokenizer()
    m = helpers.make(kind)
    pm = pt.attach(m, pt.PrefixConfig(num_virtual_tokens=2))
    ds = Dataset.from_dict({"text": ["the movie was great", "the film was bad", "it was fine"],
                            "label": ["positive", "negative", "positive"]})
    info = {"label_words": ["negative", "positive"], "text_column": "text", "label_column": "label",
            "prompt_template": "{text} label : "}
    for method in ("rank", "generate"):
        res, preds = E.evaluate_classify(pm, tok, ds, info, method=method)
        assert res["n"] == 3 and len(preds) == 3 and res["method"] == method
        assert all(p["prediction"] in ("negative", "positive", E.OTHER) for p in preds)
    bad = Dataset.from_dict({"text": ["x"], "label": ["meh"]})
    with pytest.raises(E.D.DataError, match="'meh'"):
        E.evaluate_classify(pm, tok, bad, info)


def test_label_logits_of_a_soft_capping_model_come_from_its_full_forward():
    """Gemma-2 caps its logits after the LM head (inject.LOGIT_POSTPROCESSING): label-position logits must be the
    model's own, capped ones, not the head's raw output."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from prefixtune.inject import lm_head_gives_logits
    from prefixtune.training.evaluate import selected_logits

    cap = 0.05  # far below the raw logits of a random model, so an uncapped answer cannot pass
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                           final_logit_softcapping=cap)).eval()
    assert not lm_head_gives_logits(model.config) and lm_head_gives_logits(helpers.make("llama").config)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        logits, targets, _ = selected_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        full = model(input_ids=ids).logits[:, :-1][labels[:, 1:] != -100]
        raw = model.get_output_embeddings()(model.model(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(logits, full.float())
    assert logits.abs().max() <= cap and raw.abs().max() > cap
    assert torch.equal(targets, labels[:, 1:][labels[:, 1:] != -100])
