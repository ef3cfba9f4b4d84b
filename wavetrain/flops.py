"""Analytic floating-point operation counts of every attention family and of a whole model step.

These are op counts from the formulas of the specs, not measurements: the benchmark (``python -m wavetrain.bench``)
prints them beside the measured times, and the training loop divides them by a device's peak to report MFU.

Conventions (one multiply-add = 2 FLOP; forward pass; ``batch`` sequences of ``n_tokens`` tokens per call):
- a matrix product (m × k)·(k × n) costs 2·m·k·n, counted dense even where a kernel skips a causal half;
- a real FFT (rfft or irfft) of length n costs 2.5·n·log₂n per channel (half the 5·n·log₂n of a complex FFT), a
  complex product of spectra 6 FLOP per bin (spec wavefield.md §2.2 "Cost");
- element-wise work is counted per element at the small constant written beside each term (e.g. a bilinear
  scatter is 2 multiplies + 2 adds per token-channel); exp, sigmoid and friends count as 4.

Each family function returns :class:`AttentionFlops`: ``projections`` (the module's parameter matmuls) and
``mixing`` (everything that moves information between tokens: N² scores, FFT convolutions, tap gathers...).
:func:`attention_flops` dispatches on the module's class; :func:`model_flops_per_token` gives the training FLOPs
per token (forward + backward = 3 × forward) used for MFU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

from wavetrain.models.attention.dwarf import DwarfDyadicAttention, DwarfFieldAttention, DwarfFullAttention
from wavetrain.models.attention.standard import CausalSelfAttention
from wavetrain.models.attention.wavefield import WaveFieldAttention
from wavetrain.models.attention.wda import CONTENT_CHUNK, WaveDensityAttention
from wavetrain.models.field_ops import fft_conv_length

ELEMENTWISE_TRANSCENDENTAL = 4  # FLOP charged for one exp / sigmoid / cos / elu
SPECTRAL_PRODUCT = 6            # FLOP of one complex multiply (4 mul + 2 add)
BACKWARD_FACTOR = 2             # backward ≈ 2 × forward (gradients w.r.t. inputs and weights)


@dataclass(frozen=True)
class AttentionFlops:
    """Forward FLOPs of one attention call: parameter matmuls and token mixing."""
    projections: float
    mixing: float

    @property
    def total(self) -> float:
        return self.projections + self.mixing


def real_fft_flops(length: int, channels: float) -> float:
    """One real FFT (rfft or irfft) of ``length`` points on ``channels`` independent channels: 2.5·n·log₂n each."""
    return 2.5 * length * math.log2(length) * channels if length > 1 else 0.0


def causal_fft_conv_flops(length: int, signal_channels: float, kernel_channels: float,
                          product_channels: float) -> float:
    """:func:`wavetrain.models.field_ops.causal_fft_conv` along ``length``: rfft of the signal and kernel channels,
    the spectral product and the irfft of every output channel, all at n = fft_conv_length(length) (≥ 2·length)."""
    n_fft = fft_conv_length(length)
    bins = n_fft // 2 + 1
    return (real_fft_flops(n_fft, signal_channels) + real_fft_flops(n_fft, kernel_channels)
            + SPECTRAL_PRODUCT * bins * product_channels + real_fft_flops(n_fft, product_channels))


# ------------------------------------------------------------------------------------------------ standard / full
def standard_attention_flops(module: CausalSelfAttention, n_tokens: int, batch: int = 1) -> AttentionFlops:
    """Softmax attention: projections 2·N·D·3D (qkv) + 2·N·D² (out) = 8·N·D²; scores Q·Kᵀ and A·V 2·N²·D each,
    4·N²·D per sequence (dense count; a causal flash kernel skips about half)."""
    dim = module.qkv.in_features
    n = n_tokens * batch
    return AttentionFlops(projections=8.0 * n * dim * dim, mixing=4.0 * batch * n_tokens ** 2 * dim)


def dwarf_full_attention_flops(module: DwarfFullAttention, n_tokens: int, batch: int = 1) -> AttentionFlops:
    """condM's full layer (spec dwarf.md §3.M): standard attention plus the gate projection (10·N·D²) and the
    gate product (N·D)."""
    dim = module.qkv.in_features
    n = n_tokens * batch
    return AttentionFlops(projections=10.0 * n * dim * dim,
                          mixing=4.0 * batch * n_tokens ** 2 * dim + (ELEMENTWISE_TRANSCENDENTAL + 1) * n * dim)


# ------------------------------------------------------------------------------------------------ FFT field family
def _field_mixing_flops(n_tokens: int, batch: int, dim: int, heads: int, field_size: int,
                        coupling_rows: int) -> float:
    """Deposit → bilinear scatter → causal FFT convolution over G cells → head coupling → gather → gate
    (spec wavefield.md §2.2 steps 3–9 and "Cost"; dwarf.md §3.A steps 2–8).  The H × H coupling runs on
    ``coupling_rows`` rows per sequence: the G cells (Wave Field) or, moved after the linear gather, the N tokens
    (DWARF field)."""
    n = n_tokens * batch
    deposit = 3.0 * n * dim                     # ‖k‖ (d_h mul-adds per head) and the product ‖k‖·v
    scatter = 4.0 * n * dim                     # (1−f)·u and f·u, two accumulating adds
    gather = 3.0 * n * dim                      # two weighted reads and their sum
    gate = (ELEMENTWISE_TRANSCENDENTAL + 1) * n * dim  # σ(W_g x) ⊙ read
    conv = causal_fft_conv_flops(field_size, batch * dim, heads, batch * dim)
    coupling = 2.0 * batch * heads * dim * coupling_rows  # Ψ'_h = Σ_h' P_hh' Ψ_h' per row and channel
    return deposit + scatter + gather + gate + conv + coupling


def wavefield_flops(module: WaveFieldAttention, n_tokens: int, batch: int = 1) -> AttentionFlops:
    """Wave Field V3.5 (spec wavefield.md §2.2 "Cost"): projections 8·N·D² (k, v, gate, out: q is never read, so
    the module does not compute it); two real FFTs
    of length fft_conv_length(G) ≥ 2G on D channels, the spectral product 6·D·(bins), the coupling 2·H·D·G, O(N·D)
    scatter/gather and the per-forward kernel (H·G damped cosines, ~8 FLOP per tap, and its FFT)."""
    dim, heads, size = module.dim, module.n_heads, module.field_size
    n = n_tokens * batch
    kernel = (2 * ELEMENTWISE_TRANSCENDENTAL) * heads * size
    return AttentionFlops(projections=8.0 * n * dim * dim,
                          mixing=_field_mixing_flops(n_tokens, batch, dim, heads, size, size) + kernel)


def dwarf_field_flops(module: DwarfFieldAttention, n_tokens: int, batch: int = 1) -> AttentionFlops:
    """DWARF condA–F (spec dwarf.md §3.A–F): the Wave Field cost (projections 8·N·D², no q; the head coupling on
    the N gathered rows) with G = ``module.field_size`` (auto: 2·seq_len,
    the published 4096 at seq_len 2048), plus the kernel: damped cosine (~8 FLOP per tap), or gains @ 12-scale basis (2·H·12·G, condC/D);
    condB's dispersion (an rfft and irfft of the H kernels at 2G and a phase rotation); condD's KdV step (3 FLOP per
    field element)."""
    dim, heads, size = module.qkv.in_features, module.n_heads, module.field_size
    n = n_tokens * batch
    if module.kernel_type == "damped_cosine":
        kernel = (2 * ELEMENTWISE_TRANSCENDENTAL) * heads * size
    else:
        kernel = 2.0 * heads * 12 * size + 2 * ELEMENTWISE_TRANSCENDENTAL * 12 * size
    if module.dispersion:
        kernel += 2 * real_fft_flops(2 * size, heads) + (ELEMENTWISE_TRANSCENDENTAL + SPECTRAL_PRODUCT) * heads * (
            size + 1)
    kdv = 3.0 * batch * dim * size if module.kdv else 0.0
    return AttentionFlops(projections=8.0 * n * dim * dim,
                          mixing=_field_mixing_flops(n_tokens, batch, dim, heads, size, n_tokens) + kernel + kdv)


# ------------------------------------------------------------------------------------------------ DWARF dyadic
def dwarf_dyadic_flops(module: DwarfDyadicAttention, n_tokens: int, batch: int = 1) -> AttentionFlops:
    """DWARF condG–P (spec dwarf.md §3.G–P): output i reads the U distinct offsets < N of its tap set.

    Projections: qkv 6·N·D², gate 2·N·D², out 2·N·D², plus condI–K's q_scale_proj (2·N·H·d_h·11).  Mixing per token:
    scores q·k at the U offsets (2·U·D; none for the deposit gather, which pays 3·D for v·‖k‖ instead), the
    weighting of the U value rows (2·U·D), slot weights (softmax / elu / gains: ~6 FLOP per head and slot), condH's
    long skips (2·D per skip), the head coupling (2·H·D) and the gate product."""
    dim, heads = module.qkv.in_features, module.n_heads
    head_dim = dim // heads
    n = n_tokens * batch
    unique = sum(1 for offset in module.unique_offsets if offset < n_tokens)
    slots = len(module.slot_offsets)
    projections = 10.0 * n * dim * dim
    if module.scale_gains == "query":
        projections += 2.0 * n * heads * head_dim * 11
    scores = 3.0 * n * dim if module.gather == "deposit" else 2.0 * n * unique * dim
    weighting = 2.0 * n * unique * dim
    slot_weights = (ELEMENTWISE_TRANSCENDENTAL + 2) * n * heads * slots
    skips = 2.0 * n * dim * sum(1 for offset in module.long_skips if offset < n_tokens)
    coupling = 2.0 * n * heads * dim if hasattr(module, "field_coupling") else 0.0
    gate = (ELEMENTWISE_TRANSCENDENTAL + 1) * n * dim
    return AttentionFlops(projections=projections,
                          mixing=scores + weighting + slot_weights + skips + coupling + gate)


# ------------------------------------------------------------------------------------------------ WDA
def wda_flops(module: WaveDensityAttention, n_tokens: int, batch: int = 1) -> AttentionFlops:
    """Wave-Density Attention (spec wda.md §2), by ``gate_pooling``:

    - projections: v_proj and out_proj 4·N·D², q_mod/k_mod 4·N·D·H, learned content maps 4·N·D·H·r; the gating and
      mask-scaling MLPs 2·R·H·G·(2D + M + R_mod) on R routed rows (R = N for prefix modes, 1 for ``full``);
    - masks: H·M·W·N waves at ~15 FLOP each (phase einsum 4, phase add 1, triangle 8, amplitude 2);
    - ``prefix`` (exact, O(N²)): kernel mixture 2·B·H·N²·M, density and window 5·B·H·N², A·Z 2·B·H·N²·(1 + d_h);
    - ``prefix_mixdens``: per-mask densities 5·H·M·N, FFT convolutions of the B·H·(1 + d_h) channels with the H·M
      mask densities (B·H·M·(1 + d_h) products and inverse FFTs), per-position mixture 2·B·H·N·M·(1 + d_h);
    - ``full``: one kernel per sequence, 2·B·H·M·N + 5·B·H·N, one FFT convolution of B·H·(1 + d_h) channels;
    - content path (§2.6, chunk c = 64): H·N·(4·r·d_h + 2·c·r + 2·c·d_h) per sequence; gates, blends, pooling 9·N·D.
    """
    dim, heads, head_dim = module.dim, module.n_heads, module.head_dim
    masks, waves, hidden = module.num_masks, module.num_waves_per_mask, module.gate_hidden
    rank = module.content_rank if module.content_mix > 0 else 0
    n = n_tokens * batch
    channels = 1 + head_dim
    routed = batch if module.gate_pooling == "full" else n
    projections = 4.0 * n * dim * dim + 4.0 * n * dim * heads
    if rank and module.learned_content:
        projections += 4.0 * n * dim * heads * rank
    projections += 2.0 * routed * heads * hidden * (2 * dim + masks + module.mod_rank)
    render = 15.0 * heads * masks * waves * n_tokens
    routing = routed * heads * masks * (2 * ELEMENTWISE_TRANSCENDENTAL + 2 * module.mod_rank)
    if module.gate_pooling == "prefix":
        density = batch * heads * n_tokens ** 2 * (2.0 * masks + ELEMENTWISE_TRANSCENDENTAL + 1 + 2.0 * channels)
    elif module.gate_pooling == "prefix_mixdens":
        density = ((ELEMENTWISE_TRANSCENDENTAL + 1) * heads * masks * n_tokens
                   + causal_fft_conv_flops(n_tokens, batch * heads * channels, heads * masks,
                                           batch * heads * masks * channels)
                   + 2.0 * n * heads * masks * channels)
    else:
        density = (2.0 * batch * heads * masks * n_tokens + (ELEMENTWISE_TRANSCENDENTAL + 1) * batch * heads * n_tokens
                   + causal_fft_conv_flops(n_tokens, batch * heads * channels, batch * heads, batch * heads * channels))
    content = heads * n * (4.0 * rank * head_dim + 2.0 * CONTENT_CHUNK * (rank + head_dim)) if rank else 0.0
    gates = 9.0 * n * dim  # km·v, the normalising division, the content blend (2), qm·ctx + (1 − qm)·v (3), pooling (2)
    return AttentionFlops(projections=projections, mixing=render + routing + density + content + gates)


ATTENTION_FLOPS: dict[type, Callable[[nn.Module, int, int], AttentionFlops]] = {
    CausalSelfAttention: standard_attention_flops,
    DwarfFullAttention: dwarf_full_attention_flops,
    WaveFieldAttention: wavefield_flops,
    DwarfFieldAttention: dwarf_field_flops,
    DwarfDyadicAttention: dwarf_dyadic_flops,
    WaveDensityAttention: wda_flops,
}


def flop_counter(module: nn.Module) -> Callable[[nn.Module, int, int], AttentionFlops] | None:
    """The family function for ``module``'s class (or a base class), None for an attention without a formula."""
    for cls in type(module).__mro__:
        if cls in ATTENTION_FLOPS:
            return ATTENTION_FLOPS[cls]
    return None


