"""Callbacks: training throughput, and the results.json summary written at the end of every run."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from wavetrain.flops import model_flops_per_token, peak_bf16_flops
from wavetrain.run.results import write_json_atomic

log = logging.getLogger(__name__)


class ThroughputMonitor(L.Callback):
    """Logs ``tokens_per_sec`` (supervised + unsupervised input tokens of all ranks per wall second) every
    ``log_every_n_steps`` and keeps the run's mean (first window excluded: it holds compilation/warm-up).

    On a GPU whose peak is known (wavetrain.flops.PEAK_BF16_FLOPS) it also logs ``mfu``: tokens/s per device ×
    analytic training FLOPs per token (wavetrain.flops.model_flops_per_token at seq_len) / the device's dense bf16
    peak. Elsewhere (CPU, an unknown GPU, an attention without a FLOP formula) there is no MFU and a note says why."""

    def __init__(self) -> None:
        self.window_tokens = 0
        self.window_start: float | None = None
        self.windows: list[tuple[int, float]] = []
        self.flops_per_token: float | None = None
        self.peak_flops: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        device = pl_module.device
        if device.type != "cuda":
            reason = f"MFU is reported on CUDA devices only (training on {device.type})"
        else:
            self.peak_flops = peak_bf16_flops(torch.cuda.get_device_name(device))
            reason = None if self.peak_flops else (f"no MFU: {torch.cuda.get_device_name(device)} is not in "
                                                   f"wavetrain.flops.PEAK_BF16_FLOPS")
        if self.peak_flops:
            try:
                self.flops_per_token = model_flops_per_token(getattr(pl_module, "model", pl_module),
                                                             int(pl_module.cfg.seq_len))
            except (KeyError, AttributeError) as error:
                reason = f"no MFU: {error}"
        if reason and trainer.is_global_zero:
            log.info(reason)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.window_start is None:
            self.window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.window_tokens += batch[0].numel() * trainer.world_size
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps * trainer.accumulate_grad_batches) == 0:
            elapsed = time.perf_counter() - self.window_start
            rate = self.window_tokens / max(elapsed, 1e-9)
            pl_module.log("tokens_per_sec", rate, on_step=True, on_epoch=False, prog_bar=True)
            if self.flops_per_token and self.peak_flops:
                pl_module.log("mfu", self.mfu(rate, trainer.world_size), on_step=True, on_epoch=False)
            self.windows.append((self.window_tokens, elapsed))
            self.window_tokens, self.window_start = 0, None

    def on_validation_start(self, trainer, pl_module) -> None:
        self.window_start = None  # evaluation time is not training throughput
        self.window_tokens = 0

    def mean_tokens_per_sec(self) -> float | None:
        windows = self.windows[1:] or self.windows
        if not windows:
            return None
        return sum(t for t, _ in windows) / sum(s for _, s in windows)

    def mfu(self, tokens_per_sec: float | None, world_size: int = 1) -> float | None:
        """Model FLOPs utilisation of ``tokens_per_sec`` (all ranks) against ``world_size`` devices' peak."""
        if not (tokens_per_sec and self.flops_per_token and self.peak_flops):
            return None
        return tokens_per_sec * self.flops_per_token / (self.peak_flops * world_size)


class RunSummary(L.Callback):
    """Writes the run's results.json when fitting ends, on global rank zero.

    It runs inside the process that trained (with ddp_spawn that is a worker, whose step count and metrics the
    launching process never sees), so it is the one place that knows the final state.  Any callback with a
    ``summary() -> dict`` method adds its entries (e.g. wavetrain.run.guards.NonFiniteGuard: skipped_steps)."""

    def __init__(self, path: Path, checkpoints: L.Callback, throughput: ThroughputMonitor, static: dict) -> None:
        self.path, self.checkpoints, self.throughput, self.static = path, checkpoints, throughput, static

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        best = self.checkpoints.best_model_score
        write_json_atomic(self.path, {
            "status": "done",
            "val_loss": metrics.get("val/loss"),
            "val_ppl": metrics.get("val/ppl"),
            "val_acc": metrics.get("val/acc"),
            "val_loss_batch_mean": metrics.get("val/loss_batch_mean"),
            # the best value of run.checkpoint_metric: best_val_loss by default, best_val_acc for val/acc, ...
            f"best_{self.checkpoints.monitor.replace('/', '_')}": float(best) if best is not None else None,
            "checkpoint_metric": self.checkpoints.monitor,
            "best_checkpoint": self.checkpoints.best_model_path or None,
            "steps": trainer.global_step,
            "tokens_per_sec": self.throughput.mean_tokens_per_sec(),
            "mfu": self.throughput.mfu(self.throughput.mean_tokens_per_sec(), trainer.world_size),
            "n_parameters": pl_module.n_parameters,
            **{k: v for cb in trainer.callbacks if callable(getattr(cb, "summary", None))
               for k, v in cb.summary().items()},
            **self.static,
        })
