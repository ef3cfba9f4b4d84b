"""DWARF condA–F: the wave-field conditions (spec dwarf.md §3.A–F), and their naive references.

Deposit v·‖k‖, bilinear scatter onto G field cells, a per-head causal kernel (damped cosine, + learned dispersion β,
causal Morlet basis, DB4 basis + one KdV step + RG gain rescale), linear causal FFT convolution, softmax head
coupling, bilinear gather, sigmoid gate, out_proj.  The field primitives are field_ops'.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from wavetrain.models.attention.dwarf.common import (D4_COEFFICIENTS, D4_TAPS, channel_norm, check_heads, choice,
                                                     compute_dtype, linear_by_channel)
from wavetrain.models.field_ops import (bilinear_conv_gather, bilinear_gather_rows, bilinear_positions,
                                        bilinear_scatter_rows, causal_fft_conv, check_field_causality, field_stride)

FIELD_SCALES = 12       # Morlet / DB4 basis scales of condC/D (spec §3.C: S = log2(4096) = 12)
FIELD_CELLS_PER_TOKEN = 2   # auto field: G = 2·seq_len, the published 4096 cells at seq_len 2048 (spec §3.A)


class DwarfFieldAttention(nn.Module):
    """Wave-field attention of DWARF condA–F (spec dwarf.md §3.A–F): (B, N, D) -> (B, N, D), causal.

    Options (keyword-only; defaults = condA, spec §3.A):
    - ``kernel``: ``damped_cosine`` (A, B, E, F: k_h(t) = e^{−α_h t} cos(|ω_h| t + φ_h)), ``morlet`` (C: gains over a
      12-scale causal Morlet basis) or ``db4`` (D: gains over a 12-scale DB4 basis). Every kernel is L1-normalised.
    - ``dispersion``: learned β_h (init 1), K̂(f) ← K̂(f)·exp(i·2π·β_h·(f/G)²), then truncated back to t < G (§3.B).
    - ``kdv``: one explicit KdV step Fc ← Fc + α_h·Fc ⊙ (Fc[g] − Fc[g−1]) after the convolution, α init 0.05 (§3.D).
    - ``rg_gain_init``: condD's RG rescale of the basis gains in :meth:`post_init`, A ← A·0.458·0.864^ℓ / mean(A).
    - ``field_layout``: ``stretch`` (A–D: p_i = i·(G−1)/max(N−1, 1), positions depend on N, causal when every
      stride is ≥ 2), ``stride1`` (valid E/F: p_i = i, G = seq_len + 1, fraction 0, causal) or ``reference`` (the
      published E/F layout, G = seq_len stretched over N: LEAKS the future (spec §0); negative tests only).
    - ``field_size``: ``auto`` or an int (stretch layout only). ``auto`` keeps the published G = 4096 while every
      stride is ≥ 2 (seq_len ≤ 2048) and grows to G = 2·seq_len − 1 beyond (stride ≥ 2 for every N ≤ seq_len).
    - ``damping_init`` [lo, hi]: wave_damping = linspace(lo, hi, H); ``damping_floor``: α = softplus(a) + floor
      (A/E: [−2, 0], 0.05; F: [−8, −1], 0.001; spec §3.E/F).
    - ``gate_bias_init``: gate_proj bias set in :meth:`post_init` (0 = the reference's effective value, spec §6 D1).

    The fp32 field (fp64 for fp64 input) is computed outside autocast. Deviations from the reference, all at the
    level of round-off: positions come from the shared fp32 map of ``field_ops``; condB's |β| < 1e-8 shortcut is not
    taken (it changes the kernel by at most 2π·1e-8 relative and only cut β's gradient); D4 coefficients at full
    precision (the condD file rounds to 7 decimals); the E/F field accumulates in fp32, not in x's dtype.
    """

    def __init__(self, dim: int, n_heads: int, seq_len: int, layer_idx: int = 0, n_layers: int = 1, *,
                 kernel: str = "damped_cosine", dispersion: bool = False, kdv: bool = False,
                 rg_gain_init: bool = False, field_layout: str = "stretch", field_size: int | str = "auto",
                 damping_init: list[float] = (-2.0, 0.0), damping_floor: float = 0.05,
                 kdv_alpha_init: float = 0.05, gate_bias_init: float = 0.0) -> None:
        super().__init__()
        check_heads(dim, n_heads)
        self.n_heads = n_heads
        self.seq_len = seq_len
        self.layer_idx = layer_idx
        self.kernel_type = choice("kernel", kernel, ("damped_cosine", "morlet", "db4"))
        self.field_layout = choice("field_layout", field_layout, ("stretch", "stride1", "reference"))
        if dispersion and kernel != "damped_cosine":
            raise ValueError(f"dispersion=true needs kernel=damped_cosine (spec §3.B), got kernel={kernel}")
        if rg_gain_init and kernel == "damped_cosine":
            raise ValueError("rg_gain_init=true rescales basis gains: use kernel=morlet or db4 (spec §3.D)")
        self.field_size = self._resolve_field_size(field_size)
        self.dispersion = dispersion
        self.kdv = kdv
        self.rg_gain_init = rg_gain_init
        self.damping_floor = damping_floor
        self.gate_bias_init = gate_bias_init

        self.qkv = nn.Linear(dim, 3 * dim)
        self.gate_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.field_coupling = nn.Parameter(torch.eye(n_heads) + 0.01 * torch.randn(n_heads, n_heads))
        if kernel == "damped_cosine":
            if len(damping_init) != 2:
                raise ValueError(f"damping_init={list(damping_init)} must be [lo, hi] of linspace(lo, hi, n_heads)")
            self.wave_frequency = nn.Parameter(torch.logspace(-1.0, 1.0, n_heads))
            self.wave_damping = nn.Parameter(torch.linspace(float(damping_init[0]), float(damping_init[1]), n_heads))
            self.wave_phase = nn.Parameter(torch.linspace(0.0, 2 * math.pi * (n_heads - 1) / n_heads, n_heads))
            if dispersion:
                self.wave_dispersion = nn.Parameter(torch.ones(n_heads))
        else:
            centres = torch.linspace(0.0, FIELD_SCALES - 1, n_heads)[:, None]
            scales = torch.arange(FIELD_SCALES, dtype=torch.float32)[None, :]
            width = FIELD_SCALES / 4
            self.wavelet_gains = nn.Parameter(torch.exp(-0.5 * ((scales - centres) / width) ** 2) + 0.5)
        if kdv:
            self.kdv_alpha = nn.Parameter(torch.full((n_heads,), float(kdv_alpha_init)))
        self.post_init()

    def _resolve_field_size(self, field_size: int | str) -> int:
        if self.field_layout == "stride1":
            if field_size != "auto":
                raise ValueError(f"field_size={field_size} with field_layout=stride1: the layout fixes "
                                 f"G = seq_len + 1; set field_size=auto")
            size = self.seq_len + 1
            # p_i = i, G = M + 1: integer stride 1 without the G − 2 clamp (spec §0: causal).
            check_field_causality(size, size, "field_size", n_positions=self.seq_len)
            return size
        if self.field_layout == "reference":
            if field_size != "auto":
                raise ValueError(f"field_size={field_size} with field_layout=reference: the published E/F layout "
                                 f"is G = seq_len; set field_size=auto")
            warnings.warn("field_layout=reference reproduces the published condE/F layout, which leaks future "
                          "tokens into the past (spec dwarf.md §0); use it for negative tests only, "
                          "field_layout=stride1 is the causal E/F", stacklevel=3)
            return self.seq_len
        if field_size == "auto":
            # The stride (G−1)/(N−1) changes with N, so the layout must be causal at every N ≤ seq_len, not only at
            # N = seq_len.  G = 2·seq_len gives stride > 2 at every N, which keeps each token's two cells below the
            # next token's (spec §0), and is the published G = 4096 at the published seq_len 2048 (spec §3.A); a
            # shorter context gets a proportionally smaller field instead of a mostly empty 4096-cell one.
            size = FIELD_CELLS_PER_TOKEN * self.seq_len
        elif isinstance(field_size, int):
            size = field_size
        else:
            raise ValueError(f"field_size={field_size!r} must be an int or 'auto'")
        check_field_causality(size, self.seq_len, "field_size")
        return size

    def kernel_basis(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The (12, G) basis of condC (causal Morlet) or condD (DB4), each row L1-normalised (spec §3.C/D).

        Built per call in ``dtype`` (a few G-length elementwise ops), so the fp64 tests see an fp64 basis.
        """
        t = torch.arange(self.field_size, dtype=dtype, device=device)
        exponent = torch.arange(FIELD_SCALES - 1, -1, -1, dtype=dtype, device=device)[:, None]
        if self.kernel_type == "morlet":
            # w_s(t) = exp(−t²/(2σ_s²))·cos(π t/σ_s), σ_s = 2^{11−s}: s = 0 coarsest (σ = 2048), s = 11 finest.
            sigma = 2.0 ** exponent
            basis = torch.exp(-0.5 * (t / sigma) ** 2) * torch.cos(math.pi * t / sigma)
        else:
            # b_s(t) = h_τ at t = τ·2^s (h_0 at offset 0, forward order), taps at t ≥ G dropped.
            spacing = 2 ** torch.arange(FIELD_SCALES, device=device)[:, None]
            tap_position = torch.arange(D4_TAPS, device=device)[None, :] * spacing          # (12, 4)
            coefficients = torch.tensor(D4_COEFFICIENTS, dtype=dtype, device=device).expand(FIELD_SCALES, -1)
            inside = tap_position < self.field_size
            # Dropped taps add 0 at the clamped cell G − 1 (scatter_add, so they cannot overwrite a real tap there).
            basis = torch.zeros(FIELD_SCALES, self.field_size, dtype=dtype, device=device).scatter_add(
                1, tap_position.clamp(max=self.field_size - 1), torch.where(inside, coefficients, 0.0))
        return basis / basis.abs().sum(-1, keepdim=True).clamp(min=1e-8)

    def post_init(self) -> None:
        """Re-inits that run after the shell's N(0, 0.02) pass: the effective gate bias (spec §6 D1) and, for
        condD, the RG rescale A ← A·(0.458·0.864^ℓ)/mean(A), skipped when mean(A) ≤ 1e-6 (spec §3.D)."""
        with torch.no_grad():
            self.gate_proj.bias.fill_(self.gate_bias_init)
            if self.rg_gain_init:
                mean = self.wavelet_gains.mean()
                if mean > 1e-6:
                    self.wavelet_gains.mul_(0.458 * 0.864 ** self.layer_idx / mean)

    def kernels(self) -> torch.Tensor:
        """Per-head causal kernels k_h(t), t = 0..G−1, shape (H, G), as convolved (dispersion applied)."""
        dtype, device = compute_dtype(self.field_coupling), self.field_coupling.device  # fp32 even for bf16 params
        with torch.autocast(device_type=device.type, enabled=False):
            if self.kernel_type == "damped_cosine":
                t = torch.arange(self.field_size, dtype=dtype, device=device)
                alpha = F.softplus(self.wave_damping.to(dtype))[:, None] + self.damping_floor
                omega = self.wave_frequency.to(dtype).abs()[:, None]
                kernel = torch.exp(-alpha * t) * torch.cos(omega * t + self.wave_phase.to(dtype)[:, None])
            else:
                kernel = self.wavelet_gains.to(dtype) @ self.kernel_basis(dtype, device)
            kernel = kernel / kernel.abs().sum(-1, keepdim=True).clamp(min=1e-8)
            if self.dispersion:
                kernel = self._disperse(kernel)
        return kernel

    def _disperse(self, kernel: torch.Tensor) -> torch.Tensor:
        # Phase rotation on the n = 2G spectrum, back to time, keep t < G (the reference zeroes t ≥ G), spec §3.B.
        size = self.field_size
        spectrum = torch.fft.rfft(kernel, n=2 * size)
        bins = torch.arange(size + 1, dtype=kernel.dtype, device=kernel.device) / size
        phase = 2 * math.pi * self.wave_dispersion.to(kernel.dtype)[:, None] * bins ** 2
        rotated = spectrum * torch.polar(torch.ones_like(phase), phase)
        return torch.fft.irfft(rotated, n=2 * size)[:, :size]

    def layout(self, n: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower field cell (long) and fraction (fp32) of tokens 0..n−1 for this module's field layout."""
        if n > self.seq_len:
            raise ValueError(f"input of {n} tokens exceeds seq_len={self.seq_len} the field was sized for "
                             f"(G={self.field_size}); raise seq_len")
        if self.field_layout == "stride1":
            return bilinear_positions(n, 1.0, self.field_size, device)
        if self.field_layout == "stretch":
            _check_stretch_layout(self.field_size, n)
        return bilinear_positions(n, field_stride(self.field_size, n), self.field_size, device)

    def read_field(self, deposit: torch.Tensor, lower: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        """Per-head read-back (B, H, C, N) of the channel-major deposits (B, H, C, N): bilinear scatter, causal
        convolution with :meth:`kernels`, the optional KdV step and bilinear gather (spec §3.A steps 4, 5, 7; §3.D)."""
        kernel = self.kernels().to(deposit.dtype)
        if not self.kdv:
            return bilinear_conv_gather(deposit, lower, frac, kernel, self.field_size)
        field = causal_fft_conv(bilinear_scatter_rows(deposit, lower, frac, self.field_size), kernel[:, None, :])
        slope = F.pad(field[..., 1:] - field[..., :-1], (1, 0))                               # δ[0] = 0
        field = field + self.kdv_alpha.to(field.dtype)[:, None, None] * field * slope
        return bilinear_gather_rows(field, lower, frac)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        lower, frac = self.layout(n, x.device)
        # Channel-major (B, channels, N) throughout, the layout the field transforms run in.  q is unused in condA–F
        # (spec §3.A step 1), so one GEMM projects the k and v rows of qkv together with the gate.
        weight = torch.cat([self.qkv.weight[dim:], self.gate_proj.weight])
        bias = torch.cat([self.qkv.bias[dim:], self.gate_proj.bias])
        k, v, gate = linear_by_channel(x, weight, bias).split(dim, dim=1)
        k, v = (t.view(batch, self.n_heads, dim // self.n_heads, n) for t in (k, v))        # (B, H, C, N)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = compute_dtype(x)
            deposit = v.to(dtype) * channel_norm(k.to(dtype))
            read = self.read_field(deposit, lower, frac)
            # Head coupling (step 6) after the gather: both are linear and the gather is the same for every head,
            # so they commute, and the mix runs over N tokens instead of G = 2N cells.
            coupling = self.field_coupling.softmax(-1).to(dtype)
            mixed = torch.einsum("hg,bgm->bhm", coupling, read.flatten(2)).reshape(batch, dim, n)
        gate = torch.sigmoid(gate)
        return self.out_proj((mixed.to(gate.dtype) * gate).transpose(1, 2))


@functools.lru_cache(maxsize=4096)
def _check_stretch_layout(field_size: int, n: int) -> None:
    # The stretch map at length N is the absolute map with M = N; verified once per (G, N) on the exact fp32 layout.
    check_field_causality(field_size, n, "field_size")


def dwarf_field_kernel_reference(module: DwarfFieldAttention) -> torch.Tensor:
    """Kernels (H, G) built term by term from spec §3.A–D (loops over heads, scales and taps), with condB's
    dispersion as explicit DFT sums; differentiable in the module's parameters."""
    size = module.field_size
    dtype = module.field_coupling.dtype
    t = torch.arange(size, dtype=dtype)
    rows = []
    for head in range(module.n_heads):
        if module.kernel_type == "damped_cosine":
            alpha = torch.log1p(torch.exp(module.wave_damping[head])) + module.damping_floor
            omega = module.wave_frequency[head].abs()
            row = torch.exp(-alpha * t) * torch.cos(omega * t + module.wave_phase[head])
        else:
            row = torch.zeros(size, dtype=dtype)
            for scale in range(FIELD_SCALES):
                if module.kernel_type == "morlet":
                    sigma = 2.0 ** (FIELD_SCALES - 1 - scale)
                    wave = torch.exp(-t ** 2 / (2 * sigma ** 2)) * torch.cos(math.pi * t / sigma)
                else:
                    wave = torch.zeros(size, dtype=dtype)
                    for tap in range(D4_TAPS):
                        if tap * 2 ** scale < size:
                            wave[tap * 2 ** scale] = D4_COEFFICIENTS[tap]
                row = row + module.wavelet_gains[head, scale] * wave / wave.abs().sum()
        row = row / row.abs().sum()
        if module.dispersion:
            length = 2 * size
            freq = torch.arange(size + 1, dtype=dtype)
            time = torch.arange(length, dtype=dtype)
            spectrum = (row[None, :] * torch.exp(-2j * math.pi * freq[:, None] * t[None, :] / length)).sum(-1)
            spectrum = spectrum * torch.exp(2j * math.pi * module.wave_dispersion[head] * (freq / size) ** 2)
            # Inverse real DFT of a half spectrum: DC and Nyquist once, the other bins twice (Hermitian pairs).
            weight = torch.full((size + 1,), 2.0, dtype=dtype)
            weight[0] = weight[-1] = 1.0
            signal = (weight[None, :] * spectrum[None, :]
                      * torch.exp(2j * math.pi * time[:, None] * freq[None, :] / length)).sum(-1).real / length
            row = signal[:size]
        rows.append(row)
    return torch.stack(rows)


def dwarf_field_reference(module: DwarfFieldAttention, x: torch.Tensor) -> torch.Tensor:
    """Dense O(G²) form of :class:`DwarfFieldAttention`: scatter matrix, Toeplitz conv, explicit KdV and coupling."""
    batch, n, dim = x.shape
    heads, size = module.n_heads, module.field_size
    head_dim = dim // heads
    lower, frac = module.layout(n)
    qkv = module.qkv(x)
    k = qkv[..., dim:2 * dim].reshape(batch, n, heads, head_dim)
    v = qkv[..., 2 * dim:].reshape(batch, n, heads, head_dim)
    deposit = v * k.norm(dim=-1, keepdim=True)                               # (B, N, H, C)
    scatter = torch.zeros(size, n, dtype=x.dtype)
    for i in range(n):
        scatter[lower[i], i] += 1 - float(frac[i])
        scatter[lower[i] + 1, i] += float(frac[i])
    kernel = dwarf_field_kernel_reference(module).to(x.dtype)
    lag = torch.arange(size)[:, None] - torch.arange(size)[None, :]
    fields = []
    for head in range(heads):
        toeplitz = torch.where(lag >= 0, kernel[head][lag.clamp(min=0)], torch.zeros((), dtype=x.dtype))
        field = toeplitz @ scatter @ deposit[:, :, head]                      # (B, G, C)
        if module.kdv:
            previous = torch.cat([field[:, :1], field[:, :-1]], dim=1)
            field = field + module.kdv_alpha[head] * field * (field - previous)
        fields.append(field)
    coupling = module.field_coupling.softmax(-1)
    mixed = [sum(coupling[h, g] * fields[g] for g in range(heads)) for h in range(heads)]
    gathered = torch.stack([scatter.t() @ mixed[h] for h in range(heads)], dim=2)  # (B, N, H, C)
    gate = torch.sigmoid(module.gate_proj(x))
    return module.out_proj(gathered.reshape(batch, n, dim) * gate)

