"""The engine against the references: peft (same prefix weights) and the bare transformers model."""

from __future__ import annotations

import json

import helpers
import pytest
import torch
from helpers import PAD_SIDE, pad_prompts, randomise, two_adapters
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import prefixtune as pt


def _gen_kwargs(kind):
    return dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


# ---- parity with peft ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", helpers.ALL)
def test_same_outputs_as_peft_with_same_weights(kind, tmp_path):
    base = helpers.make(kind)
    kw = helpers.batch(kind)
    model = randomise(pt.attach(base, pt.PrefixConfig(num_virtual_tokens=5))).eval()
    ours = model(**kw)
    model.save_adapter(tmp_path / "a")
    ref = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    if kind == "bert":  # peft's forward for encoders, restated where peft refuses them (tests/helpers.py)
        torch.testing.assert_close(ours.logits, helpers.peft_logits(ref, **kw), atol=1e-5, rtol=0)
    else:
        theirs = ref(**kw)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=0)
    # and the prefix really changes the output (a no-op prefix would pass the checks above trivially)
    bare = base(**kw)
    assert (bare.logits - ours.logits).abs().max() > 1e-3
    if kind != "bert":
        ids, mask = kw["input_ids"], kw["attention_mask"]
        g1 = model.generate(input_ids=ids, attention_mask=mask, **_gen_kwargs(kind))
        # peft's forward stepped greedily: peft's own generate() no longer follows it on transformers >= 5.24
        g2 = helpers.greedy_by_forward(ref, ids, mask, _gen_kwargs(kind)["max_new_tokens"], seq2seq=kind in helpers.SEQ2SEQ)
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bloom", "t5", "bert"])
@pytest.mark.parametrize("projection", [False, True])
def test_peft_saved_adapter_loads_in_ours(kind, projection, tmp_path):
    base = helpers.make(kind)
    kw = helpers.batch(kind)
    task = {"t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    torch.manual_seed(3)
    ref = get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=4, prefix_projection=projection,
                                                  encoder_hidden_size=32))
    ref.eval()
    expected = helpers.peft_logits(ref, **kw)
    ref.save_pretrained(tmp_path / "peft")
    ours = pt.load_adapter(helpers.make(kind), tmp_path / "peft").eval()  # same seed: same base weights
    torch.testing.assert_close(ours(**kw).logits, expected, atol=1e-5, rtol=0)


def test_projection_folds_on_save_and_keep_projection_resumes(tmp_path):
    base = helpers.make("llama")
    kw = helpers.batch("llama")
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=4, projection=True, projection_dim=16, init="peft")).eval()
    expected = model(**kw).logits
    model.save_adapter(tmp_path / "folded")
    model.save_adapter(tmp_path / "kept", keep_projection=True)
    folded = pt.load_adapter(base, tmp_path / "folded")
    assert not folded.prefixes["default"].projection  # inference-only table, as peft
    torch.testing.assert_close(folded(**kw).logits, expected, atol=1e-5, rtol=0)
    kept = pt.load_adapter(base, tmp_path / "kept", trainable=True)
    enc = kept.prefixes["default"]
    assert enc.projection and enc.transform[0].weight.shape == (16, 2 * 16)
    assert all(p.requires_grad for p in enc.parameters())
    torch.testing.assert_close(kept.eval()(**kw).logits, expected, atol=1e-5, rtol=0)
    # the peft half of the directory is plain peft: peft loads it with identical outputs
    ref = PeftModel.from_pretrained(base, tmp_path / "kept").eval()
    torch.testing.assert_close(ref(**kw).logits, expected, atol=1e-5, rtol=0)


