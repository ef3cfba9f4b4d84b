"""Attention benchmark: every variant against torch SDPA (``standard``), over sequence length.

    python -m wavetrain.bench [--attention standard,wavefield,...] [--lengths 512,...,16384] [--device cpu|cuda]
    python -m wavetrain.bench --overhead        # Lightning Trainer step vs a hand-written PyTorch loop

For every attention variant and length N it times, after warm-up, the median of repeated runs of
- ``fwd``: the attention module alone, inference forward (eval mode, no autograd graph);
- ``fwd+bwd``: the attention module alone, training forward then backward of a fixed random cotangent;
- ``step``: one full model step (build_model + forward + cross-entropy + backward + AdamW step);
with the module/model built from the composed config (``attention=<variant>``, scale overridden to the chosen width,
heads and depth, ``seq_len`` = N so N-dependent sizes such as the Wave Field's field derive from it), and reports the
peak memory above the pre-run baseline (CUDA allocator on GPU, resident-set high-water mark on CPU), tokens/s, the
growth exponent log(t₂/t₁)/log(N₂/N₁) between consecutive lengths, the speed ratio t_SDPA / t_variant measured in
the same run, and the analytic FLOPs of wavetrain/flops.py beside the times (spec wavefield.md §5 "fair measured
comparison").  Cases whose predicted time or memory exceeds the per-case budget are skipped with a note, and so are
the longer lengths of that variant.  Writes bench.md (the tables), bench.csv and bench.png (log-log time vs N)
to --out and prints the tables.  Timings on a shared machine are noisy: the load average is recorded with them, and
``--threads 1 --clock process`` (this process's CPU time instead of wall time) measures the work itself when other
jobs compete for the cores; the per-case budget is counted on the chosen clock.

A variant is a conf/attention name, optionally with attention options after ``@``:
``wda@gate_pooling=prefix_mixdens`` is the WDA config with ``attention.gate_pooling=prefix_mixdens`` (a key with a
dot, e.g. ``model.norm=pre``, is passed to the composition as it is).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import functools
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from wavetrain.config import compose_config, group_choices
from wavetrain.flops import attention_flops, model_flops_per_token, peak_bf16_flops
from wavetrain.models.lm import build_attention, build_model

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
# Rows added to the default selection: the long-context form the issue benchmarks WDA in (spec wda.md §2.8).
LONG_CONTEXT_VARIANTS = ("wda@gate_pooling=prefix_mixdens",)
REFERENCE = "standard"
MEASURES = ("fwd", "fwdbwd", "step")
MEASURE_TITLES = {"fwd": "fwd", "fwdbwd": "fwd+bwd", "step": "model step"}
PARTS = {"attention": ("fwd", "fwdbwd"), "model": ("step",)}
MIN_TIMED_RUNS = 3  # a case is only started when warm-up + this many runs fit the budget
SUMMARY_FROM = 2048  # growth exponents in the summary run from this length to the longest measured


class BenchError(ValueError):
    """A bad benchmark argument: the message names it and the fix."""


# ------------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """One benchmarked attention: a conf/attention config plus overrides; ``label`` is how tables name it."""
    label: str
    config: str
    overrides: tuple[str, ...] = ()


def parse_variant(spec: str, available: list[str]) -> Variant:
    """``name[@key=value...]`` -> Variant; keys without a dot are attention options."""
    name, *settings = spec.strip().split("@")
    if name not in available:
        raise BenchError(f"--attention names {name!r}, which is not a config in conf/attention: choose from "
                         f"{', '.join(available)}")
    overrides = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise BenchError(f"--attention variant {spec!r}: {setting!r} is not key=value (e.g. "
                             f"wda@gate_pooling=prefix_mixdens)")
        overrides.append(setting if "." in key else f"attention.{key}={value}")
    return Variant(spec.strip(), name, tuple(overrides))


def select_variants(selection: str | None) -> list[Variant]:
    """The variants of ``--attention`` (default: every config plus the long-context rows); SDPA always first."""
    available = group_choices("attention")
    if selection:
        specs = [s for s in selection.split(",") if s.strip()]
    else:
        specs = available + [v for v in LONG_CONTEXT_VARIANTS if v.split("@")[0] in available]
    variants = [parse_variant(spec, available) for spec in specs]
    if REFERENCE not in [v.label for v in variants]:
        variants.insert(0, Variant(REFERENCE, REFERENCE))
    else:
        variants.sort(key=lambda v: v.label != REFERENCE)
    return variants


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(token) for token in text.split(",") if token.strip()})
    except ValueError:
        raise BenchError(f"--lengths={text!r} must be comma-separated integers, e.g. 512,1024,2048") from None
    if not lengths or lengths[0] < 2:
        raise BenchError(f"--lengths={text!r}: give at least one length >= 2")
    return lengths


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    device: torch.device
    lengths: list[int]
    batch: int
    dim: int
    heads: int
    layers: int
    ffn_dim: int
    vocab: int
    precision: str
    warmup: int
    repeats: int
    budget: float
    max_memory: float  # bytes
    measures: tuple[str, ...]
    clock: str = "wall"

    def now(self) -> float:
        """Seconds on the chosen clock: wall time, or this process's CPU time (``--clock process``, CPU only)."""
        return time.process_time() if self.clock == "process" else time.perf_counter()

    def autocast(self):
        if self.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def case_overrides(variant: Variant, settings: Settings, n_tokens: int) -> list[str]:
    """The composition of one case: the variant's config at width/heads/depth of the run and seq_len = N."""
    return [f"attention={variant.config}", f"seq_len={n_tokens}", f"scale.d_model={settings.dim}",
            f"scale.n_heads={settings.heads}", f"scale.n_layers={settings.layers}",
            f"scale.ffn_dim={settings.ffn_dim}", f"model.position_rows={n_tokens}", *variant.overrides]


