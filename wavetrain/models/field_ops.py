"""Shared primitives of the field/FFT family (Wave Field, WDA, DWARF condA–F).

The causal linear convolution is written once here and reused by every mechanism that convolves along the
sequence or field axis (spec wavefield.md §2.2 step 5 and §7.1.4; wda.md §2.5; dwarf.md §3.A).  Beside the FFT
path sits the naive O(L²) reference that the tests compare it with.

The bilinear field layout (token i deposited at field coordinate i·s, read back with the same weights) and its exact
causality guard are shared by the Wave Field attention and DWARF condA–F (spec wavefield.md §2.2 and §7).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

# ---------------------------------------------------------------------------------------------------------------
# Execution: cache-sized blocks on a CPU, one launch per op on a GPU
# ---------------------------------------------------------------------------------------------------------------

_BATCHED_ON_CPU = False


def cache_blocked(device: torch.device) -> bool:
    """Whether the FFT-family ops on ``device`` visit their (batch, head, channel, mask) set in cache-sized blocks.

    True on a CPU, where the block sizes are tuned (README benchmark): whole-set transforms at long lengths spill
    every cache level and fault in fresh pages.  False on CUDA and every other device, where one launch per op over
    the whole set is what pays (per-block loops leave the GPU launch-bound, issue 15), and on a CPU inside
    :func:`batched_execution`, so the tests can check the GPU path against the references on a CPU."""
    return device.type == "cpu" and not _BATCHED_ON_CPU


@contextlib.contextmanager
def batched_execution() -> Iterator[None]:
    """Run the one-launch-per-op (GPU) execution path of the FFT-family ops on a CPU too, within this block."""
    global _BATCHED_ON_CPU
    previous, _BATCHED_ON_CPU = _BATCHED_ON_CPU, True
    try:
        yield
    finally:
        _BATCHED_ON_CPU = previous



def next_fast_len(n: int) -> int:
    """Smallest integer >= n whose prime factors are all <= 7 (a size pocketfft handles fastest)."""
    if n < 1:
        raise ValueError(f"next_fast_len needs n >= 1, got {n}")
    candidate = n
    while True:
        rest = candidate
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return candidate
        candidate += 1


def fft_conv_length(length: int) -> int:
    """Transform length of :func:`causal_fft_conv` over ``length`` samples: the smallest even n >= 2·length with
    prime factors <= 7.  Even because a real FFT of even length runs as a half-length complex FFT: the odd 7-smooth
    sizes next_fast_len can return (1029 for 513 samples, 32805 for 16385) measured 2-2.5× slower on this CPU."""
    n = next_fast_len(2 * length)
    while n % 2:
        n = next_fast_len(n + 1)
    return n


def autocast_off_backward(backward):
    """Run an autograd.Function's ``backward`` with autocast off, as its forward runs.

    Eager backward passes run outside the caller's autocast region, but torch.compile traces the backward graph
    together with the forward, inside it: without this, a matmul of the backward would be cast to bf16 (and
    baddbmm_ into an fp32 accumulator then fails on the mixed dtypes)."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        device = next(g.device.type for g in grads if g is not None)
        with torch.autocast(device_type=device, enabled=False):
            return backward(ctx, *grads)
    return wrapper


