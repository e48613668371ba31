"""Adapters on disk, in peft's prefix-tuning format (both directions).

    adapter_config.json          peft's PrefixTuningConfig fields (peft_type PREFIX_TUNING, ...)
    adapter_model.safetensors    `prompt_embeddings` [P, L*2*token_dim] (the MLP folded in), plus
                                 `base_model.<head>.*` for encoder classifiers (peft's modules_to_save)
    prefixtune.json              our extras (placement, init, projection width); peft ignores it
    prefixtune_projection.safetensors   the unfolded encoder (MLP, or layer-scaled table), only with keep_projection
                                 (checkpoints: to resume training exactly)

Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves half an
adapter behind and an existing adapter is only replaced by a complete one. The atomic-write helpers
(`atomic_dir`, `atomic_files`, `write_text_atomic`, `scratch_dir`) are the project's only ones.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, PrefixConfig
from .inject import CLASSIFIER_HEADS, num_groups

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EXTRA_NAME = "prefixtune.json"
PROJECTION_NAME = "prefixtune_projection.safetensors"


# peft 0.21's CARTRIDGE adapter (peft/tuners/cartridge): the same `prompt_embeddings` table as a projection-free
# prefix, plus `num_frozen_tokens` (leading slots kept frozen, an attention sink). We read it as a plain table and
# keep num_frozen_tokens in PrefixConfig.extra; fmt="cartridge" writes one back.
PEFT_TYPES = ("PREFIX_TUNING", "CARTRIDGE")


def peft_config_dict(cfg: PrefixConfig, arch, fmt: str = "prefix") -> dict:
    if fmt == "cartridge":
        if cfg.projection or arch.kind == "encoder":
            raise ConfigError("the CARTRIDGE format holds a plain key/value table for a generative model: save a "
                              "projection-free prefix of a causal or seq2seq model (or save in the prefix format)")
        keep = ("task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                "num_layers", "base_model_name_or_path", "inference_mode", "revision", "auto_mapping", "modules_to_save")
        return {**{k: v for k, v in peft_config_dict(cfg, arch).items() if k in keep}, "peft_type": "CARTRIDGE",
                "num_frozen_tokens": int(cfg.extra.get("num_frozen_tokens", 0))}
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": arch.peft_task_type,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": arch.token_dim,
        "num_transformer_submodules": arch.num_transformer_submodules,
        "num_attention_heads": arch.kv_heads,
        "num_layers": arch.num_layers,
        "encoder_hidden_size": cfg.projection_dim if cfg.projection else arch.token_dim,
        "prefix_projection": cfg.projection,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "inference_mode": True,
        "revision": None,
        "auto_mapping": None,
        "init_weights": None,
        "modules_to_save": list(CLASSIFIER_HEADS) if arch.kind == "encoder" else None,
    }


def atomic_dir(target: Path, fill) -> Path:
    """Build a directory with `fill(tmp_dir)` next to `target`, then move it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the result should be readable like any other directory
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@contextmanager
def scratch_dir(prefix: str = "prefixtune-", dir=None):
    """A temporary directory (in `dir`, default the system's temp dir) removed afterwards, even on error."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=dir, ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)


def atomic_files(target: Path, fill, stale=()) -> Path:
    """Add or replace files inside the existing-or-new directory `target`, each file atomically.

    `fill(tmp_dir)` builds the files in a scratch directory inside `target` (same filesystem, so each move is
    an atomic rename) and returns their paths in the order to move them (put the file readers check first,
    e.g. weights, last); names in `stale` that `fill` did not produce are removed from `target` first.
    Unlike `atomic_dir`, other files in `target` (e.g. a Trainer checkpoint's) are left alone.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with scratch_dir(prefix=".prefixtune-save-", dir=target) as tmp:
        built = [Path(p) for p in fill(tmp)]
        for name in set(stale) - {p.name for p in built}:
            (target / name).unlink(missing_ok=True)
        for p in built:
            os.replace(p, target / p.name)
    return target


def write_text_atomic(path: Path, text: str) -> None:
    """Replace the file `path` with `text` in one rename: readers see the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_adapter(directory, cfg: PrefixConfig, arch, enc, head, head_name, keep_projection: bool,
                  fmt: str = "prefix") -> Path:
    tensors = {"prompt_embeddings": enc.folded().float().cpu().contiguous()}
    if head is not None:
        for k, v in head.state_dict().items():
            tensors[f"base_model.{head_name}.{k}"] = v.detach().cpu().contiguous()
    peft_cfg = peft_config_dict(cfg, arch, fmt)
    # keep_projection: also store the encoder in its trainable form (the MLP, or the scaled table and its scale)
    unfolded = cfg.projection or getattr(enc, "scale", None) is not None
    extra = {"format": 1, "config": cfg.to_dict(), "projection_kept": bool(keep_projection and unfolded)}

    def fill(tmp: Path):
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2, sort_keys=True))
        (tmp / EXTRA_NAME).write_text(json.dumps(extra, indent=2, sort_keys=True, default=str))
        if extra["projection_kept"]:
            state = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
            save_file(state, tmp / PROJECTION_NAME)
        from .card import write_model_card

        write_model_card(tmp, peft_cfg, cfg, tensors)

    return atomic_dir(Path(directory), fill)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); the adapter directory is damaged") from None


def read_adapter(directory, arch, head):
    """-> (PrefixConfig, PrefixEncoder state dict, head state dict or None), after checking it fits `arch`."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"adapter directory {d} does not exist")
    if not (d / CONFIG_NAME).is_file():
        raise ConfigError(f"{d} has no {CONFIG_NAME}: not an adapter directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    pc = _load_json(d / CONFIG_NAME)
    kind = pc.get("peft_type")
    if kind not in PEFT_TYPES:
        raise ConfigError(
            f"{d} holds a {kind or 'unknown'} adapter (peft_type={kind!r}); prefixtune loads prefix-tuning "
            "and cartridge adapters only (peft_type 'PREFIX_TUNING' or 'CARTRIDGE')"
        )
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        pickle = (d / "adapter_model.bin").exists()
        extra_hint = " (found adapter_model.bin: re-save it as safetensors; pickles are not loaded)" if pickle else ""
        raise ConfigError(f"{d} has no {WEIGHTS_NAME}{extra_hint}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{weights} is corrupt or truncated ({e}); re-save or re-download the adapter") from None
    if "prompt_embeddings" not in tensors:
        raise ConfigError(f"{weights} has no 'prompt_embeddings' tensor (keys: {sorted(tensors)[:5]})")
    table = tensors["prompt_embeddings"]

    expected = {
        "num_layers": arch.num_layers,
        "token_dim": arch.token_dim,
        "num_attention_heads": arch.kv_heads,
        "num_transformer_submodules": arch.num_transformer_submodules,
    }
    diffs = [f"{k}: adapter {pc.get(k)} vs model {v}" for k, v in expected.items() if pc.get(k) is not None and pc.get(k) != v]
    extra = _load_json(d / EXTRA_NAME) if (d / EXTRA_NAME).is_file() else {}
    placement = extra.get("config", {}).get("placement", "decoder")
    P = int(pc.get("num_virtual_tokens") or table.shape[0])
    want = (P, num_groups(arch, placement) * 2 * arch.token_dim)
    if tuple(table.shape) != want:
        diffs.append(f"prompt_embeddings shape: adapter {tuple(table.shape)} vs model {want}")
    if diffs:
        raise ConfigError(
            f"adapter {d} was made for another model ({pc.get('base_model_name_or_path')}); shapes differ: "
            + "; ".join(diffs)
        )

    fields = dict(extra.get("config", {}))
    fields.update(num_virtual_tokens=P, base_model_name_or_path=pc.get("base_model_name_or_path"))
    if kind == "CARTRIDGE":
        fields["extra"] = {**fields.get("extra", {}), "num_frozen_tokens": int(pc.get("num_frozen_tokens") or 0)}
    if extra.get("projection_kept") and (d / PROJECTION_NAME).is_file():
        state = load_file(d / PROJECTION_NAME)  # the trainable form: MLP, or scaled table + its scale
        fields["projection"] = any(k.startswith("transform.") for k in state)
        fields["layer_scale"] = "scale" in state
    else:  # folded: a plain table, inference-ready (and trainable as a table)
        state = {"embedding.weight": table.float()}
        fields["projection"] = fields["layer_scale"] = False
    cfg = PrefixConfig.from_dict({k: v for k, v in fields.items() if k in PrefixConfig.__dataclass_fields__})

    head_state = None
    if head is not None:
        prefix = next((f"base_model.{n}." for n in CLASSIFIER_HEADS if any(k.startswith(f"base_model.{n}.") for k in tensors)), None)
        if prefix is not None:
            head_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            mine = head.state_dict()
            bad = [f"{k}: adapter {tuple(v.shape)} vs model {tuple(mine[k].shape)}"
                   for k, v in head_state.items() if k in mine and mine[k].shape != v.shape]
            if bad or set(head_state) != set(mine):
                raise ConfigError(f"classifier head in {weights} does not fit the model "
                                  f"({'; '.join(bad) or sorted(head_state)}): different number of labels?")
    return cfg, state, head_state


# What `prefixtune train --output RUN` writes (training/loop.py): the final adapter and the best one by eval.
RUN_MARKER, RUN_FINAL, RUN_BEST = "run.json", "adapter", "best"


def resolve_adapter_dir(path, best: bool = False) -> tuple[Path, str | None]:
    """An adapter directory, or a training run directory -> (the adapter directory, a one-line note or None).

    A run directory (`train --output`) holds its final adapter in adapter/ and the best by eval in best/;
    `best=True` picks best/. The note says which was used, for the caller to print or log. A path that does
    not exist is returned as it is (it may be a Hub id, resolved later by the loader).
    """
    d = Path(path)
    if not d.is_dir():
        if best and d.exists():
            raise ConfigError(f"{d} is a file; --best needs a training run directory (the one `train --output` wrote)")
        return d, None
    is_run = (d / RUN_MARKER).is_file() or (d / RUN_FINAL / CONFIG_NAME).is_file()
    if best:
        if (d / RUN_BEST / CONFIG_NAME).is_file():
            return d / RUN_BEST, f"using the run's best adapter {d / RUN_BEST}"
        if (d / CONFIG_NAME).is_file() and d.name == RUN_BEST:
            return d, None  # the run's best/ itself
        raise ConfigError(f"--best: {d} has no {RUN_BEST}/{CONFIG_NAME}; a training run writes best/ at its first "
                          "evaluation. Drop --best to use the final adapter, or pass the run directory")
    if (d / CONFIG_NAME).is_file():
        return d, None
    if (d / RUN_FINAL / CONFIG_NAME).is_file():
        alt = f" (--best for {d / RUN_BEST})" if (d / RUN_BEST / CONFIG_NAME).is_file() else ""
        return d / RUN_FINAL, f"{d} is a training run: using its final adapter {d / RUN_FINAL}{alt}"
    if is_run:
        alt = (f"; its best adapter so far is in {d / RUN_BEST} (pass --best)" if (d / RUN_BEST / CONFIG_NAME).is_file()
               else "")
        raise ConfigError(f"{d} is a training run without a final adapter ({RUN_FINAL}/{CONFIG_NAME}): the run has not "
                          f"finished (finish it with `prefixtune train ... --resume`){alt}")
    raise ConfigError(f"{d} has no {CONFIG_NAME}: neither an adapter directory ({CONFIG_NAME} + {WEIGHTS_NAME}) nor a "
                      f"training run directory (with {RUN_FINAL}/ inside)")
