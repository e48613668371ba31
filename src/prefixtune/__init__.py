"""prefixtune: prefix tuning for Hugging Face transformers models."""

from .config import ConfigError, PrefixConfig
from .hub import HubError
from .model import PrefixModel, attach, load_adapter

__all__ = ["ConfigError", "HubError", "PrefixConfig", "PrefixModel", "attach", "load_adapter"]
__version__ = "0.1.0"
