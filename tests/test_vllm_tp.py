"""vLLM tensor parallelism: each rank's KV cache holds its slice of the KV heads, and the connector writes only that
slice of every prefix. TP=2 on CPU (vLLM's multiproc executor, one core per rank), greedy tokens equal to
PrefixModel.generate for two adapters mixed with bare rows, with the KV heads split (2 heads: one each) and replicated
(1 head: both ranks hold it). Opt-in (`-m vllm`), in the vLLM environment (tests/test_vllm.py says how).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import id_tokenizer
from test_vllm import NEW, VOCAB, engine_kw, reference, tiny_llama

import prefixtune as pt
from prefixtune.config import ConfigError

ADAPTERS = {"a16": 16, "a20": 20}
N_PROMPTS = 8


def build(root, kv_heads: int) -> dict:
    hf = tiny_llama(kv_heads=kv_heads)
    hf.save_pretrained(root / "model")
    id_tokenizer().save_pretrained(root / "model")
    first, *rest = ADAPTERS
    model = pt.attach(hf, pt.PrefixConfig(num_virtual_tokens=ADAPTERS[first]), first)
    for name in rest:
        model.add_adapter(name, pt.PrefixConfig(num_virtual_tokens=ADAPTERS[name]))
    with torch.no_grad():  # random prefixes at twice the unit scale change every logit
        for enc in model.prefixes.values():
            for p in enc.parameters():
                p.copy_(torch.randn_like(p) * 2)
    for name in ADAPTERS:
        model.save_adapter(root / "adapters" / name, name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N_PROMPTS)]
    names = [*ADAPTERS, None]
    rows = [(p, names[(i + j) % len(names)]) for i, p in enumerate(prompts) for j in range(2)]
    return {"root": root, "model": model.eval(), "rows": rows,
            "want": [reference(model.eval(), n, p) for p, n in rows]}


@pytest.fixture
def tp_env():
    """vLLM binds each CPU rank to a NUMA node and this machine has one: the engine splits the CPUs between the
    ranks instead (one core each here). Unset before, restored after."""
    old = os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    yield
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if old is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


@pytest.mark.vllm
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["heads-split", "heads-replicated"])
def test_tp2_adapters_mixed_with_bare_rows_equal_prefixmodel_generate(tmp_path, tp_env, kv_heads):
    from prefixtune.serving.vllm_engine import load

    t = build(tmp_path, kv_heads)
    g = load(t["root"] / "model", t["root"] / "adapters", max_batch_size=64, tensor_parallel_size=2, **engine_kw())
    try:
        assert g.engine.llm.vllm_config.parallel_config.tensor_parallel_size == 2
        assert len(os.environ["VLLM_CPU_OMP_THREADS_BIND"].split("|")) == 2  # (on one NUMA node: a CPU share per rank)
        rows = t["rows"]
        got = g.generate([p for p, _ in rows], [n for _, n in rows], max_tokens=NEW, ignore_eos=True,
                         return_tokens=True)
        assert got == t["want"]
        assert g.engine.stats.prefix_tokens_loaded > 0
    finally:
        g.close()


@pytest.mark.vllm
def test_pipeline_parallelism_is_refused_in_one_line(tmp_path):
    from prefixtune.serving.vllm_engine import VllmEngine

    t = tmp_path / "model"
    tiny_llama().save_pretrained(t)
    id_tokenizer().save_pretrained(t)
    with pytest.raises(ConfigError, match="pipeline_parallel_size 2 is not supported.*tensor_parallel_size N"):
        VllmEngine(t, vllm_args={"pipeline_parallel_size": 2})
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 is not a multiple of the model's 2 KV heads"):
        VllmEngine(t, tensor_parallel_size=3)
