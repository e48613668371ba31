"""`prefixtune info`: describes adapters and models from files only, and checks fit against a base model's config."""

import json

import pytest
import torch
from helpers import make

import prefixtune as pt
from prefixtune import cli
from prefixtune.cli import info


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    torch.manual_seed(0)
    cfg = pt.PrefixConfig(num_virtual_tokens=6, projection=True, projection_dim=8, extra={"task": "classify"})
    pt.attach(make("llama"), cfg).save_adapter(root / "llama", keep_projection=True)
    pt.attach(make("bert"), pt.PrefixConfig(num_virtual_tokens=3)).save_adapter(root / "bert")
    for kind in ("llama", "t5", "bert"):
        make(kind).config.save_pretrained(root / f"{kind}-model")  # config only: info must not need weights
    bert5 = make("bert").config
    bert5.num_labels = 5
    bert5.save_pretrained(root / "bert5-model")
    return root


def run(capsys, *argv):
    code = cli.main(["info", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_describes_an_adapter(saved, capsys):
    code, out, err = run(capsys, saved / "llama")
    assert code == 0, err
    # llama tiny: 2 layers, 2 kv heads x 16 -> token_dim 32; stored table 6 x (2*2*32)
    assert "6 virtual tokens x 2 layers" in out and "token_dim 32" in out
    assert f"{6 * 2 * 2 * 32:,} stored" in out
    assert "trainable form kept for resuming: True" in out and "classify" in out
    assert "adapter_model.safetensors" in out and "README.md" in out


def test_json_output(saved, capsys):
    code, out, _ = run(capsys, saved / "llama", "--json")
    d = json.loads(out)
    assert code == 0 and d["kind"] == "adapter" and d["num_virtual_tokens"] == 6
    assert d["parameters"] == 6 * 2 * 2 * 32 and d["tensors"]["prompt_embeddings"]["shape"] == [6, 128]
    assert d["projection_parameters"] == 6 * 32 + (32 * 8 + 8) + (8 * 128 + 128)
    assert d["size_bytes"] == sum(d["files"].values()) > 0


def test_fits_and_does_not_fit(saved, capsys):
    code, out, _ = run(capsys, saved / "llama", "--model", saved / "llama-model")
    assert code == 0 and "fits --model   yes" in out
    code, out, _ = run(capsys, saved / "llama", "--model", saved / "t5-model")
    assert code == info.EXIT_MISFIT and "fits --model   NO" in out and "token_dim" in out
    # encoder classifier: the head is compared too (meta-device skeleton, no weights)
    assert run(capsys, saved / "bert", "--model", saved / "bert-model")[0] == 0
    code, out, _ = run(capsys, saved / "bert", "--model", saved / "bert5-model")
    assert code == info.EXIT_MISFIT and "number of labels" in out


def test_fit_agrees_with_load_adapter(saved):
    """What info says fits is exactly what load_adapter accepts."""
    from transformers import AutoConfig

    for model_dir, kind in (("llama-model", "llama"), ("t5-model", "t5")):
        fits, _ = info.check_fit(saved / "llama", AutoConfig.from_pretrained(saved / model_dir))
        try:
            pt.load_adapter(make(kind), saved / "llama")
            loads = True
        except pt.ConfigError:
            loads = False
        assert fits == loads


def test_describes_a_model_dir(saved, capsys):
    code, out, _ = run(capsys, saved / "t5-model")
    assert code == 0 and "t5 (seq2seq" in out and f"{2 * 2 * 64:,} parameters per virtual token" in out


@pytest.mark.parametrize("case", ["empty", "missing", "file", "bad-json", "model-missing"])
def test_bad_input_is_one_line(saved, tmp_path, capsys, case):
    if case == "empty":
        argv, want = [tmp_path], "no adapter_config.json"
    elif case == "missing":
        argv, want = [tmp_path / "nope"], "does not exist"
    elif case == "file":
        (tmp_path / "f.txt").write_text("x")
        argv, want = [tmp_path / "f.txt"], "is a file"
    elif case == "bad-json":
        (tmp_path / "adapter_config.json").write_text("{oops")
        argv, want = [tmp_path], "not valid JSON"
    else:
        argv, want = [saved / "llama", "--model", tmp_path / "no-model"], "cannot read its config.json"
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert want in err and len(err.strip().splitlines()) == 1, err
