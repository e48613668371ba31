"""Formatting, tokenizing and batching training data (reading it, and which rows: sources.py).

Every task turns a record into (prompt ids, target ids); the loss is only on the target.
Causal models see prompt + target in one sequence with the prompt masked to -100; seq2seq
models get the prompt as input_ids and the target as labels. Outputs are plain python lists
(no padding); `PadCollator` pads per batch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from datasets import ClassLabel, Dataset

from .config import ON_TRUNCATE, TASKS  # declared once, beside the flags that take them

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "sentence", "content", "review", "tweet", "document")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "category")
CLASSIFY_TEMPLATE_CAUSAL = "{text}\nLabel: "
CLASSIFY_TEMPLATE_SEQ2SEQ = "{text}"
CLASSIFY_TEMPLATE_HEAD = "{text}"  # encoder classifiers: the text alone, [CLS] ... [SEP] added by the tokenizer
INSTRUCT_TEMPLATE = "Human: {instruction}\n{input}\n\nAssistant: "
INSTRUCT_TEMPLATE_NO_INPUT = "Human: {instruction}\n\nAssistant: "


class DataError(ValueError):
    """Bad data or arguments; the message names the culprit and the fix."""


def dataset_label(ds: Dataset) -> str:
    """How messages name a dataset: its file name when it came from one."""
    return ds.info.dataset_name or "the dataset"


# ----------------------------------------------------------------------------- tokenizing

def _column(ds: Dataset, given: str | None, candidates: Sequence[str], what: str, flag: str) -> str:
    cols = ds.column_names
    if given is not None:
        if given not in cols:
            raise DataError(
                f"column {given!r} not found in {dataset_label(ds)}; available columns: {', '.join(cols)}. Pass {flag}"
            )
        return given
    lower = {c.lower(): c for c in cols}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise DataError(
        f"could not find a {what} column in {dataset_label(ds)} (looked for {', '.join(candidates)}); "
        f"available columns: {', '.join(cols)}. Pass {flag}"
    )


def _require(ds: Dataset, names: Sequence[str], task: str) -> None:
    missing = [n for n in names if n not in ds.column_names]
    if missing:
        raise DataError(
            f"task {task!r} needs column(s) {', '.join(missing)} in {dataset_label(ds)}; "
            f"available columns: {', '.join(ds.column_names)}"
        )


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_pair(tokenizer, prompts: list[str], targets: list[str], is_encoder_decoder: bool):
    """Tokenize prompts (with the tokenizer's special tokens) and targets (ending in eos).

    Generation/eval code should build prompts with this too, so train and inference agree.
    Causal: trailing spaces move from the prompt to the target, because BPE vocabularies attach
    the space to the next word ("Label:" + " positive" is natural; "Label: " + "positive" is not).
    """
    if not is_encoder_decoder:
        moved = [p[len(p.rstrip(" ")):] for p in prompts]
        prompts = [p.rstrip(" ") for p in prompts]
        targets = [m + t for m, t in zip(moved, targets)]
    p_ids = tokenizer(prompts)["input_ids"] if prompts else []
    t_ids = tokenizer(targets, add_special_tokens=False)["input_ids"] if targets else []
    eos = _eos(tokenizer)
    if eos:  # every target ends in exactly one eos, so the model learns to stop
        t_ids = [t if t[-1:] == eos else t + eos for t in t_ids]
    return p_ids, t_ids


def left_cut(prompt: list[int], budget: int, bos: int | None) -> list[int]:
    """Positions of `prompt` to keep so it fits `budget` tokens: cut from the left, because the end of a prompt
    (e.g. "Label:") matters most, keeping a leading BOS. Training (under the on_truncate policy) and evaluation
    (which never drops an example) both cut prompts this way."""
    if len(prompt) <= budget:
        return list(range(len(prompt)))
    head = [0] if bos is not None and prompt and prompt[0] == bos and budget > 0 else []
    n = budget - len(head)
    return head + (list(range(len(prompt) - n, len(prompt))) if n > 0 else [])


def label_strings(ds: Dataset, column: str) -> list[str]:
    """The label column as strings: ClassLabel names, or the values stripped (training and evaluation agree)."""
    feat = ds.features[column]
    raw = ds[column]
    return [feat.int2str(v) for v in raw] if isinstance(feat, ClassLabel) else [str(v).strip() for v in raw]


class _Fitter:
    """Applies max_length and the on_truncate policy; counts what happened."""

    def __init__(self, tokenizer, max_length: int, on_truncate: str):
        if on_truncate not in ON_TRUNCATE:
            raise DataError(f"on_truncate must be one of {', '.join(ON_TRUNCATE)}, got {on_truncate!r}")
        self.max_length, self.mode = max_length, on_truncate
        self.bos = tokenizer.bos_token_id
        self.n_truncated = self.n_dropped = 0

    def keep(self, idx: int, prompt: list[int], n_target: int, why: str = "target") -> list[int] | None:
        """Positions of the prompt to keep so prompt + n_target fits max_length; None = drop the example.

        The prompt is cut from the left (see left_cut).
        """
        budget = self.max_length - n_target
        if budget < 0:
            msg = f"example {idx}: the {why} alone is {n_target} tokens, longer than max_length={self.max_length}"
            if self.mode == "error":
                raise DataError(msg + ". Raise --max-length or clean the data (or use on_truncate='drop')")
            log.debug(msg)
            self.n_dropped += 1
            return None
        if len(prompt) <= budget:
            return list(range(len(prompt)))
        if self.mode == "error":
            raise DataError(
                f"example {idx}: prompt {len(prompt)} + {why} {n_target} tokens > max_length={self.max_length}. "
                "Raise --max-length or use on_truncate='warn' (truncate the prompt) or 'drop'"
            )
        if self.mode == "drop":
            self.n_dropped += 1
            return None
        self.n_truncated += 1
        return left_cut(prompt, budget, self.bos)

    def prompt(self, idx: int, prompt: list[int], n_target: int, why: str = "target") -> list[int] | None:
        keep = self.keep(idx, prompt, n_target, why)
        return None if keep is None else [prompt[k] for k in keep]

    def report(self, task: str) -> None:
        if self.n_truncated or self.n_dropped:
            log.warning(
                "%s: truncated the prompt of %d example(s) and dropped %d to fit max_length=%d",
                task, self.n_truncated, self.n_dropped, self.max_length,
            )


def _assemble(prompts, targets, fit: _Fitter, is_encoder_decoder: bool) -> dict[str, list]:
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for i, (p, t) in enumerate(zip(prompts, targets)):
        if is_encoder_decoder:
            # encoder input and decoder labels each get their own max_length budget
            if fit.keep(i, [], len(t)) is None:
                continue
            ids, labels = fit.prompt(i, p, 0), t
            if ids is None:
                continue
        else:
            p = fit.prompt(i, p, len(t))
            if p is None:
                continue
            ids, labels = p + t, [-100] * len(p) + t
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def _fmt(template: str, row: dict, **fields) -> str:
    try:
        return template.format(**{**row, **fields})
    except KeyError as e:
        raise DataError(f"prompt_template {template!r} uses {e}, which is not a column; columns: {', '.join(row)}") from None


def encode_for_head(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Encoder-classifier inputs: the tokenizer's own special tokens, texts cut at the end to max_length.
    -> (input ids, which rows were cut). Training and evaluation both encode with this."""
    ids = tokenizer(texts)["input_ids"]
    cut = [len(x) > max_length for x in ids]
    if any(cut):
        short = tokenizer([t for t, c in zip(texts, cut) if c], truncation=True, max_length=max_length)["input_ids"]
        it = iter(short)
        ids = [next(it) if c else x for x, c in zip(ids, cut)]
    return ids, cut


def _head_rows(tokenizer, prompts, label_ids, fit: _Fitter) -> dict[str, list]:
    """Encoder classifier: input_ids of the text, labels = the class index (loss is the head's cross-entropy)."""
    ids, cut = encode_for_head(tokenizer, prompts, fit.max_length)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for i, (x, c, y) in enumerate(zip(ids, cut, label_ids)):
        if c:
            if fit.mode == "error":
                raise DataError(f"example {i}: the text is longer than max_length={fit.max_length} tokens. Raise "
                                "--max-length or use on_truncate='warn' (cut the end of the text) or 'drop'")
            if fit.mode == "drop":
                fit.n_dropped += 1
                continue
            fit.n_truncated += 1
        out["input_ids"].append(x)
        out["attention_mask"].append([1] * len(x))
        out["labels"].append(y)
    return out


def _classify(ds, tokenizer, fit, *, is_encoder_decoder, text_column, label_column, label_words, prompt_template,
              head=False):
    text_col = _column(ds, text_column, TEXT_COLUMNS, "text", "--text-column")
    label_col = _column(ds, label_column, LABEL_COLUMNS, "label", "--label-column")
    feat = ds.features[label_col]
    values = label_strings(ds, label_col)
    if label_words is None:  # fixed from the training set; pass info["label_words"] when tokenizing eval
        label_words = list(feat.names) if isinstance(feat, ClassLabel) else sorted(set(values))
    label_words = list(label_words)
    unknown = sorted(set(values) - set(label_words))
    if unknown:
        raise DataError(
            f"label(s) {', '.join(map(repr, unknown))} in column {label_col!r} of {dataset_label(ds)} are not in the "
            f"training label set {label_words}; fix the data or pass the same label_words used for training"
        )
    default = CLASSIFY_TEMPLATE_HEAD if head else CLASSIFY_TEMPLATE_SEQ2SEQ if is_encoder_decoder else CLASSIFY_TEMPLATE_CAUSAL
    template = prompt_template or default
    prompts = [_fmt(template, row, text=row[text_col]) for row in ds]
    info = {"label_words": label_words, "text_column": text_col, "label_column": label_col, "prompt_template": template}
    if head:
        index = {w: i for i, w in enumerate(label_words)}
        return _head_rows(tokenizer, prompts, [index[v] for v in values], fit), {**info, "head": True}
    p, t = encode_pair(tokenizer, prompts, values, is_encoder_decoder)
    return _assemble(p, t, fit, is_encoder_decoder), info


def _instruct(ds, tokenizer, fit, *, is_encoder_decoder, prompt_template, **_):
    _require(ds, ("instruction", "output"), "instruct")
    prompts = []
    for row in ds:
        inp = (row.get("input") or "").strip()
        template = prompt_template or (INSTRUCT_TEMPLATE if inp else INSTRUCT_TEMPLATE_NO_INPUT)
        prompts.append(_fmt(template, row, instruction=row["instruction"], input=inp))
    p, t = encode_pair(tokenizer, prompts, [str(o) for o in ds["output"]], is_encoder_decoder)
    return _assemble(p, t, fit, is_encoder_decoder), {"prompt_template": prompt_template or INSTRUCT_TEMPLATE}


def _chat(ds, tokenizer, fit, *, is_encoder_decoder, **_):
    _require(ds, ("messages",), "chat")
    if is_encoder_decoder:
        raise DataError("task 'chat' needs a causal (decoder-only) model; use task 'instruct' for seq2seq models")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat_template, so task 'chat' can't format messages; "
                        "use a chat/instruct model's tokenizer or task 'instruct'")

    def render(msgs, gen=False):
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False))

    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for i, msgs in enumerate(ds["messages"]):
        # Tokens that an assistant message adds after its header are targets; find them by
        # rendering growing prefixes of the conversation.
        ids = render(msgs)
        labels, last = [-100] * len(ids), None
        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start, upto = len(render(msgs[:j], gen=True)), render(msgs[: j + 1])
            if ids[: len(upto)] != upto:
                raise DataError(f"example {i}: the chat template renders message {j} differently once later "
                                "messages follow, so assistant tokens can't be located; use task 'instruct'")
            labels[start : len(upto)] = upto[start:]
            last = start  # truncation must keep the final assistant turn whole
        if last is None:
            raise DataError(f"example {i} in column 'messages' has no assistant message, so nothing to learn")
        keep = fit.keep(i, ids[:last], len(ids) - last, why="last assistant turn")
        if keep is None:
            continue
        keep += range(last, len(ids))
        out["input_ids"].append([ids[k] for k in keep])
        out["attention_mask"].append([1] * len(keep))
        out["labels"].append([labels[k] for k in keep])
    return out, {}