def _fft_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # torch.fft rejects bf16/fp16 on CPU and loses too much precision on GPU: compute in fp32, or fp64 for tests.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def causal_fft_conv(signal: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Linear causal convolution along the last axis: out[..., t] = Σ_{s<=t} kernel[..., t-s] · signal[..., s].

    ``kernel`` (..., L) broadcasts against ``signal`` (..., L); its spectrum is computed once for its own shape,
    so a per-head kernel (H, 1, L) is transformed once per call, not once per batch element.  Both operands are
    zero-padded to ``fft_conv_length(L)`` (≥ 2L) so nothing wraps around (no circular leak from the end to the start).
    Computed in float32 (float64 if an input is float64) even under bf16 autocast; returns ``signal.dtype``.

    The backward pass is written out (:class:`_CausalFFTConv`): both gradients are causal cross-correlations,
    irfft(rfft(grad)·conj(spectrum))[:L], reduced over broadcast axes in the frequency domain before the inverse
    transform — half-length real transforms instead of the full-length complex FFT that autograd's rfft backward runs.
    """
    length = signal.shape[-1]
    if kernel.shape[-1] != length:
        raise ValueError(f"kernel length {kernel.shape[-1]} must equal signal length {length}")
    dtype = _fft_dtype(signal, kernel)
    with torch.autocast(device_type=signal.device.type, enabled=False):
        out = _CausalFFTConv.apply(signal.to(dtype), kernel.to(dtype), fft_conv_length(length))
    return out.to(signal.dtype)


class _CausalFFTConv(torch.autograd.Function):
    """out = irfft(rfft(signal, n)·rfft(kernel, n), n)[..., :L] with n ≥ 2L, and its hand-written backward.

    For out[t] = Σ_s k[t−s]·x[s] (t < L): ∂/∂x[s] = Σ_t g[t]·k[t−s] and ∂/∂k[u] = Σ_t g[t]·x[t−u], the circular
    cross-correlations irfft(G·conj(K))[s] and irfft(G·conj(X))[u]; with n ≥ 2L the negative lags land in the zero
    padding, so they are exact for s, u < L.
    """

    @staticmethod
    def forward(ctx, signal: torch.Tensor, kernel: torch.Tensor, n_fft: int) -> torch.Tensor:
        length = signal.shape[-1]
        signal_f = torch.fft.rfft(signal, n=n_fft)
        kernel_f = torch.fft.rfft(kernel, n=n_fft)
        ctx.save_for_backward(signal_f, kernel_f)
        ctx.n_fft, ctx.length = n_fft, length
        ctx.signal_shape, ctx.kernel_shape = signal.shape, kernel.shape
        return torch.fft.irfft(signal_f * kernel_f, n=n_fft)[..., :length]

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off_backward
    def backward(ctx, grad_out: torch.Tensor):
        signal_f, kernel_f = ctx.saved_tensors
        n_fft, length = ctx.n_fft, ctx.length
        grad_f = torch.fft.rfft(grad_out, n=n_fft)
        grad_signal = grad_kernel = None
        if ctx.needs_input_grad[0]:
            spectrum = (grad_f * kernel_f.conj()).sum_to_size(signal_f.shape)
            grad_signal = torch.fft.irfft(spectrum, n=n_fft)[..., :length].reshape(ctx.signal_shape)
        if ctx.needs_input_grad[1]:
            spectrum = (grad_f * signal_f.conj()).sum_to_size(kernel_f.shape)
            grad_kernel = torch.fft.irfft(spectrum, n=n_fft)[..., :length].reshape(ctx.kernel_shape)
        return grad_signal, grad_kernel, None


def causal_conv_reference(signal: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Naive O(L²) form of :func:`causal_fft_conv` (a lower-triangular Toeplitz matrix product)."""
    length = signal.shape[-1]
    lags = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # t - s
    toeplitz = kernel[..., lags.clamp(min=0)] * (lags >= 0)  # (..., L_t, L_s)
    return (toeplitz * signal.unsqueeze(-2)).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# Bilinear field layout (spec wavefield.md §2.1 buffer, §2.2 steps 2, 3 and 8, §7; dwarf.md §3.A steps 3, 4 and 7)
# ---------------------------------------------------------------------------------------------------------------

# Positions are computed in fp32 (spec §2.2 step 2); beyond 2**24 fp32 no longer resolves whole field cells.
_MAX_FP32_FIELD = 2**24


def field_stride(field_size: int, max_seq_len: int) -> float:
    """Field cells per token, s = (G − 1) / max(M − 1, 1) (spec wavefield.md §2.1, buffer ``field_stride``)."""
    return (field_size - 1) / max(max_seq_len - 1, 1)


