"""Every `prefixtune <subcommand> --flag` shown in the READMEs' code blocks exists in the CLI.

The flags are read from the parsers at test time (train's are generated from the config dataclasses), so a
renamed or removed flag fails here instead of in a reader's terminal.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "README.zh-CN.md"]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
FENCE = re.compile(r"^```([\w.+-]*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]*\bprefixtune [^`\n]*)`")  # `prefixtune train --config ...` in the prose


def cli_flags() -> dict[str, set[str]]:
    """subcommand -> its option strings, from the parsers the CLI itself runs."""
    cli = importlib.import_module("prefixtune.cli.main")  # `prefixtune.cli.main` the attribute is the function
    info = importlib.import_module("prefixtune.cli.info")
    serve_cli = importlib.import_module("prefixtune.cli.serve")

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {name: set(p._option_string_actions) for name, p in sub.choices.items()}
    flags["info"] = set(info.build_parser()._option_string_actions)
    serve = argparse.ArgumentParser()
    serve_cli.add_serve_args(serve)
    flags["serve"] = set(serve._option_string_actions)
    return flags


def shell_lines(markdown: str) -> list[str]:
    """Lines of the shell code blocks (continuations joined), then inline code spans that run prefixtune."""
    lines = []
    for lang, body in FENCE.findall(markdown):
        if lang.lower() in SHELL_LANGS:
            lines += body.replace("\\\n", " ").splitlines()
    return lines + INLINE.findall(FENCE.sub("", markdown))


def commands(markdown: str) -> list[tuple[str, list[str]]]:
    """(line, tokens after `prefixtune`) for each prefixtune command in the shell code."""
    found = []
    for line in shell_lines(markdown):
        try:
            tokens = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
        except ValueError:  # an unbalanced quote: not a command line
            continue
        segment: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", "||", "|", ";"):
                for i, t in enumerate(segment):  # `prefixtune ...`, `python -m prefixtune ...`
                    if t == "prefixtune" and (i == 0 or segment[i - 1] == "-m"):
                        found.append((line.strip(), segment[i + 1 :]))
                        break
                segment = []
            else:
                segment.append(tok)
    return found


def problems(markdown: str, flags: dict[str, set[str]]) -> list[str]:
    bad = []
    for line, args in commands(markdown):
        if not args or args[0] not in flags:
            bad.append(f"{line!r}: no subcommand {args[:1]} (have {sorted(flags)})")
            continue
        for a in args[1:]:
            if a.startswith("--") and a.split("=", 1)[0] not in flags[args[0]]:
                bad.append(f"{line!r}: `prefixtune {args[0]}` has no flag {a.split('=', 1)[0]}")
    return bad


@pytest.mark.parametrize("doc", DOCS)
def test_readme_commands_and_flags_exist(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    flags = cli_flags()
    found = commands(text)
    assert len(found) >= 5, f"{doc}: expected its prefixtune commands in ```bash blocks, found {found}"
    assert not problems(text, flags), "\n".join(problems(text, flags))


def test_the_check_catches_a_missing_flag_or_subcommand():
    flags = cli_flags()
    doc = "```bash\nprefixtune train --model m --no-such-flag 1  # comment --ignored\nprefixtune nosuch --x\n```\n"
    bad = problems(doc, flags)
    assert len(bad) == 2 and "--no-such-flag" in bad[0] and "nosuch" in bad[1], bad
    # python blocks are not shell, and other programs' flags on the same line are not ours
    assert not commands("```python\nprefixtune train --zzz\n```\n")
    assert commands("```bash\npip install -e . --quiet && prefixtune demo\n```\n") == [
        ("pip install -e . --quiet && prefixtune demo", ["demo"])
    ]


def test_readme_links_the_chinese_readme():
    head = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## ", 1)[0]
    assert "README.zh-CN.md" in head