def test_saved_config_is_peft_shaped(tmp_path):
    model = pt.attach(helpers.make("qwen3"), pt.PrefixConfig(num_virtual_tokens=3))
    model.save_adapter(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    # GQA + explicit head_dim: token_dim is kv_heads * head_dim (2 * 24), not hidden_size (64)
    assert cfg["token_dim"] == 48 and cfg["num_attention_heads"] == 2
    assert (tmp_path / "a" / "README.md").read_text().count("PeftModel.from_pretrained") == 1


# ---- several prefixes, one batch --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3", "mistral", "bloom", "t5", "bart", "bert"])
def test_mixed_batch_rows_equal_rows_run_alone(kind):
    model = two_adapters(kind)
    kw = helpers.batch(kind, b=4)
    names = ["a", "b", None, "a"]
    mixed = model(**kw, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = model(**{k: v[i : i + 1] for k, v in kw.items()}, adapter_names=[name]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    bare = model.base_model(**kw).logits
    torch.testing.assert_close(mixed[2], bare[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bloom", "t5", "bart"])
def test_mixed_batch_generate_with_left_padding(kind):
    model = two_adapters(kind)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, helpers.VOCAB, (n,), generator=g) for n in (6, 3, 5)]
    names = ["a", None, "b"]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **_gen_kwargs(kind))
    for i, (p, name) in enumerate(zip(prompts, names)):
        alone = model.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               adapter_names=[name], **_gen_kwargs(kind))
        new = alone[0, -6:] if kind != "t5" else alone[0]
        got = out[i, -6:] if kind != "t5" else out[i, : len(new)]
        assert torch.equal(got, new), (i, name)


def test_single_adapter_prefix_is_expanded_not_copied():
    model = two_adapters("llama")
    layers, mask = model.prefix_batch(["a"] * 8)
    k, v = layers[0]
    assert k.shape[0] == 8 and k.stride(0) == 0 and v.stride(0) == 0
    assert k.data_ptr() == layers[0][0][0].data_ptr()
    assert mask.shape == (8, 5) and bool(mask.all())


def test_eval_mode_computes_projected_prefix_once():
    model = pt.attach(helpers.make("llama"), pt.PrefixConfig(num_virtual_tokens=4, projection=True, projection_dim=16)).eval()
    calls = []
    model.prefixes["default"].transform.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(3, helpers.VOCAB, (2, 5))
    model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert len(calls) == 1
    with torch.no_grad():  # changing the weights invalidates the memo
        model.prefixes["default"].embedding.weight.add_(1.0)
    model(input_ids=ids)
    assert len(calls) == 2
    model.train()
    model(input_ids=ids)
    model(input_ids=ids)
    assert len(calls) == 4  # training always recomputes (gradients must flow)


# ---- training paths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bloom", "t5", "bert"])
def test_gradient_checkpointing_same_loss_and_grads(kind):
    kw = helpers.batch(kind)
    results = []
    for checkpointing in (False, True):
        model = randomise(pt.attach(helpers.make(kind), pt.PrefixConfig(num_virtual_tokens=4, projection=True, projection_dim=8)))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        for m in model.modules():  # no dropout: compare exactly
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        from transformers.modeling_layers import GradientCheckpointingLayer

        layer = next(m for m in model.base_model.modules() if isinstance(m, GradientCheckpointingLayer))
        calls = []
        inner = next(m for m in layer.modules() if isinstance(m, torch.nn.LayerNorm) or "Norm" in type(m).__name__)
        inner.register_forward_pre_hook(lambda *a: calls.append(1))
        loss = model(**kw).loss
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward: checkpointing is really on
        grads = [p.grad.clone() for p in model.prefixes.parameters()]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    for g0, g1 in zip(results[0][1], results[1][1]):
        assert g0.abs().sum() > 0
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_only_prefix_is_trainable_and_summary():
    model = pt.attach(helpers.make("llama"), pt.PrefixConfig(num_virtual_tokens=10))
    trainable, total = model.trainable_parameters()
    assert trainable == 10 * 2 * 2 * (2 * 16)  # P * layers * (k,v) * kv_heads*head_dim
    assert all(not p.requires_grad for p in model.base_model.parameters())
    assert f"trainable params: {trainable:,}" in model.parameter_summary()


def test_training_step_changes_only_the_prefix():
    model = pt.attach(helpers.make("llama"), pt.PrefixConfig(num_virtual_tokens=4)).train()
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    kw = helpers.batch("llama")
    first = model(**kw).loss.item()
    for _ in range(30):
        opt.zero_grad()
        model(**kw).loss.backward()
        opt.step()
    assert model(**kw).loss.item() < first - 0.1
    after = model.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- generation modes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_static_cache_generation_matches_dynamic(kind):
    model = two_adapters(kind)
    ids = torch.randint(3, helpers.VOCAB, (2, 5))
    dyn = model.generate(input_ids=ids, adapter_names=["a", "b"], **_gen_kwargs(kind))
    static = model.generate(input_ids=ids, adapter_names=["a", "b"], cache_implementation="static", **_gen_kwargs(kind))
    assert torch.equal(dyn, static)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_beam_search_sampling_and_multiple_returns(kind):
    model = two_adapters(kind)
    ids = torch.randint(3, helpers.VOCAB, (2, 5))
    beams = model.generate(input_ids=ids, adapter_names=["a", None], num_beams=3, max_new_tokens=5, pad_token_id=0)
    assert beams.shape[0] == 2
    # beam search with one beam is greedy
    one = model.generate(input_ids=ids, adapter_names=["a", None], num_beams=1, **_gen_kwargs(kind))
    greedy = model.generate(input_ids=ids, adapter_names=["a", None], **_gen_kwargs(kind))
    assert torch.equal(one, greedy)
    torch.manual_seed(0)
    sampled = model.generate(input_ids=ids, adapter_names=["a", "b"], do_sample=True, top_p=0.9, temperature=0.8,
                             num_return_sequences=3, max_new_tokens=5, pad_token_id=0)
    assert sampled.shape[0] == 6


def test_bf16_base_model_runs_with_fp32_prefix_params():
    base = helpers.make("llama").to(torch.bfloat16)
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=4))
    assert model.prefixes["default"].embedding.weight.dtype == torch.float32  # master weights stay fp32
    out = model(**helpers.batch("llama"))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.prefixes["default"].embedding.weight.grad is not None


