"""Preemption: SIGTERM, SIGUSR1 (SLURM's ``--signal``), SIGINT (Ctrl-C) and submitit's preemption signal only set a
flag; at the next step boundary :class:`StepCheckpoint` logs that step's metrics, saves ``last.ckpt`` and stops the
run (:class:`Preempted`), so a resumed run continues the metrics without a gap.  A second Ctrl-C stops at once,
without saving (the last periodic checkpoint stays).  The job is
requeued once: by submitit's own handler when the job was launched through submitit, otherwise (plain ``sbatch``)
on SLURM's requeue signal with ``scontrol requeue`` as Lightning's SLURM environment does; Lightning's own
auto-requeue is switched off so that nothing requeues twice.  SIGTERM alone never requeues (``scancel`` sends it).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint

from wavetrain.run.checkpoint_io import (LAST, PREVIOUS, CheckpointError, CheckpointInfo, _first_line,
                                         checkpoint_candidates, inspect_checkpoint, rotate)

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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


class PreemptionSignals:
    """Handlers for SIGTERM, SIGUSR1, SIGINT and submitit's preemption signal that only record the signal;
    the training loop acts on it at the next step boundary.  ``requeue`` decides who requeues the job."""

    def __init__(self, requeue: bool) -> None:
        self.requeue_enabled = requeue
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def signals(self) -> list[int]:
        """SIGTERM, SIGUSR1, SIGINT, and submitit's preemption signal when submitit handles it in this process."""
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

    def __enter__(self) -> PreemptionSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT:  # os.write: safe wherever the handler interrupts the main thread
                os.write(2, b"\nwavetrain: SIGINT received: saving at the next step boundary, then stopping "
                            b"(Ctrl-C again stops at once, without saving)\n")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

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

    def last_good(self) -> CheckpointInfo | None:
        """The newest readable checkpoint of the run (for error messages)."""
        for candidate in checkpoint_candidates(self.dirpath):
            try:
                return inspect_checkpoint(candidate)
            except CheckpointError:
                continue
        return None

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
        if signum is not None:  # Lightning logs this step's metrics after this hook, which the stop would skip
            trainer._logger_connector.update_train_step_metrics()
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
        if signum is not None and trainer.global_step < trainer.max_steps:  # at the last step: finish the run
            raise Preempted(signum, trainer.global_step, self.last_path)

    def save(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero and self.last_path.exists():
            rotate(self.last_path, self.dirpath / PREVIOUS)
        for logger in trainer.loggers:  # the metrics up to this step are on disk with the checkpoint
            logger.save()
        trainer.save_checkpoint(self.last_path, weights_only=False)


