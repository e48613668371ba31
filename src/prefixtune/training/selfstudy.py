"""What a knowledge prefix is distilled on: the document as token windows, and the queries about it.

Layout. The document is the system message of the model's chat template (raw text plus a blank line for
models without one), so every method sees the same tokens after its context:

    teacher:     [header + document]           [middle + query + footer] answer
    student:     [P trained key/values]        [middle + query + footer] answer
    no context:  []                            [middle + query + footer] answer
    truncated:   [first P tokens of the first] [middle + query + footer] answer

`header` is what the template puts before the system text, `middle` what lies between the system text and the
user's query, `footer` what follows the query up to the answer.

Long documents. When header + document exceed `max_context` tokens (default: the model's position range less
room for a query and its answer) the document is cut into consecutive windows of at most that size, each with
its own header; a query's teacher sees one window: the window its self-study chunk came from, and for given
queries the window sharing the most distinct tokens with the query (a cheap lexical match). The student's one
prefix is trained on queries from every window.

Self-study (Cartridges, Eyuboglu et al. 2025). For each of `n` questions (seeded): pick a chunk of
`chunk_tokens` document tokens uniformly, pick one of `SEED_PROMPTS`, and let the model write one question with
only that chunk in view (sampling at temperature 0.7, at most `question_tokens` tokens, first line kept,
duplicates dropped). The teacher answers afterwards with its whole window in view (training.distill).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PrefixConfig
from .data import DataError

SEED_PROMPTS = (
    "Write one question about a specific fact stated in the text above. Reply with the question only.",
    "Write one question asking how to do something the text above describes. Reply with the question only.",
    "Write one question asking to explain a part of the text above. Reply with the question only.",
    "Write one question about a name, number, option or command in the text above. Reply with the question only.",
)
_DOC, _QUERY = "QQDOCUMENTQQ", "QQQUERYQQ"  # sentinels that locate the slots in the rendered chat template


@dataclass
class Document:
    header: list[int]
    body: list[int]
    middle: list[int]
    footer: list[int]
    windows: list[tuple[int, int]]  # body token spans; a teacher sees header + body[start:end]

    def window_ids(self, w: int) -> list[int]:
        start, end = self.windows[w]
        return self.header + self.body[start:end]

    def query_ids(self, query: list[int]) -> list[int]:
        return self.middle + query + self.footer

    @property
    def context_len(self) -> int:
        return len(self.header) + len(self.body)


def _template_parts(tokenizer) -> tuple[str, str, str]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _DOC}, {"role": "user", "content": _QUERY}],
            tokenize=False, add_generation_prompt=True,
        )
        if text.count(_DOC) == 1 and text.count(_QUERY) == 1 and text.index(_DOC) < text.index(_QUERY):
            header, rest = text.split(_DOC)
            middle, footer = rest.split(_QUERY)
            return header, middle, footer
    return "", "\n\nQuestion: ", "\nAnswer:"


def read_context(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--context {p}: file not found (give a text file holding the document)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--context {p} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
    if not text.strip():
        raise DataError(f"--context {p} is empty; give the document to distil")
    return text


def build_document(tokenizer, text: str, max_context: int) -> Document:
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    header, middle, footer = (enc(s) for s in _template_parts(tokenizer))
    body = enc(text)
    width = max_context - len(header)
    if width < 16:
        raise DataError(f"max context {max_context} tokens leaves no room for the document after the template")
    windows = [(s, min(s + width, len(body))) for s in range(0, len(body), width)]
    return Document(header, body, middle, footer, windows)


def read_queries(path) -> list[str]:
    """A text file (one query per line) or JSONL (field query, question, text or prompt)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--queries {p}: file not found (a text file, one query per line, or JSONL)")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix in (".jsonl", ".json"):
        out = []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"--queries {p} line {i} is not JSON; use JSONL or a .txt file") from None
            q = next((row[k] for k in ("query", "question", "text", "prompt") if isinstance(row, dict) and k in row), None)
            if not isinstance(q, str):
                raise DataError(f"--queries {p} line {i}: no 'query' (or question/text/prompt) string field")
            out.append(q)
        lines = out
    if not lines:
        raise DataError(f"--queries {p} has no queries")
    return [q.strip() for q in lines]


