"""The `prefixtune` command line: main (train/eval/generate and dispatch), info, demo, assets."""

from .main import main

__all__ = ["main"]
