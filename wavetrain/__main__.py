"""CLI: ``python -m wavetrain [group=choice ...] [key=value ...]`` (Hydra; ``--help`` lists every group)."""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from wavetrain.config import CONF_DIR, GROUPS  # noqa: E402


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from wavetrain.train import train

    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):
        cfg.run.overrides = list(hydra_cfg.overrides.task)
        cfg.run.choices = {g: hydra_cfg.runtime.choices.get(g) for g in GROUPS}
    results = train(cfg)
    return results.get("best_val_loss")


if __name__ == "__main__":
    main()
