"""`prefixtune info DIR [--model PATH] [--json]`: describe an adapter (or a base model) without loading weights.

For an adapter: its config, base model, task, files and size, parameter counts; with --model, whether it fits that
base model, checked with the same rules `load_adapter` applies (the base model's config only: AutoConfig, plus a
meta-device skeleton for classifier heads; no weights are read). DIR may also be a Hub id ('user/repo').
For a model directory (config.json, no adapter_config.json): its architecture and what a prefix costs on it.

Exit status: 0 ok, 1 the adapter does not fit --model, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from ..adapter_io import CONFIG_NAME, EXTRA_NAME, PROJECTION_NAME, WEIGHTS_NAME, resolve_adapter_dir
from ..config import ConfigError

EXIT_MISFIT = 1
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("path", metavar="DIR", help="adapter directory (or Hub id 'user/repo'), a training run directory "
                        "(`train --output`: its final adapter/), or a model directory")
    parser.add_argument("--best", action="store_true", help="with a run directory: describe its best/ adapter instead of "
                        "the final one")
    parser.add_argument("--model", help="base model directory or Hub id: check that the adapter fits it (config only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def _tensor_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: (list(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is corrupt or truncated ({e}); re-save or re-download the adapter") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); the adapter directory is damaged") from None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _resolve_dir(path: str) -> Path:
    d = Path(path)
    if d.exists():
        if not d.is_dir():
            raise ConfigError(f"{d} is a file; pass the adapter directory that holds {CONFIG_NAME}")
        return d
    from ..hub import looks_like_repo_id, resolve

    if looks_like_repo_id(path):
        return resolve(path)
    raise ConfigError(f"{d} does not exist (neither a local directory nor a Hub id 'user/repo')")


def _load_config(model: str):
    """The base model's config only (local directory, or a Hub id already cached / reachable)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model {model}: cannot read its config.json ({first})") from None


def _arch(config):
    from .. import inject

    return inject.arch_of(SimpleNamespace(config=config))


def _meta_head(config, arch):
    """Encoder classifiers: the (meta-device) classification head, so head shapes can be compared."""
    if arch.kind != "encoder":
        return None
    import torch
    from transformers import AutoModelForSequenceClassification

    from ..inject import head_name

    with torch.device("meta"):
        m = AutoModelForSequenceClassification.from_config(config)
    name = head_name(m)
    return getattr(m, name) if name else None


def check_fit(adapter_dir: Path, config) -> tuple[bool, str]:
    """(fits, reason), with exactly the checks `load_adapter` makes."""
    from ..adapter_io import read_adapter

    try:
        arch = _arch(config)
        read_adapter(adapter_dir, arch, _meta_head(config, arch))
    except ConfigError as e:
        return False, " ".join(str(e).split())
    return True, f"fits {arch.model_type} ({arch.num_layers} layers, {arch.kv_heads} kv heads x {arch.head_dim})"


def describe_adapter(d: Path) -> dict:
    pc = _read_json(d / CONFIG_NAME)
    if pc.get("peft_type") not in ("PREFIX_TUNING", "CARTRIDGE"):  # adapter_io.PEFT_TYPES
        raise ConfigError(f"{d} holds a {pc.get('peft_type') or 'unknown'} adapter; prefixtune describes prefix-tuning "
                          "and cartridge adapters only (peft_type 'PREFIX_TUNING' or 'CARTRIDGE')")
    extra = _read_json(d / EXTRA_NAME) if (d / EXTRA_NAME).is_file() else {}
    if not (d / WEIGHTS_NAME).is_file():
        raise ConfigError(f"{d} has no {WEIGHTS_NAME}: the adapter is incomplete")
    tensors = _tensor_shapes(d / WEIGHTS_NAME)
    files = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
    stored = sum(_numel(s) for s, _ in tensors.values())
    cfg = extra.get("config", {})
    info = {
        "kind": "adapter",
        "path": str(d),
        "format": "prefixtune" if extra else "peft",
        "peft_type": pc.get("peft_type"),
        "task_type": pc.get("task_type"),
        "task": (cfg.get("extra") or {}).get("task"),
        "labels": (cfg.get("extra") or {}).get("labels"),  # encoder classifiers: the head's outputs, in order
        "base_model": pc.get("base_model_name_or_path"),
        "num_virtual_tokens": pc.get("num_virtual_tokens"),
        "num_layers": pc.get("num_layers"),
        "num_attention_heads": pc.get("num_attention_heads"),
        "token_dim": pc.get("token_dim"),
        "placement": cfg.get("placement", "decoder"),
        "projection_trained": bool(cfg.get("projection", pc.get("prefix_projection"))),
        "projection_kept": bool(extra.get("projection_kept")) and PROJECTION_NAME in files,
        "tensors": {k: {"shape": s, "dtype": t} for k, (s, t) in tensors.items()},
        "parameters": stored,
        "size_bytes": sum(files.values()),
        "files": files,
        "model_card": "README.md" in files,
    }
    if info["projection_kept"]:
        info["projection_parameters"] = sum(_numel(s) for s, _ in _tensor_shapes(d / PROJECTION_NAME).values())
    return info