@functools.lru_cache(maxsize=16)
def _composed(overrides: tuple[str, ...]):
    return compose_config(list(overrides))


def case_config(variant: Variant, settings: Settings, n_tokens: int):
    """The composed config of one case (composed once per variant and length; read-only)."""
    return _composed(tuple(case_overrides(variant, settings, n_tokens)))


# ------------------------------------------------------------------------------------------------ memory
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _proc_status_kib(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory of the runs between :meth:`start` and :meth:`peak`, above the level at :meth:`start`.

    CUDA: the caching allocator's ``max_memory_allocated``.  CPU: the resident-set high-water mark (VmHWM), reset
    through /proc/self/clear_refs after returning freed heap pages to the system (malloc_trim), so memory reused from
    an earlier case is counted again; None where /proc does not allow it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.base = -1
            return
        self.base = (_proc_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> float | None:
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device) - self.base)
        high = _proc_status_kib("VmHWM")
        if self.base < 0 or high is None:
            return None
        return float(max(high * 1024 - self.base, 0))


def default_memory_limit(device: torch.device) -> float:
    """Half of the memory available now on CPU (the machine is shared), 90% of the GPU's memory on CUDA."""
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory
    try:
        available = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        return 0.5 * int(available.group(1)) * 1024
    except (OSError, AttributeError):
        return 8 * 2**30


# ------------------------------------------------------------------------------------------------ workloads
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_workload(variant: Variant, settings: Settings, n_tokens: int, measure: str) -> Callable[[], None]:
    """One call of the attention module alone: inference forward (``fwd``) or forward + backward (``fwdbwd``)."""
    module = build_attention(case_config(variant, settings, n_tokens)).to(settings.device)
    shape = (settings.batch, n_tokens, settings.dim)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=generator).to(settings.device)
    if measure == "fwd":
        module.eval()

        def run() -> None:
            with torch.no_grad(), settings.autocast():
                module(x)
        return run
    module.train()
    x.requires_grad_(True)
    cotangent = torch.randn(shape, generator=generator).to(settings.device)

    def run() -> None:
        with settings.autocast():
            y = module(x)
        y.backward(cotangent.to(y.dtype))
        x.grad = None
        module.zero_grad(set_to_none=True)
    return run


