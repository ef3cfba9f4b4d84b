"""Evaluations after training: the test split (``run.test``) and the DWARF passkey protocol (``run.passkey``),
each checked before the run starts so that a run that cannot do them is refused before it trains."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from wavetrain.config import ConfigError
from wavetrain.run.checkpoint_io import CHECKPOINT_DIR, LAST

log = logging.getLogger(__name__)


def check_evaluations(cfg: DictConfig, data: L.LightningDataModule, tokenizer) -> None:
    """Refuse (ConfigError) an evaluation this run could not do: a test split that does not exist, a tokenizer that
    cannot score the passkey words."""
    if cfg.run.test and not data.has_split("test"):
        raise ConfigError(f"run.test=true but data={cfg.run.choices.get('data')} has no test split: set "
                          f"run.test=false (or give the source a test split, e.g. data.source.test_fraction=0.05)")
    if cfg.run.get("passkey"):
        from wavetrain.eval.passkey import check_run_tokenizer

        try:
            check_run_tokenizer(tokenizer)
        except ValueError as err:
            raise ConfigError(f"run.passkey=true: {err}") from None


def evaluate_after_training(cfg: DictConfig, trainer: L.Trainer, task: L.LightningModule,
                            data: L.LightningDataModule, results: dict, run_dir: Path, tokenizer) -> dict:
    """The results.json entries of the evaluations this run asked for (none: an empty dict)."""
    scores: dict = {}
    if cfg.run.test:
        tested = trainer.test(task, datamodule=data, ckpt_path=results.get("best_checkpoint"), verbose=False)
        scores.update({k.replace("/", "_"): float(v) for k, v in (tested[0] if tested else {}).items()})
    if cfg.run.get("passkey"):
        scores.update(_passkey(cfg, run_dir, results, tokenizer, trainer.strategy.root_device))
    return scores


def _passkey(cfg: DictConfig, run_dir: Path, results: dict, tokenizer, device) -> dict:
    """run.passkey: the DWARF passkey protocol (spec dwarf.md §5) on the best checkpoint (else the last one)."""
    from wavetrain.eval.passkey import passkey_after_training

    checkpoint = Path(results.get("best_checkpoint") or run_dir / CHECKPOINT_DIR / LAST)
    distances = cfg.run.get("passkey_distances")
    scores = passkey_after_training(checkpoint, tokenizer, run_dir / "passkey", context=int(cfg.seq_len),
                                    distances=list(distances) if distances is not None else None,
                                    trials=int(cfg.run.passkey_trials), device=device)
    accuracy = scores["passkey_acc"]
    log.info("passkey (spec dwarf.md §5): %s over %d distances, written to %s", "n/a" if accuracy is None
             else f"{accuracy:.1%}", scores["passkey_distances"], run_dir / "passkey")
    return scores
