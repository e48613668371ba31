"""Multi-process training on CPU: `accelerate launch` with 2 processes (gloo, 127.0.0.1) must train the same adapter
as 1 process with twice the gradient accumulation, with only the main process writing the output directory."""

import json
import sys

import pytest
import torch
from helpers import accelerate_launch, classify_rows, model_dir, run_ok, untimed, write_jsonl
from safetensors.torch import load_file

from prefixtune.training import loop as T

STEPS = 6


def _table(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]


def test_two_processes_match_one_process_with_doubled_accumulation(tmp_path):
    mdir = model_dir(tmp_path)
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    # projection on: several trainable tensors go through DDP's bucketed all-reduce, not just one
    args = ["-m", "prefixtune", "train", "--model", str(mdir), "--train", str(data), "--task", "classify",
            "--max-steps", str(STEPS), "--batch-size", "4", "--num-virtual-tokens", "4", "--projection",
            "--projection-dim", "16", "--lr", "3e-2", "--seed", "3", "--save-every", "3", "--no-progress"]
    two = run_ok(accelerate_launch(2) + args + ["--grad-accum", "1", "--output", str(tmp_path / "two")], 120)
    one = run_ok([sys.executable, *args, "--grad-accum", "2", "--output", str(tmp_path / "one")], 120)

    assert "| 2 process(es) on cpu" in two.stdout and two.stdout.count("process(es)") == 1, two.stdout[-2000:]
    assert "| 1 process(es) on cpu" in one.stdout
    # same examples per step (batch 4 x accum 1 x 2 processes = 4 x 2 x 1), gradients averaged over processes
    a, b = _table(tmp_path / "one"), _table(tmp_path / "two")
    # Tolerance only for reduction order (DDP sums two grads then halves; accumulation adds two halves):
    # on CPU they come out bit-identical in practice.
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # only the main process wrote: one line per step plus the evals, no duplicates
    recs = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, STEPS + 1))
    ones = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(untimed(recs), untimed(ones), strict=True):  # every number but the wall-clock ones
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6) for k in x)
    assert (tmp_path / "two" / "best" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "two" / "checkpoint-000003" / "state.pt").is_file()


def test_cpu_multiprocess_detection(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not T._cpu_multiprocess()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not T._cpu_multiprocess()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: None)
    assert T._cpu_multiprocess()
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    assert not T._cpu_multiprocess()  # GPUs: accelerate picks nccl by itself


def test_distill_on_two_processes_matches_one_process_with_doubled_accumulation(tmp_path):
    """`prefixtune distill` on the same steps: the main process makes the examples once, both train on them."""
    mdir = model_dir(tmp_path)
    (tmp_path / "doc.txt").write_text(" ".join(["the movie was great and the plot was good"] * 20))
    args = ["-m", "prefixtune", "distill", "--model", str(mdir), "--context", str(tmp_path / "doc.txt"),
            "--self-study", "16", "--max-steps", "4", "--batch-size", "2", "--num-virtual-tokens", "4",
            "--answer-tokens", "4", "--question-tokens", "4", "--save-every", "2", "--no-progress"]
    two = run_ok(accelerate_launch(2) + args + ["--grad-accum", "1", "--output", str(tmp_path / "two")], 180)
    one = run_ok([sys.executable, *args, "--grad-accum", "2", "--output", str(tmp_path / "one")], 180)
    assert "| 2 process(es) on cpu" in two.stdout and "| 1 process(es) on cpu" in one.stdout
    torch.testing.assert_close(_table(tmp_path / "two"), _table(tmp_path / "one"), rtol=0, atol=1e-5)
    recs = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 5))