# ---- initialisation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])
def test_vocab_init_uses_real_key_values(kind):
    model = pt.attach(helpers.make(kind), pt.PrefixConfig(num_virtual_tokens=4, init="vocab"))
    table = model.prefixes["default"].embedding.weight
    assert table.abs().sum() > 0 and table.std() < 5
    zero = pt.attach(helpers.make(kind), pt.PrefixConfig(num_virtual_tokens=4, init="zero"))
    assert zero.prefixes["default"].embedding.weight.abs().sum() == 0


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_config_values():
    with pytest.raises(pt.ConfigError, match="num_virtual_tokens must be a positive integer"):
        pt.PrefixConfig(num_virtual_tokens=0)
    for bad in ["../x", "a/b", "", "with space", "..", "x" * 65]:
        with pytest.raises(pt.ConfigError, match="not a plain name"):
            pt.attach(helpers.make("gpt2"), pt.PrefixConfig(), name=bad)


def test_unsupported_architecture_lists_supported():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    base = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(pt.ConfigError, match="not supported.*supported model types: .*llama"):
        pt.attach(base, pt.PrefixConfig())


def test_adapter_for_another_model_says_which_shapes_differ(tmp_path):
    pt.attach(helpers.make("llama", layers=2), pt.PrefixConfig(num_virtual_tokens=3)).save_adapter(tmp_path / "a")
    with pytest.raises(pt.ConfigError, match="num_layers: adapter 2 vs model 3"):
        pt.load_adapter(helpers.make("llama", layers=3), tmp_path / "a")
    with pytest.raises(pt.ConfigError, match="token_dim: adapter 32 vs model 64"):
        pt.load_adapter(helpers.make("gpt2"), tmp_path / "a")


