"""Old import path: the PyTorch engine is serving.torch_engine.TorchEngine, the shared pieces live in serving.base."""

from .base import EngineBase, EngineError, EngineStopped, Event, QueueFull, Request, SamplingParams, async_sink  # noqa: F401
from .torch_engine import TorchEngine as Engine  # noqa: F401
