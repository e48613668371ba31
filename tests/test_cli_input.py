"""Bad input through the command line (issue 23): incomplete rows, --resume with nothing to resume, a classifier
head of another size, paths that are files, missing, empty or under a file. Each ends with exit code 2 and one
line naming the file or flag and the fix, never a traceback."""

import json

import pytest
from helpers import classify_rows, instruct_rows, make, make_tokenizer, model_dir, run_cli, write_jsonl


def error_line(code, err, command="train") -> str:
    """The one error line; fails on another exit code or a traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"prefixtune {command}: error:"), err
    return last


@pytest.fixture
def mdir(tmp_path):
    return model_dir(tmp_path, "llama")


def train_args(mdir, data, out, *extra):
    return ["train", "--model", mdir, "--train", data, "--task", "classify", "--output", out, "--max-steps", 2,
            "--batch-size", 4, "--num-virtual-tokens", 2, "--no-progress", *extra]


# ---- 1. incomplete rows ---------------------------------------------------------------------------------------

def _csv_with_gaps(path):
    rows = classify_rows(40)
    rows[2]["label"] = ""  # data rows 3, 8 and 21 (1 = the first row after the header)
    rows[7]["text"] = "   "
    rows[20]["label"] = ""
    lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_empty_label_or_text_is_an_error_naming_rows(tmp_path, mdir, capsys):
    data = _csv_with_gaps(tmp_path / "gaps.csv")
    before = data.read_bytes()
    line = error_line(*run_cli(train_args(mdir, data, tmp_path / "o"), capsys)[::2])
    assert "3 of 40 rows" in line and str(data) in line and "rows 3, 8, 21" in line, line
    assert "2 with an empty 'label'" in line and "1 with an empty 'text'" in line and "--drop-incomplete" in line
    assert data.read_bytes() == before  # the user's file is read, never rewritten
    assert not (tmp_path / "o" / "adapter").exists()


def test_drop_incomplete_skips_and_counts(tmp_path, mdir, capsys):
    data = _csv_with_gaps(tmp_path / "gaps.csv")
    before = data.read_bytes()
    code, out, err = run_cli(train_args(mdir, data, tmp_path / "o", "--drop-incomplete", "--eval-fraction", 0.25), capsys)
    assert code == 0, err
    assert "3 of 40 rows" in out and "dropped them (--drop-incomplete); 37 rows remain" in out
    task = json.loads((tmp_path / "o" / "task.json").read_text())
    assert task["label_words"] == ["negative", "positive"]  # no '' class
    assert "37 train" not in out and "28 train / 9 eval" in out  # 37 rows split 28/9: the dropped ones are gone
    assert data.read_bytes() == before


def test_empty_instruct_output_is_an_error(tmp_path, mdir, capsys):
    rows = instruct_rows(12)
    rows[4]["output"] = ""
    data = write_jsonl(tmp_path / "inst.jsonl", rows)
    args = ["train", "--model", mdir, "--train", data, "--task", "instruct", "--output", tmp_path / "o", "--max-steps",
            1, "--no-progress"]
    line = error_line(*run_cli(args, capsys)[::2])
    assert "1 of 12 rows" in line and "empty 'output'" in line and "rows 5," in line and "--drop-incomplete" in line


def test_eval_command_checks_rows_too(tmp_path, mdir, capsys):
    data = _csv_with_gaps(tmp_path / "gaps.csv")
    args = ["eval", "--model", mdir, "--data", data, "--task", "classify", "--label-words", "negative,positive",
            "--output", tmp_path / "ev"]
    line = error_line(*run_cli(args, capsys)[::2], command="eval")
    assert "--data" in line and "rows 3, 8, 21" in line and "--drop-incomplete" in line
    code, out, err = run_cli(args + ["--drop-incomplete"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["n"] == 37


# ---- 2. --resume with nothing to resume -------------------------------------------------------------------------

def test_resume_without_checkpoint(tmp_path, mdir, capsys):
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    for out in (tmp_path / "new", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        line = error_line(*run_cli(train_args(mdir, data, out, "--resume"), capsys)[::2])
        assert f"no checkpoint found in --output {out}" in line and "drop --resume" in line, line
    assert not (tmp_path / "new").exists()
    # a run that stopped before its first checkpoint: --overwrite is the way to start it again
    assert run_cli(train_args(mdir, data, tmp_path / "r", "--save-every", 100), capsys)[0] == 0
    line = error_line(*run_cli(train_args(mdir, data, tmp_path / "r", "--save-every", 100, "--resume"), capsys)[::2])
    assert "no checkpoint found" in line and "--overwrite" in line


# ---- 3. a classifier head of another size -----------------------------------------------------------------------

def _bert_three_labels(tmp_path):
    d = tmp_path / "bert3"
    m = make("bert")  # a 3-output head
    m.config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
    m.config.label2id = {v: k for k, v in m.config.id2label.items()}
    m.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d, m


def test_head_of_another_size(tmp_path, capsys, caplog):
    d, _ = _bert_three_labels(tmp_path)
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())  # 2 labels
    line = error_line(*run_cli(train_args(d, data, tmp_path / "o"), capsys)[::2])
    assert "head has 3 outputs (negative, neutral, positive)" in line and "the data has 2 labels" in line, line
    assert "--new-head" in line
    code, _, err = run_cli(train_args(d, data, tmp_path / "o", "--new-head"), capsys)
    assert code == 0, err
    assert "3-way classification head" in caplog.text and "new 2-way head" in caplog.text
    assert json.loads((tmp_path / "o" / "task.json").read_text())["label_words"] == ["negative", "positive"]
    # eval: the adapter brings its own 2-way head, so the base's 3-way one needs no flag
    code, out, err = run_cli(["eval", "--model", d, "--adapter", tmp_path / "o", "--data", data, "--task", "classify",
                              "--output", tmp_path / "ev"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["n"] == 48


def test_head_reused_in_the_data_order(tmp_path):
    """Labels equal as sets: the checkpoint's head is kept, its outputs permuted to the data's label order."""
    import torch

    from prefixtune.loading import load_model

    d, ref = _bert_three_labels(tmp_path)
    model, _ = load_model(str(d), task="classify", label_names=["positive", "negative", "neutral"])
    torch.testing.assert_close(model.classifier.weight, ref.classifier.weight[[2, 0, 1]])
    torch.testing.assert_close(model.classifier.bias, ref.classifier.bias[[2, 0, 1]])
    assert model.config.id2label == {0: "positive", 1: "negative", 2: "neutral"}


# ---- 4 and 5. paths --------------------------------------------------------------------------------------------

def test_output_under_a_file_or_a_file(tmp_path, mdir, capsys):
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    (tmp_path / "f.txt").write_text("x")
    line = error_line(*run_cli(train_args(mdir, data, tmp_path / "f.txt" / "run"), capsys)[::2])
    assert "--output" in line and "f.txt is a file" in line and "under a directory" in line
    line = error_line(*run_cli(train_args(mdir, data, tmp_path / "f.txt"), capsys)[::2])
    assert f"--output {tmp_path / 'f.txt'} is a file; pass a directory" in line


def test_unwritable_output(tmp_path, mdir, capsys, monkeypatch):
    import os

    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    line = error_line(*run_cli(train_args(mdir, data, locked / "run"), capsys)[::2])
    assert f"cannot write in {locked}" in line and "a directory you can write to" in line


def test_serve_adapters_missing_or_a_file(tmp_path, mdir, capsys):
    (tmp_path / "f").write_text("x")
    for path, says in ((tmp_path / "nope", "does not exist"), (tmp_path / "f", "is a file")):
        line = error_line(*run_cli(["serve", "--model", mdir, "--adapters", path], capsys)[::2], command="serve")
        assert f"--adapters {path} {says}; pass a directory of adapters" in line, line


@pytest.mark.parametrize("case", ["eval output under a file", "eval data is a directory", "prompts is a directory",
                                  "train data is an unknown file", "recipe is a directory", "demo output under a file",
                                  "demo data missing", "eval adapter missing", "train data empty directory"])
def test_path_mistakes_in_every_command(tmp_path, mdir, capsys, case):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "d").mkdir()
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    ev = ["eval", "--model", mdir, "--data", data, "--task", "classify", "--label-words", "negative,positive"]
    argv, command, says = {
        "eval output under a file": (ev + ["--output", tmp_path / "f.txt" / "e"], "eval", "f.txt is a file"),
        "eval data is a directory": (ev[:3] + ["--data", tmp_path] + ev[5:], "eval",
                                     "is a directory but not a dataset saved with save_to_disk"),
        "prompts is a directory": (["generate", "--model", mdir, "--prompts", tmp_path / "d"], "generate",
                                   "--prompts .* is a directory; pass a text file"),
        "train data is an unknown file": (train_args(mdir, tmp_path / "f.txt", tmp_path / "o"), "train",
                                          r"f.txt is a \.txt file; pass a \.csv, \.jsonl, \.json or \.parquet"),
        "recipe is a directory": (train_args(mdir, data, tmp_path / "o", "--config", tmp_path / "d"), "train",
                                  "--config .* is a directory; pass a YAML recipe file"),
        "demo output under a file": (["demo", "--output", tmp_path / "f.txt" / "x", "--data", data], "demo",
                                     "f.txt is a file"),
        "demo data missing": (["demo", "--data", tmp_path / "nope.csv", "--output", tmp_path / "o"], "demo",
                              "--data .*nope.csv does not exist; check the path"),
        "eval adapter missing": (ev + ["--adapter", tmp_path / "nope"], "eval", "adapter directory .*nope does not exist"),
        "train data empty directory": (train_args(mdir, tmp_path / "d", tmp_path / "o"), "train", "d is an empty directory"),
    }[case]
    import re

    line = error_line(*run_cli(argv, capsys)[::2], command=command)
    assert re.search(says, line), line


# ---- 7. --fix-text ---------------------------------------------------------------------------------------------

def test_fix_text_repairs_mojibake_and_counts(tmp_path, mdir, capsys):
    from prefixtune.training.clean import fix_text

    rows = classify_rows(24)
    good = "the movie was great \u2014 caf\u00e9 i think"  # em dash, e acute
    for i in (0, 5):
        rows[i]["text"] = good.encode("utf-8").decode("cp1252")  # UTF-8 read as Windows-1252: "â€”", "Ã©"
    data = write_jsonl(tmp_path / "moji.jsonl", rows)
    from datasets import Dataset

    fixed, changed = fix_text(Dataset.from_list(rows))
    assert changed == 2 and fixed[0]["text"] == good and fixed[5]["text"] == good
    assert fixed[1]["text"] == rows[1]["text"]  # clean rows stay as written
    code, out, err = run_cli(train_args(mdir, data, tmp_path / "o", "--fix-text"), capsys)
    assert code == 0, err
    assert f"--fix-text: ftfy changed the text of 2 of 24 rows in --train {data}" in out


# ---- 6. the demo's curves: step 0 (zero-shot) and evaluations along the way ---------------------------------------

def test_demo_curve_has_step_zero_and_evaluations(tmp_path, mdir, capsys):
    import csv

    rows = classify_rows(60)
    with open(tmp_path / "tweets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "sentiment"])
        w.writerows([[r["text"], r["label"]] for r in rows])
    code, out, err = run_cli(["demo", "--model", mdir, "--data", tmp_path / "tweets.csv", "--output", tmp_path / "d",
                              "--max-steps", 8, "--train-examples", 40, "--eval-examples", 10], capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in (tmp_path / "d" / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval_accuracy" in r]
    steps = [r["step"] for r in evals]  # every 8 // 4 = 2 steps, and at the end of each 5-step epoch
    assert steps == [0, 2, 4, 5, 6, 8] and evals[0]["zero_shot"] and "eval_seconds" not in evals[0]
    assert all(r["eval_seconds"] >= 0 for r in evals[1:])
    assert "accuracy curve: 6 points, step 0 = zero-shot; the 4 evaluations between" in out
    assert (tmp_path / "d" / "run" / "accuracy_curve.png").stat().st_size > 0


# ---- 9. the best evaluation, as the user knows the metric --------------------------------------------------------

def test_best_eval_message_says_loss_and_step(tmp_path, mdir, capsys):
    data = write_jsonl(tmp_path / "inst.jsonl", instruct_rows(24))
    code, out, err = run_cli(["train", "--model", mdir, "--train", data, "--task", "instruct", "--output",
                              tmp_path / "o", "--max-steps", 4, "--eval-every", 2, "--num-virtual-tokens", 2,
                              "--no-progress"], capsys)
    assert code == 0, err
    import re

    m = re.search(r"best eval loss (\d+\.\d{4}) at step (\d+)", out)
    assert m and "-loss" not in out, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert float(m.group(1)) == pytest.approx(-summary["best"], abs=1e-4) and int(m.group(2)) == summary["best_step"]


def test_demo_leaves_out_what_ftfy_cannot_repair():
    """The built-in corpus: ftfy first; rows still not plain text (its lossy "äóì") are left out of the sample;
    user data (builtin=False) is repaired, never filtered."""
    from prefixtune.cli.demo import repaired

    moji = "caf\u00e9 \u2014 ok".encode("utf-8").decode("cp1252")
    texts = ["a plain tweet", "RT \u00e4\u00f3\u00ec@user: lineup \u00e4\u00f3_", moji, None]
    said = []
    fixed, usable = repaired(texts, builtin=True, say=said.append)
    assert usable == {0} and fixed[2] == "caf\u00e9 \u2014 ok" and fixed[0] == texts[0]
    assert "changed 1 of 4 rows, 0 of them to plain text; 3 are not plain text even so" in said[0], said
    fixed, usable = repaired(texts, builtin=False, say=said.append)
    assert usable == {0, 1, 2, 3} and fixed[2] == "caf\u00e9 \u2014 ok"
