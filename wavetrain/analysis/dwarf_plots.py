"""Plots of what a DWARF model learned (spec dwarf.md §3): one PNG per quantity, one panel per attention layer.

- dyadic family (condG–P): the scale gains softmax_j(scale_gain[:, h]) over the 11 scales, the position bias of
  every tap slot, and the effective weight each head gives each read offset on a probe batch (mean over batch and
  over the positions where every read offset is in range; D4 weights divided by Z for condK, bypass included);
- field family (condA–F): the per-head causal kernels k_h(t) (first 256 field cells, and |k_h| on log axes over
  the whole field) and the head-coupling matrix softmax_row(C).

    python -m wavetrain.analysis.dwarf_plots CKPT --out DIR [--ids IDS.pt] [--seed 0]

The probe batch is uniformly random token ids of length seq_len unless ``--ids`` gives a saved LongTensor (B, N)
of real text; the scale gains, biases and kernels do not depend on it.  Figures are drawn with the Agg canvas
directly (no pyplot state).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from wavetrain.models.attention.dwarf import DwarfDyadicAttention, DwarfFieldAttention
from wavetrain.models.attention.dwarf.dyadic import DYADIC_SCALES

KERNEL_LAGS = 256   # field cells shown on the linear kernel panel


def dwarf_modules(model: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    """(name, module) of every ``kind`` sub-module, in module (= layer) order."""
    return [(name or type(module).__name__, module) for name, module in model.named_modules()
            if isinstance(module, kind)]


@torch.no_grad()
def attention_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input x (B, N, D) that each DWARF attention module receives when the model runs on ``ids``."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in dwarf_modules(model, DwarfDyadicAttention):
        handles.append(module.register_forward_pre_hook(
            lambda _module, args, name=name: captured.__setitem__(name, args[0].detach())))
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _grid(count: int, width: float = 5.0, height: float = 3.4, columns: int = 3) -> tuple[Figure, list]:
    columns = min(columns, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten().tolist()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes[:count]


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path


@torch.no_grad()
def plot_scale_gains(modules: list[tuple[str, nn.Module]], path: Path) -> Path | None:
    """softmax_j(scale_gain[:, h]) per head over the 11 scales (the prior part of condI–K's query gains)."""
    modules = [(name, module) for name, module in modules if hasattr(module, "scale_gain")]
    if not modules:
        return None
    figure, axes = _grid(len(modules))
    for axis, (name, module) in zip(axes, modules):
        gains = module.scale_gain.float().softmax(0)                       # (11, H)
        for head in range(gains.shape[1]):
            axis.plot(range(DYADIC_SCALES), gains[:, head], marker="o", label=f"h{head}")
        axis.set(title=name, xlabel="scale j (dilation 2^j)", ylabel="gain", xticks=range(DYADIC_SCALES))
    axes[0].legend(fontsize=7, ncol=2)
    figure.suptitle("scale gains softmax_j(scale_gain)")
    return _save(figure, path)


@torch.no_grad()
def plot_position_bias(modules: list[tuple[str, nn.Module]], path: Path) -> Path | None:
    """pos_bias[t, h] over the tap slots, labelled by offset (and (j, τ) for the 44 D4 slots)."""
    modules = [(name, module) for name, module in modules if hasattr(module, "pos_bias")]
    if not modules:
        return None
    figure, axes = _grid(len(modules), width=7.0)
    for axis, (name, module) in zip(axes, modules):
        bias = module.pos_bias.float()                                     # (T, H)
        for head in range(bias.shape[1]):
            axis.plot(range(bias.shape[0]), bias[:, head], marker=".", label=f"h{head}")
        labels = [f"{o}" if j < 0 else f"{o} ({j},{t})" for j, t, o in
                  zip(module.slot_scales, module.slot_taps, module.slot_offsets)]
        step = max(1, len(labels) // 24)
        axis.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=6)
        axis.set(title=name, xlabel="tap slot: offset (j, τ)", ylabel="pos_bias")
    axes[0].legend(fontsize=7, ncol=2)
    figure.suptitle("position bias per tap slot")
    return _save(figure, path)


@torch.no_grad()
def plot_offset_weights(modules: list[tuple[str, nn.Module]], inputs: dict[str, torch.Tensor],
                        path: Path) -> Path | None:
    """Mean effective weight per read offset and head on the probe batch (x axis: offset + 1, log scale)."""
    modules = [(name, module) for name, module in modules if name in inputs]
    if not modules:
        return None
    figure, axes = _grid(len(modules))
    for axis, (name, module) in zip(axes, modules):
        offsets, weights = module.offset_weights(inputs[name])             # (B or 1, H, N or 1, U)
        if weights.shape[2] > 1:
            weights = weights[:, :, max(offsets):]                         # rows where every offset is in range
        mean = weights.float().mean(dim=(0, 2))                            # (H, U)
        for head in range(mean.shape[0]):
            axis.plot([o + 1 for o in offsets], mean[head], marker=".", label=f"h{head}")
        axis.set_xscale("log")
        axis.set(title=name, xlabel="offset + 1", ylabel="mean weight")
    axes[0].legend(fontsize=7, ncol=2)
    figure.suptitle("effective weight per read offset (probe batch)")
    return _save(figure, path)


@torch.no_grad()
def plot_kernels(modules: list[tuple[str, nn.Module]], path: Path) -> Path | None:
    """Per layer: k_h(t) for t < 256 cells, and |k_h(t)| over the whole field on log-log axes."""
    if not modules:
        return None
    figure = Figure(figsize=(12, 3.2 * len(modules)), layout="constrained")
    axes = figure.subplots(len(modules), 2, squeeze=False)
    for (linear, logarithmic), (name, module) in zip(axes, modules):
        kernels = module.kernels().float()                                 # (H, G)
        lags = torch.arange(1, kernels.shape[1] + 1)
        for head in range(kernels.shape[0]):
            linear.plot(kernels[head, :KERNEL_LAGS], label=f"h{head}")
            logarithmic.loglog(lags, kernels[head].abs().clamp(min=1e-12))
        linear.set(title=f"{name}: k_h(t)", xlabel="lag t (field cells)")
        logarithmic.set(title=f"{name}: |k_h(t)| (G = {module.field_size})", xlabel="lag t + 1 (field cells)")
    axes[0][0].legend(fontsize=7, ncol=2)
    return _save(figure, path)


@torch.no_grad()
def plot_coupling(modules: list[tuple[str, nn.Module]], path: Path) -> Path | None:
    """softmax_row(field_coupling): row = receiving head (condA–I)."""
    modules = [(name, module) for name, module in modules if hasattr(module, "field_coupling")]
    if not modules:
        return None
    figure, axes = _grid(len(modules), width=3.6, height=3.2, columns=6)
    for axis, (name, module) in zip(axes, modules):
        image = axis.imshow(module.field_coupling.float().softmax(-1), vmin=0, vmax=1, cmap="viridis")
        axis.set(title=name, xlabel="source head", ylabel="receiving head")
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _save(figure, path)


def plot_model(model: nn.Module, out_dir: Path, ids: torch.Tensor | None = None) -> list[Path]:
    """Write every plot that applies to ``model`` into ``out_dir``; ``ids`` (B, N) is the probe batch for the
    offset weights (skipped when None). Returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dyadic = dwarf_modules(model, DwarfDyadicAttention)
    field = dwarf_modules(model, DwarfFieldAttention)
    inputs = attention_inputs(model, ids) if ids is not None and dyadic else {}
    written = [plot_scale_gains(dyadic, out_dir / "scale_gains.png"),
               plot_position_bias(dyadic, out_dir / "position_bias.png"),
               plot_offset_weights(dyadic, inputs, out_dir / "offset_weights.png"),
               plot_kernels(field, out_dir / "field_kernels.png"),
               plot_coupling(dyadic + field, out_dir / "head_coupling.png")]
    return [path for path in written if path is not None]


def _vocab_size(model: nn.Module) -> int:
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise ValueError("the model has no nn.Embedding to draw probe token ids from: pass --ids")
    return embedding.num_embeddings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wavetrain.analysis.dwarf_plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a wavetrain .ckpt of a DWARF model")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNG files")
    parser.add_argument("--ids", type=Path, default=None,
                        help="torch-saved LongTensor (B, N) of token ids for the offset weights (default: random)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random probe ids")
    args = parser.parse_args(argv)

    from wavetrain import load_model

    model, cfg = load_model(args.checkpoint)
    if not dwarf_modules(model, DwarfDyadicAttention) and not dwarf_modules(model, DwarfFieldAttention):
        parser.error(f"{args.checkpoint} holds no DWARF attention module (condA–P)")
    if args.ids is not None:
        ids = torch.load(args.ids).long()
    else:
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(_vocab_size(model), (1, int(cfg.seq_len)), generator=generator)
    for path in plot_model(model, args.out, ids):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
