"""The queue in front of the batch (serving/scheduler.py): admission order, limits, deadlines, cancellation; and an
engine whose batch is full still ends a queued request at its deadline."""

import threading
import time

import pytest
from helpers import three_adapters

from prefixtune.serving.errors import EngineStopped, QueueFull, RequestTimeout
from prefixtune.serving.request import Request, SamplingParams
from prefixtune.serving.scheduler import ADMIT, SKIP, WAIT, Scheduler
from prefixtune.serving.torch_engine import TorchEngine


def req(name, timeout=None, events=None):
    r = Request(None, [4], SamplingParams(max_tokens=2), (events if events is not None else []).append, timeout=timeout)
    r.name = name
    return r


def admit(s, free, verdicts=None):
    """-> (names taken, name of the first that waited, [(name, error)] failed)."""
    failed = []
    taken, blocked = s.admit(free, lambda r, taken: (verdicts or {}).get(r.name, ADMIT),
                             lambda r, e: failed.append((r.name, e)))
    return [r.name for r in taken], blocked and blocked.name, failed


def test_admission_is_fifo_up_to_the_free_slots():
    s = Scheduler(max_queue=10, request_timeout=None)
    s.add([req("a"), req("b")])
    s.add([req("c")])
    assert admit(s, 2) == (["a", "b"], None, [])
    assert len(s) == 1 and admit(s, 5) == (["c"], None, [])
    assert len(s) == 0


def test_skip_passes_over_and_wait_stops_admission():
    s = Scheduler(max_queue=10, request_timeout=None)
    s.add([req(n) for n in "abcd"])
    # "a"'s adapters do not fit now: later requests go first; "c" has no room in the backend: nothing after it joins.
    assert admit(s, 4, {"a": SKIP, "c": WAIT}) == (["b"], "a", [])
    assert [r.name for r in s.pending] == ["a", "c", "d"]
    assert admit(s, 4) == (["a", "c", "d"], None, [])


def test_queue_limit_takes_all_choices_of_a_call_or_none():
    s = Scheduler(max_queue=3, request_timeout=None)
    s.add([req("a"), req("b")])
    with pytest.raises(QueueFull, match="queue is full .2 waiting, limit 3.") as e:
        s.add([req("c"), req("d")])
    assert e.value.retry_after >= 1 and len(s) == 2
    s.add([req("c")])
    assert len(s) == 3


def test_deadlines_end_queued_requests_with_a_timeout():
    s = Scheduler(max_queue=10, request_timeout=5.0)
    late, own, fresh = req("late", timeout=0.01), req("own"), req("fresh", timeout=60)
    s.add([late, own, fresh])
    assert own.timeout == 5.0 and fresh.timeout == 60  # the server's default unless the request has its own
    time.sleep(0.02)
    failed = []
    s.expire(lambda r, e: failed.append((r, e)))
    assert [r.name for r, _ in failed] == ["late"] and isinstance(failed[0][1], RequestTimeout)
    assert "timed out after 0.01s in the queue" in str(failed[0][1])
    assert [r.name for r in s.pending] == ["own", "fresh"]
    # admit() also ends a request found past its deadline rather than starting it.
    s.add([req("late2", timeout=0.01)])
    time.sleep(0.02)
    taken, _, failed = admit(s, 5)
    assert taken == ["own", "fresh"] and [n for n, _ in failed] == ["late2"]


def test_cancelled_requests_leave_the_queue_without_an_event():
    s = Scheduler(max_queue=10, request_timeout=None)
    events = []
    a, b = req("a", events=events), req("b", events=events)
    s.add([a, b])
    a.cancel()
    s.expire(lambda r, e: pytest.fail("a cancelled request is not failed"))
    assert a.finished and [r.name for r in s.pending] == ["b"] and events == []
    b.cancel()
    assert admit(s, 2) == ([], None, []) and b.finished and len(s) == 0


def test_stopping_refuses_new_requests_and_wakes_the_worker():
    s = Scheduler(max_queue=10, request_timeout=None)
    woke = threading.Event()
    t = threading.Thread(target=lambda: (s.wait_for_work(lambda: False), woke.set()))
    t.start()
    s.stop()
    t.join(5)
    assert woke.is_set()
    with pytest.raises(EngineStopped, match="shutting down"):
        s.add([req("a")])


def test_engine_ends_a_queued_request_at_its_deadline_while_the_batch_is_full():
    eng = TorchEngine(three_adapters(), max_batch_size=1)
    decode = eng._decode

    def slow_decode():  # a long step: the one running row holds the only slot for about a second
        time.sleep(0.03)
        decode()

    eng._decode = slow_decode
    done = {}

    def on_event(key):
        return lambda ev: ev.finish_reason and done.setdefault(key, (time.monotonic(), ev))

    eng.start()
    try:
        eng.submit([Request("a", [4, 5], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), on_event("long"))])
        t0 = time.monotonic()
        eng.submit([Request("b", [4], SamplingParams(max_tokens=2), on_event("queued"), timeout=0.2)])
        deadline = time.monotonic() + 10
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        eng.stop()
    at, ev = done["queued"]
    assert ev.finish_reason == "timeout" and isinstance(ev.error, RequestTimeout) and "in the queue" in str(ev.error)
    assert at - t0 < 0.2 + 0.3, "ended at its deadline (within a step), not when the running row finished"
    assert done["long"][1].finish_reason == "length" and done["long"][0] > at
