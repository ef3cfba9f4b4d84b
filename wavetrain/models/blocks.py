"""The residual block of the shared shell: attention branch, optional interference, FFN branch.

Pre-LN (GPT-2, Wave Field, DWARF) or Post-LN (WDA, spec wda.md §1) placement is a model option; the block never
branches on which attention it holds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class FeedForward(nn.Module):
    """Linear -> exact GELU -> Linear, with dropout after the GELU and/or after the second Linear.

    The dropout sites differ between the specs: GPT-2 / DWARF E–P drop after the GELU only (dwarf.md §1), the
    DWARF A–D shell and Wave Field drop after both (dwarf.md §1.A, wavefield.md §1)."""

    def __init__(self, dim: int, hidden: int, dropout: float, dropout_sites: list[str]) -> None:
        super().__init__()
        unknown = set(dropout_sites) - {"hidden", "output"}
        if unknown:
            raise ValueError(f"model.ffn_dropout has unknown sites {sorted(unknown)}: use a subset of [hidden, output]")
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.hidden_dropout = nn.Dropout(dropout if "hidden" in dropout_sites else 0.0)
        self.output_dropout = nn.Dropout(dropout if "output" in dropout_sites else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dropout(self.down(self.hidden_dropout(nn.functional.gelu(self.up(x)))))


class Block(nn.Module):
    """x <- x + Drop(Attn(LN1 x)); [interference]; x <- x + FFN(LN2 x)   (pre-norm), or the post-norm variant
    x <- LN1(x + Drop(Attn x)); [interference]; x <- LN2(x + FFN x)."""

    def __init__(self, dim: int, attention: nn.Module, ffn: FeedForward, *, norm: str, attn_output_dropout: float,
                 interference: nn.Module | None, interference_site: str, checkpoint_attention: bool) -> None:
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"model.norm={norm!r} is not a norm placement: use pre or post")
        if interference_site not in ("after_attention", "after_block"):
            raise ValueError(f"model.interference.site={interference_site!r}: use after_attention or after_block")
        self.pre_norm = norm == "pre"
        self.norm1 = nn.LayerNorm(dim)
        self.attention = attention
        self.attn_dropout = nn.Dropout(attn_output_dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.interference = interference
        self.interference_site = interference_site
        self.checkpoint_attention = checkpoint_attention

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_attention and self.training:
            return checkpoint(self.attention, x, use_reentrant=False)
        return self.attention(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn_dropout(self._attend(self.norm1(x)))
        else:
            x = self.norm1(x + self.attn_dropout(self._attend(x)))
        if self.interference is not None and self.interference_site == "after_attention":
            x = self.interference(x)
        x = x + self.ffn(self.norm2(x)) if self.pre_norm else self.norm2(x + self.ffn(x))
        if self.interference is not None and self.interference_site == "after_block":
            x = self.interference(x)
        return x
