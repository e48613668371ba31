"""The engine's request, its sampling parameters, and the events it sends back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .detokenize import IncrementalText
from .errors import EngineError
from .sampler import SamplingParams, logits_processors

__all__ = ["FEATURES", "Event", "Request", "SamplingParams", "adapter_tuple"]  # SamplingParams: sampler.py's

# Optional request features; an engine lists those it honours in `capabilities` and the API refuses the others
# naming the field (never a silently different result).
FEATURES = frozenset({"logprobs", "logit_bias", "repetition_penalty", "presence_penalty", "frequency_penalty",
                      "seed", "echo", "top_p", "stop"})


@dataclass
class Event:
    index: int
    text: str = ""  # new text since the last event
    token_ids: list[int] = field(default_factory=list)
    # One entry per counted token when the request asked for logprobs: (logprob, [(id, logprob)] top-k).
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "timeout" | "error" (None while running)
    error: EngineError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def adapter_tuple(adapter) -> tuple[str, ...]:
    """None (bare model), one name, or several names whose prefixes are concatenated in order."""
    if adapter is None:
        return ()
    return (adapter,) if isinstance(adapter, str) else tuple(adapter)


@dataclass(eq=False)
class Request:
    adapter: str | tuple[str, ...] | None
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    index: int = 0  # choice index when one API call asks for n > 1
    timeout: float | None = None
    # Worker-side state.
    generated: list[int] = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)  # parallel to generated when params.logprobs is set
    sent_chars: int = 0  # text sent in events so far
    output_text: IncrementalText | None = None  # the text of `generated` (set by output.py)
    last: int | None = None  # sampled token not yet fed to the model
    cancelled: bool = False
    finished: bool = False

    def __post_init__(self):
        self.adapters = adapter_tuple(self.adapter)
        if len(self.adapters) == 1:
            self.adapter = self.adapters[0]
        elif not self.adapters:
            self.adapter = None
        else:
            self.adapter = self.adapters
        self.created = time.monotonic()
        self.deadline: float | None = None  # set by submit
        self.on_close: Callable[[Request], None] | None = None  # the engine's: releases the adapters it holds
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
        """Client went away: the worker drops the row at its next step (any thread may call this)."""
        self.cancelled = True

    def close(self) -> None:
        """The request leaves the engine (done, failed, cancelled): exactly once, whatever the path."""
        if not self.finished:
            self.finished = True
            if self.on_close is not None:
                self.on_close(self)
