"""CUDA tests: bf16 training against fp32, sdpa / flash-attention with prefixes against eager, mixed batches,
the serving engine. Opt-in: `python -m pytest -m gpu` on a CUDA machine (the default run deselects them).

Selected without CUDA they fail (not skip): a `-m gpu` run that reports green must have run on a GPU.
"""

from __future__ import annotations

import importlib.util
import time

import helpers
import pytest
import torch
from helpers import PAD_SIDE, Collector, pad_prompts, random_workload, randomise, three_adapters, two_adapters

import prefixtune as pt
from prefixtune.serving.request import Request, SamplingParams
from prefixtune.serving.torch_engine import TorchEngine as Engine
from prefixtune.training.loop import LossModule

pytestmark = pytest.mark.gpu
CUDA = "cuda"


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests were selected (-m gpu) but CUDA is not available here; run them on a CUDA "
                    "machine (a plain `pytest` run deselects them)", pytrace=False)


def _cuda_batch(kw):
    return {k: v.to(CUDA) for k, v in kw.items()}


def _padded_mixed(kind, names=("a", None, "b"), seed=7):
    """Three prompts of different lengths, padded the way the architecture is padded, and row i's prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, helpers.VOCAB, (n,), generator=g) for n in (6, 3, 5)]
    side = PAD_SIDE.get(kind, "left")
    ids, mask = pad_prompts(prompts, side)
    kw = dict(input_ids=ids, attention_mask=mask)
    if kind in helpers.SEQ2SEQ:
        kw["labels"] = torch.randint(3, helpers.VOCAB, (3, 4), generator=g)
    return kw, prompts, side, list(names)


def _real(kind, logits, prompts, side, i):
    """Row i's logits at its real tokens (all decoder positions for seq2seq, the one row for BERT)."""
    if kind in helpers.SEQ2SEQ or kind == "bert":
        return logits[i]
    n, width = len(prompts[i]), logits.shape[1]
    return logits[i, width - n :] if side == "left" else logits[i, :n]


def _with_attention(kind, impl, dtype=torch.float32):
    model = two_adapters(kind)
    model.base_model.set_attn_implementation(impl)
    return model.to(CUDA, dtype).eval()  # eval() also drops any prefix memoised on the CPU


# ---- bf16 training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2", "t5"])
def test_bf16_training_step_matches_fp32(kind):
    """A bf16 base (what `--precision bf16` trains) gives the fp32 loss and prefix gradients within bf16's
    precision, and a few AdamW steps move the loss the same way. Prefix parameters stay fp32 in both."""
    kw = _cuda_batch(helpers.batch(kind, b=4, t=12))
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = helpers.make(kind).to(CUDA, dtype)
        model = randomise(pt.attach(base, pt.PrefixConfig(num_virtual_tokens=5, init="zero")))
        model.train()
        model.base_model.eval()  # no dropout: the two runs must see the same network
        assert all(p.dtype == torch.float32 for p in model.prefixes.parameters())
        loss_fn = LossModule(model)  # the training loop's loss: LM head at label positions only
        params = [p for p in model.parameters() if p.requires_grad]
        loss = loss_fn(kw)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in params]).float()
        opt = torch.optim.AdamW(params, lr=1e-2)
        curve = [loss.item()]
        for _ in range(4):
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(kw)
            loss.backward()
            curve.append(loss.item())
        runs[dtype] = (curve, grad)
    (c32, g32), (c16, g16) = runs[torch.float32], runs[torch.bfloat16]
    assert abs(c16[0] - c32[0]) <= 2e-2 * abs(c32[0]), (c16[0], c32[0])
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert c32[-1] < c32[0] and c16[-1] < c16[0]  # both really train
    assert abs(c16[-1] - c32[-1]) <= 5e-2 * abs(c32[-1]), (c16, c32)


# ---- attention kernels with prefixes --------------------------------------------------------------------------
_CLASSES = {k: type(helpers.make(k)) for k in helpers.ALL}  # tiny, built once at collection
SDPA = [k for k in helpers.ALL if _CLASSES[k]._supports_sdpa]  # BLOOM has no sdpa path in transformers


