"""From sampled tokens to events: incremental text, stop strings, EOS, max_tokens, deadlines, logprobs.

Backends that sample on their own (vLLM) hand their tokens to `accept` just as the batching engines do.
"""

from __future__ import annotations

import logging
import time

from .errors import EngineError, RequestTimeout
from .request import Event, Request
from .sampler import Logprob
from .stats import EngineStats

log = logging.getLogger("prefixtune.serve")


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: set[int], stats: EngineStats):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.stats = stats  # the engine's counters: completion_tokens is counted here

    def text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def accept(self, r: Request, tok: int, logprob: Logprob | None = None, now: float | None = None) -> None:
        """Record one generated token of `r` and send what it adds (or finish the request)."""
        if r.cancelled:
            r.close()
            return
        r.generated.append(tok)
        if logprob is not None:
            r.token_logprobs.append(logprob)
        r.last = tok
        self.stats.generated()
        eos = tok in self.eos_ids and not r.params.ignore_eos
        text = self.text(r.generated[:-1] if eos else r.generated)
        finish = "stop" if eos else None
        for s in r.params.stop:
            at = text.find(s)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and len(r.generated) >= r.params.max_tokens:
            finish = "length"
        now = time.monotonic() if now is None else now
        if finish is None and r.deadline and now > r.deadline:
            self.fail(r, RequestTimeout(f"request timed out after {r.timeout:g}s"), reason="timeout", text=text)
            return
        if finish is not None:
            self.finish(r, finish, text=text, counted=not eos)
            return
        # Hold back a tail that may still grow into a stop string, or half a multi-byte character.
        hold = max((k for s in r.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if text.endswith("\ufffd"):
            hold = max(hold, 1)
        upto = len(text) - hold
        delta, r.sent_chars = text[r.sent_chars:upto], max(r.sent_chars, upto)
        self.send(r, Event(r.index, text=delta, token_ids=[tok], logprobs=r.token_logprobs[-1:]))

    def finish(self, r: Request, reason: str, text: str | None = None, counted: bool = True,
               error: EngineError | None = None) -> None:
        """The last event of `r`. `counted`: the last token is part of the output (False for an EOS, which has
        no text or logprob)."""
        delta = "" if text is None else text[r.sent_chars:]
        toks = r.generated[-1:] if r.generated else []
        lps = r.token_logprobs[-1:] if counted else []
        r.close()
        self.send(r, Event(r.index, text=delta, token_ids=toks, logprobs=lps, finish_reason=reason, error=error,
                           prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated)))

    def fail(self, r: Request, error: EngineError, reason: str = "error", text: str | None = None) -> None:
        self.finish(r, reason, text=text, error=error)

    @staticmethod
    def send(r: Request, ev: Event) -> None:
        try:
            r.on_event(ev)
        except Exception:  # a broken listener must not take the batch down
            log.exception("event callback failed")
            r.cancelled = True