def attention_flops(module: nn.Module, n_tokens: int, batch: int = 1) -> AttentionFlops:
    """Forward FLOPs of one call of an attention module on ``batch`` sequences of ``n_tokens`` tokens."""
    counter = flop_counter(module)
    if counter is None:
        raise KeyError(f"no FLOP formula for {type(module).__name__}: add a function for its family to "
                       f"wavetrain.flops.ATTENTION_FLOPS")
    return counter(module, n_tokens, batch)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a model (the outermost modules whose class has a FLOP formula)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if flop_counter(module) is not None:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def model_flops_per_token(model: nn.Module, n_tokens: int) -> float:
    """Training FLOPs per token of one forward + backward pass over sequences of ``n_tokens``: 6 × the Linear weights
    outside the attention modules (embedding lookups are free; a tied head counts once as the head matmul) plus
    3 × each attention module's forward FLOPs per token (projections and mixing). Raises KeyError if an attention
    module has no formula (see :func:`attention_flops`)."""
    attentions = attention_modules(model)
    inside = {id(p) for module in attentions for p in module.parameters()}
    seen: set[int] = set()
    matmul_params = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in inside and id(module.weight) not in seen:
            seen.add(id(module.weight))
            matmul_params += module.weight.numel()
    attention = sum(attention_flops(module, n_tokens).total for module in attentions) / n_tokens
    return 2.0 * (1 + BACKWARD_FACTOR) * matmul_params + (1 + BACKWARD_FACTOR) * attention


# Peak dense bf16 tensor-core FLOP/s by device name (vendor data sheets, without sparsity). Matched in order, by
# case-insensitive substring of torch.cuda.get_device_name(): more specific names first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),     # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its name, or None when the device is not in :data:`PEAK_BF16_FLOPS`."""
    name = device_name.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in name:
            return peak
    return None
