"""DWARF attention family: every condition of spec dwarf.md §3 (condA … condP) as switches of three modules.

- :class:`DwarfFieldAttention` — the wave-field conditions A–F (spec §3.A–F): deposit v·‖k‖, bilinear scatter onto
  G field cells, a per-head causal kernel (damped cosine, + learned dispersion β, causal Morlet basis, DB4 basis
  + one KdV step + RG gain rescale), linear causal FFT convolution, softmax head coupling, bilinear gather,
  sigmoid gate, out_proj.
- :class:`DwarfDyadicAttention` — the dyadic conditions G–P (spec §3.G–P): reads at the 44 D4 tap slots τ·2^j (or
  the 24 unique dyadic offsets, or dense+dyadic offset sets), weighted by a D4 field with scale gains (G, H, I),
  by a Q·K gather (J linear, K with φ = elu+1 and a normaliser) or by a softmax over the slots (L, L+RP, N, P).
- :class:`DwarfFullAttention` — block 5 of the hybrid condM (spec §3.M): gated causal softmax attention.

A condition is a set of option values: :data:`CONDITIONS` maps every condition name to its class and options, and
:data:`CONDITION_SHELLS` records the model-shell settings that go with it (spec §1, §1.A, §3.P0).
Every fast path has a naive reference beside it (``*_reference``), compared in float64 by tests/test_dwarf.py.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wavetrain.models.field_ops import (bilinear_conv_gather, bilinear_gather_rows, bilinear_positions,
                                        bilinear_scatter_rows, causal_fft_conv, check_field_causality, field_stride)

# Daubechies-4 low-pass coefficients h_0 … h_3 (spec §3 notation).
D4_COEFFICIENTS = (0.4829629131445341, 0.8365163037378079, 0.2241438680420134, -0.1294095225512604)
DYADIC_SCALES = 11      # j = 0..10 (spec §3 notation, S = 11)
D4_TAPS = 4             # τ = 0..3
FIELD_SCALES = 12       # Morlet / DB4 basis scales of condC/D (spec §3.C: S = log2(4096) = 12)
FIELD_CELLS_PER_TOKEN = 2   # auto field: G = 2·seq_len, the published 4096 cells at seq_len 2048 (spec §3.A)
NORMALISER_EPS = 1e-6   # out = num / (Z + 1e-6) (spec §3.K)
SHIFT_CHUNK_ELEMENTS = 1 << 18  # row elements per token chunk of the band products (1 MiB in fp32)
GATHER_CHUNK_ELEMENTS = 1 << 19  # gathered elements per token chunk of the sparse-offset reads (2 MiB in fp32)
SPARSE_READS = "auto"   # sparse-offset reads: gather (one indexed gather of all offsets per chunk: one kernel on a GPU)
                        # | slices (one in-cache slice product per offset: faster on a CPU) | auto (CPU: slices)
MIN_BAND_WIDTH = 16     # a dense offset prefix this wide is read as one band; narrower ones are faster one by one
PLAN_CACHE_SIZE = 8     # tap plans (index tensors) kept per dyadic module, one per recent sequence length


# ---------------------------------------------------------------------------------------------------------------
# Offset sets (spec §3 notation, §3.L+RP, §3.N, §3.P)

def dyadic_slots() -> list[tuple[int, int, int]]:
    """The 44 D4 tap slots (j, τ, offset τ·2^j) in tap order t = 4j + τ (j outer, τ inner; spec §3 notation)."""
    return [(scale, tap, tap << scale) for scale in range(DYADIC_SCALES) for tap in range(D4_TAPS)]


def dyadic_unique_offsets() -> list[int]:
    """U24: the 24 distinct offsets τ·2^j, ascending, max 3072 (spec §3 notation)."""
    return sorted({offset for _, _, offset in dyadic_slots()})


def dense_dyadic_offsets(dense_max: int, dyadic_max: int) -> list[int]:
    """{0 … dense_max} ∪ (U24 ∩ (dense_max, dyadic_max]), ascending: condN (32, 1536) → 44, condP (64, 1536) → 74."""
    long_range = {offset for offset in dyadic_unique_offsets() if dense_max < offset <= dyadic_max}
    return sorted(set(range(dense_max + 1)) | long_range)


def d4_warm_start_bias(offsets: list[int]) -> list[float]:
    """condL+RP position-bias warm start over U24 (spec §3.L+RP), the same for every head.

    w_δ = max over (j, τ) with τ·2^j = δ of |h_τ| / 2^{j/2}; c = ln w − mean(ln w); bias = 0.30·c / max|c|.
    """
    best: dict[int, float] = {}
    for scale, tap, offset in dyadic_slots():
        best[offset] = max(best.get(offset, 0.0), abs(D4_COEFFICIENTS[tap]) / 2 ** (scale / 2))
    missing = [offset for offset in offsets if offset not in best]
    if missing:
        raise ValueError(f"pos_bias_init=d4_warm_start is defined on dyadic offsets only; {missing} are not τ·2^j: "
                         f"use tap_set=unique24 (spec §3.L+RP)")
    logs = [math.log(best[offset]) for offset in offsets]
    mean = sum(logs) / len(logs)
    centred = [value - mean for value in logs]
    peak = max(abs(value) for value in centred)
    return [0.30 * value / peak for value in centred]


# ---------------------------------------------------------------------------------------------------------------
# Shifted-row products: the reads of the dyadic family at its offsets (spec §3 notation, §3.G–P)
#
# Tensors are token-major, rows (B, N, H, C) and per-offset weights (B, N, H, U).  A dense prefix of offsets
# 0 … band − 1 is read through strided windows of a zero-padded time-major copy (a Tensor.unfold-style view, no copy
# per offset), one batched matrix product for all of them.  The other (sparse) offsets are read one of two ways
# (SPARSE_READS), equal in value:
# - gather (GPU default): one index_select per token chunk fetches the S shifted blocks of R rows at once (each block
#   a contiguous window of a zero-padded flat copy), then one product and one reduction: no Python loop over offsets,
#   one kernel launch per op for the whole sequence on a GPU;
# - slices (CPU default): one slice product per offset on a token chunk that stays in cache; it reads the rows in
#   place where the gather copies them first: condK's 24 offsets at N = 16384, forward and backward reads, took
#   0.37 s against 1.2 s for the gather on one core of this 2-core CPU.
# Chunks keep memory O(N·(U + C)) per head: the (B, N, U, C) stack of shifted rows is never formed; the backward
# passes are the same three reads.

class _Shifts(NamedTuple):
    """Read offsets split for :func:`shifted_dot` / :func:`shifted_sum`; every offset is < N."""
    band: int              # the leading offsets 0, 1, …, band − 1
    sparse: tuple[int, ...]  # the other offsets, ascending

    @classmethod
    def of(cls, offsets: list[int]) -> _Shifts:
        band = 0
        while band < len(offsets) and offsets[band] == band:
            band += 1
        if band < MIN_BAND_WIDTH:
            band = 0
        return cls(band, tuple(offsets[band:]))


def shifted_dot(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """out[:, i, :, u] = a_i · b_{i − o_u}, zero where i < o_u: rows (B, N, H, C) -> (B, N, H, U).

    ``offsets`` ascending, each < N.  Computed in the promoted dtype of a and b outside autocast; the backward
    pass is written out (:class:`_ShiftedDot`)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    with torch.autocast(device_type=a.device.type, enabled=False):
        return _ShiftedDot.apply(a.to(dtype), b.to(dtype), _Shifts.of(offsets))


