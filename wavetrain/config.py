"""Config composition (the same as the CLI's) and validation before any work starts."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

# ${max:a,b} in configs, e.g. DWARF's learned position table: 2050 rows, or seq_len when that is longer
if not OmegaConf.has_resolver("max"):
    OmegaConf.register_new_resolver("max", lambda *values: max(values))

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("attention", "scale", "data", "tokenizer", "optim", "trainer", "logger")


class ConfigError(ValueError):
    """An invalid setting: the message names the key, the value and the fix."""


def group_choices(group: str) -> list[str]:
    """Every option of a config group (the yaml files of conf/<group>/)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with command-line style overrides, exactly as ``python -m wavetrain`` does."""
    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="wavetrain"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.run.overrides = overrides
        cfg.run.choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
        del cfg["hydra"]
    return cfg


def _positive(cfg: DictConfig, key: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value} must be positive: set {key} to a value > 0")


def validate_config(cfg: DictConfig) -> None:
    """Reject settings that would waste a run, before any data or model is built."""
    for key in ("d_model", "n_layers", "n_heads", "ffn_dim"):
        _positive(cfg, f"scale.{key}", cfg.scale[key])
    if cfg.scale.d_model % cfg.scale.n_heads:
        raise ConfigError(f"scale.d_model={cfg.scale.d_model} is not divisible by scale.n_heads={cfg.scale.n_heads}: "
                          f"choose n_heads dividing d_model")
    if not 0 <= cfg.scale.dropout < 1:
        raise ConfigError(f"scale.dropout={cfg.scale.dropout} must be in [0, 1)")
    _positive(cfg, "seq_len", cfg.seq_len)
    _positive(cfg, "data.batch_size", cfg.data.batch_size)
    _positive(cfg, "trainer.max_steps", cfg.trainer.max_steps)
    _positive(cfg, "optim.lr", cfg.optim.lr)
    if cfg.optim.min_lr < 0 or cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} must lie in [0, optim.lr={cfg.optim.lr}]: lower min_lr")
    if cfg.optim.warmup_steps < 0 or cfg.optim.warmup_steps >= cfg.trainer.max_steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must lie in [0, trainer.max_steps="
                          f"{cfg.trainer.max_steps}): shorten the warmup or train longer")
