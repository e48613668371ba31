"""A run's output directory: whether it may be used or resumed, and the checkpoints that make resume exact.

    checkpoint-NNNNNN/  adapter (MLP kept) + optimizer/scheduler/RNG/position (+ the --ema average); `latest` names
                        the newest; only the newest is kept
    run.json            what run this is: a directory holding another run is refused

A checkpoint stores everything that changes during training besides the seeded batch order, so a resumed run ends
with the same adapter as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from ..adapter_io import atomic_dir, write_text_atomic
from ..config import ConfigError
from ..paths import writable_dir

CKPT_PREFIX = "checkpoint-"


class TrainingError(ConfigError):
    """Training cannot go on (non-finite loss, an output dir that holds another run, ...)."""


def jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def check_output_dir(cfg) -> bool:
    """Decide what to do with cfg.output (a resolved TrainConfig); -> True if there is a run here to resume. Reads only."""
    out = writable_dir(cfg.output, "--output")
    if not out.exists() or not any(out.iterdir()):
        if cfg.resume:  # asked to continue: starting afresh instead would be a silent surprise (transformers' Trainer too)
            why = "it does not exist" if not out.exists() else "it is empty"
            raise TrainingError(f"--resume: no checkpoint found in --output {out} ({why}); pass the --output of the run to "
                                "continue, or drop --resume to start a new run")
        return False
    marker = out / "run.json"
    if not marker.is_file():
        raise TrainingError(f"--output {out} is not empty and holds no prefixtune run; choose an empty or new directory")
    prev = json.loads(marker.read_text()).get("identity", {})
    if cfg.overwrite:
        return False
    if not cfg.resume:
        raise TrainingError(f"--output {out} already holds a run; pass --resume to continue it or --overwrite to start over")
    mine = jsonable(cfg.run_identity())
    diff = sorted(k for k in set(prev) | set(mine) if prev.get(k) != mine.get(k))
    if diff:
        raise TrainingError(f"--output {out} holds a different run (differs in {', '.join(diff)}), so --resume cannot "
                            "continue it; use the same settings, another --output, or --overwrite")
    if latest_checkpoint(out) is None:
        when = f"written every --save-every {cfg.save_every} steps" if cfg.save_every else "--save-every was off"
        raise TrainingError(f"--resume: no checkpoint found in --output {out}: the run stopped before its first one "
                            f"({when}); start it over with --overwrite")
    return True


def write_run_record(out: Path, cfg, defaults: dict, task_info: dict) -> None:
    """run.json (the run's identity, its resolved config and the task defaults it used) and task.json."""
    record = {"identity": jsonable(cfg.run_identity()), "config": jsonable(cfg.to_dict()), "defaults": jsonable(defaults)}
    write_text_atomic(out / "run.json", json.dumps(record, indent=2))
    write_text_atomic(out / "task.json", json.dumps(task_info, indent=2))


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    if pointer.is_file():
        p = out / pointer.read_text().strip()
        if (p / "state.pt").is_file():
            return p
    found = sorted(p for p in out.glob(f"{CKPT_PREFIX}*") if (p / "state.pt").is_file())
    return found[-1] if found else None


def save_checkpoint(out: Path, model, optimizer, scheduler, state: dict) -> Path:
    """checkpoint-NNNNNN/ built in a temp dir and renamed into place; then `latest` is repointed atomically."""

    def fill(tmp: Path) -> None:
        model.save_adapter(tmp / "adapter", keep_projection=True)
        torch.save({
            **state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }, tmp / "state.pt")

    final = atomic_dir(out / f"{CKPT_PREFIX}{state['step']:06d}", fill)
    write_text_atomic(out / "latest", final.name)
    for old in out.glob(f"{CKPT_PREFIX}*"):  # keep only the newest
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    model.load_adapter_weights(ckpt / "adapter")
    state = torch.load(ckpt / "state.pt", weights_only=False)  # our own checkpoint: optimizer state, RNG
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = state.pop("rng")
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
