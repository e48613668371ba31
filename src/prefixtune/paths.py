"""Checks on the paths a command is given, before any work: one ConfigError naming the flag, the path and the fix.

The mistakes they catch: a file where a directory is needed and the reverse, a missing or empty directory, an
output under an existing file, an output where nothing can be written.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError


class PathError(ConfigError):
    """A path given on the command line (or in a recipe) cannot be used as asked."""


def writable_dir(path: str | Path, flag: str) -> Path:
    """A directory to write into, existing or to be created: not a file, not under a file, writable."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise PathError(f"{flag} {path} is a file; pass a directory (a new or empty one)")
    parent = p
    while not parent.exists():  # the nearest part of the path that exists decides whether it can be created
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise PathError(f"{flag} {path}: {parent} is a file, so no directory can be made under it; pass a path "
                        "under a directory")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise PathError(f"{flag} {path}: cannot write in {parent} (permission denied); pass a directory you can write to")
    return p


def existing_dir(path: str | Path, flag: str, holds: str = "", nonempty: bool = False) -> Path:
    """A directory to read: it exists, is a directory (`holds`: what it should contain, for the message)."""
    p = Path(path).expanduser()
    what = f"a directory{' of ' + holds if holds else ''}"
    if not p.exists():
        raise PathError(f"{flag} {path} does not exist; pass {what}")
    if not p.is_dir():
        raise PathError(f"{flag} {path} is a file; pass {what}")
    if nonempty and not any(p.iterdir()):
        raise PathError(f"{flag} {path} is empty; pass {what}")
    return p


def existing_file(path: str | Path, flag: str, what: str = "a file") -> Path:
    """A file to read: it exists and is not a directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PathError(f"{flag} {path} does not exist; check the path")
    if p.is_dir():
        raise PathError(f"{flag} {path} is a directory; pass {what}")
    return p
