"""One training run, in the order it happens: lock the run directory, pass every check that can refuse the run,
prepare the directory, train, write results.json.  :class:`wavetrain.run.rundir.RunDir` owns the directory and the
order of its steps; this module builds what the run needs (data module, loggers, Trainer)."""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from wavetrain.callbacks import RunSummary, ThroughputMonitor
from wavetrain.config import ConfigError, check_model_builds, config_callable, validate_config
from wavetrain.console import console_callbacks, progress_bar_enabled, quiet_console
from wavetrain.data.datamodule import steps_for_epochs
from wavetrain.evaluation import check_evaluations, evaluate_after_training
from wavetrain.lightning_module import LanguageModelTask
from wavetrain.loggers import build_loggers
from wavetrain.run.checkpoint_io import CHECKPOINT_DIR, AtomicCheckpointIO
from wavetrain.run.determinism import TrainingRandomness
from wavetrain.run.guards import NonFiniteGuard
from wavetrain.run.preemption import Preempted, PreemptionSignals, StepCheckpoint
from wavetrain.run.resume import ResumePlan
from wavetrain.run.rundir import HydraRecord, RunDir
from wavetrain.trainer_settings import trainer_arguments

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: Path | None = None, hydra: HydraRecord | None = None) -> dict:
    """Train, validate (and optionally test) one configuration; write and return the results summary.

    A run directory that already holds this run resumes it from its newest readable checkpoint; one that holds it
    finished is left as it is (its results are returned).  ``hydra``: the files Hydra would have written into the
    run directory before the job (written once the checks pass)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_console()
    started = time.time()
    with RunDir(Path(run_dir or os.getcwd()), cfg, hydra) as run:  # locked: no second run in this directory
        # every check that can refuse the run, before anything is written
        validate_config(cfg)
        check_model_builds(cfg)
        trainer_args = trainer_arguments(cfg)
        run.check_writable()
        L.seed_everything(int(cfg.seed), workers=True)
        data = build_datamodule(cfg)
        vocab_size = data.prepare()
        apply_epoch_budget(cfg, data)
        tokenizer = getattr(data, "tokenizer", None)
        check_evaluations(cfg, data, tokenizer)
        plan = run.plan_resume(vocab_size)  # the checkpoint to start from, checked against this model
        finished = run.finished()
        if finished is not None:
            print(f"wavetrain: {run.path} already holds this run, finished at step {finished.get('steps')}: nothing "
                  f"to do (its results are in {run.results_path}; raise trainer.max_steps to train on, or use a new "
                  f"hydra.run.dir)")
            return finished
        # from here on this run writes into its directory
        run.begin(tokenizer)
        task = LanguageModelTask(OmegaConf.to_container(cfg, resolve=True), vocab_size)
        log.info("model: %s parameters, vocabulary %d", f"{task.n_parameters:,}", vocab_size)
        with PreemptionSignals(requeue=bool(cfg.run.get("requeue", True))) as signals:
            trainer = build_trainer(cfg, run, trainer_args, signals, vocab_size)
            fit(trainer, task, data, plan, signals, run)
        if not trainer.is_global_zero:
            return {}
        results = run.read_results()
        results.update(evaluate_after_training(cfg, trainer, task, data, results, run.path, tokenizer))
        results["wall_seconds"] = time.time() - started
        run.write_results(results)
        print(summary_line(results))
        return results


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """``data.datamodule`` (a class path, resolved under Hydra's target policy; the text pipeline by default) built
    from the data/tokenizer configs."""
    cls = config_callable("data.datamodule", cfg.data.get("datamodule") or "wavetrain.data.datamodule.TextDataModule")
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
        raise ConfigError(f"optim.epoch_steps={epoch_steps!r} is unknown: use optimizer_steps or micro_batches")
    if cfg.run.get("epochs") is None:
        return
    examples = data.train_examples_per_epoch()
    if examples is None:
        raise ConfigError("run.epochs needs a finite epoch: use data.packing=sequential or documents "
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


def build_trainer(cfg: DictConfig, run: RunDir, trainer_args: dict, signals: PreemptionSignals,
                  vocab_size: int) -> L.Trainer:
    """The Lightning Trainer with the run/ callbacks: the best checkpoint by run.checkpoint_metric, step checkpoints
    (and the stop on a preemption signal), the NaN/inf guard, the training RNG stream, throughput and results."""
    ckpt_dir = run.path / CHECKPOINT_DIR
    best = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best-step{step}",
                           monitor=str(cfg.run.get("checkpoint_metric", "val/loss")),
                           mode=str(cfg.run.get("checkpoint_mode", "min")), save_top_k=1, save_last=False,
                           auto_insert_metric_name=False)
    steps = StepCheckpoint(ckpt_dir, int(cfg.run.checkpoint_every_n_steps), signals)
    guard = NonFiniteGuard(str(cfg.run.on_nonfinite), steps, int(cfg.run.max_nonfinite_skips))
    throughput = ThroughputMonitor()
    summary = RunSummary(run.results_path, best, throughput, {
        "vocab_size": vocab_size, "overrides": list(cfg.run.overrides), "choices": dict(cfg.run.choices)})
    progress_bar = progress_bar_enabled(trainer_args.get("enable_progress_bar"))
    # Lightning's own SLURM auto-requeue stays off: wavetrain saves at a step boundary and requeues once itself
    plugins = [AtomicCheckpointIO()] + ([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])
    # the loader resumes at the checkpoint's step (RunPositionSampler), which this Lightning warning cannot see
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    return L.Trainer(**{**trainer_args, "enable_progress_bar": progress_bar}, max_epochs=-1,
                     gradient_clip_val=cfg.optim.grad_clip or None,
                     callbacks=[TrainingRandomness(), guard, best, throughput, summary, steps,
                                *console_callbacks(progress_bar)],
                     plugins=plugins, logger=build_loggers(cfg, run.path), default_root_dir=str(run.path))


def fit(trainer: L.Trainer, task: LanguageModelTask, data: L.LightningDataModule, plan: ResumePlan,
        signals: PreemptionSignals, run: RunDir) -> None:
    """``trainer.fit`` from the planned checkpoint; after a preemption signal: record it in results.json, say
    where the run stopped, requeue once, and exit with 128 + the signal number."""
    try:
        trainer.fit(task, datamodule=data, ckpt_path=plan.path)
        return
    except SIGTERMException:  # a signal that reached Lightning's handler before training started: nothing new
        stop = Preempted(signals.received or 15, plan.step, plan.checkpoint and plan.checkpoint.path)
    except Preempted as preempted:
        stop = preempted
    if run.rank_zero:
        run.record_preemption(stop.signal_name, stop.step, stop.checkpoint)
        saved = f"saved {stop.checkpoint}" if stop.checkpoint else "no checkpoint yet"
        print(f"wavetrain: {stop.signal_name} received: stopped at step {stop.step} ({saved}); rerun the same "
              f"command in the same run directory to resume", flush=True)
        print(f"wavetrain: {signals.requeue(stop.signum)}", flush=True)  # submitit's handler requeues and exits
    raise stop from None


def summary_line(results: dict) -> str:
    parts = [f"val loss {results['val_loss']:.4f}", f"val ppl {results['val_ppl']:.3f}"] \
        if results.get("val_loss") is not None else ["no validation ran"]
    if results.get("tokens_per_sec"):
        parts.append(f"{results['tokens_per_sec']:,.0f} tokens/s")
    parts += [f"{results['n_parameters']:,} params", f"{results['wall_seconds']:.0f} s"]
    return "wavetrain: " + ", ".join(parts)
