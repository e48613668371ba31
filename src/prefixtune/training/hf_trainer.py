"""`transformers.Trainer` and TRL's `SFTTrainer` with a PrefixModel.

    from prefixtune.training.hf_trainer import PrefixTrainer      # = transformers.Trainer + the three methods below
    trainer = PrefixTrainer(model=pt.attach(base, cfg), args=TrainingArguments(...), train_dataset=..., ...)
    trainer.train(); trainer.train(resume_from_checkpoint=True); trainer.save_model("out")  # out/ is an adapter

    from prefixtune.training.hf_trainer import PrefixSFTTrainer   # = trl.SFTTrainer, same additions (needs trl)

Why a subclass at all: `Trainer._save` calls `model.save_pretrained` only for `PreTrainedModel` / `PeftModel`
instances (an isinstance check); any other module gets its whole `state_dict()` written, frozen base included, and
resuming reads it back with `load_state_dict`. The mixin routes those three places (save, resume, load-best) to the
adapter files instead, so a checkpoint holds the adapter (with the projection MLP, to resume exactly), optimizer
state for the prefix only, and the Trainer's own state. Everything else is the stock Trainer.

TRL's SFTTrainer also patches `model.forward` with a fused LM head that treats `model.base_model` as the
transformer backbone; on a PrefixModel that would skip the prefix. PrefixSFTTrainer moves that patch onto the
wrapped model, which PrefixModel.forward calls with the prefix in place (`fused_lm_head=True` passes through).
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import Trainer
from transformers.utils.generic import can_return_loss, find_labels

from ..adapter_io import CONFIG_NAME, WEIGHTS_NAME
from ..config import ConfigError
from ..extras import install_command
from ..model import PrefixModel

TRAINING_ARGS_NAME = "training_args.bin"


class PrefixTrainerMixin:
    """Save / resume / load-best through adapter files when the model is a PrefixModel; otherwise unchanged."""

    writes_adapter_checkpoints = True  # read by PrefixModel's warning about stock Trainers (hf_integration.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pm = self._prefix_model()
        if pm is not None:  # Trainer inspects forward() for label / input names: use the wrapped model's
            base_cls = type(pm.base_model)
            if self.args.label_names is None:
                self.label_names = find_labels(base_cls)
            self.can_return_loss = can_return_loss(base_cls)

    def _set_signature_columns_if_needed(self) -> None:
        pm = self._prefix_model()
        if pm is None or self._signature_columns is not None:
            return super()._set_signature_columns_if_needed()
        params = list(inspect.signature(pm.base_model.forward).parameters)
        self._signature_columns = params + ["adapter_names"] + list({"label", "label_ids", *self.label_names})

    def _prefix_model(self) -> PrefixModel | None:
        m = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return m if isinstance(m, PrefixModel) else None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        pm = self._prefix_model()
        if pm is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        pm.save_pretrained(output_dir, keep_projection=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        pm = self._prefix_model() if model is None or model is self.model or model is self.model_wrapped else None
        if pm is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not os.path.isfile(os.path.join(resume_from_checkpoint, CONFIG_NAME)):
            raise ConfigError(f"{resume_from_checkpoint} is not a prefixtune checkpoint (no {CONFIG_NAME} / {WEIGHTS_NAME})")
        pm.load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        pm = self._prefix_model()
        if pm is None:
            return super()._load_best_model()
        pm.load_adapter_weights(self.state.best_model_checkpoint)


class PrefixTrainer(PrefixTrainerMixin, Trainer):
    """transformers.Trainer that checkpoints and saves a PrefixModel as adapter files."""


def move_fused_lm_head(model) -> None:
    """Undo TRL's `add_fused_lm_head` patch on a PrefixModel and apply it to the wrapped model instead."""
    pm = model if isinstance(model, PrefixModel) else None
    if pm is None or "forward" not in pm.__dict__:
        return
    patched = pm.__dict__.pop("forward")
    from trl.trainer.utils import add_fused_lm_head

    fn = getattr(patched, "__func__", patched)
    free = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in (fn.__closure__ or ()))))
    kw = {k: free[k] for k in ("temperature", "cast_lm_head_to_fp32", "outputs") if k in free}
    add_fused_lm_head(pm.base_model, **kw)


def _make_sft_trainer():
    try:
        from trl import SFTTrainer
    except ImportError:
        raise ImportError(f"PrefixSFTTrainer needs TRL: {install_command('trl')}") from None

    class PrefixSFTTrainer(PrefixTrainerMixin, SFTTrainer):
        """trl.SFTTrainer that trains a PrefixModel's prefix and saves it as adapter files."""

        def __init__(self, model, *args, **kwargs):
            if isinstance(model, PrefixModel) and kwargs.get("peft_config") is not None:
                raise ConfigError("PrefixSFTTrainer: the model already carries a prefix; drop peft_config")
            super().__init__(model, *args, **kwargs)
            move_fused_lm_head(self.accelerator.unwrap_model(self.model))

    return PrefixSFTTrainer


def __getattr__(name):  # PrefixSFTTrainer is built on first use, so importing this module does not need trl
    if name == "PrefixSFTTrainer":
        cls = _make_sft_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