def shifted_sum(weights: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """out[:, i] = Σ_u weights[:, i, :, u]·b_{i − o_u}, zero-filled rows where i < o_u: (B, N, H, U), (B, N, H, C)
    -> (B, N, H, C).  ``offsets`` ascending, each < N; promoted dtype outside autocast (:class:`_ShiftedSum`)."""
    dtype = torch.promote_types(weights.dtype, b.dtype)
    with torch.autocast(device_type=b.device.type, enabled=False):
        return _ShiftedSum.apply(weights.to(dtype), b.to(dtype), _Shifts.of(offsets))


class _ShiftedDot(torch.autograd.Function):
    """Backward of out[i, u] = a_i·b_{i−o_u}: ∂a_i = Σ_u g[i, u]·b_{i−o_u}, ∂b_j = Σ_u g[j+o_u, u]·a_{j+o_u}."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, shifts: _Shifts) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.shifts = shifts
        return _dot_behind(a, b, shifts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        return _sum_behind(grad, b, ctx.shifts), _sum_ahead(grad, a, ctx.shifts), None


class _ShiftedSum(torch.autograd.Function):
    """Backward of out_i = Σ_u w[i, u]·b_{i−o_u}: ∂w[i, u] = g_i·b_{i−o_u}, ∂b_j = Σ_u w[j+o_u, u]·g_{j+o_u}."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, b: torch.Tensor, shifts: _Shifts) -> torch.Tensor:
        ctx.save_for_backward(weights, b)
        ctx.shifts = shifts
        return _sum_behind(weights, b, shifts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weights, b = ctx.saved_tensors
        return _dot_behind(grad, b, ctx.shifts), _sum_ahead(weights, grad, ctx.shifts), None


def _chunks(x: torch.Tensor, elements: int) -> list[tuple[int, int]]:
    # Token ranges of about `elements` elements of x's rows (the caller scales by what it forms per token): on a CPU
    # each range's rows and results stay in cache while every offset reads them, so time grows linearly in N
    # instead of streaming whole (B, N, H, C) tensors per offset.  Other devices take one range: kernel launches,
    # not caches, bound them.
    batch, n, heads, channels = x.shape
    if x.device.type != "cpu":
        return [(0, n)]
    step = max(1, elements // (batch * heads * channels))
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _time_major(x: torch.Tensor) -> torch.Tensor:
    # (B, N', H, K) -> (N'·B·H, 1, K), the batch of row vectors the band products multiply.
    return x.transpose(0, 1).reshape(-1, 1, x.shape[-1])


def _padded_rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    # Rows start … stop − 1 of x (B, N, H, K), time-major (stop − start, B, H, K), zero outside 0 … N − 1.
    batch, n, heads, width = x.shape
    rows = x.new_zeros(stop - start, batch, heads, width)
    low, high = max(start, 0), min(stop, n)
    rows[low - start:high - start] = x[:, low:high].transpose(0, 1)
    return rows


def _windows(rows: torch.Tensor, band: int) -> torch.Tensor:
    # Time-major rows (R, B, H, K) -> view (R'·B·H, K, band), R' = R − band + 1: the window of (r, b, h) holds rows
    # r … r + band − 1.
    length, batch, heads, width = rows.shape
    step = batch * heads * width
    return rows.as_strided(((length - band + 1) * batch * heads, width, band), (width, 1, step))


def _gathers(x: torch.Tensor) -> bool:
    # Sparse reads by one indexed gather (True) or per-offset slices (False), see SPARSE_READS.
    if SPARSE_READS == "auto":
        return x.device.type != "cpu"
    return SPARSE_READS == "gather"


def _block_reader(padded: torch.Tensor, shift: torch.Tensor, length: int) -> Callable[[int], torch.Tensor]:
    # fetch(start) -> (S, length, *rest): rows shift[u] + start … + length − 1 of padded (R, *rest) for every u.  Each
    # block is a contiguous window of the flat storage, so one index_select (block copies, no loop over u) reads all.
    width = padded[0].numel()
    windows = padded.view(-1).as_strided((padded.shape[0] - length + 1, length * width), (width, 1))

    def fetch(start: int) -> torch.Tensor:
        return windows.index_select(0, shift + start).view(len(shift), length, *padded.shape[1:])
    return fetch


def _offset_blocks(rows: torch.Tensor, offsets: list[int], length: int, ahead: bool
                   ) -> Callable[[int], torch.Tensor]:
    # fetch(start) -> (S, length, *rest): for every offset o_u, the `length` time-major rows from start − o_u (behind)
    # or start + o_u (ahead) of rows (N, *rest), zero outside 0 … N − 1 (rows copied once into a zero-padded buffer).
    n, reach = rows.shape[0], max(offsets)
    before = 0 if ahead else reach
    padded = rows.new_zeros(before + n + reach + length, *rows.shape[1:])
    padded[before:before + n] = rows
    shift = torch.tensor(offsets, device=rows.device) * (1 if ahead else -1) + before
    return _block_reader(padded, shift, length)


def _column_blocks(weights: torch.Tensor, offsets: list[int], length: int) -> Callable[[int], torch.Tensor]:
    # fetch(start) -> (S, length, B, H): column u of weights (B, N, H, S) at tokens start + o_u …, zero beyond N − 1
    # (the adjoint reads of _sum_ahead), from the columns laid end to end, each zero-padded.
    batch, n, heads, count = weights.shape
    span = n + max(offsets) + length
    columns = weights.new_zeros(count, span, batch, heads)
    columns[:, :n] = weights.permute(3, 1, 0, 2)
    shift = torch.arange(count, device=weights.device) * span + torch.tensor(offsets, device=weights.device)
    return _block_reader(columns.view(count * span, batch, heads), shift, length)


def _own_columns(weights: torch.Tensor, length: int) -> Callable[[int], torch.Tensor]:
    # fetch(start) -> (S, ≤ length, B, H): each token's own weights (B, N, H, S), offset-major (the behind reads).
    columns = weights.permute(3, 1, 0, 2)
    return lambda start: columns[:, start:start + length]


def _gather_chunks(x: torch.Tensor, count: int) -> tuple[list[tuple[int, int]], int]:
    # Token chunks of the gathered reads (count blocks of R rows stay near GATHER_CHUNK_ELEMENTS) and their length R.
    chunks = _chunks(x, GATHER_CHUNK_ELEMENTS // count)
    return chunks, chunks[0][1] - chunks[0][0]


def _sparse_dots(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: tuple[int, ...]) -> None:
    # out[:, i, :, u] = a_i · b_{i − o_u} into out (B, N, H, S), zero where i < o_u.
    if _gathers(a):
        chunks, length = _gather_chunks(a, len(offsets))
        a_rows = a.transpose(0, 1)
        behind = _offset_blocks(b.transpose(0, 1), list(offsets), length, ahead=False)
        dots = a.new_empty(len(offsets), *a_rows.shape[:-1])
        for start, stop in chunks:
            dots[:, start:stop] = (behind(start)[:, :stop - start] * a_rows[start:stop]).sum(-1)
        out.copy_(dots.permute(2, 1, 3, 0))
        return
    for start, stop in _chunks(a, SHIFT_CHUNK_ELEMENTS):
        for column, offset in enumerate(offsets):
            low = max(start, offset)
            if low < stop:
                out[:, low:stop, :, column] = torch.linalg.vecdot(a[:, low:stop], b[:, low - offset:stop - offset])


def _sparse_sums(out: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, offsets: tuple[int, ...],
                 ahead: bool) -> None:
    # Behind: out_i += Σ_u weights[i, u]·rows_{i − o_u}; ahead (the adjoint): out_j += Σ_u weights[j + o_u, u]·
    # rows_{j + o_u}.  Rows outside 0 … N − 1 read zero.  out (B, N, H, C), weights (B, N, H, S).
    n = rows.shape[1]
    if _gathers(rows):
        chunks, length = _gather_chunks(rows, len(offsets))
        read_weights = _column_blocks(weights, list(offsets), length) if ahead else _own_columns(weights, length)
        read_rows = _offset_blocks(rows.transpose(0, 1), list(offsets), length, ahead)
        for start, stop in chunks:
            sums = (read_weights(start)[:, :stop - start, ..., None] * read_rows(start)[:, :stop - start]).sum(0)
            out[:, start:stop] += sums.transpose(0, 1)
        return
    for start, stop in _chunks(rows, SHIFT_CHUNK_ELEMENTS):
        for column, offset in enumerate(offsets):
            if ahead:
                high = min(stop, n - offset)
                if start < high:
                    out[:, start:high].addcmul_(weights[:, start + offset:high + offset, :, column, None],
                                                rows[:, start + offset:high + offset])
            else:
                low = max(start, offset)
                if low < stop:
                    out[:, low:stop].addcmul_(weights[:, low:stop, :, column, None], rows[:, low - offset:stop - offset])


def _dot_behind(a: torch.Tensor, b: torch.Tensor, shifts: _Shifts) -> torch.Tensor:
    # out[:, i, :, u] = a_i · b_{i − o_u} (zero for i < o_u), (B, N, H, U).
    batch, n, heads, _ = a.shape
    band = shifts.band
    out = a.new_zeros(batch, n, heads, band + len(shifts.sparse))
    if band:
        for start, stop in _chunks(a, SHIFT_CHUNK_ELEMENTS):
            # Window column w of row i holds b_{i − (band − 1) + w}, i.e. offset band − 1 − w.
            dots = torch.bmm(_time_major(a[:, start:stop]), _windows(_padded_rows(b, start - band + 1, stop), band))
            out[:, start:stop, :, :band] = dots.view(stop - start, batch, heads, band).transpose(0, 1).flip(-1)
    if shifts.sparse:
        _sparse_dots(out[..., band:], a, b, shifts.sparse)
    return out


def _sum_behind(weights: torch.Tensor, b: torch.Tensor, shifts: _Shifts) -> torch.Tensor:
    # out_i = Σ_u weights[i, u]·b_{i − o_u}, (B, N, H, C).
    batch, n, heads, channels = b.shape
    band = shifts.band
    out = b.new_zeros(batch, n, heads, channels)
    if band:
        for start, stop in _chunks(b, SHIFT_CHUNK_ELEMENTS):
            window_weights = _time_major(weights[:, start:stop, :, :band].flip(-1))
            windows = _windows(_padded_rows(b, start - band + 1, stop), band)
            sums = torch.bmm(window_weights, windows.transpose(1, 2))
            out[:, start:stop] = sums.view(stop - start, batch, heads, channels).transpose(0, 1)
    if shifts.sparse:
        _sparse_sums(out, weights[..., band:], b, shifts.sparse, ahead=False)
    return out


def _sum_ahead(weights: torch.Tensor, a: torch.Tensor, shifts: _Shifts) -> torch.Tensor:
    # out_j = Σ_u weights[j + o_u, u]·a_{j + o_u} (rows beyond N − 1 are zero), (B, N, H, C): the adjoint reads.
    batch, n, heads, channels = a.shape
    band = shifts.band
    out = a.new_zeros(batch, n, heads, channels)
    if band:
        for start, stop in _chunks(a, SHIFT_CHUNK_ELEMENTS):
            # skewed[j, u] = weights[j + u, u]: a diagonal stride through the time-major rows j … j + band − 1.
            rows = _padded_rows(weights[..., :band], start, stop + band - 1)
            step = batch * heads * band
            skewed = rows.as_strided((stop - start, batch, heads, band), (step, heads * band, band, step + 1))
            windows = _windows(_padded_rows(a, start, stop + band - 1), band)
            sums = torch.bmm(skewed.reshape(-1, 1, band).contiguous(), windows.transpose(1, 2))
            out[:, start:stop] = sums.view(stop - start, batch, heads, channels).transpose(0, 1)
    if shifts.sparse:
        _sparse_sums(out, weights[..., band:], a, shifts.sparse, ahead=True)
    return out


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # Weights, softmaxes and normalisers run in fp32 even under bf16/fp16 autocast (fp64 in the fp64 tests).
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _choice(setting: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{setting}={value!r} is not one of {list(allowed)}")
    return value


def _split_heads(qkv: nn.Linear, x: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # qkv = one Linear(d → 3d) split in the order q, k, v; head h owns channels h·d_h … (h+1)·d_h − 1 (spec §1).
    batch, n, dim = x.shape
    q, k, v = qkv(x).view(batch, n, 3, n_heads, dim // n_heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def _split_heads_by_token(qkv: nn.Linear, x: torch.Tensor, n_heads: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # q, k, v of _split_heads as token-major views (B, N, H, d_h).
    batch, n, dim = x.shape
    q, k, v = qkv(x).view(batch, n, 3, n_heads, dim // n_heads).unbind(2)
    return q, k, v


def _linear_by_channel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # A Linear's output channel-major, (B, N, D_in) -> (B, D_out, N), as one batched GEMM (no transposing copy).
    return torch.baddbmm(bias[:, None], weight.expand(x.shape[0], -1, -1), x.transpose(1, 2))


def _channel_norm(k: torch.Tensor) -> torch.Tensor:
    # ‖k‖₂ over the channel axis −2, keepdim.  A square-sum-root: torch.norm reduces a non-innermost axis about ten
    # times slower.  The double where keeps torch.norm's zero gradient at ‖k‖ = 0 (the root's own would be NaN).
    squares = (k * k).sum(-2, keepdim=True)
    positive = squares > 0
    return torch.where(positive, torch.where(positive, squares, 1.0).sqrt(), 0.0)


def _merge_heads(y: torch.Tensor) -> torch.Tensor:
    batch, heads, n, head_dim = y.shape
    return y.transpose(1, 2).reshape(batch, n, heads * head_dim)


def _check_heads(dim: int, n_heads: int) -> None:
    if dim % n_heads:
        raise ValueError(f"d_model={dim} is not divisible by n_heads={n_heads}: pick n_heads dividing d_model")


# ---------------------------------------------------------------------------------------------------------------
# Field family, condA–F (spec §3.A–F)

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
        _check_heads(dim, n_heads)
        self.n_heads = n_heads
        self.seq_len = seq_len
        self.layer_idx = layer_idx
        self.kernel_type = _choice("kernel", kernel, ("damped_cosine", "morlet", "db4"))
        self.field_layout = _choice("field_layout", field_layout, ("stretch", "stride1", "reference"))
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
        dtype, device = _compute_dtype(self.field_coupling), self.field_coupling.device  # fp32 even for bf16 params
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
        k, v, gate = _linear_by_channel(x, weight, bias).split(dim, dim=1)
        k, v = (t.view(batch, self.n_heads, dim // self.n_heads, n) for t in (k, v))        # (B, H, C, N)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = _compute_dtype(x)
            deposit = v.to(dtype) * _channel_norm(k.to(dtype))
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


# ---------------------------------------------------------------------------------------------------------------
# Dyadic family, condG–P (spec §3.G–P)

def _one_hot(rows: list[int], columns: list[int], device: torch.device) -> torch.Tensor:
    # (len(rows), len(columns)) fp64 matrix, 1 where rows[r] == columns[c]: a gather / scatter-sum as a GEMM, whose
    # backward is a GEMM as well (an index along the last axis backs up through a slow scatter).
    return torch.tensor([[float(row == column) for column in columns] for row in rows], dtype=torch.float64,
                        device=device)


class _TapPlan(NamedTuple):
    """Everything a forward at length N needs about the tap slots, built once per (N, device)."""
    offsets: list[int]             # the distinct slot offsets < N, ascending (the rows actually read)
    slot_reads: torch.Tensor | None  # (U, T) 0/1: slot t reads offset column u (none for offsets ≥ N); None when
                                     # slot t reads column t for every t
    include: torch.Tensor          # (N or 1, 1, T) bool: slot takes part in the weights / normaliser (oob_mode)
    slot_gain: torch.Tensor        # (11, T) fp64: D4 coefficient h'_t in the row of slot t's scale j; 0 for slots
                                   # oob_mode=skip drops (offset ≥ N)
    skip_offsets: list[int]        # condH long skips < N
    skip_select: torch.Tensor      # (S',) which skip weights are in range


class DwarfDyadicAttention(nn.Module):
    """Dyadic-offset attention of DWARF condG–P (spec dwarf.md §3.G–P): (B, N, D) -> (B, N, D), causal.

    Output i reads inputs i − o for the slot offsets o of ``tap_set`` only: memory O(N·(taps + d)), no N² term and no
    length limit (``seq_len`` is accepted for the shell contract and unused).

    Options (keyword-only; defaults = condN, spec §3.N):
    - ``gather``: how slot weights arise. ``deposit`` (G, H, I): F_i = Σ_t g_{i,j} h'_τ f_{i−o_t}, f = v·‖k‖;
      ``qk_linear`` (J): Σ_t g_{i,j} h'_τ s_{i,t} v_{i−o_t}; ``qk_elu`` (K): the same with φ(s) = elu(s) + 1 over the
      normaliser Z = Σ_t g |h'_τ| φ(s) (+ bypass), out = num/(Z + 1e-6); ``softmax`` (L, L+RP, N, P):
      a = softmax_t(s_{i,t}/√d_h + pos_bias_t). Here s_{i,t} = q_i·k_{i−o_t} (+ pos_bias_t for qk_*).
    - ``tap_set``: ``dyadic44`` (the 44 (j, τ) slots, duplicates kept), ``unique24`` (U24), ``dense_dyadic``
      ({0…dense_max} ∪ U24 ∩ (dense_max, dyadic_max]); ``dense_max``/``dyadic_max`` apply to dense_dyadic only.
    - ``d4_order``: ``forward`` (h_τ at offset τ·2^j; J, K) or ``reversed`` (h_{3−τ}; the G/H/I code, spec §6 D6).
    - ``scale_gains``: ``none``, ``static`` (g_{j,h} = softmax_j scale_gain[:, h]; G, H) or ``query``
      (softmax_j(W_qs q_{i,h} + scale_gain[j, h]), W_qs = Linear(d_h → 11) shared by heads; I, J, K).
    - ``rg_scale_init``: condK's layer-wise scale_gain init, rows j ≤ 3: 0.5(1−ℓ/(L−1)), j ≥ 8: 0.5·ℓ/(L−1).
    - ``head_coupling``: mix heads with softmax_row(C), C init I + 0.01·N(0, 1) (G, H, I).
    - ``long_skips``: condH's F ← F + Σ_d σ(w_d)·F_{i−d} on the propagated field (d ∈ {512, 1024}, w init
      ``long_skip_init`` = −4).
    - ``identity_bypass``: + softplus(b_h)·ψ(q_i·k_i)·v_i (ψ = identity for qk_linear, φ for qk_elu; b init
      ``bypass_init`` = −4; J, K).
    - ``pos_bias_init``: ``none``, ``zero`` (K, L), ``alibi`` (−α_h ln(1 + o), α = linspace(0.2, 2, H); N, P) or
      ``d4_warm_start`` (L+RP, spec §3.L+RP). One bias per slot and head.
    - ``oob_mode`` (spec §6 D7): ``skip`` — slots at offsets ≥ N are dropped, earlier zero-filled keys stay
      (J, K; G/H/I, where it is moot); ``zero_key`` — every slot stays, zero-filled keys score pos_bias (L, L+RP);
      ``mask`` — slots with i < o get weight 0 / −∞ (N, P).
    - ``gate_source``: gate σ(W_g x) (``input``) or σ(W_g q_flat) (``query``, condH).
    - ``gate_bias_init``: effective gate bias set in :meth:`post_init` (2.0 for H, M, N, P; 0 otherwise; §6 D1).
    """

    def __init__(self, dim: int, n_heads: int, seq_len: int, layer_idx: int = 0, n_layers: int = 1, *,
                 gather: str = "softmax", tap_set: str = "dense_dyadic", dense_max: int = 32,
                 dyadic_max: int = 1536, d4_order: str = "forward", scale_gains: str = "none",
                 rg_scale_init: bool = False, head_coupling: bool = False, long_skips: list[int] = (),
                 long_skip_init: float = -4.0, identity_bypass: bool = False, bypass_init: float = -4.0,
                 pos_bias_init: str = "alibi", oob_mode: str = "mask", gate_source: str = "input",
                 gate_bias_init: float = 2.0) -> None:
        super().__init__()
        _check_heads(dim, n_heads)
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.seq_len = seq_len
        self.layer_idx = layer_idx
        self.n_layers = n_layers
        self.gather = _choice("gather", gather, ("deposit", "qk_linear", "qk_elu", "softmax"))
        self.tap_set = _choice("tap_set", tap_set, ("dyadic44", "unique24", "dense_dyadic"))
        self.d4_order = _choice("d4_order", d4_order, ("forward", "reversed"))
        self.scale_gains = _choice("scale_gains", scale_gains, ("none", "static", "query"))
        self.pos_bias_init = _choice("pos_bias_init", pos_bias_init, ("none", "zero", "alibi", "d4_warm_start"))
        self.oob_mode = _choice("oob_mode", oob_mode, ("skip", "zero_key", "mask"))
        self.gate_source = _choice("gate_source", gate_source, ("input", "query"))
        self.rg_scale_init = rg_scale_init
        self.gate_bias_init = gate_bias_init
        self.long_skips = [int(offset) for offset in long_skips]
        self._validate(identity_bypass, dense_max, dyadic_max)

        if tap_set == "dyadic44":
            slots = dyadic_slots()
        else:
            offsets = dyadic_unique_offsets() if tap_set == "unique24" else dense_dyadic_offsets(dense_max, dyadic_max)
            slots = [(-1, -1, offset) for offset in offsets]
        self.slot_offsets = [offset for _, _, offset in slots]
        self.slot_scales = [scale for scale, _, _ in slots]       # j of each D4 slot, −1 for plain offsets
        self.slot_taps = [tap for _, tap, _ in slots]             # τ of each D4 slot, −1 for plain offsets
        coefficients = D4_COEFFICIENTS if d4_order == "forward" else D4_COEFFICIENTS[::-1]
        self.slot_coefficients = [coefficients[tap] if tap >= 0 else 0.0 for tap in self.slot_taps]
        self.unique_offsets = sorted(set(self.slot_offsets))
        self._plans: dict[tuple[int, torch.device], _TapPlan] = {}

        self.qkv = nn.Linear(dim, 3 * dim)
        self.gate_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if scale_gains != "none":
            self.scale_gain = nn.Parameter(torch.zeros(DYADIC_SCALES, n_heads))
        if scale_gains == "query":
            self.q_scale_proj = nn.Linear(self.head_dim, DYADIC_SCALES, bias=False)
        if head_coupling:
            self.field_coupling = nn.Parameter(torch.eye(n_heads) + 0.01 * torch.randn(n_heads, n_heads))
        if self.long_skips:
            self.long_skip_weight = nn.Parameter(torch.full((len(self.long_skips),), float(long_skip_init)))
        if identity_bypass:
            self.identity_bypass = nn.Parameter(torch.full((n_heads,), float(bypass_init)))
        if pos_bias_init != "none":
            self.pos_bias = nn.Parameter(self._initial_pos_bias())
        self.post_init()

    def _validate(self, identity_bypass: bool, dense_max: int, dyadic_max: int) -> None:
        d4_weighted = self.gather != "softmax"
        if d4_weighted and self.tap_set != "dyadic44":
            raise ValueError(f"gather={self.gather} weights slots by D4 coefficients and scale gains: it needs "
                             f"tap_set=dyadic44, got {self.tap_set}")
        if d4_weighted and self.scale_gains == "none":
            raise ValueError(f"gather={self.gather} needs scale_gains=static or query (spec §3.G–K)")
        if not d4_weighted and self.scale_gains != "none":
            raise ValueError("gather=softmax has no scale gains (spec §3.L): set scale_gains=none")
        if identity_bypass and self.gather not in ("qk_linear", "qk_elu"):
            raise ValueError(f"identity_bypass=true is defined for gather=qk_linear/qk_elu (spec §3.J/K), "
                             f"not {self.gather}")
        if self.gather == "deposit" and self.pos_bias_init != "none":
            raise ValueError("gather=deposit has no scores to bias: set pos_bias_init=none (spec §3.G)")
        if self.gather == "softmax" and self.pos_bias_init == "none":
            raise ValueError("gather=softmax needs a position bias (spec §3.L–P): set pos_bias_init")
        if self.rg_scale_init and self.scale_gains == "none":
            raise ValueError("rg_scale_init=true initialises scale_gain: set scale_gains=static or query")
        if any(offset < 1 for offset in self.long_skips):
            raise ValueError(f"long_skips={self.long_skips} must be positive offsets (a skip of 0 or less "
                             f"would read the present or the future)")
        if self.tap_set == "dense_dyadic" and not 0 <= dense_max <= dyadic_max:
            raise ValueError(f"dense_max={dense_max}, dyadic_max={dyadic_max}: need 0 <= dense_max <= dyadic_max")

    def _initial_pos_bias(self) -> torch.Tensor:
        slots = len(self.slot_offsets)
        if self.pos_bias_init == "zero":
            return torch.zeros(slots, self.n_heads)
        if self.pos_bias_init == "alibi":
            slopes = torch.linspace(0.2, 2.0, self.n_heads)
            distance = torch.log1p(torch.tensor(self.slot_offsets, dtype=torch.float32))
            return -distance[:, None] * slopes[None, :]
        warm = torch.tensor(d4_warm_start_bias(self.slot_offsets), dtype=torch.float32)
        return warm[:, None].expand(slots, self.n_heads).clone()

    def post_init(self) -> None:
        """Re-inits that run after the shell's N(0, 0.02) pass: gate bias (spec §6 D1), q_scale_proj ~ N(0, 0.01)
        (spec §3.I) and condK's RG scale_gain rows (spec §3.K)."""
        with torch.no_grad():
            self.gate_proj.bias.fill_(self.gate_bias_init)
            if self.scale_gains == "query":
                nn.init.normal_(self.q_scale_proj.weight, 0.0, 0.01)
            if self.rg_scale_init:
                depth = self.layer_idx / max(self.n_layers - 1, 1)
                rows = torch.zeros(DYADIC_SCALES)
                rows[:4] = 0.5 * (1.0 - depth)
                rows[8:] = 0.5 * depth
                self.scale_gain.copy_(rows[:, None].expand_as(self.scale_gain))

    def _plan(self, n: int, device: torch.device) -> _TapPlan:
        key = (n, device)
        if key in self._plans:
            self._plans[key] = self._plans.pop(key)               # most recently used last
        else:
            if len(self._plans) >= PLAN_CACHE_SIZE:               # bounded: decoding visits every length
                self._plans.pop(next(iter(self._plans)))
            offsets = [offset for offset in self.unique_offsets if offset < n]
            slot_offsets = torch.tensor(self.slot_offsets, device=device)
            if self.oob_mode == "skip":
                include = (slot_offsets < n)[None, :]
            elif self.oob_mode == "zero_key":
                include = torch.ones(1, len(self.slot_offsets), dtype=torch.bool, device=device)
            else:
                include = torch.arange(n, device=device)[:, None] >= slot_offsets[None, :]
            gain = _one_hot(list(range(DYADIC_SCALES)), self.slot_scales, device) * torch.tensor(
                self.slot_coefficients, dtype=torch.float64, device=device)
            skips = [offset for offset in self.long_skips if offset < n]
            self._plans[key] = _TapPlan(
                offsets=offsets,
                slot_reads=None if offsets == self.slot_offsets else _one_hot(offsets, self.slot_offsets, device),
                include=include[:, None, :],
                slot_gain=gain * include[0] if self.oob_mode == "skip" else gain,
                skip_offsets=skips,
                skip_select=torch.tensor([i for i, offset in enumerate(self.long_skips) if offset < n],
                                         dtype=torch.long, device=device),
            )
        return self._plans[key]

    def _gains(self, q: torch.Tensor) -> torch.Tensor:
        # Scale weights g (B or 1, N or 1, H, 11), softmax over the scales j (spec §3.G step 2, §3.I).
        dtype = _compute_dtype(q)
        prior = self.scale_gain.t().to(dtype)[None, None]
        if self.scale_gains == "static":
            return prior.softmax(-1)
        return (self.q_scale_proj(q).to(dtype) + prior).softmax(-1)

    def _slot_weights(self, q: torch.Tensor, k: torch.Tensor, plan: _TapPlan
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # Per-slot weights (B or 1, N or 1, H, T), the normaliser Z (qk_elu) and the offset-0 score (bypass).
        # Slot t at position i multiplies the value row i − o_t; zero-filled rows (i < o_t) add nothing to the
        # numerator but enter Z / the softmax as ``oob_mode`` says.
        dtype = _compute_dtype(q)
        qk = qk_slot = None
        if self.gather != "deposit":
            qk = qk_slot = shifted_dot(q, k, plan.offsets).to(dtype)             # (B, N, H, U)
            if plan.slot_reads is not None:
                qk_slot = qk @ plan.slot_reads.to(dtype)                          # (B, N, H, T), 0 beyond N
            if self.pos_bias_init != "none":
                bias = self.pos_bias.t().to(dtype)[None, None]
                qk_slot = qk_slot * self.head_dim ** -0.5 + bias if self.gather == "softmax" else qk_slot + bias
        if self.gather == "softmax":
            logits = qk_slot.masked_fill(~plan.include, float("-inf"))
            return logits.softmax(-1), None, None
        gains = self._gains(q)                                                   # (., ., H, 11)
        gain = plan.slot_gain.to(dtype)
        weights = gains @ gain                                                   # g_{i,j(t)}·h'_t, (., ., H, T)
        if self.gather == "deposit":
            return weights * plan.include if self.oob_mode == "mask" else weights, None, None
        feature = qk_slot if self.gather == "qk_linear" else F.elu(qk_slot) + 1.0
        if self.oob_mode == "mask":
            feature = feature * plan.include
        normaliser = None
        if self.gather == "qk_elu":                                              # Z = Σ_t g·|h'_t|·φ_t
            normaliser = torch.linalg.vecdot(gains @ gain.abs(), feature).unsqueeze(-1)
        return weights * feature, normaliser, qk[..., :1]

    def _offset_weights(self, q: torch.Tensor, k: torch.Tensor, plan: _TapPlan) -> torch.Tensor:
        # Weight of each read offset (B or 1, N or 1, H, U): duplicate slots summed, the bypass added at offset 0
        # and, for qk_elu, divided by Z + 1e-6 (dividing the U weights, not the mixed C channels: the same sum).
        weights, normaliser, self_score = self._slot_weights(q, k, plan)
        columns = len(plan.offsets)
        per_offset = weights if plan.slot_reads is None else weights @ plan.slot_reads.t().to(weights.dtype)
        if hasattr(self, "identity_bypass"):
            feature = self_score if self.gather == "qk_linear" else F.elu(self_score) + 1.0
            bypass = F.softplus(self.identity_bypass).to(feature.dtype)[None, None, :, None] * feature
            per_offset = per_offset + F.pad(bypass, (0, columns - 1))          # offset 0 is column 0
            if normaliser is not None:
                normaliser = normaliser + bypass
        return per_offset if normaliser is None else per_offset / (normaliser + NORMALISER_EPS)

    def tap_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slot weights (B or 1, H, N or 1, T) for input x, in slot order, and the normaliser Z (qk_elu; else None).

        Softmax gathers: the attention probabilities (rows sum to 1). D4 gathers: g·h'·feature before division by
        Z, without the identity bypass. For analysis and the spec §7 invariants.
        """
        q, k, _ = _split_heads_by_token(self.qkv, x, self.n_heads)
        weights, normaliser, _ = self._slot_weights(q, k, self._plan(x.shape[1], x.device))
        return weights.transpose(1, 2), None if normaliser is None else normaliser.transpose(1, 2)

    def offset_weights(self, x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Effective weight of each read offset, (offsets, (B or 1, H, N or 1, U)): duplicate slots summed, the
        bypass added at offset 0 and, for qk_elu, divided by Z + 1e-6. The weight output i gives row i − offset
        before the long skips, the head coupling and the gate."""
        q, k, _ = _split_heads_by_token(self.qkv, x, self.n_heads)
        plan = self._plan(x.shape[1], x.device)
        return plan.offsets, self._offset_weights(q, k, plan).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        plan = self._plan(n, x.device)
        q, k, v = _split_heads_by_token(self.qkv, x, self.n_heads)                # (B, N, H, C) each
        values = v * k.norm(dim=-1, keepdim=True) if self.gather == "deposit" else v
        weights = self._offset_weights(q, k, plan)
        mixed = shifted_sum(weights.expand(*values.shape[:-1], -1), values, plan.offsets)
        if plan.skip_offsets:
            skip_weight = torch.sigmoid(self.long_skip_weight[plan.skip_select]).to(mixed.dtype)
            mixed = mixed + shifted_sum(skip_weight.expand(*mixed.shape[:-1], -1), mixed, plan.skip_offsets)
        if hasattr(self, "field_coupling"):
            mixed = torch.einsum("hg,bngc->bnhc", self.field_coupling.softmax(-1).to(mixed.dtype), mixed)
        gate_input = q.reshape(batch, n, dim) if self.gate_source == "query" else x
        gate = torch.sigmoid(self.gate_proj(gate_input))
        return self.out_proj(mixed.reshape(batch, n, dim).to(gate.dtype) * gate)


def dwarf_dyadic_reference(module: DwarfDyadicAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-slot loop form of :class:`DwarfDyadicAttention`, written from spec §3.G–P like the reference scripts:
    one zero-filled shift per slot, offsets ≥ N skipped / kept / masked as ``oob_mode`` says."""
    batch, n, dim = x.shape
    heads, head_dim = module.n_heads, module.head_dim
    q, k, v = (t.reshape(batch, n, heads, head_dim).transpose(1, 2) for t in module.qkv(x).split(dim, -1))
    rows = torch.arange(n)[None, None, :, None]

    def shift(t: torch.Tensor, offset: int) -> torch.Tensor:
        if offset >= n:
            return torch.zeros_like(t)
        return torch.cat([torch.zeros_like(t[:, :, :offset]), t[:, :, :n - offset]], dim=2)

    def bias(slot: int) -> torch.Tensor:
        return module.pos_bias[slot].view(1, heads, 1, 1)

    if module.gather == "softmax":
        scores = []
        for slot, offset in enumerate(module.slot_offsets):
            score = (q * shift(k, offset)).sum(-1, keepdim=True) / math.sqrt(head_dim) + bias(slot)
            if module.oob_mode == "mask":
                score = score.masked_fill(rows < offset, float("-inf"))
            if module.oob_mode == "skip" and offset >= n:
                score = torch.full_like(score, float("-inf"))
            scores.append(score)
        attention = torch.cat(scores, dim=-1).softmax(-1)
        out = sum(attention[..., slot:slot + 1] * shift(v, offset) for slot, offset in enumerate(module.slot_offsets))
    else:
        if module.scale_gains == "static":
            gains = module.scale_gain.softmax(0).t()[None, :, None, :]
        else:
            gains = (module.q_scale_proj(q) + module.scale_gain.t()[None, :, None, :]).softmax(-1)
        deposit = v * k.norm(dim=-1, keepdim=True)
        coefficients = D4_COEFFICIENTS if module.d4_order == "forward" else D4_COEFFICIENTS[::-1]
        out = torch.zeros_like(v)
        normaliser = torch.zeros_like(v[..., :1])
        for slot, (scale, tap, offset) in enumerate(dyadic_slots()):
            if module.oob_mode == "skip" and offset >= n:
                continue
            keep = (rows >= offset).to(x.dtype) if module.oob_mode == "mask" else 1.0
            weight = gains[..., scale:scale + 1] * coefficients[tap] * keep
            if module.gather == "deposit":
                out = out + weight * shift(deposit, offset)
                continue
            score = (q * shift(k, offset)).sum(-1, keepdim=True)
            if module.pos_bias_init != "none":
                score = score + bias(slot)
            feature = score if module.gather == "qk_linear" else F.elu(score) + 1.0
            out = out + weight * feature * shift(v, offset)
            normaliser = normaliser + gains[..., scale:scale + 1] * abs(coefficients[tap]) * keep * feature
        if hasattr(module, "identity_bypass"):
            self_score = (q * k).sum(-1, keepdim=True)
            feature = self_score if module.gather == "qk_linear" else F.elu(self_score) + 1.0
            beta = F.softplus(module.identity_bypass).view(1, heads, 1, 1)
            out = out + beta * feature * v
            normaliser = normaliser + beta * feature
        if module.gather == "qk_elu":
            out = out / (normaliser + NORMALISER_EPS)
    if module.long_skips:
        out = out + sum(torch.sigmoid(module.long_skip_weight[i]) * shift(out, offset)
                        for i, offset in enumerate(module.long_skips))
    if hasattr(module, "field_coupling"):
        coupling = module.field_coupling.softmax(-1)
        out = torch.stack([sum(coupling[h, g] * out[:, g] for g in range(heads)) for h in range(heads)], dim=1)
    gate_input = q.transpose(1, 2).reshape(batch, n, dim) if module.gate_source == "query" else x
    gate = torch.sigmoid(module.gate_proj(gate_input))
    return module.out_proj(out.transpose(1, 2).reshape(batch, n, dim) * gate)


# ---------------------------------------------------------------------------------------------------------------
# condM block 5 (spec §3.M)

class DwarfFullAttention(nn.Module):
    """Full causal softmax attention of condM's block 5 (spec dwarf.md §3.M): (B, N, D) -> (B, N, D).

    SDPA with is_causal and scale 1/√d_h, dropout ``attn_dropout`` on the probabilities in training, then the DWARF
    output gate σ(gate_proj(x)) (effective bias ``gate_bias_init`` = 2.0, set in :meth:`post_init`) and out_proj.
    No position bias (spec §6 D8). Quadratic by definition.
    """

    def __init__(self, dim: int, n_heads: int, seq_len: int, layer_idx: int = 0, n_layers: int = 1, *,
                 attn_dropout: float = 0.1, gate_bias_init: float = 2.0) -> None:
        super().__init__()
        _check_heads(dim, n_heads)
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
        q, k, v = _split_heads(self.qkv, x, self.n_heads)
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        gate = torch.sigmoid(self.gate_proj(x))
        return self.out_proj(_merge_heads(y).to(gate.dtype) * gate)


def dwarf_full_attention_reference(module: DwarfFullAttention, x: torch.Tensor) -> torch.Tensor:
    """Explicit O(N²) masked softmax (no dropout) of :class:`DwarfFullAttention`."""
    n = x.shape[1]
    q, k, v = _split_heads(module.qkv, x, module.n_heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    gate = torch.sigmoid(module.gate_proj(x))
    return module.out_proj(_merge_heads(scores.softmax(-1) @ v) * gate)


# ---------------------------------------------------------------------------------------------------------------
# Conditions (spec §3, §4, §6)

_DYADIC_D4 = dict(tap_set="dyadic44", oob_mode="skip", gate_bias_init=0.0)
_DYADIC_SOFTMAX = dict(gather="softmax", scale_gains="none")

CONDITIONS: dict[str, dict] = {
    "condA": {"class": DwarfFieldAttention, "options": dict(kernel="damped_cosine", field_layout="stretch")},
    "condB": {"class": DwarfFieldAttention,
              "options": dict(kernel="damped_cosine", dispersion=True, field_layout="stretch")},
    "condC": {"class": DwarfFieldAttention, "options": dict(kernel="morlet", field_layout="stretch")},
    "condD": {"class": DwarfFieldAttention,
              "options": dict(kernel="db4", kdv=True, rg_gain_init=True, field_layout="stretch")},
    "condE": {"class": DwarfFieldAttention, "options": dict(kernel="damped_cosine", field_layout="stride1")},
    "condF": {"class": DwarfFieldAttention,
              "options": dict(kernel="damped_cosine", field_layout="stride1", damping_init=[-8.0, -1.0],
                              damping_floor=0.001)},
    "condG": {"class": DwarfDyadicAttention,
              "options": dict(_DYADIC_D4, gather="deposit", d4_order="reversed", scale_gains="static",
                              head_coupling=True, pos_bias_init="none")},
    "condH": {"class": DwarfDyadicAttention,
              "options": dict(_DYADIC_D4, gather="deposit", d4_order="reversed", scale_gains="static",
                              head_coupling=True, pos_bias_init="none", long_skips=[512, 1024],
                              gate_source="query", gate_bias_init=2.0)},
    "condI": {"class": DwarfDyadicAttention,
              "options": dict(_DYADIC_D4, gather="deposit", d4_order="reversed", scale_gains="query",
                              head_coupling=True, pos_bias_init="none")},
    "condJ": {"class": DwarfDyadicAttention,
              "options": dict(_DYADIC_D4, gather="qk_linear", d4_order="forward", scale_gains="query",
                              identity_bypass=True, pos_bias_init="none")},
    "condK": {"class": DwarfDyadicAttention,
              "options": dict(_DYADIC_D4, gather="qk_elu", d4_order="forward", scale_gains="query",
                              rg_scale_init=True, identity_bypass=True, pos_bias_init="zero")},
    "condL": {"class": DwarfDyadicAttention,
              "options": dict(_DYADIC_SOFTMAX, tap_set="dyadic44", pos_bias_init="zero", oob_mode="zero_key",
                              gate_bias_init=0.0)},
    "condL_rp": {"class": DwarfDyadicAttention,
                 "options": dict(_DYADIC_SOFTMAX, tap_set="unique24", pos_bias_init="d4_warm_start",
                                 oob_mode="zero_key", gate_bias_init=0.0)},
    "condN": {"class": DwarfDyadicAttention,
              "options": dict(_DYADIC_SOFTMAX, tap_set="dense_dyadic", dense_max=32, dyadic_max=1536,
                              pos_bias_init="alibi", oob_mode="mask", gate_bias_init=2.0)},
    "condP": {"class": DwarfDyadicAttention,
              "options": dict(_DYADIC_SOFTMAX, tap_set="dense_dyadic", dense_max=64, dyadic_max=1536,
                              pos_bias_init="alibi", oob_mode="mask", gate_bias_init=2.0)},
    # condM = condN in blocks 0–4 plus condM_full in block 5 (the shell's per-block attention override).
    "condM_full": {"class": DwarfFullAttention, "options": dict(attn_dropout=0.1, gate_bias_init=2.0)},
}
CONDITIONS["condK_rp"] = {"class": DwarfDyadicAttention, "options": dict(CONDITIONS["condK"]["options"])}
CONDITIONS["condM"] = {"class": DwarfDyadicAttention, "options": dict(CONDITIONS["condN"]["options"])}

# Model-shell settings each condition was published with (spec §1, §1.A, §3.P0, §3.M); the shell is the lead's.
# shell "1.A": no position embedding, FFN dropout after GELU and after W2, no attention-output dropout;
# shell "1": learned positions with 2050 rows, FFN dropout after GELU only, attention-output dropout 0.1.
_POOLED = [2, 5]
CONDITION_SHELLS: dict[str, dict] = {
    **{name: {"shell": "1.A", "pooling_blocks": []} for name in ("condA", "condB", "condC", "condD")},
    **{name: {"shell": "1", "pooling_blocks": _POOLED}
       for name in ("condE", "condF", "condG", "condH", "condI", "condJ", "condK_rp", "condL_rp", "condN",
                    "condP")},
    "condK": {"shell": "1", "pooling_blocks": []},
    "condL": {"shell": "1", "pooling_blocks": []},
    "condM": {"shell": "1", "pooling_blocks": [2], "layer_attention": {5: "condM_full"}},
}
