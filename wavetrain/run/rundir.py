"""The run directory: its lock, results, metrics log and W&B id."""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from wavetrain.config import ConfigError
from wavetrain.run.checkpoint_io import _digest_path
from wavetrain.run.resume import ResumePlan

log = logging.getLogger(__name__)

LOCK_FILE = ".wavetrain.lock"
WANDB_ID_FILE = "wandb_run_id"


class RunDirInUse(ConfigError):
    """The run directory is locked by another live wavetrain process."""


def global_rank_from_env() -> int:
    """This process' global rank as the launchers export it (0 when launched alone)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def tidy_checkpoint_dir(plan: ResumePlan, ckpt_dir: Path) -> None:
    """Before a resumed run writes (holding the run-directory lock): rename unreadable checkpoints to
    ``<name>.corrupt`` so that no later save rotates one over a good file, and delete the partial temporary files
    of saves that a killed process never finished."""
    for partial in ckpt_dir.glob(".*.tmp-*") if ckpt_dir.is_dir() else []:
        partial.unlink(missing_ok=True)
    for path, reason in plan.unreadable:
        target = path.with_name(path.name + ".corrupt")
        os.replace(path, target)
        digest = _digest_path(path)
        if digest.exists():
            os.replace(digest, _digest_path(target))
        log.warning("%s; kept as %s", reason, target.name)


class RunDirLock:
    """An exclusive lock on the run directory for the life of the run: a second process in the same directory
    gets a clear error instead of writing beside the first.  The kernel drops it when the holder dies (kill -9)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirInUse(f"hydra.run.dir={self.path.parent} is in use by another wavetrain run ({holder}): "
                              f"wait for it to finish, or give this run its own hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     .encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def read_results(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished_results(results_path: Path, max_steps: int) -> dict | None:
    """The saved results when the run directory holds a run finished at ``max_steps`` or later, else None."""
    results = read_results(results_path)
    if not results or results.get("status") != "done" or int(results.get("steps") or 0) < int(max_steps):
        return None
    return results


def rotate_results(results_path: Path) -> Path | None:
    """Keep an earlier finished run's results as ``results.<k>.json`` (first free k) before this run writes its
    own; a record of a failed or preempted attempt is not a result and is simply replaced later."""
    results = read_results(results_path)
    if not results or results.get("status") != "done":
        return None
    k = 1
    while (target := results_path.with_name(f"{results_path.stem}.{k}{results_path.suffix}")).exists():
        k += 1
    os.replace(results_path, target)
    return target


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
