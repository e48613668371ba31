"""--adapter / --best and the task.json a training run saves: shared by the subcommands that run an adapter
(cli/main.py's eval and generate, cli/distill.py's), so none of them imports another's module."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_task_info(adapter: str | None) -> dict:
    """task.json saved next to (or inside) the adapter by `train`; {} if there is none (e.g. a peft adapter)."""
    if not adapter:
        return {}
    for p in (Path(adapter) / "task.json", Path(adapter).parent / "task.json"):
        if p.is_file():
            return json.loads(p.read_text())
    return {}


ADAPTER_HELP = ("adapter directory, or the run directory `train --output` wrote (its final adapter/; --best for "
                "best/) (default: none, the bare base model)")


def add_adapter_args(p) -> None:
    p.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    p.add_argument("--best", action="store_true", help="with a run directory as --adapter: use its best/ adapter "
                   "(best eval score) instead of the final one (default: the final adapter)")


def resolve_adapter(args) -> str | None:
    """--adapter (an adapter or a run directory) -> the adapter directory; says which one when it chose."""
    from ..adapter_io import resolve_adapter_dir

    if not args.adapter:
        if args.best:
            from ..config import ConfigError

            raise ConfigError("--best needs --adapter RUN_DIR (the directory `train --output` wrote)")
        return None
    path, note = resolve_adapter_dir(args.adapter, best=args.best)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return str(path)