@pytest.mark.parametrize("kind", SDPA)
def test_sdpa_with_prefixes_equals_eager(kind):
    """Mixed prefixes, a bare row, padding: sdpa gives eager's logits (and greedy tokens), and CUDA gives the CPU's."""
    kw, prompts, side, names = _padded_mixed(kind)
    eager, sdpa = _with_attention(kind, "eager"), _with_attention(kind, "sdpa")
    cpu = two_adapters(kind)
    out = {m: m(**_cuda_batch(kw), adapter_names=names).logits.cpu() for m in (eager, sdpa)}
    ref = cpu(**kw, adapter_names=names).logits
    for i in range(3):
        torch.testing.assert_close(_real(kind, out[sdpa], prompts, side, i), _real(kind, out[eager], prompts, side, i),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(_real(kind, out[eager], prompts, side, i), _real(kind, ref, prompts, side, i),
                                   atol=1e-4, rtol=1e-4)
    if kind != "bert":
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        ids, mask = kw["input_ids"].to(CUDA), kw["attention_mask"].to(CUDA)
        g_eager = eager.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **gen)
        g_sdpa = sdpa.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **gen)
        assert torch.equal(g_eager, g_sdpa)


FLASH = [k for k in helpers.ALL if _CLASSES[k]._supports_flash_attn]


@pytest.mark.parametrize("kind", FLASH)
def test_flash_attention_with_prefixes_matches_eager(kind):
    """flash_attention_2 (fp16/bf16 only) with mixed prefixes and padding: eager's logits at bf16 precision."""
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (pip install flash-attn); sdpa is tested above")
    kw, prompts, side, names = _padded_mixed(kind)
    eager = _with_attention(kind, "eager", torch.bfloat16)
    flash = _with_attention(kind, "flash_attention_2", torch.bfloat16)
    a = eager(**_cuda_batch(kw), adapter_names=names).logits.float().cpu()
    b = flash(**_cuda_batch(kw), adapter_names=names).logits.float().cpu()
    for i in range(3):
        torch.testing.assert_close(_real(kind, b, prompts, side, i), _real(kind, a, prompts, side, i), atol=5e-2, rtol=5e-2)


# ---- mixed batches -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", helpers.ALL)
def test_mixed_batch_rows_equal_rows_alone_on_cuda(kind):
    """Row i of a padded mixed batch on CUDA == row i alone (unpadded), for each of a prefix and the bare model."""
    model = two_adapters(kind).to(CUDA).eval()
    for names in (["a", None, "b"], [None, "b", "a"]):
        kw, prompts, side, names = _padded_mixed(kind, names)
        mixed = model(**_cuda_batch(kw), adapter_names=names).logits
        for i, name in enumerate(names):
            p = prompts[i][None].to(CUDA)
            extra = {"labels": kw["labels"][i : i + 1].to(CUDA)} if "labels" in kw else {}
            alone = model(input_ids=p, attention_mask=torch.ones_like(p), adapter_names=[name], **extra).logits
            torch.testing.assert_close(_real(kind, mixed, prompts, side, i), alone[0], atol=1e-4, rtol=1e-4)


# ---- serving ---------------------------------------------------------------------------------------------------
def _offline(model, prompt, name, max_new):
    ids = torch.tensor([prompt], device=CUDA)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=[name], do_sample=False,
                         max_new_tokens=max_new)
    toks = out[0, len(prompt) :].tolist()
    eos = model.base_model.generation_config.eos_token_id
    return toks[: toks.index(eos) + 1] if eos in toks else toks


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_serving_engine_on_cuda_matches_offline_generate(kind):
    """Continuous batching over mixed prefixes on CUDA: each request's greedy tokens == generate() alone."""
    model = three_adapters(kind).to(CUDA).eval()
    prompts, names, max_new = random_workload(16)
    ref = [_offline(model, p, n, m) for p, n, m in zip(prompts, names, max_new)]
    eng = Engine(model, max_batch_size=5).start()
    got = Collector(len(prompts))
    try:
        for i, (p, n, m) in enumerate(zip(prompts, names, max_new)):
            eng.submit([Request(n, p, SamplingParams(max_tokens=m, temperature=0), got(i))])
            time.sleep(0.002 * (i % 3))
        got.wait()
    finally:
        eng.stop()
    assert [got.tokens[i] for i in range(len(prompts))] == ref
    assert max(eng.stats.batch_sizes) == 5 and len(eng.stats.batch_sizes) > 1
