"""One training run from a composed config: data -> model -> Lightning Trainer -> results.json."""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from wavetrain.callbacks import RunSummary, ThroughputMonitor, write_json_atomic
from wavetrain.config import ConfigError, check_model_builds, validate_config
from wavetrain.console import console_callbacks, progress_bar_enabled, quiet_console
from wavetrain.data.datamodule import steps_for_epochs
from wavetrain.lightning_module import LanguageModelTask
from wavetrain.loggers import build_loggers
from wavetrain.run.checkpoint_io import CHECKPOINT_DIR, AtomicCheckpointIO
from wavetrain.run.determinism import TrainingRandomness
from wavetrain.run.guards import NonFiniteGuard
from wavetrain.run.preemption import Preempted, PreemptionSignals, StepCheckpoint
from wavetrain.run.resume import ResumePlan, check_resume_compatible, describe_fallback, plan_resume
from wavetrain.run.rundir import (RunDirLock, finished_results, global_rank_from_env, rotate_results,
                                  tidy_checkpoint_dir, trim_metrics)

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """Native bf16 on this CPU (avx512_bf16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.mps.is_available()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """The requested precision, or 32-true with a warning where bf16 is unsupported."""
    precision = str(trainer_cfg.precision)
    if not precision.startswith("bf16"):
        return precision
    wants_gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (trainer_cfg.accelerator == "auto"
                                                               and torch.cuda.is_available())
    supported = torch.cuda.is_bf16_supported() if wants_gpu and torch.cuda.is_available() else cpu_supports_bf16()
    if not supported:
        warnings.warn(f"trainer.precision={precision} requested but this {'GPU' if wants_gpu else 'CPU'} has no "
                      f"bf16 support: falling back to 32-true (set trainer.precision=32-true to silence this)")
        return "32-true"
    return precision


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """``data.datamodule`` (a class path; the text pipeline by default) built from the data/tokenizer configs."""
    cls = get_class(cfg.data.get("datamodule") or "wavetrain.data.datamodule.TextDataModule")
    return cls(cfg.data, cfg.tokenizer, int(cfg.seq_len), int(cfg.seed))


def apply_epoch_budget(cfg: DictConfig, data: L.LightningDataModule) -> None:
    """With ``run.epochs`` (and ``optim.warmup_epochs``), derive trainer.max_steps (and optim.warmup_steps) from
    the train split's size, as the epoch-based protocols do (spec wavefield.md §4: 3 warmup of 30 epochs).
    ``optim.schedule_epochs`` sets the schedule's horizon (optim.schedule_steps) apart from the run's length;
    ``optim.epoch_steps: micro_batches`` counts an epoch of warmup/schedule as its number of micro-batches, the
    step-count mismatch of the DWARF §2.A code (spec dwarf.md §2.A); ``optimizer_steps`` (default) as optimiser
    steps."""
    epoch_steps = cfg.optim.get("epoch_steps", "optimizer_steps")
    if epoch_steps not in ("optimizer_steps", "micro_batches"):
        raise ValueError(f"optim.epoch_steps={epoch_steps!r} is unknown: use optimizer_steps or micro_batches")
    if cfg.run.get("epochs") is None:
        return
    examples = data.train_examples_per_epoch()
    if examples is None:
        raise ValueError("run.epochs needs a finite epoch: use data.packing=sequential or documents "
                         "(the stream packing samples windows endlessly; set trainer.max_steps instead)")
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    world = max(1, devices) * int(cfg.trainer.num_nodes)
    batch, accumulation = int(cfg.data.batch_size), int(cfg.trainer.accumulate_grad_batches)
    with open_dict(cfg):
        cfg.trainer.max_steps = steps_for_epochs(examples, float(cfg.run.epochs), batch, accumulation, world)
        unit = accumulation if epoch_steps == "micro_batches" else 1
        if cfg.optim.get("warmup_epochs") is not None:
            cfg.optim.warmup_steps = steps_for_epochs(examples, float(cfg.optim.warmup_epochs) * unit, batch,
                                                      accumulation, world)
        if cfg.optim.get("schedule_epochs") is not None:
            cfg.optim.schedule_steps = steps_for_epochs(examples, float(cfg.optim.schedule_epochs) * unit, batch,
                                                        accumulation, world)
    log.info("%s epochs of %d examples = %d optimiser steps", cfg.run.epochs, examples, cfg.trainer.max_steps)
    validate_config(cfg)


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    """Train, validate (and optionally test) one configuration; write and return the results summary.

    Every check that can fail on bad input (config, model construction, checkpoint to resume, data) runs before
    anything is written into the run directory.  A run directory that already holds this run resumes it from its
    newest readable checkpoint; one that holds it finished is left as it is (its results are returned)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_console()
    validate_config(cfg)
    check_model_builds(cfg)
    run_dir = Path(run_dir or os.getcwd())
    started = time.time()
    resume = plan_resume(cfg.run.ckpt_path, run_dir)
    fallback = describe_fallback(resume)
    L.seed_everything(int(cfg.seed), workers=True)
    data = build_datamodule(cfg)
    vocab_size = data.prepare()
    apply_epoch_budget(cfg, data)
    if cfg.run.test and not data.has_split("test"):
        raise ConfigError(f"run.test=true but data={cfg.run.choices.get('data')} has no test split: set "
                          f"run.test=false (or give the source a test split, e.g. data.source.test_fraction=0.05)")
    if cfg.run.get("passkey"):
        _check_passkey_tokenizer(getattr(data, "tokenizer", None))
    check_resume_compatible(resume, OmegaConf.to_container(cfg, resolve=True), run_dir, bool(cfg.run.ckpt_path))
    results_path = run_dir / cfg.run.results_file
    finished = None if cfg.run.ckpt_path else finished_results(results_path, int(cfg.trainer.max_steps))
    if finished is not None:
        if resume.checkpoint is None and list(finished.get("overrides") or []) != list(cfg.run.overrides):
            raise ConfigError(f"{run_dir} already holds a finished run with other overrides "
                              f"({' '.join(finished.get('overrides') or []) or 'none'}): nothing was changed; give "
                              f"this run its own hydra.run.dir")
        print(f"wavetrain: {run_dir} already holds this run, finished at step {finished.get('steps')}: nothing to do "
              f"(its results are in {results_path}; raise trainer.max_steps to train on, or use a new hydra.run.dir)")
        return finished
    # ---- from here on this run writes into run_dir (every check above passed) ----
    rank_zero = global_rank_from_env() == 0
    lock = RunDirLock(run_dir)
    if rank_zero:
        lock.acquire()
    signals = PreemptionSignals(requeue=bool(cfg.run.get("requeue", True)))
    signals.install()
    try:
        return _fit(cfg, run_dir, data, vocab_size, resume, fallback, signals, started, rank_zero)
    finally:
        signals.restore()
        lock.release()


