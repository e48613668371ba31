"""What a knowledge prefix is distilled on: the document as token windows, and the queries about it.

Layout (prefixtune/knowledge.py, recorded in the adapter so serving renders requests the same way). The document
is the system message of the model's chat template (raw text plus a blank line for models without one), so every
method sees the same tokens after its context:

    teacher:     [header + document]           [middle + query + footer] answer
    student:     [P trained key/values]        [middle + query + footer] answer
    no context:  []                            [middle + query + footer] answer
    truncated:   [first P tokens of the first] [middle + query + footer] answer

Several documents (several --context, or a directory of .txt/.md files) are joined, in the order given (a
directory's files by name), with a blank line between them, and distilled into one prefix.

Long documents. When header + document exceed `max_context` tokens (default: the model's position range less
room for a query and its answer) the document is cut into consecutive windows of at most that size, each with
its own header; a query's teacher sees one window: the window its self-study chunk came from, and for given
queries the window sharing the most distinct tokens with the query (a cheap lexical match). The student's one
prefix is trained on queries from every window.

Self-study (Cartridges, Eyuboglu et al. 2025, section 4). For each of `n` drafts (all seeded): a chunk of the
document (its size drawn between a quarter of `chunk_tokens` and `chunk_tokens`, its place uniform), a seed prompt
from one of the families of SEED_PROMPTS (the paper's five: facts, structure, summary, use case, creative; and
"answers"; the family first, by the weights of `families`, then a prompt in it), and the model writes one question
with only that chunk in view (temperature 0.7, at most `question_tokens` tokens, first line kept). "answers" asks
for a question whose answer is a span picked from the chunk (a number, or a capitalised name that does not open a
sentence; a chunk without one falls back to "facts"): a 135M model asked for "a question about a fact" mostly writes
vague or off-text questions, and a fact that no teacher answer states is not learnt (benchmarks/results/distill_*).
Exact duplicates (case and spaces folded) are dropped. Drafts are generated in batches (one `generate` per batch;
tokens/s in the log). With `turns=2`, the teacher's answer to each question is followed by a second question
written the same way on the conversation so far, and the student also learns the teacher's answer to it
(training/distill_run.py).
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import knowledge as K
from ..config import PrefixConfig
from .data import DataError

_ONLY = " Reply with the question only."
SEED_PROMPTS = {  # the paper's five families (its Appendix: seed prompts), reworded for a small instruct model
    "facts": ("Write one question about a specific fact stated in the text above.",
              "Write one question about a name, number, option or command in the text above."),
    "structure": ("Write one question about how the text above is organised: its parts and what each covers.",
                  "Write one question asking where in the text above a particular topic is described."),
    "summary": ("Write one question asking to summarise a part of the text above.",
                "Write one question asking to explain a part of the text above."),
    "use_case": ("Write one question a user of the text above would ask to get a task done.",
                 "Write one question asking how to do something the text above describes."),
    "creative": ("Write one unusual question that can only be answered with the details of the text above.",
                 "Write one question comparing two things the text above mentions."),
    "answers": ('Write one question about the text above whose answer is "{answer}".',),  # a span of the chunk
}
FOLLOW_UP = "Write one follow-up question to the conversation above about the same text." + _ONLY
# DistillConfig.families' default, written there too: distill_config cannot import this module (the parser loads it
# without the [train] extra) and this one importing it would close an import circle (validate() imports parse_families)
FAMILIES = "answers:3,facts,structure,summary,use_case,creative"
# a number (1987, 8:30, 1,450) or a capitalised name that does not open a sentence (Heron Cup, Old Mill Inn)
_SPAN = re.compile(r"\d[\d,.:]*\d|\d|(?<![.!?:\n]\s)(?<![.!?:\n])(?<!^)\b[A-Z][a-zA-Z]+(?:\s[A-Z][a-zA-Z]+)*")


def parse_families(spec: str) -> dict[str, float]:
    """"answers:3,facts,..." -> {family: weight}; a missing weight is 1. DataError naming --families on a bad one."""
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, w = part.partition(":")
        if name not in SEED_PROMPTS:
            raise DataError(f"--families {name!r}: use some of {', '.join(SEED_PROMPTS)} (weights as name:2)")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise DataError(f"--families {part!r}: the weight after ':' must be a number") from None
        if out[name] < 0:
            raise DataError(f"--families {part!r}: a weight must be 0 or more")
    if not out or not sum(out.values()) > 0:
        raise DataError("--families gives no family a weight above 0")
    return out


def answer_spans(text: str) -> list[str]:
    """The numbers and mid-sentence capitalised names in `text`, in order, without repeats."""
    return list(dict.fromkeys(m.group(0) for m in _SPAN.finditer(text)))


@dataclass
class Document:
    header: list[int]
    body: list[int]
    windows: list[tuple[int, int]]  # body token spans; a teacher sees header + body[start:end]
    layout: dict = field(default_factory=dict)  # knowledge.template_layout: what follows the document

    def window_ids(self, w: int) -> list[int]:
        start, end = self.windows[w]
        return self.header + self.body[start:end]

    @property
    def context_len(self) -> int:
        return len(self.header) + len(self.body)


def _read_one(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--context {p} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None


def read_context(paths) -> str:
    """The document(s): files and/or directories (their .txt/.md files, by name), joined by a blank line."""
    texts = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".txt", ".md"))
            if not files:
                raise DataError(f"--context {p} is a directory without .txt or .md files")
            texts += [_read_one(f) for f in files]
        elif p.is_file():
            texts.append(_read_one(p))
        else:
            raise DataError(f"--context {p}: file not found (give a text file, or a directory of .txt/.md files)")
    text = "\n\n".join(t.strip() for t in texts if t.strip())
    if not text:
        raise DataError(f"--context {', '.join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))} is "
                        "empty; give the document to distil")
    return text


def build_document(tokenizer, text: str, max_context: int) -> Document:
    layout = K.template_layout(tokenizer)
    header, body = K.encode(tokenizer, layout["header"]), K.encode(tokenizer, text)
    width = max_context - len(header)
    if width < 16:
        raise DataError(f"max context {max_context} tokens leaves no room for the document after the template")
    windows = [(s, min(s + width, len(body))) for s in range(0, len(body), width)]
    return Document(header, body, windows, layout)


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
        ids = K.encode(tokenizer, q)
        out.append({"query": q, "query_ids": K.query_ids(tokenizer, q, doc.layout), "window": nearest_window(doc, ids),
                    "source": "given"})
    return out


def _sample_chunk(doc: Document, rng: random.Random, chunk_tokens: int) -> tuple[int, int, int]:
    """(window, start, end): a chunk of a sampled size inside one window; starts on a grid of half the size, so
    chunks repeat and their key/values are computed once."""
    w = rng.randrange(len(doc.windows))
    start, end = doc.windows[w]
    size = min(rng.randint(max(1, chunk_tokens // 4), chunk_tokens), end - start)
    step = max(1, size // 2)
    a = start + step * rng.randrange(max(1, (end - start - size) // step + 1))
    return w, a, min(a + size, end)


def _fold(q: str) -> str:
    return " ".join(q.lower().split())


class _Writer:
    """Writes questions with a document chunk in view: one temporary adapter per distinct chunk (its key/values
    computed once), batched sampling, tokens/s counted."""

    def __init__(self, model, tokenizer, doc: Document, question_tokens: int):
        self.model, self.tok, self.doc, self.question_tokens = model, tokenizer, doc, question_tokens
        self.names: dict[tuple[int, int], str] = {}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.tokens, self.seconds = 0, 0.0

    def adapter(self, a: int, b: int) -> str:
        if (a, b) not in self.names:
            self.names[(a, b)] = context_adapter(self.model, f"chunk-{len(self.names)}", self.doc.header + self.doc.body[a:b])
        return self.names[(a, b)]

    @torch.no_grad()
    def write(self, prompts: list[list[int]], chunks: list[tuple[int, int]]) -> list[str]:
        t0 = time.perf_counter()
        ids, mask = left_pad(prompts, self.pad)
        gen = self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                  adapter_names=[self.adapter(a, b) for a, b in chunks], do_sample=True,
                                  temperature=0.7, top_p=0.95, max_new_tokens=self.question_tokens, pad_token_id=self.pad)
        new = gen[:, ids.shape[1]:]
        self.tokens += int((new != self.pad).sum())
        self.seconds += time.perf_counter() - t0
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        return [next((line.strip() for line in t.splitlines() if line.strip()), "") for t in texts]

    def rate(self) -> str:
        return f"{self.tokens} tokens in {self.seconds:.1f}s, {self.tokens / max(self.seconds, 1e-9):.0f} tokens/s"

    def close(self) -> None:
        for name in self.names.values():
            self.model.delete_adapter(name)


def _plan(doc: Document, tokenizer, rng: random.Random, chunk_tokens: int, weights: dict[str, float]) -> tuple:
    """One draft: ((window, start, end), family, prompt index, seed prompt text)."""
    chunk = _sample_chunk(doc, rng, chunk_tokens)
    fam = rng.choices(list(weights), weights=list(weights.values()))[0]
    if fam == "answers":
        spans = answer_spans(tokenizer.decode(doc.body[chunk[1] : chunk[2]]))
        if spans:
            return chunk, fam, 0, SEED_PROMPTS[fam][0].format(answer=rng.choice(spans))
        fam = "facts"  # nothing to ask for in this chunk
    k = rng.randrange(len(SEED_PROMPTS[fam]))
    return chunk, fam, k, SEED_PROMPTS[fam][k]


def self_study(model, tokenizer, doc: Document, n: int, *, seed: int = 0, chunk_tokens: int = 256,
               question_tokens: int = 40, batch_size: int = 16, families: str = FAMILIES, say=print,
               progress: bool = True) -> list[dict]:
    """`n` seeded drafts -> the distinct questions, each written by `model` (a PrefixModel) with one sampled chunk of
    the document in view and a seed prompt from a family sampled by the weights of `families`."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    weights = parse_families(families)
    plans = [_plan(doc, tokenizer, rng, chunk_tokens, weights) for _ in range(n)]
    writer = _Writer(model, tokenizer, doc, question_tokens)
    seen, out = set(), []
    torch.manual_seed(seed)
    try:
        for s in tqdm(range(0, n, batch_size), desc="self-study", disable=not progress, dynamic_ncols=True):
            part = plans[s : s + batch_size]
            prompts = [K.query_ids(tokenizer, text + _ONLY, doc.layout) for _, _, _, text in part]
            for ((w, a, b), f, k, _), q in zip(part, writer.write(prompts, [(a, b) for (_, a, b), _, _, _ in part])):
                if len(q) < 8 or _fold(q) in seen:
                    continue
                seen.add(_fold(q))
                out.append({"query": q, "query_ids": K.query_ids(tokenizer, q, doc.layout), "window": w, "chunk": [a, b],
                            "family": f, "seed_prompt": k, "source": "self_study"})
    finally:
        writer.close()
    counts = ", ".join(f"{f} {sum(e['family'] == f for e in out)}" for f in SEED_PROMPTS)
    say(f"self-study: {len(out)} distinct questions from {n} drafts (seed {seed}; chunks of {max(1, chunk_tokens // 4)}-"
        f"{chunk_tokens} tokens, {len(writer.names)} distinct; families "
        f"{counts}); {writer.rate()}")
    return out


