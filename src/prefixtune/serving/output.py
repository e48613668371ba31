"""From sampled tokens to events: incremental text, stop strings, EOS, max_tokens, deadlines, logprobs.

Backends that sample on their own (vLLM) hand their tokens to `accept` just as the batching engines do.
The cost of one token does not grow with the output: text is decoded incrementally (`IncrementalText`, as vLLM's
detokenizer does it) and stop strings are looked for only in the new tail.
"""

from __future__ import annotations

import logging
import time

from .detokenize import REPLACEMENT, IncrementalText
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
        """The whole text of `ids` (what the incremental text of a request adds up to)."""
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
        out = r.output_text
        if out is None:
            out = r.output_text = IncrementalText(self.tokenizer)
        settled = len(out.text)
        if not eos:  # EOS adds no text
            out.add(tok)
        # Only the tail can change: text before `base` was sent (or held) and searched for every stop already.
        longest = max(map(len, r.params.stop), default=1)
        base = max(0, min(settled, r.sent_chars) - longest + 1)
        tail = out.text[base:] + out.pending  # == (the whole text so far)[base:]
        finish = "stop" if eos else None
        for s in r.params.stop:  # in order, each cutting the text the next one searches, as a full rescan would
            at = tail.find(s, max(0, settled - len(s) + 1 - base))
            if at >= 0:
                tail, finish = tail[:at], "stop"
        rest = tail[r.sent_chars - base:]  # not yet sent
        if finish is None and len(r.generated) >= r.params.max_tokens:
            finish = "length"
        now = time.monotonic() if now is None else now
        if finish is None and r.deadline and now > r.deadline:
            self.finish(r, "timeout", delta=rest, error=RequestTimeout(f"request timed out after {r.timeout:g}s"))
            return
        if finish is not None:
            self.finish(r, finish, delta=rest, counted=not eos)
            return
        # Hold back a tail that may still grow into a stop string, or half a multi-byte character.
        hold = max((k for s in r.params.stop for k in range(1, len(s)) if tail.endswith(s[:k])), default=0)
        if tail.endswith(REPLACEMENT):
            hold = max(hold, 1)
        send = rest[:max(len(rest) - hold, 0)]
        r.sent_chars += len(send)
        self.send(r, Event(r.index, text=send, token_ids=[tok], logprobs=r.token_logprobs[-1:]))

    def finish(self, r: Request, reason: str, delta: str = "", counted: bool = True,
               error: EngineError | None = None) -> None:
        """The last event of `r`, carrying `delta` (its text not sent yet). `counted`: the last token is part of
        the output (False for an EOS, which has no text or logprob)."""
        toks = r.generated[-1:] if r.generated else []
        lps = r.token_logprobs[-1:] if counted else []
        r.close()
        self.send(r, Event(r.index, text=delta, token_ids=toks, logprobs=lps, finish_reason=reason, error=error,
                           prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated)))

    def fail(self, r: Request, error: EngineError, reason: str = "error") -> None:
        self.finish(r, reason, error=error)

    @staticmethod
    def send(r: Request, ev: Event) -> None:
        try:
            r.on_event(ev)
        except Exception:  # a broken listener must not take the batch down
            log.exception("event callback failed")
            r.cancelled = True
