"""Block-level interference modules that mix a causal summary of the prefix into the residual stream.

``CumulativeMeanPooling`` is DWARF's interference pooling (spec dwarf.md §3.P0); the Wave Field family's
``FieldInterference`` (spec wavefield.md §1.1) lives beside its attention.  The shell inserts either one at the
blocks ``model.interference`` names, at its ``site`` (after the attention residual, or after the whole block).
"""
from __future__ import annotations

import torch
from torch import nn


def causal_running_mean(x: torch.Tensor) -> torch.Tensor:
    """mean_{s<=i} x_s along dim 1, computed in fp32 (spec dwarf.md §3.P0: the reference's autocast cumsum drifts)."""
    counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32).view(1, -1, 1)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc_dtype).cumsum(1) / counts.to(acc_dtype)).to(x.dtype)


class CumulativeMeanPooling(nn.Module):
    """x <- x + σ(W_g u_i) ⊙ W_p mean_{s<=i} u_s with u = LN(x) (spec dwarf.md §3.P0); no dropout."""

    def __init__(self, dim: int, module_idx: int = 0) -> None:
        # module_idx is part of the shell's interference interface; every pooling unit is identical (§3.P0)
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm(x)
        return x + torch.sigmoid(self.gate(u)) * self.proj(causal_running_mean(u))
