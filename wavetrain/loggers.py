"""Experiment loggers of a run: the CSV log always, plus TensorBoard or Weights & Biases (``logger=...``).

The W&B run is built by ``hydra.utils.instantiate`` from conf/logger/wandb.yaml, so every WandbLogger / wandb.init
option there (or added with ``+logger.<key>=...``) passes through; the code adds what only it knows: the run's id
(kept in the run directory, so a resumed or requeued run continues the same W&B run), its name and tags, and the
config (logged once, here; the LightningModule's hyperparameters are not logged again).
"""
from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from wavetrain.run.logs import ResumableCSVLogger, wandb_run_id

NAME_GROUPS = ("attention", "scale", "data")  # what a single run's default name and every run's tags carry


class StepAlignedWandbLogger(WandbLogger):
    """A WandbLogger whose W&B step (``_step``) is the trainer's global step, and whose resumed run replays the
    steps W&B lacks.

    Lightning's WandbLogger lets W&B count its own ``_step``, which restarts at 0 when a run resumes offline or in a
    new W&B process, so a resumed run's history would start over. Here every row is logged at the trainer's step,
    so the history of a resumed run continues from its checkpoint; and before its first row, the rows of
    ``csv_history`` (the run's logs/metrics.csv, trimmed to the checkpoint's step on resume) that the W&B run does
    not hold yet are logged again: offline all of them (each attempt writes its own offline folder), online those
    the server never received (an attempt killed with ``kill -9`` loses what wandb had not sent yet). W&B ignores
    rows for steps below the run's latest step, so no step is logged twice."""

    def __init__(self, *args, csv_history: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._csv_history = Path(csv_history) if csv_history else None
        if not kwargs.get("anonymous"):  # else wandb.init warns that the (deprecated) setting has no effect
            self._wandb_init.pop("anonymous", None)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None:
            super().log_metrics(metrics, step)
            return
        if self._csv_history is not None:
            self._replay(self._csv_history, before=step)
            self._csv_history = None
        self._log_at(metrics, step)

    def _log_at(self, metrics: Mapping[str, float], step: int) -> None:
        metrics = {(f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k): v for k, v in metrics.items()}
        self.experiment.log({**metrics, "trainer/global_step": step}, step=step)

    def _replay(self, path: Path, before: int) -> None:
        if not path.is_file():
            return
        first = self.experiment.step  # the W&B run's next step: 0 offline, after the server's rows online
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                step = int(float(row.pop("step", None) or -1))
                values = {key: float(value) for key, value in row.items() if key and value not in ("", None)}
                if first <= step < before and values:
                    self._log_at(values, step)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """CSV always (nothing depends on a remote service), plus tensorboard or W&B when chosen."""
    loggers: list[Logger] = [ResumableCSVLogger(str(run_dir), name="logs", version="")]
    kind = cfg.logger.kind
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version=""))
    elif kind == "wandb":
        loggers.append(build_wandb_logger(cfg, run_dir))
    elif kind != "csv":
        raise ValueError(f"logger.kind={kind!r} is unknown: use logger=csv, logger=tensorboard or logger=wandb")
    return loggers


def build_wandb_logger(cfg: DictConfig, run_dir: Path) -> WandbLogger:
    from hydra.utils import instantiate

    options = OmegaConf.to_container(cfg.logger, resolve=True)
    options.pop("kind")
    options.setdefault("_target_", f"{__name__}.StepAlignedWandbLogger")
    options["name"] = options.get("name") or run_name(cfg)
    options["tags"] = run_tags(cfg)
    logger = instantiate(options, _partial_=True)  # the config below holds _target_ keys that are not for here
    extra = {"csv_history": str(run_dir / "logs" / "metrics.csv")} if _accepts_csv_history(logger.func) else {}
    return logger(save_dir=str(run_dir), id=wandb_run_id(run_dir), resume="allow",
                  config=OmegaConf.to_container(cfg, resolve=True), **extra)


def _accepts_csv_history(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, StepAlignedWandbLogger)


def run_tags(cfg: DictConfig) -> list[str]:
    """``logger.tags`` plus attention, scale, data, the seed and the sweep's name (sweep files set ``sweep.name``)."""
    choices = cfg.run.get("choices") or {}
    tags = {*(cfg.logger.get("tags") or []), *(f"{g}={choices[g]}" for g in NAME_GROUPS if choices.get(g)),
            f"seed={cfg.seed}"}
    if OmegaConf.select(cfg, "sweep.name"):
        tags.add(f"sweep={cfg.sweep.name}")
    return sorted(tags)


def run_name(cfg: DictConfig) -> str:
    """What tells this run apart within its sweep: ``key=value`` of every key the multirun varies, then the seed
    (e.g. ``attention=wda seq_len=32 data.num_pairs=2 seed=1``); a single run: ``attention-scale-data seed=N``."""
    axes = multirun_axes()
    if axes is None:
        choices = cfg.run.get("choices") or {}
        return f"{'-'.join(str(choices.get(g, '')) for g in NAME_GROUPS)} seed={cfg.seed}"
    swept = [o for o in cfg.run.overrides if _key(o) in axes and _key(o) != "seed"]
    return " ".join([*(o.lstrip("+~") for o in swept), f"seed={cfg.seed}"])


def multirun_axes() -> set[str] | None:
    """In a multirun job, the keys its sweep varies: the sweep file's ``hydra.sweeper.params`` and the command
    line's comma-separated values (read from the sweep's multirun.yaml, which Hydra writes before launching any
    job, whatever the launcher); None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    axes = {key.lstrip("+~") for key in (hydra.sweeper.get("params") or {})}
    master = Path(hydra.runtime.cwd) / hydra.sweep.dir / "multirun.yaml"
    if master.is_file():
        task = OmegaConf.to_container(OmegaConf.load(master).hydra.overrides.task)
        axes |= {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}
    return axes


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")
