"""CLI: ``python -m wavetrain [group=choice ...] [key=value ...]`` (Hydra; ``--help`` lists every group).

A refused run (a bad setting, an unusable file, a full or read-only disk, a diverged loss) prints one line,
``wavetrain: <what is wrong>: <the fix>``, and exits with status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback.
Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from wavetrain.config import CONF_DIR, GROUPS, ConfigError, check_cli_overrides, check_run_dir_override  # noqa: E402
from wavetrain.sweep import dry_run  # noqa: E402  (also registers the sweep files' seed resolver)

@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from wavetrain.run.rundir import HydraRecord
    from wavetrain.train import train

    hydra_cfg = HydraConfig.get()
    record = HydraRecord.from_hydra(cfg, HydraConfig.instance().cfg)  # as Hydra would have saved it
    with open_dict(cfg):
        cfg.run.overrides = list(hydra_cfg.overrides.task)
        cfg.run.choices = {g: hydra_cfg.runtime.choices.get(g) for g in GROUPS}
        if cfg.run.ckpt_path:  # relative to the directory the command was run from, not the job's directory
            cfg.run.ckpt_path = os.path.abspath(os.path.join(hydra_cfg.runtime.cwd,
                                                             os.path.expanduser(str(cfg.run.ckpt_path))))
    try:
        results = train(cfg, hydra=record)
    except BaseException as error:
        finish_wandb(cfg, exit_code=1)
        message = refusal_message(error)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"wavetrain: {message}", file=sys.stderr, flush=True)
        if hydra_cfg.mode == RunMode.MULTIRUN and not isinstance(error, KeyboardInterrupt):
            return None  # the sweep goes on; wavetrain.multirun.FailedJobs sets its exit status
        raise SystemExit(130 if isinstance(error, KeyboardInterrupt) else 1) from None
    finish_wandb(cfg, exit_code=0)
    return results.get("best_val_loss")


def refusal_message(error: BaseException) -> str | None:
    """The one-line message of an error that refuses or stops a run for a reason the user can fix (None for
    anything else: a bug, whose traceback matters)."""
    from wavetrain.run.checkpoint_io import storage_error, storage_failure
    from wavetrain.run.guards import NonFiniteLossError

    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C): rerun the same command in the same run directory to resume"
    if isinstance(error, (ConfigError, NonFiniteLossError)):
        return " ".join(str(error).split())
    cause = storage_failure(error)
    if cause is not None:
        if cause.filename:
            return str(storage_error(cause, Path(cause.filename), "to"))
        return str(storage_error(cause, Path.cwd(), "into the run directory"))  # a write through an open file
    return None


def finish_wandb(cfg: DictConfig, exit_code: int) -> None:
    """Close this job's W&B run: the jobs of a sequential multirun share one process, and an open run would be
    reused (and mislabelled) by the next job."""
    if cfg.logger.kind == "wandb":
        import wandb

        wandb.finish(exit_code=exit_code)


if __name__ == "__main__":
    if "--dry-run" in sys.argv[1:]:
        sys.exit(dry_run(sys.argv[1:]))
    if not any(arg.startswith("-") and arg not in ("-m", "--multirun") for arg in sys.argv[1:]):
        try:  # misspelt group options and keys fail here, before Hydra creates any directory
            check_cli_overrides(sys.argv[1:])
            check_run_dir_override(sys.argv[1:])
        except ConfigError as error:
            print(f"wavetrain: {error}", file=sys.stderr)
            sys.exit(1)
    main()
