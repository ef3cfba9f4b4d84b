"""Reports on the learned wave parameters of a Wave Field model (spec wavefield.md §6, "physics-based diagnostics").

They reproduce the reference's printed reports (09b58e5:diagnostics/diagnose_physics.py, diagnose_bpe.py): descriptive
tables, not pass/fail tests.  Every function takes any nn.Module containing ``WaveFieldAttention`` /
``FieldInterference`` sub-modules, found in module order.

    python -m wavetrain.analysis.wavefield_diagnostics CKPT --out DIR
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from wavetrain.models.attention.field_interference import FieldInterference
from wavetrain.models.attention.wavefield import WaveFieldAttention
from wavetrain.models.field_ops import bilinear_positions

_LN10 = math.log(10.0)


def _modules_of(model: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    return [(name or type(module).__name__, module) for name, module in model.named_modules()
            if isinstance(module, kind)]


def effective_range(alpha: float, field_size: int) -> int:
    """Lag in field cells where the envelope e^{−αt} falls to 10%: min(⌊ln 10/α⌋, G), or G if α ≤ 0.01 (§6.1)."""
    return min(math.floor(_LN10 / alpha), field_size) if alpha > 0.01 else field_size


def kernel_role(omega: float, alpha: float) -> str:
    """Role label of §6.1, first match wins."""
    if alpha > 0.5 and abs(omega) < 1.5:
        return "LOCAL"
    if alpha < 0.3 and abs(omega) > 2.0:
        return "GLOBAL"
    if alpha < 0.3 and abs(omega) < 1.5:
        return "WIDE-SMOOTH"
    if abs(omega) > 3.0:
        return "HIGH-FREQ"
    return "MEDIUM"


@torch.no_grad()
def kernel_table(model: nn.Module) -> list[dict]:
    """One row per (layer, head): ω, α = softplus(a), φ, range R in cells and tokens, role (spec §6.1)."""
    rows = []
    for layer, (name, module) in enumerate(_modules_of(model, WaveFieldAttention)):
        alphas = torch.nn.functional.softplus(module.wave_damping.double()).tolist()
        for head, (omega, alpha, phi) in enumerate(zip(module.wave_frequency.tolist(), alphas,
                                                       module.wave_phase.tolist())):
            reach = effective_range(alpha, module.field_size)
            rows.append({"layer": layer, "module": name, "head": head, "omega": omega, "alpha": alpha, "phi": phi,
                         "range_cells": reach, "range_tokens": reach / module.field_stride,
                         "role": kernel_role(omega, alpha)})
    return rows


def kernel_summary(rows: Sequence[dict]) -> dict:
    """BPE-report summary (§6.1): mean range R, heads with R < 50 cells ("local") and R > 200 ("global")."""
    ranges = [row["range_cells"] for row in rows]
    return {"heads": len(ranges), "mean_range_cells": sum(ranges) / max(len(ranges), 1),
            "local_heads": sum(r < 50 for r in ranges), "global_heads": sum(r > 200 for r in ranges)}


@torch.no_grad()
def coupling_report(model: nn.Module, strong_threshold: float = 0.15) -> list[dict]:
    """Per layer: P = row-softmax(C), strong off-diagonal entries, cross-coupling, diagonal, row entropy (§6.2)."""
    reports = []
    for layer, (name, module) in enumerate(_modules_of(model, WaveFieldAttention)):
        coupling = module.coupling().double()
        heads = coupling.shape[0]
        off_diagonal = ~torch.eye(heads, dtype=torch.bool)
        strong = [(int(r), int(s), float(coupling[r, s]))
                  for r, s in (off_diagonal & (coupling > strong_threshold)).nonzero().tolist()]
        cross = float(coupling[off_diagonal].sum())
        entropy = float(-(coupling * coupling.clamp(min=1e-300).log()).sum(-1).mean())
        reports.append({"layer": layer, "module": name, "matrix": coupling.tolist(), "strong": strong,
                        "cross_coupling": cross, "active": cross > 1.0,
                        "mean_diagonal": float(coupling.diagonal().mean()), "mean_row_entropy": entropy,
                        "max_entropy": math.log(heads), "diverse": entropy > 0.7 * math.log(heads)})
    return reports


def _temperature_label(temperature: float) -> str:
    return "SHARP" if temperature < 0.3 else "MEDIUM" if temperature < 0.8 else "SOFT"


def _strength_label(strength: float) -> str:
    return "AMPLIFIED" if strength > 0.55 else "SUPPRESSED" if strength < 0.45 else "NEUTRAL"


@torch.no_grad()
def interference_report(model: nn.Module, inputs: object | None = None) -> list[dict]:
    """Per FieldInterference module: τ_raw, τ = softplus(τ_raw) + 0.05 and its label (spec §6.4).

    With ``inputs`` (whatever ``model`` takes, e.g. token ids), the model is run once in eval mode and each
    module's per-token strength s_t is recomputed from the input it received; the rows then carry the mean
    strength and its label (AMPLIFIED > 0.55, SUPPRESSED < 0.45).
    """
    modules = _modules_of(model, FieldInterference)
    strengths: dict[int, torch.Tensor] = {}
    if inputs is not None:
        def record(index: int):
            def hook(module: FieldInterference, args: tuple) -> None:
                strengths[index] = module.strength(args[0]).float().squeeze(-1)
            return hook

        handles = [module.register_forward_pre_hook(record(i)) for i, (_, module) in enumerate(modules)]
        was_training = model.training
        try:
            model.eval()
            model(inputs)
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
    rows = []
    for index, (name, module) in enumerate(modules):
        temperature = float(module.temperature())
        row = {"index": index, "module": name, "tau_raw": float(module.interference_temperature),
               "temperature": temperature, "temperature_label": _temperature_label(temperature)}
        if index in strengths:
            mean_strength = float(strengths[index].mean())
            row.update(mean_strength=mean_strength, strength_label=_strength_label(mean_strength))
        rows.append(row)
    return rows


@torch.no_grad()
def field_report(model: nn.Module) -> list[dict]:
    """Field utilisation and the rule-based verdicts of spec §6.6, per layer, for a full-length input (N = seq_len).

    Overlaps count tokens that write a cell (with non-zero bilinear weight) an earlier token already wrote.
    """
    rows = []
    for layer, (name, module) in enumerate(_modules_of(model, WaveFieldAttention)):
        lower, frac = bilinear_positions(module.seq_len, module.field_stride, module.field_size)
        position = lower.double() + frac.double()
        used: set[int] = set()
        overlaps = 0
        for cell, fraction in zip(lower.tolist(), frac.tolist()):
            cells = {cell} | ({cell + 1} if fraction > 0 else set())
            overlaps += bool(cells & used)
            used |= cells
        stride, size = module.field_stride, module.field_size
        ranges = [effective_range(a, size) for a in torch.nn.functional.softplus(module.wave_damping.double()).tolist()]
        short = sum(r < 3 * stride for r in ranges)
        rows.append({
            "layer": layer, "module": name, "field_size": size, "max_seq_len": module.max_seq_len,
            "seq_len": module.seq_len, "stride": stride,
            "utilisation": float(position[-1]) / (size - 1),
            "mean_gap": float(position.diff().mean()) if len(position) > 1 else 0.0,
            "overlaps": overlaps,
            "resolution": "CRITICAL" if stride < 2 else "WARNING" if stride < 4 else "OK",
            "kernel_range": "CRITICAL" if short > len(ranges) / 2 else "OK",
            "field_ratio": "WARNING" if size / module.max_seq_len < 4 else "OK",
        })
    return rows


@torch.no_grad()
def plot_kernels(model: nn.Module, path: Path) -> Path:
    """PNG of the normalised kernels k̂_h(t), one panel per layer, one curve per head (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = _modules_of(model, WaveFieldAttention)
    if not modules:
        raise ValueError("plot_kernels: the model has no WaveFieldAttention layers")
    fig, axes = plt.subplots(len(modules), 1, figsize=(9, 2.6 * len(modules)), squeeze=False)
    for layer, ((name, module), axis) in enumerate(zip(modules, axes[:, 0])):
        kernels = module.kernels().double().cpu()
        alphas = torch.nn.functional.softplus(module.wave_damping.double()).tolist()
        longest = max(effective_range(a, module.field_size) for a in alphas)
        # show three envelope ranges of the slowest head, but at least 8 token spacings
        span = min(module.field_size, max(3 * longest, math.ceil(8 * module.field_stride), 8))
        lag = torch.arange(span)
        for head in range(kernels.shape[0]):
            axis.plot(lag.numpy(), kernels[head, :span].numpy(), label=f"h{head}", linewidth=1.0)
        axis.axhline(0.0, color="0.6", linewidth=0.5)
        axis.set_title(f"layer {layer} ({name}): stride {module.field_stride:.4g} cells/token", fontsize=9)
        axis.set_ylabel("k̂(t)")
        axis.legend(fontsize=7, ncol=min(kernels.shape[0], 8), loc="upper right")
    axes[-1, 0].set_xlabel("lag t (field cells)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_markdown(kernels: Sequence[dict] | None = None, coupling: Sequence[dict] | None = None,
                    interference: Sequence[dict] | None = None, field: Sequence[dict] | None = None) -> str:
    """The reports above as Markdown sections (any subset)."""
    sections = []
    if kernels:
        summary = kernel_summary(kernels)
        sections.append("## Wave kernels (spec §6.1)\n\n" + _table(
            ["layer", "head", "ω", "α", "φ", "R (cells)", "R (tokens)", "role"],
            [[r["layer"], r["head"], r["omega"], r["alpha"], r["phi"], r["range_cells"], r["range_tokens"],
              r["role"]] for r in kernels])
            + f"\n\nmean R = {summary['mean_range_cells']:.4g} cells; {summary['local_heads']}/{summary['heads']} "
              f"heads with R < 50, {summary['global_heads']}/{summary['heads']} with R > 200")
    if coupling:
        parts = ["## Head coupling P = softmax(C) (spec §6.2)"]
        for report in coupling:
            heads = len(report["matrix"])
            strong = ", ".join(f"{r}←{s} {v:.3f}" for r, s, v in report["strong"]) or "none"
            parts.append(
                f"### layer {report['layer']} ({report['module']})\n\n"
                + _table(["recv \\ send", *map(str, range(heads))],
                         [[h, *row] for h, row in enumerate(report["matrix"])])
                + f"\n\ncross-coupling {report['cross_coupling']:.4g} ({'active' if report['active'] else 'weak'}); "
                  f"mean diagonal {report['mean_diagonal']:.4g}; mean row entropy {report['mean_row_entropy']:.4g} "
                  f"of ln H = {report['max_entropy']:.4g} ({'diverse' if report['diverse'] else 'concentrated'}); "
                  f"strong (> 0.15): {strong}")
        sections.append("\n\n".join(parts))
    if interference:
        has_strength = any("mean_strength" in r for r in interference)
        header = ["module", "τ_raw", "τ", "label"] + (["mean s_t", "strength"] if has_strength else [])
        rows = [[r["module"], r["tau_raw"], r["temperature"], r["temperature_label"]]
                + ([r.get("mean_strength", "-"), r.get("strength_label", "-")] if has_strength else [])
                for r in interference]
        sections.append("## Field interference (spec §6.4)\n\n" + _table(header, rows))
    if field:
        sections.append("## Field layout (spec §6.6)\n\n" + _table(
            ["layer", "G", "M", "stride", "utilisation", "mean gap", "overlaps", "resolution", "kernel range",
             "G/M"],
            [[r["layer"], r["field_size"], r["max_seq_len"], r["stride"], r["utilisation"], r["mean_gap"],
              r["overlaps"], r["resolution"], r["kernel_range"], r["field_ratio"]] for r in field]))
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> None:
    """CLI: print the Markdown report of a checkpoint and save it with the kernel plot under ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m wavetrain.analysis.wavefield_diagnostics",
                                     description="Wave Field diagnostics of a trained checkpoint (spec §6)")
    parser.add_argument("checkpoint", type=Path, help="checkpoint written by wavetrain training")
    parser.add_argument("--out", type=Path, required=True, help="directory for the report and the kernel plot")
    args = parser.parse_args(argv)

    from wavetrain import load_model

    model, _ = load_model(args.checkpoint)
    if not _modules_of(model, WaveFieldAttention):
        raise SystemExit(f"{args.checkpoint}: the model has no WaveFieldAttention layers, nothing to report")
    report = format_markdown(kernel_table(model), coupling_report(model), interference_report(model),
                             field_report(model))
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wavefield_diagnostics.md").write_text(report, encoding="utf-8")
    print(f"kernel plot: {plot_kernels(model, args.out / 'wavefield_kernels.png')}")


if __name__ == "__main__":
    main()
