"""What the DWARF modules share (spec dwarf.md §1, §3 notation): the D4 taps, head split and merge, the channel
norm of the deposits, dtype and option checks."""
from __future__ import annotations

import torch
from torch import nn

# Daubechies-4 low-pass coefficients h_0 … h_3 (spec §3 notation).
D4_COEFFICIENTS = (0.4829629131445341, 0.8365163037378079, 0.2241438680420134, -0.1294095225512604)
D4_TAPS = 4             # τ = 0..3


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # Weights, softmaxes and normalisers run in fp32 even under bf16/fp16 autocast (fp64 in the fp64 tests).
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def choice(setting: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{setting}={value!r} is not one of {list(allowed)}")
    return value


def split_heads(qkv: nn.Linear, x: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # qkv = one Linear(d → 3d) split in the order q, k, v; head h owns channels h·d_h … (h+1)·d_h − 1 (spec §1).
    batch, n, dim = x.shape
    q, k, v = qkv(x).view(batch, n, 3, n_heads, dim // n_heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def split_heads_by_token(qkv: nn.Linear, x: torch.Tensor, n_heads: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # q, k, v of split_heads as token-major views (B, N, H, d_h).
    batch, n, dim = x.shape
    q, k, v = qkv(x).view(batch, n, 3, n_heads, dim // n_heads).unbind(2)
    return q, k, v


def linear_by_channel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # A Linear's output channel-major, (B, N, D_in) -> (B, D_out, N), as one batched GEMM (no transposing copy).
    return torch.baddbmm(bias[:, None], weight.expand(x.shape[0], -1, -1), x.transpose(1, 2))


def channel_norm(k: torch.Tensor) -> torch.Tensor:
    # ‖k‖₂ over the channel axis −2, keepdim.  A square-sum-root: torch.norm reduces a non-innermost axis about ten
    # times slower.  The double where keeps torch.norm's zero gradient at ‖k‖ = 0 (the root's own would be NaN).
    squares = (k * k).sum(-2, keepdim=True)
    positive = squares > 0
    return torch.where(positive, torch.where(positive, squares, 1.0).sqrt(), 0.0)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    batch, heads, n, head_dim = y.shape
    return y.transpose(1, 2).reshape(batch, n, heads * head_dim)


def check_heads(dim: int, n_heads: int) -> None:
    if dim % n_heads:
        raise ValueError(f"d_model={dim} is not divisible by n_heads={n_heads}: pick n_heads dividing d_model")