def test_missing_corrupt_and_non_prefix_adapters(tmp_path):
    base = helpers.make("llama")
    with pytest.raises(pt.ConfigError, match="does not exist"):
        pt.load_adapter(base, tmp_path / "nope")
    pt.attach(base, pt.PrefixConfig(num_virtual_tokens=3)).save_adapter(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(pt.ConfigError, match="corrupt or truncated"):
        pt.load_adapter(base, tmp_path / "a")
    weights.unlink()
    with pytest.raises(pt.ConfigError, match="has no adapter_model.safetensors"):
        pt.load_adapter(base, tmp_path / "a")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(pt.ConfigError, match="holds a LORA adapter"):
        pt.load_adapter(base, lora)
    (lora / "adapter_config.json").write_text("{not json")
    with pytest.raises(pt.ConfigError, match="not valid JSON"):
        pt.load_adapter(base, lora)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = pt.attach(helpers.make("llama"), pt.PrefixConfig(num_virtual_tokens=3))
    model.save_adapter(tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        model.prefixes["default"].embedding.weight.add_(1)

    import prefixtune.card

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(prefixtune.card, "write_model_card", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before  # old adapter intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left behind


def test_unknown_adapter_names_in_batch():
    model = two_adapters("llama")
    with pytest.raises(pt.ConfigError, match=r"unknown adapter\(s\) \['zz'\]"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), adapter_names=["a", "zz"])
    with pytest.raises(pt.ConfigError, match="adapter_names has 1 entries but the batch has 2 rows"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), adapter_names=["a"])


# ---- seq2seq placement="full" (Li & Liang: encoder, decoder and cross-attention prefixes) ------------------
def _full(kind, p=5, seed=0):
    # plain table units, so the tests below perturb key/values directly (layer_scale is tested on its own)
    cfg = pt.PrefixConfig(num_virtual_tokens=p, placement="full", layer_scale=False)
    model = pt.attach(helpers.make(kind), cfg, name="f")
    return randomise(model, seed).eval()


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_full_placement_feeds_encoder_cross_and_decoder(kind, tmp_path):
    model = _full(kind)
    kw = helpers.batch(kind)
    L, Le = model.arch.num_layers, model.arch.num_encoder_layers
    table = model.prefixes["f"].embedding.weight
    width = 2 * model.arch.token_dim
    assert table.shape[1] == (2 * L + Le) * width
    ref = model(**kw).logits
    # each group of the table (decoder self, cross, encoder) changes the output on its own
    for name, lo, hi in [("self", 0, L), ("cross", L, 2 * L), ("encoder", 2 * L, 2 * L + Le)]:
        with torch.no_grad():
            saved = table[:, lo * width : hi * width].clone()
            table[:, lo * width : hi * width] += 1.0
        assert (model(**kw).logits - ref).abs().max() > 1e-3, name
        with torch.no_grad():
            table[:, lo * width : hi * width] = saved
    # save / reload round trip
    model.save_adapter(tmp_path / "full")
    again = pt.load_adapter(helpers.make(kind), tmp_path / "full").eval()
    torch.testing.assert_close(again(**kw).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_full_placement_generate_matches_stepwise_forward_and_mixed_rows(kind):
    model = _full(kind)
    model.add_adapter("g", pt.PrefixConfig(num_virtual_tokens=3, placement="full"))
    randomise(model, seed=4)
    kw = helpers.batch(kind, b=3)
    ids, mask = kw["input_ids"], kw["attention_mask"]
    names = ["f", None, "g"]
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=5, do_sample=False)
    dec = out[:, :1]
    for _ in range(5):  # greedy by hand through forward (no cache): the same tokens
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=names, use_cache=False).logits
        dec = torch.cat([dec, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(dec, out[:, : dec.shape[1]])
    mixed = model(**kw, adapter_names=names).logits
    for i, n in enumerate(names):
        alone = model(**{k: v[i : i + 1] for k, v in kw.items()}, adapter_names=[n]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    # a bare call after a prefixed one leaves no prefix behind in the encoder
    torch.testing.assert_close(model(**kw, adapter_names=[None] * 3).logits, model.base_model(**kw).logits)


def test_full_placement_gradient_checkpointing_reaches_encoder_prefix():
    kw = helpers.batch("t5")
    grads = []
    for checkpointing in (False, True):
        model = _full("t5").train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**kw).loss.backward()
        grads.append(model.prefixes["f"].embedding.weight.grad.clone())
    enc = slice(2 * 2 * 2 * 64, None)  # encoder groups: after 2L decoder/cross groups of width 2*token_dim
    assert grads[0][:, enc].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_full_placement_only_for_seq2seq():
    with pytest.raises(pt.ConfigError, match="only applies to encoder-decoder"):
        pt.attach(helpers.make("llama"), pt.PrefixConfig(placement="full"))


def test_vocab_init_through_projection_reproduces_real_key_values():
    from prefixtune.initialize import _sample_tokens, real_key_values

    model = pt.attach(helpers.make("llama"), pt.PrefixConfig(num_virtual_tokens=6, projection=True, projection_dim=32, init="vocab"))
    target = real_key_values(model, _sample_tokens(model, 6))
    torch.testing.assert_close(model.prefixes["default"]().detach(), target, atol=1e-5, rtol=0)


def test_text_init_needs_tokenizer_and_uses_its_tokens(tiny_tokenizer):
    tok = tiny_tokenizer()
    cfg = pt.PrefixConfig(num_virtual_tokens=4, init="text", init_text="classify the sentiment")
    with pytest.raises(pt.ConfigError, match="needs the tokenizer"):
        pt.attach(helpers.make("llama", vocab=len(tok)), cfg)
    model = pt.attach(helpers.make("llama", vocab=len(tok)), cfg, tokenizer=tok)
    ids = model.configs["default"].extra["init_token_ids"]
    assert len(ids) == 3
    from prefixtune.initialize import real_key_values

    expected = real_key_values(model, torch.tensor((ids * 2)[:4]))
    torch.testing.assert_close(model.prefixes["default"].folded(), expected)  # the key/values, whatever the units


def test_prefix_groups_follow_a_multi_device_map(monkeypatch):
    """With device_map over several devices, each layer's prefix goes where that layer lives."""
    model = _full("t5")
    moved = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        moved.append(args[0] if args else kwargs.get("device"))
        return real_to(self, *args, **kwargs)

    model.base_model.hf_device_map = {"encoder": "cpu", "decoder": torch.device("cpu", 0)}  # two distinct entries
    monkeypatch.setattr(torch.Tensor, "to", spy)
    layers = model._split("f")
    assert len(layers) == 2 * model.arch.num_layers + model.arch.num_encoder_layers
    assert sum(isinstance(d, torch.device) for d in moved) == 2 * len(layers)  # every k and v placed


def test_random_init_scale_is_relative_to_the_models_own_key_values():
    base = helpers.make("llama")
    small = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=6, init="random", init_scale=0.1)).prefixes["default"]
    full = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=6, init="random", init_scale=1.0)).prefixes["default"]
    ratio = small.embedding.weight.std() / full.embedding.weight.std()
    assert 0.05 < ratio < 0.2
    with pytest.raises(pt.ConfigError, match="init_scale must be > 0"):
        pt.PrefixConfig(init="random", init_scale=0)