def _fit(cfg: DictConfig, run_dir: Path, data: L.LightningDataModule, vocab_size: int, resume: ResumePlan,
         fallback: str | None, signals: PreemptionSignals, started: float, rank_zero: bool) -> dict:
    results_path = run_dir / cfg.run.results_file
    if rank_zero:
        if fallback:
            warnings.warn(fallback)
        tidy_checkpoint_dir(resume, run_dir / CHECKPOINT_DIR)
        if resume.checkpoint is not None:
            print(f"wavetrain: resuming {run_dir} from {resume.checkpoint.path} (step {resume.step})")
            trim_metrics(run_dir / "logs" / "metrics.csv", resume.step)
        rotated = rotate_results(results_path)
        if rotated:
            log.info("kept the earlier results of this run directory as %s", rotated)
    tokenizer = getattr(data, "tokenizer", None)
    if rank_zero and tokenizer is not None and hasattr(tokenizer, "save"):  # the run's own copy (eval.passkey)
        run_dir.mkdir(parents=True, exist_ok=True)
        copy = run_dir / f"tokenizer.json.tmp{os.getpid()}"
        tokenizer.save(copy)
        os.replace(copy, run_dir / "tokenizer.json")
    task = LanguageModelTask(OmegaConf.to_container(cfg, resolve=True), vocab_size)
    log.info("model: %s parameters, vocabulary %d", f"{task.n_parameters:,}", vocab_size)
    checkpoints = ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_DIR), filename="best-step{step}",
                                  monitor=str(cfg.run.get("checkpoint_metric", "val/loss")),
                                  mode=str(cfg.run.get("checkpoint_mode", "min")), save_top_k=1, save_last=False,
                                  auto_insert_metric_name=False)
    step_checkpoints = StepCheckpoint(run_dir / CHECKPOINT_DIR, int(cfg.run.checkpoint_every_n_steps), signals)
    guard = NonFiniteGuard(str(cfg.run.on_nonfinite), step_checkpoints, int(cfg.run.max_nonfinite_skips))
    throughput = ThroughputMonitor()
    summary = RunSummary(results_path, checkpoints, throughput, {
        "vocab_size": vocab_size, "overrides": list(cfg.run.overrides), "choices": dict(cfg.run.choices)})
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["precision"] = resolve_precision(cfg.trainer)
    trainer_args["enable_progress_bar"] = progress_bar_enabled(cfg.trainer.get("enable_progress_bar"))
    # Lightning's own SLURM auto-requeue stays off: wavetrain saves at a step boundary and requeues once itself
    plugins = [AtomicCheckpointIO()] + ([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])
    trainer = L.Trainer(**trainer_args, max_epochs=-1, gradient_clip_val=cfg.optim.grad_clip or None,
                        callbacks=[TrainingRandomness(), guard, checkpoints, throughput, summary, step_checkpoints,
                                   *console_callbacks(trainer_args["enable_progress_bar"])],
                        plugins=plugins, logger=build_loggers(cfg, run_dir), default_root_dir=str(run_dir))
    # the loader resumes at the checkpoint's step (RunPositionSampler), which this Lightning warning cannot see
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    try:
        trainer.fit(task, datamodule=data, ckpt_path=resume.path)
    except SIGTERMException:  # a signal that reached Lightning's handler before training started: nothing new
        raise _stopped(cfg, results_path, Preempted(signals.received or 15, resume.step, resume.checkpoint and
                                                     resume.checkpoint.path), signals, rank_zero) from None
    except Preempted as stop:
        raise _stopped(cfg, results_path, stop, signals, rank_zero) from None
    if not trainer.is_global_zero:
        return {}
    results = json.loads(results_path.read_text())
    if cfg.run.test:
        best = results.get("best_checkpoint")
        tested = trainer.test(task, datamodule=data, ckpt_path=best, verbose=False)
        results.update({k.replace("/", "_"): float(v) for k, v in (tested[0] if tested else {}).items()})
    if cfg.run.get("passkey"):
        results.update(_passkey(cfg, run_dir, results, tokenizer, trainer.strategy.root_device))
    results["wall_seconds"] = time.time() - started
    write_json_atomic(results_path, results)
    print(summary_line(results))
    return results


