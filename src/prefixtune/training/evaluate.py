"""Scoring: loss on label positions only, rank/generate classification, classification reports.

The building block is `selected_logits`: for causal LMs it runs the transformer body and applies the
LM head only where labels != -100 (a classify batch has 1-3 target tokens per row, so this skips almost
all of the [B, T, vocab] logits that dominate a small model's step time).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..inject import kind_of_config, lm_head_gives_logits
from . import data as D

OTHER = "<other>"


# ----------------------------------------------------------------------------- scoring

def _unwrap(model):
    return getattr(model, "module", model)  # DDP / accelerate wrappers


def _causal_hidden(model, input_ids, attention_mask):
    """Last hidden states [B, T, H] of a causal LM, with the active prefix if `model` is a PrefixModel."""
    from ..model import PrefixModel

    if isinstance(model, PrefixModel):
        body = getattr(model.base_model, model.base_model.base_model_prefix)
        return body(**model.prefixed_inputs(input_ids, attention_mask)).last_hidden_state
    body = getattr(model, model.base_model_prefix)
    return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _is_seq2seq(model) -> bool:
    return kind_of_config(_unwrap(model).config) == "seq2seq"


def is_head_classifier(model) -> bool:
    """An encoder (BERT family) with a sequence-classification head: scored by the head, not by label tokens."""

    return kind_of_config(_unwrap(model).config) == "encoder"


def selected_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logits [N, V] fp32, target ids [N], row index [N]) for the N label positions of the batch."""
    labels = batch["labels"]
    m = _unwrap(model)
    if is_head_classifier(m):  # one class index per row, scored by the classification head
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.float(), labels, torch.arange(labels.shape[0], device=labels.device)
    if _is_seq2seq(m):  # every decoder position is a label (padding aside)
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
        sel = labels != -100
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        return logits[sel].float(), labels[sel], rows[sel]
    targets = labels[:, 1:]
    sel = targets != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[sel]
    if lm_head_gives_logits(m.config):
        hidden = _causal_hidden(m, batch["input_ids"], batch["attention_mask"])
        base = m.base_model if hasattr(m, "arch") else m
        logits = base.get_output_embeddings()(hidden[:, :-1][sel])
    else:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][sel]
    return logits.float(), targets[sel], rows


def token_nll(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood over label tokens, number of label tokens)."""
    logits, targets, _ = selected_logits(model, batch)
    return nn.functional.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's label tokens, [B]."""
    logits, targets, rows = selected_logits(model, batch)
    lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    return torch.zeros(batch["labels"].shape[0], device=lp.device).index_add_(0, rows, lp)


def _batches(features: list[dict], collate, batch_size: int, device):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silent in logs and CI
    for s in tqdm(range(0, len(features), batch_size), desc="evaluating", unit="batch", leave=False, disable=None):
        yield {k: v.to(device) for k, v in collate(features[s : s + batch_size]).items()}


def _device(model):
    return next(_unwrap(model).parameters()).device


# ----------------------------------------------------------------------------- classification

def _fit(prompt: list[int], n_target: int, max_length: int, bos) -> list[int]:
    """Cut a prompt from the left so prompt + target fits (eval never drops an example; at least one prompt token)."""
    return [prompt[k] for k in D.left_cut(prompt, max(max_length - n_target, 1), bos)]


def classify_prompts(ds, task_info: dict) -> tuple[list[str], list[str]]:
    """(prompt strings, gold label strings) formatted exactly as training formatted them."""
    text_col = D._column(ds, task_info.get("text_column"), D.TEXT_COLUMNS, "text", "--text-column")
    label_col = D._column(ds, task_info.get("label_column"), D.LABEL_COLUMNS, "label", "--label-column")
    template = task_info["prompt_template"]
    prompts = [D._fmt(template, row, text=row[text_col]) for row in ds]
    return prompts, D.label_strings(ds, label_col)


@torch.no_grad()
def rank_predict(model, tokenizer, prompts: list[str], label_words: list[str], *, max_length: int = 256,
                 batch_size: int = 16) -> tuple[list[int], list[list[float]]]:
    """Score each label word's log-likelihood after each prompt; pick the max."""
    seq2seq = _is_seq2seq(model)
    L = len(label_words)
    p_ids, t_ids = D.encode_pair(tokenizer, [p for p in prompts for _ in range(L)], list(label_words) * len(prompts), seq2seq)
    eos = tokenizer.eos_token_id
    t_ids = [t[:-1] if len(t) > 1 and t[-1] == eos else t for t in t_ids]  # the label word, not the stop token
    if not seq2seq and all(len(t) == 1 and t == t_ids[i % L] for i, t in enumerate(t_ids)):
        return _rank_single_token(model, tokenizer, p_ids[::L], [t[0] for t in t_ids[:L]], max_length, batch_size)
    feats = []
    for p, t in zip(p_ids, t_ids):
        p = _fit(p, 0 if seq2seq else len(t), max_length, tokenizer.bos_token_id)
        if seq2seq:
            feats.append({"input_ids": p, "attention_mask": [1] * len(p), "labels": t})
        else:
            feats.append({"input_ids": p + t, "attention_mask": [1] * (len(p) + len(t)), "labels": [-100] * len(p) + t})
    collate = D.PadCollator(tokenizer, padding_side="right", is_encoder_decoder=seq2seq)
    scores = []
    for b in _batches(feats, collate, batch_size * L, _device(model)):
        scores += sequence_logprobs(model, b).tolist()
    table = [scores[i * L : (i + 1) * L] for i in range(len(prompts))]
    return [max(range(L), key=row.__getitem__) for row in table], table


