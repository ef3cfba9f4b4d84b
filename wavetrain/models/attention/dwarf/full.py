"""DWARF condM's block 5: gated full causal softmax attention (spec dwarf.md §3.M), and its O(N²) reference."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wavetrain.models.attention.dwarf.common import check_heads, merge_heads, split_heads


class DwarfFullAttention(nn.Module):
    """Full causal softmax attention of condM's block 5 (spec dwarf.md §3.M): (B, N, D) -> (B, N, D).

    SDPA with is_causal and scale 1/√d_h, dropout ``attn_dropout`` on the probabilities in training, then the DWARF
    output gate σ(gate_proj(x)) (effective bias ``gate_bias_init`` = 2.0, set in :meth:`post_init`) and out_proj.
    No position bias (spec §6 D8). Quadratic by definition.
    """

    def __init__(self, dim: int, n_heads: int, seq_len: int, layer_idx: int = 0, n_layers: int = 1, *,
                 attn_dropout: float = 0.1, gate_bias_init: float = 2.0) -> None:
        super().__init__()
        check_heads(dim, n_heads)
        self.n_heads = n_heads
        self.seq_len = seq_len
        self.attn_dropout = attn_dropout
        self.gate_bias_init = gate_bias_init
        self.qkv = nn.Linear(dim, 3 * dim)
        self.gate_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.post_init()

    def post_init(self) -> None:
        """The gate bias survives the shell's init pass (condM re-initialises it to 2.0, spec §3.M)."""
        with torch.no_grad():
            self.gate_proj.bias.fill_(self.gate_bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv, x, self.n_heads)
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        gate = torch.sigmoid(self.gate_proj(x))
        return self.out_proj(merge_heads(y).to(gate.dtype) * gate)


def dwarf_full_attention_reference(module: DwarfFullAttention, x: torch.Tensor) -> torch.Tensor:
    """Explicit O(N²) masked softmax (no dropout) of :class:`DwarfFullAttention`."""
    n = x.shape[1]
    q, k, v = split_heads(module.qkv, x, module.n_heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    gate = torch.sigmoid(module.gate_proj(x))
    return module.out_proj(merge_heads(scores.softmax(-1) @ v) * gate)

