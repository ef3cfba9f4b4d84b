"""Wave-Density Attention (WDA): the attention mixing of the reference ``WaveDensityAttentionBlock``
(spec wda.md §2).

Each head owns a bank of M learnable wave masks over the causal lag d (§2.2); a gating MLP picks a convex
mixture of k of them (Mixture-of-Masks, §2.3); the mixture goes through a density map and a Gaussian distance
window (§2.4); the density weights a key-modulated causal average of the values, normalised by the convolved
key signal (§2.5); a rank-r causal linear-attention branch is mixed in (§2.6); a per-token gate blends the
context with the token's own value before the output projection (§2.7).  The FFN, both post-LN LayerNorms and
the residuals live in the shared shell (``model.norm: post``), not here.

Causality (§2.8, §7.1) is selected by ``gate_pooling``:

* ``prefix`` (default, exact, strictly causal): position t routes on the mean of x_0..x_t, so every position has
  its own kernel D_t(d) = g(d)·ρ(Σ_m w̃_{t,m} M_m(d)); evaluated as a lower-triangular (N, N) matrix per head,
  O(N²) time and memory by construction.
* ``prefix_mixdens`` (strictly causal, DIFFERENT SEMANTICS): the FFT-friendly approximation
  D_t(d) ≈ g(d)·Σ_m w̃_{t,m} ρ(M_m(d)), a mixture of densities instead of the density of the mixture.  Each of
  the M per-mask densities is applied by one FFT convolution and the M results are mixed per position
  (:func:`mask_mixture_conv`; the weights depend on t, so the mixture cannot move into the frequency domain):
  O(M·N log N) time, O(M·N·h_d) memory.  For ``density=raw`` (ρ linear) it coincides with ``prefix``.
* ``full`` — LEAKY, NOT CAUSAL, FOR REPRODUCTION ONLY: the reference pools over the WHOLE sequence, future tokens
  included, so the kernel used at position t depends on tokens t+1…N-1.  Every published WDA perplexity was
  obtained this way.  Never use it for a causal-LM result.

Two reference-code idioms are exposed by ``st_estimator``.  The reference writes both of its straight-through
estimators (top-k gate, §2.3; stochastic Heaviside, §2.4) as ``hard + (soft - hard).detach()``, which evaluates
to ``soft`` in the forward pass and carries no gradient at all (neither term depends on a parameter):

* ``intended`` (default, what spec §2.3/§2.4 describe): forward = hard (uniform 1/k on the top-k masks; the
  Heaviside 1[z > 0]), backward = gradient of soft (the softmax over all M logits; σ(step_alpha·z)).
* ``reference_code``: what the reference code computes: forward = the dense softmax over all M masks (and the mean
  of σ(step_alpha·(K + ε)) for ``density=sampling``), with no gradient through either, so the gating MLPs never
  receive a gradient (and, with density=sampling, neither does anything that shapes the kernel: waves, mask
  scaling).  Together with ``gate_pooling=full`` this is the computation behind the published 130M numbers.

When every visible lag of a position has zero density (density=sampling with all draws below threshold, or a
raw density summing to ~0), the normaliser Σ_d D(d)·km is ~0: ``prefix`` (direct sums) then gives an exact 0
context, while the FFT modes (``full``, ``prefix_mixdens``), like the reference, divide FFT round-off by 1e−8.

Masks and kernels are always rendered from the live parameters: the reference's eval-mode mask cache, which is
never invalidated (§2.2, §7.9), is deliberately not reproduced.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wavetrain.models.field_ops import autocast_off_backward, cache_blocked, causal_fft_conv, fft_conv_length

GATE_POOLINGS = ("prefix", "prefix_mixdens", "full")
DENSITIES = ("sigmoid", "raw", "sampling")
ST_ESTIMATORS = ("intended", "reference_code")

NORMALISER_EPS = 1e-8  # added to the convolved key signal (§2.5) and to the gate-weight sum (§2.3 step 4)
CONTENT_EPS = 1e-6  # added to the linear-attention denominator (§2.6)
CONTENT_CHUNK = 64  # chunk length of the content path's prefix sum (§2.6)
SAMPLE_CHUNK_ELEMENTS = 1 << 25  # bounds the (kernel × samples) temporary of the stochastic threshold
# CPU block sizes (field_ops.cache_blocked); a GPU takes each of these in one piece.
MIXTURE_BLOCK_ELEMENTS = 1 << 18  # spectrum entries per block of the prefix_mixdens mixture (cache-sized)
RENDER_CHUNK_ELEMENTS = 1 << 20  # (wave × lag) entries per chunk of the mask rendering (cache-sized)


def triangle_wave(phase: torch.Tensor) -> torch.Tensor:
    """The reference's triangle wave (spec wda.md §2.2): t = (x − π/2)/(2π), u = t − ⌊t⌋,
    tri(x) = 2·(1 − 2|u − ½|) − 1.  Period 2π, zeros at 0 and π, −1 at π/2, +1 at 3π/2."""
    t = (phase - math.pi / 2) / (2 * math.pi)
    frac = t - torch.floor(t)
    return 2.0 * (1.0 - 2.0 * torch.abs(frac - 0.5)) - 1.0


def offset_encoding(lags: torch.Tensor, seq_len: int) -> torch.Tensor:
    """p(δ) = (δ/S_max, sign(δ)·√(|δ| + 1e−6)/√S_max) for each lag (spec §2.2); S_max is the constructor
    value, not the current length.  Returns (L, 2) in the dtype of ``lags``."""
    linear = lags / seq_len
    root = torch.sign(lags) * torch.sqrt(torch.abs(lags) + 1e-6) / math.sqrt(seq_len)
    return torch.stack([linear, root], dim=-1)


def distance_window(lags: torch.Tensor, seq_len: int, sigma_frac: float) -> torch.Tensor:
    """Gaussian distance window g(d) = exp(−d²/(2σ_w²)), σ_w = sigma_frac·S_max (spec §2.4: 0.25 in the
    reference); sigma_frac = 0 switches the window off (g ≡ 1)."""
    if sigma_frac == 0:
        return torch.ones_like(lags)
    sigma = sigma_frac * seq_len
    return torch.exp(-(lags**2) / (2 * sigma**2))


def _wave(turns: torch.Tensor, sin_waves: bool) -> torch.Tensor:
    """φ at phases τ given in turns (spec §2.2): sin(2πτ), or the triangle wave as 4·|ρ − round(ρ)| − 1 of
    ρ = τ − ¼ (the caller folds the −¼ into τ).  With u = frac(ρ), |u − ½| = ½ − |ρ − round(ρ)|, so this is
    :func:`triangle_wave`'s 2·(1 − 2|u − ½|) − 1 at 2πτ."""
    if sin_waves:
        return torch.sin(2 * math.pi * turns)
    return (turns - torch.round(turns)).abs_().mul_(4.0).sub_(1.0)


