"""DWARF attention family (wavetrain/models/attention/dwarf/): spec dwarf.md §7 invariants T1–T9 per condition,
fast path = naive reference in fp64 (outputs and gradients), init values, shapes and parameter counts.

Each condition is read from its config, conf/attention/dwarf_<condition>.yaml (the one place it is written)."""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from causality import assert_causal, dependency_matrix, max_future_influence  # noqa: E402

from wavetrain import compose_config  # noqa: E402
from wavetrain.config import CONF_DIR  # noqa: E402
from wavetrain.models import field_ops, shift_ops  # noqa: E402
from wavetrain.models.attention.dwarf import common, dyadic, field, full  # noqa: E402
from wavetrain.models.lm import apply_init, interference_blocks  # noqa: E402


@functools.lru_cache(maxsize=None)
def condition_config(name: str) -> DictConfig:
    """The composed config of ``attention=dwarf_<name>``; ``condM_full`` is condM's (its block 5 lives there)."""
    return compose_config([f"attention=dwarf_{'condM' if name == 'condM_full' else name}"])


def condition(name: str) -> tuple[type, dict]:
    """(class, options) of a condition: its config's attention node (condM_full: condM's block-5 override)."""
    cfg = condition_config(name)
    node = cfg.model.layer_attention[-1] if name == "condM_full" else cfg.attention
    options = OmegaConf.to_container(node, resolve=True)
    return get_class(options.pop("_target_")), options


CONDITION_FILES = {p.stem.removeprefix("dwarf_"): p for p in (CONF_DIR / "attention").glob("dwarf_cond*.yaml")}
ALL = sorted(CONDITION_FILES) + ["condM_full"]
# Sorted by their class without composing every config at collection: a field condition names its class in its own
# file; every other config is a dyadic condition (condK_rp, condM inherit theirs) except condM's full block.
FIELD = [name for name, path in sorted(CONDITION_FILES.items()) if "dwarf.field.DwarfFieldAttention" in path.read_text()]
DYADIC = [name for name in sorted(CONDITION_FILES) if name not in FIELD]
U24 = [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072]
O44 = sorted(set(range(33)) | {48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536})
O74 = sorted(set(range(65)) | {96, 128, 192, 256, 384, 512, 768, 1024, 1536})


pytestmark = pytest.mark.usefixtures("single_thread")


def shell_init(module: nn.Module, std: float = 0.02) -> nn.Module:
    """What the model shell does: N(0, std²) Linear weights, zero biases, then post_init() (spec §1 init pass)."""
    apply_init(module, "normal", std)
    return module


def build(name: str, dim: int = 32, heads: int = 4, seq_len: int = 80, std: float = 0.3, layer_idx: int = 0,
          n_layers: int = 1, **override) -> nn.Module:
    """A condition at test size in fp64. Linear weights get a large std so scores and gates are far from their
    init-time near-constants (the invariants must hold for any weights); stretch-layout fields use G = 2·seq_len."""
    torch.manual_seed(0)
    cls, options = condition(name)
    if cls is field.DwarfFieldAttention and options.get("field_layout") == "stretch":
        options["field_size"] = 2 * seq_len
    options.update(override)
    module = cls(dim=dim, n_heads=heads, seq_len=seq_len, layer_idx=layer_idx, n_layers=n_layers, **options)
    shell_init(module, std)
    return module.double().eval()


def reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, field.DwarfFieldAttention):
        return field.dwarf_field_reference(module, x)
    if isinstance(module, dyadic.DwarfDyadicAttention):
        return dyadic.dwarf_dyadic_reference(module, x)
    return full.dwarf_full_attention_reference(module, x)


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def expose_mixing(module: nn.Module) -> nn.Module:
    """Gate ≡ 1 (σ(40) rounds to 1 in fp32 and fp64) and out_proj = identity: module(x) is the mixed per-head
    output itself (spec §7 T2: 'set the gate to a constant, e.g. by stubbing')."""
    with torch.no_grad():
        module.gate_proj.weight.zero_()
        module.gate_proj.bias.fill_(40.0)
        module.out_proj.weight.copy_(torch.eye(module.out_proj.weight.shape[0]))
        module.out_proj.bias.zero_()
    return module


def dependency_rows(module: nn.Module, x: torch.Tensor, rows: list[int]) -> dict[int, set[int]]:
    """Exact read set {j : ∂y_i/∂x_j ≠ 0} of a few output rows i (the per-row step of causality.dependency_matrix,
    same random-probe gradient, without computing all N rows)."""
    sets = {}
    for i in rows:
        xi = x.detach().clone().requires_grad_(True)
        y = module(xi)
        probe = torch.randn(y.shape[0], y.shape[2], dtype=y.dtype, generator=torch.Generator().manual_seed(i))
        (grad,) = torch.autograd.grad((y[:, i] * probe).sum(), xi)
        sets[i] = set(grad.abs().sum(dim=(0, 2)).nonzero().flatten().tolist())
    return sets


