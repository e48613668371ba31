"""Knowledge prefixes: distil a long document into a short trained prefix (issue 27; "Cartridges").

    doc = selfstudy.build_document(tok, text, max_context)
    model = PrefixModel(base); data = prepare(model, tok, doc, queries, cfg)   # teacher answers + top-k
    fit(model, data, cfg)                                                       # trains adapter "default"

Teacher: the frozen model with the document's window before each query. Its key/values are computed once per
window (`selfstudy.context_adapter`: one forward over the window, kept as a fixed prefix) and reused for every query,
never re-encoded. Student: the same model with P trained key/values instead. Both see the same query tokens
after their context (layout: selfstudy.py).

Data: the given queries and/or seeded self-study questions (selfstudy.self_study); the teacher answers each
greedily (at most `answer_tokens`, up to and including its end-of-turn token). Loss: KL(teacher || student) on
the answer tokens over k + 1 buckets: the teacher's top-k next tokens (`top_k`, default 20) and one bucket for
the rest of the vocabulary (`kl_topk`). Teacher top-k are computed once, before training. The start (`init`):
"context" = the key/values of the document's own first P tokens (peft's `initialize_kv_prefix_from_text`), or
"vocab"; the first `freeze_first` slots (default 1) keep their start as an attention sink (gradient zeroed).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from ..config import ConfigError, PrefixConfig
from . import selfstudy as S
from .distill_config import DistillConfig


def max_context(base, cfg: DistillConfig) -> int:
    if cfg.max_context_tokens:
        return cfg.max_context_tokens
    positions = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions", 2048)
    return int(positions) - 2 * (cfg.question_tokens + cfg.answer_tokens) - 32


def teacher_adapters(model, doc: S.Document) -> list[str]:
    return [S.context_adapter(model, f"context-{w}", doc.window_ids(w)) for w in range(len(doc.windows))]


def _by_window(examples: list[dict], batch_size: int):
    for w in sorted({e["window"] for e in examples}):
        rows = [e for e in examples if e["window"] == w]
        for s in range(0, len(rows), batch_size):
            yield f"context-{w}", rows[s : s + batch_size]


@torch.no_grad()
def teacher_answers(model, tokenizer, examples: list[dict], answer_tokens: int, batch_size: int = 16,
                    progress: bool = True, top_k: int | None = None) -> None:
    """Fill each example's "answer_ids" (and "answer") with the teacher's greedy answer; tokens/s in the log. With
    `top_k`, also "topk_ids" / "topk_logp" from the logits generate() scored each answer token with (what
    teacher_topk computes with a second forward, without it)."""
    import time

    from tqdm.auto import tqdm

    t0, made = time.perf_counter(), 0

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = tokenizer.eos_token_id
    bar = tqdm(total=len(examples), desc="teacher answers", disable=not progress, dynamic_ncols=True)
    for name, rows in _by_window(examples, batch_size):
        ids, mask = S.left_pad([e["query_ids"] for e in rows], pad)
        gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             adapter_names=[name] * len(rows), do_sample=False, max_new_tokens=answer_tokens,
                             pad_token_id=pad, cache_implementation="static",  # a dynamic cache re-copies the window
                             return_dict_in_generate=True, output_logits=top_k is not None)
        out = gen.sequences[:, ids.shape[1]:].tolist()
        if top_k is not None:  # [B, steps, V] -> the top-k of each step's next-token distribution
            logp, idx = torch.stack(gen.logits, 1).float().log_softmax(-1).topk(top_k, dim=-1)
        for i, (e, new) in enumerate(zip(rows, out)):
            cut = new.index(stop) + 1 if stop in new else len(new)
            e["answer_ids"] = new[:cut] or [stop if stop is not None else pad]
            e["answer"] = tokenizer.decode(e["answer_ids"], skip_special_tokens=True)
            if top_k is not None:
                a = len(e["answer_ids"])
                e["topk_ids"], e["topk_logp"] = idx[i, :a].cpu(), logp[i, :a].cpu()
            made += len(e["answer_ids"])
        bar.update(len(rows))
    bar.close()
    took = time.perf_counter() - t0
    if examples:
        bar.write(f"teacher answers: {made} tokens in {took:.1f}s, {made / max(took, 1e-9):.0f} tokens/s")


def answer_positions(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the position predicting each answer token in query + answer [B, A], its mask [B, A]); A = longest answer."""
    width = max(len(e["answer_ids"]) for e in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    amask = torch.zeros(len(rows), width)
    for i, e in enumerate(rows):
        q, a = len(e["query_ids"]), len(e["answer_ids"])
        index[i, :a] = torch.arange(q - 1, q + a - 1)
        amask[i, :a] = 1
    return index, amask


def answer_logits(model, rows: list[dict], adapter_names, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits at the positions predicting each answer token [B, A, V], mask [B, A]); A = longest answer."""
    ids, mask = S.right_pad([e["query_ids"] + e["answer_ids"] for e in rows], pad)
    dev = model.device
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), adapter_names=adapter_names).logits
    index, amask = answer_positions(rows)
    picked = logits.gather(1, index.to(dev)[..., None].expand(-1, -1, logits.shape[-1]))
    return picked.float(), amask.to(dev)


@torch.no_grad()
def teacher_topk(model, tokenizer, examples: list[dict], k: int, batch_size: int = 8, progress: bool = True) -> None:
    """Fill each example's "topk_ids" / "topk_logp" [A, k]: the teacher's top-k next-token log-probabilities."""
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(examples), desc="teacher top-k", disable=not progress, dynamic_ncols=True)
    for name, rows in _by_window(examples, batch_size):
        logits, _ = answer_logits(model, rows, [name] * len(rows), pad)
        logp, idx = logits.log_softmax(-1).topk(k, dim=-1)
        for i, e in enumerate(rows):
            a = len(e["answer_ids"])
            e["topk_ids"], e["topk_logp"] = idx[i, :a].cpu(), logp[i, :a].cpu()
        bar.update(len(rows))
    bar.close()


def kl_topk(student_logits, topk_ids, topk_logp, mask) -> torch.Tensor:
    """Mean over answer tokens of the (k+1)-way KL(teacher || student): the teacher's k ids, and one bucket for the
    rest of the vocabulary. A lower bound on the full KL, zero when the student matches the teacher on the buckets
    (renormalising over the k ids instead would pull the student's mass off every other token)."""
    lse = student_logits.logsumexp(-1, keepdim=True)
    logq = student_logits.gather(-1, topk_ids) - lse
    log_q_rest = student_logits.scatter(-1, topk_ids, float("-inf")).logsumexp(-1) - lse[..., 0]
    p_log = topk_logp.float()
    p_rest = (1 - p_log.exp().sum(-1)).clamp_min(0)
    # a rest below float rounding (k = the whole vocabulary) counts 0; the clamp keeps gradients finite there
    rest = torch.where(p_rest > 1e-6, p_rest * (p_rest.clamp_min(1e-12).log() - log_q_rest.clamp_min(-30.0)), 0.0)
    kl = (p_log.exp() * (p_log - logq)).sum(-1) + rest
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def _stack(rows: list[dict], key: str, width: int, dev) -> torch.Tensor:
    t = rows[0][key]
    out = torch.zeros(len(rows), width, t.shape[-1], dtype=t.dtype)
    for i, e in enumerate(rows):
        out[i, : len(e[key])] = e[key]
    return out.to(dev)


def batch_loss(model, rows: list[dict], pad: int, name: str = "default") -> torch.Tensor:
    logits, mask = answer_logits(model, rows, [name] * len(rows), pad)
    width = mask.shape[1]
    return kl_topk(logits, _stack(rows, "topk_ids", width, mask.device), _stack(rows, "topk_logp", width, mask.device), mask)


def prepare(model, tokenizer, doc: S.Document, cfg: DistillConfig, queries: list[str] | None = None,
            say=print) -> list[dict]:
    """Training examples with teacher answers and top-k: the given queries, then `cfg.self_study` generated ones."""
    examples = S.given_examples(tokenizer, doc, queries) if queries else []
    n_study = cfg.self_study if cfg.self_study is not None else (0 if queries else 256)
    if n_study:
        examples += S.self_study(model, tokenizer, doc, n_study, seed=cfg.seed, chunk_tokens=cfg.chunk_tokens,
                                 question_tokens=cfg.question_tokens, families=cfg.families, say=say,
                                 progress=cfg.progress)
    if not examples:
        raise ConfigError("no training queries: give --queries FILE or --self-study N (N > 0)")
    teacher_adapters(model, doc)
    teacher_answers(model, tokenizer, examples, cfg.answer_tokens, progress=cfg.progress, top_k=cfg.top_k)
    if cfg.conversation_turns == 2:  # second turns need the first answers in view
        second = S.follow_ups(model, tokenizer, doc, examples, seed=cfg.seed, question_tokens=cfg.question_tokens, say=say)
        teacher_answers(model, tokenizer, second, cfg.answer_tokens, progress=cfg.progress, top_k=cfg.top_k)
        examples += second
    mean = sum(len(e["answer_ids"]) for e in examples) / len(examples)
    say(f"teacher: {len(examples)} answers (greedy, up to {cfg.answer_tokens} tokens, mean {mean:.0f}); top-{cfg.top_k} "
        f"log-probs kept; context {doc.context_len} tokens in {len(doc.windows)} window(s)")
    return examples


def add_student(model, doc: S.Document, cfg: DistillConfig, name: str = "default") -> None:
    P = cfg.num_virtual_tokens
    if cfg.init == "context":
        pcfg = PrefixConfig(num_virtual_tokens=P, init="text", init_text="(document start)", layer_scale=cfg.layer_scale,
                            extra={"init_token_ids": doc.window_ids(0)[:P]})
    else:
        pcfg = PrefixConfig(num_virtual_tokens=P, init="vocab", layer_scale=cfg.layer_scale)
    pcfg.extra["num_frozen_tokens"] = cfg.freeze_first  # written as peft CARTRIDGE's num_frozen_tokens
    pcfg.extra["task"] = "distill"  # shown by `prefixtune info` and the model card
    if name in model.prefixes:
        model.delete_adapter(name)
    model.add_adapter(name, pcfg)
    model.set_adapter(name)
    if cfg.freeze_first:
        n = cfg.freeze_first  # attention sink: these slots keep their start

        def zero_head(grad):
            grad = grad.clone()
            grad[:n] = 0
            return grad

        model.prefixes[name].embedding.weight.register_hook(zero_head)


def split(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(len(examples) * fraction) if len(examples) > 4 else 0
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


@torch.no_grad()
def mean_loss(model, rows: list[dict], pad: int, batch_size: int = 8, name: str = "default") -> float:
    total, n = 0.0, 0
    for s in range(0, len(rows), batch_size):
        part = rows[s : s + batch_size]
        tokens = sum(len(e["answer_ids"]) for e in part)
        total += batch_loss(model, part, pad, name).item() * tokens
        n += tokens
    return total / max(n, 1)


def collate(rows: list[dict], pad: int) -> dict:
    """A training batch: query + answer ids (right-padded), where each answer token is predicted, the teacher's top-k."""
    ids, mask = S.right_pad([e["query_ids"] + e["answer_ids"] for e in rows], pad)
    index, amask = answer_positions(rows)
    width = index.shape[1]
    return {"input_ids": ids, "attention_mask": mask, "answer_index": index, "answer_mask": amask,
            "topk_ids": _stack(rows, "topk_ids", width, "cpu"), "topk_logp": _stack(rows, "topk_logp", width, "cpu")}


class DistillLoss(nn.Module):
    """The top-k KL of the active adapter's answers against the teacher's (the loop's loss module, DDP-wrappable)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        index = batch["answer_index"][..., None].expand(-1, -1, logits.shape[-1])
        return kl_topk(logits.gather(1, index).float(), batch["topk_ids"], batch["topk_logp"], batch["answer_mask"])