def _rank_single_token(model, tokenizer, p_ids, label_ids, max_length, batch_size):
    # Every label is one token after the prompt: one forward per prompt scores them all (L times cheaper).
    feats = []
    for p in p_ids:
        p = _fit(p, 1, max_length, tokenizer.bos_token_id)
        feats.append({"input_ids": p + [label_ids[0]], "attention_mask": [1] * (len(p) + 1),
                      "labels": [-100] * len(p) + [label_ids[0]]})
    collate = D.PadCollator(tokenizer, padding_side="right", is_encoder_decoder=False)
    table = []
    for b in _batches(feats, collate, batch_size, _device(model)):
        logits, _, _ = selected_logits(model, b)  # one label position per row
        table += torch.log_softmax(logits, -1)[:, label_ids].tolist()
    return [max(range(len(label_ids)), key=row.__getitem__) for row in table], table


@torch.no_grad()
def head_predict(model, tokenizer, prompts: list[str], label_words: list[str], *, max_length: int = 256,
                 batch_size: int = 16) -> tuple[list[int], list[list[float]]]:
    """Encoder classifier: argmax of the classification head; -> (class indices, class probabilities)."""
    ids, _ = D.encode_for_head(tokenizer, prompts, max_length)
    collate = D.PadCollator(tokenizer, padding_side="right")
    probs = []
    for b in _batches([{"input_ids": x} for x in ids], collate, batch_size, _device(model)):
        logits = model(**b).logits.float()
        if logits.shape[-1] != len(label_words):
            raise D.DataError(f"the classifier head has {logits.shape[-1]} outputs but there are {len(label_words)} "
                              f"labels {label_words}; load the model with the adapter's label set")
        probs += torch.softmax(logits, -1).tolist()
    return [max(range(len(label_words)), key=row.__getitem__) for row in probs], probs


def match_label(text: str, label_words: list[str]) -> str:
    """Map generated text to a label: exact match, else the label the text starts with, else the first one it mentions."""
    t = text.strip().lower()
    words = {w.lower(): w for w in label_words}
    if t in words:
        return words[t]
    for w in sorted(words, key=len, reverse=True):
        if t.startswith(w):
            return words[w]
    hits = [(t.find(w), words[w]) for w in words if w in t]
    return min(hits)[1] if hits else OTHER


@torch.no_grad()
def generate_predict(model, tokenizer, prompts: list[str], label_words: list[str], *, max_length: int = 256,
                     batch_size: int = 16, max_new_tokens: int | None = None) -> tuple[list[str], list[str]]:
    """Greedy-decode after each prompt; -> (matched labels, raw generations)."""
    seq2seq = _is_seq2seq(model)
    p_ids, _ = D.encode_pair(tokenizer, prompts, [], seq2seq)
    lens = [len(t) for t in D.encode_pair(tokenizer, [""] * len(label_words), list(label_words), seq2seq)[1]]
    new = max_new_tokens or max(lens) + 2
    collate = D.PadCollator(tokenizer, padding_side="left" if not seq2seq else "right", is_encoder_decoder=seq2seq)
    feats = [{"input_ids": _fit(p, new, max_length, tokenizer.bos_token_id)} for p in p_ids]
    texts = []
    for b in _batches(feats, collate, batch_size, _device(model)):
        out = model.generate(**b, max_new_tokens=new, do_sample=False, pad_token_id=collate.pad_id)
        out = out if seq2seq else out[:, b["input_ids"].shape[1]:]
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return [match_label(t, label_words) for t in texts], texts


