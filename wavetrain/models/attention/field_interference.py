"""Wave Field's FieldInterferenceModule (FIM): a gated, causal global-context injection into the residual stream.

Spec wavefield.md §1.1 (reference 09b58e5:src/wave_field_transformer.py).  The shell applies it directly to the
residual stream after the blocks its interference spec names (every 3rd block in the reference), with no pre-norm:

    g_t = Dropout(expand(mean_{s≤t} compress(x_s)))          causal running mean over the prefix
    a_t = ⟨x̂_t, ĝ_t⟩,  x̂ = unit(local_phase_proj(x_t)),  ĝ = unit(global_phase_proj(g_t))
    s_t = σ(a_t / τ),  τ = softplus(τ_raw) + 0.05            scalar "interference strength" per token
    x_t ← x_t + σ(interference_gate([x_t; g_t])) ⊙ g_t · s_t
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FieldInterference(nn.Module):
    """FieldInterferenceModule of spec wavefield.md §1.1; ``forward(x)`` returns the updated residual stream.

    τ_raw starts at −2.0 for even ``module_idx`` and 0.5 for odd ones (τ = 0.1769 / 1.0241).  ``dropout`` acts on
    the global-context vector g.  The LayerNorm ``norm`` exists only so parameter counts match the reference,
    which builds it and never calls it (296,513 parameters at D = 256).
    """

    def __init__(self, dim: int, dropout: float = 0.1, module_idx: int = 0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"dim={dim} must be divisible by 4 (the FIM compresses to dim/4)")
        self.local_phase_proj = nn.Linear(dim, dim)
        self.global_phase_proj = nn.Linear(dim, dim)
        self.interference_gate = nn.Linear(2 * dim, dim)
        self.compress = nn.Linear(dim, dim // 4)
        self.expand = nn.Linear(dim // 4, dim)
        self.interference_temperature = nn.Parameter(torch.tensor(-2.0 if module_idx % 2 == 0 else 0.5))
        self.norm = nn.LayerNorm(dim)  # built but unused by the reference forward (parameter parity only)
        self.dropout = nn.Dropout(dropout)

    def temperature(self) -> torch.Tensor:
        """Effective temperature τ = softplus(τ_raw) + 0.05 (spec §1.1)."""
        return F.softplus(self.interference_temperature) + 0.05

    def global_context(self, x: torch.Tensor) -> torch.Tensor:
        """g_t = Dropout(expand(causal running mean of compress(x))) (B, N, D); the mean accumulates in fp32."""
        compressed = self.compress(x)
        acc_dtype = torch.float64 if compressed.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=acc_dtype)[:, None]
            running_mean = compressed.to(acc_dtype).cumsum(dim=1) / counts
        return self.dropout(self.expand(running_mean.to(compressed.dtype)))

    def strength(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Interference strength s_t = σ(⟨x̂_t, ĝ_t⟩ / τ) (B, N, 1) (spec §1.1; diagnostics §6.4)."""
        context = self.global_context(x) if context is None else context
        local_phase = F.normalize(self.local_phase_proj(x), dim=-1)
        global_phase = F.normalize(self.global_phase_proj(context), dim=-1)
        alignment = (local_phase * global_phase).sum(dim=-1, keepdim=True)
        return torch.sigmoid(alignment / self.temperature())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.global_context(x)
        gate = torch.sigmoid(self.interference_gate(torch.cat([x, context], dim=-1)))
        return x + gate * context * self.strength(x, context)
