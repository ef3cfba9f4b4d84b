"""The run directory and its one owner, :class:`RunDir`.

A run directory is written only by the process that holds its lock, and only after every check that can refuse the
run has passed.  RunDir runs the steps in this order and no other:

1. ``with RunDir(...)``: an exclusive lock on the directory itself, which writes nothing; a second live run in the
   same directory is refused (:class:`RunDirInUse`).
2. the caller's checks: config, model, trainer settings, data, evaluation options, :meth:`RunDir.check_writable`.
3. :meth:`RunDir.plan_resume`: the checkpoint to start from, read with ``weights_only=True`` and checked against
   this run's config, model and vocabulary, or the finished run the directory already holds (nothing more to do).
4. :meth:`RunDir.begin`, the first write: unreadable checkpoints kept aside as ``*.corrupt``, partial saves
   removed, metrics.csv trimmed to the checkpoint's step, an earlier finished run's results kept as
   ``results.<k>.json``, ``.hydra/*.yaml`` and ``<job>.log`` written (Hydra is configured not to write them before
   the job: ``hydra.output_subdir: null`` and conf/hydra/job_logging/wavetrain.yaml).
5. fit: Lightning writes ``checkpoints/`` and ``logs/`` through the run/ callbacks.
6. :meth:`RunDir.write_results` / :meth:`RunDir.record_preemption` / the failure record: ``results.json``.

A refused attempt (an error before step 4) leaves every byte of a directory that holds anything as it was.  An empty
directory (a fresh sweep job's, made by Hydra) receives a results.json saying why the job failed, so that the sweep
report can show it; a directory this process created is removed again.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from wavetrain.config import ConfigError
from wavetrain.run.checkpoint_io import (CHECKPOINT_DIR, StorageError, checkpoint_candidates, storage_error,
                                         storage_failure)
from wavetrain.run.lock import RunDirLock
from wavetrain.run.logs import global_rank_from_env, trim_metrics
from wavetrain.run.results import finished_results, read_results, rotate_results, write_json_atomic
from wavetrain.run.resume import (ResumePlan, check_checkpoint_fits, check_resume_compatible, describe_fallback,
                                  plan_resume, tidy_checkpoint_dir)

log = logging.getLogger(__name__)

HYDRA_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@dataclass
class HydraRecord:
    """What Hydra writes into a run directory before the job starts, kept for :meth:`RunDir.begin` to write once
    the run's checks have passed: the ``.hydra/`` files (name -> YAML text) and the job log's name and format."""

    files: dict[str, str]
    log_name: str
    log_format: str = HYDRA_LOG_FORMAT

    @classmethod
    def from_hydra(cls, task_cfg: DictConfig, hydra_cfg: DictConfig) -> HydraRecord:
        """``hydra_cfg``: ``HydraConfig.instance().cfg`` (the ``hydra`` node under its key), as Hydra saves it."""
        files = {"config.yaml": OmegaConf.to_yaml(task_cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
                 "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}
        log_format = OmegaConf.select(hydra_cfg, "hydra.job_logging.formatters.simple.format", default=None)
        return cls(files, f"{hydra_cfg.hydra.job.name}.log", log_format or HYDRA_LOG_FORMAT)


def _marked_writable(path: Path) -> bool:
    """Writable for this process, and not marked read-only (root may write anywhere, but a mode without any write
    bit says the owner wants it left alone)."""
    if not os.access(path, os.W_OK):
        return False
    return os.geteuid() != 0 or bool(os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


class RunDir:
    """The one owner of a run directory (see the module docstring for the order of its steps)."""

    def __init__(self, path: Path, cfg: DictConfig, hydra: HydraRecord | None = None) -> None:
        self.path, self.cfg, self.hydra = Path(path).absolute(), cfg, hydra
        self.results_path = self.path / cfg.run.results_file
        self.rank_zero = global_rank_from_env() == 0
        self.lock = RunDirLock(self.path)
        self.created = self.was_empty = self.begun = False
        self.plan: ResumePlan | None = None
        self.fallback: str | None = None
        self._early_log: logging.handlers.MemoryHandler | None = None
        self._log_file: logging.Handler | None = None

    # 1. lock ------------------------------------------------------------------------------------------------------
    def __enter__(self) -> RunDir:
        if self.rank_zero:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            self.was_empty = not self.created and not any(self.path.iterdir())
        if self.hydra is not None:  # the job log's lines until begin() (or nowhere, if the run is refused)
            self._early_log = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
            logging.getLogger().addHandler(self._early_log)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if isinstance(error, Exception) and self.rank_zero and (self.begun or self.was_empty):
                self._record_failure(error)
        finally:
            self._close_logs()
            self.lock.release()
            if self.created and not self.begun and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()

    # 2. checks ----------------------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Refuse a read-only run directory now, before anything is written into it."""
        candidates = [self.path, self.path / CHECKPOINT_DIR, self.path / "logs", self.path / "logs" / "metrics.csv",
                      self.results_path]
        for path in (p for p in candidates if p.exists()):
            if not _marked_writable(path):
                raise StorageError(f"hydra.run.dir={self.path} is read-only ({path} is not writable): make it "
                                   f"writable (chmod -R u+w {self.path}) or give this run its own hydra.run.dir")

    # 3. resume plan -----------------------------------------------------------------------------------------------
    def plan_resume(self, vocab_size: int) -> ResumePlan:
        """The checkpoint this run starts from, checked (read-only) against this run's config, model and
        vocabulary; ``finished`` holds the results when the directory already holds this run, finished."""
        explicit = self.cfg.run.ckpt_path
        plan = plan_resume(explicit, self.path)
        self.fallback = describe_fallback(plan)
        if not explicit:
            check_resume_compatible(plan, self.cfg, self.path)
        if plan.checkpoint is not None:
            source = "run.ckpt_path=" if explicit else f"hydra.run.dir={self.path}: its checkpoint "
            check_checkpoint_fits(plan.checkpoint, self.cfg, vocab_size, source)
        if explicit:
            self._refuse_foreign_start(plan)
        self.plan = plan
        return plan

    def finished(self) -> dict | None:
        """This run's results when the directory holds it finished at trainer.max_steps or later (nothing to do)."""
        if self.cfg.run.ckpt_path:
            return None
        results = finished_results(self.results_path, int(self.cfg.trainer.max_steps))
        if results is not None and self.plan.checkpoint is None and \
                list(results.get("overrides") or []) != list(self.cfg.run.overrides):
            raise ConfigError(f"{self.path} already holds a finished run with other overrides "
                              f"({' '.join(results.get('overrides') or []) or 'none'}): nothing was changed; give "
                              f"this run its own hydra.run.dir")
        return results

    def _refuse_foreign_start(self, plan: ResumePlan) -> None:
        """``run.ckpt_path`` from elsewhere into a directory holding a run would replace that run's checkpoints
        and metrics: refused (a checkpoint of this directory itself is fine: that is resuming it)."""
        if plan.checkpoint.path.resolve().is_relative_to(self.path.resolve()):
            return
        held = [p.name for p in checkpoint_candidates(self.path / CHECKPOINT_DIR)]
        held += [name for name in ("logs/metrics.csv", self.cfg.run.results_file) if (self.path / name).is_file()
                 and (name != self.cfg.run.results_file or (read_results(self.results_path) or {}).get("status")
                      in ("done", "preempted"))]
        if held:
            raise ConfigError(f"hydra.run.dir={self.path} already holds a run ({', '.join(held[:3])}): starting it "
                              f"from run.ckpt_path={plan.checkpoint.path} would replace its checkpoints and metrics. "
                              f"Nothing was changed: give this run its own hydra.run.dir")

    # 4. the first write -------------------------------------------------------------------------------------------
    def begin(self, tokenizer=None) -> None:
        """Every check passed: prepare the directory for this run (see the module docstring, step 4)."""
        assert self.plan is not None, "RunDir.plan_resume() comes before RunDir.begin()"
        self.begun = True
        if not self.rank_zero:
            return
        try:
            self._prepare(tokenizer)
        except OSError as error:
            cause = storage_failure(error)
            if cause is None:
                raise
            raise storage_error(cause, Path(error.filename or self.path), "into the run directory at") from error

    def _prepare(self, tokenizer) -> None:
        if self.fallback:
            warnings.warn(self.fallback)
        tidy_checkpoint_dir(self.plan, self.path / CHECKPOINT_DIR)
        if self.plan.checkpoint is not None:
            print(f"wavetrain: resuming {self.path} from {self.plan.checkpoint.path} (step {self.plan.step})")
        trim_metrics(self.path / "logs" / "metrics.csv", self.plan.step)
        rotated = rotate_results(self.results_path)
        if rotated:
            log.info("kept the earlier results of this run directory as %s", rotated)
        if self.hydra is not None:
            (self.path / ".hydra").mkdir(exist_ok=True)
            for name, text in self.hydra.files.items():
                (self.path / ".hydra" / name).write_text(text, encoding="utf-8")
            self._open_log_file()
        if tokenizer is not None and hasattr(tokenizer, "save"):  # the run's own copy (eval.passkey)
            copy = self.path / f"tokenizer.json.tmp{os.getpid()}"
            tokenizer.save(copy)
            os.replace(copy, self.path / "tokenizer.json")

    def _open_log_file(self) -> None:
        handler = logging.FileHandler(self.path / self.hydra.log_name, encoding="utf-8")
        handler.setFormatter(logging.Formatter(self.hydra.log_format))
        logging.getLogger().addHandler(handler)
        self._log_file = handler
        if self._early_log is not None:
            self._early_log.setTarget(handler)
            self._early_log.flush()
            logging.getLogger().removeHandler(self._early_log)
            self._early_log = None

    def _close_logs(self) -> None:
        for handler in (self._early_log, self._log_file):
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                if handler is self._log_file:
                    handler.close()
        self._early_log = self._log_file = None

    # 6. results ---------------------------------------------------------------------------------------------------
    def read_results(self) -> dict:
        return read_results(self.results_path) or {}

    def write_results(self, results: dict) -> None:
        write_json_atomic(self.results_path, results)

    def record_preemption(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        if self.rank_zero:
            write_json_atomic(self.results_path, {
                "status": "preempted", "signal": signal_name, "steps": step,
                "checkpoint": str(checkpoint) if checkpoint else None, **self._identity()})

    def _record_failure(self, error: Exception) -> None:
        """results.json with status "failed" and the error's first line, so a sweep's report shows why a row
        failed; a finished run's results are never replaced."""
        if (read_results(self.results_path) or {}).get("status") == "done":
            return
        message = (str(error).strip().splitlines() or [""])[0]
        try:
            write_json_atomic(self.results_path, {
                "status": "failed", "error": f"{type(error).__name__}: {message}" if message else
                type(error).__name__, **self._identity()})
        except (OSError, StorageError) as failure:
            log.warning("could not record the failure in %s: %s", self.results_path, failure)

    def _identity(self) -> dict:
        return {"overrides": list(self.cfg.run.overrides), "choices": dict(self.cfg.run.choices)}
