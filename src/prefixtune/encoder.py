"""PrefixEncoder: the trainable parameters of one adapter.

Laid out exactly as peft's `PrefixEncoder` so a state dict maps 1:1 onto peft's format:
- no projection: `embedding` is an `Embedding(P, L*2*token_dim)` table holding the key/values directly;
- projection: `embedding` is `Embedding(P, token_dim)` and `transform` an MLP
  token_dim -> projection_dim -> L*2*token_dim (Li & Liang's reparameterisation).
`token_dim` is kv_heads * head_dim (not hidden_size: grouped-query attention and explicit head_dim models).
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
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self) -> torch.Tensor:
        """All key/values of this prefix, flat: [P, L*2*token_dim] (peft's `prompt_embeddings` layout)."""
        table = self.embedding.weight
        out = self.transform(table) if self.projection else table
        return self.dropout(out)

    @torch.no_grad()
    def folded(self) -> torch.Tensor:
        """The MLP folded away: what peft saves as `prompt_embeddings` (inference-only)."""
        table = self.embedding.weight
        return (self.transform(table) if self.projection else table).detach().clone()
