"""OpenAI-compatible HTTP server for one base model and many prefixes: `prefixtune serve`.

The `model` field of a request picks the adapter (or the base model by its own name; "a+b" composes two
prefixes in that order). All generation happens in an engine's worker thread (engine.Engine: torch_engine,
llamacpp_engine); this module only validates, queues and formats, and it is the one place that knows HTTP:
STATUS maps each typed engine error to its status.

    GET  /v1/models                 POST /v1/completions      POST /v1/chat/completions
    POST /v1/adapters {name, path}  DELETE /v1/adapters/{name}  POST /v1/adapters/rescan
    GET  /health                    GET  /metrics (Prometheus text)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from .. import knowledge
from . import errors as E
from .engine import Engine
from .protocol import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, error_message
from .registry import LOAD_SECONDS_BUCKETS
from .request import Event, Request, SamplingParams

log = logging.getLogger("prefixtune.serve")
MAX_BODY_BYTES = 4 << 20

# The one table from engine errors to HTTP statuses (the most specific class listed wins).
STATUS: dict[type, int] = {
    E.InvalidRequest: 400, E.LoadingDisabled: 403, E.UnknownAdapter: 404, E.RequestTimeout: 408,
    E.AdapterExists: 409, E.AdapterLoadFailed: 422, E.QueueFull: 429, E.GenerationFailed: 500,
    E.CapacityUnavailable: 503, E.EngineStopped: 503, E.EngineError: 400,
}


def status_of(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


class ApiError(Exception):
    """A request the HTTP layer itself refuses (body, fields, capabilities)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def async_sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """An on_event callback that hands events from the engine's worker thread to an asyncio queue."""

    def put(ev: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    return put


# ---- metrics -----------------------------------------------------------------------------------------
class Metrics:
    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = [0] * len(self.LATENCY_BUCKETS)
        self.latency_sum, self.latency_count = 0.0, 0

    def record(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if seconds is not None and status < 400:
            self.latency_sum += seconds
            self.latency_count += 1
            for i, b in enumerate(self.LATENCY_BUCKETS):
                if seconds <= b:
                    self.latency[i] += 1

    def render(self, engine: Engine) -> str:
        out = ["# HELP prefixtune_requests_total Requests by endpoint and HTTP status.",
               "# TYPE prefixtune_requests_total counter"]
        for (ep, st), v in sorted(self.requests.items()):
            out.append(f'prefixtune_requests_total{{endpoint="{ep}",status="{st}"}} {v}')
        s, reg = engine.stats, engine.registry
        for name, help_, val, kind in (
            ("prompt_tokens_total", "Prompt tokens prefilled.", s["prompt_tokens"], "counter"),
            ("generation_tokens_total", "Tokens generated.", s["completion_tokens"], "counter"),
            ("decode_steps_total", "Batched decode forward passes.", s["steps"], "counter"),
            ("queue_depth", "Requests waiting for a batch slot.", engine.queue_depth, "gauge"),
            ("batch_size", "Rows in the running batch now.", engine.running, "gauge"),
            ("adapters_known", "Adapters the server can serve (indexed).", len(engine.adapter_names()), "gauge"),
            ("adapters_loaded", "Adapters resident in memory.", len(reg.resident_names()), "gauge"),
            ("adapter_bytes", "Bytes the resident adapters hold.", reg.resident_bytes(), "gauge"),
            ("adapter_hits_total", "Requests whose adapter was resident.", reg.stats["hits"], "counter"),
            ("adapter_misses_total", "Adapter loads on demand.", reg.stats["misses"], "counter"),
            ("adapter_evictions_total", "Adapters evicted to stay within the budget.", reg.stats["evictions"], "counter"),
            ("adapter_load_failures_total", "Adapter loads that failed.", reg.stats["load_failures"], "counter"),
        ):
            out += [f"# HELP prefixtune_{name} {help_}", f"# TYPE prefixtune_{name} {kind}", f"prefixtune_{name} {val}"]
        out += _histogram("prefixtune_request_latency_seconds", "Latency of successful generation requests.",
                          self.LATENCY_BUCKETS, self.latency, self.latency_sum, self.latency_count)
        out += _histogram("prefixtune_adapter_load_seconds", "Time to load an adapter on demand.", LOAD_SECONDS_BUCKETS,
                          reg.load_seconds, reg.load_seconds_sum, reg.load_seconds_count)
        hist = dict(engine.batch_hist)
        counts = [sum(c for n, c in hist.items() if n <= b) for b in self.BATCH_BUCKETS]
        out += _histogram("prefixtune_step_batch_size", "Rows per decode step.", self.BATCH_BUCKETS, counts,
                          sum(n * c for n, c in hist.items()), sum(hist.values()))
        return "\n".join(out) + "\n"


def _histogram(name, help_, buckets, counts, total, count):
    out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(buckets, counts)]
    return out + [f'{name}_bucket{{le="+Inf"}} {count}', f"{name}_sum {total}", f"{name}_count {count}"]


# ---- request validation --------------------------------------------------------------------------------
async def _json_body(request: HttpRequest) -> dict:
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(f"request body is {size} bytes; the limit is {MAX_BODY_BYTES}", 413)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", 413)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _parse(model, body: dict, engine: Engine):
    """body -> a protocol model; a validation error becomes a 400 naming the field."""
    try:
        return model.model_validate(body, context={"vocab_size": engine.vocab_size, "max_n": engine.max_n})
    except ValidationError as e:
        message, param = error_message(e)
        raise ApiError(message, param=param) from None


def _check_capabilities(params: SamplingParams, echo: bool, engine: Engine) -> None:
    """A feature the engine cannot honour is a 400 naming the field, never a silently different result."""
    asked = {"logprobs": params.logprobs is not None, "logit_bias": bool(params.logit_bias),
             "repetition_penalty": params.repetition_penalty != 1.0, "presence_penalty": bool(params.presence_penalty),
             "frequency_penalty": bool(params.frequency_penalty), "seed": params.seed is not None, "echo": echo,
             "top_p": params.top_p < 1.0, "stop": bool(params.stop)}
    for feature, used in asked.items():
        if used and feature not in engine.capabilities:
            raise ApiError(f"'{feature}' is not supported by the {engine.backend} backend; drop it or serve with "
                           "--backend torch", param=feature)


def _prompt_ids(req: CompletionRequest, engine: Engine) -> list[int]:
    return _tokenize(engine, req.prompt) if isinstance(req.prompt, str) else list(req.prompt)


def _tokenize(engine: Engine, text: str, special: bool = True) -> list[int]:
    if engine.tokenizer is None:
        raise ApiError("this server has no tokenizer: send 'prompt' as a list of token ids")
    return list(engine.tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_ids(req: ChatCompletionRequest, engine: Engine) -> list[int]:
    if engine.tokenizer is None:
        raise ApiError("this server has no tokenizer, so chat is unavailable; use /v1/completions with token ids")
    try:  # a knowledge prefix's request in its trained layout, any other by the chat template
        return knowledge.request_ids(engine.tokenizer, req.messages, engine.registry.layout_of(req.model))
    except knowledge.LayoutError as e:
        raise ApiError(str(e), param="messages") from None


# ---- responses ------------------------------------------------------------------------------------------
def _error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {404: "not_found_error", 408: "timeout_error", 429: "rate_limit_error", 503: "unavailable_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _prompt_text(req: CompletionRequest, ids: list[int], engine: Engine) -> str:
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt
    return engine.tokenizer.decode(ids) if engine.tokenizer is not None else ""


class _LogprobFormat:
    """Collects per-token logprobs from engine events and renders them the OpenAI way, per choice index:
    completions {tokens, token_logprobs, top_logprobs, text_offset}; chat {content: [{token, logprob, bytes,
    top_logprobs}]}. Token strings are each id decoded alone."""

    def __init__(self, engine: Engine, chat: bool, offset: int):
        self.engine, self.chat, self.start = engine, chat, offset
        self.pending: dict[int, list] = {}
        self.offset: dict[int, int] = {}

    def _tok(self, i: int) -> str:
        tok = self.engine.tokenizer
        return tok.decode([i]) if tok is not None else str(i)

    def add(self, ev: Event) -> None:
        self.pending.setdefault(ev.index, []).extend(zip(ev.token_ids, ev.logprobs))  # zip: an EOS has no logprob

    def take(self, index: int):
        items = self.pending.pop(index, [])
        if self.chat:
            def entry(tid, lp):
                s = self._tok(tid)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(tid, lp), "top_logprobs": [entry(t, v) for t, v in top]}
                                for tid, (lp, top) in items]}
        tokens = [self._tok(tid) for tid, _ in items]
        offsets, at = [], self.offset.get(index, self.start)
        for s in tokens:
            offsets.append(at)
            at += len(s)
        self.offset[index] = at
        return {"tokens": tokens, "token_logprobs": [lp for _, (lp, _) in items],
                "top_logprobs": [{self._tok(t): v for t, v in top} for _, (_, top) in items], "text_offset": offsets}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _model_list(engine: Engine) -> dict:
    """The base model, then every adapter the server can serve, loaded or not (OpenAI's fields, then ours)."""
    created = int(time.time())
    data = [{"id": engine.model_name, "object": "model", "created": created, "owned_by": "prefixtune", "parent": None}]
    data += [{"id": e.name, "object": "model", "created": created, "owned_by": "prefixtune", "parent": engine.model_name,
              "resident": e.resident, "num_virtual_tokens": e.num_virtual_tokens, "base_model": e.base_model,
              "pinned": e.pinned, **({"error": e.problem} if e.problem else {})}
             for e in engine.registry.entries()]
    return {"object": "list", "data": data}


