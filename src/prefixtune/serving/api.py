"""OpenAI-compatible HTTP server for one base model and many prefixes: `prefixtune serve`.

The `model` field of a request picks the adapter (or the base model by its own name; "a+b" composes two
prefixes in that order). All generation happens in an engine's worker thread (engine.Engine: torch_engine,
llamacpp_engine); this module only validates, queues and formats, and it is the one place that knows HTTP:
STATUS maps each typed engine error to its status.

    GET  /v1/models                 POST /v1/completions      POST /v1/chat/completions
    POST /v1/adapters {name, path}  DELETE /v1/adapters/{name}  POST /v1/adapters/rescan
    GET  /health                    GET  /metrics (Prometheus text, metrics.py)

Streams follow OpenAI's API reference: one chunk per text delta ("chat.completion.chunk" / "text_completion"),
the finish_reason on each choice's last chunk, a usage chunk (empty `choices`) only when the request sets
`stream_options.include_usage` (then every other chunk carries `"usage": null`), then `data: [DONE]`.
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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .. import knowledge
from . import errors as E
from .engine import Engine
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, error_message
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
        message, param = error_message(e, model)
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

    def __init__(self, engine: Engine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        self.in_flight: set[asyncio.Queue] = set()  # each open request's event queue

    def abort_in_flight(self, error: E.EngineError) -> None:
        """End every open request now with `error` (a stream in-band, then [DONE]; a plain request as its status):
        what the server does just before its graceful-shutdown timeout would cut the connections."""
        for queue in list(self.in_flight):
            queue.put_nowait(Event(index=0, finish_reason="error", error=error))

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
        self.in_flight.add(queue)
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
            self.in_flight.discard(queue)
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
        if usage_chunk:
            meta["usage"] = None  # OpenAI: with include_usage every chunk has the field, null until the last
        n, done, completion_tokens, status = len(reqs), 0, 0, 200

        def chunk(i, text, finish, role=False):
            logprobs = lp.take(i) if lp and not role else None
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return _sse({**meta, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
            return _sse({**meta, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        try:
            for i in range(n):
                if chat:
                    yield chunk(i, "", None, role=True)
                elif echo:
                    yield chunk(i, echo, None, role=True)
            while done < n:
                ev = await queue.get()
                if ev.error:  # headers are gone already: report in-band, as OpenAI does
                    status = status_of(ev.error)
                    yield _sse(_error_body(str(ev.error), status))
                    break
                if lp:
                    lp.add(ev)  # held-back tokens (a possible stop string) ride on the next chunk that has text
                if ev.text or ev.finish_reason:
                    yield chunk(ev.index, ev.text, ev.finish_reason)
                if ev.finish_reason:
                    done += 1
                    completion_tokens += ev.completion_tokens
            if usage_chunk and status == 200:
                prompt = len(reqs[0].prompt_ids)
                yield _sse({**meta, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                                                             "total_tokens": prompt + completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight.discard(queue)
            for r in reqs:
                r.cancel()  # client disconnects land here: the rows leave the batch at the next step
            metrics.record(endpoint, status, time.monotonic() - t0)


def create_app(engine: Engine) -> FastAPI:
    """The web app around a (started or not) engine; the app's lifespan starts it and drains it on shutdown."""
    metrics = ServerMetrics(engine)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # uvicorn has already waited for open connections (SIGTERM/SIGINT); finish whatever is still queued, then
        # close the engine, which also ends every process the backend started (vLLM's engine core and workers).
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="prefixtune", lifespan=lifespan)
    _generate = Completions(engine, metrics)
    app.state.engine, app.state.metrics, app.state.completions = engine, metrics, _generate

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
    async def prometheus(request: HttpRequest):
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

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
