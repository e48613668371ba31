"""What a training run tells: metrics.jsonl, an experiment tracker (--report-to), loss/accuracy curves, the
progress bar and its messages. Only the main process writes; every process may call.

    metrics.jsonl       one line per logged step / eval
    loss_curve.png, accuracy_curve.png
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..adapter_io import write_text_atomic
from ..extras import require


def tracker(report_to: str) -> str | None:
    """accelerate's log_with for --report-to, after checking its package is installed (else one clear error)."""
    if report_to in (None, "none"):
        return None
    require(report_to, f"--report-to {report_to}")  # each tracker is an extra of its own name
    return report_to


def tracker_config(cfg) -> dict:
    """The run config as flat scalars (trackers such as TensorBoard's hparams take nothing else)."""
    flat = {}
    for k, v in cfg.to_dict().items():
        for k2, v2 in (v.items() if isinstance(v, dict) else [(None, v)]):
            key = k if k2 is None else f"{k}.{k2}"
            flat[key] = v2 if isinstance(v2, (int, float, str, bool)) else str(v2)
    return flat


def log_metrics(out: Path, record: dict, acc=None) -> None:
    """One line of metrics.jsonl; the same numbers go to the experiment tracker, if any (--report-to)."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if acc is not None and acc.trackers:
        acc.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=record["step"])


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def truncate_metrics(out: Path, step: int) -> None:
    """On resume, forget what the crashed run logged after the checkpoint (it will be logged again)."""
    if (out / "metrics.jsonl").exists():
        keep = [r for r in _records(out) if r["step"] <= step]
        write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in keep))


def recent_train_loss(out: Path, last: int = 10) -> float:
    """Mean training loss of the last logged steps (inf if none were logged)."""
    losses = [r["loss"] for r in _records(out) if "loss" in r][-last:]
    return sum(losses) / len(losses) if losses else math.inf


def plot_curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (out / "metrics.jsonl").exists():
        return
    recs = _records(out)
    tr = [r for r in recs if "loss" in r]
    ev = [r for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss", alpha=0.8)
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(out / "loss_curve.png", dpi=100), plt.close(fig)
    acc = [r for r in ev if r.get("eval_accuracy") is not None]
    if acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in acc], [r["eval_accuracy"] for r in acc], "o-", label="eval accuracy")
        ax.set_xlabel("step"), ax.set_ylabel("accuracy"), ax.set_ylim(0, 1), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out / "accuracy_curve.png", dpi=100), plt.close(fig)


def human_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def adapter_bytes(model) -> int:
    enc = model.prefixes[model.active_adapter]
    return enc.num_virtual_tokens * enc.out_dim * 4


class Reporter:
    """The run's voice: messages (main process), the progress bar, metrics.jsonl + tracker, curves."""

    def __init__(self, out: Path, acc, progress: bool):
        self.out, self.acc, self.progress = out, acc, progress
        self.main = acc.is_main_process
        self.say = print if self.main else (lambda *a, **k: None)
        self.bar = None

    def start_tracker(self, cfg) -> None:
        if self.acc.log_with:
            self.acc.init_trackers("prefixtune", config=tracker_config(cfg), init_kwargs={"wandb": {"name": self.out.name}})

    def open_bar(self, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not (self.main and self.progress), desc="train",
                        dynamic_ncols=True)

    def write(self, text: str) -> None:
        """A line between bar updates (tqdm.write prints even on a disabled bar: once, from the main process)."""
        if self.main:
            self.bar.write(text) if self.bar is not None else print(text)

    def step(self, step: int, epoch: float, loss: float, lr: float, tok_s: float, log: bool) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        if self.main and log:
            log_metrics(self.out, {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "tokens_per_s": round(tok_s, 1)},
                        self.acc)

    def eval(self, step: int, epoch: float, record: dict, better: bool) -> None:
        if self.main:
            log_metrics(self.out, {"step": step, "epoch": epoch, **record}, self.acc)
            plot_curves(self.out)
        took = f"  ({record['eval_seconds']:.0f}s)" if "eval_seconds" in record else ""
        self.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "eval_seconds") + took
                   + ("  (best)" if better else ""))

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def end(self) -> None:
        for t in self.acc.trackers:  # not acc.end_training(): it also tears down the process group a caller may still use
            t.finish()