class Completions:
    """POST /v1/completions and /v1/chat/completions: validate, submit to the engine, collect or stream events."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics

    async def __call__(self, request: HttpRequest, chat: bool):
        engine, metrics = self.engine, self.metrics
        t0 = time.monotonic()
        endpoint = request.url.path
        req = _parse(ChatCompletionRequest if chat else CompletionRequest, await _json_body(request), engine)
        model_name = req.model
        adapter = engine.adapter_for(model_name)
        ids = _chat_ids(req, engine) if chat else _prompt_ids(req, engine)
        default_max = max(1, min(256, engine.max_total_tokens - len(ids))) if chat else 16
        params, n, stream = req.sampling(default_max), req.n or 1, bool(req.stream)
        engine.check_limits(len(ids), params.max_tokens, adapter)
        echo = "" if chat or not req.echo else _prompt_text(req, ids, engine)
        _check_capabilities(params, bool(echo), engine)
        usage_chunk = req.include_usage

        queue: asyncio.Queue[Event] = asyncio.Queue()
        sink = async_sink(asyncio.get_running_loop(), queue)
        reqs = [Request(adapter, ids, replace(params, seed=None if params.seed is None else params.seed + i), sink, index=i)
                for i in range(n)]
        engine.submit(reqs)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}
        lp = _LogprobFormat(engine, chat, len(echo)) if params.logprobs is not None else None
        if stream:
            return StreamingResponse(self._stream(reqs, queue, meta, chat, endpoint, t0, echo, lp, usage_chunk),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            texts, finishes, done = [echo] * n, [None] * n, 0
            completion_tokens = 0
            while done < n:
                ev = await queue.get()
                texts[ev.index] += ev.text
                if lp:
                    lp.add(ev)
                if ev.finish_reason:
                    if ev.error:
                        raise ev.error
                    finishes[ev.index], done = ev.finish_reason, done + 1
                    completion_tokens += ev.completion_tokens
        finally:
            for r in reqs:
                r.cancel()  # no-op for finished rows; frees the others if we bailed out
        logprobs = [lp.take(i) if lp else None for i in range(n)]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": l}
                       for i, (t, f, l) in enumerate(zip(texts, finishes, logprobs))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": l}
                       for i, (t, f, l) in enumerate(zip(texts, finishes, logprobs))]
        usage = {"prompt_tokens": len(ids), "completion_tokens": completion_tokens, "total_tokens": len(ids) + completion_tokens}
        metrics.record(endpoint, 200, time.monotonic() - t0)
        return {**meta, "choices": choices, "usage": usage}

    async def _stream(self, reqs, queue, meta, chat, endpoint, t0, echo, lp, usage_chunk):
        metrics = self.metrics
        meta = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
        n, done, completion_tokens, status = len(reqs), 0, 0, 200

        def chunk(i, text, finish):
            logprobs = lp.take(i) if lp else None
            if chat:
                return {**meta, "choices": [{"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish, "logprobs": logprobs}]}  # noqa: E501
            return {**meta, "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

        try:
            for i in range(n):
                if chat:
                    yield _sse({**meta, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]})  # noqa: E501
                elif echo:
                    yield _sse({**meta, "choices": [{"index": i, "text": echo, "finish_reason": None, "logprobs": None}]})
            while done < n:
                ev = await queue.get()
                if ev.error:  # headers are gone already: report in-band, as OpenAI does
                    status = status_of(ev.error)
                    yield _sse(_error_body(str(ev.error), status))
                    break
                if lp:
                    lp.add(ev)  # held-back tokens (a possible stop string) ride on the next chunk that has text
                if ev.text or ev.finish_reason:
                    yield _sse(chunk(ev.index, ev.text, ev.finish_reason))
                if ev.finish_reason:
                    done += 1
                    completion_tokens += ev.completion_tokens
            if usage_chunk:
                prompt = len(reqs[0].prompt_ids)
                yield _sse({**meta, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                                                             "total_tokens": prompt + completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                r.cancel()  # client disconnects land here: the rows leave the batch at the next step
            metrics.record(endpoint, status, time.monotonic() - t0)


def create_app(engine: Engine) -> FastAPI:
    """The web app around a (started or not) engine; the app's lifespan starts it and drains it on shutdown."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # uvicorn has already waited for open connections; finish whatever is still queued, then stop.
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="prefixtune", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    _generate = Completions(engine, metrics)

    def error_response(request: HttpRequest, exc: Exception, status: int):
        metrics.record(request.url.path, status)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, E.QueueFull) else {}
        return JSONResponse(_error_body(str(exc), status, getattr(exc, "param", None)), status, headers=headers)

    @app.exception_handler(E.EngineError)
    async def engine_error(request: HttpRequest, exc: E.EngineError):
        return error_response(request, exc, status_of(exc))

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError):
        return error_response(request, exc, exc.status)

    @app.get("/health")
    async def health():
        alive = engine.is_alive()
        body = {"status": "ok" if alive else "unavailable", "model": engine.model_name,
                "adapters": engine.adapter_names(), "queue_depth": engine.queue_depth, "running": engine.running}
        return JSONResponse(body, 200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return _model_list(engine)

    @app.post("/v1/adapters/rescan")
    async def rescan():
        """Index adapter directories added to (or removed from) --adapters since start-up."""
        found = await asyncio.to_thread(engine.rescan)
        metrics.record("/v1/adapters/rescan", 200)
        return {"object": "list", **found, "adapters": len(engine.adapter_names())}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: HttpRequest):
        req = _parse(LoadAdapterRequest, await _json_body(request), engine)
        name = req.name
        await asyncio.to_thread(engine.load_adapter, path=req.path, name=name)  # waits for the current step, not the batch
        metrics.record("/v1/adapters", 201)
        return {"id": name, "object": "model", "parent": engine.model_name}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        if name == engine.model_name:
            raise ApiError(f"{name!r} is the base model; it cannot be unloaded", 400)
        await asyncio.to_thread(engine.unload_adapter, name)
        metrics.record("/v1/adapters", 200)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await _generate(request, chat=True)

    return app
