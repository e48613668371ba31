"""OpenAI-compatible HTTP server for one base model and many prefixes: `prefixtune serve`.

The `model` field of a request picks the adapter (or the base model by its own name). All generation
happens in an engine's worker thread (base.EngineBase: torch_engine or llamacpp_engine); this module only validates, queues and formats.

    GET  /v1/models                 POST /v1/completions      POST /v1/chat/completions
    POST /v1/adapters {name, path}  DELETE /v1/adapters/{name}
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
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .base import EngineBase, EngineError, Event, Request, SamplingParams, async_sink

log = logging.getLogger("prefixtune.serve")
MAX_BODY_BYTES = 4 << 20
MAX_STOP = 4
MAX_LOGPROBS = 20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(EngineError):
    def __init__(self, message: str, status: int = 400, param: str | None = None, headers: dict | None = None):
        super().__init__(message, status)
        self.param, self.headers = param, headers or {}


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

    def render(self, engine: EngineBase) -> str:
        out = ["# HELP prefixtune_requests_total Requests by endpoint and HTTP status.",
               "# TYPE prefixtune_requests_total counter"]
        for (ep, st), v in sorted(self.requests.items()):
            out.append(f'prefixtune_requests_total{{endpoint="{ep}",status="{st}"}} {v}')
        s = engine.stats
        for name, help_, val, kind in (
            ("prompt_tokens_total", "Prompt tokens prefilled.", s["prompt_tokens"], "counter"),
            ("generation_tokens_total", "Tokens generated.", s["completion_tokens"], "counter"),
            ("decode_steps_total", "Batched decode forward passes.", s["steps"], "counter"),
            ("queue_depth", "Requests waiting for a batch slot.", engine.queue_depth, "gauge"),
            ("batch_size", "Rows in the running batch now.", engine.running, "gauge"),
            ("adapters_loaded", "Adapters being served.", len(engine.adapter_names()), "gauge"),
        ):
            out += [f"# HELP prefixtune_{name} {help_}", f"# TYPE prefixtune_{name} {kind}", f"prefixtune_{name} {val}"]
        out += _histogram("prefixtune_request_latency_seconds", "Latency of successful generation requests.",
                          self.LATENCY_BUCKETS, self.latency, self.latency_sum, self.latency_count)
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


def _field(body: dict, key: str, kind, default=None, required: bool = False):
    """body[key] checked against `kind` ("int", "number", "bool", "str"), with a message naming the field."""
    if key not in body or body[key] is None:
        if required:
            raise ApiError(f"missing required field '{key}'", param=key)
        return default
    v = body[key]
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
    }[kind]
    if not ok:
        raise ApiError(f"'{key}' must be {'an' if kind == 'int' else 'a'} {kind}, got {type(v).__name__} {json.dumps(v)[:40]}", param=key)
    return v


def _sampling(body: dict, engine: EngineBase, default_max: int, chat: bool) -> tuple[SamplingParams, int, bool]:
    max_tokens = _field(body, "max_tokens", "int")
    if max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", "int", default_max)
    if max_tokens < 1:
        raise ApiError(f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = float(_field(body, "temperature", "number", 1.0))
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    top_p = float(_field(body, "top_p", "number", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise ApiError(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    n = _field(body, "n", "int", 1)
    if not 1 <= n <= engine.max_n:
        raise ApiError(f"'n' must be between 1 and {engine.max_n}, got {n}", param="n")
    seed = _field(body, "seed", "int")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty strings", param="stop")
    stream = _field(body, "stream", "bool", False)
    penalties = {}
    for key in ("presence_penalty", "frequency_penalty"):
        penalties[key] = float(_field(body, key, "number", 0.0))
        if not -2.0 <= penalties[key] <= 2.0:
            raise ApiError(f"'{key}' must be between -2 and 2, got {penalties[key]}", param=key)
    rep = float(_field(body, "repetition_penalty", "number", 1.0))
    if not 0.0 < rep <= 10.0:
        raise ApiError(f"'repetition_penalty' must be in (0, 10] (1 = off), got {rep}", param="repetition_penalty")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            stop=tuple(stop or ()), seed=seed, ignore_eos=bool(body.get("ignore_eos", False)),
                            repetition_penalty=rep, logit_bias=_logit_bias(body, engine), logprobs=_logprobs(body, chat),
                            **penalties)
    return params, n, stream


def _logit_bias(body: dict, engine: EngineBase) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    vocab = engine.vocab_size
    msg = f"'logit_bias' must map token ids (0 to {vocab - 1}, as strings) to numbers between -100 and 100"
    if not isinstance(bias, dict) or len(bias) > 300:
        raise ApiError(msg + " (at most 300 entries)", param="logit_bias")
    out = []
    for k, v in bias.items():
        if not (str(k).isdigit() and int(k) < vocab) or isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > 100:
            raise ApiError(f"{msg}; got {json.dumps({k: v})[:60]}", param="logit_bias")
        out.append((int(k), float(v)))
    return tuple(out)


def _logprobs(body: dict, chat: bool) -> int | None:
    """Completions: `logprobs` = k (0..MAX_LOGPROBS). Chat: `logprobs` true, `top_logprobs` = k."""
    if chat:
        top = _field(body, "top_logprobs", "int")
        if not _field(body, "logprobs", "bool", False):
            if top is not None:
                raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            return None
        k, key = (0 if top is None else top), "top_logprobs"
    else:
        k, key = _field(body, "logprobs", "int"), "logprobs"
        if k is None:
            return None
    if not 0 <= k <= MAX_LOGPROBS:
        raise ApiError(f"'{key}' must be between 0 and {MAX_LOGPROBS}, got {k}", param=key)
    return k


def _reject_unsupported(body: dict, chat: bool) -> None:
    """Fields we do not implement fail loudly instead of being silently ignored."""
    n = body.get("n", 1) or 1
    if body.get("best_of") not in (None, n):
        raise ApiError(f"'best_of' is not supported (only best_of == n = {n}); ask for n choices and rank them yourself", param="best_of")
    if body.get("suffix"):
        raise ApiError("'suffix' (insertion) is not supported", param="suffix")
    for key in ("tools", "functions"):
        if body.get(key):
            raise ApiError(f"'{key}' (function calling) is not supported by this server", param=key)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError("'response_format' other than {\"type\": \"text\"} (JSON mode, schemas) is not supported", param="response_format")
    if not chat and body.get("echo") and body.get("logprobs") is not None:
        raise ApiError("'echo' together with 'logprobs' (prompt logprobs) is not supported; use one of them", param="echo")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and isinstance(opts.get("include_usage", False), bool)):
        raise ApiError("'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")


def _check_capabilities(params: SamplingParams, echo: bool, engine: EngineBase) -> None:
    """A feature the engine cannot honour is a 400 naming the field, never a silently different result."""
    asked = {"logprobs": params.logprobs is not None, "logit_bias": bool(params.logit_bias),
             "repetition_penalty": params.repetition_penalty != 1.0, "presence_penalty": bool(params.presence_penalty),
             "frequency_penalty": bool(params.frequency_penalty), "seed": params.seed is not None, "echo": echo,
             "top_p": params.top_p < 1.0, "stop": bool(params.stop)}
    for feature, used in asked.items():
        if used and feature not in engine.capabilities:
            raise ApiError(f"'{feature}' is not supported by the {engine.backend} backend; drop it or serve with "
                           "--backend torch", param=feature)


def _prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one; larger batches: send one request each (or use n)
    return prompt


def _prompt_ids(body: dict, engine: EngineBase) -> list[int]:
    prompt = _prompt(body)
    if prompt is None:
        raise ApiError("missing required field 'prompt'", param="prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError("'prompt' is empty: send some text", param="prompt")
        return _tokenize(engine, prompt)
    vocab = engine.vocab_size
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab for t in prompt):
            raise ApiError(f"'prompt' token ids must be in [0, {vocab})", param="prompt")
        return prompt
    if isinstance(prompt, list) and not prompt:
        raise ApiError("'prompt' is empty: send some text", param="prompt")
    raise ApiError("'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


def _tokenize(engine: EngineBase, text: str, special: bool = True) -> list[int]:
    if engine.tokenizer is None:
        raise ApiError("this server has no tokenizer: send 'prompt' as a list of token ids")
    return list(engine.tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_ids(body: dict, engine: EngineBase) -> list[int]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError("missing required field 'messages'", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ApiError(f"messages[{i}] needs a 'role' in {list(CHAT_ROLES)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(f"messages[{i}].content parts must be text parts", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": m["role"], "content": content})
    if not any(m["content"] for m in clean):
        raise ApiError("'messages' are all empty: send some text", param="messages")
    tok = engine.tokenizer
    if tok is None:
        raise ApiError("this server has no tokenizer, so chat is unavailable; use /v1/completions with token ids")
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
        return _tokenize(engine, text, special=False)  # the template writes its own special tokens
    text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
    return _tokenize(engine, text)


# ---- responses ------------------------------------------------------------------------------------------
def _error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {404: "not_found_error", 408: "timeout_error", 429: "rate_limit_error", 503: "unavailable_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _prompt_text(body: dict, ids: list[int], engine: EngineBase) -> str:
    prompt = _prompt(body)
    if isinstance(prompt, str):
        return prompt
    return engine.tokenizer.decode(ids) if engine.tokenizer is not None else ""


class _LogprobFormat:
    """Collects per-token logprobs from engine events and renders them the OpenAI way, per choice index:
    completions {tokens, token_logprobs, top_logprobs, text_offset}; chat {content: [{token, logprob, bytes,
    top_logprobs}]}. Token strings are each id decoded alone."""

    def __init__(self, engine: EngineBase, chat: bool, offset: int):
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


def create_app(engine: EngineBase) -> FastAPI:
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

    @app.exception_handler(EngineError)
    async def engine_error(request: HttpRequest, exc: EngineError):
        metrics.record(request.url.path, exc.status)
        headers = dict(getattr(exc, "headers", {}))
        if exc.status == 429:
            headers["Retry-After"] = str(getattr(exc, "retry_after", 1))
        return JSONResponse(_error_body(str(exc), exc.status, getattr(exc, "param", None)), exc.status, headers=headers)

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
        created = int(time.time())
        data = [{"id": engine.model_name, "object": "model", "created": created, "owned_by": "prefixtune", "parent": None}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "prefixtune", "parent": engine.model_name}
                 for n in engine.adapter_names()]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: HttpRequest):
        body = await _json_body(request)
        name = _field(body, "name", "str", required=True)
        path = _field(body, "path", "str", required=True)
        await asyncio.to_thread(engine.load_adapter, name, path)  # waits for the current step, not the batch
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

    async def _generate(request: HttpRequest, chat: bool):
        t0 = time.monotonic()
        endpoint = request.url.path
        body = await _json_body(request)
        model_name = _field(body, "model", "str", required=True)
        adapter = engine.adapter_for(model_name)
        _reject_unsupported(body, chat)
        ids = _chat_ids(body, engine) if chat else _prompt_ids(body, engine)
        default_max = max(1, min(256, engine.max_total_tokens - len(ids))) if chat else 16
        params, n, stream = _sampling(body, engine, default_max, chat)
        engine.check_limits(len(ids), params.max_tokens, adapter)
        echo = "" if chat or not _field(body, "echo", "bool", False) else _prompt_text(body, ids, engine)
        _check_capabilities(params, bool(echo), engine)
        usage_chunk = (body.get("stream_options") or {}).get("include_usage", True)

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
            return StreamingResponse(_stream(reqs, queue, meta, chat, endpoint, t0, echo, lp, usage_chunk),
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
                        raise ApiError(ev.error, ev.status)
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

    async def _stream(reqs, queue, meta, chat, endpoint, t0, echo, lp, usage_chunk):
        meta = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
        n, done, completion_tokens, status = len(reqs), 0, 0, 200

        def chunk(i, text, finish):
            logprobs = lp.take(i) if lp else None
            if chat:
                return {**meta, "choices": [{"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish, "logprobs": logprobs}]}
            return {**meta, "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

        try:
            for i in range(n):
                if chat:
                    yield _sse({**meta, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]})
                elif echo:
                    yield _sse({**meta, "choices": [{"index": i, "text": echo, "finish_reason": None, "logprobs": None}]})
            while done < n:
                ev = await queue.get()
                if ev.error:  # headers are gone already: report in-band, as OpenAI does
                    status = ev.status
                    yield _sse(_error_body(ev.error, ev.status))
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

    return app


# ---- loading and CLI ---------------------------------------------------------------------------------------
def build_engine(model_path: str, adapters_dir: str | None = None, **limits) -> EngineBase:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..model import PrefixModel
    from .torch_engine import TorchEngine

    config = AutoConfig.from_pretrained(model_path)
    if getattr(config, "is_encoder_decoder", False):
        raise SystemExit(f"{model_path} is an encoder-decoder model ({config.model_type}); serving supports decoder-only models")
    base = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    name = Path(str(model_path).rstrip("/")).name
    engine = TorchEngine(PrefixModel(base), tokenizer, model_name=name, adapters_dir=adapters_dir, **limits)
    loaded = engine.load_dir()
    log.info("serving %s with %d adapter(s): %s", name, len(loaded), ", ".join(loaded) or "-")
    return engine


def run_server(model_path: str, adapters_dir: str | None = None, host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    graceful = limits.pop("graceful_timeout", None)
    engine = build_engine(model_path, adapters_dir, **limits)
    # uvicorn on SIGINT/SIGTERM: stop accepting, let open requests finish, then our lifespan drains the engine.
    uvicorn.run(create_app(engine), host=host, port=port, timeout_graceful_shutdown=graceful, log_level="info")


def add_serve_args(p) -> None:
    p.add_argument("--model", required=True, help="base model directory (or hub id already in the local cache)")
    p.add_argument("--adapters", default=None, help="directory whose adapter subdirectories are served by name")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-total-tokens", type=int, default=None, help="prompt + max_tokens (default: the model's context)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--graceful-timeout", type=float, default=None, help="seconds to wait for in-flight requests on shutdown")


def main(argv: list[str] | None = None) -> int:
    """`prefixtune serve ...` (cli.py hands us the arguments after 'serve')."""
    import argparse

    p = argparse.ArgumentParser(prog="prefixtune serve", description="OpenAI-compatible server for one base model + adapters")
    add_serve_args(p)
    return serve_main(p.parse_args(argv))


def serve_main(args) -> int:
    run_server(args.model, args.adapters, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
               max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
               max_total_tokens=args.max_total_tokens, request_timeout=args.timeout,
               graceful_timeout=args.graceful_timeout)
    return 0
