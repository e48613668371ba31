"""PrefixEncoder: the trainable parameters of one adapter.

Laid out exactly as peft's `PrefixEncoder` so a state dict maps 1:1 onto peft's format:
- no projection: `embedding` is an `Embedding(P, L*2*token_dim)` table holding the key/values directly;
- projection: `embedding` is `Embedding(P, token_dim)` and `transform` an MLP
  token_dim -> projection_dim -> L*2*token_dim (Li & Liang's reparameterisation).
`token_dim` is kv_heads * head_dim (not hidden_size: grouped-query attention and explicit head_dim models).

layer_scale (table only): the table holds key/values in units of a fixed per-layer, per-key/value `scale` (the
std of the model's own key/values, set by initialize.py). Adam moves every parameter by about lr per step whatever its
size, and real value scales differ about 50x across layers (SmolLM2-135M; docs/python-api.md), so in plain
units one learning rate is too large for some layers and too small for others. Saving folds the scale away.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PrefixConfig


class PrefixEncoder(nn.Module):
    def __init__(self, cfg: PrefixConfig, num_layers: int, token_dim: int):
        super().__init__()
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.out_dim = num_layers * 2 * token_dim
        self.projection = cfg.projection
        if cfg.projection:
            self.embedding = nn.Embedding(cfg.num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, cfg.projection_dim), nn.Tanh(), nn.Linear(cfg.projection_dim, self.out_dim)
            )
        else:
            self.embedding = nn.Embedding(cfg.num_virtual_tokens, self.out_dim)
        # A buffer, so it moves with .to() and sits in state_dict() (checkpoints resume exactly); None = off.
        self.register_buffer("scale", torch.ones(self.out_dim) if cfg.layer_scale and not cfg.projection else None)
        self.dropout = nn.Dropout(cfg.dropout)

    def _table(self) -> torch.Tensor:
        table = self.embedding.weight
        if self.projection:
            return self.transform(table)
        return table * self.scale if self.scale is not None else table

    def forward(self) -> torch.Tensor:
        """All key/values of this prefix, flat: [P, L*2*token_dim] (peft's `prompt_embeddings` layout)."""
        return self.dropout(self._table())

    @torch.no_grad()
    def folded(self) -> torch.Tensor:
        """The MLP / scale folded away: what peft saves as `prompt_embeddings` (inference-only)."""
        return self._table().detach().clone()