def _bilinear_cells(index: torch.Tensor, stride: float, field_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # p = clamp(i·s, 0, G−2) in fp32; a = ⌊p⌋ is then already in [0, G−2] and f = p − a in [0, 1), which are the
    # clamps the spec lists for a and f.  torch.full rounds s to fp32 like torch.tensor does, but fills on the device:
    # torch.tensor(s, device=cuda) copies from the host and synchronises the stream at every call.
    stride_f32 = torch.full((), stride, dtype=torch.float32, device=index.device)
    position = (index.to(torch.float32) * stride_f32).clamp(0.0, float(field_size - 2))
    lower = position.floor()
    return lower.long(), position - lower


def bilinear_positions(n_tokens: int, stride: float, field_size: int,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower cell a_i (long) and fraction f_i (fp32) of tokens i = 0..n_tokens−1 (spec wavefield.md §2.2 step 2).

    p_i = clamp(i·s, 0, G−2) computed in fp32 exactly as the reference does (fp32 index times fp32 stride), so the
    layout that :func:`check_field_causality` verifies is bit-for-bit the one the modules use.
    """
    index = torch.arange(n_tokens, dtype=torch.float32, device=device)
    return _bilinear_cells(index, stride, field_size)


def layout_buffers(n_positions: int, stride: float, field_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout of positions 0..n_positions−1 as two buffers a module registers (``persistent=False``): the lower
    cells (long) and the fractions as the int32 bit pattern of their fp32 values.

    Computed once, on the CPU, by :func:`bilinear_positions`, which is bit-for-bit the layout
    :func:`check_field_causality` verified.  Recomputing it at every call would cost a launch and, under
    torch.compile, let the code generator contract i·s − ⌊i·s⌋ into one fused multiply-add: a fraction that rounds
    to exactly 0 in the verified layout could come out as 1e−7 and read the next token's cell.  Integer buffers are
    left alone by ``module.double()``/``.half()``/``.to(dtype)``, which would otherwise round the fractions."""
    lower, frac = bilinear_positions(n_positions, stride, field_size)
    return lower, frac.view(torch.int32)


def read_layout(lower: torch.Tensor, frac_bits: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower cells and fp32 fractions of the first ``n_tokens`` positions from :func:`layout_buffers`' buffers."""
    return lower[:n_tokens], frac_bits[:n_tokens].view(torch.float32)


def bilinear_scatter(values: torch.Tensor, lower: torch.Tensor, frac: torch.Tensor,
                     field_size: int) -> torch.Tensor:
    """Deposit values (B, H, N, C) into a zero field (B, H, G, C) (spec wavefield.md §2.2 step 3).

    Φ[a_i] += (1 − f_i)·u_i and Φ[a_i + 1] += f_i·u_i; colliding tokens accumulate.  The field is fp32 (fp64 for
    fp64 input) whatever the input dtype, so a bf16/fp16 deposit never accumulates in half precision.
    """
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    values = values.to(dtype)
    weight_upper = frac.to(dtype)[:, None]
    batch, heads, _, channels = values.shape
    field = values.new_zeros(batch, heads, field_size, channels)
    field = field.index_add(2, lower, values * (1.0 - weight_upper))
    return field.index_add(2, lower + 1, values * weight_upper)


def bilinear_gather(field: torch.Tensor, lower: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Bilinear read (B, H, G, C) -> (B, H, N, C): r_i = (1 − f_i)·Ψ[a_i] + f_i·Ψ[a_i + 1] (spec §2.2 step 8)."""
    weight_upper = frac.to(field.dtype)[:, None]
    return field.index_select(2, lower) * (1.0 - weight_upper) + field.index_select(2, lower + 1) * weight_upper


def _validate_positions(max_seq_len: int, n_positions: int) -> None:
    if not 1 <= n_positions <= max_seq_len:
        raise ValueError(f"{n_positions} token positions do not fit max_seq_len={max_seq_len}: positions beyond "
                         f"max_seq_len − 1 all collapse onto cell G − 2 and read each other's deposits "
                         f"(spec wavefield.md §7.1.5); raise max_seq_len")


def _validate_field_size(field_size: int, setting: str) -> None:
    if field_size < 2:
        raise ValueError(f"{setting}={field_size}: a bilinear field needs at least 2 cells")
    if field_size > _MAX_FP32_FIELD:
        raise ValueError(f"{setting}={field_size} exceeds 2**24: fp32 field positions can no longer resolve cells")


def _read_write_overlaps(lower: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    # The convolution is causal along the field, so token i sees token j > i iff the highest cell i reads with
    # non-zero weight (a_i + 1 if f_i > 0, else a_i) is not strictly below the lowest cell j writes (a_j).  Cells
    # are non-decreasing in i, so comparing neighbours covers every pair (spec wavefield.md §7, exact condition).
    highest_read = lower + (frac > 0).long()
    return highest_read[:-1] >= lower[1:]


def _first_leak(field_size: int, max_seq_len: int, n_positions: int) -> int | None:
    lower, frac = bilinear_positions(n_positions, field_stride(field_size, max_seq_len), field_size)
    leaking = _read_write_overlaps(lower, frac).nonzero()
    return int(leaking[0, 0]) if len(leaking) else None


def _tail_leaks(field_size: int, max_seq_len: int, n_positions: int) -> bool:
    # The last pair is where the G − 2 clamp folds a token onto its neighbour; testing it first makes each candidate
    # the auto search rejects there cost O(1) instead of O(n_positions).
    tail = torch.tensor([n_positions - 2, n_positions - 1], dtype=torch.float32)
    lower, frac = _bilinear_cells(tail, field_stride(field_size, max_seq_len), field_size)
    return bool(_read_write_overlaps(lower, frac).any())


@functools.lru_cache(maxsize=256)
def auto_field_size(max_seq_len: int, *, n_positions: int | None = None) -> int:
    """Smallest field size G whose bilinear layout is causal for M = ``max_seq_len`` (spec wavefield.md §7).

    Token positions 0..n_positions−1 are checked (default: all M positions, the reference's N ≤ M guard; a module
    that only ever sees M − 1 tokens, like the Wave Field attention built with M = seq_len + 1, passes
    ``n_positions=M−1`` and gets G = M, stride 1).  Exact: every candidate is verified on the fp32 layout the
    modules compute.  The search starts at G = M because any stride s < 1 leaks (tokens 0 and 1 then share cell 0)
    and stops at G = 2M − 1 at the latest, where s = 2 keeps every token's cells apart.
    """
    n_positions = max_seq_len if n_positions is None else n_positions
    _validate_positions(max_seq_len, n_positions)
    if n_positions == 1:
        return 2
    candidate = max(max_seq_len, 2)
    while _tail_leaks(candidate, max_seq_len, n_positions) \
            or _first_leak(candidate, max_seq_len, n_positions) is not None:
        candidate += 1
    return candidate


def check_field_causality(field_size: int, max_seq_len: int, setting: str = "field_size", *,
                          n_positions: int | None = None) -> None:
    """Raise ValueError unless the bilinear layout (G = field_size, M = max_seq_len) is causal (spec §7).

    Causal iff, for every pair of token positions i < j among 0..n_positions−1 (default: all M positions), the
    highest cell i reads is below the lowest cell j writes.  Leaks occur for s < 1, for most non-integer s in
    (1, 2), and at the last position when the G − 2 clamp folds it onto its neighbour (s = 1 with n_positions = M).
    The message names ``setting``, the stride and the smallest causal value (:func:`auto_field_size`).
    """
    n_positions = max_seq_len if n_positions is None else n_positions
    _validate_field_size(field_size, setting)
    _validate_positions(max_seq_len, n_positions)
    leak = _first_leak(field_size, max_seq_len, n_positions)
    if leak is None:
        return
    stride = field_stride(field_size, max_seq_len)
    lower, frac = bilinear_positions(n_positions, stride, field_size)
    read_cell = int(lower[leak]) + int(frac[leak] > 0)
    smallest = auto_field_size(max_seq_len, n_positions=n_positions)
    raise ValueError(
        f"{setting}={field_size} breaks causality with max_seq_len={max_seq_len} ({n_positions} token positions): "
        f"stride s=(G-1)/(M-1)={stride:.6g} cells/token makes token {leak} read field cell {read_cell}, where token "
        f"{leak + 1} deposits (spec wavefield.md §7). Use {setting}={smallest}, the smallest causal value for this "
        f"max_seq_len, or a larger one with an integer stride or stride >= 2.")


# ---------------------------------------------------------------------------------------------------------------
# Channel-major bilinear layout and the fused scatter → causal convolution → gather (dwarf.md §3.A steps 4, 5, 7)
# ---------------------------------------------------------------------------------------------------------------

# Real samples per block of rows transformed together on a CPU (8 MiB in fp32).  Whole-field transforms at long
# lengths allocate 64 MiB buffers that glibc maps fresh from the kernel on every call (the page faults cost about as
# much as the FFT itself); blocks this size are reused from the heap and stay in cache from scatter to gather.  Where
# :func:`cache_blocked` is false (GPUs) everything is transformed in one block.
_BLOCK_SAMPLES = 1 << 21


def bilinear_scatter_rows(rows: torch.Tensor, lower: torch.Tensor, frac: torch.Tensor, length: int) -> torch.Tensor:
    """Deposit token rows (..., N) into a zero field (..., length) along the last axis (spec wavefield.md §2.2
    step 3, channel-major): Φ[a_i] += (1 − f_i)·r_i and Φ[a_i + 1] += f_i·r_i, in the dtype of ``rows``.  The
    adjoint of :func:`bilinear_gather_rows`; ``length`` may exceed G (zero padding for a transform)."""
    frac = frac.to(rows.dtype)
    field = rows.new_zeros(*rows.shape[:-1], length)
    field.scatter_add_(-1, lower.expand_as(rows), rows * (1.0 - frac))
    return field.scatter_add_(-1, (lower + 1).expand_as(rows), rows * frac)


def bilinear_gather_rows(field: torch.Tensor, lower: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Bilinear read along the last axis, field (..., ≥ G) -> (..., N): r_i = (1 − f_i)·Ψ[a_i] + f_i·Ψ[a_i + 1]
    (spec wavefield.md §2.2 step 8, channel-major)."""
    frac = frac.to(field.dtype)
    shape = (*field.shape[:-1], lower.shape[-1])
    return (torch.gather(field, -1, lower.expand(shape)) * (1.0 - frac)
            + torch.gather(field, -1, (lower + 1).expand(shape)) * frac)


def bilinear_conv_gather(values: torch.Tensor, lower: torch.Tensor, frac: torch.Tensor, kernel: torch.Tensor,
                         field_size: int) -> torch.Tensor:
    """Scatter token rows onto the field, convolve each head causally with its kernel and read the field back.

    values (B, H, C, N) (channel-major: tokens on the last axis), kernel (H, G) -> (B, H, C, N); equal to
    ``bilinear_gather_rows(causal_fft_conv(bilinear_scatter_rows(values, lower, frac, G), kernel[:, None]), lower,
    frac)`` (spec dwarf.md §3.A steps 4, 5 and 7; wavefield.md §2.2) without materialising the field: rows are
    scattered straight into zero-padded transform buffers a block of (batch, head) pairs at a time, and the kernel
    spectrum is computed once per call.  Computed in float32 (float64 if an input is float64) even under bf16
    autocast; returns ``values.dtype``.
    """
    if kernel.shape != (values.shape[1], field_size):
        raise ValueError(f"kernel shape {tuple(kernel.shape)} must be (heads, field_size) = "
                         f"{(values.shape[1], field_size)}")
    dtype = _fft_dtype(values, kernel)
    with torch.autocast(device_type=values.device.type, enabled=False):
        out = _BilinearConvGather.apply(values.to(dtype), kernel.to(dtype), lower, frac.to(dtype),
                                        fft_conv_length(field_size))
    return out.to(values.dtype)


class _BilinearConvGather(torch.autograd.Function):
    """y = Sᵀ·irfft(rfft(S·v, n)·rfft(k, n), n) per (batch, head, channel) row, S the bilinear scatter.

    Backward: the gather's adjoint is the scatter, so ∂v = Sᵀ·irfft(rfft(S·g)·conj(K)) and
    ∂k = irfft(Σ_{b,c} rfft(S·g)·conj(rfft(S·v)))[:G] (the cross-correlations of :class:`_CausalFFTConv`).
    Work runs in blocks of (batch, head) pairs of at most ``_BLOCK_SAMPLES`` padded samples; the signal spectra of
    the forward blocks are kept for ∂k.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, kernel: torch.Tensor, lower: torch.Tensor, frac: torch.Tensor,
                n_fft: int) -> torch.Tensor:
        batch, heads, channels, n = values.shape
        pairs = values.reshape(batch * heads, channels, n)
        kernel_f = torch.fft.rfft(kernel, n=n_fft)                                     # (H, F), once per call
        head_of_pair = torch.arange(batch * heads, device=values.device) % heads
        out = torch.empty_like(pairs)
        spectra = []
        for block in _pair_blocks(batch * heads, channels, n_fft, values.device):
            signal_f = torch.fft.rfft(bilinear_scatter_rows(pairs[block], lower, frac, n_fft))
            field = torch.fft.irfft(signal_f * kernel_f[head_of_pair[block], None], n=n_fft)
            out[block] = bilinear_gather_rows(field, lower, frac)
            if ctx.needs_input_grad[1]:
                spectra.append(signal_f)
        ctx.save_for_backward(kernel_f, head_of_pair, lower, frac, *spectra)
        ctx.n_fft, ctx.field_size = n_fft, kernel.shape[-1]
        return out.view(values.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off_backward
    def backward(ctx, grad_out: torch.Tensor):
        kernel_f, head_of_pair, lower, frac, *spectra = ctx.saved_tensors
        heads, bins = kernel_f.shape
        batch_heads, channels, n = head_of_pair.shape[0], grad_out.shape[-2], grad_out.shape[-1]
        n_fft = ctx.n_fft
        grads = grad_out.reshape(batch_heads, channels, n)
        grad_values = torch.empty_like(grads) if ctx.needs_input_grad[0] else None
        kernel_grad_f = kernel_f.new_zeros(heads, bins) if ctx.needs_input_grad[1] else None
        for index, block in enumerate(_pair_blocks(batch_heads, channels, n_fft, grad_out.device)):
            grad_f = torch.fft.rfft(bilinear_scatter_rows(grads[block], lower, frac, n_fft))
            if kernel_grad_f is not None:                                          # Σ_{b,c} conj(X)·G per head
                kernel_grad_f.index_add_(0, head_of_pair[block], torch.linalg.vecdot(spectra[index], grad_f, dim=1))
            if grad_values is not None:
                field = torch.fft.irfft(grad_f.mul_(kernel_f[head_of_pair[block], None].conj()), n=n_fft)
                grad_values[block] = bilinear_gather_rows(field, lower, frac)
        grad_kernel = None
        if kernel_grad_f is not None:
            grad_kernel = torch.fft.irfft(kernel_grad_f, n=n_fft)[:, :ctx.field_size]
        if grad_values is not None:
            grad_values = grad_values.view(grad_out.shape)
        return grad_values, grad_kernel, None, None, None


def _pair_blocks(pairs: int, channels: int, n_fft: int, device: torch.device) -> list[slice]:
    # Consecutive (batch, head) pairs, on a CPU as many per block as fit _BLOCK_SAMPLES padded samples (at least one).
    step = max(1, _BLOCK_SAMPLES // (channels * n_fft)) if cache_blocked(device) else pairs
    return [slice(start, min(start + step, pairs)) for start in range(0, pairs, step)]
