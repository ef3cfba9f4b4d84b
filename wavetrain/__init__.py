"""wavetrain: config-driven training and ablation sweeps of wave-based alternatives to dot-product attention.

Public API (stable):
    compose_config(overrides) -> DictConfig      the CLI's composition
    build_model(cfg, vocab_size=None) -> nn.Module   LongTensor (B, N) -> logits (B, N, V)
    build_attention(cfg, dim=None) -> nn.Module      (B, N, D) -> (B, N, D), causal
    load_model(ckpt_path) -> (nn.Module, DictConfig) a trained model and the config it was trained with
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from wavetrain.config import compose_config  # noqa: E402
from wavetrain.models.lm import build_attention, build_model  # noqa: E402
from wavetrain.run.checkpoint_io import load_model  # noqa: E402

__all__ = ["compose_config", "build_model", "build_attention", "load_model"]
