"""Causal multi-head dot-product attention: the reference row of every table.

Fused ``scaled_dot_product_attention`` with ``is_causal=True`` (flash / memory-efficient kernel where the device
has one).  Options cover the baselines the specs compare against: attention-probability dropout (DWARF standard
baseline, spec dwarf.md §1; Wave Field baseline, spec wavefield.md §3), bias-free projections, and the qkv init of
PyTorch's ``nn.TransformerEncoder`` (``qkv_init: xavier_shared``, the Wave Field baseline, spec wavefield.md §3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QKV_INITS = ("normal", "xavier_shared")


class CausalSelfAttention(nn.Module):
    """Softmax attention over all earlier positions: (B, N, D) -> (B, N, D).

    ``qkv_init``: ``normal`` keeps the shell's N(0, init_std) pass; ``xavier_shared`` re-draws the packed qkv
    weight Xavier-uniform over its (3D, D) shape with zero bias, from a generator seeded with the run seed
    (``torch.initial_seed()``), so every layer starts with the same Q/K/V weights: what ``nn.TransformerEncoder``
    gives, since it deep-copies one layer whose packed ``in_proj`` is a raw parameter the N(0, 0.02) re-init of
    Linear modules never reaches (spec wavefield.md §3).  The output projection keeps the shell's init."""

    def __init__(self, dim: int, n_heads: int, seq_len: int, layer_idx: int = 0, n_layers: int = 1, *,
                 attn_dropout: float = 0.0, bias: bool = True, qkv_init: str = "normal") -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model={dim} is not divisible by n_heads={n_heads}: pick n_heads dividing d_model")
        if qkv_init not in QKV_INITS:
            raise ValueError(f"attention.qkv_init={qkv_init!r} is unknown: use one of {list(QKV_INITS)}")
        self.n_heads = n_heads
        self.seq_len = seq_len
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.qkv_init = qkv_init
        self.post_init()

    def post_init(self) -> None:
        """Apply ``qkv_init`` after the shell's global init pass (which covers every Linear, the qkv one too)."""
        if self.qkv_init != "xavier_shared":
            return
        with torch.no_grad():
            generator = torch.Generator(device="cpu").manual_seed(torch.initial_seed())
            weight = torch.empty(self.qkv.weight.shape, dtype=torch.float32, device="cpu")
            self.qkv.weight.copy_(nn.init.xavier_uniform_(weight, generator=generator))
            if self.qkv.bias is not None:
                self.qkv.bias.zero_()

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
