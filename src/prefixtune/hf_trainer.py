"""Old import path kept for users: `from prefixtune.hf_trainer import PrefixTrainer` (see training/hf_trainer.py)."""

from .training import hf_trainer as _impl


def __getattr__(name):  # PrefixSFTTrainer is built on first use there, so importing this needs no trl
    return getattr(_impl, name)
