"""Reading trained models back from Lightning checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn


def load_model(ckpt_path: str | Path) -> tuple[nn.Module, DictConfig]:
    """The trained LM (eval mode, on CPU) and the composed config it was trained with."""
    from wavetrain.models.lm import build_model

    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a .ckpt from a run's checkpoints/ folder")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters", {})
    if "cfg" not in hparams:
        raise ValueError(f"{path} is not a wavetrain checkpoint (no config in its hyper_parameters)")
    cfg = OmegaConf.create(hparams["cfg"])
    model = build_model(cfg, int(hparams["vocab_size"]))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval(), cfg