def expected_offsets(name: str) -> list[int]:
    """Read offsets of each dyadic condition (spec §7 T2); condH adds its skips on the propagated field."""
    if name in ("condN", "condM"):
        return O44
    if name == "condP":
        return O74
    if name == "condH":
        return sorted(set(U24) | {d + o for d in (512, 1024) for o in U24})
    return U24


# ------------------------------------------------------------------------------------------------ fast == reference

@pytest.mark.parametrize("name", ALL + ["condH_long"])
def test_fast_path_equals_reference_fp64_with_gradients(name):
    if name == "condH_long":     # N beyond both long skips (512, 1024), so they take part
        module, x = build("condH", dim=16, heads=2, seq_len=1100), randn(1, 1100, 16)
    else:
        module, x = build(name, seq_len=40), randn(2, 40, 32)
    x.requires_grad_(True)
    y_fast = module(x)
    y_ref = reference(module, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-12)
    probe = randn(*y_fast.shape, seed=2)
    params = [p for p in module.parameters()]
    grads_fast = torch.autograd.grad((y_fast * probe).sum(), [x, *params], allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x, *params], allow_unused=True)
    names = ["x"] + [n for n, _ in module.named_parameters()]
    for label, fast, ref, value in zip(names, grads_fast, grads_ref, [x, *params]):
        # a parameter one path never touches (condH's skips at N ≤ 512) has None there and zeros in the other
        fast = torch.zeros_like(value) if fast is None else fast
        ref = torch.zeros_like(value) if ref is None else ref
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("offsets", [U24, O44, [0, 1, 2, 3, 5, 9, 17, 33], list(range(20)) + [21, 40]],
                         ids=["U24", "O44_band", "sparse_only", "band_plus_far"])
@pytest.mark.parametrize("chunks", ["one_chunk", "many_chunks"])
@pytest.mark.parametrize("reads", ["gather", "slices"])
def test_shifted_products_equal_naive_reads(offsets, chunks, reads, monkeypatch):
    """shifted_dot / shifted_sum (band windows + sparse gather or slices, spec §3 reads) equal the naive stack of
    shifted rows in fp64, forward and gradients, whether one chunk or many (offsets past N read zero rows)."""
    monkeypatch.setattr(shift_ops, "SPARSE_READS", reads)
    if chunks == "many_chunks":
        monkeypatch.setattr(shift_ops, "SHIFT_CHUNK_ELEMENTS", 7 * 2 * 3 * 5)
        monkeypatch.setattr(shift_ops, "GATHER_CHUNK_ELEMENTS", 5 * 2 * 3 * 5 * len(offsets))
    n = 45
    offsets = [o for o in offsets if o < n]
    a, b = randn(2, n, 3, 5, seed=3).requires_grad_(True), randn(2, n, 3, 5, seed=4).requires_grad_(True)
    weights = randn(2, n, 3, len(offsets), seed=5).requires_grad_(True)
    cases = [(shift_ops.shifted_dot(a, b, offsets), shift_ops.shifted_dot_reference(a, b, offsets), (a, b)),
             (shift_ops.shifted_sum(weights, b, offsets), shift_ops.shifted_sum_reference(weights, b, offsets),
              (weights, b))]
    for fast, naive, inputs in cases:
        torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-12)
        probe = randn(*fast.shape, seed=6)
        for grad_fast, grad_naive in zip(torch.autograd.grad((fast * probe).sum(), inputs),
                                         torch.autograd.grad((naive * probe).sum(), inputs)):
            torch.testing.assert_close(grad_fast, grad_naive, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["condA", "condB", "condC", "condD", "condF"])
def test_field_kernels_match_spec_formula(name):
    module = build(name, seq_len=40)
    torch.testing.assert_close(module.kernels(), field.dwarf_field_kernel_reference(module), rtol=1e-10, atol=1e-13)
    if not module.dispersion:
        assert torch.allclose(module.kernels().abs().sum(-1), torch.ones(4, dtype=torch.float64))


def test_dispersion_truncation_is_live_and_convolution_linear():
    """condB (spec §3.B, §7 T1): the rotated spectrum has energy at t ≥ G (negative lags) that must be cut, and the
    conv of the kept kernel is the linear causal sum (no wrap)."""
    module = build("condB", seq_len=40)
    size = module.field_size
    base = field.DwarfFieldAttention(dim=32, n_heads=4, seq_len=40, field_size=size).double()
    with torch.no_grad():
        for attr in ("wave_frequency", "wave_damping", "wave_phase"):
            getattr(base, attr).copy_(getattr(module, attr))
        kernel = base.kernels()
        spectrum = torch.fft.rfft(kernel, n=2 * size)
        phase = 2 * math.pi * module.wave_dispersion[:, None] * (torch.arange(size + 1) / size) ** 2
        full = torch.fft.irfft(spectrum * torch.polar(torch.ones_like(phase), phase), n=2 * size)
    assert full[:, size:].abs().max() > 1e-3
    torch.testing.assert_close(module.kernels(), full[:, :size])
    signal = randn(3, 4, size)
    torch.testing.assert_close(field_ops.causal_fft_conv(signal, module.kernels()[None]),
                               field_ops.causal_conv_reference(signal, module.kernels()[None]))