def test_layer_scale_makes_one_adam_step_relative_to_each_layers_key_value_scale(tmp_path):
    base = helpers.make("llama")
    with torch.no_grad():  # give the layers different key/value scales, as real models have
        base.model.layers[1].self_attn.v_proj.weight *= 10
        base.model.layers[1].self_attn.k_proj.weight *= 3
    scaled = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=4, layer_scale=True), name="s")
    scaled.add_adapter("p", pt.PrefixConfig(num_virtual_tokens=4, layer_scale=False))
    enc_s, enc_p = scaled.prefixes["s"], scaled.prefixes["p"]
    torch.testing.assert_close(enc_s.folded(), enc_p.folded())  # same vocab init, different units
    D = scaled.arch.token_dim
    group_std = enc_s.scale.view(-1, D)[:, 0]
    assert group_std.max() / group_std.min() > 5
    ids = torch.randint(3, 100, (2, 6))
    moved = {}
    for name, enc in (("s", enc_s), ("p", enc_p)):
        scaled.set_adapter(name)
        before = enc.folded()
        opt = torch.optim.AdamW(enc.parameters(), lr=1e-3, weight_decay=0.0)
        scaled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        moved[name] = (enc.folded() - before).abs().view(4, -1, D).amax(dim=(0, 2))
    torch.testing.assert_close(moved["p"], torch.full_like(moved["p"], 1e-3), rtol=1e-2, atol=0)  # plain: lr everywhere
    torch.testing.assert_close(moved["s"], 1e-3 * group_std, rtol=1e-2, atol=0)  # scaled: lr x that layer's scale
    # saved folded (peft format), reloaded as a plain table with the same key/values
    scaled.save_adapter(tmp_path / "s", "s")
    again = pt.load_adapter(helpers.make("llama"), tmp_path / "s")
    assert again.configs[again.active_adapter].layer_scale is False
    torch.testing.assert_close(again.prefixes[again.active_adapter].folded(), enc_s.folded(), atol=0, rtol=0)
    # a checkpoint (keep_projection) keeps the scaled form, so training resumes in the same units exactly
    scaled.save_adapter(tmp_path / "ckpt", "s", keep_projection=True)
    fresh = pt.attach(helpers.make("llama"), pt.PrefixConfig(num_virtual_tokens=4, layer_scale=True, init="zero"), name="s")
    fresh.load_adapter_weights(tmp_path / "ckpt", "s")
    for k, v in enc_s.state_dict().items():
        assert torch.equal(fresh.prefixes["s"].state_dict()[k], v), k