def nearest_window(doc: Document, query_ids: list[int]) -> int:
    """The window sharing the most distinct tokens with the query (ties: the first)."""
    if len(doc.windows) == 1:
        return 0
    q = set(query_ids)
    return max(range(len(doc.windows)), key=lambda w: (len(q & set(doc.body[slice(*doc.windows[w])])), -w))


def given_examples(tokenizer, doc: Document, queries: list[str]) -> list[dict]:
    out = []
    for q in queries:
        ids = tokenizer(q, add_special_tokens=False)["input_ids"]
        out.append({"query": q, "query_ids": doc.query_ids(ids), "window": nearest_window(doc, ids), "source": "given"})
    return out


def _chunks(doc: Document, chunk_tokens: int) -> list[tuple[int, int, int]]:
    """(window, start, end) chunks that never straddle two windows."""
    return [(w, s, min(s + chunk_tokens, end)) for w, (start, end) in enumerate(doc.windows)
            for s in range(start, end, chunk_tokens)]


@torch.no_grad()
def self_study(model, tokenizer, doc: Document, n: int, *, seed: int = 0, chunk_tokens: int = 256,
               question_tokens: int = 40, batch_size: int = 16, say=print, progress: bool = True) -> list[dict]:
    """`n` seeded questions, each written by `model` (a PrefixModel; its base model) with one chunk of the document
    in view. Each chunk's key/values (header + chunk) are computed once, as a temporary adapter, and reused for
    every question about it: only the seed prompt and the question run per question."""
    from tqdm.auto import tqdm


    rng = random.Random(seed)
    chunks = _chunks(doc, chunk_tokens)
    names = [context_adapter(model, f"chunk-{i}", doc.header + doc.body[a:b]) for i, (_, a, b) in enumerate(chunks)]
    plans = [(rng.choice(chunks), rng.randrange(len(SEED_PROMPTS))) for _ in range(n)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seen, out = set(), []
    torch.manual_seed(seed)
    for s in tqdm(range(0, n, batch_size), desc="self-study", disable=not progress, dynamic_ncols=True):
        part = plans[s : s + batch_size]
        prompts = [doc.query_ids(tokenizer(SEED_PROMPTS[k], add_special_tokens=False)["input_ids"]) for _, k in part]
        ids, mask = left_pad(prompts, pad)
        gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             adapter_names=[names[chunks.index(c)] for c, _ in part], do_sample=True,
                             temperature=0.7, top_p=0.95, max_new_tokens=question_tokens,
                             pad_token_id=pad)
        for ((w, a, b), k), text in zip(part, tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)):
            q = next((line.strip() for line in text.splitlines() if line.strip()), "")
            if len(q) < 8 or q in seen:
                continue
            seen.add(q)
            qids = tokenizer(q, add_special_tokens=False)["input_ids"]
            out.append({"query": q, "query_ids": doc.query_ids(qids), "window": w, "chunk": [a, b],
                        "seed_prompt": k, "source": "self_study"})
    for name in names:
        model.delete_adapter(name)
    say(f"self-study: {len(out)} distinct questions from {n} drafts (seed {seed}; chunks of {chunk_tokens} tokens, "
        f"{len(chunks)} chunks; questions up to {question_tokens} tokens, mean "
        f"{sum(len(e['query_ids']) for e in out) / max(len(out), 1):.0f} with the template)")
    return out


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def context_adapter(model, name: str, ids: list[int]) -> str:
    """A frozen adapter holding the model's own key/values for `ids` (one forward): the context as a prefix."""
    if name in model.prefixes:
        model.delete_adapter(name)
    cfg = PrefixConfig(num_virtual_tokens=len(ids), init="text", init_text="(context)", layer_scale=False,
                       extra={"init_token_ids": list(ids)})
    model.add_adapter(name, cfg)
    model.prefixes[name].requires_grad_(False)
    return name