def test_full_attention_matches_standard_sdpa_path():
    module = build("condM_full", seq_len=40)
    x = randn(2, 40, 32)
    torch.testing.assert_close(module(x), full.dwarf_full_attention_reference(module, x))


@pytest.mark.parametrize("name", ALL)
def test_shortest_inputs(name):
    """N = 1 and 2: one and two read rows, every offset beyond N out of range."""
    module = build(name, seq_len=40)
    for n in (1, 2):
        x = randn(2, n, 32)
        torch.testing.assert_close(module(x), reference(module, x), rtol=1e-10, atol=1e-12)


def test_tap_plan_cache_is_bounded_and_length_independent():
    """Decoding visits every length: at most PLAN_CACHE_SIZE plans stay cached, and a re-built plan gives the
    same output (mask mode is prefix-consistent, so every length reproduces the full run's rows)."""
    module = build("condN", seq_len=40)
    x = randn(1, 40, 32)
    full = module(x)
    for n in range(1, 41):
        torch.testing.assert_close(module(x[:, :n]), full[:, :n])
    assert len(module._plans) == dyadic.PLAN_CACHE_SIZE


# ------------------------------------------------------------------------------------------------ T1 causality

@pytest.mark.parametrize("name", ALL)
def test_t1_module_causality_fp64(name):
    """Perturbing x[:, p:] never changes y[:, :p] (N fixed: A–D's stride depends on N)."""
    module = build(name, seq_len=40)
    assert_causal(module, n=40, dim=32)


@pytest.mark.parametrize("name", FIELD + ["condM_full"])
def test_t1_gradient_causality(name):
    """∂y_i/∂x_j = 0 for j > i: exactly for SDPA, to fp64 FFT round-off (1e-15 of the causal entries) for fields."""
    dep = dependency_matrix(build(name, seq_len=24), randn(1, 24, 32))
    assert dep.triu(1).max() <= 1e-13 * dep.max()
    assert (dep.diagonal() > 0).all()


@pytest.mark.parametrize("name", ["condA", "condD"])
def test_t1_published_field_size_causal_at_n_2048(name):
    """G = 4096 (the published condA–D field) at N = 2048: stride 4095/2047 ≥ 2, probed at the last cut points
    where the clamp to G − 2 sits (spec §3.A)."""
    module = build(name, dim=16, heads=2, seq_len=2048, field_size="auto")
    assert module.field_size == 4096
    x = randn(1, 2048, 16)
    assert max_future_influence(module, x, positions=[1, 1000, 2046, 2047]) < 1e-12


@pytest.mark.parametrize("name", ["condE", "condF"])
def test_t1_reference_layout_of_e_f_leaks(name):
    """The published E/F layout (G = seq_len stretched over N = seq_len − 1: stride in (1, 2)) reads token i+1 at
    token i (spec §0); the default stride1 layout of the same condition is causal."""
    with pytest.warns(UserWarning, match="leaks future tokens"):
        leaky = build(name, seq_len=64, field_layout="reference")
    x = randn(1, 63, 32)
    stride = field_ops.field_stride(leaky.field_size, 63)
    assert 1 < stride < 2
    assert max_future_influence(leaky, x, positions=list(range(1, 63))) > 1e-3
    with pytest.raises(ValueError, match="breaks causality"):
        field_ops.check_field_causality(leaky.field_size, 63)
    # at N = seq_len the stride is exactly 1 and only the clamped last token leaks (spec §0)
    x_full = randn(1, 64, 32)
    assert max_future_influence(leaky, x_full, positions=[63]) > 1e-3
    assert max_future_influence(leaky, x_full, positions=list(range(1, 63))) < 1e-12
    valid = build(name, seq_len=64)
    assert valid.field_size == 65 and valid.field_layout == "stride1"
    assert max_future_influence(valid, x_full) < 1e-12


