"""Wave Field V3.5 attention: tokens deposit into a 1-D field, damped waves propagate it causally, tokens read it back.

Spec wavefield.md §2 (reference 09b58e5:src/wave_field_attention.py).  Per layer and head h:

    u_i = ‖k_i‖₂ · v_i                                  (deposit; q has no consumer and is not computed)
    Φ = bilinear scatter of u at field coordinate i·s    (s = (G−1)/(M−1) cells per token, absolute)
    Ψ_h = k̂_h ∗ Φ_h, k̂_h(t) ∝ e^{−softplus(a_h) t} cos(ω_h t + φ_h), ‖k̂_h‖₁ = 1   (causal linear FFT conv)
    Ψ' = P Ψ with P = row-softmax(C)                    (static cross-head coupling)
    y_i = W_o [σ(W_g h_i + b_g) ⊙ bilinear gather of Ψ' at i·s] + b_o

The model convention is M = seq_len + 1 (the benchmark builds M = T + 1 for inputs of T tokens, spec §3/§4), so the
char config (seq_len 128, G 1024) runs at s = 1023/128 exactly.  The bilinear layout is verified causal for every
position the module accepts (N ≤ seq_len) at construction (spec §7).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from wavetrain.models.field_ops import (
    auto_field_size,
    bilinear_gather,
    bilinear_positions,
    bilinear_scatter,
    causal_fft_conv,
    check_field_causality,
    field_stride,
    layout_buffers,
    read_layout,
)

log = logging.getLogger(__name__)

PUBLISHED_FIELD_SIZE = 1024  # G of every published V3.5 configuration (spec wavefield.md §3, §8)


def published_field_size(max_seq_len: int, n_positions: int) -> int:
    """``field_size="published"``: the published G = 1024 where its bilinear layout is causal for M = ``max_seq_len``
    (spec §7: stride 1023/(M−1), causal up to T = 511 and at a few longer lengths), else the smallest causal G."""
    try:
        check_field_causality(PUBLISHED_FIELD_SIZE, max_seq_len, n_positions=n_positions)
    except ValueError:
        return auto_field_size(max_seq_len, n_positions=n_positions)
    return PUBLISHED_FIELD_SIZE


def _field_dtype(x: torch.Tensor) -> torch.dtype:
    # The field path runs in fp32 even under bf16/fp16 autocast (spec §2.2 step 5); fp64 stays fp64 for the tests.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class WaveFieldAttention(nn.Module):
    """Wave Field V3.5 mixing layer (spec wavefield.md §2).  Maps (B, N, D) -> (B, N, D), strictly causal.

    Options (keyword-only):
    - ``field_size``: number of field cells G; ``"published"`` for the published G = 1024 (char seq_len 128:
      s = 7.99; BPE seq_len 256: s = 3.996) wherever it is causal at this seq_len and the smallest causal G
      otherwise (logged once per model); ``"auto"`` for the smallest causal G (= seq_len + 1, stride 1).  An
      explicit value is checked with :func:`check_field_causality` (ValueError naming the fix if it leaks).
    - ``gate_bias_init``: gate bias after the model-level init pass (spec §1 discrepancy, §9.1): 0.0 is what the
      reference actually ran (its init pass zeroes the bias; recommended), 2.0 the documented intent.

    ``layer_idx`` and ``n_layers`` belong to the shared constructor contract; V3.5 inits do not depend on them.
    """

    def __init__(self, dim: int, n_heads: int, seq_len: int, layer_idx: int = 0, n_layers: int = 1, *,
                 field_size: int | str = "auto", gate_bias_init: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.seq_len = seq_len
        self.layer_idx = layer_idx
        self.max_seq_len = seq_len + 1  # M = T + 1, spec §3/§4
        requested = field_size
        with torch.device("cpu"):  # the layout is checked on real positions, also when the model is built on "meta"
            if field_size == "published":
                field_size = published_field_size(self.max_seq_len, seq_len)
            elif field_size == "auto":
                field_size = auto_field_size(self.max_seq_len, n_positions=seq_len)
            elif isinstance(field_size, bool) or not isinstance(field_size, int):
                raise ValueError(f"field_size={field_size!r}: use a positive integer, 'published' or 'auto'")
            else:
                check_field_causality(field_size, self.max_seq_len, setting="field_size", n_positions=seq_len)
        self.field_size = field_size
        # A Python float, not a buffer: module.double()/.half() must never alter the fp32 layout the guard verified.
        self.field_stride = field_stride(field_size, self.max_seq_len)
        # The verified layout of every accepted position, computed once (field_ops.layout_buffers says why).
        lower, frac_bits = layout_buffers(seq_len, self.field_stride, field_size)
        self.register_buffer("field_lower", lower, persistent=False)
        self.register_buffer("field_frac_bits", frac_bits, persistent=False)
        self.gate_bias_init = float(gate_bias_init)

        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.gate_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.wave_frequency = nn.Parameter(torch.linspace(0.3, 4.0, n_heads))
        self.wave_damping = nn.Parameter(torch.linspace(-3.0, 0.5, n_heads))
        self.wave_phase = nn.Parameter(torch.linspace(0.0, math.pi, n_heads))
        self.field_coupling = nn.Parameter(torch.eye(n_heads) + 0.01 * torch.randn(n_heads, n_heads))
        self.post_init()
        if requested == "published" and field_size != PUBLISHED_FIELD_SIZE and layer_idx == 0 \
                and not self.wave_phase.is_meta:  # once per model, not for the config check's meta-device build
            log.info("attention=wavefield: the published field G = %d is not causal at seq_len = %d (stride %.4g "
                     "cells/token, spec wavefield.md §7); using the smallest causal field G = %d (stride %.4g)",
                     PUBLISHED_FIELD_SIZE, seq_len, field_stride(PUBLISHED_FIELD_SIZE, self.max_seq_len), field_size,
                     self.field_stride)

    def post_init(self) -> None:
        """Set the gate bias after the model-level init pass, which would otherwise zero it (spec §1, §9.1)."""
        with torch.no_grad():
            self.gate_proj.bias.fill_(self.gate_bias_init)

    def kernels(self) -> torch.Tensor:
        """L1-normalised damped-wave kernels k̂ (H, G) over lags t = 0..G−1 (spec §2.2 step 4), parameter dtype."""
        with torch.autocast(device_type=self.wave_frequency.device.type, enabled=False):
            lag = torch.arange(self.field_size, device=self.wave_frequency.device, dtype=self.wave_frequency.dtype)
            damping = F.softplus(self.wave_damping)[:, None]
            raw = torch.exp(-damping * lag) * torch.cos(self.wave_frequency[:, None] * lag + self.wave_phase[:, None])
            return raw / raw.abs().sum(-1, keepdim=True).clamp(min=1e-8)

    def coupling(self) -> torch.Tensor:
        """Static head coupling P = row-softmax(C) (H, H); row = receiving head (spec §2.2 step 6)."""
        return torch.softmax(self.field_coupling, dim=-1)

    def propagate(self, field: torch.Tensor) -> torch.Tensor:
        """Causal wave propagation then head coupling of a field (B, H, G, C) -> (B, H, G, C) (spec §2.2 steps 4–6).

        One kernel spectrum per forward, broadcast over batch and channels, no loop over heads (``causal_fft_conv``
        pads to ≥ 2G, so the convolution is linear, not circular).
        """
        dtype = field.dtype
        kernel = self.kernels().to(dtype)[:, None, :]  # (H, 1, G) against the field's (B, H, C, G)
        propagated = causal_fft_conv(field.transpose(-1, -2), kernel)
        return torch.einsum("hk,bkcg->bhgc", self.coupling().to(dtype), propagated)

    def _key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k and v chunks of [q | k | v] = x·W_qkvᵀ + b_qkv, each (B, N, H, d_h) (spec §2.2 step 1).

        q has no consumer in V3.5, so only the k and v rows of the fused weight are multiplied: the slice keeps the
        parameter and its state_dict entry as they are, and the q rows still receive an exactly zero gradient.
        """
        batch, n_tokens, _ = x.shape
        kv = F.linear(x, self.qkv_proj.weight[self.dim:], self.qkv_proj.bias[self.dim:])
        key, value = kv.view(batch, n_tokens, 2, self.n_heads, self.head_dim).unbind(2)
        return key, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        if n_tokens > self.seq_len:
            raise ValueError(f"WaveFieldAttention got {n_tokens} tokens but was built for seq_len={self.seq_len}: "
                             f"longer inputs would fold onto the last field cells and read the future "
                             f"(spec wavefield.md §7.1.5); raise seq_len")
        key, value = self._key_value(x)
        dtype = _field_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            key, value = key.to(dtype), value.to(dtype)
            deposit = torch.linalg.vector_norm(key, dim=-1, keepdim=True) * value  # (B, N, H, d_h)
            lower, frac = read_layout(self.field_lower, self.field_frac_bits, n_tokens)
            field = bilinear_scatter(deposit.transpose(1, 2), lower, frac, self.field_size)
            read = bilinear_gather(self.propagate(field), lower, frac)  # (B, H, N, d_h)
        gate = torch.sigmoid(self.gate_proj(x)).view(batch, n_tokens, self.n_heads, self.head_dim)
        mixed = (gate * read.transpose(1, 2)).reshape(batch, n_tokens, self.dim)
        return self.out_proj(mixed.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_heads={self.n_heads}, seq_len={self.seq_len}, field_size={self.field_size}, "
                f"field_stride={self.field_stride:.6g}, gate_bias_init={self.gate_bias_init}")


