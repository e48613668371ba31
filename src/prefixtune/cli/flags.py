"""Command-line flags generated from the config dataclasses: one source of truth for names, types, help, defaults.

Each field of TrainConfig (and of its nested PrefixConfig) becomes a `prefixtune train` flag `--field-name`, each of
EvalConfig's a `prefixtune eval` flag, in the argparse group named by its metadata["group"], with metadata["help"]
and the dataclass default in the help text. Fields marked metadata["internal"] get no flag. Every flag's argparse
default is None, so only the flags actually given override a --config recipe (TrainConfig.from_sources) or the
dataclass default (EvalConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from ..config import PrefixConfig
from ..training.config import TASK_DEFAULTS, TrainConfig

GROUPS = {  # metadata["group"] -> argparse group title, in --help order
    "data": "data",
    "prefix": "prefix (PrefixConfig; recipe keys flat or under `prefix:`)",
    "student": "the prefix (the student)",
    "optimisation": "optimisation",
    "evaluation": "evaluation",
    "output": "output",
    "eval": "evaluation",
}


def comma_list(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def _moved_check(moved: dict[str, str]):
    """A --task type that stops on a value which became a command of its own, with the pointer as the one line."""
    def check(text: str) -> str:
        if text in moved:
            raise argparse.ArgumentTypeError(moved[text])
        return text
    return check


def _default_text(f: dataclasses.Field, recipe: bool) -> str:
    if f.metadata.get("required"):  # validate() insists; a recipe may give it instead of the flag
        return "required, here or in --config" if recipe else "required"
    if "default_text" in f.metadata:
        return f.metadata["default_text"]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    per_task = [f"{task} {d['prefix'][f.name]}" for task, d in TASK_DEFAULTS.items()
                if recipe and f.name in d.get("prefix", {})]  # TrainConfig's task defaults
    if per_task:
        return f"{default}; per task: {', '.join(per_task)}"
    if isinstance(default, bool):
        return f"--{_flag(f.name)}" if default else f"--no-{_flag(f.name)}"
    return "not set" if default is None else str(default)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def flag_fields(config: type = TrainConfig) -> list[tuple[dataclasses.Field, type, str]]:
    """(field, resolved type, group) for every flag of `config`; TrainConfig's with PrefixConfig's in place of `prefix`.

    A field declared without metadata still gets a flag (in "output"); tests/test_cli.py fails on its missing help.
    """
    out = []
    classes = ((TrainConfig, "output"), (PrefixConfig, "prefix")) if config is TrainConfig else ((config, "output"),)
    for cls, group in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal") or f.metadata.get("nested"):
                continue
            out.append((f, hints[f.name], f.metadata.get("group", group)))
    return out


def _scalar(tp) -> type:
    """str | None -> str, list[str] | None -> list, int -> int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    return typing.get_origin(tp) or tp


def add_config_flags(parser: argparse.ArgumentParser, config: type = TrainConfig) -> None:
    """A flag per field of `config`. TrainConfig's required fields may come from a --config recipe instead, so only
    other configs' required fields are required flags."""
    recipe = config is TrainConfig
    fields = flag_fields(config)
    used = {group for _, _, group in fields}
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items() if key in used}
    for f, tp, group in fields:
        help = f"{f.metadata.get('help', '')} (default: {_default_text(f, recipe)})".strip().replace("%", "%%")
        kind = _scalar(tp)
        kw: dict = dict(dest=f.name, default=None, help=help)
        if f.metadata.get("required") and not recipe:
            kw["required"] = True
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kw.update(type=comma_list, action="extend", metavar="A,B,...")  # comma-separated and/or repeated
        else:
            kw["type"] = _moved_check(f.metadata["moved"]) if "moved" in f.metadata else kind
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            else:
                kw["metavar"] = {int: "N", float: "X"}.get(kind, f.name.upper())
        groups[group].add_argument(f"--{_flag(f.name)}", **kw)


def overrides(args: argparse.Namespace, config: type = TrainConfig) -> dict:
    """The flags' values by field name (None where a flag was not given)."""
    return {f.name: getattr(args, f.name) for f, _, _ in flag_fields(config)}


def config_from_flags(args: argparse.Namespace, config: type):
    """`config` from the flags given (the dataclass defaults for the others); not validated."""
    return config(**{k: v for k, v in overrides(args, config).items() if v is not None})
