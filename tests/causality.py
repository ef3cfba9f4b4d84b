"""Shared causality checks for every attention module and model (DEVELOPERS.md: every variant is causal).

Two independent probes, both in float64 so that a real leak (1e-6 … 1) stands far above round-off (1e-15):
- ``dependency_matrix``: gradient of each output position w.r.t. each input position (Jacobian norm),
  which gives the exact set of positions an output reads;
- ``max_future_influence``: perturb x[:, p:] and measure the change of y[:, :p] (the spec §7.1 probe).
"""
from __future__ import annotations

import torch
from torch import nn


def dependency_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return A (N, N) with A[i, j] = ||d y_i / d x_j|| summed over batch and channels (a ones-vector probe
    per output position i).  Exact zero where output i does not read input j."""
    module.eval()
    n = x.shape[1]
    dep = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        xi = x.detach().clone().requires_grad_(True)
        y = module(xi)
        # random probe direction avoids cancellations that a ones-vector could produce
        probe = torch.randn(y.shape[0], y.shape[2], dtype=y.dtype, generator=torch.Generator().manual_seed(i))
        (grad,) = torch.autograd.grad((y[:, i] * probe).sum(), xi, allow_unused=True)
        if grad is not None:
            dep[i] = grad.abs().sum(dim=(0, 2)).to(torch.float64)
    return dep


def max_future_influence(module: nn.Module, x: torch.Tensor, positions: list[int] | None = None) -> float:
    """Largest |Δ y[:, :p]| when x[:, p:] is replaced by fresh noise, over the given cut positions p."""
    module.eval()
    n = x.shape[1]
    positions = positions if positions is not None else list(range(1, n))
    gen = torch.Generator().manual_seed(1234)
    worst = 0.0
    with torch.no_grad():
        base = module(x)
        for p in positions:
            x2 = x.clone()
            x2[:, p:] = torch.randn(x2[:, p:].shape, dtype=x.dtype, generator=gen)
            worst = max(worst, (module(x2)[:, :p] - base[:, :p]).abs().max().item())
    return worst


def assert_causal(module: nn.Module, n: int, dim: int, batch: int = 2, tol: float = 1e-12,
                  positions: list[int] | None = None) -> None:
    """fp64 module-level causality: output at i never depends on inputs j > i."""
    module = module.double()
    x = torch.randn(batch, n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leak = max_future_influence(module, x, positions)
    assert leak < tol, f"future tokens change past outputs by {leak:.3e} (tolerance {tol:.0e})"
