"""A missing optional extra is one line on stderr naming its `pip install 'prefixtune[...]'`, exit status 2, no
traceback, for every command that needs one. Each case runs the real CLI in a fresh interpreter where the
extra's modules are blocked (`sys.modules[name] = None`: an import of them raises, as when they are absent)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import prefixtune
from prefixtune.extras import EXTRAS, extra_of

TESTS, SRC = Path(__file__).parent, Path(prefixtune.__file__).parents[1]
ROOT = SRC.parent


def run_blocked(argv: list[str], blocked: tuple[str, ...], tmp_path: Path) -> subprocess.CompletedProcess:
    """`prefixtune ARGV` with `blocked` unimportable."""
    code = f"""
import sys
sys.path[:0] = [{str(SRC)!r}, {str(TESTS)!r}]
for name in {list(blocked)!r}:
    sys.modules[name] = None
from prefixtune.cli.main import main
sys.exit(main({argv!r}))
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)


def _data(tmp_path: Path) -> str:
    from helpers import classify_rows, write_jsonl

    return str(write_jsonl(tmp_path / "train.jsonl", classify_rows(16)))


CASES = {  # name -> (argv, blocked modules, the extra the message must name)
    "serve": (["serve", "--model", "{model}"], ("uvicorn",), "serve"),
    "serve without fastapi": (["serve", "--model", "{model}"], ("fastapi",), "serve"),
    "serve --backend llamacpp": (["serve", "--backend", "llamacpp", "--model", "m.gguf"], ("llama_cpp",), "llamacpp"),
    "serve --backend vllm": (["serve", "--backend", "vllm", "--model", "{model}"], ("vllm",), "vllm"),
    "generate --backend llamacpp": (["generate", "--backend", "llamacpp", "--model", "{model}", "--prompt", "hi"],
                                    ("llama_cpp",), "llamacpp"),
    "train": (["train", "--model", "{model}", "--train", "DATA", "--task", "classify"], ("datasets",), "train"),
    "demo": (["demo", "--output", "d"], ("accelerate",), "train"),
    "train --report-to tensorboard": (["train", "--model", "{model}", "--train", "DATA", "--task", "classify",
                                       "--output", "o", "--report-to", "tensorboard"], ("tensorboard",), "tensorboard"),
    "train --model x.gguf": (["train", "--model", "m.gguf", "--train", "DATA", "--task", "classify", "--output", "o"],
                             ("gguf",), "gguf"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_missing_extra_is_one_line_with_the_pip_command(case, tmp_path):
    argv, blocked, extra = CASES[case]
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # a path that exists: the extra is checked before the file is read
    from helpers import model_dir

    values = {"DATA": _data(tmp_path), "{model}": str(model_dir(tmp_path))}  # a real tiny Llama and real data
    argv = [values.get(a, a) for a in argv]
    r = run_blocked(argv, blocked, tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    command = argv[0]
    assert lines[0].startswith(f"prefixtune {command}: error: "), lines[0]
    assert f"needs the [{extra}] extra (missing {blocked[0]})" in lines[0], lines[0]
    assert lines[0].endswith(f"pip install 'prefixtune[{extra}]'") or "(on CPUs" in lines[0], lines[0]
    if case == "serve":  # the README and docs quote this very line
        for doc in ("README.md", "README.zh-CN.md", "docs/getting-started.md", "docs/cli.md"):
            assert lines[0] in (ROOT / doc).read_text(encoding="utf-8"), doc


def test_a_stray_missing_module_still_names_its_extra(monkeypatch, capsys):
    """A path no explicit check covers: the CLI maps the ModuleNotFoundError's module to its extra."""
    from helpers import run_cli

    import prefixtune.cli.info as info

    def needs_wandb(argv):
        raise ModuleNotFoundError("No module named 'wandb'", name="wandb")

    monkeypatch.setattr(info, "main", needs_wandb)
    code, _, err = run_cli(["info", "x"], capsys)
    assert code == 2 and err.strip() == "prefixtune info: error: needs the [wandb] extra (missing wandb): " \
                                        "pip install 'prefixtune[wandb]'"

    def a_bug(argv):
        raise ModuleNotFoundError("No module named 'nonesuch'", name="nonesuch")

    monkeypatch.setattr(info, "main", a_bug)
    with pytest.raises(ModuleNotFoundError):  # not an extra: a bug, and its traceback is the report
        run_cli(["info", "x"], capsys)


def test_the_extras_table_matches_pyproject():
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    declared = re.findall(r"^([\w-]+) = \[", section, re.M)  # tomllib is Python 3.11+; the project supports 3.10
    assert set(EXTRAS) <= set(declared), set(EXTRAS) - set(declared)
    assert extra_of("llama_cpp.llama_cpp") == "llamacpp" and extra_of("torch") is None


def test_the_demo_hint_installs_serve_first_when_it_is_missing(monkeypatch, capsys, tmp_path):
    from prefixtune import extras
    from prefixtune.cli.demo import print_serve_hint

    monkeypatch.setattr(extras, "missing", lambda extra: ["uvicorn"] if extra == "serve" else [])
    print_serve_hint("m", tmp_path / "run" / "adapter", None)
    assert f"pip install 'prefixtune[serve]' && prefixtune serve --model m --adapters {tmp_path / 'run'}" in \
        capsys.readouterr().out
