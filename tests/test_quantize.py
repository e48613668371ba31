"""`train --quantize 8bit|4bit`: the frozen base loaded quantized (optimum-quanto through transformers' QuantoConfig,
on CPU), the prefix in the compute dtype. The prefix must learn (the training loss falls) and its adapter must load on
the full-precision base, where it does what it learned there."""

import json

import optimum.quanto  # noqa: F401  (the [quant] extra, part of [test]: a missing install fails here, not skips)
import pytest
import torch
from helpers import classify_rows, model_dir, write_jsonl

import prefixtune as pt
from prefixtune.extras import MissingExtra
from prefixtune.loading import load_model
from prefixtune.training import evaluate as E
from prefixtune.training import loop as T
from prefixtune.training.config import RecipeError, TrainConfig


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_prefix_trains_on_a_quantized_base_and_loads_on_the_full_one(tmp_path, bits):
    mdir = model_dir(tmp_path)
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(mdir), train=str(data), task="classify", output=str(out), max_steps=20, batch_size=8,
                      warmup_ratio=0.0, scheduler="constant", lr=0.2, prefix={"num_virtual_tokens": 4, "init": "random"},
                      precision="fp32", quantize=bits, save_every=None, progress=False)
    _, pm = T.fit(cfg)

    q_proj = pm.base_model.model.layers[0].self_attn.q_proj
    assert "quanto" in type(q_proj.weight).__module__, type(q_proj.weight)  # the base really was quantized
    assert {p.dtype for p in pm.prefixes["default"].parameters()} == {torch.float32}  # the prefix: compute dtype
    losses = _losses(out)
    assert sum(losses[-4:]) / 4 < 0.93 * sum(losses[:4]) / 4, losses  # it learns (a 4-token prefix on a random model: slowly)

    # the adapter on the full-precision base: loads, and lowers the loss on the training rows there too
    full, tok = load_model(str(mdir), dtype="fp32", device="cpu")
    batch = _batch(tok, cfg)
    bare = E.token_nll(full, batch)[0].item()
    on_full = pt.load_adapter(full, out / "adapter").eval()
    with torch.no_grad():
        tuned = E.token_nll(on_full, batch)[0].item()
    assert tuned < 0.9 * bare, (tuned, bare)


def _batch(tok, cfg):
    from prefixtune.training import data as D
    from prefixtune.training.sources import load_run_data

    run_data = load_run_data(T.resolve(cfg.validate(), "causal").config, tok, "causal", say=lambda *a: None)
    rows = [run_data.train[i] for i in range(16)]
    return D.PadCollator(tok)(rows)


def test_quantize_checks():
    with pytest.raises(RecipeError, match="quantize '3bit'"):
        TrainConfig(model="m", train="t", task="lm", output="o", quantize="3bit").validate()
    with pytest.raises(RecipeError, match="--quantize and --fsdp"):
        TrainConfig(model="m", train="t", task="lm", output="o", quantize="8bit", fsdp=True).validate()


def test_missing_quant_extra_is_one_line(tmp_path, monkeypatch):
    import prefixtune.extras as X

    monkeypatch.setattr(X, "_installed", lambda m: m != "optimum.quanto")
    with pytest.raises(MissingExtra, match=r"--quantize 8bit needs the \[quant\] extra .*pip install 'prefixtune\[quant\]'"):
        load_model(str(model_dir(tmp_path)), quantize="8bit")


def test_a_directory_converted_from_gguf_quantizes_and_a_quantized_one_is_refused(tmp_path):
    """SmolLM2 as cli/assets.py converts it keeps `quantization_config: {quant_method: gguf}` over plain weights."""
    from prefixtune.loading import ModelLoadError

    mdir = model_dir(tmp_path)
    config = json.loads((mdir / "config.json").read_text())
    for method, ok in (("gguf", True), ("bitsandbytes", False)):
        config["quantization_config"] = {"quant_method": method, "gguf_file": "x.gguf"}
        (mdir / "config.json").write_text(json.dumps(config))
        if ok:
            model, _ = load_model(str(mdir), dtype="fp32", device="cpu", quantize="8bit")
            assert "quanto" in type(model.model.layers[0].mlp.up_proj.weight).__module__
        else:
            with pytest.raises(ModelLoadError, match="stored quantized already .*drop --quantize"):
                load_model(str(mdir), dtype="fp32", device="cpu", quantize="8bit")
