"""Shifted-row products: reads of token rows at fixed offsets behind (and, for the adjoints, ahead of) each token.

The primitives of the DWARF dyadic family (spec dwarf.md §3 notation, §3.G–P), written once here beside
field_ops.py and shared by every module that reads rows i − o for a fixed set of offsets o:

- :func:`shifted_dot` — out[:, i, :, u] = a_i · b_{i − o_u} (the scores q_i · k_{i − o});
- :func:`shifted_sum` — out[:, i] = Σ_u w[:, i, :, u] · b_{i − o_u} (the weighted sum of value rows);

each with a hand-written backward (the same reads, behind and ahead), and beside them the naive references
(:func:`shifted_rows_reference`, :func:`shifted_dot_reference`, :func:`shifted_sum_reference`) that form the
whole (B, N, H, U, C) stack of shifted rows, which the tests compare with in float64.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

SHIFT_CHUNK_ELEMENTS = 1 << 18  # row elements per token chunk of the band products (1 MiB in fp32)
GATHER_CHUNK_ELEMENTS = 1 << 19  # gathered elements per token chunk of the sparse-offset reads (2 MiB in fp32)
SPARSE_READS = "auto"   # sparse-offset reads: gather (one indexed gather of all offsets per chunk: one kernel on a GPU)
                        # | slices (one in-cache slice product per offset: faster on a CPU) | auto (CPU: slices)
MIN_BAND_WIDTH = 16     # a dense offset prefix this wide is read as one band; narrower ones are faster one by one

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


# ---------------------------------------------------------------------------------------------------------------
# Naive references: the whole stack of shifted rows

def shifted_rows_reference(b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Stack of shifted rows (B, N, H, C) -> (B, N, H, U, C): entry u of row i is b_{i − o_u}, zero for i < o_u."""
    stack = b.new_zeros(*b.shape[:3], len(offsets), b.shape[3])
    for u, offset in enumerate(offsets):
        if offset < b.shape[1]:
            stack[:, offset:, :, u] = b[:, :b.shape[1] - offset]
    return stack


def shifted_dot_reference(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Naive :func:`shifted_dot`: a_i · (stack of shifted rows of b)_{i, u}."""
    return torch.einsum("bnhc,bnhuc->bnhu", a, shifted_rows_reference(b, offsets))


def shifted_sum_reference(weights: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Naive :func:`shifted_sum`: Σ_u weights_{i, u} · (stack of shifted rows of b)_{i, u}."""
    return torch.einsum("bnhu,bnhuc->bnhc", weights, shifted_rows_reference(b, offsets))
