"""The stock transformers.Trainer trains a PrefixModel: it keeps the dataset columns `model.forward` names, so the
prefix model must advertise the base model's inputs (labels among them), and what it saves must be said plainly."""

import copy
import inspect

import datasets
import pytest
import torch
from helpers import make
from transformers import Trainer, TrainingArguments

import prefixtune as pt

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def rows(n=8, t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, t), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * t] * n, "labels": ids,
                                       "text": ["unused"] * n})


@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])
def test_forward_advertises_the_base_models_inputs(kind):
    base = make(kind)
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=3, init="zero"))
    names = list(inspect.signature(model.forward).parameters)
    base_names = [n for n in inspect.signature(base.forward).parameters if n != "kwargs"]
    assert names[:2] == ["input_ids", "attention_mask"] and set(base_names) <= set(names)
    assert "labels" in names and "adapter_names" in names
    clone = copy.deepcopy(model)  # the bound forward must follow the copy, not call the original
    assert clone.forward.args[0] is clone


def test_stock_trainer_trains_only_the_prefix(tmp_path):
    model = pt.attach(make("llama"), pt.PrefixConfig(num_virtual_tokens=3, init="zero", layer_scale=False))
    frozen = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    table = model.prefixes["default"].embedding.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=6,
                             logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    with pytest.warns(UserWarning, match="not a PrefixTrainer: its checkpoints will hold the whole frozen base"):
        trainer = Trainer(model=model, args=args, train_dataset=rows())  # remove_unused_columns=True: the default
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses  # labels reached the model: a loss exists and falls
    assert not torch.equal(model.prefixes["default"].embedding.weight, table)
    assert all(torch.equal(p, frozen[n]) for n, p in model.base_model.named_parameters())
    assert out.training_loss > 0


def test_prefix_trainer_does_not_warn(recwarn, tmp_path):
    from prefixtune.training.hf_trainer import PrefixTrainer

    model = pt.attach(make("llama"), pt.PrefixConfig(num_virtual_tokens=3, init="zero"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    PrefixTrainer(model=model, args=args, train_dataset=rows())
    assert not [w for w in recwarn if "not a PrefixTrainer" in str(w.message)]
