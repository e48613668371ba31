"""The queue in front of the running batch: limits on waiting, deadlines, cancellation, and who goes next.

Admission is FIFO. A request that cannot join now because its adapters do not fit the memory budget (the
budget is held by other requests) is passed over for later ones, so the queue cannot deadlock; a request that
the backend cannot take for lack of room (KV cells) waits at the head instead of being overtaken forever.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from .errors import EngineStopped, QueueFull, RequestTimeout
from .request import Request

ADMIT, SKIP, WAIT = "admit", "skip", "wait"


class Scheduler:
    def __init__(self, *, max_queue: int, request_timeout: float | None):
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.cond = threading.Condition()
        self.pending: deque[Request] = deque()
        self.stopping = False

    def add(self, reqs: list[Request]) -> None:
        """Queue requests (the n choices of one call go in together, or not at all)."""
        for r in reqs:
            r.timeout = r.timeout or self.request_timeout
            r.deadline = time.monotonic() + r.timeout if r.timeout else None
        with self.cond:
            if self.stopping:
                raise EngineStopped("server is shutting down; not accepting new requests")
            if len(self.pending) + len(reqs) > self.max_queue:
                # A rough wait: one batch drains per few seconds on small models; clients back off and retry.
                raise QueueFull(f"queue is full ({len(self.pending)} waiting, limit {self.max_queue}); retry later", 1)
            self.pending.extend(reqs)
            self.cond.notify_all()

    def wait_for_work(self, busy: Callable[[], bool]) -> bool:
        """Block until something is queued or `busy()`; False once stopping with nothing left to do."""
        with self.cond:
            while not self.pending and not busy() and not self.stopping:
                self.cond.wait()
            return not (self.stopping and not self.pending and not busy())

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def admit(self, free: int, decide: Callable[[Request, list[Request]], str],
              fail: Callable[[Request, Exception], None]) -> tuple[list[Request], Request | None]:
        """Take up to `free` queued requests for the batch. `decide(request, taken so far)` answers ADMIT, SKIP
        (pass over it for now) or WAIT (stop admitting this step), or raises an EngineError that fails it.
        Cancelled and expired requests leave here. -> (taken, the first request that had to wait, if any)."""
        with self.cond:
            queued = list(self.pending)
        taken, gone, blocked = [], set(), None
        now = time.monotonic()
        for r in queued:
            if len(taken) >= free:
                break
            if r.cancelled:
                r.close()
                gone.add(id(r))
                continue
            if r.deadline and now > r.deadline:
                fail(r, RequestTimeout(f"request timed out after {r.timeout:g}s in the queue"))
                gone.add(id(r))
                continue
            try:
                verdict = decide(r, taken)
            except Exception as e:
                fail(r, e)
                gone.add(id(r))
                continue
            if verdict == ADMIT:
                taken.append(r)
                gone.add(id(r))
                continue
            blocked = blocked or r
            if verdict == WAIT:
                break
        if gone:
            with self.cond:
                self.pending = deque(r for r in self.pending if id(r) not in gone)
        return taken, blocked

    def expire(self, fail: Callable[[Request, Exception], None]) -> None:
        """Requests that waited past their deadline fail now, not when a slot frees up."""
        now = time.monotonic()
        with self.cond:
            late = [r for r in self.pending if r.cancelled or (r.deadline and now > r.deadline)]
            if not late:
                return
            self.pending = deque(r for r in self.pending if r not in late)
        for r in late:
            if r.cancelled:
                r.close()
            else:
                fail(r, RequestTimeout(f"request timed out after {r.timeout:g}s in the queue"))

    def drop(self, r: Request) -> None:
        with self.cond:
            self.pending = deque(x for x in self.pending if x is not r)

    def __len__(self) -> int:
        return len(self.pending)
