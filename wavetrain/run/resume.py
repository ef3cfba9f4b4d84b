"""Where a run starts: the newest readable checkpoint of its directory (or ``run.ckpt_path``), checked against the
configuration, model and vocabulary it is resumed with, before anything is written."""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from wavetrain.config import ConfigError
from wavetrain.run.checkpoint_io import (CHECKPOINT_DIR, DIGEST_SUFFIX, LAST, CheckpointError, CheckpointInfo,
                                         _digest_path, checkpoint_candidates, file_sha256, inspect_checkpoint,
                                         newest_readable, record_digest, recorded_digests)

log = logging.getLogger(__name__)

# Keys that may differ when a run directory is resumed automatically: bookkeeping, logging, the step budget (a
# finished run can be extended), evaluation cadence and where files live.  Anything else means another run.
RESUMABLE_KEYS = ("run", "logger", "trainer.max_steps", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                  "trainer.val_check_interval", "trainer.limit_val_batches", "trainer.num_sanity_val_steps",
                  "trainer.accelerator", "trainer.precision", "trainer.deterministic", "trainer.strategy",
                  "data.num_workers", "data.cache_dir", "data.val_windows", "data.path")


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


def budget_derived_keys(cfg: DictConfig, saved_max_steps: int) -> set[str]:
    """The keys whose value follows ``trainer.max_steps`` (interpolations such as ``optim.warmup_steps`` =
    ${div:${trainer.max_steps},10}): they change with the step budget when a finished run is extended."""
    probe = copy.deepcopy(cfg)
    with open_dict(probe):
        probe.trainer.max_steps = saved_max_steps
    now, then = _flatten(OmegaConf.to_container(cfg, resolve=True)), _flatten(OmegaConf.to_container(probe,
                                                                                                     resolve=True))
    return {key for key, value in now.items() if then.get(key, value) != value}


def config_differences(saved: dict, current: DictConfig) -> list[str]:
    """``key: saved -> current`` for every setting in which two run configs differ, leaving out RESUMABLE_KEYS and
    the keys derived from the step budget."""
    old, new = _flatten(saved), _flatten(OmegaConf.to_container(current, resolve=True))
    derived = budget_derived_keys(current, int(old.get("trainer.max_steps") or current.trainer.max_steps))
    differences = []
    for key in sorted(set(old) | set(new)):
        if key in derived or any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            differences.append(f"{key}: {old.get(key, '<absent>')} -> {new.get(key, '<absent>')}")
    return differences


def check_resume_compatible(plan: ResumePlan, cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to resume the run directory automatically into a different configuration (ConfigError)."""
    if plan.checkpoint is None or plan.checkpoint.cfg is None:
        return
    differences = config_differences(plan.checkpoint.cfg, cfg)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; ... ({len(differences)} in all)" if len(differences) > 6 else "")
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds another run ({plan.checkpoint.path.name} at step "
            f"{plan.checkpoint.global_step} was trained with different settings: {shown}). Nothing was changed: "
            f"use a new hydra.run.dir, rerun with that run's overrides to resume it, or pass "
            f"run.ckpt_path={plan.checkpoint.path} to start from its weights knowingly")


def model_layout(cfg: DictConfig, vocab_size: int) -> tuple[dict[str, tuple[int, ...]], list[int]]:
    """The shape of every tensor of this run's model (state-dict names as Lightning saves them) and the sizes of
    its optimiser's parameter groups, from the model built on the meta device (no memory) where it allows."""
    import torch

    from wavetrain.lightning_module import parameter_groups
    from wavetrain.models.lm import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg, vocab_size)
    except Exception:  # noqa: BLE001 - a module that computes its layout from tensor values: build it for real
        model = build_model(cfg, vocab_size)
    shapes = {f"model.{name}": tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    groups = parameter_groups(model, float(cfg.optim.weight_decay), bool(cfg.optim.get("decay_all", False)))
    return shapes, [len(group["params"]) for group in groups]


def check_checkpoint_fits(info: CheckpointInfo, cfg: DictConfig, vocab_size: int, source: str) -> None:
    """Refuse a checkpoint whose model, vocabulary or optimiser groups differ from this run's (CheckpointError):
    Lightning would otherwise find out only inside ``trainer.fit``, after the run directory was prepared."""
    shapes, groups = model_layout(cfg, vocab_size)
    problems = []
    if info.vocab_size is not None and int(info.vocab_size) != int(vocab_size):
        problems.append(f"vocabulary of {info.vocab_size} tokens, this run's tokenizer has {vocab_size}")
    mismatched = [f"{k} {list(info.shapes[k])} vs {list(v)}" for k, v in shapes.items()
                  if k in info.shapes and info.shapes[k] != v]
    missing, unexpected = sorted(set(shapes) - set(info.shapes)), sorted(set(info.shapes) - set(shapes))
    if mismatched:
        problems.append(f"{len(mismatched)} tensors of another shape (first: {mismatched[0]})")
    if missing or unexpected:
        problems.append(f"{len(missing)} tensors missing, {len(unexpected)} unexpected (first: "
                        f"{(missing or unexpected)[0]})")
    if not problems and info.param_groups and info.param_groups != groups:
        problems.append(f"optimiser parameter groups of {info.param_groups} tensors vs {groups} "
                        f"(optim.decay_all differs)")
    if problems:
        trained = (info.cfg or {}).get("run", {}).get("choices") or {}
        origin = ", ".join(f"{g}={c}" for g, c in trained.items() if g in ("attention", "scale", "tokenizer", "data"))
        raise CheckpointError(
            f"{source}{info.path} does not fit this run's model: {'; '.join(problems)}. It was trained with "
            f"{origin or 'another configuration'}: pass a checkpoint of the same attention, scale and tokenizer "
            f"(or those settings), or run.ckpt_path=null in a new hydra.run.dir to start from scratch")


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


def tidy_checkpoint_dir(plan: ResumePlan, ckpt_dir: Path) -> None:
    """Before a resumed run writes: re-record the digest of an intact checkpoint whose own digest a crash between
    two renames left stale or missing, rename unreadable checkpoints to ``<name>.corrupt`` (so that no later save
    rotates one over a good file), then delete the digests of files that are gone and the partial temporary files
    of saves that a killed process never finished."""
    digests = recorded_digests(ckpt_dir)
    unreadable = {path for path, _ in plan.unreadable}
    for path in checkpoint_candidates(ckpt_dir):
        own = _digest_path(path).read_text().split()[:1] if _digest_path(path).exists() else []
        if path not in unreadable and own != [actual := file_sha256(path)] and actual in digests:
            record_digest(path)
    for path, reason in plan.unreadable:
        target = path.with_name(path.name + ".corrupt")
        os.replace(path, target)
        if _digest_path(path).exists():
            os.replace(_digest_path(path), _digest_path(target))
        log.warning("%s; kept as %s", reason, target.name)
    for digest in ckpt_dir.glob(f"*{DIGEST_SUFFIX}") if ckpt_dir.is_dir() else []:
        if not digest.with_name(digest.name.removesuffix(DIGEST_SUFFIX)).exists():
            digest.unlink()
    for partial in ckpt_dir.glob(".*.tmp-*") if ckpt_dir.is_dir() else []:
        partial.unlink(missing_ok=True)