def _lm(ds, tokenizer, fit, *, text_column, **_):
    col = _column(ds, text_column, TEXT_COLUMNS, "text", "--text-column")
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for i, ids in enumerate(tokenizer([str(x) for x in ds[col]])["input_ids"]):
        if len(ids) > fit.max_length:  # all of it is target: keep the start, never pretend it fit
            if fit.mode == "error":
                raise DataError(f"example {i}: {len(ids)} tokens > max_length={fit.max_length}. Raise --max-length")
            if fit.mode == "drop":
                fit.n_dropped += 1
                continue
            fit.n_truncated += 1
            ids = ids[: fit.max_length]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(list(ids))
    return out, {"text_column": col}


_TASK_FNS = {"classify": _classify, "instruct": _instruct, "chat": _chat, "lm": _lm}


def tokenize_dataset(
    ds: Dataset,
    tokenizer,
    task: str,
    *,
    is_encoder_decoder: bool,
    text_column: str | None = None,
    label_column: str | None = None,
    label_words: Sequence[str] | None = None,
    prompt_template: str | None = None,
    max_length: int = 256,
    on_truncate: str = "warn",
    head: bool = False,
) -> tuple[Dataset, dict[str, Any]]:
    """Format + tokenize for `task`. Returns (Dataset of input_ids/attention_mask/labels, info).

    head=True (encoder classifiers, task classify): labels are class indices into label_words for the model's
    classification head instead of label tokens.

    info has label_words (classify; pass it back in for the eval set), n_truncated, n_dropped, and
    the resolved columns/template.
    """
    if task not in _TASK_FNS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if len(ds) == 0:
        raise DataError(f"{dataset_label(ds)} is empty; nothing to tokenize")
    fit = _Fitter(tokenizer, max_length, on_truncate)
    if head and task != "classify":
        raise DataError(f"task {task!r} has no classification-head form; encoder models train task 'classify' only")
    cols, info = _TASK_FNS[task](
        ds, tokenizer, fit, is_encoder_decoder=is_encoder_decoder, text_column=text_column,
        label_column=label_column, label_words=label_words, prompt_template=prompt_template,
        **({"head": True} if head else {}),
    )
    fit.report(task)
    if not cols["input_ids"]:
        raise DataError(f"all {len(ds)} examples were dropped by max_length={max_length}; raise --max-length")
    info = {"label_words": None, **info, "n_truncated": fit.n_truncated, "n_dropped": fit.n_dropped}
    return Dataset.from_dict(cols), info


