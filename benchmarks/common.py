"""Pieces the benchmark scripts share: --device/--dtype, device sync, peak memory, one rank-classification scorer."""

from __future__ import annotations

import argparse
import resource

import torch

from prefixtune.training import data as D

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, the same in every benchmark script (check them with `check_device_args`)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device for the model (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="the base model's weights dtype (prefix parameters stay float32)")


def check_device_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> torch.dtype:
    """One clear error for a device this machine lacks; -> the torch dtype named by --dtype."""
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        p.error(f"--device {args.device}: MPS is not available here; use --device cpu")
    return DTYPES[args.dtype]


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_mb(device: str, rss0: int) -> float:
    """CUDA: max allocated; CPU: peak RSS growth since `rss0` (ru_maxrss, KiB on Linux)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024


@torch.no_grad()
def rank_accuracy(model, tok, prompts: list[str], gold: list[int], label_words: list[str], device="cpu", batch: int = 16) -> float:
    """A plain forward (right padding), logits at the last prompt position, argmax over the label words' first
    target tokens, tokenized exactly as training tokenizes them (data.encode_pair). Works for any model
    (prefixtune, peft prefix or LoRA) because it only calls model(input_ids, attention_mask)."""
    p_ids, _ = D.encode_pair(tok, prompts, [], False)
    _, lab_ids = D.encode_pair(tok, [prompts[0]] * len(label_words), label_words, False)
    first = [t[0] for t in lab_ids]
    assert len(set(first)) == len(first), f"label words share a first token: {lab_ids}"
    collate = D.PadCollator(tok, padding_side="right", is_encoder_decoder=False)
    model.eval()
    correct = 0
    # Batches of similar length (sorted), and the LM head only at the few last-prompt positions they have
    # (logits_to_keep as indices): the full [B, T, vocab] head is most of an eval's cost on a small model.
    order = sorted(range(len(prompts)), key=lambda i: len(p_ids[i]))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        b = {k: v.to(device) for k, v in collate([{"input_ids": p_ids[i]} for i in idx]).items()}
        last = b["attention_mask"].sum(1) - 1
        keep = torch.unique(last)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=keep).logits
        pred = logits[torch.arange(len(last), device=last.device), torch.searchsorted(keep, last)][:, first].argmax(-1)
        correct += sum(int(p == gold[i]) for p, i in zip(pred.tolist(), idx))
    return correct / max(len(prompts), 1)
