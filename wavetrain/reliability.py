"""Reliability: exact resume, atomic checkpoints, preemption, divergence guard and run-directory hygiene.

Exact resume.  A run directory keeps ``checkpoints/last.ckpt`` (every ``run.checkpoint_every_n_steps`` optimiser
steps, at the end of training and on preemption; always at a step boundary) and the checkpoint it replaced as
``checkpoints/previous.ckpt``.  Rerunning the same command in the same directory resumes from the newest readable
one; ``run.ckpt_path`` picks one explicitly.  What makes the continuation bitwise identical to an uninterrupted run:

- model, optimizer, LR scheduler and loop counters: Lightning's checkpoint;
- the data position: training row g depends only on (seed, g) (wavetrain/data/datamodule.py) and
  :class:`RunPositionSampler` makes the loader span the whole run and start at g = global_step · rows per step, so
  Lightning's restored batch counters and the loader agree;
- randomness: training steps draw from their own RNG stream (:class:`TrainingRandomness`), saved in every
  checkpoint, so evaluation, loader start-up or a resumption never shift the dropout masks of later steps.

On the CPU a resumed run's final validation loss equals the uninterrupted run's bit for bit
(tests/test_reliability.py).  On a GPU the same state is restored (CUDA RNG states included); with
``trainer.deterministic=true`` the continuation is expected to be bitwise identical as well, while with the
default nondeterministic kernels (atomic-add reductions in some backward passes) two *uninterrupted* runs already
differ in the last bits, and a resumed run agrees with the uninterrupted one only to that run-to-run noise.  That
tolerance is not measured here (no GPU in these tests): size it by comparing two uninterrupted runs.

Atomic checkpoints.  :class:`AtomicCheckpointIO` writes to a temporary file, fsyncs and renames, and records the
file's SHA-256 beside it (``<name>.sha256``): a crash while saving leaves the previous file intact, and a truncated
or corrupted file is recognised (:func:`inspect_checkpoint`) and skipped in favour of the previous good one.

Preemption.  SIGTERM, SIGUSR1 (SLURM's ``--signal``) and submitit's preemption signal only set a flag; at the next
step boundary :class:`StepCheckpoint` saves ``last.ckpt`` and stops the run (:class:`Preempted`).  The job is
requeued once: by submitit's own handler when the job was launched through submitit, otherwise (plain ``sbatch``)
on SLURM's requeue signal with ``scontrol requeue`` as Lightning's SLURM environment does; Lightning's own
auto-requeue is switched off so that nothing requeues twice.  SIGTERM alone never requeues (``scancel`` sends it).

Divergence.  :class:`NonFiniteGuard` stops on a NaN/inf loss or gradient before the optimiser applies it, naming
the step, the loss and the last good checkpoint (``run.on_nonfinite=skip``: drop the step's update and go on).
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from torch.utils.data import DistributedSampler

from wavetrain.config import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"
DIGEST_SUFFIX = ".sha256"
LOCK_FILE = ".wavetrain.lock"
WANDB_ID_FILE = "wandb_run_id"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Keys that may differ when a run directory is resumed automatically: bookkeeping, logging, the step budget (a
# finished run can be extended), evaluation cadence and where files live.  Anything else means another run.
RESUMABLE_KEYS = ("run", "logger", "trainer.max_steps", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                  "trainer.val_check_interval", "trainer.limit_val_batches", "trainer.num_sanity_val_steps",
                  "trainer.accelerator", "trainer.precision", "trainer.deterministic", "trainer.strategy",
                  "data.num_workers", "data.cache_dir", "data.val_windows", "data.path")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: the message names the file and the previous good one."""


class RunDirInUse(ConfigError):
    """The run directory is locked by another live wavetrain process."""


class NonFiniteLossError(RuntimeError):
    """A NaN/inf training loss or gradient: the message names the step, the loss and the last good checkpoint."""


