"""The OpenAI request bodies as pydantic models (as vLLM's protocol.py does), and the mapping of their validation
errors to OpenAI-style 400s that name the field.

Types are strict (a string is not an int, `true` is not a number), so a malformed field is refused rather than
coerced. Ranges are pydantic constraints on the fields (`Field(ge=, gt=, le=)`); `error_message` states the
declared range in the 400. Limits that depend on the engine (vocabulary size, largest n) come in through the validation context:
`CompletionRequest.model_validate(body, context={"vocab_size": V, "max_n": N})`. Fields the server does not
implement are refused by name instead of being silently ignored; other unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .request import SamplingParams

MAX_STOP = 4
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]  # strict float still takes JSON integers, never booleans or strings
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]

_KINDS = {"int_type": "int", "int_parsing": "int", "int_from_float": "int", "float_type": "number",
          "float_parsing": "number", "bool_type": "bool", "bool_parsing": "bool", "string_type": "str"}


_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def bounds_text(lo=None, hi=None, lo_open: bool = False) -> str:
    """A field's range as the message states it: 'between 0 and 2', 'in (0, 1]', 'at least 1'."""
    if lo is not None and hi is not None:
        return f"in ({lo}, {hi}]" if lo_open else f"between {lo} and {hi}"
    if lo is not None:
        return f"greater than {lo}" if lo_open else f"at least {lo}"
    return f"at most {hi}"


def _field_bounds(model: type[BaseModel] | None, name: str) -> str | None:
    """The whole range declared on `model.name` (Field(ge=, gt=, le=)), so a message states both ends."""
    info = model.model_fields.get(name) if model is not None else None
    if info is None:
        return None
    found = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le") if getattr(m, k, None) is not None}
    if not found:
        return None
    return bounds_text(found.get("ge", found.get("gt")), found.get("le"), lo_open="gt" in found)


def error_message(exc: ValidationError, model: type[BaseModel] | None = None) -> tuple[str, str | None]:
    """The first validation error as (message naming the field, param); a range error states the field's range."""
    err = exc.errors(include_url=False)[0]
    loc = err["loc"]
    param = str(loc[0]) if loc else None
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    kind = _KINDS.get(err["type"])
    if err["type"] == "missing" or (kind and err["input"] is None):  # null counts as absent
        return f"missing required field '{where}'", param
    if kind:
        v = err["input"]
        return f"'{where}' must be {'an' if kind == 'int' else 'a'} {kind}, got {type(v).__name__} {json.dumps(v)[:40]}", param
    if err["type"] in _BOUNDS:
        rng = (len(loc) == 1 and _field_bounds(model, param)) or err["msg"].removeprefix("Input should be ")
        return f"'{where}' must be {rng}, got {json.dumps(err['input'])[:40]}", param
    if err["type"] == "literal_error":
        return f"'{where}' must be one of {err['ctx']['expected']}, got {json.dumps(err['input'])[:40]}", param
    if err["type"] == "value_error":  # our own validators write the whole message
        e = err["ctx"]["error"]
        return str(e), getattr(e, "param", param)
    return f"'{where}': {err['msg']}", param


def _ctx(info: ValidationInfo, key: str, default):
    return (info.context or {}).get(key, default)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Bool | None = None