def model_workload(variant: Variant, settings: Settings, n_tokens: int) -> tuple[Callable[[], None], float | None]:
    """One optimiser step of the whole model (forward, cross-entropy, backward, AdamW), and its analytic training
    FLOPs per token (None where an attention has no formula)."""
    model = build_model(case_config(variant, settings, n_tokens), vocab_size=settings.vocab).to(settings.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(settings.vocab, (settings.batch, n_tokens + 1), generator=generator).to(settings.device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    try:
        flops = model_flops_per_token(model, n_tokens)
    except KeyError:
        flops = None

    def run() -> None:
        with settings.autocast():
            logits = model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run, flops


def analytic_attention_flops(variant: Variant, settings: Settings, n_tokens: int) -> float | None:
    """Forward FLOPs of the attention module for one batch (wavetrain/flops.py); None without a formula."""
    try:
        module = build_attention(case_config(variant, settings, n_tokens))
        return attention_flops(module, n_tokens, settings.batch).total
    except Exception:  # noqa: BLE001 - no formula or a config that does not build: the measured cases say why
        return None


# ------------------------------------------------------------------------------------------------ measurement
@dataclass
class Measurement:
    median_s: float | None = None
    runs: int = 0
    peak_bytes: float | None = None
    note: str = ""


@dataclass
class Track:
    """What earlier lengths of one (variant, measure) say about the next: points (N, seconds, bytes) and whether
    it stopped (a longer length cannot fit where a shorter one did not)."""
    points: list[tuple[int, float, float | None]] = field(default_factory=list)
    stopped: str = ""

    def stop(self, n_tokens: int, reason: str) -> Measurement:
        """Skip this length for ``reason`` and every longer one with a note pointing here."""
        self.stopped = f"skipped: N={n_tokens} was already skipped ({reason})"
        return Measurement(note=f"skipped: {reason}")

    def _predict(self, n_tokens: int, index: int, low: float, high: float) -> float | None:
        usable = [p for p in self.points if p[index] is not None and p[index] > 0]
        if not usable:
            return None
        exponent = 2.0  # one point only: assume quadratic growth
        if len(usable) >= 2:
            (n1, value1), (n2, value2) = ((p[0], p[index]) for p in usable[-2:])
            exponent = math.log(value2 / value1) / math.log(n2 / n1)
        exponent = min(max(exponent, low), high)
        n_last, value = usable[-1][0], usable[-1][index]
        return value * (n_tokens / n_last) ** exponent

    def predicted_seconds(self, n_tokens: int) -> float | None:
        return self._predict(n_tokens, 1, 1.0, 3.0)

    def predicted_bytes(self, n_tokens: int) -> float | None:
        return self._predict(n_tokens, 2, 1.0, 2.5)


def _out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text \
        or "not enough memory" in text or "can't allocate memory" in text


def measure_case(make: Callable[[], Callable[[], None]], settings: Settings, track: Track,
                 n_tokens: int) -> Measurement:
    """Warm-up, then up to ``settings.repeats`` timed runs within the per-case budget; skips with a note when the
    prediction from shorter lengths says the case cannot fit (time or memory)."""
    if track.stopped:
        return Measurement(note=track.stopped)
    predicted = track.predicted_seconds(n_tokens)
    if predicted is not None and predicted * (settings.warmup + MIN_TIMED_RUNS) > settings.budget:
        return track.stop(n_tokens, f"predicted {predicted:.1f} s per run, {settings.warmup} warm-up + "
                                    f"{MIN_TIMED_RUNS} runs exceed the {settings.budget:.0f} s budget")
    predicted_memory = track.predicted_bytes(n_tokens)
    if predicted_memory is not None and predicted_memory > settings.max_memory:
        return track.stop(n_tokens, f"predicted {predicted_memory / 2**30:.1f} GiB exceeds the "
                                    f"{settings.max_memory / 2**30:.1f} GiB memory limit")
    memory = PeakMemory(settings.device)
    run = None
    try:
        run = make()
        memory.start()
        spent = 0.0
        for _ in range(settings.warmup):
            _sync(settings.device)
            start = settings.now()
            run()
            _sync(settings.device)
            spent += settings.now() - start
        per_run = spent / max(settings.warmup, 1)
        if settings.warmup and per_run > settings.budget:
            skipped = track.stop(n_tokens, f"one run took {per_run:.1f} s, over the {settings.budget:.0f} s budget")
            skipped.peak_bytes = memory.peak()
            return skipped
        runs = settings.repeats if not settings.warmup else \
            max(1, min(settings.repeats, int((settings.budget - spent) / max(per_run, 1e-9))))
        times = []
        for _ in range(runs):
            _sync(settings.device)
            start = settings.now()
            run()
            _sync(settings.device)
            times.append(settings.now() - start)
        result = Measurement(statistics.median(times), runs, memory.peak())
        if runs < settings.repeats:
            result.note = f"{runs} of {settings.repeats} runs (budget)"
        track.points.append((n_tokens, result.median_s, result.peak_bytes))
        return result
    except Exception as error:  # noqa: BLE001 - a failing case is reported in the table, the benchmark goes on
        if not _out_of_memory(error):
            return Measurement(note=f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
        return track.stop(n_tokens, "out of memory")
    finally:
        del run
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Row:
    variant: str
    n_tokens: int
    attention_gflop: float | None = None
    model_flops_per_token: float | None = None
    measured: dict[str, Measurement] = field(default_factory=dict)


def growth_exponent(n1: int, t1: float | None, n2: int, t2: float | None) -> float | None:
    """log(t₂/t₁) / log(N₂/N₁): 1 for linear, 2 for quadratic growth."""
    if not t1 or not t2 or n1 == n2:
        return None
    return math.log(t2 / t1) / math.log(n2 / n1)


def _seconds(rows: dict[tuple[str, int], Row], label: str, n_tokens: int, measure: str) -> float | None:
    row = rows.get((label, n_tokens))
    return row.measured[measure].median_s if row and measure in row.measured else None


def previous_exponent(rows: dict[tuple[str, int], Row], row: Row, lengths: list[int], measure: str) -> float | None:
    """Growth exponent from the next shorter measured length of the same variant to this one."""
    earlier = [n for n in lengths if n < row.n_tokens and _seconds(rows, row.variant, n, measure)]
    if not earlier:
        return None
    n1 = earlier[-1]
    return growth_exponent(n1, _seconds(rows, row.variant, n1, measure), row.n_tokens,
                           _seconds(rows, row.variant, row.n_tokens, measure))


def sdpa_ratio(rows: dict[tuple[str, int], Row], row: Row, measure: str) -> float | None:
    """t_SDPA / t_variant at the same N (above 1: faster than SDPA)."""
    mine, reference = _seconds(rows, row.variant, row.n_tokens, measure), _seconds(rows, REFERENCE, row.n_tokens,
                                                                                   measure)
    return reference / mine if mine and reference else None


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1e3:.3g}" if value < 1 else f"{value * 1e3:,.0f}"


def _notes(row: Row, measures: tuple[str, ...]) -> str:
    notes = []
    for measure in measures:
        m = row.measured.get(measure)
        if m is not None and m.note:
            notes.append(f"{MEASURE_TITLES[measure]}: {m.note}")
    return "; ".join(notes)


def attention_table(rows: dict[tuple[str, int], Row], settings: Settings) -> str:
    lines = ["| attention | N | fwd ms | fwd+bwd ms | growth exp. | SDPA ÷ this (fwd+bwd) | peak MiB (fwd+bwd) "
             "| tokens/s (fwd+bwd) | GFLOP fwd (analytic) | GFLOP/s fwd | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows.values():
        fwd, fb = row.measured.get("fwd", Measurement()), row.measured.get("fwdbwd", Measurement())
        tokens = settings.batch * row.n_tokens
        achieved = row.attention_gflop / fwd.median_s if row.attention_gflop and fwd.median_s else None
        lines.append("| " + " | ".join([
            row.variant, str(row.n_tokens), _ms(fwd.median_s), _ms(fb.median_s),
            _fmt(previous_exponent(rows, row, settings.lengths, "fwdbwd"), ".2f"),
            _fmt(sdpa_ratio(rows, row, "fwdbwd"), ".3g"),
            _fmt(fb.peak_bytes / 2**20 if fb.peak_bytes is not None else None, ",.0f"),
            _fmt(tokens / fb.median_s if fb.median_s else None, ",.0f"),
            _fmt(row.attention_gflop, ".3g"), _fmt(achieved, ".3g"),
            _notes(row, ("fwd", "fwdbwd"))]) + " |")
    return "\n".join(lines)


def model_table(rows: dict[tuple[str, int], Row], settings: Settings, peak_flops: float | None) -> str:
    lines = ["| attention | N | step ms | growth exp. | SDPA ÷ this | peak MiB | tokens/s | GFLOP/token "
             "(analytic, f+b) | achieved GFLOP/s | MFU | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows.values():
        step = row.measured.get("step", Measurement())
        rate = settings.batch * row.n_tokens / step.median_s if step.median_s else None
        achieved = rate * row.model_flops_per_token if rate and row.model_flops_per_token else None
        mfu = achieved / peak_flops if achieved and peak_flops else None
        lines.append("| " + " | ".join([
            row.variant, str(row.n_tokens), _ms(step.median_s),
            _fmt(previous_exponent(rows, row, settings.lengths, "step"), ".2f"),
            _fmt(sdpa_ratio(rows, row, "step"), ".3g"),
            _fmt(step.peak_bytes / 2**20 if step.peak_bytes is not None else None, ",.0f"),
            _fmt(rate, ",.0f"), _fmt(row.model_flops_per_token / 1e9 if row.model_flops_per_token else None, ".3g"),
            _fmt(achieved / 1e9 if achieved else None, ".3g"), _fmt(mfu, ".1%"), _notes(row, ("step",))]) + " |")
    return "\n".join(lines)


def summary_lines(rows: dict[tuple[str, int], Row], variants: list[Variant], settings: Settings) -> list[str]:
    """Per variant and measure: the growth exponent from SUMMARY_FROM (or the shortest length) to the longest
    measured length, and the SDPA ratio there."""
    lines = []
    start = min([n for n in settings.lengths if n >= SUMMARY_FROM] or settings.lengths)
    for variant in variants:
        parts = []
        for measure in settings.measures:
            measured = [n for n in settings.lengths if n >= start and _seconds(rows, variant.label, n, measure)]
            if not measured:
                continue
            last = measured[-1]
            exponent = growth_exponent(measured[0], _seconds(rows, variant.label, measured[0], measure), last,
                                       _seconds(rows, variant.label, last, measure))
            ratio = sdpa_ratio(rows, rows[(variant.label, last)], measure)
            text = f"{MEASURE_TITLES[measure]} exp {measured[0]}→{last} {_fmt(exponent, '.2f') or '—'}"
            if ratio is not None and variant.label != REFERENCE:
                text += f", SDPA ÷ this at {last}: {ratio:.3g}"
            parts.append(text)
        if parts:
            lines.append(f"- {variant.label}: " + "; ".join(parts))
    return lines


CSV_FIELDS = ("variant", "n_tokens", "batch", "dim", "heads", "layers", "device", "precision",
              "attention_gflop_fwd", "model_gflop_per_token", "measure", "median_ms", "runs", "peak_mib",
              "tokens_per_s", "growth_exponent", "sdpa_over_this", "note")


def write_csv(path: Path, rows: dict[tuple[str, int], Row], settings: Settings) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows.values():
            for measure in settings.measures:
                m = row.measured.get(measure, Measurement())
                writer.writerow({
                    "variant": row.variant, "n_tokens": row.n_tokens, "batch": settings.batch, "dim": settings.dim,
                    "heads": settings.heads, "layers": settings.layers if measure == "step" else "",
                    "device": settings.device.type, "precision": settings.precision,
                    "attention_gflop_fwd": _fmt(row.attention_gflop, ".6g"),
                    "model_gflop_per_token": _fmt(row.model_flops_per_token / 1e9
                                                  if row.model_flops_per_token else None, ".6g"),
                    "measure": measure, "median_ms": _fmt(m.median_s * 1e3 if m.median_s else None, ".6g"),
                    "runs": m.runs, "peak_mib": _fmt(m.peak_bytes / 2**20 if m.peak_bytes is not None else None,
                                                     ".6g"),
                    "tokens_per_s": _fmt(settings.batch * row.n_tokens / m.median_s if m.median_s else None, ".6g"),
                    "growth_exponent": _fmt(previous_exponent(rows, row, settings.lengths, measure), ".4g"),
                    "sdpa_over_this": _fmt(sdpa_ratio(rows, row, measure), ".4g"), "note": m.note})


def write_plot(path: Path, rows: dict[tuple[str, int], Row], variants: list[Variant], settings: Settings) -> None:
    """Log-log time vs N: one panel per measure, one line per variant, with N and N² guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = settings.measures
    figure, axes = plt.subplots(1, len(measures), figsize=(6 * len(measures), 5), squeeze=False)
    for axis, measure in zip(axes[0], measures):
        for variant in variants:
            points = [(n, _seconds(rows, variant.label, n, measure)) for n in settings.lengths]
            points = [(n, t * 1e3) for n, t in points if t]
            if points:
                style = "k-o" if variant.label == REFERENCE else "-o"
                axis.plot(*zip(*points), style, label=variant.label, markersize=3, linewidth=1.2)
        reference = [(n, _seconds(rows, REFERENCE, n, measure)) for n in settings.lengths]
        reference = [(n, t * 1e3) for n, t in reference if t]
        if reference:
            n0, t0 = reference[0]
            span = [settings.lengths[0], settings.lengths[-1]]
            axis.plot(span, [t0 * (n / n0) for n in span], ":", color="grey", linewidth=0.8, label="∝ N")
            axis.plot(span, [t0 * (n / n0) ** 2 for n in span], "--", color="grey", linewidth=0.8, label="∝ N²")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length N")
        axis.set_ylabel("median time (ms" + (", process CPU time)" if settings.clock == "process" else ")"))
        axis.set_title(f"{MEASURE_TITLES[measure]} ({settings.device.type}, D={settings.dim}, B={settings.batch})")
        axis.grid(True, which="both", alpha=0.3)
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''}, {torch.backends.cpu.get_cpu_capability()})"


# ------------------------------------------------------------------------------------------------ the benchmark
def run_benchmark(variants: list[Variant], settings: Settings, out: Path) -> dict[tuple[str, int], Row]:
    """Measure every (length, variant, measure), printing a line per case; write bench.md/csv/png to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = datetime.now(), load_average()
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name(settings.device)) \
        if settings.device.type == "cuda" and settings.precision == "bf16-mixed" else None
    clock = "wall clock" if settings.clock == "wall" else "process CPU time (not wall time)"
    header = (f"device {device_name(settings.device)}, torch {torch.__version__}, {clock}, "
              f"precision {settings.precision}, "
              f"batch {settings.batch}, D={settings.dim}, heads {settings.heads}, model {settings.layers} layers "
              f"(FFN {settings.ffn_dim}, vocab {settings.vocab}), warm-up {settings.warmup}, median of up to "
              f"{settings.repeats} runs, budget {settings.budget:.0f} s per case, memory limit "
              f"{settings.max_memory / 2**30:.1f} GiB")
    print(f"wavetrain.bench: {header}; load average {load_before}", flush=True)
    rows: dict[tuple[str, int], Row] = {}
    tracks: dict[tuple[str, str], Track] = {}
    total = len(variants) * len(settings.lengths) * len(settings.measures)
    done = 0
    for n_tokens in settings.lengths:  # length-major: every variant at N is measured close in time to SDPA at N
        for variant in variants:
            row = rows.setdefault((variant.label, n_tokens), Row(variant.label, n_tokens))
            flops = analytic_attention_flops(variant, settings, n_tokens)
            row.attention_gflop = flops / 1e9 if flops is not None else None
            for measure in settings.measures:
                track = tracks.setdefault((variant.label, measure), Track())
                if measure == "step":
                    def make(v=variant, n=n_tokens, r=row):
                        run, per_token = model_workload(v, settings, n)
                        r.model_flops_per_token = per_token
                        return run
                else:
                    def make(v=variant, n=n_tokens, m=measure):
                        return attention_workload(v, settings, n, m)
                result = measure_case(make, settings, track, n_tokens)
                row.measured[measure] = result
                done += 1
                memory = f", peak {result.peak_bytes / 2**20:,.0f} MiB" if result.peak_bytes is not None else ""
                timing = (f"{result.median_s * 1e3:,.2f} ms (median of {result.runs}{memory})"
                          if result.median_s else result.note)
                extra = f" [{result.note}]" if result.median_s and result.note else ""
                print(f"[{done:>{len(str(total))}}/{total}] {variant.label} N={n_tokens} "
                      f"{MEASURE_TITLES[measure]}: {timing}{extra}", flush=True)
    load_after = load_average()
    tables = []
    if any(m in settings.measures for m in PARTS["attention"]):
        tables += ["## Attention module alone", "", attention_table(rows, settings), ""]
    if "step" in settings.measures:
        tables += [f"## One model step ({settings.layers} layers, AdamW)", "", model_table(rows, settings, peak_flops),
                   ""]
    summary = summary_lines(rows, variants, settings)
    document = "\n".join([
        "# Attention benchmark", "",
        f"{started:%Y-%m-%d %H:%M}; {header}.", "",
        f"Load average (1/5/15 min) before: {load_before}; after: {load_after} (the machine is shared: timings are "
        f"noisy, compare rows measured in the same run).", "",
        "fwd = inference forward (eval, no autograd); fwd+bwd = training forward + backward of the module alone; "
        "growth exp. = log(t/t_prev)/log(N/N_prev) of fwd+bwd (model table: of the step); SDPA ÷ this = time of "
        "`standard` (torch SDPA, is_causal) over this variant's time at the same N (> 1: faster than SDPA); "
        "analytic FLOPs from wavetrain/flops.py (dense counts, fwd+bwd = 3 × fwd); peak memory above the "
        "pre-run baseline (" + ("CUDA allocator" if settings.device.type == "cuda" else "resident-set high-water "
                                "mark") + ").", "",
        *tables,
        "## Growth and SDPA ratio at the longest measured length", "", *summary, ""])
    (out / "bench.md").write_text(document)
    write_csv(out / "bench.csv", rows, settings)
    write_plot(out / "bench.png", rows, variants, settings)
    print("\n" + "\n".join(tables + ["Summary:", *summary]), flush=True)
    print(f"wavetrain.bench: load average after {load_after}; wrote {out / 'bench.md'}, {out / 'bench.csv'}, "
          f"{out / 'bench.png'}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ overhead
def plain_loop_seconds_per_step(cfg, device: torch.device, warmup_steps: int, timed_steps: int,
                                clock: Callable[[], float] = time.perf_counter) -> float:
    """Wall seconds per steady-state step of a hand-written PyTorch loop doing what the Trainer does for
    LanguageModelTask: same data windows, model, AdamW parameter groups, LR schedule, grad clipping and precision."""
    import lightning as L
    from torch.utils.data import DataLoader

    from wavetrain.data.datamodule import StreamWindows
    from wavetrain.lightning_module import lr_factor, parameter_groups
    from wavetrain.train import build_datamodule, resolve_precision

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    data = build_datamodule(cfg)
    vocab_size = data.prepare()
    model = build_model(cfg, vocab_size).to(device)
    model.train()
    opt = cfg.optim
    optimizer = torch.optim.AdamW(parameter_groups(model, float(opt.weight_decay), bool(opt.decay_all)),
                                  lr=float(opt.lr), betas=tuple(opt.betas), eps=float(opt.eps))
    max_steps = int(opt.get("schedule_steps") or cfg.trainer.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, schedule=opt.schedule, warmup_steps=int(opt.warmup_steps), max_steps=max_steps, lr=float(opt.lr),
        min_lr=float(opt.min_lr)))
    batch = int(cfg.data.batch_size)
    steps = warmup_steps + timed_steps
    windows = StreamWindows(data.splits["train"], int(cfg.seq_len), int(cfg.seed), 0, steps * batch,
                            int(cfg.data.get("min_supervised", 0)))
    loader = DataLoader(windows, batch_size=batch, shuffle=False, num_workers=int(cfg.data.get("num_workers", 0)))
    precision = resolve_precision(cfg.trainer)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision.startswith("bf16") \
        else nullcontext()
    clip = float(opt.grad_clip or 0.0)
    start = None
    for step, (x, y) in enumerate(loader):
        if step == warmup_steps:
            _sync(device)
            start = clock()
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    _sync(device)
    return (clock() - start) / timed_steps


def trainer_seconds(cfg, steps: int, run_dir: Path, clock: Callable[[], float] = time.perf_counter
                    ) -> tuple[float, dict]:
    """Wall seconds of one wavetrain.train.train run of ``steps`` optimiser steps (validation only at the end)."""
    from omegaconf import open_dict

    from wavetrain.train import train

    with open_dict(cfg):
        cfg.trainer.max_steps = steps
        cfg.trainer.val_check_interval = steps
    start = clock()
    results = train(cfg, run_dir=run_dir)
    return clock() - start, results


def measure_overhead(overrides: list[str], device: torch.device, warmup_steps: int, timed_steps: int,
                     out: Path, clock_name: str = "wall") -> dict:
    """Per-step time (wall, or process CPU time) of the Trainer path vs the plain loop for the same config (default:
    the default standard run). The Trainer's per-step time is the difference of two train() runs of W and W + S steps divided by S, so
    setup, the final validation and the checkpoint cancel and every per-step cost of the framework stays in."""
    base = ["attention=standard", "trainer.enable_progress_bar=false", "data.val_windows=8",
            "trainer.limit_val_batches=1", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
            *overrides]
    out.mkdir(parents=True, exist_ok=True)
    clock = time.process_time if clock_name == "process" else time.perf_counter
    cfg = compose_config(base + [f"trainer.max_steps={warmup_steps + timed_steps}"])
    if int(cfg.optim.warmup_steps) >= warmup_steps:
        base.append(f"optim.warmup_steps={max(warmup_steps - 1, 0)}")
    print(f"wavetrain.bench --overhead: {' '.join(base)}; {timed_steps} timed steps after {warmup_steps}; "
          f"{device_name(device)}, {'process CPU time' if clock_name == 'process' else 'wall clock'}; load average "
          f"{load_average()}", flush=True)
    plain = plain_loop_seconds_per_step(compose_config(base + [f"trainer.max_steps={warmup_steps + timed_steps}"]),
                                        device, warmup_steps, timed_steps, clock)
    print(f"plain PyTorch loop: {plain * 1e3:,.1f} ms/step", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        short, _ = trainer_seconds(compose_config(base), warmup_steps, Path(tmp) / "short", clock)
        long, results = trainer_seconds(compose_config(base), warmup_steps + timed_steps, Path(tmp) / "long", clock)
    lightning = (long - short) / timed_steps
    cfg = compose_config(base)
    tokens = int(cfg.data.batch_size) * int(cfg.seq_len)
    report = {"plain_ms_per_step": plain * 1e3, "trainer_ms_per_step": lightning * 1e3,
              "trainer_over_plain": lightning / plain, "tokens_per_step": tokens,
              "trainer_logged_tokens_per_sec": results.get("tokens_per_sec"),
              "overrides": base, "clock": clock_name, "device": device_name(device),
              "load_average": load_average()}
    print(f"Trainer path: {lightning * 1e3:,.1f} ms/step (train() of {warmup_steps + timed_steps} steps took "
          f"{long:.1f} s, of {warmup_steps} steps {short:.1f} s)", flush=True)
    print(f"Trainer ÷ plain loop = {lightning / plain:.3f} (target ≤ 1.10); the plain loop ran "
          f"{tokens / plain:,.0f} tokens/s on this clock, the ThroughputMonitor logged "
          f"{results.get('tokens_per_sec') or 0:,.0f} tokens/s (wall clock)", flush=True)
    (out / "overhead.json").write_text(json.dumps(report, indent=2))
    return report


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wavetrain.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", help="comma-separated variants (conf/attention names, optionally "
                                            "name@key=value...); default: all configs + "
                                            + ", ".join(LONG_CONTEXT_VARIANTS) + "; standard is always added")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="sequence lengths N")
    parser.add_argument("--parts", default="attention,model",
                        help="attention (module alone: fwd, fwd+bwd) and/or model (one full step)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:K | auto")
    parser.add_argument("--precision", default=None, choices=("32-true", "bf16-mixed"),
                        help="default 32-true on CPU, bf16-mixed on CUDA")
    parser.add_argument("--batch", type=int, default=1, help="sequences per call")
    parser.add_argument("--dim", type=int, default=256, help="model width D")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the model-step benchmark")
    parser.add_argument("--ffn-dim", type=int, default=None, help="FFN hidden width (default 4·D)")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary of the model-step benchmark")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds per case (warm-up + timed runs), on the chosen --clock")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="skip cases predicted above this (default: half the free RAM / 90%% of the GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, the machine's cores)")
    parser.add_argument("--clock", default="wall", choices=("wall", "process"),
                        help="wall time (default), or this process's CPU time: on a CPU shared with other jobs, "
                             "--threads 1 --clock process times the work itself, not the wait for a core")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default outputs/bench/<time>)")
    parser.add_argument("--overhead", action="store_true",
                        help="compare the Trainer path (wavetrain.train.train) with a plain PyTorch loop instead")
    parser.add_argument("--overhead-steps", type=int, default=20, help="timed steps of --overhead")
    parser.add_argument("--overhead-warmup", type=int, default=5, help="untimed steps of --overhead")
    parser.add_argument("overrides", nargs="*", help="--overhead only: config overrides (key=value) of the run")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device={name} but torch sees no CUDA device: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device={name}: use cpu, cuda, cuda:K or auto")
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        if args.threads is not None:
            if args.threads < 1:
                raise BenchError(f"--threads={args.threads} must be >= 1")
            torch.set_num_threads(args.threads)
        out = args.out or Path("outputs") / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        if args.overhead:
            if args.clock == "process" and device.type != "cpu":
                raise BenchError("--clock process times CPU work only: use --clock wall on a GPU")
            measure_overhead(args.overrides, device, args.overhead_warmup, args.overhead_steps, out, args.clock)
            return 0
        if args.overrides:
            raise BenchError(f"config overrides {args.overrides} apply to --overhead only; name attention options "
                             f"in --attention as name@key=value")
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise BenchError(f"--parts={args.parts!r}: use attention, model or attention,model")
        for name in ("batch", "dim", "heads", "layers", "vocab", "repeats"):
            if getattr(args, name) < 1:
                raise BenchError(f"--{name}={getattr(args, name)} must be >= 1")
        if args.dim % args.heads:
            raise BenchError(f"--dim={args.dim} is not divisible by --heads={args.heads}")
        if args.clock == "process" and device.type != "cpu":
            raise BenchError("--clock process times CPU work only: use --clock wall on a GPU")
        if args.warmup < 0 or args.budget <= 0:
            raise BenchError("--warmup must be >= 0 and --budget > 0")
        settings = Settings(
            device=device, lengths=parse_lengths(args.lengths), batch=args.batch, dim=args.dim, heads=args.heads,
            layers=args.layers, ffn_dim=args.ffn_dim or 4 * args.dim, vocab=args.vocab,
            precision=args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true"), clock=args.clock,
            warmup=args.warmup, repeats=args.repeats, budget=args.budget,
            max_memory=args.max_memory_gb * 2**30 if args.max_memory_gb else default_memory_limit(device),
            measures=tuple(m for m in MEASURES if any(m in PARTS[p] for p in parts)))
        run_benchmark(select_variants(args.attention), settings, out)
    except BenchError as error:
        print(f"wavetrain.bench: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
