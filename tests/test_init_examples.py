"""init="examples": the prefix starts as the key/values of a few whole training examples, which are never saved."""

import json

import pytest
import torch
from helpers import classify_rows, make, make_tokenizer, model_dir, run_cli, write_jsonl

import prefixtune as pt
from prefixtune.initialize import example_token_ids, real_key_values
from prefixtune.training import data as D


def _tokenized(tok, rows):
    from datasets import Dataset

    ds, _ = D.tokenize_dataset(Dataset.from_list(rows), tok, "classify", is_encoder_decoder=False, max_length=32)
    return ds


def test_example_ids_are_whole_examples_one_label_at_a_time():
    tok = make_tokenizer()
    rows = classify_rows(40)
    ids = example_token_ids(_tokenized(tok, rows), tok, n_tokens=40, seed=0)
    assert len(ids) == 40
    words = tok.decode(ids).split()
    # each example is "the movie was X i <unk> label : <answer>"; answers alternate between the two labels
    answers = [words[i + 2] for i, w in enumerate(words[:-2]) if w == "label"]
    assert len(answers) >= 3
    assert answers[0] != answers[1] and answers[0] == answers[2]
    assert tok.eos_token_id not in ids  # examples are joined, not ended
    # another seed: other examples, same shape
    assert example_token_ids(_tokenized(tok, rows), tok, n_tokens=40, seed=1) != ids


def test_examples_init_starts_at_their_key_values_and_is_not_saved(tmp_path):
    tok = make_tokenizer()
    cfg = pt.PrefixConfig(num_virtual_tokens=6, init="examples")
    with pytest.raises(pt.ConfigError, match="init_token_ids"):
        pt.attach(make("llama"), cfg)
    ids = example_token_ids(_tokenized(tok, classify_rows(12)), tok, n_tokens=6)
    model = pt.attach(make("llama"), cfg, init_token_ids=ids)
    torch.testing.assert_close(model.prefixes["default"].folded(), real_key_values(model, torch.tensor(ids)))
    model.save_adapter(tmp_path / "a")
    saved = "".join(p.read_text() for p in (tmp_path / "a").glob("*.json"))
    assert '"examples"' in saved and "init_token_ids" not in saved


def test_train_with_init_examples(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", classify_rows(16))
    code, _, err = run_cli(["train", "--model", model_dir(tmp_path), "--train", data, "--task", "classify",
                            "--output", tmp_path / "o", "--max-steps", 2, "--num-virtual-tokens", 12,
                            "--init", "examples", "--no-progress"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "o" / "adapter" / "prefixtune.json").read_text())["config"]
    assert saved["init"] == "examples" and "init_token_ids" not in saved["extra"]
    assert "movie" not in (tmp_path / "o" / "adapter" / "prefixtune.json").read_text()