class _Generate(BaseModel):
    """Fields shared by completions and chat."""

    model_config = ConfigDict(extra="ignore")

    model: Str
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    n: Int | None = None  # its upper bound is the engine's, known at validation only (_n)
    seed: Int | None = None
    stop: Any = None
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    repetition_penalty: Number | None = Field(None, gt=0, le=10)  # 1 = off
    logit_bias: Any = None
    ignore_eos: Bool | None = None
    # Refused when set (see _refuse_unsupported).
    best_of: Any = None
    tools: Any = None
    functions: Any = None
    response_format: Any = None

    @field_validator("n")
    @classmethod
    def _n(cls, v, info: ValidationInfo):
        max_n = _ctx(info, "max_n", 8)
        if v is not None and not 1 <= v <= max_n:
            raise ValueError(f"'n' must be {bounds_text(1, max_n)}, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stop = [v] if isinstance(v, str) else v
        if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
        return tuple(stop or ())

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v, info: ValidationInfo):
        if v is None:
            return ()
        vocab = _ctx(info, "vocab_size", None)
        bound = f"0 to {vocab - 1}" if vocab else "non-negative"
        msg = f"'logit_bias' must map token ids ({bound}, as strings) to numbers between -100 and 100"
        if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
            raise ValueError(msg + f" (at most {MAX_LOGIT_BIAS} entries)")
        out = []
        for k, b in v.items():
            if (not (str(k).isdigit() and (vocab is None or int(k) < vocab)) or isinstance(b, bool)
                    or not isinstance(b, (int, float)) or abs(b) > 100):
                raise ValueError(f"{msg}; got {json.dumps({k: b})[:60]}")
            out.append((int(k), float(b)))
        return tuple(out)

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        """Fields we do not implement fail loudly instead of being silently ignored."""
        n = self.n or 1
        if self.best_of not in (None, n):
            raise _field_error("best_of", f"'best_of' is not supported (only best_of == n = {n}); ask for n choices and rank them yourself")
        for key in ("tools", "functions"):
            if getattr(self, key):
                raise _field_error(key, f"'{key}' (function calling) is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "'stream_options' is only allowed with 'stream': true")
        fmt = self.response_format
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise _field_error("response_format", "'response_format' other than {\"type\": \"text\"} (JSON mode, schemas) is not supported")
        return self

    # ---- to the engine -------------------------------------------------------------------------------------
    @property
    def include_usage(self) -> bool:
        """A stream ends with a usage chunk only when asked, as OpenAI's does (clients index choices[0])."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, default_max: int) -> SamplingParams:
        max_tokens = self.max_tokens or self.max_completion_tokens or default_max
        return SamplingParams(
            max_tokens=max_tokens, temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0), stop=self.stop or (),
            seed=self.seed, ignore_eos=bool(self.ignore_eos), presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0), repetition_penalty=_or(self.repetition_penalty, 1.0),
            logit_bias=self.logit_bias or (), logprobs=self.top_k_logprobs)


class _FieldError(ValueError):
    """A model-level refusal that still names its field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _field_error(param: str, message: str) -> _FieldError:
    return _FieldError(param, message)


def _or(v, default):
    return default if v is None else v


class CompletionRequest(_Generate):
    prompt: Any = Field(default=None, validate_default=True)
    echo: Bool | None = None
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v, info: ValidationInfo):
        if v is None:
            raise ValueError("missing required field 'prompt'")
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            v = v[0]  # a batch of one; larger batches: send one request each (or use n)
        if isinstance(v, str) or (isinstance(v, list) and not v):
            if not v:
                raise ValueError("'prompt' is empty: send some text")
            return v
        if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            vocab = _ctx(info, "vocab_size", None)
            if vocab is not None and not all(0 <= t < vocab for t in v):
                raise ValueError(f"'prompt' token ids must be in [0, {vocab})")
            return v
        raise ValueError("'prompt' must be a string or a list of token ids (one prompt per request)")

    @model_validator(mode="after")
    def _completion_only(self):
        if self.suffix:
            raise _field_error("suffix", "'suffix' (insertion) is not supported")
        if self.echo and self.logprobs is not None:
            raise _field_error("echo", "'echo' together with 'logprobs' (prompt logprobs) is not supported; use one of them")
        return self

    @property
    def top_k_logprobs(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(_Generate):
    messages: Any = Field(default=None, validate_default=True)
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, msgs):
        """-> [{role, content: str}], text parts joined."""
        if msgs is None:
            raise ValueError("missing required field 'messages'")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise ValueError(f"messages[{i}] needs a 'role' in {list(CHAT_ROLES)}")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise ValueError(f"messages[{i}].content parts must be text parts")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
            clean.append({"role": m["role"], "content": content})
        if not any(m["content"] for m in clean):
            raise ValueError("'messages' are all empty: send some text")
        return clean

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return self

    @property
    def top_k_logprobs(self) -> int | None:
        """Chat: `logprobs` true asks for the chosen token's logprob, `top_logprobs` = k alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Str
    path: Str