def _wave_slope(turns: torch.Tensor, sin_waves: bool) -> torch.Tensor:
    """dφ/dτ of :func:`_wave`: 2π·cos(2πτ), or 4·sign(ρ − round(ρ)) for the triangle wave."""
    if sin_waves:
        return 2 * math.pi * torch.cos(2 * math.pi * turns)
    return (turns - torch.round(turns)).sign_().mul_(4.0)


class _WaveBank(torch.autograd.Function):
    """Masks M[h, m, l] = Σ_w a[h, m, w]·φ(τ[h, m, w, l]) with τ = ⟨coefficients[h, m, w], basis[l]⟩ (spec §2.2).

    The (H, M, W, L) waves are never materialised: the lag axis is visited in chunks of RENDER_CHUNK_ELEMENTS
    entries, in the forward pass and again in the backward pass, which recomputes the waves of each chunk instead
    of saving them: ∂L/∂a = Σ_l g·φ(τ) and ∂L/∂coefficients = Σ_l (a·g·φ'(τ))·basis[l]."""

    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, amps: torch.Tensor, basis: torch.Tensor,
                sin_waves: bool) -> torch.Tensor:
        heads, masks, waves, _ = coefficients.shape
        out = amps.new_empty(heads * masks, 1, basis.shape[0])
        for lags in _lag_chunks(basis.shape[0], amps.numel(), amps.device):
            turns = coefficients.reshape(-1, basis.shape[1]) @ basis[lags].T  # (H·M·W, lags)
            out[..., lags] = amps.reshape(-1, 1, waves) @ _wave(turns, sin_waves).view(heads * masks, waves, -1)
        ctx.save_for_backward(coefficients, amps, basis)
        ctx.sin_waves = sin_waves
        return out.view(heads, masks, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off_backward
    def backward(ctx, grad_out: torch.Tensor):
        coefficients, amps, basis = ctx.saved_tensors
        heads, masks, waves, _ = coefficients.shape
        grad_out = grad_out.reshape(heads * masks, 1, -1)
        grad_coefficients = torch.zeros_like(coefficients).view(-1, basis.shape[1])
        grad_amps = torch.zeros_like(amps).view(heads * masks, 1, waves)
        for lags in _lag_chunks(basis.shape[0], amps.numel(), amps.device):
            turns = coefficients.reshape(-1, basis.shape[1]) @ basis[lags].T
            grad_chunk = grad_out[..., lags]  # (H·M, 1, lags)
            wave = _wave(turns, ctx.sin_waves).view(heads * masks, waves, -1)
            grad_amps.baddbmm_(grad_chunk, wave.transpose(1, 2))
            slope = _wave_slope(turns, ctx.sin_waves).view(heads * masks, waves, -1)
            grad_turns = slope * amps.reshape(-1, waves, 1) * grad_chunk
            grad_coefficients.addmm_(grad_turns.view(-1, grad_turns.shape[-1]), basis[lags])
        return grad_coefficients.view_as(coefficients), grad_amps.view_as(amps), None, None


def _lag_chunks(length: int, waves: int, device: torch.device) -> list[slice]:
    """Lag slices of at most RENDER_CHUNK_ELEMENTS (wave × lag) entries (at least one lag) for :class:`_WaveBank`;
    all lags at once where the device is not cache-blocked (GPUs)."""
    if not cache_blocked(device):
        return [slice(0, length)]
    step = max(1, RENDER_CHUNK_ELEMENTS // max(1, waves))
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]


def straight_through_topk(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Straight-through top-k over the last axis (spec §2.3 step 3, as intended): the forward value is exactly
    1/k on the k largest logits and exactly 0 elsewhere; the gradient is that of softmax(logits / T)."""
    soft = torch.softmax(logits / temperature, dim=-1)
    selected = torch.topk(logits, k, dim=-1).indices
    hard = torch.zeros_like(soft).scatter_(-1, selected, 1.0 / k)
    # soft − soft.detach() is exactly 0 in value, so the forward value is exactly `hard`
    return hard + (soft - soft.detach())


def _sum_over_sample_chunks(kernel: torch.Tensor, noise: torch.Tensor, step_alpha: float,
                            derivative: bool) -> torch.Tensor:
    """Σ_s f(step_alpha·(kernel + ε_s)) with f = σ (derivative=False) or step_alpha·σ' (derivative=True).

    kernel (B, H, R, L), noise (B, H, n, L) (ε_s shared by all R rows).  The sample axis is visited in chunks so
    that the (B, H, R, chunk, L) temporary stays under SAMPLE_CHUNK_ELEMENTS."""
    n_samples = noise.shape[-2]
    chunk = max(1, SAMPLE_CHUNK_ELEMENTS // max(1, kernel.numel()))
    total = torch.zeros_like(kernel)
    for start in range(0, n_samples, chunk):
        soft = torch.sigmoid(step_alpha * (kernel.unsqueeze(-2) + noise[:, :, None, start:start + chunk]))
        total = total + (step_alpha * soft * (1.0 - soft) if derivative else soft).sum(-2)
    return total


class _StochasticThreshold(torch.autograd.Function):
    """D = (1/n) Σ_s H_ST(K + ε_s) (spec §2.4): forward the fraction of draws with K + ε_s > 0, backward the mean
    of d/dK σ(step_alpha·(K + ε_s)).  The forward counts through a sorted copy of the draws (no n-fold
    temporary); the backward recomputes the surrogate in sample chunks instead of saving n copies of K."""

    @staticmethod
    def forward(ctx, kernel: torch.Tensor, noise: torch.Tensor, step_alpha: float) -> torch.Tensor:
        n_samples = noise.shape[-2]
        sorted_noise = noise.transpose(-1, -2).contiguous().sort(dim=-1).values  # (B, H, L, n)
        # K + ε > 0  ⇔  ε > −K (exact in floating point); searchsorted(right) counts the draws ε ≤ −K
        at_or_below = torch.searchsorted(sorted_noise, (-kernel).transpose(-1, -2).contiguous(), right=True)
        ctx.save_for_backward(kernel, noise)
        ctx.step_alpha = step_alpha
        return ((n_samples - at_or_below).transpose(-1, -2).to(kernel.dtype)) / n_samples

    @staticmethod
    @autocast_off_backward
    def backward(ctx, grad_density: torch.Tensor):
        kernel, noise = ctx.saved_tensors
        surrogate = _sum_over_sample_chunks(kernel, noise, ctx.step_alpha, derivative=True)
        return grad_density * surrogate / noise.shape[-2], None, None


def causal_linear_attention(query_features: torch.Tensor, key_features: torch.Tensor, values: torch.Tensor,
                            chunk: int = CONTENT_CHUNK) -> torch.Tensor:
    """Causal linear attention out_t = Σ_{j≤t} (q_t·k_j) v_j / (q_t·Σ_{j≤t} k_j + 1e−6) (spec §2.6).

    Chunked prefix sum, vectorised over chunks: the state before each chunk is an exclusive cumulative sum of
    the per-chunk Σ k_j v_jᵀ, and the within-chunk part is a masked (chunk × chunk) product.  Memory
    O(N·(chunk + r·h_d/chunk)) per head instead of the O(N·r·h_d) of a full cumulative outer product.
    Shapes: features (B, H, N, r) (already positive), values (B, H, N, E); returns (B, H, N, E)."""
    batch, heads, length, rank = query_features.shape
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    # zero keys/values in the padding contribute nothing; padded query rows are cut off at the end
    q, k, v = (F.pad(t, (0, 0, 0, pad)).unflatten(2, (n_chunks, chunk))
               for t in (query_features, key_features, values))
    chunk_kv = torch.einsum("bhcjr,bhcje->bhcre", k, v)
    chunk_k = k.sum(dim=3)
    kv_before = torch.cat([torch.zeros_like(chunk_kv[:, :, :1]), chunk_kv.cumsum(2)[:, :, :-1]], dim=2)
    k_before = torch.cat([torch.zeros_like(chunk_k[:, :, :1]), chunk_k.cumsum(2)[:, :, :-1]], dim=2)
    scores = torch.einsum("bhcir,bhcjr->bhcij", q, k).tril()
    numerator = torch.einsum("bhcir,bhcre->bhcie", q, kv_before) + scores @ v
    denominator = torch.einsum("bhcir,bhcr->bhci", q, k_before) + scores.sum(-1)
    out = numerator / (denominator.unsqueeze(-1) + CONTENT_EPS)
    return out.flatten(2, 3)[:, :, :length]


def _even_slices(total: int, most: int) -> list[slice]:
    """``total`` indices cut into equal slices of at most ``most`` (at least 1) each."""
    count = -(-total // max(1, min(total, most)))
    step = -(-total // count)
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


def _mixture_blocks(heads: int, channels: int, masks: int, entries: int) -> list[tuple[int, slice, slice]]:
    """(head, channel slice, mask slice) blocks of :class:`_MaskMixtureConv`, each holding at most
    MIXTURE_BLOCK_ELEMENTS spectrum entries (``entries`` per channel and mask), masks innermost: the per-(head,
    channel group) operands and accumulators then stay in cache while the masks stream past them.  Small problems
    take whole heads per block, long sequences a few channels of one mask."""
    per_block = max(1, MIXTURE_BLOCK_ELEMENTS // max(1, entries))
    channel_slices = _even_slices(channels, per_block)
    mask_slices = _even_slices(masks, per_block // channels if len(channel_slices) == 1 else 1)
    return [(h, c, m) for h in range(heads) for c in channel_slices for m in mask_slices]


class _MaskMixtureConv(torch.autograd.Function):
    """Per-position mixture of per-mask causal convolutions (the ``prefix_mixdens`` context, spec wda.md §2.8):

        out[b, h, c, t] = Σ_m w[b, h, m, t] · Σ_{s≤t} k[b, h, m, t − s] · z[b, h, c, s]

    for signal z (B, H, C, N), per-mask kernels k (B or 1, H, M, N) and weights w (B, H, M, N).  The weights vary
    with the output position t, so the sum over masks cannot move into the frequency domain: every (mask, channel)
    pair takes its own inverse FFT.  The spectra of z and k are computed once (rfft at n = fft_conv_length(N) ≥ 2N,
    so the circular convolution equals the linear one on [0, N)); the per-mask convolutions y are kept for the
    backward pass.  On a GPU the products, inverse FFTs and the weighted sum each run as one launch over every
    (batch, head, mask, channel); on a CPU they run block by block (:func:`_mixture_blocks`), so no other
    (B, H, M, C, N)-sized temporary exists.

    Backward (g = ∂L/∂out): ∂L/∂w[m, t] = Σ_c g[c, t]·y_m[c, t]; with p_m = w_m ⊙ g, ∂L/∂z = Σ_m corr(k_m, p_m)
    and ∂L/∂k_m = Σ_c corr(z_c, p_{m,c}), the causal cross-correlations irfft(P·conj(K))[:N] and
    irfft(P·conj(Z))[:N] (negative lags land in the zero padding), each summed in the frequency domain before its
    single inverse transform.
    """

    @staticmethod
    def forward(ctx, signal: torch.Tensor, kernels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        batch, heads, channels, length = signal.shape
        n_fft = fft_conv_length(length)
        signal_f = torch.fft.rfft(signal, n=n_fft)  # (B, H, C, F)
        kernel_f = torch.fft.rfft(kernels, n=n_fft)  # (B|1, H, M, F)
        if cache_blocked(signal.device):
            per_mask, out = _mixture_forward_blocked(signal_f, kernel_f, weights, length, n_fft)
        else:
            per_mask = torch.fft.irfft(kernel_f.unsqueeze(3) * signal_f.unsqueeze(2), n=n_fft)[..., :length]
            out = (weights.unsqueeze(3) * per_mask).sum(2)  # Σ_m w_m ⊙ y_m, (B, H, C, N)
        ctx.save_for_backward(signal_f, kernel_f, weights, per_mask)
        ctx.n_fft, ctx.kernel_batch = n_fft, kernels.shape[0]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off_backward
    def backward(ctx, grad_out: torch.Tensor):
        signal_f, kernel_f, weights, per_mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        signal_conj, kernel_conj = signal_f.conj().resolve_conj(), kernel_f.conj().resolve_conj()
        if cache_blocked(grad_out.device):
            grad_signal_f, grad_kernel_f, grad_weights = _mixture_backward_blocked(
                grad_out, signal_conj, kernel_conj, weights, per_mask, needs, ctx.n_fft, ctx.kernel_batch)
        else:
            grad_weights = (grad_out.unsqueeze(2) * per_mask).sum(3) if needs[2] else None  # Σ_c g_c·y_{m,c}
            weighted_f = torch.fft.rfft(weights.unsqueeze(3) * grad_out.unsqueeze(2), n=ctx.n_fft)  # P, (B,H,M,C,F)
            grad_signal_f = (weighted_f * kernel_conj.unsqueeze(3)).sum(2) if needs[0] else None
            grad_kernel_f = None
            if needs[1]:
                grad_kernel_f = (weighted_f * signal_conj.unsqueeze(2)).sum(3)  # (B, H, M, F)
                if ctx.kernel_batch == 1:
                    grad_kernel_f = grad_kernel_f.sum(0, keepdim=True)
        length = grad_out.shape[-1]
        grad_signal = torch.fft.irfft(grad_signal_f, n=ctx.n_fft)[..., :length] if needs[0] else None
        grad_kernels = torch.fft.irfft(grad_kernel_f, n=ctx.n_fft)[..., :length] if needs[1] else None
        return grad_signal, grad_kernels, grad_weights


def _mixture_forward_blocked(signal_f: torch.Tensor, kernel_f: torch.Tensor, weights: torch.Tensor, length: int,
                             n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of :class:`_MaskMixtureConv` block by block (CPU): per-mask convolutions y and the mixture."""
    batch, heads, channels, _ = signal_f.shape
    masks = kernel_f.shape[2]
    per_mask = weights.new_empty(batch, heads, masks, channels, length)
    out = weights.new_zeros(batch, heads, channels, length)
    for h, chans, mask_slice in _mixture_blocks(heads, channels, masks, batch * signal_f.shape[-1]):
        spectra = kernel_f[:, h, mask_slice, None] * signal_f[:, h, None, chans]  # (B, m, c, F)
        convolved = torch.fft.irfft(spectra, n=n_fft)[..., :length]  # y_m = k_m ∗ z
        per_mask[:, h, mask_slice, chans] = convolved
        out[:, h, chans] += torch.einsum("bmn,bmcn->bcn", weights[:, h, mask_slice], convolved)
    return per_mask, out


def _mixture_backward_blocked(grad_out: torch.Tensor, signal_conj: torch.Tensor, kernel_conj: torch.Tensor,
                              weights: torch.Tensor, per_mask: torch.Tensor, needs: tuple[bool, ...], n_fft: int,
                              kernel_batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                          torch.Tensor | None]:
    """The backward of :class:`_MaskMixtureConv` block by block (CPU): the spectra of ∂z and ∂k, and ∂w."""
    batch, heads, channels, _ = grad_out.shape
    need_signal, need_kernels, need_weights = needs
    grad_signal_f = torch.zeros_like(signal_conj) if need_signal else None
    grad_kernel_f = torch.zeros_like(kernel_conj) if need_kernels else None
    grad_weights = torch.zeros_like(weights) if need_weights else None
    for h, chans, masks in _mixture_blocks(heads, channels, weights.shape[2], batch * signal_conj.shape[-1]):
        grad_block = grad_out[:, h, None, chans]  # (B, 1, c, N)
        if need_weights:  # Σ_c g_c·y_{m,c}
            grad_weights[:, h, masks] += (grad_block * per_mask[:, h, masks, chans]).sum(2)
        if not (need_signal or need_kernels):
            continue
        weighted_f = torch.fft.rfft(weights[:, h, masks, None] * grad_block, n=n_fft)  # P_m, (B, m, c, F)
        if need_signal:  # Σ_m P_m·conj(K_m)
            grad_signal_f[:, h, chans] += (weighted_f * kernel_conj[:, h, masks, None]).sum(1)
        if need_kernels:  # Σ_c P_{m,c}·conj(Z_c)
            products = (weighted_f * signal_conj[:, h, None, chans]).sum(2)  # (B, m, F)
            grad_kernel_f[:, h, masks] += products.sum(0, keepdim=True) if kernel_batch == 1 else products
    return grad_signal_f, grad_kernel_f, grad_weights


def mask_mixture_conv(signal: torch.Tensor, kernels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[b, h, c, t] = Σ_m w[b, h, m, t]·Σ_{s≤t} k[b, h, m, t − s]·z[b, h, c, s] (spec §2.8, prefix_mixdens).

    signal (B, H, C, N), kernels (B or 1, H, M, N), weights (B, H, M, N); computed in float32 (float64 if the
    signal is float64) with autocast off, returned in the signal dtype.  See :class:`_MaskMixtureConv`."""
    dtype = torch.float64 if signal.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=signal.device.type, enabled=False):
        out = _MaskMixtureConv.apply(*(t.to(dtype).contiguous() for t in (signal, kernels, weights)))
    return out.to(signal.dtype)


def _reverse_lags(lagged: torch.Tensor) -> torch.Tensor:
    """Reverse the lag axis and append one column that is never read: the input layout of
    :func:`_reversed_lags_to_position`, which then needs no gather."""
    return F.pad(lagged.flip(-1), (0, 1))


def _reversed_lags_to_position(reversed_lags: torch.Tensor) -> torch.Tensor:
    """(…, N, N+1) indexed [t, e] holding lag d = N−1−e (column N never read) → lower-triangular (…, N, N)
    indexed [t, j]: out[t, j] = kernel_t(t − j) for j ≤ t, 0 for j > t.

    No gather (so no scatter in the backward pass): the flat index of [t, e = N−1−t+j] is t·(N+1) + N−1−t+j =
    (N−1) + t·N + j, so the [t, j] matrix is a contiguous slice of the flattened input; entries j > t read the
    pad column or the next row and are zeroed."""
    n = reversed_lags.shape[-2]
    flat = reversed_lags.flatten(-2)
    return flat[..., n - 1:n - 1 + n * n].unflatten(-1, (n, n)).tril()


class WaveDensityAttention(nn.Module):
    """Wave-Density Attention mixing (B, N, D) → (B, N, D), spec wda.md §2; defaults are the 130M values (§3).

    Options (keyword-only):
      num_masks M (16), num_waves_per_mask W (8), topk_masks k (8, 1 ≤ k ≤ M; k = M is dense routing),
      gate_hidden G (128, hidden width of the gating and mask-scaling MLPs), gate_temp T (1.0; with
      st_estimator=intended it only shapes the gradient), attn_alpha α (3.0, sigmoid density slope),
      content_rank r (8), content_mix c (0.15, 0 disables the content path), learned_content (True: learned
      Linear(D, H·r) feature maps; False: fixed seeded random maps of each head's slice of x),
      use_sin_waves (False: the reference triangle wave; True: sin), density (sigmoid | raw | sampling, §2.4 and
      §6), use_sampling (False; the reference's flag, True is the same as density=sampling), num_samples (64),
      noise_sigma (0.12), step_alpha (6.0) for density=sampling, mod_rank (8, rank of the mask scaling),
      window_sigma_frac (0.25, Gaussian window σ_w = frac·S_max; 0 disables it), gate_pooling
      (prefix | prefix_mixdens | full, see the module docstring: full is LEAKY), st_estimator
      (intended | reference_code, see the module docstring).

    Parameters (reference layout in brackets): the H per-head gating MLPs Linear(D,G)→ReLU→Linear(G,M)
    [gatings[h]] are stored stacked as ``gate_in`` = Linear(D, H·G) and ``gate_out`` = Linear(G, H·M) applied
    head-wise (same fan-ins, hence the same PyTorch-default init and the same count); likewise ``mod_in``/
    ``mod_out`` for mod_mlp[h]; ``mod_basis`` (H, mod_rank, M) ~ N(0, 0.05²); ``freqs`` (H, M, W, 2) ~ N(0, 1.5²),
    ``amps`` (H, M, W) ~ N(0.5, 0.02²), ``phases`` (H, M, W) ~ N(0, π²) (§2.1).  ``seq_len`` is S_max: it fixes
    the offset encoding and the window, and is the longest input accepted.  The reference's use_ffn/ffn_mult
    belong to the shell, and its use_checkpoint is the shell's attention checkpointing.
    """

    def __init__(self, dim: int, n_heads: int, seq_len: int, layer_idx: int = 0, n_layers: int = 1, *,
                 num_masks: int = 16, num_waves_per_mask: int = 8, topk_masks: int = 8, gate_hidden: int = 128,
                 gate_temp: float = 1.0, attn_alpha: float = 3.0, content_rank: int = 8,
                 content_mix: float = 0.15, learned_content: bool = True, use_sin_waves: bool = False,
                 density: str = "sigmoid", use_sampling: bool = False, num_samples: int = 64,
                 noise_sigma: float = 0.12, step_alpha: float = 6.0, mod_rank: int = 8,
                 window_sigma_frac: float = 0.25, gate_pooling: str = "prefix",
                 st_estimator: str = "intended") -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}: pick n_heads dividing the width")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        for name, value in (("num_masks", num_masks), ("num_waves_per_mask", num_waves_per_mask),
                            ("gate_hidden", gate_hidden), ("mod_rank", mod_rank), ("num_samples", num_samples)):
            if value < 1:
                raise ValueError(f"attention.{name}={value} must be >= 1")
        if not 1 <= topk_masks <= num_masks:
            raise ValueError(f"attention.topk_masks={topk_masks} must lie in [1, num_masks={num_masks}] "
                             f"(topk_masks = num_masks is dense routing)")
        if gate_temp <= 0:
            raise ValueError(f"attention.gate_temp={gate_temp} must be > 0")
        if not 0.0 <= content_mix <= 1.0:
            raise ValueError(f"attention.content_mix={content_mix} must lie in [0, 1] (0 disables the content path)")
        if content_mix > 0 and content_rank < 1:
            raise ValueError(f"attention.content_rank={content_rank} must be >= 1 when content_mix > 0")
        if window_sigma_frac < 0:
            raise ValueError(f"attention.window_sigma_frac={window_sigma_frac} must be >= 0 (0 = no window)")
        if noise_sigma < 0:
            raise ValueError(f"attention.noise_sigma={noise_sigma} must be >= 0")
        if density not in DENSITIES:
            raise ValueError(f"attention.density={density!r} is unknown: use one of {DENSITIES}")
        if use_sampling and density == "raw":
            raise ValueError("attention.use_sampling=true selects density=sampling and conflicts with density=raw: "
                             "set density=sampling (and leave use_sampling false)")
        if gate_pooling not in GATE_POOLINGS:
            raise ValueError(f"attention.gate_pooling={gate_pooling!r} is unknown: use one of {GATE_POOLINGS} "
                             f"(prefix is the causal default; full leaks future tokens)")
        if st_estimator not in ST_ESTIMATORS:
            raise ValueError(f"attention.st_estimator={st_estimator!r} is unknown: use one of {ST_ESTIMATORS}")

        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.seq_len = seq_len
        self.layer_idx = layer_idx
        self.num_masks = num_masks
        self.num_waves_per_mask = num_waves_per_mask
        self.topk_masks = topk_masks
        self.gate_hidden = gate_hidden
        self.gate_temp = gate_temp
        self.attn_alpha = attn_alpha
        self.content_rank = content_rank
        self.content_mix = content_mix
        self.learned_content = learned_content
        self.use_sin_waves = use_sin_waves
        self.density = "sampling" if use_sampling else density
        self.num_samples = num_samples
        self.noise_sigma = noise_sigma
        self.step_alpha = step_alpha
        self.mod_rank = mod_rank
        self.window_sigma_frac = window_sigma_frac
        self.gate_pooling = gate_pooling
        self.st_estimator = st_estimator

        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.q_mod = nn.Linear(dim, n_heads)
        self.k_mod = nn.Linear(dim, n_heads)
        self.gate_in = nn.Linear(dim, n_heads * gate_hidden)
        self.gate_out = nn.Linear(gate_hidden, n_heads * num_masks)
        self.mod_in = nn.Linear(dim, n_heads * gate_hidden)
        self.mod_out = nn.Linear(gate_hidden, n_heads * mod_rank)
        self.mod_basis = nn.Parameter(torch.randn(n_heads, mod_rank, num_masks) * 0.05)
        self.freqs = nn.Parameter(torch.randn(n_heads, num_masks, num_waves_per_mask, 2) * 1.5)
        self.amps = nn.Parameter(torch.randn(n_heads, num_masks, num_waves_per_mask) * 0.02 + 0.5)
        self.phases = nn.Parameter(torch.randn(n_heads, num_masks, num_waves_per_mask) * math.pi)
        if content_mix > 0 and learned_content:
            self.content_q_proj = nn.Linear(dim, n_heads * content_rank, bias=False)
            self.content_k_proj = nn.Linear(dim, n_heads * content_rank, bias=False)
        elif content_mix > 0:
            # fixed random content features, seeded exactly as the reference (§2.1)
            generator = torch.Generator(device="cpu")
            generator.manual_seed(1337 + dim * 31 + seq_len * 17 + n_heads * 13 + content_rank * 7)
            scale = 1.0 / math.sqrt(self.head_dim)
            self.register_buffer("content_wq", torch.randn(n_heads, self.head_dim, content_rank,
                                                           generator=generator) * scale, persistent=False)
            self.register_buffer("content_wk", torch.randn(n_heads, self.head_dim, content_rank,
                                                           generator=generator) * scale, persistent=False)

    # ----------------------------------------------------------------------------------------------- pieces
    def wave_parameters(self) -> list[nn.Parameter]:
        """The wave tensors (freqs, amps, phases): H·M·W·4 scalars per layer (spec §2.1, §3)."""
        return [self.freqs, self.amps, self.phases]

    def _render_dtype(self) -> torch.dtype:
        return torch.float64 if self.freqs.dtype == torch.float64 else torch.float32

    def _lags(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.arange(length, device=self.freqs.device, dtype=dtype)

    def window(self, length: int | None = None) -> torch.Tensor:
        """g(d) for d = 0 … length−1 (default S_max), in the render dtype (§2.4)."""
        lags = self._lags(self.seq_len if length is None else length, self._render_dtype())
        return distance_window(lags, self.seq_len, self.window_sigma_frac)

    def render_masks(self, length: int | None = None) -> torch.Tensor:
        """M_m(d) = Σ_w a·φ(2π⟨f, p(d)⟩ + θ) for every head and mask, d = 0 … length−1 (default S_max):
        (H, M, L).  Always from the live parameters, in float32 (float64 for a float64 module), autocast off
        (§2.2).

        The phase is taken in turns, τ = ⟨f, p(d)⟩ + θ/(2π) = ⟨(f, θ/(2π)), (p_1, p_2, 1)⟩ (less ¼ for the
        triangle wave, see :func:`_wave`); :class:`_WaveBank` sums the waves in cache-sized lag chunks."""
        dtype = self._render_dtype()
        with torch.autocast(device_type=self.freqs.device.type, enabled=False):
            lags = self._lags(self.seq_len if length is None else length, dtype)
            basis = torch.cat([offset_encoding(lags, self.seq_len), torch.ones_like(lags)[:, None]], dim=-1)
            offset = self.phases.to(dtype) / (2 * math.pi) - (0.0 if self.use_sin_waves else 0.25)
            coefficients = torch.cat([self.freqs.to(dtype), offset.unsqueeze(-1)], dim=-1)  # (H, M, W, 3)
            return _WaveBank.apply(coefficients, self.amps.to(dtype), basis, self.use_sin_waves)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Gating input: (B, N, D) prefix means (prefix modes) or (B, 1, D) whole-sequence mean (full, LEAKY)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.gate_pooling == "full":
                pooled = x.to(dtype).mean(dim=1, keepdim=True)
            else:
                counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=dtype)
                pooled = x.to(dtype).cumsum(dim=1) / counts[:, None]
        return pooled.to(x.dtype)

    def _headwise_mlp(self, pooled: torch.Tensor, first: nn.Linear, second: nn.Linear) -> torch.Tensor:
        """Linear(D, G) → ReLU → Linear(G, out) for every head at once: (B, T, D) → (B, T, H, out).

        Computed feature-major: the hidden activations W₁·pooledᵀ + b₁ form one (H·G, B·T) product, so the
        head-wise second layer is a single batched product over heads with no permuted copy of them.  The result
        is a (B, T, H, out) view of the (H, out, B, T) output, which is time-last as the mixture convolution
        reads it."""
        batch, rows, _ = pooled.shape
        hidden = torch.addmm(first.bias[:, None], first.weight, pooled.reshape(batch * rows, -1).T)
        hidden = torch.relu_(hidden).view(self.n_heads, self.gate_hidden, batch * rows)
        weight = second.weight.view(self.n_heads, -1, self.gate_hidden)  # (H, out, G)
        out = torch.baddbmm(second.bias.view(self.n_heads, -1, 1), weight, hidden)  # (H, out, B·T)
        return out.view(self.n_heads, -1, batch, rows).permute(2, 3, 0, 1)

    def mixture_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture-of-Masks weights w̃ (§2.3): (B, T, H, M) with T = N (prefix modes) or 1 (full), in float32
        (float64 for float64 input).  Straight-through top-k (or the reference's dense softmax), then the
        low-rank scaling w ⊙ (1 + 0.5·tanh(c·mod_basis)), clamped at 0 and renormalised."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        pooled = self._pool(x)
        logits = self._headwise_mlp(pooled, self.gate_in, self.gate_out)
        coeff = self._headwise_mlp(pooled, self.mod_in, self.mod_out)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = logits.to(dtype)
            if self.st_estimator == "intended":
                weights = straight_through_topk(logits, self.topk_masks, self.gate_temp)
            else:
                weights = torch.softmax(logits / self.gate_temp, dim=-1).detach()
            scale = 0.5 * torch.tanh(torch.einsum("bthr,hrm->bthm", coeff.to(dtype), self.mod_basis.to(dtype)))
            weights = (weights * (1.0 + scale)).clamp_min(0.0)
            return weights / (weights.sum(dim=-1, keepdim=True) + NORMALISER_EPS)

    def _threshold_noise(self, batch: int, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """ε ~ N(0, noise_sigma²), (B, H, n, L), redrawn at every call (train and eval, §2.4); None unless
        density=sampling.  Shared by all query positions and masks: it is indexed by lag, as in the reference."""
        if self.density != "sampling":
            return None
        return torch.randn(batch, self.n_heads, self.num_samples, length, device=self.freqs.device,
                           dtype=dtype) * self.noise_sigma

    def _density(self, kernel: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """ρ(K) for kernels (B or 1, H, R, L): σ(α·K), K (raw), or the stochastic threshold mean (§2.4, §6)."""
        if self.density == "sigmoid":
            return torch.sigmoid(self.attn_alpha * kernel)
        if self.density == "raw":
            return kernel
        kernel = kernel.expand(noise.shape[0], -1, -1, -1)
        if self.st_estimator == "intended":
            return _StochasticThreshold.apply(kernel, noise, self.step_alpha)
        with torch.no_grad():
            return _sum_over_sample_chunks(kernel, noise, self.step_alpha, derivative=False) / noise.shape[-2]

    def _kernel_density(self, weights: torch.Tensor, masks: torch.Tensor, window: torch.Tensor,
                        noise: torch.Tensor | None) -> torch.Tensor:
        """Per-position density kernels (B, H, T, L): g·ρ(Σ_m w̃_{t,m} M_m) (prefix, full) or
        Σ_m w̃_{t,m} g·ρ(M_m) (prefix_mixdens).  masks (H, M, L), window (L,) and noise (B, H, n, L) share one
        lag axis, in either order."""
        if self.gate_pooling == "prefix_mixdens":
            per_mask = self._density(masks.unsqueeze(0), noise) * window
            return torch.einsum("bthm,bhml->bhtl", weights, per_mask.expand(weights.shape[0], -1, -1, -1))
        return self._density(torch.einsum("bthm,hml->bhtl", weights, masks), noise) * window

    def density_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The density kernel each position applies, (B, H, N, N) indexed [t, d]: D_t(d) for d ≤ t, 0 for d > t
        (those lags fall before the sequence start).  In ``full`` mode all rows share one (leaky) kernel; in
        ``prefix_mixdens`` it is the mixture-of-densities kernel.  For plotting (samples once for density=sampling)."""
        length = x.shape[1]
        self._check_length(length)
        weights = self.mixture_weights(x)
        masks = self.render_masks(length).to(weights.dtype)
        noise = self._threshold_noise(x.shape[0], length, weights.dtype)
        window = distance_window(self._lags(length, weights.dtype), self.seq_len, self.window_sigma_frac)
        with torch.autocast(device_type=x.device.type, enabled=False):
            kernels = self._kernel_density(weights, masks, window, noise)
            return kernels.expand(-1, -1, length, -1).tril()

    def mask_densities(self) -> torch.Tensor:
        """Input-free per-mask densities g(d)·E[ρ(M_m(d))], (H, M, S_max), for plots and sparsity figures.
        For density=sampling the expectation of the threshold mean, P(M + ε > 0) = Φ(M/noise_sigma), is used."""
        masks = self.render_masks()
        if self.density == "sigmoid":
            dens = torch.sigmoid(self.attn_alpha * masks)
        elif self.density == "raw":
            dens = masks
        elif self.noise_sigma == 0:
            dens = (masks > 0).to(masks.dtype)
        else:
            dens = 0.5 * (1.0 + torch.erf(masks / (self.noise_sigma * math.sqrt(2.0))))
        return dens * self.window()

    def _content_context(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Causal rank-r linear attention over the same values (§2.6): (B, H, N, h_d) in the compute dtype."""
        batch, length, _ = x.shape
        if self.learned_content:
            q = self.content_q_proj(x).view(batch, length, self.n_heads, self.content_rank).transpose(1, 2)
            k = self.content_k_proj(x).view(batch, length, self.n_heads, self.content_rank).transpose(1, 2)
        else:
            x_heads = x.view(batch, length, self.n_heads, self.head_dim)
            q = torch.einsum("bnhd,hdr->bhnr", x_heads, self.content_wq.to(x.dtype))
            k = torch.einsum("bnhd,hdr->bhnr", x_heads, self.content_wk.to(x.dtype))
        with torch.autocast(device_type=x.device.type, enabled=False):
            # contiguous before φ_c: elementwise ops (and their backward) on transposed views run strided
            q, k = (F.elu(t.to(values.dtype).contiguous()) + 1.0 for t in (q, k))
            return causal_linear_attention(q, k, values)

    def _check_length(self, length: int) -> None:
        if length > self.seq_len:
            raise ValueError(f"input length {length} exceeds the WDA seq_len={self.seq_len} (S_max fixes the offset "
                             f"encoding and window): raise the model seq_len or feed shorter windows")

    def _convolve(self, stacked: torch.Tensor, weights: torch.Tensor, masks: torch.Tensor,
                  noise: torch.Tensor | None) -> torch.Tensor:
        """Y_t = Σ_{d≤t} D_t(d)·Z_{t−d} (§2.5, §2.8) for Z (B, N, H, C) → (B, N, H, C), by gate_pooling: the exact
        lower-triangular matrix per head (prefix), one FFT convolution per row (full) or the per-mask FFT
        convolutions mixed per position (prefix_mixdens).  The FFT paths run time-last, (B, H, C, N), and hand
        their result back as one contiguous (B, N, H, C) tensor, the layout of the blending that follows."""
        length = stacked.shape[1]
        window = distance_window(self._lags(length, stacked.dtype), self.seq_len, self.window_sigma_frac)
        if self.gate_pooling == "prefix":
            reversed_kernels = self._kernel_density(weights, _reverse_lags(masks), _reverse_lags(window),
                                                    None if noise is None else _reverse_lags(noise))
            return (_reversed_lags_to_position(reversed_kernels) @ stacked.transpose(1, 2)).transpose(1, 2)
        time_last = stacked.permute(0, 2, 3, 1)
        if self.gate_pooling == "full":
            kernel = self._kernel_density(weights, masks, window, noise)  # (B, H, 1, N)
            convolved = causal_fft_conv(time_last, kernel)
        else:
            per_mask = self._density(masks.unsqueeze(0), noise) * window  # (B|1, H, M, N)
            convolved = mask_mixture_conv(time_last, per_mask, weights.permute(0, 2, 3, 1))
        return convolved.permute(0, 3, 1, 2).contiguous()

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"WaveDensityAttention expects (B, N, {self.dim}), got {tuple(x.shape)}")
        batch, length, _ = x.shape
        self._check_length(length)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        values = self.v_proj(x)
        query_gate = torch.sigmoid(self.q_mod(x))
        key_gate = torch.sigmoid(self.k_mod(x))
        weights = self.mixture_weights(x)  # (B, T, H, M)
        masks = self.render_masks(length).to(compute)  # (H, M, N)
        noise = self._threshold_noise(batch, length, compute)
        with torch.autocast(device_type=x.device.type, enabled=False):
            v = values.to(compute).view(batch, length, self.n_heads, self.head_dim)  # (B, N, H, hd)
            km = key_gate.to(compute).unsqueeze(-1)  # (B, N, H, 1)
            stacked = torch.cat([km, km * v], dim=-1)  # Z_t = [km_t, km_t·v_t], (B, N, H, 1 + hd)
            convolved = self._convolve(stacked, weights, masks, noise)
            context = convolved[..., 1:] / (convolved[..., :1] + NORMALISER_EPS)
            if self.content_mix > 0:
                content = self._content_context(x, v.transpose(1, 2)).transpose(1, 2)
                context = (1.0 - self.content_mix) * context + self.content_mix * content
            qm = query_gate.to(compute).unsqueeze(-1)  # (B, N, H, 1)
            mixed = (qm * context + (1.0 - qm) * v).reshape(batch, length, self.dim).to(values.dtype)
        return self.out_proj(mixed)


def wda_reference(module: WaveDensityAttention, x: torch.Tensor) -> torch.Tensor:
    """Naive evaluation of :class:`WaveDensityAttention` for every gate_pooling mode: Python loops over heads
    and query positions, masks summed wave by wave, gating from each head's own weight slices, an explicit
    kernel D_t(d) per position and the direct causal sum Σ_{d≤t} D_t(d)·Z_{t−d}; the content path as a masked
    O(N²) product.  Draws the threshold noise exactly like the forward pass, so with the same RNG state the
    two agree for density=sampling too."""
    batch, length, _ = x.shape
    heads, head_dim, masks_n, hidden = module.n_heads, module.head_dim, module.num_masks, module.gate_hidden
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    noise = module._threshold_noise(batch, length, compute)
    v = module.v_proj(x).to(compute).view(batch, length, heads, head_dim)
    qm = torch.sigmoid(module.q_mod(x)).to(compute)
    km = torch.sigmoid(module.k_mod(x)).to(compute)
    lags = torch.arange(length, dtype=compute, device=x.device)
    p_linear = lags / module.seq_len
    p_root = torch.sign(lags) * torch.sqrt(lags.abs() + 1e-6) / math.sqrt(module.seq_len)
    if module.window_sigma_frac == 0:
        window = torch.ones_like(lags)
    else:
        window = torch.exp(-lags**2 / (2 * (module.window_sigma_frac * module.seq_len) ** 2))
    wave = torch.sin if module.use_sin_waves else triangle_wave
    xc = x.to(compute)

    def threshold(kernel: torch.Tensor, head: int) -> torch.Tensor:  # kernel (B, L)
        z = kernel.unsqueeze(1) + noise[:, head, :, :kernel.shape[-1]]  # (B, n, L)
        soft = torch.sigmoid(module.step_alpha * z)
        if module.st_estimator == "reference_code":
            return soft.detach().mean(1)
        return ((z > 0).to(z.dtype) + soft - soft.detach()).mean(1)

    def rho(kernel: torch.Tensor, head: int) -> torch.Tensor:
        if module.density == "sigmoid":
            return torch.sigmoid(module.attn_alpha * kernel)
        if module.density == "raw":
            return kernel
        return threshold(kernel, head)

    content = None
    if module.content_mix > 0:
        if module.learned_content:
            q = module.content_q_proj(x).to(compute).view(batch, length, heads, module.content_rank)
            k = module.content_k_proj(x).to(compute).view(batch, length, heads, module.content_rank)
        else:
            xh = xc.view(batch, length, heads, head_dim)
            q = torch.einsum("bnhd,hdr->bnhr", xh, module.content_wq.to(compute))
            k = torch.einsum("bnhd,hdr->bnhr", xh, module.content_wk.to(compute))
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        scores = torch.einsum("bthr,bjhr->bhtj", q, k) * torch.ones(length, length, device=x.device).tril()
        content = (scores @ v.transpose(1, 2).to(compute)) / (scores.sum(-1, keepdim=True) + CONTENT_EPS)

    head_outputs = []
    for h in range(heads):
        masks = torch.zeros(masks_n, length, dtype=compute, device=x.device)
        for w in range(module.num_waves_per_mask):
            freq = module.freqs[h, :, w].to(compute)
            phase = 2 * math.pi * (freq[:, :1] * p_linear + freq[:, 1:] * p_root)
            phase = phase + module.phases[h, :, w, None].to(compute)
            masks = masks + module.amps[h, :, w, None].to(compute) * wave(phase)
        rows = slice(h * hidden, (h + 1) * hidden)
        gate_rows = slice(h * masks_n, (h + 1) * masks_n)
        mod_rows = slice(h * module.mod_rank, (h + 1) * module.mod_rank)
        outputs = []
        for t in range(length):
            pooled = xc.mean(1) if module.gate_pooling == "full" else xc[:, :t + 1].mean(1)
            gate_hidden = torch.relu(pooled @ module.gate_in.weight[rows].T.to(compute) + module.gate_in.bias[rows])
            logits = gate_hidden @ module.gate_out.weight[gate_rows].T.to(compute) + module.gate_out.bias[gate_rows]
            soft = torch.softmax(logits / module.gate_temp, dim=-1)
            if module.st_estimator == "intended":
                top = torch.topk(logits, module.topk_masks, dim=-1).indices
                chosen = torch.zeros_like(soft).scatter(-1, top, 1.0) / module.topk_masks
                gate = chosen + soft - soft.detach()
            else:
                gate = soft.detach()
            mod_hidden = torch.relu(pooled @ module.mod_in.weight[rows].T.to(compute) + module.mod_in.bias[rows])
            coeff = mod_hidden @ module.mod_out.weight[mod_rows].T.to(compute) + module.mod_out.bias[mod_rows]
            scaled = gate * (1 + 0.5 * torch.tanh(coeff @ module.mod_basis[h].to(compute)))
            scaled = scaled.clamp_min(0.0)
            scaled = scaled / (scaled.sum(-1, keepdim=True) + NORMALISER_EPS)
            visible = masks[:, :t + 1]  # lags 0 … t
            if module.gate_pooling == "prefix_mixdens":
                per_mask = torch.stack([rho(mask.expand(batch, -1), h) for mask in visible], dim=1)  # (B, M, t+1)
                kernel = window[:t + 1] * torch.einsum("bm,bml->bl", scaled, per_mask)
            else:
                kernel = window[:t + 1] * rho(scaled @ visible, h)  # (B, t + 1)
            past = torch.cat([km[:, :t + 1, h, None], km[:, :t + 1, h, None] * v[:, :t + 1, h]], dim=-1)
            summed = (kernel.unsqueeze(-1) * past.flip(1)).sum(1)  # Σ_d D_t(d)·Z_{t−d}
            context = summed[:, 1:] / (summed[:, :1] + NORMALISER_EPS)
            if content is not None:
                context = (1 - module.content_mix) * context + module.content_mix * content[:, h, t]
            outputs.append(qm[:, t, h, None] * context + (1 - qm[:, t, h, None]) * v[:, t, h])
        head_outputs.append(torch.stack(outputs, dim=1))
    mixed = torch.cat(head_outputs, dim=-1).to(x.dtype)
    return module.out_proj(mixed)
