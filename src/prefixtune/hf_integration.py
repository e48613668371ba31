"""What transformers.Trainer, TRL and the Hub expect of a model, for PrefixModel (which holds the engine).

PrefixModel is a plain nn.Module wrapping a frozen PreTrainedModel; Trainer/SFTTrainer probe it for the attributes a
PreTrainedModel has (main_input_name, loss_type, accepts_loss_kwargs, save_pretrained, ...). The answers live here,
next to nothing else, so model.py keeps only the prefix engine. See prefixtune.training.hf_trainer for PrefixTrainer
and prefixtune.hub for push_to_hub. Nothing here imports training/: a trainer says it writes adapter-only checkpoints
through its `writes_adapter_checkpoints` attribute.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from pathlib import Path


class HFIntegrationMixin:
    """Mixed into PrefixModel; expects `self.base_model` and the engine's save_adapter/activation_checkpointing_enable."""

    def _advertise_forward(self) -> None:
        # transformers.Trainer keeps only the dataset columns that `inspect.signature(model.forward)` names, so the
        # instance's forward advertises the base model's inputs (labels, decoder_attention_mask, token_type_ids...).
        self.forward = functools.partial(type(self).forward, self)
        self.forward.__signature__ = _advertised_signature(self.base_model.forward)

    _keys_to_ignore_on_save = None  # Trainer reads it after loading a checkpoint

    @property
    def main_input_name(self) -> str:
        return getattr(self.base_model, "main_input_name", "input_ids")

    @property
    def generation_config(self):
        return getattr(self.base_model, "generation_config", None)

    @property
    def loss_type(self):
        """Trainer reads it to count label tokens the way the base model's loss does (shifted for causal LMs)."""
        return getattr(self.base_model, "loss_type", None)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Trainer passes `num_items_in_batch` only if the model takes it; ours passes it on to the base model."""
        _warn_if_stock_trainer(self)  # Trainer.__init__ reads this once
        if hasattr(self.base_model, "accepts_loss_kwargs"):
            return bool(self.base_model.accepts_loss_kwargs)
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(self.base_model.forward).parameters.values())

    def get_input_embeddings(self):
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.base_model.get_output_embeddings()

    def add_model_tags(self, tags) -> None:
        """TRL tags the model it trains; the tags go on the base model (we write our own model card)."""
        if hasattr(self.base_model, "add_model_tags"):
            self.base_model.add_model_tags(tags)

    def save_pretrained(self, save_directory: str | Path, keep_projection: bool = True, is_main_process: bool = True,
                        **kwargs) -> Path | None:
        """What `transformers.Trainer` calls: write the active adapter's files into `save_directory`.

        Unlike `save_adapter` (which replaces the whole directory atomically), this adds/replaces the adapter files
        inside a directory that may hold other things (a Trainer checkpoint: optimizer, trainer state, tokenizer).
        Each file is replaced atomically and stale adapter files are removed. The frozen base model is never written;
        `state_dict`/`safe_serialization` and other PreTrainedModel arguments are accepted and ignored.
        keep_projection (default True here) keeps the unfolded MLP so training can resume exactly.
        """
        from .adapter_io import CONFIG_NAME, EXTRA_NAME, PROJECTION_NAME, WEIGHTS_NAME, atomic_files

        if not is_main_process:
            return None

        def fill(tmp: Path) -> list[Path]:
            built = self.save_adapter(tmp / "adapter", keep_projection=keep_projection)
            # weights last: a directory with new weights has the matching config beside them
            order = (PROJECTION_NAME, "README.md", EXTRA_NAME, CONFIG_NAME, WEIGHTS_NAME)
            return [built / n for n in order if (built / n).is_file()]

        return atomic_files(Path(save_directory), fill, stale=[PROJECTION_NAME])

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the active adapter to the Hugging Face Hub (see `prefixtune.hub.push_to_hub`)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """The name Trainer calls (TrainingArguments.gradient_checkpointing)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)


def _warn_if_stock_trainer(model) -> None:
    """Say once that a stock transformers.Trainer is about to checkpoint the whole base model.

    Trainer saves `model.state_dict()` whole for models that are not a PreTrainedModel, so each checkpoint holds the
    frozen base too; PrefixTrainer writes adapter files only. The caller is found on the stack because the Trainer
    never tells the model who is training it."""
    if getattr(model, "_warned_stock_trainer", False):
        return
    try:
        from transformers import Trainer
    except ImportError:
        return
    frame = inspect.currentframe()
    for _ in range(4):
        frame = frame.f_back if frame is not None else None
        owner = frame.f_locals.get("self") if frame is not None else None
        if isinstance(owner, Trainer):
            if not getattr(owner, "writes_adapter_checkpoints", False):  # PrefixTrainer / PrefixSFTTrainer say True
                model._warned_stock_trainer = True
                warnings.warn(
                    f"{type(owner).__name__} is not a PrefixTrainer: its checkpoints will hold the whole frozen base model "
                    "(model.safetensors), not the adapter; use prefixtune.training.hf_trainer.PrefixTrainer (or PrefixSFTTrainer) "
                    "for adapter-only checkpoints and save_model() as an adapter directory",
                    UserWarning, stacklevel=2,
                )
            return


def _advertised_signature(base_forward) -> inspect.Signature:
    """The base model's forward parameters (input_ids and attention_mask first, the rest keyword-only) plus
    adapter_names and **kwargs: what `PrefixModel.forward` accepts, named the way the base model names it."""
    P = inspect.Parameter
    base = [p for p in inspect.signature(base_forward).parameters.values() if p.kind not in (P.VAR_KEYWORD, P.VAR_POSITIONAL)]
    lead = [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in ("input_ids", "attention_mask")]
    rest = [p.replace(kind=P.KEYWORD_ONLY) for p in base if p.name not in ("input_ids", "attention_mask")]
    extra = [P("adapter_names", P.KEYWORD_ONLY, default=None), P("kwargs", P.VAR_KEYWORD)]
    return inspect.Signature(lead + rest + extra)
