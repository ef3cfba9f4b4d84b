"""The length-scaling benchmark: every variant against torch SDPA (``standard``) over sequence length.

For every length N and variant it times (wavetrain.bench.timing) the attention module alone (``fwd``: inference
forward; ``fwdbwd``: training forward + backward of a fixed random cotangent) and one full model step (``step``:
forward, cross-entropy, backward, AdamW), length-major so that every variant at N is measured close in time to SDPA
at N.  bench.md and bench.csv are rewritten after every case, so a run cut short keeps its finished rows; bench.png
(log-log time against N) is drawn after every length.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch

from wavetrain.bench.cases import (MEASURE_TITLES, PARTS, Settings, Variant, analytic_attention_flops,
                                   attention_workload, model_workload)
from wavetrain.bench.report import (Row, attention_table, device_name, load_average, model_table, summary_lines,
                                    write_csv, write_plot)
from wavetrain.bench.timing import Measurement, Track, measure_case
from wavetrain.flops import peak_bf16_flops


def _header(settings: Settings) -> str:
    clock = "wall clock" if settings.clock == "wall" else "process CPU time (not wall time)"
    if settings.device.type == "cuda":
        clock = "CUDA events"
    return (f"device {device_name(settings.device)}, torch {torch.__version__}, {clock}, "
            f"precision {settings.precision}, {'compiled' if settings.compile else 'eager'}, "
            f"batch {settings.batch}, D={settings.dim}, heads {settings.heads}, model {settings.layers} layers "
            f"(FFN {settings.ffn_dim}, vocab {settings.vocab}), warm-up {settings.warmup}, median of up to "
            f"{settings.repeats} runs, budget {settings.budget:.0f} s per case, memory limit "
            f"{settings.max_memory / 2**30:.1f} GiB")


def _document(rows: dict[tuple[str, int], Row], variants: list[Variant], settings: Settings, started: datetime,
              loads: tuple[str, str], peak_flops: float | None) -> tuple[str, list[str]]:
    """bench.md and the tables printed at the end."""
    tables = []
    if any(m in settings.measures for m in PARTS["attention"]):
        tables += ["## Attention module alone", "", attention_table(rows, settings), ""]
    if "step" in settings.measures:
        tables += [f"## One model step ({settings.layers} layers, AdamW)", "", model_table(rows, settings, peak_flops),
                   ""]
    summary = summary_lines(rows, variants, settings)
    document = "\n".join([
        "# Attention benchmark", "",
        f"{started:%Y-%m-%d %H:%M}; {_header(settings)}.", "",
        f"Load average (1/5/15 min) before: {loads[0]}; after: {loads[1]} (the machine is shared: timings are "
        f"noisy, compare rows measured in the same run).", "",
        "fwd = inference forward (eval, no autograd); fwd+bwd = training forward + backward of the module alone; "
        "IQR % = interquartile range of the timed runs over their median; "
        "growth exp. = log(t/t_prev)/log(N/N_prev) of fwd+bwd (model table: of the step); SDPA ÷ this = time of "
        "`standard` (torch SDPA, is_causal) over this variant's time at the same N (> 1: faster than SDPA); "
        "analytic FLOPs from wavetrain/flops.py (dense counts, fwd+bwd = 3 × fwd); peak memory above the "
        "pre-run baseline (" + ("CUDA allocator" if settings.device.type == "cuda" else "resident-set high-water "
                                "mark") + ").", "",
        *tables,
        "## Growth and SDPA ratio at the longest measured length", "", *summary, ""])
    return document, tables + ["Summary:", *summary]


def _progress(done: int, total: int, label: str, n_tokens: int, measure: str, result: Measurement) -> str:
    memory = f", peak {result.peak_bytes / 2**20:,.0f} MiB" if result.peak_bytes is not None else ""
    timing = (f"{result.median_s * 1e3:,.2f} ms (median of {result.runs}{memory})"
              if result.median_s else result.note)
    extra = f" [{result.note}]" if result.median_s and result.note else ""
    return f"[{done:>{len(str(total))}}/{total}] {label} N={n_tokens} {MEASURE_TITLES[measure]}: {timing}{extra}"


def run_benchmark(variants: list[Variant], settings: Settings, out: Path) -> dict[tuple[str, int], Row]:
    """Measure every (length, variant, measure), printing a line per case; write bench.md/csv/png to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = datetime.now(), load_average()
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name(settings.device)) \
        if settings.device.type == "cuda" and settings.precision == "bf16-mixed" else None
    print(f"wavetrain.bench: {_header(settings)}; load average {load_before}", flush=True)
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
                print(_progress(done, total, variant.label, n_tokens, measure, result), flush=True)
                document, _ = _document(rows, variants, settings, started, (load_before, load_average()),
                                        peak_flops)
                (out / "bench.md").write_text(document)
                write_csv(out / "bench.csv", rows, settings)
        write_plot(out / "bench.png", rows, variants, settings)
    load_after = load_average()
    document, printed = _document(rows, variants, settings, started, (load_before, load_after), peak_flops)
    (out / "bench.md").write_text(document)
    print("\n" + "\n".join(printed), flush=True)
    print(f"wavetrain.bench: load average after {load_after}; wrote {out / 'bench.md'}, {out / 'bench.csv'}, "
          f"{out / 'bench.png'}", flush=True)
    return rows