def test_stretch_layout_is_the_spec_formula():
    """p_i = clamp(i·(G−1)/max(N−1, 1), 0, G−2) in fp32, lower = ⌊p⌋, frac = p − lower (spec §3.A step 3): at
    G = 4096, N = 2048 the last token is clamped to cell 4094 with fraction 0."""
    module = field.DwarfFieldAttention(dim=16, n_heads=2, seq_len=2048)
    for n in (2048, 1000, 1):
        lower, frac = module.layout(n)
        stride = torch.tensor((4096 - 1) / max(n - 1, 1), dtype=torch.float32)
        position = (torch.arange(n, dtype=torch.float32) * stride).clamp(0, 4094)
        assert torch.equal(lower, position.floor().long()) and torch.equal(frac, position - position.floor())
    lower, frac = module.layout(2048)
    assert int(lower[-1]) == 4094 and float(frac[-1]) == 0.0
    stride1 = field.DwarfFieldAttention(dim=16, n_heads=2, seq_len=2048, field_layout="stride1")
    lower, frac = stride1.layout(2048)
    assert torch.equal(lower, torch.arange(2048)) and (frac == 0).all() and stride1.field_size == 2049


@pytest.mark.parametrize("name", ["condG", "condH", "condI", "condJ", "condK"])
def test_d4_tap_order_per_condition(name):
    """spec §6 D6: G, H, I put h_{3−τ} at offset τ·2^j (the code's reversal), J and K put h_τ there."""
    module = build(name, seq_len=64)
    h = common.D4_COEFFICIENTS
    expected = h[::-1] if name in ("condG", "condH", "condI") else h
    for slot, (scale, tap, offset) in enumerate(dyadic.dyadic_slots()):
        assert module.slot_offsets[slot] == offset and module.slot_scales[slot] == scale
        assert module.slot_coefficients[slot] == expected[tap]


def test_field_size_auto_and_guards():
    """auto is G = 2·seq_len: the published 4096 at seq_len 2048, proportionally smaller or larger elsewhere
    (stride > 2 at every N); unsafe explicit sizes and over-long inputs raise."""
    assert field.DwarfFieldAttention(dim=16, n_heads=2, seq_len=2048).field_size == 4096
    assert field.DwarfFieldAttention(dim=16, n_heads=2, seq_len=64).field_size == 128
    assert field.DwarfFieldAttention(dim=16, n_heads=2, seq_len=2049).field_size == 4098
    long_module = field.DwarfFieldAttention(dim=16, n_heads=2, seq_len=16384)
    assert long_module.field_size == 32768
    for n in (2, 3, 100, 8191, 8192, 12000, 16383, 16384):
        field_ops.check_field_causality(32768, n)
    with pytest.raises(ValueError, match="field_size=4096"):
        field.DwarfFieldAttention(dim=16, n_heads=2, seq_len=2049, field_size=4096)
    module = build("condA", seq_len=40)
    with pytest.raises(ValueError, match="seq_len=40"):
        module(randn(1, 41, 32))
    with pytest.raises(ValueError, match="stride1"):
        field.DwarfFieldAttention(dim=16, n_heads=2, seq_len=64, field_layout="stride1", field_size=128)


def test_stretch_layout_every_length_causal_for_auto_size():
    seq_len = 600
    size = field.DwarfFieldAttention(dim=16, n_heads=2, seq_len=seq_len).field_size
    for n in range(1, seq_len + 1):
        field_ops.check_field_causality(size, n)


# ------------------------------------------------------------------------------------------------ T2 dependency sets

@pytest.mark.parametrize("name", [n for n in DYADIC if n not in ("condK_rp", "condM")])
def test_t2_exact_dependency_set_small_n(name):
    """Every row of the dependency matrix at N = 70: output i reads exactly i − o for o in the offset set."""
    module = expose_mixing(build(name, seq_len=70))
    dep = dependency_matrix(module, randn(1, 70, 32))
    offsets = expected_offsets(name)
    expected = torch.zeros(70, 70, dtype=torch.bool)
    for i in range(70):
        expected[i, [i - o for o in offsets if o <= i]] = True
    assert torch.equal(dep != 0, expected)


@pytest.mark.parametrize("name", [n for n in DYADIC if n not in ("condK_rp", "condM")])
def test_t2_exact_dependency_set_beyond_3072(name):
    """Rows 3100 and 3500 of N = 3584 (D = 16): the read set is exactly i − (offset set ∩ [0, i]), with 3072 in
    range for the dyadic sets (spec §7 T2)."""
    module = build(name, dim=16, heads=2, seq_len=3584)
    rows = dependency_rows(module, randn(1, 3584, 16), [3100, 3500])
    for i, read in rows.items():
        assert read == {i - o for o in expected_offsets(name) if o <= i}, name


def test_t2_full_attention_reads_every_earlier_position():
    rows = dependency_rows(build("condM_full", dim=16, heads=2, seq_len=3584), randn(1, 3584, 16), [3100])
    assert rows[3100] == set(range(3101))


# ------------------------------------------------------------------------------------------------ T3 coverage

