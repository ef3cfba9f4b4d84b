"""The LightningModule: next-token cross-entropy, AdamW, warmup + cosine schedule, evaluation metrics.

Evaluation logs, per split (val/ or test/):
- ``loss``: token-weighted mean cross-entropy over every supervised target (the standard definition), ``ppl`` =
  exp(loss), ``acc`` = argmax accuracy over supervised targets;
- ``loss_batch_mean`` / ``ppl_batch_mean``: the unweighted mean of per-batch mean losses, as the Wave Field and
  WDA papers compute it (spec wavefield.md §4, wda.md §5); equal to ``loss`` when every batch has as many targets.
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from wavetrain.models.lm import build_model, compile_blocks, compile_enabled, count_parameters

SCHEDULES = ("warmup_cosine", "warmup_constant", "cosine")


def lr_factor(step: int, *, schedule: str, warmup_steps: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warmup, then cosine to min_lr
    (``warmup_cosine``), or constant (``warmup_constant``, the WDA code), or cosine from step 0 (``cosine``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r} is unknown: use one of {list(SCHEDULES)}")
    warmup = 0 if schedule == "cosine" else warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "warmup_constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return (min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))) / lr


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """Decay matrices only (no biases, norms, embeddings or other 1-D parameters), unless ``decay_all``."""
    if decay_all:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw(model: torch.nn.Module) -> bool:
    """AdamW's fused kernel (one launch per parameter group and step) when every parameter is on CUDA; the
    default for-each implementation elsewhere (its update equals the fused one up to round-off)."""
    params = list(model.parameters())
    return bool(params) and all(p.is_cuda for p in params)


class LanguageModelTask(L.LightningModule):
    """Trains ``build_model(cfg, vocab_size)`` on (x, y) batches; y = -100 marks unsupervised targets."""

    def __init__(self, cfg: dict, vocab_size: int) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # kept in checkpoints; loggers get the config once (loggers.py)
        self.cfg: DictConfig = OmegaConf.create(cfg)
        self.model = build_model(self.cfg, vocab_size)
        self.n_parameters = count_parameters(self.model)
        self._eval_sums: dict[str, torch.Tensor] = {}
        self.compiled = False

    def setup(self, stage: str) -> None:
        """Compile the blocks in place once the device is known (``model.compile``: auto = on CUDA only)."""
        if not self.compiled and compile_enabled(self.cfg.model.get("compile", "auto"),
                                                 self.trainer.strategy.root_device):
            compile_blocks(self.model)
            self.compiled = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits = self.model(x).float()
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
        supervised = (y.flatten() != -100)
        count = supervised.sum()
        hits = ((logits.argmax(-1).flatten() == y.flatten()) & supervised).sum()
        stats = torch.stack([losses.sum().double(), count.double(), hits.double(),
                             (losses.sum() / count.clamp(min=1)).double(), torch.ones((), dtype=torch.float64,
                                                                                        device=x.device)])
        self._eval_sums["stats"] = self._eval_sums.get("stats", torch.zeros_like(stats)) + stats

    def _eval_epoch_end(self, prefix: str) -> None:
        stats = self._eval_sums.pop("stats", None)
        if stats is None:
            return
        stats = self.all_gather(stats)
        stats = stats.sum(0) if stats.ndim > 1 else stats
        loss_sum, count, hits, batch_loss_sum, batches = stats.tolist()
        loss = loss_sum / max(count, 1)
        batch_mean = batch_loss_sum / max(batches, 1)
        metrics = {f"{prefix}/ppl": math.exp(min(loss, 20.0)),
                   f"{prefix}/acc": hits / max(count, 1), f"{prefix}/loss_batch_mean": batch_mean,
                   f"{prefix}/ppl_batch_mean": math.exp(min(batch_mean, 20.0)), f"{prefix}/tokens": count}
        self.log(f"{prefix}/loss", loss, prog_bar=True)
        self.log_dict(metrics)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        opt = self.cfg.optim
        optimizer = torch.optim.AdamW(parameter_groups(self.model, float(opt.weight_decay), bool(opt.decay_all)),
                                      lr=float(opt.lr), betas=tuple(opt.betas), eps=float(opt.eps),
                                      fused=fused_adamw(self.model))
        # the schedule's horizon: optim.schedule_steps when set (DWARF §2.A decays over 10·spe steps), else the run
        max_steps = int(opt.get("schedule_steps") or self.cfg.trainer.max_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, schedule=opt.schedule, warmup_steps=int(opt.warmup_steps), max_steps=max_steps,
            lr=float(opt.lr), min_lr=float(opt.min_lr)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
