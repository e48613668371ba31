"""A moving average of the trainable parameters (Polyak / EMA averaging), evaluated and saved in their place.

With a small batch and a learning rate high enough to learn in a few hundred steps, the live prefix jitters from
step to step; the average of its recent values does not, so evaluations, `best/` and an early stop see a steady
prefix. On the tweet benchmark it smoothed the accuracy curve but ended level with the last step's prefix
(benchmarks/README.md, at 300 steps), so `prefixtune train` uses it only when asked (`--ema`).
Not torch.optim.swa_utils.AveragedModel: that deep-copies the whole module, frozen base model included; this keeps a
copy of the trainable tensors only (the prefix, an encoder's head).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class ParamEMA:
    """shadow <- d * shadow + (1 - d) * live after every optimizer step, d = min(decay, (1 + n) / (10 + n)).

    The ramp on d (TensorFlow's ExponentialMovingAverage num_updates rule) keeps the first steps from being
    averaged with the untrained start for long. decay 0 is off: nothing is copied, and every method is a no-op, so
    callers need no branch of their own."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.decay = float(decay)
        self.updates = 0
        self.shadow = [p.detach().clone() for p in self.params] if self.decay else []

    @torch.no_grad()
    def update(self) -> None:
        if not self.shadow:
            return
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)

    @contextmanager
    def applied(self):
        """The averaged values in the live parameters for the duration (evaluation, saving), then back."""
        if not self.shadow:
            yield
            return
        live = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.detach().cpu() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"checkpoint holds {len(state['shadow'])} averaged tensors, the model has {len(self.shadow)}")
        self.updates = int(state["updates"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
