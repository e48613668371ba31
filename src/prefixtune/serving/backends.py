"""One engine per backend, built from a model path and an adapters directory (what `serve` and `generate
--backend` start). The adapters are indexed, not loaded: each loads on its first request (registry.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError
from ..paths import existing_dir

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("prefixtune.serve")

BACKENDS = ("torch", "llamacpp", "vllm")


def model_id(model_path: str) -> str:
    """The base model's name in the API: the directory's name, or a GGUF file's name without .gguf."""
    p = Path(str(model_path).rstrip("/"))
    return p.stem if p.suffix == ".gguf" else p.name


def check_adapters_dir(adapters_dir) -> None:
    """A missing directory or a file is a one-line error before the model loads."""
    if adapters_dir is not None:
        existing_dir(adapters_dir, "--adapters", "adapters (one subdirectory per adapter or training run)")


def build_torch_engine(model_path: str, adapters_dir: str | None = None, *, dtype: str = "auto", device: str | None = None,
                 pin: tuple[str, ...] = (), **limits) -> Engine:
    """The PyTorch engine on a model loaded the way `train` loads it (a directory, a Hub id or a .gguf; dtype
    'auto' = bf16/fp16 on a GPU, fp32 on CPU), with the adapters under adapters_dir indexed."""
    from ..loading import load_model
    from ..model import PrefixModel
    from .torch_engine import TorchEngine

    check_adapters_dir(adapters_dir)
    base, tokenizer = load_model(model_path, dtype, device)
    engine = TorchEngine(PrefixModel(base), tokenizer, model_name=model_id(model_path), adapters_dir=adapters_dir, **limits)
    names = engine.index(pin)
    log.info("serving %s (%s, %s) with %d adapter(s) indexed", engine.model_name, base.device, base.dtype, len(names))
    return engine


def build_backend(backend: str, model_path: str, adapters_dir: str | None = None, *, dtype: str = "auto",
                  device: str | None = None, pin: tuple[str, ...] = (), **limits) -> Engine:
    """The engine for `--backend`: "torch" (ours, any supported model), "llamacpp" (a .gguf on llama.cpp) or "vllm"
    (a model directory on vLLM; dtype is passed on as vLLM's)."""
    if backend == "torch":
        return build_torch_engine(model_path, adapters_dir, dtype=dtype, device=device, pin=pin, **limits)
    if backend == "llamacpp":
        if not str(model_path).lower().endswith(".gguf"):
            raise ConfigError(f"--backend llamacpp serves a .gguf file; --model {model_path} is not one")
        check_adapters_dir(adapters_dir)
        from .llamacpp_engine import build_llamacpp_engine  # raises with the pip command if llama-cpp-python is missing

        return build_llamacpp_engine(model_path, adapters_dir, pin=pin, **limits)
    if backend == "vllm":
        check_adapters_dir(adapters_dir)
        from .vllm_engine import build_vllm_engine  # raises with the install command if vLLM is missing

        return build_vllm_engine(model_path, adapters_dir, dtype=dtype, pin=pin, **limits)
    raise ConfigError(f"unknown --backend {backend!r}: use one of {', '.join(BACKENDS)}")


build_engine = build_torch_engine  # its old name (it builds the torch engine only; `build_backend` picks one)