# ----------------------------------------------------------------------------- batching

class PadCollator:
    """Dynamic per-batch padding to torch tensors.

    Causal: labels are aligned with input_ids and padded the same way. Seq2seq (labels of their
    own length): labels are right-padded on their own, since the decoder reads them left to right.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None, label_pad: int = -100,
                 padding_side: str | None = None, is_encoder_decoder: bool | None = None):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.pad_id, self.multiple, self.label_pad = pad, pad_to_multiple_of, label_pad
        self.side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
        if self.side not in ("left", "right"):
            raise DataError(f"padding_side must be 'left' or 'right', got {self.side!r}")
        self.is_encoder_decoder = is_encoder_decoder

    def _len(self, n: int) -> int:
        m = self.multiple
        return n if not m else (n + m - 1) // m * m

    def _pad(self, seqs, value, side):
        n = self._len(max(len(s) for s in seqs))
        rows = [([value] * (n - len(s)) + list(s)) if side == "left" else (list(s) + [value] * (n - len(s)))
                for s in seqs]
        return torch.tensor(rows, dtype=torch.long)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        mask = [f.get("attention_mask") or [1] * len(f["input_ids"]) for f in features]
        batch = {"input_ids": self._pad(ids, self.pad_id, self.side), "attention_mask": self._pad(mask, 0, self.side)}
        if "labels" in features[0] and isinstance(features[0]["labels"], int):  # class indices (encoder classifier)
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        elif "labels" in features[0]:
            labels = [f["labels"] for f in features]
            seq2seq = self.is_encoder_decoder
            if seq2seq is None:
                seq2seq = any(len(l) != len(i) for l, i in zip(labels, ids))
            batch["labels"] = self._pad(labels, self.label_pad, "right" if seq2seq else self.side)
        return batch


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           mega_batch_mult: int = 50) -> list[list[int]]:
    """Batches of similar length (less padding), in random order; like transformers' LengthGroupedSampler.

    Shuffle, cut into mega-batches of mega_batch_mult * batch_size, sort each by length (longest
    first), split into batches. The batch with the longest example goes first so OOM shows up at step 0.
    """
    idx = list(range(len(lengths)))
    random.Random(seed).shuffle(idx)
    mega = max(1, mega_batch_mult) * batch_size
    batches = []
    for s in range(0, len(idx), mega):
        chunk = sorted(idx[s : s + mega], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches
