"""The attention benchmark (python -m wavetrain.bench) and the analytic FLOP counts of wavetrain/flops.py.

FLOP formulas are checked against counts worked out by hand for tiny modules; the benchmark runs end to end at tiny
sizes (no timing is asserted: speed targets are read from its table, never tested)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from wavetrain import build_model, compose_config
from wavetrain.bench import (BenchError, Measurement, Settings, Track, growth_exponent, main, measure_case,
                             parse_variant, select_variants)
from wavetrain.callbacks import ThroughputMonitor
from wavetrain.flops import (attention_flops, causal_fft_conv_flops, model_flops_per_token, peak_bf16_flops,
                             real_fft_flops)
from wavetrain.models.attention.dwarf import DwarfDyadicAttention, DwarfFieldAttention
from wavetrain.models.attention.standard import CausalSelfAttention
from wavetrain.models.attention.wavefield import WaveFieldAttention
from wavetrain.models.attention.wda import WaveDensityAttention
from wavetrain.models.field_ops import causal_conv_reference, causal_fft_conv, fft_conv_length


# ------------------------------------------------------------------------------------------------ optimised paths
@pytest.mark.parametrize("signal_shape, kernel_shape", [
    ((2, 3, 4, 17), (3, 1, 17)),          # Wave Field / DWARF: per-head kernel broadcast over batch and channels
    ((2, 3, 1, 5, 9), (1, 3, 4, 1, 9)),   # WDA prefix_mixdens: signal broadcast over masks, kernel over batch
    ((3, 1, 6), (2, 6)),                  # the signal broadcast, the kernel with fewer dims
    ((7,), (7,)),
])
def test_causal_fft_conv_values_and_gradients_equal_the_direct_sum(signal_shape, kernel_shape) -> None:
    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(signal_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(kernel_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    fast, naive = causal_fft_conv(signal, kernel), causal_conv_reference(signal, kernel)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)
    cotangent = torch.randn(fast.shape, generator=generator, dtype=torch.float64)
    for got, expected in zip(torch.autograd.grad(fast, (signal, kernel), cotangent),
                             torch.autograd.grad(naive, (signal, kernel), cotangent)):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_causal_fft_conv_gradcheck_and_one_operand_and_bf16() -> None:
    signal = torch.randn(2, 1, 6, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(causal_fft_conv, (signal, kernel))
    signal = torch.randn(2, 3, 8, requires_grad=True)
    kernel = torch.randn(3, 8)  # no gradient wanted
    causal_fft_conv(signal, kernel).sum().backward()
    assert signal.grad.shape == signal.shape and kernel.grad is None
    half = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_fft_conv(half, kernel)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and half.grad.dtype == torch.bfloat16


def test_fft_conv_length_is_even_seven_smooth_and_long_enough() -> None:
    for length in (1, 3, 513, 1025, 4097, 16385, 16384, 32767):
        n = fft_conv_length(length)
        rest = n
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        assert n >= 2 * length and n % 2 == 0 and rest == 1
    assert fft_conv_length(513) == 1050 and fft_conv_length(16385) == 32928  # not the odd 1029 / 32805


# ------------------------------------------------------------------------------------------------ FLOP counts
def test_standard_attention_flops_by_hand() -> None:
    module = CausalSelfAttention(dim=8, n_heads=2, seq_len=4)
    flops = attention_flops(module, n_tokens=4)
    # qkv: 4 tokens × 8 inputs × 24 outputs × 2 = 1536; out: 4 × 8 × 8 × 2 = 512
    assert flops.projections == 2048
    # per head (d_h = 4): Q·Kᵀ 4×4 scores × 4 MACs = 64 MACs, A·V the same: 2 heads × 128 MACs × 2 FLOP = 512
    assert flops.mixing == 512
    assert attention_flops(module, n_tokens=4, batch=3).total == 3 * 2560


def test_fft_flops_by_hand() -> None:
    assert real_fft_flops(8, channels=2) == 2.5 * 8 * 3 * 2
    # length 3 -> n_fft = fft_conv_length(3) = 6, 4 bins; log2(6) is not an integer
    assert causal_fft_conv_flops(3, 1, 1, 1) == pytest.approx(3 * 2.5 * 6 * math.log2(6) + 6 * 4)


def test_wavefield_flops_by_hand() -> None:
    module = WaveFieldAttention(dim=8, n_heads=2, seq_len=3)
    assert module.field_size == 4  # auto: G = seq_len + 1, stride 1 (spec wavefield.md §7)
    flops = attention_flops(module, n_tokens=3)
    assert flops.projections == 8 * 3 * 8 * 8  # k, v, gate, out (q is not computed)
    # n_fft = fft_conv_length(4) = 8 (3 stages), 5 bins; channels B·D = 8, kernel channels H = 2
    elementwise = 3 * 24 + 4 * 24 + 3 * 24 + 5 * 24      # deposit, scatter, gather, gate over N·D = 24
    fft = 2.5 * 8 * 3 * 8 + 2.5 * 8 * 3 * 2 + 6 * 5 * 8 + 2.5 * 8 * 3 * 8
    coupling = 2 * 2 * 8 * 4                              # H × H mixing per cell and channel
    kernel = 8 * 2 * 4                                    # damped cosine per head and tap
    assert flops.mixing == elementwise + fft + coupling + kernel == 1872


def test_dwarf_field_flops_grow_with_field_not_tokens() -> None:
    module = DwarfFieldAttention(dim=8, n_heads=2, seq_len=64, field_size=256)
    small, large = attention_flops(module, 16), attention_flops(module, 64)
    # the FFT over G = 256 cells dominates: four times the tokens cost far less than four times the mixing
    assert large.projections == 4 * small.projections == 4 * 8 * 16 * 8 * 8  # k, v, gate, out
    assert small.mixing < large.mixing < 1.2 * small.mixing
    # the head coupling runs on the gathered tokens, not the cells: 48 more tokens cost 2·H·D·48 of it
    coupling = 2 * 2 * 8 * (64 - 16)
    elementwise = (3 + 4 + 3 + 5) * 8 * (64 - 16)
    assert large.mixing - small.mixing == coupling + elementwise


def test_dwarf_dyadic_flops_by_hand() -> None:
    module = DwarfDyadicAttention(dim=8, n_heads=2, seq_len=64, gather="softmax", tap_set="dense_dyadic",
                                  dense_max=32, dyadic_max=1536, scale_gains="none", pos_bias_init="alibi",
                                  oob_mode="mask")
    slots = len(module.slot_offsets)
    assert slots == 44  # 0..32 and 48, 64, ..., 1536 (spec dwarf.md §3.N)
    flops = attention_flops(module, n_tokens=40)
    assert flops.projections == 10 * 40 * 64
    unique = 33  # offsets 0..32 are < 40, 48 is not
    scores = weighting = 2 * 40 * unique * 8
    assert flops.mixing == scores + weighting + 6 * 40 * 2 * slots + 5 * 40 * 8 == 64960


def test_wda_prefix_flops_by_hand() -> None:
    module = WaveDensityAttention(dim=8, n_heads=2, seq_len=4, num_masks=2, num_waves_per_mask=1, topk_masks=1,
                                  gate_hidden=4, mod_rank=1, content_mix=0.0, gate_pooling="prefix")
    flops = attention_flops(module, n_tokens=4)
    # v_proj + out_proj 2·(2·4·8·8) = 1024, q_mod + k_mod 2·(2·4·8·2) = 256, gating and mask-scaling MLPs on the
    # 4 prefix means: 2·4·2·4·(8 + 2) + 2·4·2·4·(8 + 1) = 1216
    assert flops.projections == 1024 + 256 + 1216
    render = 15 * 2 * 2 * 1 * 4                # H·M·W·N waves
    routing = 4 * 2 * 2 * (8 + 2)              # rows·H·M·(two transcendental-ish ops + 2·mod_rank)
    density = 2 * 16 * (2 * 2 + 5 + 2 * 5)     # H·N²·(mixture 2M + density/window 5 + A·Z 2·(1 + d_h))
    assert flops.mixing == render + routing + density + 9 * 4 * 8 == 1296


def test_wda_mixdens_is_n_log_n_and_prefix_quadratic() -> None:
    def mixing(pooling: str, n: int) -> float:
        module = WaveDensityAttention(dim=32, n_heads=2, seq_len=n, gate_pooling=pooling)
        return attention_flops(module, n).mixing
    assert mixing("prefix", 4096) / mixing("prefix", 2048) > 3.5
    assert mixing("prefix_mixdens", 4096) / mixing("prefix_mixdens", 2048) < 2.3


def test_model_flops_per_token_by_hand() -> None:
    cfg = compose_config(["scale=tiny", "seq_len=16"])  # D 32, 2 layers, 2 heads, FFN 128, tied head
    model = build_model(cfg, vocab_size=10)
    # outside attention: FFN 2 × (32·128 + 128·32) = 16384 and the tied head 10·32 = 320 -> 6 × 16704
    # attention per layer and token: projections 8·32² = 8192, scores 4·16·32 = 2048 -> 3 × 2 layers × 10240
    assert model_flops_per_token(model, 16) == 6 * 16704 + 3 * 2 * 10240


def test_peak_flops_table() -> None:
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA GeForce GTX 1080") is None


def test_throughput_monitor_mfu() -> None:
    monitor = ThroughputMonitor()
    cpu_module = SimpleNamespace(device=torch.device("cpu"))
    monitor.on_fit_start(SimpleNamespace(is_global_zero=True), cpu_module)
    assert monitor.mfu(1000.0) is None  # CPU: no MFU
    monitor.flops_per_token, monitor.peak_flops = 6e9, 1e12
    assert monitor.mfu(100.0) == pytest.approx(0.6)
    assert monitor.mfu(200.0, world_size=2) == pytest.approx(0.6)


# ------------------------------------------------------------------------------------------------ the command
def test_variant_syntax_and_selection() -> None:
    variant = parse_variant("wda@gate_pooling=prefix_mixdens@model.norm=pre", ["standard", "wda"])
    assert variant.config == "wda"
    assert variant.overrides == ("attention.gate_pooling=prefix_mixdens", "model.norm=pre")
    with pytest.raises(BenchError, match="not a config in conf/attention"):
        parse_variant("nope", ["standard", "wda"])
    with pytest.raises(BenchError, match="not key=value"):
        parse_variant("wda@gate_pooling", ["standard", "wda"])
    assert [v.label for v in select_variants("wavefield")] == ["standard", "wavefield"]
    assert [v.label for v in select_variants("wavefield,standard")] == ["standard", "wavefield"]


def test_growth_exponent_and_prediction() -> None:
    assert growth_exponent(512, 1.0, 1024, 4.0) == pytest.approx(2.0)
    assert growth_exponent(512, 1.0, 1024, None) is None
    track = Track(points=[(100, 1.0, 1e6), (200, 4.0, 2e6)])
    assert track.predicted_seconds(400) == pytest.approx(16.0)
    assert track.predicted_bytes(400) == pytest.approx(4e6)


def test_case_predicted_over_budget_or_memory_is_skipped_without_running() -> None:
    settings = Settings(device=torch.device("cpu"), lengths=[100, 200, 400], batch=1, dim=8, heads=2, layers=1,
                        ffn_dim=32, vocab=16, precision="32-true", warmup=1, repeats=3, budget=10.0,
                        max_memory=2**29, measures=("fwd",))

    def never() -> None:
        raise AssertionError("a case predicted not to fit must not be built")
    slow = Track(points=[(100, 1.0, None), (200, 4.0, None)])
    result = measure_case(never, settings, slow, 400)
    assert result.median_s is None and "budget" in result.note
    assert "N=400 was already skipped" in measure_case(never, settings, slow, 800).note  # longer ones stay skipped
    big = Track(points=[(100, 1e-3, 2**28), (200, 2e-3, 2**29)])
    assert "memory limit" in measure_case(never, settings, big, 400).note
    fine = Track()
    result = measure_case(lambda: (lambda: None), settings, fine, 100)
    assert isinstance(result, Measurement) and result.median_s is not None and result.runs == 3


def test_benchmark_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    code = main(["--attention", "wavefield", "--lengths", "16,32", "--dim", "16", "--heads", "2", "--layers", "1",
                 "--repeats", "1", "--vocab", "32", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Attention module alone" in printed and "## One model step" in printed
    assert "wavefield N=32 fwd+bwd" in printed  # one progress line per case
    rows = list(csv.DictReader(open(out / "bench.csv")))
    cases = {(r["variant"], r["n_tokens"], r["measure"]): r for r in rows}
    assert set(cases) == {(v, n, m) for v in ("standard", "wavefield") for n in ("16", "32")
                          for m in ("fwd", "fwdbwd", "step")}
    for row in rows:
        assert float(row["median_ms"]) > 0 and float(row["tokens_per_s"]) > 0
        assert float(row["attention_gflop_fwd"]) > 0
    assert all(float(r["sdpa_over_this"]) == 1.0 for r in rows if r["variant"] == "standard")
    assert all(r["growth_exponent"] for r in rows if r["n_tokens"] == "32")
    assert float(cases[("wavefield", "32", "step")]["model_gflop_per_token"]) > 0
    table = (out / "bench.md").read_text()
    assert "| wavefield | 32 |" in table and "SDPA ÷ this" in table
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_notes_what_exceeds_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["--attention", "standard", "--lengths", "16,32", "--dim", "16", "--heads", "2", "--parts",
                 "attention", "--budget", "1e-9", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert {r["measure"] for r in rows} == {"fwd", "fwdbwd"}
    assert all(not r["median_ms"] and "budget" in r["note"] for r in rows)


def test_bad_arguments_name_the_fix(capsys: pytest.CaptureFixture) -> None:
    assert main(["--attention", "nope"]) == 2
    assert "not a config in conf/attention" in capsys.readouterr().err
    assert main(["--lengths", "a,b"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["--parts", "everything"]) == 2
    assert "--parts" in capsys.readouterr().err


@pytest.mark.slow
def test_overhead_mode_compares_trainer_with_plain_loop(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--overhead", "--overhead-steps", "3", "--overhead-warmup", "2", "--out", str(tmp_path),
                 "scale=tiny", "seq_len=32", "data.batch_size=4", "trainer.precision=32-true",
                 "trainer.log_every_n_steps=1"]) == 0
    printed = capsys.readouterr().out
    assert "Trainer ÷ plain loop" in printed
    report = (tmp_path / "overhead.json").read_text()
    assert '"trainer_over_plain"' in report


# ------------------------------------------------------------------------------------------------ the GPU check
def _tiny_plan(out: Path, **changes):
    from wavetrain.bench.gpu import SuitePlan

    tiny = dict(dim=16, heads=2, layers=1, ffn_dim=32, dropout=0.0)
    plan = SuitePlan(device=torch.device("cpu"), out=out, step_variants="standard,wavefield",
                     attention_variants="standard,wavefield,wda@num_masks=0",
                     step_scales={"13m": tiny, "85m": dict(tiny, layers=2)}, step_tokens=32, step_batch=2, vocab=64,
                     attention_lengths=(16, 32), compiled_attention_lengths=(32,), attention_dim=16,
                     attention_heads=2, warmup=0, repeats=2, trainer_steps=4, trainer_scale="tiny",
                     precision="32-true")
    for key, value in changes.items():
        setattr(plan, key, value)
    return plan


@pytest.mark.slow
def test_gpu_suite_writes_every_table_row_by_row_and_reports_errors_in_rows(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    """The whole --suite gpu flow at toy sizes on the CPU (compiled cases traced with aot_eager): every section
    writes its table, a case that fails says why in its row, the pytest output is kept."""
    import subprocess

    from wavetrain.bench import gpu
    from wavetrain.models import lm

    monkeypatch.setattr(lm, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(gpu.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 0, stdout="....\n=== 4 passed, 1 skipped in 3.2s ===\n", stderr=""))
    sections = ("tests", "step85_standard", "step13", "attention", "step85", "trainer")
    suite = gpu.run_suite(_tiny_plan(tmp_path, sections=sections, step_variants="wavefield"))
    tables = gpu.suite_results(tmp_path)
    assert set(tables) == {"tests", "step85", "step13", "attention", "trainer"}
    assert tables["tests"][0]["result"] == "4 passed, 1 skipped in 3.2s" and (tmp_path / "tests.log").exists()
    assert [(r["attention"], r["mode"]) for r in tables["step13"]] == [
        ("standard", "eager"), ("wavefield", "eager"), ("standard", "compiled"), ("wavefield", "compiled")]
    assert [r["attention"] for r in tables["step85"]] == ["standard"] * 2 + ["wavefield"] * 2
    for row in tables["step13"] + tables["step85"]:
        assert float(row["step ms"].replace(",", "")) > 0 and row["× standard"], row
    assert all(r["compile s"] for r in tables["step13"] if r["mode"] == "compiled")
    attention = {(r["attention"], r["N"]): r for r in tables["attention"]}
    assert float(attention[("standard", "32")]["SDPA ÷ this"]) == 1.0
    assert attention[("wda@num_masks=0", "16")]["notes"].startswith("error: ValueError: attention.num_masks=0")
    trainer = tables["trainer"][0]
    assert trainer["steps"] == "4" and float(trainer["tokens/s"].replace(",", "")) > 0 and not trainer["notes"]
    assert (tmp_path / "trainer_results.json").exists() and (tmp_path / "trainer_metrics.csv").exists()
    document = (tmp_path / "suite.md").read_text()
    assert "## Training step at the 13M shape" in document and "| wavefield | compiled |" in document
    assert (tmp_path / "suite.png").read_bytes()[:4] == b"\x89PNG" and not suite.not_run
    assert len(list(tmp_path.iterdir())) <= 8  # what a GPU machine's output folder returns


def test_gpu_suite_stops_at_the_time_limit_and_says_what_is_left(tmp_path: Path, capsys) -> None:
    from wavetrain.bench import gpu

    suite = gpu.run_suite(_tiny_plan(tmp_path, sections=("step13", "attention"), time_limit=1e-3))
    assert not any(table.rows for table in suite.tables.values())
    assert "step13: standard compiled" in suite.not_run and "attention: wavefield N=32" in suite.not_run
    assert "## Not run (time limit)" in (tmp_path / "suite.md").read_text()
    printed = capsys.readouterr().out
    assert "--suite gpu --sections attention --attention wavefield,wda@num_masks=0 --out DIR" in printed
    assert "--suite gpu --sections step13 --attention wavefield --out DIR" in printed


def test_gpu_suite_arguments_are_checked(capsys) -> None:
    assert main(["--suite", "gpu", "--device", "cpu"]) == 2
    assert "GPU machine" in capsys.readouterr().err
    assert main(["--suite", "gpu", "--device", "cpu", "--sections", "step13,nope"]) == 2
    assert "--sections" in capsys.readouterr().err
