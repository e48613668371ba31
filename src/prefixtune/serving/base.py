"""What every serving engine shares: requests, events, errors, and EngineBase, the interface api.py talks to.

An engine owns one worker thread and one model. EngineBase does everything that does not touch the model:
the queue (submit, limits, timeouts, cancellation), adapter names and the adapters directory, the per-row
sampling from a step's logits, stop strings, incremental text and finishing. A backend (torch_engine.TorchEngine,
llamacpp_engine.LlamaCppEngine) supplies the model side: `_step(new)` runs one forward for the admitted and
running rows and hands the next-token logits to `_step_rows`; `_load_adapter`/`_unload_adapter` change the
prefixes; `adapter_names`/`prefix_length` describe them.

Requests talk back through a callback `on_event(Event)`, called from the worker thread; `async_sink` turns
that into an asyncio.Queue for the web side.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from ..adapter_io import CONFIG_NAME, RUN_MARKER, resolve_adapter_dir
from ..config import ConfigError, check_adapter_name

log = logging.getLogger("prefixtune.serve")

# Optional request features; an engine lists those it honours in `capabilities` and the API answers a 400
# naming the field for the others (never a silently different result).
FEATURES = frozenset({"logprobs", "logit_bias", "repetition_penalty", "presence_penalty", "frequency_penalty",
                      "seed", "echo", "top_p", "stop"})


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status the web side should use."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class QueueFull(EngineError):
    status = 429

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(EngineError):
    status = 503


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy (argmax), identical to generate(do_sample=False)
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: fixed output lengths
    # OpenAI's penalties on tokens generated so far: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF/vLLM's multiplicative penalty on every token of prompt + output (1.0 = off), as generate() applies it.
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely


@dataclass
class Event:
    index: int
    text: str = ""  # new text since the last event
    token_ids: list[int] = field(default_factory=list)
    # One entry per counted token when the request asked for logprobs: (logprob, [(id, logprob)] top-k).
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "timeout" | "error" (None while running)
    error: str | None = None
    status: int = 200  # HTTP status that fits an error
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Request:
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    index: int = 0  # choice index when one API call asks for n > 1
    timeout: float | None = None
    # Worker-side state.
    generated: list[int] = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)  # parallel to generated when params.logprobs is set
    sent_chars: int = 0
    last: int | None = None  # sampled token not yet fed to the model
    cancelled: bool = False
    finished: bool = False

    def __post_init__(self):
        self.created = time.monotonic()
        self.deadline: float | None = None  # set by submit
        self.gen = None
        if self.params.temperature > 0:
            # Per-request generator: a seeded request samples the same tokens whatever it is batched with.
            self.gen = torch.Generator()
            if self.params.seed is None:
                self.gen.seed()
            else:
                self.gen.manual_seed(self.params.seed)

        self.shaping, self.warping = logits_processors(self.params, len(self.prompt_ids))

    def cancel(self) -> None:
        """Client went away: the worker drops the row at its next step."""
        self.cancelled = True


class OpenAIPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI's presence/frequency penalties, counted over the generated tokens only (not the prompt):
    logit -= frequency * count + presence * (count > 0). transformers has no processor for these."""

    def __init__(self, presence: float, frequency: float, prompt_len: int):
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        out = input_ids[:, self.prompt_len:]
        if out.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def logits_processors(p: SamplingParams, prompt_len: int = 0) -> tuple[LogitsProcessorList, LogitsProcessorList]:
    """(shaping, warping) for one request, transformers' own processors in generate()'s order: penalties and
    biases shape the scores (greedy takes their argmax), warpers apply only when sampling (temperature > 0)."""
    shaping = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        shaping.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.presence_penalty or p.frequency_penalty:
        shaping.append(OpenAIPenaltyLogitsProcessor(p.presence_penalty, p.frequency_penalty, prompt_len))
    if p.logit_bias:
        shaping.append(SequenceBiasLogitsProcessor([[[tok], bias] for tok, bias in p.logit_bias]))
    warping = LogitsProcessorList()
    if p.temperature > 0:
        if p.temperature != 1.0:
            warping.append(TemperatureLogitsWarper(p.temperature))
        if p.top_p < 1.0:
            warping.append(TopPLogitsWarper(p.top_p))
    return shaping, warping


