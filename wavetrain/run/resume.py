"""Where a run starts: the newest readable checkpoint of its directory (or ``run.ckpt_path``), checked against the
configuration it is resumed with."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wavetrain.config import ConfigError
from wavetrain.run.checkpoint_io import (CHECKPOINT_DIR, LAST, CheckpointError, CheckpointInfo, checkpoint_candidates,
                                         inspect_checkpoint, newest_readable)

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


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every setting (outside RESUMABLE_KEYS) in which two run configs differ."""
    old, new = _flatten(saved), _flatten(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            differences.append(f"{key}: {old.get(key, '<absent>')} -> {new.get(key, '<absent>')}")
    return differences


def check_resume_compatible(plan: ResumePlan, current_cfg: dict, run_dir: Path, explicit: bool) -> None:
    """Refuse to resume the run directory automatically into a different configuration (ConfigError)."""
    if explicit or plan.checkpoint is None or plan.checkpoint.cfg is None:
        return
    differences = config_differences(plan.checkpoint.cfg, current_cfg)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; ... ({len(differences)} in all)" if len(differences) > 6 else "")
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds another run ({plan.checkpoint.path.name} at step "
            f"{plan.checkpoint.global_step} was trained with different settings: {shown}). Nothing was changed: "
            f"use a new hydra.run.dir, rerun with that run's overrides to resume it, or pass "
            f"run.ckpt_path={plan.checkpoint.path} to start from its weights knowingly")


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


