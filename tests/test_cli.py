"""The command line: recipes end to end on tiny models, eval/generate, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from trainkit import classify_rows, instruct_rows, model_dir, write_jsonl

from prefixtune.cli.main import main
from prefixtune.training.config import RecipeError, TrainConfig

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    """-> (exit code, stdout, stderr) of prefixtune.cli.main.main."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def setup(tmp_path):
    return model_dir(tmp_path, "llama"), write_jsonl(tmp_path / "cls.jsonl", classify_rows())


def test_recipe_t5_financial_phrasebank_end_to_end(tmp_path, capsys):
    rows = [{"sentence": r["text"], "label": r["label"]} for r in classify_rows(40)]
    data = write_jsonl(tmp_path / "fpb.jsonl", rows)
    code, out, err = run_cli(["train", "--config", ROOT / "examples/financial_phrasebank_t5.yaml", "--model",
                              model_dir(tmp_path, "t5"), "--train", data, "--output", tmp_path / "o", "--max-steps", 3,
                              "--no-progress"], capsys)
    assert code == 0, err
    run = json.loads((tmp_path / "o" / "run.json").read_text())["config"]
    assert run["num_virtual_tokens"] == 20 and run["lr"] == 0.01 and run["max_steps"] == 3 and run["epochs"] is None
    assert "trainable params" in out and (tmp_path / "o" / "adapter" / "adapter_config.json").is_file()


def test_recipe_alpaca_zh_bloom_end_to_end(tmp_path, capsys):
    d = tmp_path / "alpaca_data_zh"
    from datasets import Dataset

    Dataset.from_list(instruct_rows(30)).save_to_disk(str(d))  # load_from_disk directory, as the recipe expects
    code, out, err = run_cli(["train", "--config", ROOT / "examples/alpaca_zh_bloom.yaml", "--model",
                              model_dir(tmp_path, "bloom"), "--train", d, "--output", tmp_path / "o", "--max-steps", 2,
                              "--no-progress"], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "o" / "adapter" / "prefixtune.json").read_text())["config"]
    assert cfg["projection"] is True and cfg["num_virtual_tokens"] == 10
    assert json.loads((tmp_path / "o" / "run.json").read_text())["config"]["grad_accum"] == 8
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["task"] == "instruct"


def test_train_eval_generate(tmp_path, setup, capsys):
    mdir, data = setup
    code, _, err = run_cli(["train", "--model", mdir, "--train", data, "--task", "classify", "--output", tmp_path / "o",
                            "--max-steps", 4, "--batch-size", 8, "--num-virtual-tokens", 4, "--no-progress"], capsys)
    assert code == 0, err
    for method in ("rank", "generate"):
        code, out, err = run_cli(["eval", "--model", mdir, "--adapter", tmp_path / "o" / "adapter", "--data", data,
                                  "--task", "classify", "--method", method, "--output", tmp_path / method], capsys)
        assert code == 0, err
        assert "accuracy" in out and "confusion" in out
        res = json.loads((tmp_path / method / "eval.json").read_text())
        assert res["n"] == 48 and res["method"] == method
        assert len((tmp_path / method / "predictions.jsonl").read_text().splitlines()) == 48
    code, out, err = run_cli(["generate", "--model", mdir, "--adapter", tmp_path / "o" / "adapter", "--prompt",
                              "the movie was good", "--max-new-tokens", 3], capsys)
    assert code == 0, err and out.strip() != ""


BAD = {
    "missing file": (["--train", "nope.jsonl"], "nope.jsonl does not exist"),
    "missing column": (["--text-column", "body"], "column 'body' not found"),
    "unknown task": (["--task", "summarize"], "unknown task 'summarize'"),
    "not a model": (["--model", "{tmp}"], "not a transformers model|without config.json"),
    "label not in set": (["--label-words", "positive,neutral"], "not in the training label set"),
    "target too long": (["--max-length", "1"], "target longer than max_length=1|dropped by max_length=1; raise --max-length"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2(tmp_path, setup, capsys, case):
    mdir, data = setup
    flags, pattern = BAD[case]
    args = {"--model": str(mdir), "--train": str(data), "--task": "classify", "--output": str(tmp_path / "o"),
            "--max-steps": "2", "--no-progress": None}
    extra = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    argv = ["train"] + [x for k, v in args.items() for x in ([k] if v is None else [k, v])]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("prefixtune train: error:"), err
    lines = lines[-1:]
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_empty_dataset_and_bad_yaml_and_used_output(tmp_path, setup, capsys):
    mdir, data = setup
    (tmp_path / "empty.jsonl").write_text("")
    base = ["train", "--model", mdir, "--task", "classify", "--max-steps", 2, "--no-progress"]
    code, _, err = run_cli(base + ["--train", tmp_path / "empty.jsonl", "--output", tmp_path / "e"], capsys)
    assert code == 2 and "empty" in err
    (tmp_path / "r.yaml").write_text("learning_rate: 0.1\n")
    code, _, err = run_cli(base + ["--train", data, "--output", tmp_path / "y", "--config", tmp_path / "r.yaml"], capsys)
    assert code == 2 and "unknown recipe (r.yaml) key 'learning_rate'" in err and "Traceback" not in err
    assert run_cli(base + ["--train", data, "--output", tmp_path / "u"], capsys)[0] == 0
    code, _, err = run_cli(base + ["--train", data, "--output", tmp_path / "u", "--lr", 0.5], capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err


def test_nan_loss_cli_message(tmp_path, setup, capsys, monkeypatch):
    import prefixtune.training.evaluate as E

    real = E.token_nll
    monkeypatch.setattr(E, "token_nll", lambda m, b: (real(m, b)[0] * float("nan"), 1) if m.training else real(m, b))
    mdir, data = setup
    code, _, err = run_cli(["train", "--model", mdir, "--train", data, "--task", "classify", "--output", tmp_path / "o",
                            "--max-steps", 3, "--no-progress"], capsys)
    assert code == 2 and "loss became nan at step 1" in err and "--lr" in err


def test_flags_override_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("model: m\ntrain: t\ntask: lm\noutput: o\nepochs: 5\nlr: 1e-2\nbatch-size: 3\n")
    cfg = TrainConfig.from_sources(tmp_path / "r.yaml", {"max_steps": 7, "lr": None, "batch_size": 2})
    assert (cfg.max_steps, cfg.epochs, cfg.lr, cfg.batch_size) == (7, None, 0.01, 2)
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        TrainConfig.from_sources(tmp_path / "bad.yaml")


def test_module_entrypoint_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "prefixtune", "train", "--model", tmp_path, "--train", "x.csv",
                        "--task", "lm", "--output", tmp_path / "o"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "config.json" in p.stderr


@pytest.mark.parametrize("command", ["serve", "info"])
def test_hooked_subcommands_take_their_own_flags(command, capsys):
    from prefixtune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: prefixtune {command}" in capsys.readouterr().out
