"""Structural limits and import cycles of the prefixtune package, with the standard library only (ast).

    python tools/structure.py [SRC_DIR]        # default: src/prefixtune next to this script's repository

Prints the largest module, function and class, every one over the limits (module 450 lines, function 80,
class 300), every import cycle among prefixtune's own modules, and every import that breaks the layering
(docs/architecture.md: core imports none of training/, serving/, cli/; training/ none of serving/, cli/); exits 1 if
anything is over, circular or out of its layer.
A cycle counts every import, also one inside a function (a late import hides a circle, it does not remove it)
and one by `importlib.import_module("...")` (a computed name counts every prefixtune module the file names in a string);
`if TYPE_CHECKING:` imports are left out (they never run). Line counts are physical lines, blank and comments
included (what `wc -l` and an editor show).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LIMITS = {"module": 450, "function": 80, "class": 300}
# package -> the prefixtune packages it must not import; "core" is every module outside the sub-packages
FORBIDDEN = {"core": ("training", "serving", "cli"), "training": ("serving", "cli")}
SUBPACKAGES = ("training", "serving", "cli")
# Top-level entries for notebooks (`import prefixtune.llamacpp as ptl`): a name for a serving backend, no code of their own.
ENTRIES = ("prefixtune.llamacpp", "prefixtune.vllm")


def layer(module: str) -> str:
    if module in ENTRIES:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "core"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sizes(tree: ast.Module, n_lines: int, name: str) -> list[tuple[str, str, int]]:
    """(kind, qualified name, lines) for the module and each function and class in it."""
    out = [("module", name, n_lines)]

    def walk(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                qual = f"{prefix}{child.name}"
                out.append((kind, f"{name}:{qual}", child.end_lineno - first + 1))
                walk(child, qual + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, name: str, is_package: bool, known: set[str]) -> set[str]:
    """prefixtune modules that module `name` imports anywhere in its body (top level or inside functions)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(mod: str) -> str | None:  # the longest known module named by `mod` (a.b.c -> a.b if c is a name)
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        return mod or None

    def visit(node) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for other in child.orelse:
                    visit(other)
                continue
            if _is_import_module(child):
                targets = _import_module_targets(child, package)
                visit(child)
            elif isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                targets = [f"{stem}.{a.name}" for a in child.names] + [stem]
            else:
                visit(child)
                continue
            for t in targets:
                hit = resolve(t)
                if hit and hit != name:
                    found.add(hit)
                    break  # `from . import x`: the first target names the submodule, the stem is the package

    visit(tree)
    if any(_is_import_module(n) and not _import_module_targets(n, package) for n in ast.walk(tree)):
        # A computed name (`import_module(HOOKS[cmd])`): every prefixtune module named by a string in this module
        # may be the one imported, so each counts.
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in known and n.value != name:
                found.add(n.value)
    return found


def _is_import_module(node) -> bool:
    """`importlib.import_module(...)` or a bare `import_module(...)` (from importlib import import_module)."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (isinstance(f, ast.Name) and f.id == "import_module")


def _import_module_targets(call: ast.Call, package: str) -> list[str]:
    """The module an `import_module` call names with a string: absolute, or relative to this package (".x" with
    package=__package__/__name__ or the package's own name); [] when the name is computed."""
    arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "name"), None)
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        return []
    target = arg.value
    if target.startswith("."):
        dots = len(target) - len(target.lstrip("."))
        base = package.split(".")
        base = base[: len(base) - dots + 1]
        target = ".".join(base + ([target.lstrip(".")] if target.lstrip(".") else []))
    return [target]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def one_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A concrete circle through the component's first module, for the message."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w not in prev:
                prev[w] = v
                todo.append(w)
    return comp


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "src" / "prefixtune"
    files = sorted(root.rglob("*.py"))
    trees = {}
    for f in files:
        text = f.read_text()
        trees[f] = (ast.parse(text, str(f)), len(text.splitlines()))
    names = {f: module_name(f, root) for f in files}
    known = set(names.values())
    rows = []
    graph: dict[str, set[str]] = {}
    for f, (tree, n) in trees.items():
        rows += sizes(tree, n, str(f.relative_to(root.parent)))
        graph[names[f]] = imports(tree, names[f], f.name == "__init__.py", known)
    bad = 0
    for kind, limit in LIMITS.items():
        mine = sorted((r for r in rows if r[0] == kind), key=lambda r: -r[2])
        if mine:
            print(f"largest {kind}: {mine[0][1]} ({mine[0][2]} lines; limit {limit})")
        for _, what, n in mine:
            if n > limit:
                print(f"  OVER: {what} {n} lines")
                bad += 1
    # a package's __init__ importing its own submodules is how packages work, not a circle
    for mod in graph:
        graph[mod] = {m for m in graph[mod] if not (mod and m.startswith(mod + ".") and mod in _packages(names))}
    for mod in sorted(graph):
        banned = FORBIDDEN.get(layer(mod), ())
        for dep in sorted(graph[mod]):
            if layer(dep) in banned and mod not in ("prefixtune", "prefixtune.__main__"):  # entry points: the public face
                print(f"layering: {mod} imports {dep} ({layer(mod)} must not import {layer(dep)}/)")
                bad += 1
    circles = cycles(graph)
    for comp in circles:
        print("import cycle: " + " -> ".join(one_path(graph, comp)) + f"  ({len(comp)} modules)")
    print("import cycles: none" if not circles else f"import cycles: {len(circles)}")
    return 1 if bad or circles else 0


def _packages(names: dict[Path, str]) -> set[str]:
    return {n for f, n in names.items() if f.name == "__init__.py"}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
