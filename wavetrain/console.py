"""The console of a run: one line per event.

- Lightning's log records reach the console once: under the CLI, Hydra's root handlers (console + ``wavetrain.log``)
  print them, and the handler Lightning adds for itself when it is imported before logging is configured is removed;
- Lightning's advertising tips (litlogger, litmodels) and a third-party deprecation warning are dropped;
- the progress bar shows only on an interactive terminal, never in a multirun, a SLURM batch job or output redirected
  to a file (``trainer.enable_progress_bar: null``); without it, :class:`ValidationLine` logs one line per
  validation.
"""
from __future__ import annotations

import logging
import sys
import warnings

import lightning as L

from wavetrain.config import _slurm_batch_job

log = logging.getLogger("wavetrain")
# loggers that get a stream handler of their own when imported before logging is configured
OWN_HANDLER_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric",
                       "torchmetrics")
TIP_PREFIX = "💡 Tip"


class DropLightningTips(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger/litmodels" lines (rank_zero_info, once per Trainer)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def quiet_console() -> None:
    """Route Lightning's records to the root handlers when there are any (else Lightning keeps its own), drop its
    tips, the pytree deprecation warning Lightning triggers in torch and the model summary's size caveat under
    bf16 (neither actionable by a user)."""
    if logging.getLogger().handlers:
        for name in OWN_HANDLER_LOGGERS:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        source = logging.getLogger(name)
        if not any(isinstance(f, DropLightningTips) for f in source.filters):
            source.addFilter(DropLightningTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (any launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def progress_bar_enabled(setting: bool | None) -> bool:
    """``trainer.enable_progress_bar``: true / false as given; null = only on an interactive terminal, and never in
    a multirun (many jobs) or a SLURM batch job (a log file)."""
    if setting is not None:
        return bool(setting)
    return sys.stderr.isatty() and not in_multirun() and _slurm_batch_job() is None


class ValidationLine(L.Callback):
    """One log line per validation (when there is no progress bar): step, validation and training loss."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [f"{key} {float(metrics[key]):.4f}" for key in ("val/loss", "val/acc", "train/loss") if key in metrics]
        if "tokens_per_sec" in metrics:
            parts.append(f"{float(metrics['tokens_per_sec']):,.0f} tokens/s")
        log.info("step %d/%d: %s", trainer.global_step, trainer.max_steps, ", ".join(parts))


def console_callbacks(progress_bar: bool) -> list[L.Callback]:
    return [] if progress_bar else [ValidationLine()]