class Preempted(SystemExit):
    """Raised at the step boundary after a preemption signal, once the checkpoint is saved.

    A ``SystemExit`` with status 128 + signal number (what a shell reports for a process ended by that signal),
    so schedulers and sweeps see an unfinished run, while nothing reports it as a crash."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def global_rank_from_env() -> int:
    """This process' global rank as the launchers export it (0 when launched alone)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Atomic checkpoint files


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes everything written through it."""

    def __init__(self, handle) -> None:
        super().__init__()
        self.handle, self.digest = handle, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to ``.<name>.tmp-<pid>``, fsynced, then renamed over the target, with the file's
    SHA-256 in ``<name>.sha256``: the target is always either the complete old file or the complete new one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        digest_tmp = _digest_path(tmp)
        try:
            with open(tmp, "wb") as handle:
                writer = _HashingWriter(handle)
                torch.save(checkpoint, writer)
                handle.flush()
                os.fsync(handle.fileno())
            digest_tmp.write_text(f"{writer.digest.hexdigest()}  {path.name}\n")
            # the digest goes first: a crash between the two renames leaves a mismatch, which reads as corrupt
            os.replace(digest_tmp, _digest_path(path))
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            digest_tmp.unlink(missing_ok=True)
            raise

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        _digest_path(Path(path)).unlink(missing_ok=True)


@dataclass
class CheckpointInfo:
    """A readable training checkpoint: its path, optimiser step and the config it was trained with."""

    path: Path
    global_step: int
    cfg: dict | None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Read a checkpoint completely and check it is a whole training state (CheckpointError naming the file)."""
    path = Path(path)
    recorded = _digest_path(path)
    if recorded.exists():
        expected = recorded.read_text().split()[0] if recorded.read_text().split() else ""
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path} is corrupt: its SHA-256 differs from the one recorded in {recorded.name} "
                                  f"when it was written (truncated or damaged on disk)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # torch raises RuntimeError/EOFError/UnpicklingError/... on damaged files
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt: {_first_line(error)})") from error
    required = ("state_dict", "optimizer_states", "loops", "global_step")
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a complete training checkpoint (missing {missing}): resume from a "
                              f"checkpoint written by wavetrain training")
    return CheckpointInfo(path, int(checkpoint["global_step"]),
                          (checkpoint.get("hyper_parameters") or {}).get("cfg"))


def checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    """Resumable checkpoints of a run directory in order of preference: last, previous, then the others
    (best-step*.ckpt) by the step in their name."""
    if not ckpt_dir.is_dir():
        return []
    named = [ckpt_dir / LAST, ckpt_dir / PREVIOUS]

    def step_of(p: Path) -> int:
        found = re.findall(r"\d+", p.stem)
        return int(found[-1]) if found else -1

    others = sorted((p for p in ckpt_dir.glob("*.ckpt") if p.name not in (LAST, PREVIOUS)), key=step_of,
                    reverse=True)
    return [p for p in named if p.exists()] + others


@dataclass
class ResumePlan:
    """Where a run starts: a checkpoint (or none) and the unreadable newer ones that were passed over."""

    checkpoint: CheckpointInfo | None = None
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def path(self) -> str | None:
        return str(self.checkpoint.path) if self.checkpoint else None

    @property
    def step(self) -> int:
        return self.checkpoint.global_step if self.checkpoint else 0


def newest_readable(candidates: list[Path]) -> tuple[CheckpointInfo | None, list[tuple[Path, str]]]:
    """The readable checkpoint with the highest step (ties: the earlier candidate) and the unreadable ones."""
    best, unreadable = None, []
    for candidate in candidates:
        try:
            info = inspect_checkpoint(candidate)
        except CheckpointError as error:
            unreadable.append((candidate, str(error)))
            continue
        if best is None or info.global_step > best.global_step:
            best = info
    return best, unreadable


def _previous_good(ckpt_dir: Path, exclude: Path) -> CheckpointInfo | None:
    others = [p for p in checkpoint_candidates(ckpt_dir) if p.resolve() != exclude.resolve()]
    return newest_readable(others)[0]


