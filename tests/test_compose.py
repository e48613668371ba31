"""Composed prefixes (a row naming several adapters): against one adapter whose table is the concatenation."""

from __future__ import annotations

import pytest
import torch
from helpers import CAUSAL, VOCAB, batch, make

import prefixtune as pt
from prefixtune.config import ConfigError

# layer_scale off: the stacked reference table is then the plain concatenation of the two tables
CFG = dict(layer_scale=False, init="random", init_scale=1.0)


def _model(kind, p_a=4, p_b=3):
    model = pt.attach(make(kind), pt.PrefixConfig(num_virtual_tokens=p_a, **CFG), name="a")
    model.add_adapter("b", pt.PrefixConfig(num_virtual_tokens=p_b, **CFG))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.prefixes.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    stacked = torch.cat([model.prefixes["a"].folded(), model.prefixes["b"].folded()])
    model.add_adapter("ab", pt.PrefixConfig(num_virtual_tokens=p_a + p_b, **CFG))
    with torch.no_grad():
        model.prefixes["ab"].embedding.weight.copy_(stacked)
    return model.eval()


@pytest.mark.parametrize("kind", CAUSAL)
def test_composed_row_equals_the_stacked_adapter(kind):
    model = _model(kind)
    kw = batch(kind, b=2)
    composed = model(**kw, adapter_names=[["a", "b"]] * 2).logits
    torch.testing.assert_close(composed, model(**kw, adapter_names="ab").logits, atol=1e-5, rtol=1e-5)
    # each part matters (slot order does not, except under ALiBi: attention reads keys as a set)
    assert (composed - model(**kw, adapter_names="a").logits).abs().max() > 1e-3
    assert (composed - model(**kw, adapter_names="b").logits).abs().max() > 1e-3
    layers, mask = model.prefix_batch([["a", "b"], None])
    ref, _ = model.prefix_batch(["ab", None])
    assert mask.tolist() == [[1] * 7, [0] * 7]
    torch.testing.assert_close(layers[0][0], ref[0][0])


@pytest.mark.parametrize("kind", CAUSAL)
def test_mixed_batch_with_composed_rows_equals_rows_alone(kind):
    model = _model(kind)
    kw = batch(kind, b=5)
    names = [["a", "b"], None, "b", ("b", "a"), ["a"]]
    mixed = model(**kw, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = model(**{k: v[i : i + 1] for k, v in kw.items()}, adapter_names=[name]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], model(**kw, adapter_names="ab").logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_composed_rows_and_left_padding(kind):
    model = _model(kind)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (6, 3, 5)]
    names = [["a", "b"], None, "b"]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
    for i, (p, name) in enumerate(zip(prompts, names)):
        ref = "ab" if name == ["a", "b"] else name
        alone = model.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               adapter_names=[ref], **kw)
        new = alone[0, len(p):]  # may stop early at <eos>; the batch pads that row after it
        assert torch.equal(out[i, width : width + len(new)], new), (i, name)
        assert (out[i, width + len(new):] == 0).all()


def test_composition_refused_where_unsupported_and_bad_entries():
    for kind in ("t5", "bert"):
        model = pt.attach(make(kind), pt.PrefixConfig(num_virtual_tokens=2), name="a")
        model.add_adapter("b", pt.PrefixConfig(num_virtual_tokens=2))
        with pytest.raises(ConfigError, match="decoder-only models only"):
            model(**batch(kind, b=1), adapter_names=[["a", "b"]])
    model = _model("llama")
    kw = batch("llama", b=1)
    with pytest.raises(ConfigError, match=r"unknown adapter\(s\) \['zz'\]"):
        model(**kw, adapter_names=[["a", "zz"]])
    with pytest.raises(ConfigError, match="empty list"):
        model(**kw, adapter_names=[[]])
    with pytest.raises(ConfigError, match="strings"):
        model(**kw, adapter_names=[["a", 3]])