def test_t3_dyadic_coverage():
    slots = dyadic.dyadic_slots()
    assert len(slots) == 44 and [4 * j + tau for j, tau, _ in slots] == list(range(44))
    offsets = [o for _, _, o in slots]
    assert sorted(set(offsets)) == U24 == dyadic.dyadic_unique_offsets() and max(offsets) == 3072
    counts = {o: offsets.count(o) for o in U24}
    assert counts[0] == 11 and counts[1] == 1 and counts[2048] == 1
    assert all(counts[2 ** m] == 2 for m in range(1, 11))
    assert all(counts[3 * 2 ** j] == 1 for j in range(11))
    assert sum(counts.values()) == 44
    assert dyadic.dense_dyadic_offsets(32, 1536) == O44 and len(O44) == 44
    assert dyadic.dense_dyadic_offsets(64, 1536) == O74 and len(O74) == 74


# ------------------------------------------------------------------------------------------------ T4 normaliser

@pytest.mark.parametrize("name", ["condK", "condK_rp"])
def test_t4_normaliser_positive(name):
    module = build(name, seq_len=70).float()
    for sign in (1.0, -1.0):
        with torch.no_grad():
            module.qkv.weight[:32].mul_(sign * 3.0)      # scale q: |q·k| in the tens, both signs
        x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(3))
        _, normaliser = module.tap_weights(x)
        q, k, _ = common.split_heads(module.qkv, x, module.n_heads)
        assert (q @ k.transpose(-1, -2)).min() < -20
        assert (normaliser > 0).all()
        assert torch.isfinite(module(x)).all()


# ------------------------------------------------------------------------------------------------ T5 OPWF

def _opwf(module: dyadic.DwarfDyadicAttention, x: torch.Tensor) -> torch.Tensor:
    """q_i @ Σ_{j,τ} g_{i,j} h_τ (k_{i−o} ⊗ v_{i−o}) + Σ g h b_t v_{i−o} + β (q_i·k_i) v_i, outer products explicit."""
    batch, n, dim = x.shape
    q, k, v = common.split_heads(module.qkv, x, module.n_heads)
    gains = (module.q_scale_proj(q) + module.scale_gain.t()[None, :, None, :]).softmax(-1)
    out = torch.zeros_like(v)
    for i in range(n):
        state = torch.zeros(batch, module.n_heads, module.head_dim, module.head_dim, dtype=x.dtype)
        bias_term = torch.zeros(batch, module.n_heads, module.head_dim, dtype=x.dtype)
        for slot, (scale, tap, offset) in enumerate(dyadic.dyadic_slots()):
            if offset > i:
                continue
            weight = gains[:, :, i, scale, None] * common.D4_COEFFICIENTS[tap]
            state = state + weight[..., None] * k[:, :, i - offset, :, None] * v[:, :, i - offset, None, :]
            if hasattr(module, "pos_bias"):
                bias_term = bias_term + weight * module.pos_bias[slot][None, :, None] * v[:, :, i - offset]
        beta = nn.functional.softplus(module.identity_bypass)[None, :, None]
        self_term = beta * (q[:, :, i] * k[:, :, i]).sum(-1, keepdim=True) * v[:, :, i]
        out[:, :, i] = (q[:, :, i, None, :] @ state).squeeze(-2) + bias_term + self_term
    return out.transpose(1, 2).reshape(batch, n, dim)


@pytest.mark.parametrize("variant", ["condJ", "condK_linear"])
def test_t5_opwf_equality(variant):
    """condJ's factored Q·K gather = the explicit outer-product field (fp32, 1e-5); condK with φ = identity and no
    normaliser (gather=qk_linear, keeping its pos_bias, here random) likewise (spec §7 T5)."""
    override = {"gather": "qk_linear"} if variant == "condK_linear" else {}
    module = expose_mixing(build("condJ" if variant == "condJ" else "condK", dim=16, heads=2, seq_len=64,
                                 **override)).float()
    if hasattr(module, "pos_bias"):
        with torch.no_grad():
            module.pos_bias.normal_(0.0, 0.5)
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(module(x), _opwf(module, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ T6 softmax rows

@pytest.mark.parametrize("name", ["condL", "condL_rp", "condN", "condP"])
def test_t6_softmax_rows(name):
    module = build(name, seq_len=70)
    weights, normaliser = module.tap_weights(randn(2, 70, 32))
    assert normaliser is None
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))
    offsets = torch.tensor(module.slot_offsets)
    future = torch.arange(70)[:, None] < offsets[None, :]            # (N, T): key i − o does not exist
    if name in ("condN", "condP"):
        assert (weights[:, :, future] == 0).all()                   # mask: exactly 0
    else:
        assert (weights[:, :, future] > 0).all()                    # zero_key: the slot stays, score = pos_bias
        assert (offsets >= 70).any()


