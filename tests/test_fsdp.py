"""`train --fsdp` on two CPU processes (torchrun, gloo): the frozen model sharded (FSDP2), the prefix whole. It must
train the same adapter as one process with twice the gradient accumulation, hold about half the frozen weights per
process, and resume exactly from a checkpoint."""

import re
import shutil
import sys

import pytest
import torch
from helpers import classify_rows, model_dir, run_cli, run_ok, torchrun, write_jsonl
from safetensors.torch import load_file
from test_distributed import _table

from prefixtune.training.config import RecipeError, TrainConfig

STEPS = 6


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over the loopback interface 'lo'")
def test_fsdp_two_processes_match_one_process_and_resume(tmp_path):
    mdir = model_dir(tmp_path)
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    # projection on: several trainable tensors go through the gradient-averaging hook
    args = ["-m", "prefixtune", "train", "--model", str(mdir), "--train", str(data), "--task", "classify",
            "--max-steps", str(STEPS), "--batch-size", "4", "--num-virtual-tokens", "4", "--projection",
            "--projection-dim", "16", "--lr", "3e-2", "--seed", "3", "--save-every", "3", "--no-progress"]

    def sharded(*extra):
        return run_ok(torchrun(2) + [*args, "--fsdp", "--grad-accum", "1", *extra])

    two = sharded("--output", str(tmp_path / "two"))
    run_ok([sys.executable, *args, "--grad-accum", "2", "--output", str(tmp_path / "one")], 120)
    assert "| 2 process(es) on cpu" in two.stdout, two.stdout[-2000:]

    # each process holds about half the frozen weights: the bytes of its local shards, measured by each process
    held = {int(r): (int(h), int(f)) for r, h, f in
            re.findall(r"process (\d) holds (\d+) of its (\d+) weight bytes", two.stdout)}
    assert sorted(held) == [0, 1], two.stdout[-2000:]
    full = held[0][1]
    for rank, (h, f) in held.items():
        assert f == full and 0.45 * full <= h <= 0.55 * full, (rank, h, f)
    assert 0.99 * full <= held[0][0] + held[1][0] <= 1.01 * full  # uneven rows round up on one rank

    # same adapter as one process with the same global batch. Tolerance: only the reduction order differs (the
    # hook averages per micro-batch, one process sums two halves); on CPU the two agree to ~1e-7.
    a, b = _table(tmp_path / "one"), _table(tmp_path / "two")
    assert not torch.equal(a, load_file(tmp_path / "one" / "checkpoint-000003" / "adapter" / "adapter_model.safetensors")
                           ["prompt_embeddings"])  # it moved after the checkpoint: the comparison is not vacuous
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)

    # --resume under --fsdp: from the step-3 checkpoint, the last 3 steps give the same adapter again
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "adapter")
    res = sharded("--output", str(resumed), "--resume")
    assert "resuming from checkpoint-000003" in res.stdout, res.stdout[-2000:]
    torch.testing.assert_close(_table(resumed), b, rtol=0, atol=1e-6)



@pytest.mark.skipif(sys.platform != "linux", reason="gloo over the loopback interface 'lo'")
@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_fsdp_tied_embeddings_and_seq2seq(tmp_path, kind):
    """GPT-2 (the head tied to the token embedding: both stay whole; position embeddings sharded) and T5 (two stacks
    of blocks, the whole model's forward): the same adapter as one process, about half the weights each."""
    mdir = model_dir(tmp_path, kind)
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    args = ["-m", "prefixtune", "train", "--model", str(mdir), "--train", str(data), "--task", "classify", "--max-steps",
            "3", "--batch-size", "4", "--num-virtual-tokens", "4", "--lr", "3e-2", "--save-every", "10", "--no-progress",
            "--no-base-dropout"]  # GPT-2 and T5 have dropout: random draws differ between 1 and 2 processes
    two = run_ok(torchrun(2) + [*args, "--fsdp", "--output", str(tmp_path / "two")])
    run_ok([sys.executable, *args, "--grad-accum", "2", "--output", str(tmp_path / "one")])
    shares = [int(h) / int(f) for h, f in re.findall(r"holds (\d+) of its (\d+) weight bytes", two.stdout)]
    assert len(shares) == 2 and all(0.45 <= x <= 0.56 for x in shares), shares
    torch.testing.assert_close(_table(tmp_path / "two"), _table(tmp_path / "one"), rtol=0, atol=1e-5)

def test_fsdp_alone_is_refused_with_the_launch_command(tmp_path):
    from prefixtune.training.loop import train

    mdir = model_dir(tmp_path)
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    cfg = TrainConfig(model=str(mdir), train=str(data), task="classify", output=str(tmp_path / "run"), max_steps=1,
                      batch_size=4, fsdp=True, progress=False)
    with pytest.raises(Exception, match="torchrun --nproc-per-node N"):
        train(cfg)


def test_deepspeed_launch_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """`accelerate launch --use_deepspeed` sets ACCELERATE_USE_DEEPSPEED; accelerate ignores it on CPUs (cpu=True), so
    the run would silently be plain data parallel: refused, naming --fsdp (docs/multi-device.md says why)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    code, _, err = run_cli(["train", "--model", model_dir(tmp_path), "--train", data, "--task", "classify",
                            "--output", tmp_path / "run", "--max-steps", "1", "--no-progress"], capsys)
    assert code == 2 and "--use_deepspeed) is not supported" in err and "--fsdp" in err, err
    assert "Traceback" not in err


def test_fsdp_is_a_flag():
    from prefixtune.cli.main import build_parser

    assert build_parser().parse_args(["train", "--fsdp"]).fsdp is True
    with pytest.raises(RecipeError):
        TrainConfig.from_sources(None, {"fsdb": True})



@pytest.mark.skipif(sys.platform != "linux", reason="gloo over the loopback interface 'lo'")
def test_distill_fsdp_two_processes_match_one_process(tmp_path):
    """`prefixtune distill --fsdp`: the main process makes the examples on the whole model, then the base is sharded."""
    mdir = model_dir(tmp_path)
    (tmp_path / "doc.txt").write_text(" ".join(["the movie was great and the plot was good"] * 20))
    args = ["-m", "prefixtune", "distill", "--model", str(mdir), "--context", str(tmp_path / "doc.txt"),
            "--self-study", "16", "--max-steps", "4", "--batch-size", "2", "--num-virtual-tokens", "4",
            "--answer-tokens", "4", "--question-tokens", "4", "--save-every", "2", "--no-progress"]
    two = run_ok(torchrun(2) + [*args, "--fsdp", "--grad-accum", "1", "--output", str(tmp_path / "two")])
    run_ok([sys.executable, *args, "--grad-accum", "2", "--output", str(tmp_path / "one")])
    assert len(re.findall(r"process \d holds \d+ of its \d+ weight bytes \((4[5-9]|5[0-5])%\)", two.stdout)) == 2, two.stdout
    torch.testing.assert_close(_table(tmp_path / "two"), _table(tmp_path / "one"), rtol=0, atol=1e-5)
