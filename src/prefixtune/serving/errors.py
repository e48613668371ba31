"""What an engine refuses, as types: the web side (api.py) alone decides how each is answered.

Every error carries a message written for the person who sent the request: what is wrong and what to do.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a request or command the engine refuses."""


class InvalidRequest(EngineError):
    """The request itself is wrong (empty prompt, too many tokens, a bad name or path)."""


class LoadingDisabled(EngineError):
    """Hot loading was asked for, but the engine has no adapters directory."""


class UnknownAdapter(EngineError):
    """The request names an adapter the engine does not know (or no longer has)."""


class AdapterExists(EngineError):
    """A load under a name that is already taken (or is the base model's)."""


class AdapterLoadFailed(EngineError):
    """The adapter exists but cannot serve: corrupt file, made for another model, wrong placement."""


class QueueFull(EngineError):
    """Too many requests wait already; `retry_after` seconds is a fair wait before retrying."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class CapacityUnavailable(EngineError):
    """The engine cannot take this now (KV cells, adapter memory); the same request may succeed later."""


class EngineStopped(EngineError):
    """The engine is shutting down and takes no new requests."""


class RequestTimeout(EngineError):
    """The request ran (or waited) past its deadline."""


class GenerationFailed(EngineError):
    """The model step raised; the request's rows were dropped, the engine goes on."""
