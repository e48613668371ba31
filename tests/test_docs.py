"""Every `prefixtune <subcommand> --flag` shown in the READMEs' and the docs site's code blocks exists in the CLI.

The flags are read from the parsers at test time (train's are generated from the config dataclasses), so a
renamed or removed flag fails here instead of in a reader's terminal.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ["README.md", "README.zh-CN.md"]
# every page of the site (mkdocs.yml: docs/, and the benchmark journal it includes)
DOCS = READMES + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")) + ["benchmarks/README.md"]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
FENCE = re.compile(r"^```([\w.+-]*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]*\bprefixtune [^`\n]*)`")  # `prefixtune train --config ...` in the prose


def cli_flags() -> dict[str, set[str]]:
    """subcommand -> its option strings, from the parsers the CLI itself runs (train's, eval's and distill's are
    generated from the config dataclasses)."""
    from prefixtune.cli.main import all_parsers

    flags: dict[str, set[str]] = {}
    for command, parser in all_parsers().items():
        flags.setdefault(command.split()[0], set()).update(parser._option_string_actions)
    return flags


def shell_lines(markdown: str) -> list[str]:
    """Lines of the shell code blocks (continuations joined), then inline code spans that run prefixtune."""
    lines = []
    for lang, body in FENCE.findall(markdown):
        if lang.lower() in SHELL_LANGS:
            lines += body.replace("\\\n", " ").splitlines()
    quoted_errors = re.compile(r"\bprefixtune [\w-]+: error:")  # `prefixtune serve: error: ...` quotes a message
    return lines + [s for s in INLINE.findall(FENCE.sub("", markdown)) if not quoted_errors.search(s)]


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


@pytest.fixture(scope="module")
def flags() -> dict[str, set[str]]:
    return cli_flags()


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_and_flags_exist(doc, flags):
    text = (ROOT / doc).read_text(encoding="utf-8")
    if doc in READMES:
        found = commands(text)
        assert len(found) >= 3, f"{doc}: expected its prefixtune commands in ```bash blocks, found {found}"
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


def _cli_reference():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REGENERATE = "docs/cli.md is generated: run `python tools/cli_reference.py` and commit docs/cli.md"


def test_cli_reference_lists_every_flag_of_every_command():
    from prefixtune.cli.main import all_parsers

    ref = _cli_reference()
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    generated = page.split(ref.BEGIN, 1)[-1].split(ref.END, 1)[0]
    missing = []
    for command, parser in all_parsers().items():
        if f"### prefixtune {command}\n" not in generated:
            missing.append(f"the command `prefixtune {command}`")
        section = generated.split(f"### prefixtune {command}\n", 1)[-1].split("\n### ", 1)[0]
        missing += [f"`prefixtune {command} {flag}`" for flag in parser._option_string_actions
                    if flag not in ("-h", "--help") and f"`{flag}`" not in section]
    assert not missing, f"{REGENERATE}; missing: {', '.join(missing)}"


def test_cli_reference_is_what_the_script_writes():
    ref = _cli_reference()
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert ref.render(page) == page, REGENERATE


# The demo's accuracy curve, committed by the lead after the demo's real run on the final main (README's picture).


@pytest.mark.parametrize("doc", READMES)
def test_readme_is_short_and_its_links_resolve(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150, f"{doc}: {len(text.splitlines())} lines; the detail belongs in docs/"
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://", t)]
    assert len(targets) >= 10
    broken = [t for t in targets if t and not (ROOT / t).exists()]
    assert not broken, f"{doc} links to missing files: {broken}"
