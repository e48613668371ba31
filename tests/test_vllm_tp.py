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
from test_vllm import NEW, VOCAB, engine_kw, reference, tiny_llama, write_model_and_adapters

from prefixtune.config import ConfigError

ADAPTERS = {"a16": 16, "a20": 20}
N_PROMPTS = 8


def build(root, kv_heads: int) -> dict:
    model = write_model_and_adapters(root, tiny_llama(kv_heads=kv_heads), ADAPTERS)
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


def vllm_kv_heads(total_kv: int, tp: int, rank: int, head_size: int = 4) -> list[int]:
    """The KV heads vLLM's own QKVParallelLinear loads on rank `rank` of `tp`: a k_proj whose rows of head h all
    hold h, loaded through its weight_loader with the tensor-parallel group faked, read back in order."""
    from types import SimpleNamespace
    from unittest import mock

    import vllm.distributed.parallel_state as ps
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import QKVParallelLinear

    group = SimpleNamespace(rank_in_group=rank, world_size=tp)
    with mock.patch.object(ps, "get_tp_group", return_value=group), set_current_vllm_config(VllmConfig()):
        qkv = QKVParallelLinear(16, head_size, 8, total_kv, bias=False, params_dtype=torch.float32)
        k = torch.arange(total_kv).repeat_interleave(head_size)[:, None].float().expand(-1, 16).contiguous()
        qkv.weight_loader(qkv.weight, k, "k")
    start = qkv.num_heads * head_size
    return qkv.weight.data[start:start + qkv.num_kv_heads * head_size, 0].view(-1, head_size)[:, 0].long().tolist()


@pytest.mark.vllm
def test_head_slices_are_vllms_own():
    from prefixtune.serving.vllm_prefix import kv_head_slice

    cases = [(kv, tp) for kv in (1, 2, 4, 8) for tp in (1, 2, 4, 8) if kv % tp == 0 or tp % kv == 0]
    for kv, tp in cases:
        for rank in range(tp):
            assert list(range(kv))[kv_head_slice(kv, tp, rank)] == vllm_kv_heads(kv, tp, rank), (kv, tp, rank)
    with pytest.raises(ConfigError, match="tensor_parallel_size 4 does not divide the model's 6 KV heads"):
        kv_head_slice(6, 4, 0)


@pytest.mark.vllm
def test_serve_with_tensor_parallel_size_2_equals_generate(tmp_path, tp_env):
    """The user's path: `prefixtune serve --backend vllm --tensor-parallel-size 2`, a completion per adapter and a
    bare one over HTTP, each equal to generate(); SIGTERM then ends the server with vLLM's rank processes."""
    import signal
    import subprocess
    import sys

    import psutil
    from helpers import free_port
    from test_vllm import post, until_eos, wait_healthy

    t = build(tmp_path, kv_heads=2)
    port, log_path = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "prefixtune", "serve", "--backend", "vllm", "--tensor-parallel-size", "2", "--dtype",
           "float32", "--model", str(t["root"] / "model"), "--adapters", str(t["root"] / "adapters"), "--port",
           str(port), "--max-total-tokens", "256"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log_path)
        children = psutil.Process(proc.pid).children(recursive=True)
        tok = id_tokenizer()
        one_each = {name: (prompt, want) for (prompt, name), want in zip(t["rows"], t["want"])}
        assert set(one_each) == {*ADAPTERS, None}
        for name, (prompt, want) in one_each.items():
            status, body = post(url + "/v1/completions", {"model": name or "model", "prompt": prompt,
                                                          "max_tokens": NEW, "temperature": 0})
            assert status == 200, body
            assert body["choices"][0]["text"] == tok.decode(until_eos(want), skip_special_tokens=True), name
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM), log_path.read_text()[-3000:]
        alive = psutil.wait_procs(children, timeout=30)[1]
        assert len(children) >= 3 and not alive, f"left running: {[(c.pid, c.name()) for c in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