def plan_resume(ckpt_path: str | None, run_dir: Path) -> ResumePlan:
    """``run.ckpt_path`` (checked: CheckpointError naming it and the previous good one in its folder), else the
    newest readable checkpoint of the run directory (unreadable newer ones are reported and passed over)."""
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"run.ckpt_path={path} does not exist: give an existing .ckpt file (e.g. a run's "
                                  f"{CHECKPOINT_DIR}/{LAST}), or leave run.ckpt_path=null to resume the run directory")
        try:
            return ResumePlan(inspect_checkpoint(path))
        except CheckpointError as error:
            previous = _previous_good(path.parent, path)
            hint = (f"the previous good checkpoint there is {previous.path} (step {previous.global_step}): "
                    f"pass run.ckpt_path={previous.path}" if previous else
                    f"no other readable checkpoint is in {path.parent}")
            raise CheckpointError(f"run.ckpt_path: {error}; {hint}") from error
    return ResumePlan(*newest_readable(checkpoint_candidates(run_dir / CHECKPOINT_DIR)))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every setting (outside RESUMABLE_KEYS) in which two run configs differ."""
    old, new = _flatten(saved), _flatten(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            differences.append(f"{key}: {old.get(key, '<absent>')} -> {new.get(key, '<absent>')}")
    return differences


def check_resume_compatible(plan: ResumePlan, current_cfg: dict, run_dir: Path, explicit: bool) -> None:
    """Refuse to resume the run directory automatically into a different configuration (ConfigError)."""
    if explicit or plan.checkpoint is None or plan.checkpoint.cfg is None:
        return
    differences = config_differences(plan.checkpoint.cfg, current_cfg)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; ... ({len(differences)} in all)" if len(differences) > 6 else "")
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds another run ({plan.checkpoint.path.name} at step "
            f"{plan.checkpoint.global_step} was trained with different settings: {shown}). Nothing was changed: "
            f"use a new hydra.run.dir, rerun with that run's overrides to resume it, or pass "
            f"run.ckpt_path={plan.checkpoint.path} to start from its weights knowingly")


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


def describe_fallback(plan: ResumePlan) -> str | None:
    """The warning when a newer checkpoint was unreadable and an older one is used instead (CheckpointError when
    none is readable)."""
    if not plan.unreadable:
        return None
    bad = "; ".join(reason for _, reason in plan.unreadable)
    if plan.checkpoint is None:
        raise CheckpointError(f"{bad}; no readable checkpoint remains in that folder: move the files away to start "
                              f"this run over, or give the run a new hydra.run.dir")
    return (f"{bad}. Resuming from the previous good checkpoint {plan.checkpoint.path} "
            f"(step {plan.checkpoint.global_step}) instead")


# ----------------------------------------------------------------------------------------------------------------
# Checkpointing at step boundaries, preemption, randomness, divergence


class PreemptionSignals:
    """Handlers for SIGTERM, SIGUSR1 and submitit's preemption signal that only record the signal (async-safe);
    the training loop acts on it at the next step boundary.  ``requeue`` decides who requeues the job."""

    def __init__(self, requeue: bool) -> None:
        self.requeue_enabled = requeue
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def signals(self) -> list[int]:
        """SIGTERM, SIGUSR1, and submitit's preemption signal when submitit handles it in this process."""
        found = list(PREEMPTION_SIGNALS)
        submitit = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if submitit is not None and _is_submitit_handler(signal.getsignal(submitit)) and submitit not in found:
            found.append(submitit)
        return found

    def install(self) -> None:
        """Install the recording handler (again: Lightning replaces SIGTERM's when fitting starts), remembering the
        handlers found the first time (submitit's, the default ones)."""
        if not self.previous:
            self.previous = {signum: signal.getsignal(signum) for signum in self.signals()}
        for signum in self.previous:
            signal.signal(signum, self._record)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def __getstate__(self) -> dict:
        # a spawned DDP worker records its own process' handlers (these may not even be picklable)
        return {**self.__dict__, "previous": {}}

    def pending(self, trainer: L.Trainer) -> int | None:
        """The signal to act on now (agreed by every rank), or None."""
        if trainer.world_size > 1:
            if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
                return None
            return self.received or signal.SIGTERM
        return self.received

    def requeue(self, signum: int) -> str:
        """Requeue the job once, by whoever owns it; returns what happened (printed in the exit message)."""
        if not self.requeue_enabled:
            return "not requeued (run.requeue=false)"
        handler = self.previous.get(signum)
        if _is_submitit_handler(handler):
            log.info("handing the requeue to submitit")
            handler(signum, None)  # submitit dumps its delayed submission, requeues the job and exits
            return "requeued by submitit"
        if signum == signal.SIGUSR1 and SLURMEnvironment.detect():
            return slurm_requeue()
        return "not requeued (only SLURM's requeue signal USR1, or submitit's, requeues)"


def _is_submitit_handler(handler: Any) -> bool:
    """Whether ``handler`` is submitit's preemption handler (it checkpoints the job's submission and requeues)."""
    if getattr(handler, "__name__", "") != "checkpoint_and_try_requeue":
        return False
    try:
        from submitit.core.job_environment import SignalHandler
    except ImportError:
        return False
    return isinstance(getattr(handler, "__self__", None), SignalHandler)


