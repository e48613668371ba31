"""prefixtune: prefix tuning for Hugging Face transformers models."""

from .config import ConfigError, PrefixConfig
from .model import PrefixModel, attach, load_adapter

__all__ = ["ConfigError", "PrefixConfig", "PrefixModel", "attach", "load_adapter"]
__version__ = "0.1.0"