def follow_ups(model, tokenizer, doc: Document, first: list[dict], *, seed: int = 0, question_tokens: int = 40,
               batch_size: int = 16, say=print) -> list[dict]:
    """Second turns: for each answered self-study question, a follow-up question written with its chunk and the
    conversation so far in view; -> examples whose query is the whole conversation (in the trained layout)."""
    if doc.layout.get("between") is None:
        say("self-study: no second turns: this chat template renders later turns otherwise than the first")
        return []
    writer, seen, out = _Writer(model, tokenizer, doc, question_tokens), set(), []
    rows = [e for e in first if e.get("chunk")]
    torch.manual_seed(seed + 1)
    try:
        for s in range(0, len(rows), batch_size):
            part = rows[s : s + batch_size]
            convs = [[{"role": "user", "content": e["query"]}, {"role": "assistant", "content": e["answer"]}] for e in part]
            prompts = [K.chat_ids(tokenizer, c + [{"role": "user", "content": FOLLOW_UP}], doc.layout) for c in convs]
            for e, conv, q in zip(part, convs, writer.write(prompts, [tuple(e["chunk"]) for e in part])):
                key = (_fold(e["query"]), _fold(q))
                if len(q) < 8 or key in seen:
                    continue
                seen.add(key)
                msgs = conv + [{"role": "user", "content": q}]
                out.append({"query": q, "messages": msgs, "query_ids": K.chat_ids(tokenizer, msgs, doc.layout),
                            "window": e["window"], "chunk": e["chunk"], "family": e.get("family"),
                            "source": "self_study_turn2"})
    finally:
        writer.close()
    say(f"self-study: {len(out)} second turns from {len(rows)} conversations; {writer.rate()}")
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
