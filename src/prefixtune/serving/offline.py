"""Blocking generation through a serving engine, for notebooks and scripts (no server).

    gen = prefixtune.llamacpp.load("model.gguf", adapters="adapters/")
    gen.generate(["I loved it", "awful"], adapter_names=["sentiment", None], max_tokens=8)

The requests are the engine's own `Request`/`SamplingParams`, so sampling, stop strings and limits behave
exactly as in the server; rows with different adapters are batched together by the engine.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..adapter_io import CONFIG_NAME, resolve_adapter_dir
from ..config import ConfigError
from .errors import EngineError
from .registry import is_adapter_dir, single_adapter_name
from .request import Event, Request, SamplingParams, adapter_tuple


class Generator:
    """Wraps a started engine; `generate` submits one request per prompt and waits for all of them."""

    def __init__(self, engine):
        self.engine = engine.start()

    @property
    def adapters(self) -> list[str]:
        return self.engine.adapter_names()

    def load_adapter(self, directory, name: str | None = None) -> str:
        name = name or Path(directory).name
        try:
            self.engine.add_adapter(name, directory)
        except EngineError as e:
            raise ConfigError(str(e)) from None
        return name

    def unload_adapter(self, name: str) -> None:
        try:
            self.engine.unload_adapter(name)
        except EngineError as e:
            raise ConfigError(str(e)) from None

    def generate(self, prompts, adapter_names=None, max_tokens: int = 16, temperature: float = 0.0,
                 return_tokens: bool = False, **sampling):
        """prompts: a string, a list of strings, or lists of token ids. adapter_names: one name (or None for the
        bare model) for all rows, or one per row; a row's entry may be a list of names, whose prefixes are
        concatenated in that order. Other keywords are SamplingParams fields (top_p, stop, seed,
        ignore_eos, penalties, logit_bias). Returns the texts (or, with return_tokens, the generated ids)."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if adapter_names is None or isinstance(adapter_names, str):
            adapter_names = [adapter_names] * len(prompts)
        if len(adapter_names) != len(prompts):
            raise ConfigError(f"adapter_names has {len(adapter_names)} entries for {len(prompts)} prompts")
        known = set(self.engine.adapter_names())
        unknown = sorted({n for a in adapter_names for n in adapter_tuple(a) if n not in known})
        if unknown:
            raise ConfigError(f"unknown adapter(s) {unknown}; available: {self.adapters}")
        if "stop" in sampling and isinstance(sampling["stop"], str):
            sampling["stop"] = (sampling["stop"],)
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **sampling)
        except TypeError as e:
            raise ConfigError(f"generate(): {e}") from None
        tok = self.engine.tokenizer
        done = threading.Event()
        results: list[dict] = [{"ids": [], "text": "", "error": None} for _ in prompts]
        left = [len(prompts)]
        lock = threading.Lock()

        def sink(i):
            def on_event(ev: Event) -> None:
                res = results[i]
                res["text"] += ev.text
                res["ids"] += ev.token_ids
                if ev.finish_reason is not None:
                    if ev.error:
                        res["error"] = str(ev.error)
                    if ev.finish_reason == "stop" and ev.token_ids and ev.token_ids[-1] in self.engine.eos_ids:
                        res["ids"] = res["ids"][:-1]
                    with lock:
                        left[0] -= 1
                        if left[0] == 0:
                            done.set()
            return on_event

        reqs = []
        for i, (p, name) in enumerate(zip(prompts, adapter_names)):
            ids = list(p) if not isinstance(p, str) else list(tok(p)["input_ids"])
            reqs.append(Request(adapter=name, prompt_ids=ids, params=params, on_event=sink(i)))
        try:
            self.engine.submit(reqs)
        except EngineError as e:
            raise ConfigError(str(e)) from None
        done.wait()
        errors = [r["error"] for r in results if r["error"]]
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}")
        out = [r["ids"] if return_tokens else r["text"] for r in results]
        return out[0] if single else out

    def chat(self, conversations, adapter_names=None, max_tokens: int = 16, temperature: float = 0.0, **kw):
        """`generate` for chat messages (one list of {"role", "content"} dicts, or a list of them), rendered as
        /v1/chat/completions renders them: a knowledge prefix's in its trained layout (prefixtune/knowledge.py)."""
        from .. import knowledge

        single = bool(conversations) and isinstance(conversations[0], dict)
        conversations = [conversations] if single else list(conversations)
        names = adapter_names if isinstance(adapter_names, list) else [adapter_names] * len(conversations)
        try:
            ids = [knowledge.request_ids(self.engine.tokenizer, c, self._layout(n)) for c, n in zip(conversations, names)]
        except knowledge.LayoutError as e:
            raise ConfigError(str(e)) from None
        out = self.generate(ids, names, max_tokens=max_tokens, temperature=temperature, **kw)
        return out[0] if single else out

    def _layout(self, name) -> dict | None:
        return self.engine.registry.layout_of("+".join(adapter_tuple(name))) if name else None

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        (close or self.engine.stop)()


def adapter_dirs(adapters) -> dict[str, Path]:
    """{name: dir}, or a directory: itself if it is one adapter or one training run ("default"; a run's final
    adapter/), else each adapter or run subdirectory under its name (never a run's best/ or checkpoints)."""
    if adapters is None:
        return {}
    if isinstance(adapters, dict):
        return {n: Path(d) for n, d in adapters.items()}
    root = Path(adapters)
    if single_adapter_name(root) is not None:
        return {"default": resolve_adapter_dir(root)[0]}
    if not root.is_dir():
        raise ConfigError(f"adapters {root}: not a directory; pass an adapter directory, a directory of them, or a dict")
    found = {p.name: resolve_adapter_dir(p)[0] for p in sorted(root.iterdir()) if p.is_dir() and is_adapter_dir(p)}
    if not found:
        raise ConfigError(f"adapters {root}: no adapter directories inside (each needs {CONFIG_NAME})")
    return found
