"""Reports on a trained Wave Field model (spec wavefield.md §6, "physics-based diagnostics").

They reproduce the reference's printed reports (09b58e5:diagnostics/diagnose_physics.py, diagnose_bpe.py): descriptive
tables, not pass/fail tests.  Every function takes any nn.Module containing ``WaveFieldAttention`` /
``FieldInterference`` sub-modules, found in module order.  From the parameters alone: the kernel table (§6.1), the
head coupling (§6.2), the interference temperatures (§6.4) and the field layout (§6.6); from one test sentence run
through the model: the energy flow and gate activations (§6.3), the per-token interference strengths s_t (§6.4),
the prediction confidence (§6.5) and the layout of that sentence (§6.6), then the rule-based verdicts of §6.6
(resolution, kernel range, vocabulary pressure, field/sequence ratio).

    python -m wavetrain.analysis.wavefield_diagnostics CKPT --out DIR [--text "..."] [--tokenizer tokenizer.json]
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
            row.update(mean_strength=mean_strength, strength_label=_strength_label(mean_strength),
                       strengths=strengths[index].reshape(-1).tolist())
        rows.append(row)
    return rows


def _gate_label(activation: float) -> str:
    return "HIGH" if activation > 0.6 else "MED" if activation > 0.4 else "LOW"


@torch.no_grad()
def energy_flow(model: nn.Module, inputs: torch.Tensor) -> list[dict]:
    """Per Wave Field layer, for one input sequence (spec §6.3): the L2 norm of each token's attention input
    (the LN1 output, so it mostly shows the LayerNorm gain, not residual-stream energy), the per-token gate
    activation = channel mean of σ(W_g h + b_g) with its label (HIGH > 0.6, MED > 0.4, else LOW), and the change
    of the mean norm from the first Wave Field layer (``change_pct``)."""
    modules = _modules_of(model, WaveFieldAttention)
    seen: dict[int, torch.Tensor] = {}

    def record(index: int):
        def hook(module: WaveFieldAttention, args: tuple) -> None:
            seen[index] = args[0].detach()
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
        x = seen[index][0].float()  # the first sequence of the batch
        norms = x.norm(dim=-1)
        gates = torch.sigmoid(module.gate_proj(seen[index][0]).float()).mean(-1)
        labels = [_gate_label(g) for g in gates.tolist()]
        rows.append({"layer": index, "module": name, "norms": norms.tolist(), "mean_norm": float(norms.mean()),
                     "gates": gates.tolist(), "gate_labels": labels, "mean_gate": float(gates.mean()),
                     "gate_label": _gate_label(float(gates.mean())),
                     "gate_counts": {label: labels.count(label) for label in ("HIGH", "MED", "LOW")}})
    first = rows[0]["mean_norm"] if rows else 0.0
    for row in rows:
        row["change_pct"] = 100.0 * (row["mean_norm"] - first) / first if first else 0.0
    return rows


@torch.no_grad()
def confidence_report(model: nn.Module, ids: torch.Tensor, decode=str) -> dict:
    """Prediction confidence on one sequence (spec §6.5): per position the largest softmax probability, the argmax
    token (as ``decode(id)`` text too), whether it hits the next token, and the entropy; their means, the hit rate,
    and ln V for scale."""
    was_training = model.training
    try:
        model.eval()
        logits = model(ids[:1]).float()[0]
    finally:
        model.train(was_training)
    probabilities = torch.softmax(logits, dim=-1)
    top, argmax = probabilities.max(dim=-1)
    entropy = -(probabilities * probabilities.clamp(min=1e-30).log()).sum(-1)
    targets = ids[0, 1:]
    hits = (argmax[:-1] == targets).tolist() + [None]  # the last position has no next token in the sequence
    scored = [h for h in hits if h is not None]
    return {"max_prob": top.tolist(), "argmax": argmax.tolist(), "argmax_text": [decode(i) for i in argmax.tolist()],
            "hit": hits, "entropy": entropy.tolist(),
            "mean_max_prob": float(top.mean()), "mean_entropy": float(entropy.mean()),
            "max_entropy": math.log(logits.shape[-1]), "hit_rate": sum(scored) / len(scored) if scored else None,
            "vocab_size": logits.shape[-1]}


@torch.no_grad()
def field_report(model: nn.Module, n_tokens: int | None = None) -> list[dict]:
    """Field utilisation and the per-layer verdicts of spec §6.6, for an input of ``n_tokens`` tokens (the test
    sentence; default: a full-length input, N = seq_len).

    Overlaps count tokens that write a cell (with non-zero bilinear weight) an earlier token already wrote.
    """
    rows = []
    for layer, (name, module) in enumerate(_modules_of(model, WaveFieldAttention)):
        n = min(n_tokens or module.seq_len, module.seq_len)
        lower, frac = bilinear_positions(n, module.field_stride, module.field_size)
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
            "seq_len": module.seq_len, "n_tokens": n, "stride": stride, "short_range_heads": short,
            "heads": len(ranges),
            "utilisation": float(position[-1]) / (size - 1),
            "mean_gap": float(position.diff().mean()) if len(position) > 1 else 0.0,
            "overlaps": overlaps,
            "resolution": "CRITICAL" if stride < 2 else "WARNING" if stride < 4 else "OK",
            "kernel_range": "CRITICAL" if short > len(ranges) / 2 else "OK",
            "field_ratio": "WARNING" if size / module.max_seq_len < 4 else "OK",
        })
    return rows


def vocab_pressure(model: nn.Module) -> dict:
    """Vocabulary pressure of spec §6.6: V / D, the vocabulary per embedding width (the reference's V/256 at its
    D = 256; the BPE-8K model's 31× is what its docs blame for the capacity gap, spec §8); WARNING above 20."""
    embedding = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    vocab, dim = embedding.weight.shape
    ratio = vocab / dim
    return {"vocab_size": vocab, "dim": dim, "ratio": ratio, "verdict": "WARNING" if ratio > 20 else "OK"}


def verdicts(field: Sequence[dict], pressure: dict) -> list[tuple[str, str, str]]:
    """The rule-based verdicts of spec §6.6 as (check, verdict, why) rows, worst layer first where they vary."""
    rank = {"CRITICAL": 0, "WARNING": 1, "OK": 2}
    worst = {key: min(field, key=lambda r: rank[r[key]]) for key in ("resolution", "kernel_range", "field_ratio")}
    resolution, reach, ratio = worst["resolution"], worst["kernel_range"], worst["field_ratio"]
    return [
        ("resolution", resolution["resolution"], f"stride s = {resolution['stride']:.4g} cells/token "
         "(CRITICAL if s < 2, WARNING if s < 4)"),
        ("kernel range", reach["kernel_range"], f"{reach['short_range_heads']}/{reach['heads']} heads of layer "
         f"{reach['layer']} reach less than 3 token spacings (CRITICAL if more than half)"),
        ("vocabulary pressure", pressure["verdict"], f"V / D = {pressure['vocab_size']} / {pressure['dim']} = "
         f"{pressure['ratio']:.3g} (WARNING if > 20)"),
        ("field / sequence", ratio["field_ratio"], f"G / M = {ratio['field_size']} / {ratio['max_seq_len']} = "
         f"{ratio['field_size'] / ratio['max_seq_len']:.3g} (WARNING if < 4)"),
    ]


def _at(curve: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The curve linearly interpolated at fractional cell positions (the bilinear read of a whole-token lag)."""
    lower = position.floor().long().clamp(max=len(curve) - 1)
    frac = position - lower
    return (1 - frac) * curve[lower] + frac * curve[(lower + 1).clamp(max=len(curve) - 1)]


@torch.no_grad()
def plot_kernels(model: nn.Module, path: Path) -> Path:
    """PNG of the normalised kernels k̂_h, one panel per (layer, head): rows are layers, columns heads, the x axis the
    lag in tokens (cells / stride, one tick per token spacing), dots at whole-token lags, where a token reads the
    deposits of the tokens before it; each panel titled with ω, α, its 10 % range in tokens and its role (§6.1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, MultipleLocator

    modules = _modules_of(model, WaveFieldAttention)
    if not modules:
        raise ValueError("plot_kernels: the model has no WaveFieldAttention layers")
    heads = max(module.n_heads for _, module in modules)
    fig, axes = plt.subplots(len(modules), heads, figsize=(1.9 * heads + 0.6, 1.55 * len(modules) + 0.8),
                             squeeze=False, sharex="row")
    for layer, (name, module) in enumerate(modules):
        kernels = module.kernels().double().cpu()
        stride = module.field_stride
        alphas = torch.nn.functional.softplus(module.wave_damping.double()).tolist()
        longest = max(effective_range(a, module.field_size) for a in alphas)
        # three envelope ranges of the slowest head, at least 8 tokens, at most the sequence
        tokens = max(8, min(module.seq_len, math.ceil(3 * longest / stride)))
        cells = min(module.field_size, math.floor(tokens * stride) + 1)
        lag_cells = torch.arange(cells, dtype=torch.float64)
        token_lags = torch.arange(0, math.floor((cells - 1) / stride) + 1, dtype=torch.float64)
        for head in range(heads):
            axis = axes[layer, head]
            if head >= module.n_heads:
                axis.axis("off")
                continue
            curve = kernels[head, :cells]
            at_tokens = _at(curve, token_lags * stride)
            axis.plot((lag_cells / stride).numpy(), curve.numpy(), lw=0.9, color="tab:blue")
            axis.plot(token_lags.numpy(), at_tokens.numpy(), "o", ms=2.2, color="tab:red")
            axis.axhline(0.0, color="0.6", lw=0.5)
            omega, alpha = float(module.wave_frequency[head]), alphas[head]
            reach = effective_range(alpha, module.field_size) / stride
            axis.set_title(f"L{layer} h{head} {kernel_role(omega, alpha)}\nω {omega:.2f} α {alpha:.2f} "
                           f"R {reach:.3g} tok", fontsize=6.5)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
            axis.xaxis.set_minor_locator(MultipleLocator(1))  # a minor tick at every token (= stride cells)
            axis.tick_params(labelsize=6)
        axes[layer, 0].set_ylabel(f"layer {layer}\nk̂ (stride {stride:.3g})", fontsize=7)
    for axis in axes[-1]:
        axis.set_xlabel("lag (tokens)", fontsize=7)
    fig.suptitle("Wave Field kernels k̂_h(lag): line = every field cell, dots = whole-token lags", fontsize=9)
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


def _energy_section(energy: Sequence[dict]) -> str:
    rows = [[r["layer"], r["module"], r["mean_norm"], f"{r['change_pct']:+.1f} %", r["mean_gate"], r["gate_label"],
             " / ".join(str(r["gate_counts"][k]) for k in ("HIGH", "MED", "LOW"))] for r in energy]
    change = energy[-1]["change_pct"] if energy else 0.0
    return ("## Energy flow and gates (spec §6.3)\n\n"
            "Mean L2 norm of the tokens' attention inputs (the LN1 output: it mostly shows the LayerNorm gain, not "
            "residual-stream energy) and the gate activation, channel mean of σ(W_g h + b_g) (HIGH > 0.6, MED > 0.4, "
            "else LOW), for the test sentence.\n\n"
            + _table(["layer", "module", "mean ‖h‖", "vs layer 0", "mean gate", "gate", "tokens HIGH / MED / LOW"], rows)
            + f"\n\nnorm change from the first to the last Wave Field layer: {change:+.1f} %")


def _per_token_section(tokens: Sequence[str], energy: Sequence[dict] | None, interference: Sequence[dict] | None,
                       confidence: dict | None) -> str:
    strengths = [r for r in interference or [] if "strengths" in r]
    header = ["t", "token", "next"]
    header += ["max p", "argmax", "hit", "entropy"] if confidence else []
    header += [f"s_t {r['module']}" for r in strengths]
    header += ["mean gate"] if energy else []
    rows = []
    for t, token in enumerate(tokens):
        row = [t, _show(token), _show(tokens[t + 1]) if t + 1 < len(tokens) else "—"]
        if confidence:
            hit = confidence["hit"][t]
            row += [confidence["max_prob"][t], _show(confidence["argmax_text"][t]), "—" if hit is None else
                    ("yes" if hit else "no"), confidence["entropy"][t]]
        row += [r["strengths"][t] for r in strengths]
        if energy:
            row.append(sum(layer["gates"][t] for layer in energy) / len(energy))
        rows.append(row)
    return "## The test sentence token by token (spec §6.4, §6.5)\n\n" + _table(header, rows)


def _show(token: str) -> str:
    return "`" + token.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`"


def format_markdown(kernels: Sequence[dict] | None = None, coupling: Sequence[dict] | None = None,
                    interference: Sequence[dict] | None = None, field: Sequence[dict] | None = None,
                    energy: Sequence[dict] | None = None, confidence: dict | None = None,
                    pressure: dict | None = None, tokens: Sequence[str] | None = None) -> str:
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
    if energy:
        sections.append(_energy_section(energy))
    if interference:
        has_strength = any("mean_strength" in r for r in interference)
        header = ["module", "τ_raw", "τ", "label"] + (["mean s_t", "min s_t", "max s_t", "strength"]
                                                      if has_strength else [])
        rows = [[r["module"], r["tau_raw"], r["temperature"], r["temperature_label"]]
                + ([r.get("mean_strength", "-"), min(r.get("strengths") or [math.nan]),
                    max(r.get("strengths") or [math.nan]), r.get("strength_label", "-")] if has_strength else [])
                for r in interference]
        sections.append("## Field interference (spec §6.4)\n\n" + _table(header, rows)
                        + ("\n\ns_t = σ(⟨x̂_t, ĝ_t⟩/τ) per token of the test sentence (its values below); mean > 0.55 "
                           "AMPLIFIED, < 0.45 SUPPRESSED" if has_strength else ""))
    if confidence:
        hit_rate = confidence["hit_rate"]
        sections.append(
            "## Prediction confidence (spec §6.5)\n\n"
            f"mean max probability {confidence['mean_max_prob']:.4g}; next-token hits "
            f"{'—' if hit_rate is None else f'{hit_rate:.1%}'}; mean entropy {confidence['mean_entropy']:.4g} nats "
            f"of ln V = {confidence['max_entropy']:.4g} (V = {confidence['vocab_size']})")
    if tokens and (confidence or energy or any("strengths" in r for r in interference or [])):
        sections.append(_per_token_section(tokens, energy, interference, confidence))
    if field:
        n = field[0].get("n_tokens", field[0]["seq_len"])
        sections.append(f"## Field layout (spec §6.6), N = {n} tokens\n\n" + _table(
            ["layer", "G", "M", "stride", "utilisation", "mean gap", "overlaps", "resolution", "kernel range",
             "G/M"],
            [[r["layer"], r["field_size"], r["max_seq_len"], r["stride"], r["utilisation"], r["mean_gap"],
              r["overlaps"], r["resolution"], r["kernel_range"], r["field_ratio"]] for r in field]))
        if pressure:
            sections.append("## Verdicts (spec §6.6)\n\n" + _table(["check", "verdict", "why"],
                                                                   verdicts(field, pressure)))
    return "\n\n".join(sections) + "\n"


DEFAULT_TEXT = "the history of the city begins in the middle ages , when a small market grew around the old bridge ."


def encode_text(checkpoint: Path, cfg, text: str, tokenizer_path: Path | None):
    """(token ids (1, N) of ``text`` under the run's own tokenizer, N ≤ seq_len; that tokenizer)."""
    from wavetrain.eval.passkey import find_tokenizer

    tokenizer, _ = find_tokenizer(checkpoint, cfg, tokenizer_path)
    ids = tokenizer.encode(text)[: int(cfg.seq_len)]
    if len(ids) < 2:
        raise ValueError(f"--text {text!r} encodes to {len(ids)} token(s): give a sentence of at least two tokens")
    return torch.tensor([ids]), tokenizer


def main(argv: list[str] | None = None) -> None:
    """CLI: print the Markdown report of a checkpoint and save it with the kernel plot under ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m wavetrain.analysis.wavefield_diagnostics",
                                     description="Wave Field diagnostics of a trained checkpoint (spec §6)")
    parser.add_argument("checkpoint", type=Path, help="checkpoint written by wavetrain training")
    parser.add_argument("--out", type=Path, required=True, help="directory for the report and the kernel plot")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the test sentence run through the model (§6.3–§6.6)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="the run's tokenizer.json (default: the one in the run directory or the data cache)")
    args = parser.parse_args(argv)

    from wavetrain import load_model

    model, cfg = load_model(args.checkpoint)
    if not _modules_of(model, WaveFieldAttention):
        raise SystemExit(f"{args.checkpoint}: the model has no WaveFieldAttention layers, nothing to report")
    try:
        ids, tokenizer = encode_text(args.checkpoint, cfg, args.text, args.tokenizer)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"wavefield_diagnostics: {error}") from None
    decode = lambda token_id: tokenizer.decode([token_id])  # noqa: E731
    report = format_markdown(kernel_table(model), coupling_report(model), interference_report(model, ids),
                             field_report(model, ids.shape[1]), energy_flow(model, ids),
                             confidence_report(model, ids, decode), vocab_pressure(model),
                             [decode(i) for i in ids[0].tolist()])
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wavefield_diagnostics.md").write_text(report, encoding="utf-8")
    print(f"kernel plot: {plot_kernels(model, args.out / 'wavefield_kernels.png')}")


if __name__ == "__main__":
    main()