# ---- a row's result depends neither on its batch-mates nor on its padding ----------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3", "mistral", "bloom", "t5", "bart", "bert"])
def test_row_alone_equals_row_in_any_padded_batch(kind):
    """Row i alone (unpadded) == row i in a padded batch, whatever the other rows run: the bare model (None)
    or a prefix, in a uniform or a mixed batch; forward logits at real tokens and generated tokens."""
    model = two_adapters(kind)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, helpers.VOCAB, (n,), generator=g) for n in (6, 3, 5)]
    side = PAD_SIDE.get(kind, "left")
    ids, mask = pad_prompts(prompts, side)
    width = ids.shape[1]
    extra = {"labels": torch.randint(3, helpers.VOCAB, (3, 4), generator=g)} if kind in helpers.SEQ2SEQ else {}
    batches = [[n] * 3 for n in (None, "a", "b")] + [["a", None, "b"], [None, "b", "a"], ["b", "a", None]]

    def real(i, logits):  # row i's logits at its real tokens (decoder positions for seq2seq, one row for BERT)
        if kind in helpers.SEQ2SEQ or kind == "bert":
            return logits
        n = len(prompts[i])
        return logits[:, width - n :] if side == "left" else logits[:, :n]

    def alone(i, name, fn):
        p = prompts[i][None]
        sub = {k: v[i : i + 1] for k, v in extra.items()}
        return fn(input_ids=p, attention_mask=torch.ones_like(p), adapter_names=[name], **sub)

    for names in batches:
        out = model(input_ids=ids, attention_mask=mask, adapter_names=names, **extra).logits
        for i, name in enumerate(names):
            expected = alone(i, name, model).logits
            torch.testing.assert_close(real(i, out[i : i + 1]), expected, atol=1e-5, rtol=1e-5, msg=f"row {i} {name} {names}")
    if kind == "bert":
        return
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    extra = {}
    for names in batches:
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **gen)
        for i, name in enumerate(names):
            solo = alone(i, name, lambda **kw: model.generate(**kw, **gen))[0]
            new, got = (solo, out[i]) if kind in helpers.SEQ2SEQ else (solo[len(prompts[i]) :], out[i, width:])
            assert torch.equal(got[: len(new)], new), (i, name, names)
            assert bool((got[len(new) :] == 0).all()), (i, name, names)  # the batch ran on only as padding


