"""DWARF condG–P: the dyadic-offset conditions (spec dwarf.md §3.G–P), their offset sets and naive reference.

Output i reads rows i − o at the slot offsets o of a tap set (the 44 D4 slots τ·2^j, the 24 unique dyadic offsets, or
dense+dyadic sets), weighted by a D4 field with scale gains (G, H, I), by a Q·K gather (J linear, K with
φ = elu+1 and a normaliser) or by a softmax over the slots (L, L+RP, N, P).  The reads are shift_ops'.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wavetrain.models.attention.dwarf.common import (D4_COEFFICIENTS, D4_TAPS, check_heads, choice, compute_dtype,
                                                     split_heads_by_token)
from wavetrain.models.shift_ops import shifted_dot, shifted_sum

DYADIC_SCALES = 11      # j = 0..10 (spec §3 notation, S = 11)
NORMALISER_EPS = 1e-6   # out = num / (Z + 1e-6) (spec §3.K)
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
# The module and its reference (spec §3.G–P)

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
        check_heads(dim, n_heads)
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.seq_len = seq_len
        self.layer_idx = layer_idx
        self.n_layers = n_layers
        self.gather = choice("gather", gather, ("deposit", "qk_linear", "qk_elu", "softmax"))
        self.tap_set = choice("tap_set", tap_set, ("dyadic44", "unique24", "dense_dyadic"))
        self.d4_order = choice("d4_order", d4_order, ("forward", "reversed"))
        self.scale_gains = choice("scale_gains", scale_gains, ("none", "static", "query"))
        self.pos_bias_init = choice("pos_bias_init", pos_bias_init, ("none", "zero", "alibi", "d4_warm_start"))
        self.oob_mode = choice("oob_mode", oob_mode, ("skip", "zero_key", "mask"))
        self.gate_source = choice("gate_source", gate_source, ("input", "query"))
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
        dtype = compute_dtype(q)
        prior = self.scale_gain.t().to(dtype)[None, None]
        if self.scale_gains == "static":
            return prior.softmax(-1)
        return (self.q_scale_proj(q).to(dtype) + prior).softmax(-1)

    def _slot_weights(self, q: torch.Tensor, k: torch.Tensor, plan: _TapPlan
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # Per-slot weights (B or 1, N or 1, H, T), the normaliser Z (qk_elu) and the offset-0 score (bypass).
        # Slot t at position i multiplies the value row i − o_t; zero-filled rows (i < o_t) add nothing to the
        # numerator but enter Z / the softmax as ``oob_mode`` says.
        dtype = compute_dtype(q)
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
        q, k, _ = split_heads_by_token(self.qkv, x, self.n_heads)
        weights, normaliser, _ = self._slot_weights(q, k, self._plan(x.shape[1], x.device))
        return weights.transpose(1, 2), None if normaliser is None else normaliser.transpose(1, 2)

    def offset_weights(self, x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Effective weight of each read offset, (offsets, (B or 1, H, N or 1, U)): duplicate slots summed, the
        bypass added at offset 0 and, for qk_elu, divided by Z + 1e-6. The weight output i gives row i − offset
        before the long skips, the head coupling and the gate."""
        q, k, _ = split_heads_by_token(self.qkv, x, self.n_heads)
        plan = self._plan(x.shape[1], x.device)
        return plan.offsets, self._offset_weights(q, k, plan).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        plan = self._plan(n, x.device)
        q, k, v = split_heads_by_token(self.qkv, x, self.n_heads)                # (B, N, H, C) each
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

