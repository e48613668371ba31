"""A PrefixModel inside TRL's SFTTrainer: the loss goes down, only the prefix changes, the prefix is really used
by the fused LM head, and checkpoints / save_model are adapter directories."""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from helpers import make  # noqa: E402

import prefixtune as pt  # noqa: E402
from prefixtune.training.hf_trainer import PrefixSFTTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

TEXTS = ["the movie was great", "i loved the plot", "the acting was awful", "this film is bad"]


def test_sft_trainer_trains_the_prefix(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer()
    base = make("llama")
    torch.manual_seed(0)
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=4, init="random"))
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    prefix_before = model.prefixes["default"].embedding.weight.detach().clone()
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    cfg = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=0.1,
                        logging_steps=1, save_steps=3, report_to="none", use_cpu=True, max_length=32, seed=0,
                        disable_tqdm=True, dataloader_num_workers=0,
                        bf16=False)  # SFTConfig defaults to bf16 autocast, which stays on model.forward
    trainer = PrefixSFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    assert cfg.gradient_checkpointing  # SFTConfig default: exercises PrefixModel.activation_checkpointing_enable

    # the fused LM head sits on the wrapped model, so PrefixModel.forward (and the prefix) stays in the loop
    assert "forward" not in model.__dict__ and "forward" in base.__dict__
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True, use_cache=False)
        bare = base(**batch, fused_lm_head=True, use_cache=False)
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-4, atol=1e-5)  # same loss as the un-fused forward
    assert not torch.allclose(fused.loss, bare.loss)  # ... and not the bare model's

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert not torch.equal(model.prefixes["default"].embedding.weight, prefix_before)

    ck = tmp_path / "out" / "checkpoint-3"
    assert (ck / "adapter_model.safetensors").is_file() and not (ck / "model.safetensors").exists()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    reloaded = pt.load_adapter(make("llama"), out)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits,
                                   rtol=1e-4, atol=1e-5)
