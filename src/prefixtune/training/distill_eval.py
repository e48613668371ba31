"""How well a knowledge prefix stands in for its document (`prefixtune distill-eval`).

For each held-out query the teacher (the document's window in view, training.distill) answers greedily; every
method then reads the same query + teacher answer tokens with its own context, and is scored against the
teacher at each answer position:
- kl: KL(teacher || method) over the full vocabulary, averaged over all answer tokens of all queries;
- agreement: the share of answer positions where the method's top-1 next token is the teacher's (greedy)
  token, i.e. greedy answer agreement under teacher forcing (one forward per method, no free generation).
Methods: the prefix; baselines no_context (nothing before the query) and truncated (the document cut to its
first P tokens, P the prefix's length, as key/values). Any `adapter_names` entry can be scored (composition).
"""

from __future__ import annotations

import torch

from . import distill as D
from . import selfstudy as S


@torch.no_grad()
def score(model, tokenizer, examples: list[dict], methods: dict, batch_size: int = 8, progress: bool = True) -> dict:
    """`methods`: label -> adapter_names entry (None, a name or a list of names). -> label -> {kl, agreement}.
    `examples` carry teacher answers (distill.teacher_answers) and windows (teacher adapters context-<w>)."""
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = {m: [0.0, 0.0] for m in methods}
    tokens = 0
    bar = tqdm(total=len(examples), desc="eval", disable=not progress, dynamic_ncols=True)
    for name, rows in D._by_window(examples, batch_size):
        t_logits, mask = D.answer_logits(model, rows, [name] * len(rows), pad)
        t_logp = t_logits.log_softmax(-1)
        target = t_logits.argmax(-1)
        for m, entry in methods.items():
            logits, _ = D.answer_logits(model, rows, [entry] * len(rows), pad)
            logq = logits.log_softmax(-1)
            kl = (t_logp.exp() * (t_logp - logq)).sum(-1)
            sums[m][0] += (kl * mask).sum().item()
            sums[m][1] += ((logits.argmax(-1) == target).float() * mask).sum().item()
        tokens += int(mask.sum().item())
        bar.update(len(rows))
    bar.close()
    return {m: {"kl": kl / max(tokens, 1), "agreement": agree / max(tokens, 1)} for m, (kl, agree) in sums.items()}


def evaluate(model, tokenizer, doc: S.Document, queries: list[str], adapter: str = "default", *,
             answer_tokens: int = 48, batch_size: int = 8, progress: bool = True) -> dict:
    """eval.json's content: kl, agreement (the prefix), baselines {no_context, truncated}, gap_recovered."""
    examples = S.given_examples(tokenizer, doc, queries)
    D.teacher_adapters(model, doc)
    D.teacher_answers(model, tokenizer, examples, answer_tokens, progress=progress)
    P = model.configs[adapter].num_virtual_tokens
    S.context_adapter(model, "truncated", doc.window_ids(0)[:P])
    res = score(model, tokenizer, examples, {"prefix": adapter, "no_context": None, "truncated": "truncated"},
                batch_size=batch_size, progress=progress)
    out = {"task": "distill", "queries": len(examples), "answer_tokens": sum(len(e["answer_ids"]) for e in examples),
           "num_virtual_tokens": P, "context_tokens": doc.context_len, **res.pop("prefix"), "baselines": res}
    gap = res["no_context"]["kl"]
    out["gap_recovered"] = (gap - out["kl"]) / gap if gap > 0 else None
    return out


def format_report(r: dict) -> str:
    rows = [("prefix", r), ("no_context", r["baselines"]["no_context"]), ("truncated", r["baselines"]["truncated"])]
    lines = [f"{r['queries']} queries, {r['answer_tokens']} answer tokens; P = {r['num_virtual_tokens']}, context "
             f"{r['context_tokens']} tokens", f"{'method':<12} {'KL':>8} {'agreement':>10}"]
    lines += [f"{n:<12} {m['kl']:>8.4f} {m['agreement']:>10.3f}" for n, m in rows]
    if r.get("gap_recovered") is not None:
        lines.append(f"share of the no-context KL gap recovered by the prefix: {r['gap_recovered']:.1%}")
    return "\n".join(lines)