def test_eval_memo_follows_moves_casts_and_swapped_weights():
    """The memoised eval-mode prefix is recomputed when the model is cast or moved (a model used on the CPU,
    then sent to a GPU) or an adapter's weights are replaced without an in-place op."""
    model = pt.attach(helpers.make("llama"), pt.PrefixConfig(num_virtual_tokens=3)).eval()
    kw = {k: v for k, v in helpers.batch("llama").items() if k != "labels"}
    before = model(**kw).logits
    model.double()
    assert model.prefix_layers("default")[0][0].dtype == torch.float64
    model.float()
    p = next(model.prefixes["default"].parameters())
    p.data = p.data * 3 + 1  # a new tensor: no version bump
    after = model(**kw).logits
    fresh = pt.attach(helpers.make("llama"), pt.PrefixConfig(num_virtual_tokens=3)).eval()
    with torch.no_grad():
        next(fresh.prefixes["default"].parameters()).copy_(p)
    torch.testing.assert_close(after, fresh(**kw).logits, atol=1e-6, rtol=0)
    assert (after - before).abs().max() > 1e-3

@pytest.mark.parametrize("kind,cfg", [
    ("llama", dict(init="vocab")),  # layer_scale table, folded on save
    ("t5", dict(init="vocab", placement="full")),
    ("bert", dict(init="vocab")),  # classifier head from the file
    ("gpt2", dict(init="vocab", projection=True, projection_dim=16)),
])
@pytest.mark.parametrize("keep_projection", [False, True])
def test_loading_an_adapter_never_runs_the_base_model(kind, cfg, keep_projection, tmp_path):
    saved = randomise(pt.attach(helpers.make(kind), pt.PrefixConfig(num_virtual_tokens=4, **cfg))).eval()
    saved.save_adapter(tmp_path / "a", keep_projection=keep_projection)
    kw = helpers.batch(kind)
    expected = saved(**kw).logits
    base = helpers.make(kind)
    calls = []
    handle = base.register_forward_pre_hook(lambda *a: calls.append(1))
    model = pt.PrefixModel(base)
    model.load_adapter(tmp_path / "a")
    model.load_adapter(tmp_path / "a", name="again", trainable=True)  # hot load beside another adapter
    assert calls == []  # initialising (init="vocab" runs the model) is skipped: the weights come from the file
    handle.remove()
    model.eval()
    torch.testing.assert_close(model(**kw).logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(**kw, adapter_names="again").logits, expected, atol=1e-5, rtol=0)
    # the loaded prefix is the saved one, not what initialising would give (vocab init differs from it)
    torch.testing.assert_close(model.prefixes["again"].folded(), saved.prefixes["default"].folded())
    fresh = pt.attach(helpers.make(kind), pt.PrefixConfig(num_virtual_tokens=4, **cfg))
    assert (fresh.prefixes["default"].folded() - saved.prefixes["default"].folded()).abs().max() > 0.1


@pytest.mark.parametrize("kind", helpers.ALL)
def test_cache_goes_in_by_the_name_the_installed_transformers_takes(kind):
    """transformers 5.24 renamed `past_key_values` to `cache`; an attention module handed the old name ignores it
    (a T5 encoder prefix then silently did nothing). No deprecated name may leave our code, and the prefix counts."""
    import warnings

    base = helpers.make(kind)
    kw = helpers.batch(kind)
    placement = "full" if kind in helpers.SEQ2SEQ else "decoder"
    model = randomise(pt.attach(base, pt.PrefixConfig(num_virtual_tokens=3, placement=placement))).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated", category=FutureWarning)
        ours = model(**kw)
        if kind != "bert":
            model.generate(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"], **_gen_kwargs(kind))
    assert (base(**kw).logits - ours.logits).abs().max() > 1e-3
