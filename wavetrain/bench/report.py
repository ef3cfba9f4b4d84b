"""What the length-scaling benchmark writes: the Markdown tables, bench.csv and the log-log plot bench.png.

growth exp. = log(t/t_prev)/log(N/N_prev) between consecutive measured lengths; SDPA ÷ this = the time of
``standard`` (torch SDPA, is_causal) over the variant's time at the same N, measured in the same run (> 1: faster
than SDPA); analytic FLOPs from wavetrain/flops.py beside the measured times (spec wavefield.md §5).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wavetrain.bench.cases import MEASURE_TITLES, REFERENCE, Settings, Variant
from wavetrain.bench.timing import Measurement

SUMMARY_FROM = 2048  # growth exponents in the summary run from this length to the longest measured


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


def percent(fraction: float | None) -> str:
    """A spread as a whole percentage ("" when unknown)."""
    return "" if fraction is None else f"{fraction * 100:.0f}"


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
    lines = ["| attention | N | fwd ms | fwd+bwd ms | IQR % (fwd+bwd) | growth exp. | SDPA ÷ this (fwd+bwd) "
             "| peak MiB (fwd+bwd) | tokens/s (fwd+bwd) | GFLOP fwd (analytic) | GFLOP/s fwd | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows.values():
        fwd, fb = row.measured.get("fwd", Measurement()), row.measured.get("fwdbwd", Measurement())
        tokens = settings.batch * row.n_tokens
        achieved = row.attention_gflop / fwd.median_s if row.attention_gflop and fwd.median_s else None
        lines.append("| " + " | ".join([
            row.variant, str(row.n_tokens), _ms(fwd.median_s), _ms(fb.median_s), percent(fb.spread),
            _fmt(previous_exponent(rows, row, settings.lengths, "fwdbwd"), ".2f"),
            _fmt(sdpa_ratio(rows, row, "fwdbwd"), ".3g"),
            _fmt(fb.peak_bytes / 2**20 if fb.peak_bytes is not None else None, ",.0f"),
            _fmt(tokens / fb.median_s if fb.median_s else None, ",.0f"),
            _fmt(row.attention_gflop, ".3g"), _fmt(achieved, ".3g"),
            _notes(row, ("fwd", "fwdbwd"))]) + " |")
    return "\n".join(lines)


def model_table(rows: dict[tuple[str, int], Row], settings: Settings, peak_flops: float | None) -> str:
    lines = ["| attention | N | step ms | IQR % | growth exp. | SDPA ÷ this | peak MiB | tokens/s | GFLOP/token "
             "(analytic, f+b) | achieved GFLOP/s | MFU | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows.values():
        step = row.measured.get("step", Measurement())
        rate = settings.batch * row.n_tokens / step.median_s if step.median_s else None
        achieved = rate * row.model_flops_per_token if rate and row.model_flops_per_token else None
        mfu = achieved / peak_flops if achieved and peak_flops else None
        lines.append("| " + " | ".join([
            row.variant, str(row.n_tokens), _ms(step.median_s), percent(step.spread),
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
              "attention_gflop_fwd", "model_gflop_per_token", "measure", "median_ms", "iqr_over_median", "runs",
              "peak_mib", "compile_s",
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
                    "iqr_over_median": _fmt(m.spread, ".4g"), "compile_s": _fmt(m.compile_s, ".4g"),
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