def next_token(r: Request, scores: torch.Tensor) -> int:
    """One row's next token from its logits [1, vocab]: shaped, then argmax (greedy) or warped and sampled with
    the request's own generator, as generate() does for one sequence."""
    ids = torch.tensor([r.prompt_ids + r.generated], device=scores.device) if r.shaping else None
    scores = r.shaping(ids, scores) if r.shaping else scores
    if r.gen is None:
        return int(scores.argmax(-1))
    scores = r.warping(ids, scores)
    probs = torch.softmax(scores.float(), -1)[0].cpu()
    return int(torch.multinomial(probs, 1, generator=r.gen))


def async_sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Event], None]:
    """An on_event callback that hands events from the worker thread to an asyncio queue."""

    def put(ev: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    return put


class EngineBase(ABC):
    """The engine interface of the HTTP layer, with the model-independent half implemented.

    Subclasses call `super().__init__(...)` and implement the abstract methods below."""

    backend = "?"
    capabilities: frozenset[str] = FEATURES  # optional request features honoured (see FEATURES)

    def __init__(
        self,
        tokenizer=None,
        *,
        model_name: str = "base",
        vocab_size: int,
        eos_ids: set[int],
        max_positions: int | None = None,
        adapters_dir: str | Path | None = None,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_prompt_tokens: int = 2048,
        max_total_tokens: int | None = None,
        request_timeout: float | None = 600.0,
        max_n: int = 8,
    ):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.eos_ids = set(eos_ids)
        self.max_positions = max_positions  # prefix + prompt + output must fit (prefix rows number tokens from P)
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.max_total_tokens = max_total_tokens or max_positions or 4096
        self.request_timeout = request_timeout
        self.max_n = max_n

        self.lock = threading.RLock()  # the model: worker steps vs adapter load/unload
        self._cond = threading.Condition()
        self._pending: deque[Request] = deque()
        self._rows: list[Request] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Counters read by /metrics (written by the worker only).
        self.stats = {"prompt_tokens": 0, "completion_tokens": 0, "steps": 0, "rows_stepped": 0}
        self.batch_hist: dict[int, int] = {}  # rows per decode step -> count

    # ---- the model side (backends implement these) ------------------------------------------------------
    @abstractmethod
    def adapter_names(self) -> list[str]:
        """Loaded adapters, sorted."""

    @abstractmethod
    def prefix_length(self, adapter: str | None) -> int:
        """Virtual tokens the adapter puts before the prompt (0 for None or an unknown name)."""

    @abstractmethod
    def _load_adapter(self, name: str, directory: Path) -> None:
        """Load the adapter saved at `directory` as `name` (under self.lock); ConfigError for a bad adapter."""

    @abstractmethod
    def _unload_adapter(self, name: str) -> None:
        """Forget `name` (under self.lock); rows already running may keep using it."""

    @abstractmethod
    def _step(self, new: list[Request]) -> None:
        """One worker iteration under self.lock: admit `new` (use `_ready` to drop stale ones), run the model once
        for new and running rows, and pass each row's next-token logits to `_step_rows`."""

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows (backends free their cache state here)."""
        for r in self._rows:
            if r.cancelled:
                r.finished = True
        self._rows = [r for r in self._rows if not r.finished]

    def _after_failure(self) -> None:
        """A step raised: its rows are already failed; reset whatever batch state may be half-updated."""

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self):
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name=f"prefixtune-{self.backend}", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish queued and running ones, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """The worker runs and accepts requests (what /health reports)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    # ---- requests --------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.model_name] + self.adapter_names()

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapter_names():
            raise EngineError(f"unknown model {name!r}; available: {self.model_names()}", 404)

    def adapter_for(self, model_field: str) -> str | None:
        """API `model` field -> adapter name (None = bare base model)."""
        if model_field == self.model_name:
            return None
        self.check_adapter(model_field)
        return model_field

    def check_limits(self, prompt_len: int, max_tokens: int, adapter: str | None = None) -> None:
        if prompt_len == 0:
            raise EngineError("prompt is empty: send at least one token of text")
        if prompt_len > self.max_prompt_tokens:
            raise EngineError(
                f"prompt has {prompt_len} tokens; the limit is {self.max_prompt_tokens} prompt tokens "
                f"and {self.max_total_tokens} tokens in total (prompt + max_tokens)"
            )
        if prompt_len + max_tokens > self.max_total_tokens:
            raise EngineError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} exceeds the "
                f"limit of {self.max_total_tokens} tokens in total; lower max_tokens to at most "
                f"{max(self.max_total_tokens - prompt_len, 0)}"
            )
        prefix = self.prefix_length(adapter)
        if self.max_positions and prefix + prompt_len + max_tokens > self.max_positions:
            raise EngineError(
                f"prefix ({prefix}) + prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the model's "
                f"{self.max_positions} positions; lower max_tokens to at most {max(self.max_positions - prefix - prompt_len, 0)}"
            )

    def submit(self, reqs: list[Request]) -> None:
        """Queue requests (the n choices of one call go in together, or not at all)."""
        for r in reqs:
            self.check_adapter(r.adapter)
            self.check_limits(len(r.prompt_ids), r.params.max_tokens, r.adapter)
            r.timeout = r.timeout or self.request_timeout
            r.deadline = time.monotonic() + r.timeout if r.timeout else None
        with self._cond:
            if self._stopping:
                raise EngineStopped("server is shutting down; not accepting new requests")
            if len(self._pending) + len(reqs) > self.max_queue:
                # A rough wait: one batch drains per few seconds on small models; clients back off and retry.
                raise QueueFull(f"queue is full ({len(self._pending)} waiting, limit {self.max_queue}); retry later", 1)
            self._pending.extend(reqs)
            self._cond.notify_all()

    # ---- adapters (hot load / unload) ------------------------------------------------------------------
    def resolve_adapter_path(self, path: str) -> Path:
        """Adapters load only from inside adapters_dir: absolute or '..' paths that leave it are refused."""
        if self.adapters_dir is None:
            raise EngineError("adapter loading is disabled: the server was started without --adapters", 403)
        if not isinstance(path, str) or not path or "\x00" in path:
            raise EngineError("'path' must be a non-empty string naming a directory inside the adapters directory")
        target = (self.adapters_dir / path).resolve()
        if target != self.adapters_dir and self.adapters_dir not in target.parents:
            raise EngineError(f"adapter path {path!r} leaves the adapters directory; give a path inside it", 400)
        try:
            target, note = resolve_adapter_dir(target)  # a training run directory -> its final adapter/
        except ConfigError:
            note = None
        if not (target / CONFIG_NAME).is_file():
            raise EngineError(f"no adapter at {path!r} (expected {CONFIG_NAME} in that directory, or a training "
                              "run's adapter/)", 404)
        if note:
            log.info("%s: %s", path, note)
        return target

    def load_adapter(self, name: str, path: str) -> None:
        """The API's hot load: `path` must lie inside adapters_dir."""
        self.add_adapter(name, self.resolve_adapter_path(path))

    def add_adapter(self, name: str, directory: str | Path) -> None:
        """Load the adapter at `directory` (any path: Python callers) as `name`."""
        try:
            check_adapter_name(name)
        except ConfigError as e:
            raise EngineError(str(e)) from None
        if name == self.model_name:
            raise EngineError(f"adapter name {name!r} is the base model's name; pick another", 409)
        with self.lock:
            if name in self.adapter_names():
                raise EngineError(f"adapter {name!r} is already loaded; DELETE /v1/adapters/{name} first", 409)
            try:
                self._load_adapter(name, Path(directory))
            except ConfigError as e:  # wrong shapes, not a prefix adapter, corrupt file, ...
                raise EngineError(f"cannot load adapter {name!r}: {e}", 422) from None

    def unload_adapter(self, name: str) -> None:
        """Rows already running keep their prefix (it is in the cache); queued ones fail with 404."""
        with self.lock:
            if name not in self.adapter_names():
                raise EngineError(f"unknown adapter {name!r}; loaded: {self.adapter_names()}", 404)
            self._unload_adapter(name)

    def load_dir(self) -> list[str]:
        """Load every subdirectory of adapters_dir that holds an adapter, named after the directory."""
        loaded = []
        if self.adapters_dir is None:
            return loaded
        for sub in sorted(p for p in self.adapters_dir.iterdir() if p.is_dir()):
            if not (sub / CONFIG_NAME).is_file() and not (sub / RUN_MARKER).is_file():
                continue  # neither an adapter nor a training run (resolve_adapter_path takes a run's adapter/)
            try:
                self.load_adapter(sub.name, sub.name)
                loaded.append(sub.name)
            except EngineError as e:
                log.warning("skipping %s: %s", sub, e)
        return loaded

    # ---- worker ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._rows and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._rows:
                    return
                self._expire_pending()
                new = self._take_admissions()
            try:
                with self.lock, torch.inference_mode():
                    self._step(new)
            except Exception as e:  # a failed step fails its rows, never the server
                log.exception("engine step failed")
                for r in self._rows + new:
                    if not r.finished:
                        self._finish(r, "error", error=f"generation failed: {type(e).__name__}: {e}", status=500)
                self._after_failure()
            self._drop_finished()

    def _take_admissions(self) -> list[Request]:
        """Queued requests that join the batch this iteration (under self._cond): FIFO up to max_batch_size."""
        new = []
        while self._pending and len(self._rows) + len(new) < self.max_batch_size:
            new.append(self._pending.popleft())
        return new

    def _expire_pending(self) -> None:
        """Requests that waited in the queue past their deadline fail now, not when a slot frees up."""
        now = time.monotonic()
        if not any(r.cancelled or (r.deadline and now > r.deadline) for r in self._pending):
            return
        keep = deque()
        for r in self._pending:
            if r.cancelled:
                r.finished = True
            elif r.deadline and now > r.deadline:
                self._finish(r, "timeout", error=f"request timed out after {r.timeout:g}s in the queue", status=408)
            else:
                keep.append(r)
        self._pending = keep

    def _ready(self, new: list[Request]) -> list[Request]:
        """The admitted requests still worth running: cancelled, unloaded-adapter and expired ones finish here."""
        ready, names = [], set(self.adapter_names())
        for r in new:
            if r.cancelled:
                r.finished = True
            elif r.adapter is not None and r.adapter not in names:
                self._finish(r, "error", error=f"adapter {r.adapter!r} was unloaded; available: {self.model_names()}", status=404)
            elif r.deadline and time.monotonic() > r.deadline:
                self._finish(r, "timeout", error=f"request timed out after {r.timeout:g}s in the queue", status=408)
            else:
                ready.append(r)
        return ready

    def _count_step(self, rows: int) -> None:
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += rows
        self.batch_hist[rows] = self.batch_hist.get(rows, 0) + 1

    # ---- sampling and stopping -------------------------------------------------------------------------
    def _step_rows(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Sample one token per row from its next-token logits [len(rows), vocab] and emit text/finish."""
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        # Logprobs are the model's own distribution (before penalties and temperature), as vLLM reports them.
        logp = dict(zip(want, torch.log_softmax(logits[want], -1))) if want else {}
        plain = [i for i, r in enumerate(rows) if r.gen is None and not r.shaping]
        greedy = dict(zip(plain, logits[plain].argmax(-1).tolist())) if plain else {}
        now = time.monotonic()
        for i, r in enumerate(rows):
            if r.cancelled:
                r.finished = True
                continue
            tok = greedy[i] if i in greedy else next_token(r, logits[i:i + 1])
            r.generated.append(tok)
            if i in logp:
                k = r.params.logprobs
                top = logp[i].topk(k) if k else None
                r.token_logprobs.append((float(logp[i][tok]), list(zip(top.indices.tolist(), top.values.tolist())) if k else []))
            r.last = tok
            self.stats["completion_tokens"] += 1
            self._emit(r, now)

    def _text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _emit(self, r: Request, now: float) -> None:
        tok = r.generated[-1]
        eos = tok in self.eos_ids and not r.params.ignore_eos
        text = self._text(r.generated[:-1] if eos else r.generated)
        finish = "stop" if eos else None
        for s in r.params.stop:
            at = text.find(s)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and len(r.generated) >= r.params.max_tokens:
            finish = "length"
        if finish is None and r.deadline and now > r.deadline:
            self._finish(r, "timeout", error=f"request timed out after {r.timeout:g}s", status=408, text=text)
            return
        if finish is None:
            # Hold back a tail that may still grow into a stop string, or half a multi-byte character.
            hold = max((k for s in r.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            if text.endswith("\ufffd"):
                hold = max(hold, 1)
            upto = len(text) - hold
            delta, r.sent_chars = text[r.sent_chars:upto], max(r.sent_chars, upto)
            self._send(r, Event(r.index, text=delta, token_ids=[tok], logprobs=r.token_logprobs[-1:]))
        else:
            self._finish(r, finish, text=text, counted=not eos)

    def _finish(self, r: Request, reason: str, error: str | None = None, status: int = 200, text: str | None = None,
                counted: bool = True) -> None:
        """`counted`: the last token is part of the output (False for an EOS, which has no text or logprob)."""
        r.finished = True
        delta = "" if text is None else text[r.sent_chars:]
        toks = r.generated[-1:] if r.generated else []
        lps = r.token_logprobs[-1:] if counted else []
        self._send(r, Event(r.index, text=delta, token_ids=toks, logprobs=lps, finish_reason=reason, error=error, status=status,
                            prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated)))

    @staticmethod
    def _send(r: Request, ev: Event) -> None:
        try:
            r.on_event(ev)
        except Exception:  # a broken listener must not take the batch down
            log.exception("event callback failed")
            r.cancelled = True
