"""peft's CARTRIDGE format, both directions, against peft's own get_peft_model(..., CartridgeConfig) forward."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import batch, make
from peft import CartridgeConfig, PeftModel, get_peft_model

import prefixtune as pt
from prefixtune.config import ConfigError


def _peft_cartridge(kind, P=5, frozen=1):
    base = make(kind)
    ref = get_peft_model(base, CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, num_frozen_tokens=frozen))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        enc = ref.prompt_encoder["default"]
        enc.load_prompt_embeddings(torch.randn(enc.weight.shape, generator=g) * 0.5)
    return base, ref.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen3"])
def test_peft_cartridge_loads_in_ours_with_the_same_outputs(kind, tmp_path):
    base, ref = _peft_cartridge(kind)
    ref.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["peft_type"] == "CARTRIDGE"
    kw = batch(kind)
    theirs = ref(**kw).logits
    ours = pt.load_adapter(make(kind), tmp_path / "c").eval()
    torch.testing.assert_close(ours(**kw).logits, theirs, atol=1e-5, rtol=0)
    assert ours.configs["default"].extra["num_frozen_tokens"] == 1
    assert (theirs - base(**kw).logits).abs().max() > 1e-3  # the cartridge does something


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ours_saved_as_cartridge_loads_in_peft_with_the_same_outputs(kind, tmp_path):
    model = pt.attach(make(kind), pt.PrefixConfig(num_virtual_tokens=6, init="random", init_scale=1.0)).eval()
    model.configs["default"].extra["num_frozen_tokens"] = 2
    model.save_adapter(tmp_path / "c", format="cartridge")
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "CARTRIDGE" and cfg["num_frozen_tokens"] == 2
    kw = batch(kind)
    ref = PeftModel.from_pretrained(make(kind), tmp_path / "c").eval()
    assert ref.peft_config["default"].num_frozen_tokens == 2
    torch.testing.assert_close(model(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=0)
    again = pt.load_adapter(make(kind), tmp_path / "c").eval()  # and back into ours
    torch.testing.assert_close(again(**kw).logits, model(**kw).logits, atol=1e-6, rtol=0)


def test_cartridge_refuses_what_it_cannot_hold(tmp_path):
    model = pt.attach(make("llama"), pt.PrefixConfig(num_virtual_tokens=3, projection=True))
    with pytest.raises(ConfigError, match="CARTRIDGE format holds a plain key/value table"):
        model.save_adapter(tmp_path / "c", format="cartridge")
    assert not (tmp_path / "c").exists()
