"""Causal multi-head dot-product attention: the reference row of every table.

Fused ``scaled_dot_product_attention`` with ``is_causal=True`` (flash / memory-efficient kernel where the device
has one).  Options cover the baselines the specs compare against: attention-probability dropout (DWARF standard
baseline, spec dwarf.md §1; Wave Field baseline, spec wavefield.md §3) and bias-free projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Softmax attention over all earlier positions: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, n_heads: int, seq_len: int, layer_idx: int = 0, n_layers: int = 1, *,
                 attn_dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model={dim} is not divisible by n_heads={n_heads}: pick n_heads dividing d_model")
        self.n_heads = n_heads
        self.seq_len = seq_len
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(batch, n, dim))


def causal_attention_reference(module: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Explicit O(N²) softmax with a -inf upper triangle (no dropout): the naive form of the fused path."""
    batch, n, dim = x.shape
    q, k, v = module.qkv(x).view(batch, n, 3, module.n_heads, dim // module.n_heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / (dim // module.n_heads) ** 0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return module.out_proj(y.transpose(1, 2).reshape(batch, n, dim))
