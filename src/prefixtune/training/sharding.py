"""`--fsdp`: the frozen base model sharded across the processes (torch FSDP2 `fully_shard`), the prefix kept whole.

    lossmod = shard_frozen_base(LossModule(pm), acc)   # instead of acc.prepare(LossModule(pm)) (DDP)

Each transformer block, the embeddings outside them and the output head (unless tied to an embedding) become FSDP2
units (norms outside the blocks, and a tied embedding, stay whole):
every process keeps 1/world of those weights and all-gathers a unit's full weights only while it runs (forward,
and again in backward, where the prefix's gradient flows through the frozen weights). The prefix (and projection,
and an encoder classifier's head) is not sharded: every process holds it whole, and a gradient hook averages its
gradient over the processes as DDP would, before clipping and the optimizer step. So the optimizer, checkpoints
(--resume), EMA and saving see ordinary tensors, identical on every process, and nothing needs gathering.

Every process must run the same forwards (FSDP all-gathers inside them): training steps and evaluation already
do; only the main process writes files, and writing touches only the prefix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .checkpoints import TrainingError


def _blocks(base: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: every module in the first nn.ModuleList of >1 entries per stack (the
    decoder's layers; a seq2seq model's encoder and decoder stacks)."""
    found = []
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and not any(module is b or _inside(module, b) for b in found):
            found.append(module)
    return [block for stack in found for block in stack]


def _rest(base: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The embeddings outside the blocks (tokens, positions) and the output head, each a unit of its own; an
    embedding that shares its weight with the head (tied) stays whole on every process, and so does the head.
    Why units of their own and not the whole model: a causal LM's loss runs its body and then its head on the label
    positions only (training/evaluate.py), so no forward encloses both, and FSDP2 cannot make one unit (a root) of
    two modules. Every unit is its own root, gathered when its module runs."""
    inside = {id(m) for block in blocks for m in block.modules()}
    head = base.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    embeddings, tied = [], False
    for m in base.modules():
        if isinstance(m, nn.Embedding) and id(m) not in inside:
            if any(id(p) in head_params for p in m.parameters()):
                tied = True
            else:
                embeddings.append(m)
    return embeddings + ([head] if head_params and not tied else [])


def _inside(module: nn.Module, stack: nn.ModuleList) -> bool:
    return any(module is m for m in stack.modules())


def shard_frozen_base(lossmod: nn.Module, acc) -> nn.Module:
    """Shard `lossmod.model.base_model` over acc's processes in place; hook the trainable parameters' gradients to
    be averaged over them. -> `lossmod` (not wrapped: accelerate must not put DDP around it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = acc.num_processes
    if world < 2 or not dist.is_initialized():
        raise TrainingError("--fsdp shards the frozen model over several processes: start them with "
                            "`torchrun --nproc-per-node N -m prefixtune train ...` (or `accelerate launch --multi_gpu "
                            "--num_processes N`); without --fsdp one process trains alone")
    base = lossmod.model.base_model
    full = _param_bytes(base)
    mesh = init_device_mesh(acc.device.type, (world,))
    blocks = _blocks(base)
    for module in blocks + _rest(base, blocks):
        fully_shard(module, mesh=mesh)
    for p in lossmod.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad(world))
    held = local_param_bytes(base)
    # every process says what it holds (tests/test_fsdp.py reads these lines)
    print(f"fsdp: the frozen model is sharded over {world} processes; process {acc.process_index} holds "
          f"{held} of its {full} weight bytes ({held / full:.0%})", flush=True)
    return lossmod


def _average_grad(world: int):
    # Runs after every backward that adds to p.grad. Averaging there is linear, so with gradient accumulation the
    # sum of the per-micro-batch averages is the average of the sums: the gradient DDP (or one process) gets.
    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    return hook


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def local_param_bytes(module: nn.Module) -> int:
    """Bytes of parameters this process holds: a sharded (DTensor) parameter's local shard, else the whole tensor."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