def test_oob_modes_differ_only_where_keys_are_missing():
    """spec §6 D7: skip drops slots with offset ≥ N, zero_key keeps them (score = bias), mask drops every i < o."""
    x = randn(1, 40, 32)
    outputs = {mode: build("condK", seq_len=40, oob_mode=mode)(x) for mode in ("skip", "zero_key", "mask")}
    for a, b in (("skip", "zero_key"), ("skip", "mask"), ("zero_key", "mask")):
        assert (outputs[a] - outputs[b]).abs().max() > 1e-6
    # mask reads no zero-filled key, so its output does not depend on N (prefix consistency)
    masked = build("condK", seq_len=40, oob_mode="mask")
    torch.testing.assert_close(masked(x[:, :20]), masked(x)[:, :20])
    # skip (the published condK) keeps φ(pos_bias) of zero-filled in-range slots in Z, so y_i depends on N
    skipped = build("condK", seq_len=40)
    assert (skipped(x[:, :20]) - skipped(x)[:, :20]).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------------ T7 init values

def test_t7_init_values():
    six = [build("condK", dim=256, heads=8, seq_len=64, std=0.02, layer_idx=layer, n_layers=6) for layer in range(6)]
    k0, k5 = six[0], six[5]
    torch.testing.assert_close(nn.functional.softplus(k0.identity_bypass),
                               torch.full((8,), 0.018149, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (k0.scale_gain[:4] == 0.5).all() and (k0.scale_gain[4:] == 0).all()
    assert (k5.scale_gain[8:] == 0.5).all() and (k5.scale_gain[:8] == 0).all()
    torch.testing.assert_close(six[2].scale_gain[:4], torch.full((4, 8), 0.3, dtype=torch.float64))
    assert 0.006 < k0.q_scale_proj.weight.std().item() < 0.014               # N(0, 0.01) after the init pass
    assert (k0.pos_bias == 0).all() and k0.pos_bias.shape == (44, 8)
    condn = build("condN", dim=256, heads=8, seq_len=64, std=0.02)
    assert math.isclose(condn.pos_bias[1, 7].item(), -2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(condn.pos_bias[1, 0].item(), -0.2 * math.log(2), rel_tol=1e-6)
    lrp = build("condL_rp", dim=256, heads=8, seq_len=64, std=0.02)
    assert lrp.slot_offsets == U24
    assert abs(lrp.pos_bias[1, 3].item() - 0.300) < 1e-6 and abs(lrp.pos_bias[23, 3].item() + 0.300) < 1e-6
    assert (lrp.pos_bias == lrp.pos_bias[:, :1]).all()
    h = build("condH", dim=256, heads=8, seq_len=64, std=0.02)
    assert (h.long_skip_weight == -4).all() and h.long_skips == [512, 1024]
    coupling = build("condG", dim=256, heads=8, seq_len=64, std=0.02).field_coupling
    assert (coupling - torch.eye(8, dtype=torch.float64)).abs().max() < 0.06


@pytest.mark.parametrize("name, bias", [("condA", 0.0), ("condE", 0.0), ("condG", 0.0), ("condH", 2.0),
                                        ("condI", 0.0), ("condJ", 0.0), ("condK", 0.0), ("condL", 0.0),
                                        ("condL_rp", 0.0), ("condN", 2.0), ("condP", 2.0), ("condM_full", 2.0)])
def test_t7_effective_gate_bias(name, bias):
    """The gate bias that survives the shell's init pass (spec §6 D1): 2.0 only in H, M, N, P."""
    module = build(name, seq_len=64, std=0.02)
    assert (module.gate_proj.bias == bias).all()


def test_t7_field_inits():
    a = build("condA", dim=256, heads=8, seq_len=64, std=0.02)
    close = dict(rtol=1e-6, atol=1e-7)           # parameters are created in fp32
    torch.testing.assert_close(a.wave_frequency, 10 ** (-1 + 2 * torch.arange(8, dtype=torch.float64) / 7), **close)
    torch.testing.assert_close(a.wave_damping, torch.linspace(-2, 0, 8, dtype=torch.float64), **close)
    torch.testing.assert_close(a.wave_phase, torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8, **close)
    f = build("condF", dim=256, heads=8, seq_len=64, std=0.02)
    torch.testing.assert_close(f.wave_damping, torch.linspace(-8, -1, 8, dtype=torch.float64), **close)
    assert f.damping_floor == 0.001
    assert (build("condB", dim=256, heads=8, seq_len=64).wave_dispersion == 1).all()
    c = build("condC", dim=256, heads=8, seq_len=64, std=0.02)
    centres = torch.linspace(0, 11, 8, dtype=torch.float64)[:, None]
    expected = torch.exp(-0.5 * ((torch.arange(12, dtype=torch.float64)[None] - centres) / 3) ** 2) + 0.5
    torch.testing.assert_close(c.wavelet_gains, expected, **close)
    for layer in (0, 3, 5):
        d = build("condD", dim=256, heads=8, seq_len=64, std=0.02, layer_idx=layer, n_layers=6)
        assert math.isclose(d.wavelet_gains.mean().item(), 0.458 * 0.864 ** layer, rel_tol=1e-6)
        torch.testing.assert_close(d.wavelet_gains / d.wavelet_gains[0, 0], expected / expected[0, 0], **close)
        torch.testing.assert_close(d.kdv_alpha, torch.full((8,), 0.05, dtype=torch.float64), **close)


# ------------------------------------------------------------------------------------------------ T8 shapes

SHAPES = {
    "condA": {"wave_frequency": (8,), "wave_damping": (8,), "wave_phase": (8,), "field_coupling": (8, 8)},
    "condB": {"wave_dispersion": (8,), "field_coupling": (8, 8)},
    "condC": {"wavelet_gains": (8, 12), "field_coupling": (8, 8)},
    "condD": {"wavelet_gains": (8, 12), "kdv_alpha": (8,), "field_coupling": (8, 8)},
    "condG": {"scale_gain": (11, 8), "field_coupling": (8, 8)},
    "condH": {"scale_gain": (11, 8), "field_coupling": (8, 8), "long_skip_weight": (2,)},
    "condI": {"scale_gain": (11, 8), "q_scale_proj.weight": (11, 32), "field_coupling": (8, 8)},
    "condJ": {"scale_gain": (11, 8), "q_scale_proj.weight": (11, 32), "identity_bypass": (8,)},
    "condK": {"scale_gain": (11, 8), "q_scale_proj.weight": (11, 32), "identity_bypass": (8,), "pos_bias": (44, 8)},
    "condL": {"pos_bias": (44, 8)},
    "condL_rp": {"pos_bias": (24, 8)},
    "condN": {"pos_bias": (44, 8)},
    "condP": {"pos_bias": (74, 8)},
}


@pytest.mark.parametrize("name", ALL)
def test_t8_shapes(name):
    cls, options = condition(name)
    module = cls(dim=256, n_heads=8, seq_len=64, **options)
    params = dict(module.named_parameters())
    for param, shape in SHAPES.get(name, {}).items():
        assert tuple(params[param].shape) == shape, param
    assert module(torch.randn(2, 37, 256)).shape == (2, 37, 256)


# ------------------------------------------------------------------------------------------------ T9 parameter counts

BASE = 197_376 + 65_792 + 65_792          # qkv + out_proj + gate_proj (spec §1 building blocks)
ATTENTION_PARAMS = {
    "condA": BASE + 24 + 64, "condE": BASE + 24 + 64, "condF": BASE + 24 + 64,
    "condB": BASE + 24 + 64 + 8,
    "condC": BASE + 96 + 64, "condD": BASE + 96 + 64 + 8,
    "condG": BASE + 88 + 64, "condH": BASE + 88 + 64 + 2,
    "condI": BASE + 88 + 64 + 352, "condJ": BASE + 88 + 352 + 8,
    "condK": BASE + 88 + 352 + 8 + 352, "condK_rp": BASE + 88 + 352 + 8 + 352,
    "condL": BASE + 352, "condL_rp": BASE + 192, "condN": BASE + 352, "condM": BASE + 352, "condP": BASE + 592,
    "condM_full": BASE,
}
# spec §1 table (13M models): token embedding + position rows + final LN + 6 × (LN1+LN2+FFN) + pooling units
MODEL_PARAMS = {"condA": 13_326_352, "condB": 13_326_400, "condC": 13_326_784, "condD": 13_326_832,
                "condE": 14_115_344, "condF": 14_115_344, "condG": 14_115_728, "condI": 14_117_840,
                "condJ": 14_117_504, "condK": 13_855_424, "condK_rp": 14_119_616, "condL": 13_852_736,
                "condL_rp": 14_115_968, "condM": 13_984_480, "condN": 14_116_928, "condP": 14_118_368}


def _count(name: str) -> int:
    cls, options = condition(name)
    module = cls(dim=256, n_heads=8, seq_len=2048, **options)
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ALL)
def test_t9_attention_parameter_count(name):
    assert _count(name) == ATTENTION_PARAMS[name]


@pytest.mark.parametrize("name", list(MODEL_PARAMS))
def test_t9_model_totals_from_building_blocks(name):
    """The spec's 13M totals follow from these modules plus the shell settings of each condition's config (position
    rows, pooling blocks, the hybrid's block-5 attention)."""
    shell = condition_config(name).model
    rows = 0 if shell.position == "none" else 2050
    pooling_blocks = interference_blocks(shell.interference, 6) if shell.get("interference") else []
    full_blocks = {int(block) % 6 for block in shell.get("layer_attention") or {}}
    blocks = [_count("condM_full" if b in full_blocks else name) for b in range(6)]
    total = 8_192_000 + rows * 256 + 512 + 6 * (1_024 + 525_568) + 132_096 * len(pooling_blocks)
    assert total + sum(blocks) == MODEL_PARAMS[name]


# ------------------------------------------------------------------------------------------------ dtypes, options

@pytest.mark.parametrize("name", ["condA", "condB", "condD", "condE", "condH", "condK", "condL", "condP",
                                  "condM_full"])
def test_bf16_autocast_close_to_fp32(name):
    cls, options = condition(name)
    torch.manual_seed(0)
    module = cls(dim=32, n_heads=4, seq_len=64, **options).eval()
    x = torch.randn(2, 64, 32)
    reference_out = module(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = module(x)
    assert torch.isfinite(out).all()
    scale = reference_out.abs().max()
    assert (out.float() - reference_out).abs().max() < 0.05 * scale


@pytest.mark.parametrize("options, message", [
    ({"gather": "qk_elu", "tap_set": "dense_dyadic", "scale_gains": "query"}, "tap_set=dyadic44"),
    ({"gather": "softmax", "scale_gains": "query"}, "scale_gains=none"),
    ({"gather": "softmax", "identity_bypass": True}, "identity_bypass"),
    ({"gather": "deposit", "tap_set": "dyadic44", "scale_gains": "static", "pos_bias_init": "zero"}, "deposit"),
    ({"long_skips": [0]}, "long_skips"),
    ({"oob_mode": "wrap"}, "oob_mode"),
    ({"pos_bias_init": "d4_warm_start"}, "d4_warm_start"),
])
def test_invalid_dyadic_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        dyadic.DwarfDyadicAttention(dim=32, n_heads=4, seq_len=64, **options)


def test_conditions_are_complete():
    """Every published condition has its config (spec §3, §4)."""
    expected = {f"cond{c}" for c in "ABCDEFGHIJKLMNP"} | {"condK_rp", "condL_rp", "condM_full"}
    assert expected <= set(ALL)


# ------------------------------------------------------------------------------------------------ plots

class _TinyDwarfModel(nn.Module):
    """Embedding + a stack of DWARF attention modules: enough structure for the plotting code."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 32)
        self.layers = nn.ModuleList([build(name, seq_len=64).float() for name in ("condA", "condG", "condK",
                                                                                   "condL_rp", "condN")])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_dwarf_plots_main_writes_every_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import wavetrain
    from omegaconf import OmegaConf
    from wavetrain.analysis import dwarf_plots

    model = _TinyDwarfModel().eval()
    monkeypatch.setattr(wavetrain, "load_model", lambda path: (model, OmegaConf.create({"seq_len": 64})))
    assert dwarf_plots.main(["unused.ckpt", "--out", str(tmp_path)]) == 0
    names = {"scale_gains.png", "position_bias.png", "offset_weights.png", "field_kernels.png", "head_coupling.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    assert all((tmp_path / name).stat().st_size > 10_000 for name in names)
    inputs = dwarf_plots.attention_inputs(model, torch.randint(50, (1, 64)))
    assert len(inputs) == 4 and all(x.shape == (1, 64, 32) for x in inputs.values())


# ------------------------------------------------------------------------------------------------ Hydra configs

def test_condition_classes():
    assert all(condition(name)[0] is field.DwarfFieldAttention for name in FIELD)
    assert all(condition(name)[0] is dyadic.DwarfDyadicAttention for name in DYADIC)
    assert condition("condM_full")[0] is full.DwarfFullAttention


@pytest.mark.parametrize("name", ALL)
def test_condition_configs_instantiate(name):
    """conf/attention/dwarf_<name>.yaml instantiates through Hydra at the 13M shape with the spec's parameter count,
    and names every option of its class (no option left to a silent Python default)."""
    import inspect

    from hydra.utils import instantiate

    cls, options = condition(name)
    keyword_only = {p.name for p in inspect.signature(cls.__init__).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(options) == keyword_only
    cfg = condition_config(name)
    node = cfg.model.layer_attention[-1] if name == "condM_full" else cfg.attention
    module = instantiate(node, dim=256, n_heads=8, seq_len=2048)
    assert sum(p.numel() for p in module.parameters()) == ATTENTION_PARAMS[name]


@pytest.mark.parametrize("target", ["wavetrain.models.attention.dwarf.DwarfFieldAttention",
                                    "wavetrain.models.attention.dwarf.DwarfDyadicAttention",
                                    "wavetrain.models.attention.dwarf.DwarfFullAttention"])
def test_pre_package_targets_still_resolve(target):
    """Checkpoints store the composed config, whose _target_ named the classes in the former dwarf.py module: those
    paths still instantiate the same classes (load_model rebuilds the model from them)."""
    from hydra.utils import instantiate

    module = instantiate({"_target_": target}, dim=32, n_heads=4, seq_len=64)
    assert type(module).__name__ == target.rsplit(".", 1)[1]
    assert type(module).__module__.startswith("wavetrain.models.attention.dwarf.")
