"""Lightning Trainer arguments from ``trainer.*``: checked before the run starts (one-line ConfigErrors naming the
key and the fix, instead of Lightning's errors from inside ``L.Trainer``), with bf16 resolved for this machine."""
from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import get_args

import torch
from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from omegaconf import DictConfig, OmegaConf

from wavetrain.config import ConfigError

PRECISIONS = tuple(str(p) for p in (*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS),
                                    *get_args(_PRECISION_INPUT_INT)))
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def cpu_supports_bf16() -> bool:
    """Native bf16 on this CPU (avx512_bf16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.mps.is_available()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """The requested precision, or 32-true with a warning where bf16 is unsupported."""
    precision = str(trainer_cfg.precision)
    if not precision.startswith("bf16"):
        return precision
    wants_gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (trainer_cfg.accelerator == "auto"
                                                               and torch.cuda.is_available())
    supported = torch.cuda.is_bf16_supported() if wants_gpu and torch.cuda.is_available() else cpu_supports_bf16()
    if not supported:
        warnings.warn(f"trainer.precision={precision} requested but this {'GPU' if wants_gpu else 'CPU'} has no "
                      f"bf16 support: falling back to 32-true (set trainer.precision=32-true to silence this)")
        return "32-true"
    return precision


def _hardware_missing(accelerator: str) -> str | None:
    """Why ``accelerator`` cannot run on this machine, or None."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return "needs a CUDA GPU and this machine has none"
    if accelerator == "mps" and not torch.backends.mps.is_available():
        return "needs Apple's MPS and this machine has none"
    if accelerator == "tpu" and importlib.util.find_spec("torch_xla") is None:
        return "needs a TPU (torch_xla) and this machine has none"
    return None


def _check_devices(devices) -> None:
    if isinstance(devices, bool):
        valid = False
    elif isinstance(devices, int):
        valid = devices >= 1 or devices == -1
    elif isinstance(devices, str):
        valid = devices == "auto" or all(part.strip().lstrip("-").isdigit() for part in devices.split(",") if part)
    else:
        valid = isinstance(devices, list) and bool(devices) and all(isinstance(d, int) and not isinstance(d, bool)
                                                                    and d >= 0 for d in devices)
    if not valid:
        raise ConfigError(f"trainer.devices={devices!r} is not a device count: give a positive number "
                          f"(trainer.devices=1), a list of device indices ([0,1]), -1 or auto for all devices")


def trainer_arguments(cfg: DictConfig) -> dict:
    """``trainer.*`` as L.Trainer keyword arguments, refused here (ConfigError) where Lightning would refuse them:
    unknown accelerator or precision, hardware this machine lacks, a bad device count or strategy."""
    trainer = cfg.trainer
    choice = (cfg.run.get("choices") or {}).get("trainer")
    accelerator = str(trainer.accelerator)
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator!r} is unknown: use one of {list(ACCELERATORS)}")
    missing = _hardware_missing(accelerator)
    if missing:
        via = f"trainer={choice} sets trainer.accelerator={accelerator}" if choice not in (None, "default") else \
            f"trainer.accelerator={accelerator}"
        raise ConfigError(f"{via}, which {missing}: use trainer=default (accelerator auto) or "
                          f"trainer.accelerator=cpu")
    _check_devices(trainer.devices)
    if str(trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={trainer.precision!r} is unknown: use one of 32-true, bf16-mixed, "
                          f"16-mixed, bf16-true, 16-true, 64-true")
    args = OmegaConf.to_container(trainer, resolve=True)
    args["precision"] = resolve_precision(trainer)
    _check_with_lightning(args)
    return args


def _check_with_lightning(args: dict) -> None:
    """What remains (strategy names, device/strategy combinations): Lightning's own accelerator connector, the
    first thing L.Trainer builds, run here so that its refusal comes before the run directory is touched."""
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    keys = ("devices", "num_nodes", "accelerator", "strategy", "precision")
    quiet = logging.getLogger("lightning.pytorch")  # its notes come again when the real Trainer is built
    level = quiet.level
    try:
        quiet.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _AcceleratorConnector(**{k: args[k] for k in keys if k in args},
                                  deterministic=args.get("deterministic"))
    except Exception as error:  # noqa: BLE001 - Lightning raises ValueError/TypeError/MisconfigurationException
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        named = [k for k in keys if k in text] or ["accelerator", "devices", "strategy", "precision"]
        settings = ", ".join(f"trainer.{k}={args.get(k)!r}" for k in named)
        raise ConfigError(f"{settings}: Lightning refuses this: {text} Fix {' / '.join('trainer.' + k for k in named)}"
                          f" (conf/trainer/ lists working combinations)") from None
    finally:
        quiet.setLevel(level)
