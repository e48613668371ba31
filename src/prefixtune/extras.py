"""The optional extras of pyproject.toml and the one-line error when something needs one that is not installed.

One table says which modules each extra brings; every command and library path that needs an extra asks `require`
before it imports (a missing package then reads `... needs the [serve] extra (missing uvicorn): pip install
'prefixtune[serve]'`, never a traceback), and the CLI maps a stray ModuleNotFoundError through `extra_of`.
"""

from __future__ import annotations

import importlib.util

from .config import ConfigError

# extra -> the top-level modules of it that prefixtune imports (import names: pyyaml is yaml, llama-cpp-python is
# llama_cpp). Keep in step with [project.optional-dependencies] in pyproject.toml (tests/test_extras.py checks).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("accelerate", "datasets", "pandas", "yaml", "tqdm", "matplotlib", "ftfy"),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "gguf": ("gguf",),
    "llamacpp": ("llama_cpp",),
    "vllm": ("vllm",),
    "peft": ("peft",),
    "quant": ("optimum.quanto",),
    "trl": ("trl",),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}


class MissingExtra(ConfigError):
    """Something needs an optional extra that is not installed; the message names the pip command."""


def install_command(extra: str) -> str:
    return f"pip install 'prefixtune[{extra}]'"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a module blocked in sys.modules
        return False


def missing(extra: str) -> list[str]:
    """The extra's modules that cannot be imported here."""
    return [m for m in EXTRAS[extra] if not _installed(m)]


def require(extra: str, what: str, note: str = "") -> None:
    """Raise MissingExtra naming `what` (e.g. "--backend llamacpp"; "" where the caller says it), the missing
    modules and the pip command."""
    gone = missing(extra)
    if gone:
        raise MissingExtra(f"{what + ' ' if what else ''}needs the [{extra}] extra (missing {', '.join(gone)}): {install_command(extra)}"
                           + (f" {note}" if note else ""))


def extra_of(module: str | None) -> str | None:
    """The extra that provides `module` (a dotted name is looked up by its top level), or None."""
    top = (module or "").split(".")[0]
    return next((extra for extra, mods in EXTRAS.items() if top in mods), None)
