"""The command line: recipes end to end on tiny models, eval/generate, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
from helpers import classify_rows, instruct_rows, model_dir, run_cli, write_jsonl

from prefixtune.cli.main import main
from prefixtune.training.config import RecipeError, TrainConfig, resolve

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]




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
    assert run["prefix"]["num_virtual_tokens"] == 20 and run["lr"] == 0.01 and run["max_steps"] == 3 and run["epochs"] is None
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


def test_run_dir_as_adapter(tmp_path, setup, capsys):
    """eval/generate/info take the directory `train --output` wrote: its final adapter/, or best/ with --best."""
    mdir, data = setup
    run = tmp_path / "o"
    code, _, err = run_cli(["train", "--model", mdir, "--train", data, "--task", "classify", "--output", run,
                            "--max-steps", 4, "--eval-every", 2, "--num-virtual-tokens", 4, "--no-progress"], capsys)
    assert code == 0, err
    by_dir = {}
    for adapter, extra in ((run / "adapter", []), (run, []), (run, ["--best"]), (run / "best", [])):
        code, out, err = run_cli(["eval", "--model", mdir, "--adapter", adapter, *extra, "--data", data, "--task",
                                  "classify", "--max-examples", 8, "--output", tmp_path / f"ev{len(by_dir)}"], capsys)
        assert code == 0, err
        by_dir[(adapter.name, tuple(extra))] = (json.loads((tmp_path / f"ev{len(by_dir)}" / "eval.json").read_text()), err)
    final, final_note = by_dir[("o", ())]
    assert "using its final adapter" in final_note and str(run / "adapter") in final_note
    assert final == by_dir[("adapter", ())][0]  # the same adapter as naming adapter/ directly
    best, best_note = by_dir[("o", ("--best",))]
    assert "best adapter" in best_note and best == by_dir[("best", ())][0]
    code, out, err = run_cli(["generate", "--model", mdir, "--adapter", run, "--prompt", "good", "--max-new-tokens", 2],
                             capsys)
    assert code == 0 and "using its final adapter" in err, err
    from prefixtune.cli import info

    assert info.main([str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["num_virtual_tokens"] == 4 and "final adapter" in err
    # an unfinished run (no adapter/ yet) and a directory that is neither: one line naming the fix
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "run.json").write_text("{}")
    code, _, err = run_cli(["eval", "--model", mdir, "--adapter", tmp_path / "u", "--data", data, "--task", "classify"],
                           capsys)
    assert code == 2 and "has not finished" in err and "--resume" in err
    code, _, err = run_cli(["generate", "--model", mdir, "--adapter", tmp_path, "--best", "--prompt", "x"], capsys)
    assert code == 2 and "--best" in err and "best/" in err


def _train_parser():
    import argparse

    from prefixtune.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_flag_has_help_and_default(capsys):
    parsers = _train_parser()
    for command in ("train", "eval", "generate"):
        for action in parsers[command]._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, (command, action.option_strings)
            assert "default" in action.help or "required" in action.help, (command, action.option_strings, action.help)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--num-virtual-tokens N prefix length", "(default: 20; per task: classify 64)", "--layer-scale, --no-layer-scale",
                     "(default: --layer-scale)", "--placement {decoder,full}", "--init-text INIT_TEXT",
                     "--init-scale X", "(default: 0.1)", "per task: TASK_DEFAULTS, classify 0.01",
                     "(default: 0.06)", "--progress, --no-progress"):
        assert expected in text, expected
    for group in ("data:", "prefix (PrefixConfig", "optimisation:", "evaluation:", "output:"):
        assert group in text, group


def test_generated_flags_cover_every_config_field():
    import dataclasses

    from prefixtune.config import PrefixConfig

    train = _train_parser()["train"]
    dests = {a.dest for a in train._actions} - {"help", "config", "fn"}
    internal = {"prefix", "extra", "base_model_name_or_path", "task_type"}
    fields = {f.name for c in (TrainConfig, PrefixConfig) for f in dataclasses.fields(c)} - internal
    assert dests == fields
    from prefixtune.cli.flags import flag_fields

    no_help = [f.name for f, _, _ in flag_fields() if not f.metadata.get("help")]
    assert not no_help, f"give these fields metadata={{'help': ...}} (training/config.py `_f`): {no_help}"
    opts = set(train._option_string_actions)
    assert {"--num-virtual-tokens", "--projection", "--no-projection", "--projection-dim", "--init", "--init-text",
            "--init-scale", "--placement", "--dropout", "--layer-scale", "--no-layer-scale", "--no-progress",
            "--label-words"} <= opts
    # the argparse defaults are None, so only flags actually given override a recipe
    assert all(a.default is None for a in train._actions if a.dest in fields)


def test_prefix_flags_reach_the_model(tmp_path, capsys):
    rows = [{"sentence": r["text"], "label": r["label"]} for r in classify_rows(16)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, _, err = run_cli(["train", "--model", model_dir(tmp_path, "t5"), "--train", data, "--task", "classify",
                            "--output", tmp_path / "o", "--max-steps", 1, "--num-virtual-tokens", 3, "--placement", "full",
                            "--init", "text", "--init-text", "classify the sentiment", "--dropout", 0.25,
                            "--no-layer-scale", "--label-words", "negative, positive", "--no-progress"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "o" / "adapter" / "prefixtune.json").read_text())["config"]
    assert (saved["placement"], saved["init"], saved["init_text"], saved["dropout"], saved["layer_scale"]) == \
        ("full", "text", "classify the sentiment", 0.25, False)
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["identity"]["placement"] == "full" and run["config"]["label_words"] == ["negative", "positive"]
    # --init text without the text: one line naming the missing field
    code, _, err = run_cli(["train", "--model", "m", "--train", data, "--task", "lm", "--output", tmp_path / "x",
                            "--init", "text"], capsys)
    assert code == 2 and "init_text" in err


def test_recipe_prefix_nested_and_flat(tmp_path):
    head = "model: m\ntrain: t\ntask: lm\noutput: o\n"
    (tmp_path / "nested.yaml").write_text(head + "prefix:\n  num_virtual_tokens: 7\n  init: text\n  init-text: hi\n"
                                          "  init_scale: 2e-1\n")
    (tmp_path / "flat.yaml").write_text(head + "num_virtual_tokens: 7\ninit: text\ninit_text: hi\ninit_scale: 2e-1\n")
    nested = resolve(TrainConfig.from_sources(tmp_path / "nested.yaml")).config
    flat = resolve(TrainConfig.from_sources(tmp_path / "flat.yaml")).config
    assert nested.prefix == flat.prefix and (nested.prefix.num_virtual_tokens, nested.prefix.init_scale) == (7, 0.2)
    assert resolve(TrainConfig.from_sources(tmp_path / "nested.yaml", {"num_virtual_tokens": 9})).config.prefix.num_virtual_tokens == 9
    assert resolve(TrainConfig.from_sources(tmp_path / "flat.yaml", {"num_virtual_tokens": 9})).config.prefix.num_virtual_tokens == 9
    bad = {"nested_typo.yaml": (head + "prefix:\n  num_virtual_token: 7\n", "did you mean 'num_virtual_tokens'"),
           "flat_typo.yaml": (head + "init_txt: hi\n", "did you mean 'init_text'"),
           "both.yaml": (head + "num_virtual_tokens: 5\nprefix:\n  num_virtual_tokens: 7\n", "both flat and under"),
           "not_map.yaml": (head + "prefix: 7\n", "'prefix' must be a mapping"),
           "internal.yaml": (head + "prefix:\n  task_type: CAUSAL_LM\n", "unknown recipe .* key 'task_type'")}
    for name, (text, pattern) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(RecipeError, match=pattern):
            TrainConfig.from_sources(tmp_path / name)


def test_run_identity_matches_a_run_json_from_before_the_nested_prefix(tmp_path):
    """run.json files written when TrainConfig had flat prefix fields still resume with the same settings."""
    from prefixtune.training.checkpoints import TrainingError, check_output_dir

    old_identity = {"model": "m", "train": "t", "eval": None, "task": "lm", "num_virtual_tokens": 20, "projection": False,
                    "projection_dim": 512, "layer_scale": True, "init": "vocab", "batch_size": 8, "grad_accum": 1,
                    "lr": 0.03, "projection_lr": None, "seed": 0, "max_steps": 3, "epochs": None, "max_length": 256,
                    "scheduler": "linear"}
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"identity": old_identity}))
    (out / "checkpoint-000002").mkdir()  # a run that got as far as a checkpoint: --resume needs one
    (out / "checkpoint-000002" / "state.pt").write_bytes(b"")
    over = {"model": "m", "train": "t", "task": "lm", "output": str(out), "max_steps": 3, "resume": True}
    assert check_output_dir(resolve(TrainConfig.from_sources(None, over)).config) is True
    for changed, words in (({"placement": "full"}, "placement"), ({"num_virtual_tokens": 10}, "num_virtual_tokens")):
        with pytest.raises(TrainingError, match=words):
            check_output_dir(resolve(TrainConfig.from_sources(None, {**over, **changed})).config)


BAD = {
    "missing file": (["--train", "nope.jsonl"], "nope.jsonl does not exist"),
    "missing column": (["--text-column", "body"], "column 'body' not found"),
    "unknown task": (["--task", "summarize"], "--task: invalid choice: 'summarize'"),  # argparse choices (TASKS)
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


def test_serve_adapters_dir_takes_a_run_dir(tmp_path):
    """`serve --adapters DIR`: an entry that is a training run serves its final adapter/ under the run's name."""
    import torch
    from helpers import make

    import prefixtune as pt
    from prefixtune.serving.torch_engine import TorchEngine as Engine

    src = pt.attach(make("llama"), pt.PrefixConfig(num_virtual_tokens=2, init="random", layer_scale=False))
    d = tmp_path / "adapters"
    src.save_adapter(d / "plain")
    src.save_adapter(d / "run" / "adapter")
    (d / "run" / "run.json").write_text("{}")
    (d / "unfinished").mkdir()
    (d / "unfinished" / "run.json").write_text("{}")  # no adapter/ yet: skipped with a warning
    eng = Engine(pt.attach(make("llama"), pt.PrefixConfig(num_virtual_tokens=2)), adapters_dir=d)
    assert eng.load_dir() == ["plain", "run"]
    for name in ("plain", "run"):
        torch.testing.assert_close(eng.model.prefixes[name].embedding.weight, src.prefixes["default"].embedding.weight)
