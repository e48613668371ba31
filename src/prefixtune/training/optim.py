"""What training optimises, and how fast: AdamW parameter groups and the learning-rate schedule.

    from prefixtune.training.optim import param_groups
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-2, projection_lr=1e-4))
"""

from __future__ import annotations


def param_groups(model, lr: float, projection_lr: float | None = None, weight_decay: float = 0.0,
                 head_lr: float | None = None) -> list[dict]:
    """Optimizer groups of a PrefixModel's trainable parameters: the prefix tables at `lr`, the projection MLPs at
    `projection_lr`, an encoder classifier's head at `head_lr` (each None: `lr`).

    Li & Liang tune the MLP with the table; a separate rate lets the (larger, folded-away) MLP move slower. A
    freshly initialised head and a prefix started from real key/values need not want the same rate."""
    table, mlp = [], []
    for enc in model.prefixes.values():
        for name, p in enc.named_parameters():
            if p.requires_grad:
                (mlp if name.startswith("transform.") else table).append(p)
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("prefixes.")]  # heads
    own_head = bool(rest) and head_lr is not None  # else one group, as checkpoints written before head_lr hold
    groups = [{"params": table + ([] if own_head else rest), "lr": lr, "weight_decay": weight_decay}]
    for params, rate in ((mlp, projection_lr), (rest if own_head else [], head_lr)):
        if params:
            groups.append({"params": params, "lr": lr if rate is None else rate, "weight_decay": weight_decay})
    return groups


def make_scheduler(optimizer, name: str, warmup_ratio: float, total_steps: int):
    """transformers' warmup schedules: linear / cosine decay to 0, or constant after warmup."""
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[name]
    return get_scheduler(name, optimizer, num_warmup_steps=int(warmup_ratio * total_steps), num_training_steps=total_steps)
