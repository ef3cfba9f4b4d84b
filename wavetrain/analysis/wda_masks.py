"""What the wave masks of a Wave-Density Attention model learned (spec wda.md §2.2–2.4; the paper's Figure 3:
sparse, localised density kernels built from smooth waves).

- ``plot_masks``: one row per WDA layer, two panels per head: the M wave masks M_m(d) over the lag d, and the
  per-mask densities g(d)·ρ(M_m(d)) with the distance window g dashed; given a probe input, the kernel that the
  last position actually applies, D_{N−1}(d) (batch row 0), is drawn on top in bold.
- ``mask_sparsity``: per head, how concentrated the densities are over the lags: the share of the mass in the
  top 10 % of lags, the Gini coefficient and the entropy divided by log L (1 = flat), averaged over the masks;
  the window-only share is listed as the baseline that the fixed Gaussian window alone gives.  With a probe
  input the same figures are added for the applied kernels at the last position (mean over the batch).  For
  density=raw, where ρ can be negative, the figures use |ρ|.

    python -m wavetrain.analysis.wda_masks CKPT --out DIR [--ids IDS.pt | --random-probe] [--seed 0]

Without ``--ids``/``--random-probe`` only the input-free masks and per-mask densities are analysed.  Figures
are drawn with the Agg canvas directly (no pyplot state).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from wavetrain.models.attention.wda import WaveDensityAttention

TOP_FRACTION = 0.1


def wda_modules(model: nn.Module) -> list[WaveDensityAttention]:
    """Every WDA sub-module (the model itself included), in module (= layer) order."""
    return [module for module in model.modules() if isinstance(module, WaveDensityAttention)]


@torch.no_grad()
def attention_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input (B, N, D) each WDA module receives when ``model`` runs on ``x`` (token ids for an LM, the
    hidden states for a bare attention module), in the order of :func:`wda_modules`."""
    modules = wda_modules(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [module.register_forward_pre_hook(
        lambda _module, args, index=index: captured.__setitem__(index, args[0].detach()))
        for index, module in enumerate(modules)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[index] for index in range(len(modules))]


def kernel_sparsity(kernels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Concentration of non-negative kernels over their last axis (L lags), one value per leading index:
    top10_mass = share of the mass in the ⌈0.1·L⌉ largest lags; gini = Gini coefficient (0 flat, (L−1)/L for a
    single spike); entropy = −Σ p log p / log L with p the normalised kernel (1 flat, 0 for a single spike)."""
    values = kernels.abs().double()
    length = values.shape[-1]
    total = values.sum(-1).clamp_min(1e-300)
    ascending = values.sort(dim=-1).values
    top = max(1, math.ceil(TOP_FRACTION * length))
    ranks = torch.arange(1, length + 1, dtype=values.dtype, device=values.device)
    gini = ((2 * ranks - length - 1) * ascending).sum(-1) / (length * total)
    p = values / total.unsqueeze(-1)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    return {"top10_mass": ascending[..., -top:].sum(-1) / total, "gini": gini,
            "entropy": entropy / math.log(length) if length > 1 else torch.zeros_like(entropy)}


@torch.no_grad()
def mask_sparsity(model: nn.Module, x: torch.Tensor | None = None) -> list[dict]:
    """One row per (layer, head): sparsity figures of the per-mask densities (mean over masks), the window-only
    baseline, and, when a probe input ``x`` is given, of the kernels applied at the last position."""
    modules = wda_modules(model)
    if not modules:
        raise ValueError("the model has no WaveDensityAttention module: mask_sparsity needs a WDA model")
    inputs = attention_inputs(model, x) if x is not None else [None] * len(modules)
    rows = []
    for module, layer_input in zip(modules, inputs):
        per_mask = kernel_sparsity(module.mask_densities())  # each (H, M)
        window_top = kernel_sparsity(module.window())["top10_mass"].item()
        applied = None
        if layer_input is not None:
            applied = kernel_sparsity(module.density_kernels(layer_input)[:, :, -1])  # each (B, H)
        for head in range(module.n_heads):
            row = {"layer": module.layer_idx, "head": head,
                   **{name: values[head].mean().item() for name, values in per_mask.items()},
                   "window_top10_mass": window_top}
            if applied is not None:
                row.update({f"kernel_{name}": values[:, head].mean().item() for name, values in applied.items()})
            rows.append(row)
    return rows


def sparsity_markdown(rows: list[dict]) -> str:
    """The rows of :func:`mask_sparsity` as a Markdown table."""
    columns = [("layer", "layer"), ("head", "head"), ("top10_mass", "top-10% lag mass"), ("gini", "Gini"),
               ("entropy", "entropy / log L"), ("window_top10_mass", "window-only top-10%")]
    if rows and "kernel_top10_mass" in rows[0]:
        columns += [("kernel_top10_mass", "applied top-10%"), ("kernel_gini", "applied Gini"),
                    ("kernel_entropy", "applied entropy / log L")]
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---:" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row[key]) if key in ("layer", "head") else f"{row[key]:.3f}"
                                       for key, _ in columns) + " |")
    return "\n".join(lines)


@torch.no_grad()
def plot_masks(model: nn.Module, path: str | Path, x: torch.Tensor | None = None) -> Path:
    """Write the mask / density figure of every WDA layer and head of ``model`` to ``path`` (PNG)."""
    modules = wda_modules(model)
    if not modules:
        raise ValueError("the model has no WaveDensityAttention module: plot_masks needs a WDA model")
    inputs = attention_inputs(model, x) if x is not None else [None] * len(modules)
    heads = max(module.n_heads for module in modules)
    figure = Figure(figsize=(3.6 * 2 * heads, 2.6 * len(modules)), layout="constrained")
    axes = figure.subplots(len(modules), 2 * heads, squeeze=False)
    for row, (module, layer_input) in enumerate(zip(modules, inputs)):
        masks = module.render_masks().float().cpu()
        densities = module.mask_densities().float().cpu()
        window = module.window().float().cpu()
        lags = torch.arange(module.seq_len)
        applied = module.density_kernels(layer_input)[0, :, -1].float().cpu() if layer_input is not None else None
        colours = [f"C{index % 10}" for index in range(module.num_masks)]
        for head in range(heads):
            mask_axis, density_axis = axes[row, 2 * head], axes[row, 2 * head + 1]
            if head >= module.n_heads:
                mask_axis.set_visible(False)
                density_axis.set_visible(False)
                continue
            for mask in range(module.num_masks):
                mask_axis.plot(lags, masks[head, mask], lw=0.7, color=colours[mask])
                density_axis.plot(lags, densities[head, mask], lw=0.7, alpha=0.6, color=colours[mask])
            density_axis.plot(lags, window, "k--", lw=1.0, label="window g(d)")
            if applied is not None:
                density_axis.plot(torch.arange(applied.shape[-1]), applied[head], color="crimson", lw=2.0,
                                  label=r"applied $D_{N-1}(d)$")
            mask_axis.set_title(f"layer {module.layer_idx} head {head}: masks M_m(d)", fontsize=9)
            density_axis.set_title(f"layer {module.layer_idx} head {head}: densities ({module.density})",
                                   fontsize=9)
            for axis in (mask_axis, density_axis):
                axis.set_xlabel("lag d", fontsize=8)
                axis.tick_params(labelsize=7)
            if row == 0 and head == 0:
                density_axis.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def _vocab_size(model: nn.Module) -> int:
    embeddings = [module for module in model.modules() if isinstance(module, nn.Embedding)]
    if not embeddings:
        raise ValueError("the model has no nn.Embedding to draw probe token ids from: pass --ids")
    return embeddings[0].num_embeddings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wavetrain.analysis.wda_masks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a wavetrain .ckpt of a WDA model")
    parser.add_argument("--out", type=Path, required=True, help="directory for wda_masks.png and wda_sparsity.md")
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument("--ids", type=Path, default=None,
                       help="torch-saved LongTensor (B, N) of token ids: also analyse the applied kernels")
    probe.add_argument("--random-probe", action="store_true",
                       help="analyse the applied kernels on uniformly random token ids of length seq_len")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random probe ids")
    args = parser.parse_args(argv)

    from wavetrain import load_model

    model, cfg = load_model(args.checkpoint)
    ids = None
    if args.ids is not None:
        ids = torch.load(args.ids).long()
    elif args.random_probe:
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(_vocab_size(model), (1, int(cfg.seq_len)), generator=generator)
    table = sparsity_markdown(mask_sparsity(model, ids))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wda_sparsity.md").write_text(table + "\n")
    print(plot_masks(model, args.out / "wda_masks.png", ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