def wavefield_reference(module: WaveFieldAttention, x: torch.Tensor) -> torch.Tensor:
    """Naive O(H·N²) closed form of :class:`WaveFieldAttention` (spec wavefield.md §2.2, "Closed form"):

    y_{i,h} = γ_{i,h} ⊙ Σ_{h'} P_{hh'} Σ_j κ^{h'}_{ij} ‖k_{j,h'}‖ v_{j,h'},
    κ^h_{ij} = Σ_{c∈{a_i,a_i+1}} Σ_{c'∈{a_j,a_j+1}} w_i(c) w_j(c') k̂_h(c − c'),  k̂_h = 0 at negative lags.

    A dense token-to-token matrix instead of scatter → FFT → gather; the kernel is rebuilt here from the raw
    parameters.  No causal mask is applied: κ is lower-triangular only if the layout is causal.
    """
    batch, n_tokens, _ = x.shape
    heads, head_dim, size = module.n_heads, module.head_dim, module.field_size
    _, key, value = module.qkv_proj(x).view(batch, n_tokens, 3, heads, head_dim).transpose(1, 3).unbind(2)
    lower, frac = bilinear_positions(n_tokens, module.field_stride, size, device=x.device)
    frac = frac.to(x.dtype)

    lag = torch.arange(size, device=x.device, dtype=x.dtype)
    damping = torch.log1p(torch.exp(module.wave_damping.to(x.dtype)))[:, None]
    wave = torch.exp(-damping * lag) * torch.cos(module.wave_frequency.to(x.dtype)[:, None] * lag
                                                 + module.wave_phase.to(x.dtype)[:, None])
    kernel = wave / wave.abs().sum(-1, keepdim=True).clamp(min=1e-8)  # (H, G)

    corners = ((lower, 1.0 - frac), (lower + 1, frac))  # (cell, bilinear weight) pairs per token
    kappa = x.new_zeros(heads, n_tokens, n_tokens)
    for read_cell, read_weight in corners:
        for write_cell, write_weight in corners:
            cell_lag = read_cell[:, None] - write_cell[None, :]
            taps = kernel[:, cell_lag.clamp(min=0)] * (cell_lag >= 0)
            kappa = kappa + read_weight[:, None] * write_weight[None, :] * taps

    deposit = key.norm(dim=-1, keepdim=True) * value  # (B, H, N, d_h)
    per_head = torch.einsum("hij,bhjc->bhic", kappa, deposit)
    coupled = torch.einsum("hk,bkic->bhic", torch.softmax(module.field_coupling, -1).to(x.dtype), per_head)
    gate = torch.sigmoid(module.gate_proj(x)).view(batch, n_tokens, heads, head_dim).transpose(1, 2)
    mixed = (gate * coupled).transpose(1, 2).reshape(batch, n_tokens, module.dim)
    return module.out_proj(mixed)