def slurm_requeue() -> str:
    """``scontrol requeue <job>`` for this SLURM job (array-aware, as Lightning's SLURM environment does)."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job_id):
        return f"not requeued (SLURM job id {job_id!r} is not numeric)"
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"requeue of SLURM job {job_id} failed ({_first_line(error)})"
    if result.returncode != 0:
        return f"requeue of SLURM job {job_id} failed (scontrol exit {result.returncode}: {result.stderr.strip()})"
    return f"requeued SLURM job {job_id}"


_NO_SIGNAL = 0


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the training batch that just ended (its own decision)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(trainer.enable_validation and epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


class StepCheckpoint(Checkpoint):
    """``checkpoints/last.ckpt`` at optimiser-step boundaries: every ``every_n_steps`` steps, after the last step,
    and when a preemption signal arrived (then the run stops with :class:`Preempted`).  The file it replaces is
    kept as ``previous.ckpt``.  At a step that Lightning also validates the save waits for that validation (a
    resumed run would skip it otherwise, leaving a hole in the curve and possibly no final metrics).  A
    ``Checkpoint`` subclass, so Lightning runs it after the other callbacks (and after ModelCheckpoint)."""

    def __init__(self, dirpath: Path, every_n_steps: int, signals: PreemptionSignals | None = None) -> None:
        self.dirpath, self.every_n_steps, self.signals = Path(dirpath), int(every_n_steps), signals
        self._seen_step: int | None = None
        self._deferred: int | None = None  # a save waiting for this step's validation (signal number or 0)

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    def last_good(self) -> str:
        """The newest checkpoint of the run, for error messages."""
        for candidate in checkpoint_candidates(self.dirpath):
            try:
                info = inspect_checkpoint(candidate)
            except CheckpointError:
                continue
            return f"{info.path} (step {info.global_step})"
        return f"none yet (the first is due at step {self.every_n_steps}, run.checkpoint_every_n_steps)"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step
        if self.signals is None:
            return
        self.signals.install()  # after Lightning's signal connector, which would stop without saving
        signum = self.signals.pending(trainer)
        if signum is not None:  # arrived while the data or the model were being prepared: nothing new to save
            existing = self.last_path if self.last_path.exists() else None
            raise Preempted(signum, trainer.global_step, existing)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # inside a gradient-accumulation group: not a step boundary
            return
        self._seen_step = step
        signum = self.signals.pending(trainer) if self.signals is not None else None
        if signum is None and step % self.every_n_steps and step < trainer.max_steps:
            return
        if _validation_follows(trainer):
            self._deferred = signum or _NO_SIGNAL
            return
        self._save_or_stop(trainer, signum)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._deferred is None:
            return
        signum, self._deferred = self._deferred, None
        if signum == _NO_SIGNAL:  # a signal may have come during the validation
            signum = self.signals.pending(trainer) if self.signals is not None else None
        self._save_or_stop(trainer, signum)

    def _save_or_stop(self, trainer: L.Trainer, signum: int | None) -> None:
        self.save(trainer)
        if signum is not None:
            raise Preempted(signum, trainer.global_step, self.last_path)

    def save(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero and self.last_path.exists():
            os.replace(self.last_path, self.dirpath / PREVIOUS)
            if _digest_path(self.last_path).exists():
                os.replace(_digest_path(self.last_path), _digest_path(self.dirpath / PREVIOUS))
        for logger in trainer.loggers:  # the metrics up to this step are on disk with the checkpoint
            logger.save()
        trainer.save_checkpoint(self.last_path, weights_only=False)


def _rng_states() -> dict:
    """Every generator's state, as tensors and plain values (checkpoints stay loadable with weights_only=True)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                       has_gauss, gauss], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class TrainingRandomness(L.Callback):
    """Training steps (dropout, stochastic attention) draw from their own RNG stream (torch, CUDA, numpy, python),
    swapped in around every training batch and saved in every checkpoint.  Draws made elsewhere (data-loader
    start-up, validation) therefore never shift it, and a resumed run continues the stream exactly."""

    def __init__(self) -> None:
        self.stream: dict | None = None
        self._outside: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._outside = _rng_states()
        if self.stream is not None:
            _set_rng_states(self.stream)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.stream = _rng_states()
        if self._outside is not None:
            _set_rng_states(self._outside)

    def state_dict(self) -> dict:
        return {"stream": self.stream}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stream = state_dict.get("stream")


NONFINITE_MODES = ("stop", "skip")