def classification_report(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix (rows gold, columns predicted)."""
    cols = list(labels) + ([OTHER] if OTHER in pred else [])
    idx = {l: i for i, l in enumerate(cols)}
    cm = [[0] * len(cols) for _ in labels]
    for g, p in zip(gold, pred):
        cm[idx[g]][idx[p]] += 1
    per_class = {}
    for i, l in enumerate(labels):
        tp = cm[i][i]
        n_pred = sum(cm[r][i] for r in range(len(labels)))
        n_gold = sum(cm[i])
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_gold if n_gold else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[l] = {"precision": prec, "recall": rec, "f1": f1, "support": n_gold}
    present = [l for l in labels if per_class[l]["support"] > 0] or list(labels)
    return {
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1),
        "macro_f1": sum(per_class[l]["f1"] for l in present) / len(present),
        "n": len(gold),
        "per_class": per_class,
        "confusion_matrix": {"labels": cols, "rows_gold_cols_pred": cm},
    }


def evaluate_classify(model, tokenizer, ds, task_info: dict, *, method: str = "rank", batch_size: int = 16,
                      max_length: int = 256) -> tuple[dict, list[dict]]:
    label_words = list(task_info["label_words"])
    prompts, gold = classify_prompts(ds, task_info)
    unknown = sorted(set(gold) - set(label_words))
    if unknown:
        raise D.DataError(f"eval label(s) {unknown} are not in the trained label set {label_words}; fix the data "
                          "or the --label-column")
    head = is_head_classifier(model)
    if head and method == "generate":
        raise D.DataError("an encoder classifier is evaluated by its classification head; --method generate does "
                          "not apply (use --method head)")
    if method == "head" and not head:
        raise D.DataError("--method head applies to encoder classifiers only; use rank or generate")
    method = "head" if head else method  # "rank", the default, means "the model's own scoring" for encoders
    was_training = model.training
    model.eval()
    try:
        if method == "head":
            idx, probs = head_predict(model, tokenizer, prompts, label_words, max_length=max_length, batch_size=batch_size)
            pred, extra = [label_words[i] for i in idx], [{"probs": dict(zip(label_words, p))} for p in probs]
        elif method == "rank":
            idx, scores = rank_predict(model, tokenizer, prompts, label_words, max_length=max_length, batch_size=batch_size)
            pred, extra = [label_words[i] for i in idx], [{"scores": dict(zip(label_words, s))} for s in scores]
        elif method == "generate":
            pred, texts = generate_predict(model, tokenizer, prompts, label_words, max_length=max_length, batch_size=batch_size)
            extra = [{"generated": t} for t in texts]
        else:
            raise D.DataError(f"unknown eval method {method!r}; use --method rank, generate or head")
    finally:
        model.train(was_training)
    result = {"task": "classify", "method": method, **classification_report(gold, pred, label_words)}
    preds = [{"prompt": p, "label": g, "prediction": y, "correct": g == y, **e}
             for p, g, y, e in zip(prompts, gold, pred, extra)]
    return result, preds


def single_class_warning(result: dict, loss: float | None) -> str | None:
    """The symptom of a label leak (a causal-LM head over a bidirectional encoder): every prediction is one class
    while the loss says the labels are nearly certain. A model that always predicts one class cannot have a
    cross-entropy much below the entropy of the gold labels, so loss < half of it alongside one-class predictions
    means the loss and the predictions disagree. -> a message, or None."""
    cm = result.get("confusion_matrix") or {}
    rows = cm.get("rows_gold_cols_pred") or []
    predicted = [j for j in range(len(cm.get("labels", []))) if any(r[j] for r in rows)]
    support = [sum(r) for r in rows]
    n = sum(support)
    if loss is None or len(predicted) != 1 or sum(1 for s in support if s) < 2:
        return None
    entropy = -sum(s / n * math.log(s / n) for s in support if s)
    if loss >= 0.5 * entropy:
        return None
    return (f"every prediction is {cm['labels'][predicted[0]]!r} (accuracy {result['accuracy']:.4f} = that class's "
            f"share) while the loss is {loss:.4f}, far below the {entropy:.4f} a one-class predictor must have: the "
            "loss does not measure what is evaluated (a label leak?), so this adapter has learnt nothing usable")


# ----------------------------------------------------------------------------- loss / perplexity

@torch.no_grad()
def evaluate_loss(model, tokenizer, tokenized, *, batch_size: int = 16) -> dict:
    """Mean token loss and perplexity over a tokenized dataset (input_ids/attention_mask/labels)."""
    was_training = model.training
    model.eval()
    collate = D.PadCollator(tokenizer, padding_side="right", is_encoder_decoder=_is_seq2seq(model))
    feats = tokenized.to_list()
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))  # less padding
    total, n = 0.0, 0
    try:
        for b in _batches([feats[i] for i in order], collate, batch_size, _device(model)):
            nll, k = token_nll(model, b)
            total, n = total + float(nll), n + k
    finally:
        model.train(was_training)
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "n_tokens": n, "n": len(feats)}


# ----------------------------------------------------------------------------- reporting

def write_results(out_dir: str | Path, result: dict, predictions: list[dict] | None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    if predictions is not None:
        with open(out / "predictions.jsonl", "w") as f:
            for p in predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")


def format_report(result: dict) -> str:
    if result.get("task") != "classify":
        return (f"{result.get('task')}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
                f"({result['n']} examples, {result['n_tokens']} target tokens)")
    lines = [f"accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   "
             f"n={result['n']}   method={result['method']}", "",
             f"{'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for l, r in result["per_class"].items():
        lines.append(f"{l[:15]:<16}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1']:>10.3f}{r['support']:>10d}")
    cm = result["confusion_matrix"]
    w = max(8, *(len(c) + 1 for c in cm["labels"]))
    lines += ["", "confusion (rows gold, cols predicted)", " " * 16 + "".join(f"{c[:w - 1]:>{w}}" for c in cm["labels"])]
    for l, row in zip(cm["labels"], cm["rows_gold_cols_pred"]):
        lines.append(f"{l[:15]:<16}" + "".join(f"{v:>{w}d}" for v in row))
    return "\n".join(lines)
