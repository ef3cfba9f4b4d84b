"""The run's metrics log (metrics.csv continued across resumes) and its W&B run id."""
from __future__ import annotations

import csv
import hashlib
import os
import time
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

WANDB_ID_FILE = "wandb_run_id"


def global_rank_from_env() -> int:
    """This process' global rank as the launchers export it (0 when launched alone)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps it and appends (a resumed run)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resumed run (rows are appended, the header kept)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_metrics(metrics_path: Path, resume_step: int) -> None:
    """Drop the rows an interrupted attempt logged after its checkpoint at ``resume_step``: the resumed run logs
    them again.  (Lightning labels a training row with its 0-based step index and a validation row with the index
    of the step before it, so rows labelled >= resume_step all come after the checkpoint.)"""
    if not metrics_path.is_file():
        return
    with open(metrics_path, newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = reader.fieldnames or [], list(reader)

    kept = [row for row in rows if int(float(row.get("step") or 0)) < resume_step]
    if len(kept) == len(rows):
        return
    tmp = metrics_path.with_name(metrics_path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, metrics_path)


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory (created once, kept in ``wandb_run_id``), so that a resumed or
    requeued run logs into the same W&B run."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = hashlib.sha1(f"{os.getpid()}-{time.time_ns()}-{os.urandom(8).hex()}".encode()).hexdigest()[:12]
    if global_rank_from_env() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    return run_id
