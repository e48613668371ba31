"""Prefix adapters on llama.cpp, for notebooks and scripts:

    import prefixtune.llamacpp as ptl
    gen = ptl.load("SmolLM2-135M-Instruct.Q4_1.gguf", adapters={"sentiment": "out/adapter"})
    gen.generate(["I loved it", "meh"], adapter_names=["sentiment", None], max_tokens=8)

Needs `pip install 'prefixtune[llamacpp]'`. The implementation lives in prefixtune.serving (llamacpp*.py).
"""

from .serving.llamacpp import SUPPORTED_ARCHS, LlamaCppError, LlamaCppModel
from .serving.llamacpp_engine import LlamaCppEngine, load
from .serving.offline import Generator

__all__ = ["load", "Generator", "LlamaCppEngine", "LlamaCppModel", "LlamaCppError", "SUPPORTED_ARCHS"]
