"""Wave Field V3.5: field layout primitives, attention, FIM and diagnostics (spec wavefield.md §2, §1.1, §6, §7.1)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from causality import assert_causal, dependency_matrix, max_future_influence  # noqa: E402

from wavetrain.analysis import wavefield_diagnostics as diagnostics  # noqa: E402
from wavetrain.models.attention.field_interference import FieldInterference  # noqa: E402
from wavetrain.models.attention.wavefield import WaveFieldAttention, wavefield_reference  # noqa: E402
from wavetrain.models.field_ops import (  # noqa: E402
    auto_field_size,
    bilinear_gather,
    bilinear_positions,
    bilinear_scatter,
    causal_conv_reference,
    causal_fft_conv,
    check_field_causality,
    field_stride,
    layout_buffers,
    next_fast_len,
)

DIM, HEADS = 32, 8


pytestmark = pytest.mark.usefixtures("single_thread")


def _attention(seq_len: int, field_size: int | str, dim: int = DIM, heads: int = HEADS, seed: int = 0,
               **options) -> WaveFieldAttention:
    torch.manual_seed(seed)
    return WaveFieldAttention(dim=dim, n_heads=heads, seq_len=seq_len, **options, field_size=field_size)


def _bypass_guard(seq_len: int, field_size: int, max_seq_len: int) -> WaveFieldAttention:
    """A module on a layout the constructor would refuse (negative controls): build a valid one, then swap the
    layout attributes the forward reads."""
    module = _attention(seq_len, "auto")
    module.field_size, module.max_seq_len = field_size, max_seq_len
    module.field_stride = field_stride(field_size, max_seq_len)
    module.field_lower, module.field_frac_bits = layout_buffers(seq_len, module.field_stride, field_size)
    return module


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ layout primitives

def test_stride_of_the_published_configs_is_exact():
    assert field_stride(1024, 129) == 1023 / 128 == 7.9921875
    assert _attention(128, 1024).field_stride == 1023 / 128
    assert _attention(256, 1024).field_stride == 1023 / 256
    assert field_stride(5, 1) == 4.0  # max(M − 1, 1) guards M = 1


def test_bilinear_positions_follow_the_spec_formula():
    lower, frac = bilinear_positions(6, 2.5, 12)
    assert lower.dtype == torch.long and frac.dtype == torch.float32
    assert lower.tolist() == [0, 2, 5, 7, 10, 10]  # 12.5 clamps to G − 2 = 10
    assert frac.tolist() == [0.0, 0.5, 0.0, 0.5, 0.0, 0.0]


def test_scatter_accumulates_collisions_and_gather_is_its_adjoint():
    lower = torch.tensor([0, 0, 2, 3])
    frac = torch.tensor([0.25, 0.25, 0.0, 0.5])
    values = _randn(2, 3, 4, 5)
    field = bilinear_scatter(values, lower, frac, 6)
    assert field.shape == (2, 3, 6, 5) and field.dtype == torch.float64
    torch.testing.assert_close(field[:, :, 0], 0.75 * (values[:, :, 0] + values[:, :, 1]), rtol=0, atol=1e-15)
    torch.testing.assert_close(field[:, :, 1], 0.25 * (values[:, :, 0] + values[:, :, 1]), rtol=0, atol=1e-15)
    torch.testing.assert_close(field[:, :, 4], 0.5 * values[:, :, 3], rtol=0, atol=1e-15)
    assert field[:, :, 5].abs().max() == 0
    probe = _randn(2, 3, 6, 5, seed=1)
    lhs = (field * probe).sum()
    rhs = (values * bilinear_gather(probe, lower, frac)).sum()
    assert abs(float(lhs - rhs)) < 1e-12
    assert bilinear_scatter(values.to(torch.bfloat16), lower, frac, 6).dtype == torch.float32


@pytest.mark.parametrize("field_size, max_seq_len, n_positions", [
    (1024, 129, None),   # char benchmark (s = 7.99)
    (1024, 257, None),   # BPE benchmark (s = 3.996)
    (1024, 514, 512),    # 100M script: safe for its 512-token inputs only because fractions are k/171
    (4096, 2048, None),  # DWARF condA (s ≈ 2.0005)
    (2048, 2048, 2047),  # stride exactly 1 without the last (clamped) position
])
def test_guard_accepts_causal_layouts(field_size, max_seq_len, n_positions):
    check_field_causality(field_size, max_seq_len, n_positions=n_positions)


@pytest.mark.parametrize("field_size, max_seq_len, n_positions, leaking_token", [
    (64, 53, None, 1),         # non-integer s ≈ 1.21 in (1, 2), spec §7
    (512, 514, None, 0),       # s ≈ 0.996 < 1 (V4.3.7)
    (2048, 2048, None, 2046),  # s = 1: the last position clamps onto its neighbour's cell
    (1024, 514, None, 512),    # the 100M layout leaks at its last position 513
])
def test_guard_rejects_leaking_layouts_with_an_actionable_message(field_size, max_seq_len, n_positions,
                                                                  leaking_token):
    with pytest.raises(ValueError) as error:
        check_field_causality(field_size, max_seq_len, setting="attention.field_size", n_positions=n_positions)
    message = str(error.value)
    smallest = auto_field_size(max_seq_len, n_positions=n_positions)
    assert f"attention.field_size={field_size}" in message
    assert f"{field_stride(field_size, max_seq_len):.6g}" in message
    assert f"token {leaking_token} read" in message
    assert f"attention.field_size={smallest}" in message


def test_guard_rejects_impossible_settings():
    with pytest.raises(ValueError, match="at least 2 cells"):
        check_field_causality(1, 10)
    with pytest.raises(ValueError, match="raise max_seq_len"):
        check_field_causality(64, 10, n_positions=11)


def test_auto_field_size_is_the_smallest_causal_value():
    for max_seq_len, n_positions, expected in [(97, 96, 97), (97, None, 193), (2, None, 3), (1, None, 2)]:
        size = auto_field_size(max_seq_len, n_positions=n_positions)
        assert size == expected
        check_field_causality(size, max_seq_len, n_positions=n_positions)
        if size > 2:
            with pytest.raises(ValueError):
                check_field_causality(size - 1, max_seq_len, n_positions=n_positions)


def test_module_guards_layout_and_sequence_length():
    with pytest.raises(ValueError, match="field_size=64 breaks causality"):
        _attention(52, 64)  # M = 53, s ≈ 1.21
    with pytest.raises(ValueError, match="field_size=100 breaks causality"):
        _attention(128, 100)  # s < 1
    for bad in ("big", True, 10.5):
        with pytest.raises(ValueError, match="field_size"):
            _attention(16, bad)
    with pytest.raises(ValueError, match="divisible"):
        WaveFieldAttention(dim=30, n_heads=8, seq_len=16)
    module = _attention(16, 64)
    with pytest.raises(ValueError, match="seq_len=16"):
        module(torch.randn(1, 17, DIM))
    assert _attention(96, "auto").field_size == 97  # M = 97, stride 1 for the 96 positions the module accepts


# ------------------------------------------------------------------------------------------------------- causality

@pytest.mark.parametrize("seq_len, field_size", [(128, 1024), (256, 1024), (96, "auto")])
def test_module_is_causal_in_fp64(seq_len, field_size):
    assert_causal(_attention(seq_len, field_size), n=seq_len, dim=DIM, tol=1e-12)


def test_module_is_causal_at_long_auto_length():
    module = _attention(4096, "auto", dim=16, heads=4)
    assert module.field_size == 4097 and module.field_stride == 1.0
    assert_causal(module, n=4096, dim=16, batch=1, tol=1e-12, positions=[1, 2047, 4000, 4095])


def test_module_dependency_set_is_exactly_the_prefix():
    deps = dependency_matrix(_attention(128, 1024).double(), _randn(2, 24, DIM))
    # FFT round-off (~1e-17) is the only trace of future tokens; real dependencies are O(1e-3 … 1)
    assert torch.triu(deps, diagonal=1).abs().max() < 1e-14
    assert (deps.diagonal() > 0).all() and (deps[-1] > 0).all()


@pytest.mark.parametrize("seq_len, field_size, max_seq_len, positions", [
    (52, 64, 53, None),          # s ≈ 1.21: spec measures 0.16 at module level
    (128, 100, 129, None),       # s < 1
    (64, 64, 64, [63]),          # s = 1 with all M positions: only the clamped last token leaks
])
def test_negative_control_leaking_layouts_are_detected(seq_len, field_size, max_seq_len, positions):
    with pytest.raises(ValueError):
        check_field_causality(field_size, max_seq_len, n_positions=seq_len)
    module = _bypass_guard(seq_len, field_size, max_seq_len).double()
    leak = max_future_influence(module, _randn(2, seq_len, DIM), positions)
    assert leak > 1e-3, f"the leaking layout was not detected (future influence {leak:.2e})"


# ----------------------------------------------------------------------------------------------------- equivalence

def test_fft_path_equals_direct_causal_sum_and_is_not_circular():
    size = 128
    kernel = _attention(127, size).double().kernels()[:, None, :]  # (H, 1, G)
    field = _randn(2, HEADS, 3, size)
    torch.testing.assert_close(causal_fft_conv(field, kernel), causal_conv_reference(field, kernel),
                               rtol=0, atol=1e-12)
    n_fft = next_fast_len(2 * size)
    assert n_fft >= 2 * size
    kernel_back = torch.fft.irfft(torch.fft.rfft(kernel, n=n_fft), n=n_fft)
    assert kernel_back[..., size:].abs().max() < 1e-15
    impulse_at_end = torch.zeros(1, HEADS, 1, size, dtype=torch.float64)
    impulse_at_end[..., -1] = 1.0
    circular = torch.fft.irfft(torch.fft.rfft(impulse_at_end, n=size) * torch.fft.rfft(kernel, n=size), n=size)
    assert circular[..., 0].abs().min() > 1e-4  # a length-G FFT wraps cell G−1 onto cell 0 ...
    assert causal_fft_conv(impulse_at_end, kernel)[..., :-1].abs().max() < 1e-15  # ... the padded one does not


@pytest.mark.parametrize("seq_len, field_size, bypass", [(128, 1024, None), (256, 1024, None), (52, 64, 53)])
def test_module_matches_closed_form_reference_values_and_gradients(seq_len, field_size, bypass):
    module = (_bypass_guard(seq_len, field_size, bypass) if bypass else _attention(seq_len, field_size)).double()
    with torch.no_grad():  # leave the init point so that every parameter matters
        for param in (module.wave_frequency, module.wave_damping, module.wave_phase, module.field_coupling):
            param.add_(0.3 * _randn(*param.shape, seed=7))
    x = _randn(2, min(seq_len, 100), DIM).requires_grad_(True)
    probe = _randn(2, x.shape[1], DIM, seed=3)
    inputs = [x, *module.parameters()]
    fast = module(x)
    slow = wavefield_reference(module, x)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    fast_grads = torch.autograd.grad((fast * probe).sum(), inputs, allow_unused=True)
    slow_grads = torch.autograd.grad((slow * probe).sum(), inputs, allow_unused=True)
    for name, a, b in zip(["x", *dict(module.named_parameters())], fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"gradient of {name}")


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    module = _attention(128, 1024)
    x = torch.randn(2, 128, DIM)
    reference = module(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = module(x)
    assert mixed.dtype == torch.bfloat16
    relative = (mixed.float() - reference).abs().max() / reference.abs().max()
    assert relative < 3e-2, f"bf16 autocast deviates by {relative:.2e} relative to fp32"


def test_prefix_consistency_and_no_state_between_calls():
    module = _attention(128, 1024).double()
    x = _randn(3, 128, DIM)
    full = module(x)
    for n in (1, 17, 64, 127):
        torch.testing.assert_close(module(x[:, :n]), full[:, :n], rtol=0, atol=1e-13)
    torch.testing.assert_close(module(x[1:2]), full[1:2], rtol=0, atol=1e-14)  # batch isolation
    torch.testing.assert_close(module(x), full, rtol=0, atol=0)
    with torch.no_grad():
        module.wave_frequency.add_(0.5)
    assert (module(x) - full).abs().max() > 1e-6  # kernel rebuilt from the current parameters


# ------------------------------------------------------------------------------------------- parameters and inits

def test_initial_wave_parameters_match_the_spec():
    module = _attention(128, 1024)
    torch.testing.assert_close(module.wave_frequency, torch.tensor(
        [0.3, 0.8286, 1.3571, 1.8857, 2.4143, 2.9429, 3.4714, 4.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.nn.functional.softplus(module.wave_damping), torch.tensor(
        [0.0486, 0.0789, 0.1269, 0.2014, 0.3133, 0.4741, 0.6931, 0.9741]), atol=1e-4, rtol=0)
    torch.testing.assert_close(module.wave_phase, torch.arange(8.0) * math.pi / 7, atol=1e-6, rtol=0)


def test_kernels_are_l1_normalised_and_start_at_cos_phi():
    module = _attention(128, 1024)
    kernels = module.kernels()
    assert kernels.shape == (HEADS, 1024)
    torch.testing.assert_close(kernels.abs().sum(-1), torch.ones(HEADS), atol=1e-6, rtol=0)
    ratio = kernels[:, 0] / torch.cos(module.wave_phase)  # k̂_h(0) = cos φ_h / Σ|k_h|, a positive factor
    assert (ratio > 0).all()


def test_coupling_rows_are_convex_with_the_init_diagonal():
    module = _attention(128, 1024)
    coupling = module.coupling()
    torch.testing.assert_close(coupling.sum(-1), torch.ones(HEADS), atol=1e-6, rtol=0)
    expected = math.e / (math.e + HEADS - 1)
    assert abs(expected - 0.2797) < 1e-4
    assert (coupling.diagonal() - expected).abs().max() < 0.01  # C = I + 0.01·N(0, 1)


def test_propagation_is_non_expansive():
    module = _attention(128, 1024).double()
    field = _randn(2, HEADS, 1024, 4)
    lower, frac = bilinear_positions(128, module.field_stride, module.field_size)
    read = bilinear_gather(module.propagate(field), lower, frac)
    assert read.abs().max() <= field.abs().max()


def test_query_rows_get_exactly_zero_gradient():
    module = _attention(64, 512)
    module(torch.randn(2, 64, DIM)).square().sum().backward()
    assert module.qkv_proj.weight.grad[:DIM].abs().max() == 0
    assert module.qkv_proj.bias.grad[:DIM].abs().max() == 0
    assert module.qkv_proj.weight.grad[DIM:].abs().min(dim=1).values.max() > 0


def test_gate_bias_is_reapplied_after_the_model_init_pass():
    for bias in (0.0, 2.0):
        module = _attention(64, 512, gate_bias_init=bias)
        for linear in (module.qkv_proj, module.gate_proj, module.out_proj):  # the shell's global pass
            nn.init.normal_(linear.weight, 0.0, 0.02)
            nn.init.zeros_(linear.bias)
        module.post_init()
        assert (module.gate_proj.bias == bias).all()


def test_parameter_count_per_layer_matches_the_spec():
    module = WaveFieldAttention(dim=256, n_heads=8, seq_len=128, field_size=1024)
    counts = {name: p.numel() for name, p in module.named_parameters()}
    assert sum(counts.values()) == 329_048
    assert counts["qkv_proj.weight"] + counts["qkv_proj.bias"] == 197_376
    assert counts["field_coupling"] == 64
    assert sum(p.numel() for p in FieldInterference(256, 0.1, 0).parameters()) == 296_513


# ------------------------------------------------------------------------------------------ field interference (FIM)

def _fim_reference(fim: FieldInterference, x: torch.Tensor) -> torch.Tensor:
    """Spec §1.1 with the running mean as a dense lower-triangular averaging matrix."""
    n = x.shape[1]
    averaging = torch.tril(torch.ones(n, n, dtype=x.dtype)) / torch.arange(1, n + 1, dtype=x.dtype)[:, None]
    context = fim.expand(averaging @ fim.compress(x))
    local = fim.local_phase_proj(x)
    global_ = fim.global_phase_proj(context)
    alignment = (local * global_).sum(-1, keepdim=True) / (local.norm(dim=-1, keepdim=True)
                                                           * global_.norm(dim=-1, keepdim=True))
    strength = torch.sigmoid(alignment / (torch.log1p(torch.exp(fim.interference_temperature)) + 0.05))
    gate = torch.sigmoid(fim.interference_gate(torch.cat([x, context], -1)))
    return x + gate * context * strength


def test_fim_matches_formula_is_causal_and_leaves_its_norm_unused():
    torch.manual_seed(0)
    fim = FieldInterference(DIM, dropout=0.0, module_idx=0).double()
    x = _randn(2, 40, DIM).requires_grad_(True)
    out = fim(x)
    torch.testing.assert_close(out, _fim_reference(fim, x), rtol=0, atol=1e-12)
    out.square().sum().backward()
    assert fim.norm.weight.grad is None and fim.norm.bias.grad is None
    assert_causal(fim, n=40, dim=DIM, tol=1e-12)


def test_fim_temperature_init_alternates():
    with torch.no_grad():
        temperatures = [float(FieldInterference(DIM, 0.1, k).temperature()) for k in range(3)]
        raws = [float(FieldInterference(DIM, 0.1, k).interference_temperature) for k in range(3)]
    assert raws == [-2.0, 0.5, -2.0]
    assert [round(t, 4) for t in temperatures] == [0.1769, 1.0241, 0.1769]


def test_fim_under_bf16_autocast_is_close_to_fp32():
    fim = FieldInterference(DIM, dropout=0.0, module_idx=1).eval()
    x = torch.randn(2, 64, DIM)
    reference = fim(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = fim(x)
    assert (mixed.float() - reference).abs().max() / reference.abs().max() < 3e-2


# ----------------------------------------------------------------------------------------------------- diagnostics

def _small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_attention(128, 1024), FieldInterference(DIM, 0.0, 0), _attention(128, 1024),
                         FieldInterference(DIM, 0.0, 1))


def test_kernel_table_reports_ranges_and_roles_at_init():
    rows = diagnostics.kernel_table(_small_model())
    assert len(rows) == 2 * HEADS and [r["layer"] for r in rows] == [0] * HEADS + [1] * HEADS
    assert [r["role"] for r in rows[:HEADS]] == ["WIDE-SMOOTH"] * 3 + ["MEDIUM"] * 3 + ["HIGH-FREQ"] * 2
    assert rows[0]["range_cells"] == 47  # ⌊ln 10 / softplus(−3)⌋
    assert rows[0]["range_tokens"] == pytest.approx(47 / 7.9921875)
    assert diagnostics.effective_range(0.005, 1024) == 1024
    assert diagnostics.kernel_role(0.5, 0.9) == "LOCAL" and diagnostics.kernel_role(2.5, 0.1) == "GLOBAL"
    assert diagnostics.kernel_summary(rows)["local_heads"] == 2 * HEADS


def test_coupling_interference_and_field_reports():
    model = _small_model()
    coupling = diagnostics.coupling_report(model)
    assert len(coupling) == 2
    for report in coupling:
        matrix = torch.tensor(report["matrix"], dtype=torch.float64)
        torch.testing.assert_close(matrix.sum(-1), torch.ones(HEADS, dtype=torch.float64))
        assert report["cross_coupling"] == pytest.approx(float(matrix.sum() - matrix.trace()))
        assert report["strong"] == [] and report["active"] and report["diverse"]
    interference = diagnostics.interference_report(model, torch.randn(2, 50, DIM))
    assert [r["temperature_label"] for r in interference] == ["SHARP", "SOFT"]
    assert all(0.0 < r["mean_strength"] < 1.0 for r in interference)
    assert "mean_strength" not in diagnostics.interference_report(model)[0]
    field = diagnostics.field_report(model)
    assert field[0]["stride"] == 7.9921875 and field[0]["overlaps"] == 0 and field[0]["resolution"] == "OK"
    assert field[0]["utilisation"] == pytest.approx(127 * 7.9921875 / 1023)
    crowded = diagnostics.field_report(_bypass_guard(52, 64, 53))[0]
    assert crowded["resolution"] == "CRITICAL" and crowded["overlaps"] > 0


def test_markdown_and_plot():
    model = _small_model()
    text = diagnostics.format_markdown(diagnostics.kernel_table(model), diagnostics.coupling_report(model),
                                       diagnostics.interference_report(model), diagnostics.field_report(model))
    for heading in ("## Wave kernels", "## Head coupling", "## Field interference", "## Field layout"):
        assert heading in text
    # the CLI on a language model, the energy flow, confidence and verdicts: tests/test_wavefield_diagnostics.py