def describe_model(d: Path) -> dict:
    config = _load_config(str(d))
    info = {"kind": "model", "path": str(d), "model_type": getattr(config, "model_type", None)}
    try:
        arch = _arch(config)
    except ConfigError as e:
        info.update(supported=False, reason=" ".join(str(e).split()))
        return info
    info.update(supported=True, family=arch.kind, peft_task_type=arch.peft_task_type, num_layers=arch.num_layers,
                num_heads=arch.num_heads, kv_heads=arch.kv_heads, head_dim=arch.head_dim, token_dim=arch.token_dim,
                parameters_per_virtual_token=arch.num_layers * 2 * arch.token_dim)
    return info


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_text(info: dict) -> str:
    if info["kind"] == "model":
        if not info["supported"]:
            return f"model {info['path']}: {info['model_type']}, not supported for prefix tuning: {info['reason']}"
        return "\n".join([
            f"model          {info['path']}",
            f"type           {info['model_type']} ({info['family']}, peft task {info['peft_task_type']})",
            f"attention      {info['num_layers']} layers, {info['num_heads']} heads, {info['kv_heads']} kv heads x {info['head_dim']}",
            f"prefix cost    {info['parameters_per_virtual_token']:,} parameters per virtual token",
        ])
    lines = [
        f"adapter        {info['path']} ({info['format']} format, {info['peft_type']})",
        f"base model     {info['base_model'] or 'unknown'}",
        f"task           {info['task'] + ' / ' if info['task'] else ''}{info['task_type']}",
        *([f"head           sequence classification, {len(info['labels'])} labels: {', '.join(map(str, info['labels']))}"]
          if info.get("labels") else []),
        f"prefix         {info['num_virtual_tokens']} virtual tokens x {info['num_layers']} layers, "
        f"token_dim {info['token_dim']} ({info['num_attention_heads']} kv heads), placement {info['placement']}",
        f"projection     trained with MLP: {info['projection_trained']}; trainable form kept for resuming: {info['projection_kept']}",
        f"parameters     {info['parameters']:,} stored"
        + (f" + {info['projection_parameters']:,} in the kept projection" if info.get("projection_parameters") else ""),
        f"size           {_human(info['size_bytes'])} in {len(info['files'])} files: "
        + ", ".join(f"{k} ({_human(v)})" for k, v in info["files"].items()),
        f"model card     {'README.md' if info['model_card'] else 'missing'}",
    ]
    if "fits" in info:
        lines.append(f"fits --model   {'yes' if info['fits'] else 'NO'}: {info['fit_reason']}")
    return "\n".join(lines)


def run(args) -> int:
    d = _resolve_dir(args.path)
    if getattr(args, "best", False) or not ((d / CONFIG_NAME).is_file() or (d / "config.json").is_file()):
        d, note = resolve_adapter_dir(d, best=getattr(args, "best", False))  # a run directory -> its adapter
        if note:
            print(f"note: {note}", file=sys.stderr)
    if (d / CONFIG_NAME).is_file():
        info = describe_adapter(d)
        if args.model:
            config = _load_config(args.model)
            if info.get("labels"):  # an encoder classifier's head is sized by the adapter's labels, not the base config
                config.num_labels = len(info["labels"])
            info["fits"], info["fit_reason"] = check_fit(d, config)
            info["model"] = args.model
    elif (d / "config.json").is_file():
        if args.model:
            raise ConfigError(f"{d} is a model directory, not an adapter; --model only applies to adapters")
        info = describe_model(d)
    else:
        raise ConfigError(f"{d} has no {CONFIG_NAME}: not an adapter directory (expected {CONFIG_NAME} + {WEIGHTS_NAME}), "
                          "and no config.json: not a model directory either")
    print(json.dumps(info, indent=2, default=str) if getattr(args, "json", False) else format_text(info))
    return EXIT_MISFIT if info.get("fits") is False else 0


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="prefixtune info", description=__doc__.splitlines()[0]))


def main(argv: list[str] | None = None) -> int:
    """Entry point used by `prefixtune info ...` (cli.py passes the remaining arguments)."""
    from ..hub import HubError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, HubError) as e:
        print(f"prefixtune info: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
