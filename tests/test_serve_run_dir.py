"""`prefixtune serve --adapters RUN_DIR`: a training run is served as one adapter named after the run (its final
adapter/, or best/ with --best), never its checkpoints; a directory of runs serves one adapter per run; the
names are said at start-up."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from helpers import classify_rows, model_dir, run_cli, write_jsonl
from safetensors.torch import load_file

from prefixtune.serving.backends import build_backend
from prefixtune.serving.registry import AdapterRegistry


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/demo: a real `prefixtune train` run with adapter/, best/ (at step 2, not the last) and a checkpoint;
    runs/other: a second run; runs/plain: a bare adapter directory."""
    tmp = tmp_path_factory.mktemp("runs")
    mdir, data = model_dir(tmp), write_jsonl(tmp / "train.jsonl", classify_rows(24))
    for name, steps in (("demo", 4), ("other", 2)):
        code = _train(mdir, data, tmp / "runs" / name, steps)
        assert code == 0
    shutil.copytree(tmp / "runs" / "other" / "adapter", tmp / "runs" / "plain")
    return tmp / "runs"


def _train(mdir, data, out, steps) -> int:
    from prefixtune.cli.main import main

    return main(["train", "--model", str(mdir), "--train", str(data), "--task", "classify", "--output", str(out),
                 "--max-steps", str(steps), "--eval-every", "2", "--save-every", "2", "--num-virtual-tokens", "2",
                 "--no-progress"])


def indexed(root: Path, best: bool = False) -> dict[str, Path]:
    reg = AdapterRegistry(lambda name, d: 1, lambda name: None, root=root, best=best)
    reg.scan()
    return {e.name: e.directory for e in reg.entries()}


def test_a_run_directory_is_one_adapter_named_after_the_run(runs):
    demo = runs / "demo"
    assert (demo / "checkpoint-000002" / "adapter" / "adapter_config.json").is_file()  # the trap: a checkpoint is there
    # final and best differ (best is step 2's), so serving the wrong one would be visible in the weights
    final, best = (load_file(demo / d / "adapter_model.safetensors") for d in ("adapter", "best"))
    assert any((final[k] != best[k]).any() for k in final)
    assert indexed(demo) == {"demo": demo / "adapter"}
    assert indexed(demo, best=True) == {"demo": demo / "best"}
    assert indexed(demo / "adapter") == {"demo": demo / "adapter"}  # the run's adapter/ itself: still the run's name
    assert indexed(runs / "plain") == {"plain": runs / "plain"}  # one bare adapter directory


def test_a_directory_of_runs_serves_one_adapter_per_run(runs):
    assert indexed(runs) == {"demo": runs / "demo" / "adapter", "other": runs / "other" / "adapter",
                             "plain": runs / "plain"}
    assert indexed(runs, best=True)["demo"] == runs / "demo" / "best"


def test_serve_says_the_names_and_serves_the_final_adapter(runs, caplog, tmp_path):
    """The engine the server runs, on a run directory: one adapter named after the run, whose output is the final
    adapter's (not best/'s, not a checkpoint's); the start-up log names it."""
    import prefixtune as pt
    from prefixtune.cli.serve import say_adapters
    from prefixtune.loading import load_model
    from prefixtune.serving.offline import Generator

    mdir = model_dir(tmp_path)
    engine = build_backend("torch", str(mdir), str(runs / "demo"), max_batch_size=4)
    gen = Generator(engine)
    try:
        with caplog.at_level(logging.INFO, logger="prefixtune.serve"):
            say_adapters(engine, str(runs / "demo"))
        assert f"adapter 'demo' <- {runs / 'demo' / 'adapter'}" in caplog.text
        assert engine.adapter_names() == ["demo"]
        served = gen.generate(["w9 w10 w11"], "demo", max_tokens=6, temperature=0)
    finally:
        gen.close()
    tok = load_model(str(mdir), dtype="fp32")[1]
    ids = tok(["w9 w10 w11"], return_tensors="pt")
    model = pt.load_adapter(load_model(str(mdir), dtype="fp32")[0], runs / "demo" / "adapter").eval()
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == served[0].strip()


def test_the_python_entries_take_runs_the_same_way(runs):
    """prefixtune.llamacpp.load / prefixtune.vllm.load(..., adapters=DIR) go through offline.adapter_dirs."""
    from prefixtune.serving.offline import adapter_dirs

    assert adapter_dirs(runs / "demo") == {"default": runs / "demo" / "adapter"}
    assert adapter_dirs(runs / "plain") == {"default": runs / "plain"}
    assert adapter_dirs(runs) == {"demo": runs / "demo" / "adapter", "other": runs / "other" / "adapter",
                                  "plain": runs / "plain"}


def test_serve_flags_are_checked_by_the_cli(runs, capsys):
    code, _, err = run_cli(["serve", "--model", "m", "--adapters", runs / "nope"], capsys)
    assert code == 2 and "--adapters" in err and "Traceback" not in err
