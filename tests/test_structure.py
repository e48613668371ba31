"""tools/structure.py: size limits, import cycles (late imports included) and layering, on made-up packages and on
the real tree (outside serving/, whose split is its own issue)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("structure", ROOT / "tools" / "structure.py")
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)


def _package(tmp_path, files: dict) -> Path:
    root = tmp_path / "prefixtune"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_late_import_circle_is_found_and_fails(tmp_path, capsys):
    root = _package(tmp_path, {"a.py": "from . import b\n", "b.py": "def f():\n    from .c import x\n",
                               "c.py": "from .a import y\n", "d.py": "from .a import y\n"})
    assert S.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert "import cycle: prefixtune.a -> prefixtune.b -> prefixtune.c -> prefixtune.a  (3 modules)" in out
    assert "prefixtune.d" not in out  # it imports the circle but is not in it


def test_limits_and_layering(tmp_path, capsys):
    long_fn = "def f():\n" + "    x = 1\n" * 81
    root = _package(tmp_path, {"big.py": long_fn, "training/__init__.py": "", "training/loop.py": "from ..cli import main\n",
                               "cli/__init__.py": "", "cli/main.py": "from ..training import loop\n",
                               "ok.py": "def g():\n    return 1\n"})
    assert S.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert "OVER: prefixtune/big.py:f 82 lines" in out
    assert "layering: prefixtune.training.loop imports prefixtune.cli" in out
    assert "cli.main imports" not in out  # cli may import training
    clean = _package(tmp_path / "clean", {"ok.py": "import os\n\n\ndef g():\n    return os.sep\n"})
    assert S.main([str(clean)]) == 0


def test_the_tree_outside_serving_keeps_the_limits_and_has_no_circle():
    root = ROOT / "src" / "prefixtune"
    rows, graph, names = [], {}, {}
    files = sorted(root.rglob("*.py"))
    names = {f: S.module_name(f, root) for f in files}
    for f in files:
        tree = S.ast.parse(f.read_text())
        rows += S.sizes(tree, len(f.read_text().splitlines()), names[f])
        graph[names[f]] = S.imports(tree, names[f], f.name == "__init__.py", set(names.values()))
    over = [r for r in rows if r[2] > S.LIMITS[r[0]] and ".serving" not in r[1]]
    assert not over
    assert S.cycles(graph) == []


def test_import_module_strings_count_as_imports(tmp_path, capsys):
    """`importlib.import_module("...")`, relative or absolute, closes a circle as an import statement would; a
    computed name counts every prefixtune module the file names in a string."""
    root = _package(tmp_path, {
        "a.py": "import importlib\n\n\ndef f():\n    return importlib.import_module('prefixtune.b')\n",
        "b.py": "from importlib import import_module\n\n\ndef g():\n    return import_module('.c', __package__)\n",
        "c.py": "from . import a\n",
        "d.py": "import importlib\nHOOKS = {'x': 'prefixtune.e'}\n\n\ndef h(k):\n    return importlib.import_module(HOOKS[k])\n",
        "e.py": "from .d import HOOKS\n",
        "f.py": "import importlib\nNOTE = 'prefixtune.a'\n\n\ndef k():\n    return importlib.import_module('json')\n",
    })
    assert S.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert "import cycle: prefixtune.a -> prefixtune.b -> prefixtune.c -> prefixtune.a  (3 modules)" in out
    assert "import cycle: prefixtune.d -> prefixtune.e -> prefixtune.d  (2 modules)" in out
    assert "prefixtune.f" not in out  # a string naming a module is no import when every import_module is literal
    tree = S.ast.parse((root / "f.py").read_text())
    assert S.imports(tree, "prefixtune.f", False, {"prefixtune.a", "prefixtune.f"}) == set()
