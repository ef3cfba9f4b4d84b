"""Divergence: :class:`NonFiniteGuard` stops on a NaN/inf loss or gradient before the optimiser applies it, naming the
step, the loss and the last good checkpoint (``run.on_nonfinite=skip``: drop the step's update and go on)."""
from __future__ import annotations

import logging
import math

import lightning as L
import torch

from wavetrain.config import ConfigError
from wavetrain.run.preemption import StepCheckpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A NaN/inf training loss or gradient: the message names the step, the loss and the last good checkpoint."""


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
        what = (f"non-finite training loss {loss_value} (gradient norm {norm_value})" if not math.isfinite(loss_value)
                else f"non-finite gradient (global norm {norm_value}) with a finite training loss {loss_value:.4g}")
        where = f"at step {step} (optimiser step {step + 1} of {trainer.max_steps})"
        if self.mode == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            log.warning("%s %s: update skipped (%d skipped so far)", what, where, self.skipped)
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
            return
        good = self.checkpoints.last_good()
        last_good = (f"{good.path} (step {good.global_step})" if good else f"none yet (the first is due at step "
                     f"{self.checkpoints.every_n_steps}, run.checkpoint_every_n_steps)")
        resume = f"resume from it with run.ckpt_path={good.path}" if good else "start again"
        if self.mode == "skip":
            fix = (f"{self.skipped} steps were skipped already, the limit run.max_nonfinite_skips={self.max_skips}. "
                   f"Lower optim.lr (or raise optim.warmup_steps, set optim.grad_clip) and {resume}, or raise "
                   f"run.max_nonfinite_skips")
        else:
            fix = (f"Lower optim.lr (or raise optim.warmup_steps, set optim.grad_clip) and {resume}, or set "
                   f"run.on_nonfinite=skip to drop such steps")
        raise NonFiniteLossError(f"{what} {where}: the run stopped before applying it. Last good checkpoint: "
                                 f"{last_good}. {fix}")

    def summary(self) -> dict:
        """Contribution to results.json."""
        return {"skipped_steps": self.skipped}

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


