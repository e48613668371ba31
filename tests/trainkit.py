"""Shared helpers for the train/eval/CLI tests: tiny model directories and tiny generated datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import tiny
from conftest import make_tokenizer

POS, NEG = "great good fine loved".split(), "bad awful hated".split()


def model_dir(tmp: Path, kind: str = "llama") -> Path:
    """save_pretrained of a tiny random model + the word-level test tokenizer (ids: pad 0, eos 2, bos 3)."""
    d = tmp / f"model-{kind}"
    if not d.exists():
        m = tiny.make(kind)
        m.config.eos_token_id = m.generation_config.eos_token_id = 2
        m.config.pad_token_id = m.generation_config.pad_token_id = 0
        m.save_pretrained(d)
        make_tokenizer().save_pretrained(d)
    return d


def classify_rows(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lab = rng.choice(["positive", "negative"])
        rows.append({"text": f"the movie was {rng.choice(POS if lab == 'positive' else NEG)} i think", "label": lab})
    return rows


def instruct_rows(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    nums = "one two three four five".split()
    return [{"instruction": "add two numbers", "input": f"{rng.choice(nums)} and {rng.choice(nums)}",
             "output": f"the sum is {rng.choice(nums)}"} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