class NonFiniteGuard(L.Callback):
    """Checks each optimiser step's loss and global gradient norm before the update is applied (one host sync per
    step).  ``stop``: raise :class:`NonFiniteLossError` (parameters and checkpoints untouched).  ``skip``: drop the
    step's update (every gradient cleared, so AdamW leaves parameters and moments alone), count it, go on; the step
    still consumes its batch and its place in the LR schedule (the step index addresses the data, so it cannot be
    replayed) — Wave Field and WDA skip such batches the same way (spec wavefield.md §4, wda.md §5).  Stops anyway
    after ``max_skips`` skipped steps.  Under 16-bit mixed precision the GradScaler owns inf gradients, so only the
    loss is checked."""

    def __init__(self, mode: str, checkpoints: StepCheckpoint, max_skips: int) -> None:
        if mode not in NONFINITE_MODES:
            raise ConfigError(f"run.on_nonfinite={mode!r} is unknown: use one of {list(NONFINITE_MODES)}")
        self.mode, self.checkpoints, self.max_skips = mode, checkpoints, int(max_skips)
        self.skipped = 0
        self._loss: torch.Tensor | None = None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach().float() * trainer.accumulate_grad_batches  # Lightning passes loss / accumulation
        # over an accumulation group: its first non-finite micro-batch loss, else its last loss (no host sync)
        self._loss = loss if self._loss is None else torch.where(torch.isfinite(self._loss), loss, self._loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss, self._loss = self._loss, None
        if loss is None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if grads and scaler is None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        else:
            norm = torch.zeros((), device=loss.device)
        values = torch.stack([loss, norm.to(loss.device)]).cpu()  # the one host sync
        if bool(torch.isfinite(values).all()):
            return
        loss_value, norm_value = (float(v) for v in values)
        step = trainer.global_step
        where = f"at step {step} (optimiser step {step + 1} of {trainer.max_steps})"
        if self.mode == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            log.warning("non-finite training loss %s (gradient norm %s) %s: update skipped (%d skipped so far)",
                        loss_value, norm_value, where, self.skipped)
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
            return
        limit = (f"; {self.skipped} steps were skipped already (run.max_nonfinite_skips={self.max_skips})"
                 if self.mode == "skip" else "")
        raise NonFiniteLossError(
            f"non-finite training loss {loss_value} (gradient norm {norm_value}) {where}: the run stopped before "
            f"applying it{limit}. Last good checkpoint: {self.checkpoints.last_good()}. Lower optim.lr (or raise "
            f"optim.warmup_steps, set optim.grad_clip) and resume from it with run.ckpt_path=..., or set "
            f"run.on_nonfinite=skip to drop such steps")

    def summary(self) -> dict:
        """Contribution to results.json."""
        return {"skipped_steps": self.skipped}

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


# ----------------------------------------------------------------------------------------------------------------
# Data position


class RunPositionSampler(DistributedSampler):
    """Indices of the training rows of one rank for a whole run, starting at the current optimiser step.

    Row g of the run (0 ≤ g < max_steps · rows per step) goes to rank g mod W as its (g div W)-th row — the order a
    DistributedSampler without shuffling gives over the whole run — and iteration starts at row
    global_step · rows per step, so a resumed run continues exactly.  Its length is the whole run, which is what
    Lightning's restored batch counters expect of a resumed loader.  A ``DistributedSampler`` so that Lightning
    keeps it rather than wrapping it in another one."""

    def __init__(self, rank_rows: int, start_row: int, rank: int = 0, world: int = 1) -> None:
        # not DistributedSampler.__init__: that sizes itself from a dataset and needs a process group
        self.rank_rows, self.start_row, self.rank, self.num_replicas = rank_rows, start_row, rank, world
        self.epoch, self.shuffle, self.drop_last = 0, False, False

    @classmethod
    def for_trainer(cls, trainer: L.Trainer, batch_size: int) -> RunPositionSampler:
        accumulation = int(trainer.accumulate_grad_batches)
        return cls(int(trainer.max_steps) * accumulation * batch_size, trainer.global_step * accumulation * batch_size,
                   int(trainer.global_rank), int(trainer.world_size))

    @property
    def run_rows(self) -> int:
        """Rows of the whole run over all ranks: the length the training dataset must have."""
        return self.rank_rows * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank + self.start_row * self.num_replicas, self.run_rows, self.num_replicas))

    def __len__(self) -> int:
        return self.rank_rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


# ----------------------------------------------------------------------------------------------------------------
# Run directory: lock, results, logs, W&B id


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
