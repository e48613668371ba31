"""The tutorials in docs/tutorials/ run as written: every code block, in order, in a scratch directory.

How the real models and data are swapped for offline ones (the pages say so too): the scratch directory holds
local directories with the names the pages use (`t5-large`, `Langboat/bloom-1b4-zh`, `financial_phrasebank`,
`data/alpaca_data_zh`), holding tiny random models and a few records in the real datasets' shapes; a local
directory wins over a Hub id of the same name, so the blocks run unchanged. The only edits: `pip install` lines
are not run (the suite's environment has the extras), `prefixtune serve` runs in the background on a free port,
and the clients' `127.0.0.1:8000` becomes that port. `prefixtune` is this interpreter's `python -m prefixtune`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import SPECIAL_TOKENS, free_port, make

import prefixtune

ROOT = Path(__file__).resolve().parents[1]
SRC, TESTS = Path(prefixtune.__file__).parents[1], Path(__file__).parent
FENCE = re.compile(r"^```([\w.+-]*)[^\n]*\n(.*?)^```", re.M | re.S)

FPB = {  # Financial PhraseBank's shape: sentence + ClassLabel(negative, neutral, positive)
    "negative": ["profit fell sharply", "the company's net sales fell by 5 %", "the company reported a loss",
                 "shares fell", "costs rose and margins fell"],
    "neutral": ["the company is based in helsinki", "the report is due in may", "the board met today",
                "the firm has offices in espoo", "the meeting is in june"],
    "positive": ["operating profit rose to eur 13.1 mn", "sales grew strongly", "the company reported record profit",
                 "shares rose", "orders increased"],
}
ALPACA_ZH = [  # Alpaca records, Chinese: instruction, input (may be empty), output
    {"instruction": "介绍一下北京", "input": "", "output": "北京是中国的首都。"},
    {"instruction": "把这句话翻译成英文", "input": "你好", "output": "Hello"},
    {"instruction": "用一句话解释什么是前缀微调", "input": "", "output": "只训练注意力前面的前缀向量。"},
    {"instruction": "写一个数字", "input": "一到十", "output": "五"},
]


def word_tokenizer(vocab_words: list[str], char_level: bool):
    """Word-level (or character-level) tokenizer over exactly these words, with the tiny models' special ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIAL_TOKENS) + sorted(set(vocab_words) - set(SPECIAL_TOKENS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    split = pre_tokenizers.Split(Regex(r"\S"), "isolated") if char_level else pre_tokenizers.Whitespace()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), split])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>",
                                   pad_token="<pad>"), len(vocab)


def save_model(kind: str, directory: Path, text: str, char_level: bool) -> None:
    words = list(text) if char_level else re.findall(r"\w+|[^\w\s]+", text)
    tokenizer, n = word_tokenizer(words, char_level)
    make(kind, vocab=n).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def scratch_t5(tmp: Path, page: str) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    names = list(FPB)
    rows = [{"sentence": s, "label": names.index(label)} for label, ss in FPB.items() for s in ss] * 3
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=names)})
    DatasetDict({"train": Dataset.from_list(rows, features=features)}).save_to_disk(str(tmp / "financial_phrasebank"))
    save_model("t5", tmp / "t5-large", " ".join(s for ss in FPB.values() for s in ss) + " " + " ".join(names) + page,
               char_level=False)


def scratch_bloom(tmp: Path, page: str) -> None:
    from datasets import Dataset

    Dataset.from_list(ALPACA_ZH * 10).save_to_disk(str(tmp / "data" / "alpaca_data_zh"))
    text = "".join(r["instruction"] + r["input"] + r["output"] for r in ALPACA_ZH) + "Human: Assistant:" + page
    save_model("bloom", tmp / "Langboat" / "bloom-1b4-zh", text, char_level=True)


TUTORIALS = {"t5-financial": scratch_t5, "bloom-alpaca-zh": scratch_bloom}
# what the pages' Python blocks must have printed: the data as described, the run's metrics, the served adapter's name
PRINTED = {"t5-financial": ["['negative', 'neutral', 'positive']", "accuracy ", "held-out sentences", "'fpb-t5'"],
           "bloom-alpaca-zh": ["'instruction': '介绍一下北京'"]}


def shell_commands(body: str) -> list[str]:
    return [l.strip() for l in body.replace("\\\n", " ").splitlines() if l.strip() and not l.strip().startswith("#")]


def wait_healthy(server: subprocess.Popen, port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited ({server.returncode}): {server.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the server did not come up")


@pytest.mark.parametrize("name", list(TUTORIALS))
def test_tutorial_runs_as_written(name, tmp_path):
    page = (ROOT / "docs" / "tutorials" / f"{name}.md").read_text(encoding="utf-8")
    TUTORIALS[name](tmp_path, page)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")  # the recipes the pages name
    (tmp_path / "bin").mkdir()
    shim = tmp_path / "bin" / "prefixtune"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m prefixtune "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(SRC),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port, server, ran = free_port(), None, []
    try:
        for lang, body in FENCE.findall(page):
            if lang == "python":
                body = body.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
                r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=600)
                assert r.returncode == 0, f"python block failed:\n{body}\n{r.stderr[-3000:]}"
                ran.append(("python", r.stdout))
                continue
            for command in shell_commands(body):
                if command.startswith("pip install"):
                    continue
                if command.startswith("prefixtune serve"):
                    server = subprocess.Popen(command.split() + ["--port", str(port)], cwd=tmp_path, env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    wait_healthy(server, port)
                    ran.append(("serve", command))
                    continue
                r = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=600)
                assert r.returncode == 0, f"`{command}` failed:\n{r.stderr[-3000:]}"
                ran.append(("bash", command))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    printed = "".join(out for kind, out in ran if kind == "python")
    assert all(s in printed for s in PRINTED[name]), (PRINTED[name], printed)
    kinds = [k for k, _ in ran]
    assert kinds.count("python") >= 3 and "serve" in kinds and kinds.count("bash") >= 2, ran
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").glob("*/adapter/adapter_config.json"))


def test_readme_python_runs_as_written(tmp_path):
    """The README's Python example, run unchanged where `HuggingFaceTB/SmolLM2-135M-Instruct` is a local directory
    holding a tiny random Llama (as above: a local directory wins over the Hub id)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = next(body for lang, body in FENCE.findall(readme) if lang == "python" and "pt.attach" in body)
    save_model("llama", tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct", code, char_level=False)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file() and r.stdout.strip()
