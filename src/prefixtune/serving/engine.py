"""Engine: the one object the web layer (api.py) and the Python entry (offline.py) talk to.

It composes the model-independent parts: the queue (scheduler.Scheduler), the adapters (registry.AdapterRegistry),
sampling (sampler) and the output (output.OutputProcessor). A backend subclass supplies the model side:
  - `_load_prefix(name, directory) -> bytes` / `_unload_prefix(name)`: put one adapter's key/values in memory
    or drop them (the registry calls these, under `self.lock`);
  - `_step(new)`: one worker iteration under `self.lock`: start the admitted requests `new`, run the model once
    for them and the running rows, and hand each row's next-token logits to `_step_rows`;
  - optionally `_admissible` (room in the backend's own cache), `_drop_finished`, `_after_failure`.
One worker thread owns the model. Requests talk back through `on_event(Event)`, called from that thread.
Errors are the typed errors of errors.py; nothing here knows how they reach a client.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..adapter_io import CONFIG_NAME, resolve_adapter_dir
from ..config import ConfigError
from .errors import (
    CapacityUnavailable,
    EngineError,
    GenerationFailed,
    InvalidRequest,
    LoadingDisabled,
    RequestTimeout,
    UnknownAdapter,
)
from .output import OutputProcessor
from .registry import AdapterRegistry, parse_size
from .request import FEATURES, Request
from .sampler import sample_rows
from .scheduler import ADMIT, SKIP, WAIT, Scheduler
from .stats import EngineStats

log = logging.getLogger("prefixtune.serve")
COMPOSE = "+"  # "manual+faq" in the API's model field: the two prefixes, concatenated in that order


def eos_ids(generation_config, config, tokenizer) -> set[int]:
    """The ids generate() stops on: the generation config's first, then the model config's, then the tokenizer's,
    as offline generation does (every backend asks here)."""
    for v in (getattr(generation_config, "eos_token_id", None), getattr(config, "eos_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            return {v}
        if isinstance(v, (list, tuple)) and v:
            return {int(x) for x in v}
    return set()


class Engine(ABC):
    backend = "?"
    capabilities: frozenset[str] = FEATURES  # optional request features honoured (see request.FEATURES)

    def __init__(self, tokenizer=None, *, model_name: str = "base", vocab_size: int, eos_ids: set[int],
                 max_positions: int | None = None, adapters_dir: str | Path | None = None, max_batch_size: int = 32,
                 max_queue: int = 256, max_prompt_tokens: int = 2048, max_total_tokens: int | None = None,
                 request_timeout: float | None = 600.0, max_n: int = 8, max_loaded_adapters: int | None = None,
                 adapter_memory: str | int | None = None, best_adapters: bool = False):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.eos_ids = set(eos_ids)
        self.max_positions = max_positions  # prefix + prompt + output must fit (prefix rows number tokens from P)
        self.max_batch_size = max_batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_total_tokens = max_total_tokens or max_positions or 4096
        self.max_n = max_n
        self.lock = threading.RLock()  # the model: worker steps vs adapter load/unload
        self.stats = EngineStats()  # the counters /metrics reads; the registry and output processor write to it too
        self.output = OutputProcessor(tokenizer, self.eos_ids, self.stats)
        self.scheduler = Scheduler(max_queue=max_queue, request_timeout=request_timeout)
        self.registry = AdapterRegistry(self._load_prefix, self._unload_prefix, root=adapters_dir,
                                        max_loaded=max_loaded_adapters, max_bytes=parse_size(adapter_memory),
                                        reserved={model_name}, best=best_adapters,  # runs' best/ (serve --best)
                                        stats=self.stats)
        self.adapters_dir = self.registry.root
        self._rows: list[Request] = []
        self._thread: threading.Thread | None = None

    # ---- the model side (backends implement these) ------------------------------------------------------
    @abstractmethod
    def _load_prefix(self, name: str, directory: Path) -> int:
        """Load the adapter saved at `directory` as `name`; return the bytes it keeps resident. ConfigError (or
        OSError/ValueError) for an adapter that cannot serve on this model, naming what differs."""

    @abstractmethod
    def _unload_prefix(self, name: str) -> None:
        """Forget `name`; rows already running keep using their copy."""

    @abstractmethod
    def _step(self, new: list[Request]) -> None:
        """One worker iteration: start `new`, run the model once, pass next-token logits to `_step_rows`."""

    def _admissible(self, r: Request, taken: list[Request]) -> bool:
        """Whether the backend has room for `r` beside the running rows and `taken` (False: it waits)."""
        return True

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows (backends free their cache state here)."""
        self._close_cancelled()
        self._rows = [r for r in self._rows if not r.finished]

    def _close_cancelled(self) -> None:
        """Running rows whose client went away leave the engine (the one place; backends then free their state)."""
        for r in self._rows:
            if r.cancelled:
                r.close()

    def _after_failure(self) -> None:
        """A step raised: its rows are already failed; reset whatever batch state may be half-updated."""

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self):
        if self._thread is None or not self._thread.is_alive():
            self.scheduler.stopping = False
            self._thread = threading.Thread(target=self._loop, name=f"prefixtune-{self.backend}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish queued and running ones, then stop the worker."""
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """stop(), then release what the backend holds beyond Python objects (native memory, the processes it
        started: vLLM's engine core and workers); the app's shutdown calls this. Backends extend it."""
        self.stop()

    def is_alive(self) -> bool:
        """The worker runs and accepts requests."""
        return self._thread is not None and self._thread.is_alive() and not self.scheduler.stopping

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler)

    @property
    def running(self) -> int:
        return len(self._rows)

    # ---- adapters: what the API names and how long their prefixes are -------------------------------------
    def adapter_names(self) -> list[str]:
        """Every adapter the engine can serve, loaded or not, sorted."""
        return self.registry.names()

    def model_names(self) -> list[str]:
        return [self.model_name] + self.adapter_names()

    def adapter_for(self, model_field: str) -> str | tuple[str, ...] | None:
        """The API's `model` field -> None (the base model), one adapter name, or several joined by '+'."""
        if model_field == self.model_name:
            return None
        names = tuple(model_field.split(COMPOSE)) if COMPOSE in model_field else (model_field,)
        for n in names:
            self.registry.find(n)
        return names if len(names) > 1 else names[0]

    def prefix_length(self, adapter) -> int:
        """Virtual tokens the adapter(s) put before the prompt (0 for the bare model)."""
        names = (adapter,) if isinstance(adapter, str) else tuple(adapter or ())
        return sum(self.registry.find(n).num_virtual_tokens for n in names)

    def check_limits(self, prompt_len: int, max_tokens: int, adapter=None) -> None:
        if prompt_len == 0:
            raise InvalidRequest("prompt is empty: send at least one token of text")
        if prompt_len > self.max_prompt_tokens:
            raise InvalidRequest(f"prompt has {prompt_len} tokens; the limit is {self.max_prompt_tokens} prompt tokens "
                                 f"and {self.max_total_tokens} tokens in total (prompt + max_tokens)")
        if prompt_len + max_tokens > self.max_total_tokens:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} exceeds the "
                f"limit of {self.max_total_tokens} tokens in total; lower max_tokens to at most "
                f"{max(self.max_total_tokens - prompt_len, 0)}")
        prefix = self.prefix_length(adapter)
        if self.max_positions and prefix + prompt_len + max_tokens > self.max_positions:
            raise InvalidRequest(
                f"prefix ({prefix}) + prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the model's "
                f"{self.max_positions} positions; lower max_tokens to at most {max(self.max_positions - prefix - prompt_len, 0)}")

    def submit(self, reqs: list[Request]) -> None:
        """Queue requests (the n choices of one call go in together, or not at all). Each holds its adapters
        until it finishes, so they are not evicted under it."""
        for r in reqs:
            for name in r.adapters:
                self.registry.find(name)
            self.check_limits(len(r.prompt_ids), r.params.max_tokens, r.adapters)
            self.registry.check_fits(r.adapters)
        held = []
        try:
            for r in reqs:
                self.registry.hold(r.adapters)
                held.append(r)
                r.on_close = self._release
            self.scheduler.add(reqs)
        except EngineError:
            for r in held:
                r.on_close = None
                self.registry.release(r.adapters)
            raise

    def _release(self, r: Request) -> None:
        self.registry.release(r.adapters)

    # ---- adapters: load, unload, rescan ------------------------------------------------------------------
    def index(self, pin: tuple[str, ...] = ()) -> list[str]:
        """Index the adapters directory (no weights read; a large one on a thread, see AdapterRegistry.scan) and
        load the pinned adapters; -> the names indexed so far."""
        self.registry.scan(background=True)
        for name in pin:
            self.registry.pin(name)
            with self.lock:
                self.registry.ensure([name])
        return self.adapter_names()

    def load_dir(self) -> list[str]:
        """Index the adapters directory and load every adapter in it now (as far as the budget allows),
        skipping those that cannot load; -> the names loaded."""
        self.registry.scan()
        loaded = []
        for e in self.registry.entries(on_disk=True):
            try:
                with self.lock:
                    if self.registry.ensure([e.name]):
                        loaded.append(e.name)
            except EngineError as err:
                log.warning("skipping %s: %s", e.directory, err)
        return loaded

    def rescan(self) -> dict:
        added, removed = self.registry.scan()
        return {"added": added, "removed": removed}

    def resolve_adapter_path(self, path: str) -> Path:
        """Adapters load only from inside the adapters directory: absolute or '..' paths that leave it are refused."""
        root = self.registry.root
        if root is None:
            raise LoadingDisabled("adapter loading is disabled: the engine was started without an adapters directory")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise InvalidRequest("'path' must be a non-empty string naming a directory inside the adapters directory")
        target = (root / path).resolve()
        if target != root and root not in target.parents:
            raise InvalidRequest(f"adapter path {path!r} leaves the adapters directory; give a path inside it")
        try:
            target, note = resolve_adapter_dir(target)  # a training run directory -> its final adapter/
        except ConfigError:
            note = None
        if not (target / CONFIG_NAME).is_file():
            raise UnknownAdapter(f"no adapter at {path!r} (expected {CONFIG_NAME} in that directory, or a training "
                                 "run's adapter/)")
        if note:
            log.info("%s: %s", path, note)
        return target

    def load_adapter(self, path: str, name: str) -> None:
        """Hot load from a path inside the adapters directory. Arguments in PrefixModel.load_adapter's order
        (directory, name); callers name them (`path=`, `name=`)."""
        self.add_adapter(name, self.resolve_adapter_path(path))

    def add_adapter(self, name: str, directory: str | Path, pinned: bool = False) -> None:
        """Load the adapter at `directory` (any path: Python callers) as `name`, now, so a bad one fails here."""
        with self.lock:
            self.registry.register(name, directory, pinned=pinned)
            try:
                if not self.registry.ensure([name]):
                    raise CapacityUnavailable(f"cannot load adapter {name!r} now: the adapter memory budget is held "
                                              "by running requests; retry when they finish")
            except EngineError:
                self.registry.remove(name)
                raise

    def unload_adapter(self, name: str) -> None:
        """Forget `name`: rows already running keep their prefix; queued requests for it fail as unknown."""
        with self.lock:
            self.registry.remove(name)

    # ---- worker ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while self.scheduler.wait_for_work(lambda: bool(self._rows)):
            new: list[Request] = []
            try:
                with self.lock, torch.inference_mode():
                    new = self._admit()
                    self._step(new)
            except Exception as e:  # a failed step fails its rows, never the server
                log.exception("engine step failed")
                for r in self._rows + new:
                    if not r.finished:
                        self.output.fail(r, GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
                self._after_failure()
            self._drop_finished()

    def _admit(self) -> list[Request]:
        # Every iteration, also with a full batch: a queued request ends at its deadline, not when a slot frees.
        self.scheduler.expire(self._fail)
        free = self.max_batch_size - len(self._rows)
        if free <= 0:
            return []
        new, blocked = self.scheduler.admit(free, self._decide, self._fail)
        if not new and not self._rows and blocked is not None:
            # Nothing runs, so nothing will free up: the request that waited can never start.
            self.scheduler.drop(blocked)
            self._fail(blocked, CapacityUnavailable("the request no longer fits beside the loaded adapters (KV cells or "
                                                 "adapter memory); retry with fewer tokens or after unloading adapters"))
        return new

    def _decide(self, r: Request, taken: list[Request]) -> str:
        try:
            if not self.registry.ensure(r.adapters):
                return SKIP
        except UnknownAdapter:
            raise UnknownAdapter(f"adapter {r.adapter!r} was unloaded; available: {self.model_names()}") from None
        return ADMIT if self._admissible(r, taken) else WAIT

    def _fail(self, r: Request, error: Exception) -> None:
        if not isinstance(error, EngineError):
            error = GenerationFailed(f"{type(error).__name__}: {error}")
        reason = "timeout" if isinstance(error, RequestTimeout) else "error"
        self.output.fail(r, error, reason=reason)

    def _count_step(self, rows: int) -> None:
        self.stats.stepped(rows)

    def _step_rows(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Sample one token per row from its next-token logits [len(rows), vocab] and emit text/finish."""
        for r, (tok, lp) in zip(rows, sample_rows(rows, logits)):
            self.output.accept(r, tok, lp)
