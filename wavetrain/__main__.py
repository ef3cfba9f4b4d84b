"""CLI: ``python -m wavetrain [group=choice ...] [key=value ...]`` (Hydra; ``--help`` lists every group)."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from wavetrain.config import CONF_DIR, GROUPS, ConfigError, check_cli_overrides  # noqa: E402
from wavetrain.sweep import dry_run  # noqa: E402  (also registers the sweep files' seed resolver)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from wavetrain.train import train

    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):
        cfg.run.overrides = list(hydra_cfg.overrides.task)
        cfg.run.choices = {g: hydra_cfg.runtime.choices.get(g) for g in GROUPS}
    try:
        results = train(cfg)
    except Exception as error:
        record_failure(cfg, error)
        finish_wandb(cfg, exit_code=1)
        raise
    finish_wandb(cfg, exit_code=0)
    return results.get("best_val_loss")


def finish_wandb(cfg: DictConfig, exit_code: int) -> None:
    """Close this job's W&B run: the jobs of a sequential multirun share one process, and an open run would be
    reused (and mislabelled) by the next job."""
    if cfg.logger.kind == "wandb":
        import wandb

        wandb.finish(exit_code=exit_code)


def record_failure(cfg: DictConfig, error: BaseException) -> None:
    """results.json with status "failed" and the error's first line, so a sweep's report shows why a row failed.
    A finished run's results are never replaced (a failed rerun leaves them), nor is a directory another live run
    holds written to."""
    from pathlib import Path

    from wavetrain.callbacks import write_json_atomic
    from wavetrain.run.rundir import RunDirInUse, read_results

    previous = read_results(Path.cwd() / cfg.run.results_file)
    if isinstance(error, RunDirInUse) or (previous or {}).get("status") == "done":
        return
    message = (str(error).strip().splitlines() or [""])[0]
    write_json_atomic(Path.cwd() / cfg.run.results_file, {
        "status": "failed", "error": f"{type(error).__name__}: {message}" if message else type(error).__name__,
        "overrides": list(cfg.run.overrides), "choices": dict(cfg.run.choices)})


if __name__ == "__main__":
    if "--dry-run" in sys.argv[1:]:
        sys.exit(dry_run(sys.argv[1:]))
    if not any(arg.startswith("-") and arg not in ("-m", "--multirun") for arg in sys.argv[1:]):
        try:  # misspelt group options and keys fail here, before Hydra creates any directory
            check_cli_overrides(sys.argv[1:])
        except ConfigError as error:
            print(f"wavetrain: {error}", file=sys.stderr)
            sys.exit(1)
    main()