def _check_passkey_tokenizer(tokenizer) -> None:
    from wavetrain.eval.passkey import check_run_tokenizer

    try:
        check_run_tokenizer(tokenizer)
    except ValueError as err:
        raise ConfigError(f"run.passkey=true: {err}") from None


def _passkey(cfg: DictConfig, run_dir: Path, results: dict, tokenizer, device: torch.device) -> dict:
    """run.passkey: the DWARF passkey protocol (spec dwarf.md §5) on the best checkpoint (else the last one)."""
    from wavetrain.eval.passkey import passkey_after_training

    checkpoint = Path(results.get("best_checkpoint") or run_dir / CHECKPOINT_DIR / "last.ckpt")
    distances = cfg.run.get("passkey_distances")
    scores = passkey_after_training(checkpoint, tokenizer, run_dir / "passkey", context=int(cfg.seq_len),
                                    distances=list(distances) if distances is not None else None,
                                    trials=int(cfg.run.passkey_trials), device=device)
    accuracy = scores["passkey_acc"]
    log.info("passkey (spec dwarf.md §5): %s over %d distances, written to %s", "n/a" if accuracy is None
             else f"{accuracy:.1%}", scores["passkey_distances"], run_dir / "passkey")
    return scores


def _stopped(cfg: DictConfig, results_path: Path, stop: Preempted, signals: PreemptionSignals,
             rank_zero: bool) -> Preempted:
    """After a preemption signal: record it in results.json, say where the run stopped, requeue once."""
    if rank_zero:
        write_json_atomic(results_path, {
            "status": "preempted", "signal": stop.signal_name, "steps": stop.step,
            "checkpoint": str(stop.checkpoint) if stop.checkpoint else None,
            "overrides": list(cfg.run.overrides), "choices": dict(cfg.run.choices)})
        saved = f"saved {stop.checkpoint}" if stop.checkpoint else "no checkpoint yet"
        print(f"wavetrain: {stop.signal_name} received: stopped at step {stop.step} ({saved}); rerun the same "
              f"command in the same run directory to resume", flush=True)
        outcome = signals.requeue(stop.signum)  # submitit's handler requeues and exits from here
        print(f"wavetrain: {outcome}", flush=True)
    return stop


def summary_line(results: dict) -> str:
    parts = [f"val loss {results['val_loss']:.4f}", f"val ppl {results['val_ppl']:.3f}"] \
        if results.get("val_loss") is not None else ["no validation ran"]
    if results.get("tokens_per_sec"):
        parts.append(f"{results['tokens_per_sec']:,.0f} tokens/s")
    parts += [f"{results['n_parameters']:,} params", f"{results['wall_seconds']:.0f} s"]
    return "wavetrain: " + ", ".join(parts)
