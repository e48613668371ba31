"""Named prefixes on a PrefixModel: add, load, save, switch and delete them (mixed into PrefixModel).

Each adapter is a PrefixEncoder in `model.prefixes[name]` with its PrefixConfig in `model.configs[name]` (and, on
encoder classifiers, its own copy of the classification head in `model.heads[name]`); `active_adapter` is the one
rows without an explicit adapter name use. Files are read and written by adapter_io.py (peft's format).
"""

from __future__ import annotations

import copy
from pathlib import Path

from . import inject
from .adapter_io import read_adapter, write_adapter
from .config import ConfigError, PrefixConfig, check_adapter_name
from .encoder import PrefixEncoder
from .hub import local_adapter_dir


class AdapterSetMixin:
    """Expects `self.base_model`, `self.arch`, `self.prefixes`/`configs`/`heads` (nn.ModuleDicts and a dict),
    `self.active_adapter`, `self._eval_memo`, `self._encoder_hooks` and the `_device`/`_head_name` properties."""

    def add_adapter(self, name: str, cfg: PrefixConfig, tokenizer=None, init_token_ids=None) -> None:
        """Add a fresh prefix. `tokenizer` is needed only for init="text" (to turn init_text into tokens);
        `init_token_ids` only for init="examples" (formatted training examples; used once, never saved)."""
        cfg = self._adapter_config(name, cfg)
        if cfg.init == "examples" and not init_token_ids:
            raise ConfigError("init='examples' needs the examples as token ids: attach(base, cfg, init_token_ids=ids), "
                              "e.g. from initialize.example_token_ids (prefixtune train does this)")
        if cfg.init == "text" and "init_token_ids" not in cfg.extra:
            if tokenizer is None:
                raise ConfigError("init='text' needs the tokenizer: attach(base, cfg, tokenizer=tokenizer)")
            ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"init_text {cfg.init_text!r} tokenizes to nothing; give a short task description")
            cfg.extra["init_token_ids"] = list(ids)
        enc = self._new_encoder(cfg)
        from .initialize import initialise  # late import: init runs the base model

        initialise(self, enc, cfg, init_token_ids)
        self._install(name, cfg, enc)

    def _adapter_config(self, name: str, cfg: PrefixConfig) -> PrefixConfig:
        """Check that adapter `name` can be added with `cfg`; -> a copy filled in for this base model."""
        check_adapter_name(name)
        if name in self.prefixes:
            raise ConfigError(f"adapter {name!r} already exists; pick another name or delete_adapter({name!r})")
        if cfg.placement != "decoder" and self.arch.kind != "seq2seq":
            raise ConfigError(f"placement={cfg.placement!r} only applies to encoder-decoder models; use 'decoder'")
        cfg = copy.deepcopy(cfg)
        cfg.base_model_name_or_path = cfg.base_model_name_or_path or getattr(
            self.base_model.config, "_name_or_path", None
        )
        cfg.task_type = self.arch.peft_task_type
        return cfg

    def _new_encoder(self, cfg: PrefixConfig) -> PrefixEncoder:
        """The adapter's parameters in their shapes, with nn defaults (peft's init); the base model does not run."""
        return PrefixEncoder(cfg, inject.num_groups(self.arch, cfg.placement), self.arch.token_dim)

    def _install(self, name: str, cfg: PrefixConfig, enc: PrefixEncoder) -> None:
        if cfg.placement == "full" and self._encoder_hooks is None:
            self._encoder_hooks = inject.EncoderPrefixHooks(self.base_model)
        self.prefixes[name] = enc.to(self._device)
        self.configs[name] = cfg
        head = self._base_head()
        if head is not None:
            self.heads[name] = copy.deepcopy(head).requires_grad_(True)
        if self.active_adapter is None:
            self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        self.active_adapter = self._known(name)
        if name in self.heads:
            setattr(self.base_model, self._head_name, self.heads[name])

    def delete_adapter(self, name: str) -> None:
        del self.prefixes[self._known(name)]
        self.configs.pop(name)
        self._eval_memo.pop(name, None)
        if name in self.heads:
            del self.heads[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.prefixes), None)
            if self.active_adapter:
                self.set_adapter(self.active_adapter)

    def load_adapter(self, directory: str | Path, name: str = "default", trainable: bool = False) -> None:
        """Add adapter `name` from a saved directory (ours or peft's) or a Hub repo id; frozen unless `trainable`."""
        check_adapter_name(name)
        directory = local_adapter_dir(directory)  # "user/repo": downloaded from the Hub (or its local cache)
        cfg, state, head_state = read_adapter(directory, self.arch, self._base_head())
        if name in self.prefixes:
            self.delete_adapter(name)
        # The weights come from the file: build the encoder in its shapes and load them, without initialising
        # (which would run the base model for a prefix that is then overwritten).
        cfg = self._adapter_config(name, cfg)
        enc = self._new_encoder(cfg)
        enc.load_state_dict(state)
        self._install(name, cfg, enc)
        if head_state is not None:
            self.heads[name].load_state_dict(head_state)
        self.prefixes[name].requires_grad_(trainable)
        if name in self.heads:
            self.heads[name].requires_grad_(trainable)

    def load_adapter_weights(self, directory: str | Path, name: str | None = None) -> None:
        """Load saved weights into adapter `name` (default: active) in place, so an optimizer built on its
        parameters (and that optimizer's restored state) stays attached: resuming training from a checkpoint."""
        name = self._known(name or self.active_adapter)
        _, state, head_state = read_adapter(directory, self.arch, self._base_head())
        enc = self.prefixes[name]
        mine = enc.state_dict()
        if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in state):
            raise ConfigError(
                f"checkpoint {directory} does not match adapter {name!r}: checkpoint has {sorted(state)}, the adapter "
                f"has {sorted(mine)} (a projection adapter resumes only from checkpoints saved with keep_projection)"
            )
        enc.load_state_dict(state)  # copies into the existing tensors
        if head_state is not None and name in self.heads:
            self.heads[name].load_state_dict(head_state)
        self._eval_memo.pop(name, None)

    def save_adapter(self, directory: str | Path, name: str | None = None, keep_projection: bool = False,
                     format: str = "prefix") -> Path:
        """Write `name` in peft's prefix-tuning format (format="cartridge": peft's CARTRIDGE, adapter_io.py).
        keep_projection also stores the MLP to resume training."""
        name = self._known(name or self.active_adapter)
        head = self.heads[name] if name in self.heads else None
        return write_adapter(
            directory, self.configs[name], self.arch, self.prefixes[name], head, self._head_name, keep_projection, format
        )

    def _known(self, name: str | None) -> str:
        if name not in self.prefixes:
            raise ConfigError(f"unknown adapter {name!r}; loaded adapters: {sorted(self.prefixes)}")
        return name
