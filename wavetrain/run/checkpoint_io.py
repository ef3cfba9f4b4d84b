"""Checkpoint files: atomic writes with a recorded SHA-256, and reading them back checked.

:class:`AtomicCheckpointIO` writes to a temporary file, fsyncs and renames, and records the file's SHA-256 beside it
(``<name>.sha256``): a crash while saving leaves the previous file intact, and a truncated or corrupted file is
recognised (:func:`inspect_checkpoint`) and skipped in favour of the previous good one.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from wavetrain.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"
DIGEST_SUFFIX = ".sha256"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: the message names the file and the previous good one."""


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes everything written through it."""

    def __init__(self, handle) -> None:
        super().__init__()
        self.handle, self.digest = handle, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to ``.<name>.tmp-<pid>``, fsynced, then renamed over the target, with the file's
    SHA-256 in ``<name>.sha256``: the target is always either the complete old file or the complete new one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        digest_tmp = _digest_path(tmp)
        try:
            with open(tmp, "wb") as handle:
                writer = _HashingWriter(handle)
                torch.save(checkpoint, writer)
                handle.flush()
                os.fsync(handle.fileno())
            digest_tmp.write_text(f"{writer.digest.hexdigest()}  {path.name}\n")
            # the digest goes first: a crash between the two renames leaves a mismatch, which reads as corrupt
            os.replace(digest_tmp, _digest_path(path))
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            digest_tmp.unlink(missing_ok=True)
            raise

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        _digest_path(Path(path)).unlink(missing_ok=True)


@dataclass
class CheckpointInfo:
    """A readable training checkpoint: its path, optimiser step and the config it was trained with."""

    path: Path
    global_step: int
    cfg: dict | None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Read a checkpoint completely and check it is a whole training state (CheckpointError naming the file)."""
    path = Path(path)
    recorded = _digest_path(path)
    if recorded.exists():
        expected = recorded.read_text().split()[0] if recorded.read_text().split() else ""
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path} is corrupt: its SHA-256 differs from the one recorded in {recorded.name} "
                                  f"when it was written (truncated or damaged on disk)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # torch raises RuntimeError/EOFError/UnpicklingError/... on damaged files
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt: {_first_line(error)})") from error
    required = ("state_dict", "optimizer_states", "loops", "global_step")
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a complete training checkpoint (missing {missing}): resume from a "
                              f"checkpoint written by wavetrain training")
    return CheckpointInfo(path, int(checkpoint["global_step"]),
                          (checkpoint.get("hyper_parameters") or {}).get("cfg"))


def checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    """Resumable checkpoints of a run directory in order of preference: last, previous, then the others
    (best-step*.ckpt) by the step in their name."""
    if not ckpt_dir.is_dir():
        return []
    named = [ckpt_dir / LAST, ckpt_dir / PREVIOUS]

    def step_of(p: Path) -> int:
        found = re.findall(r"\d+", p.stem)
        return int(found[-1]) if found else -1

    others = sorted((p for p in ckpt_dir.glob("*.ckpt") if p.name not in (LAST, PREVIOUS)), key=step_of,
                    reverse=True)
    return [p for p in named if p.exists()] + others


def newest_readable(candidates: list[Path]) -> tuple[CheckpointInfo | None, list[tuple[Path, str]]]:
    """The readable checkpoint with the highest step (ties: the earlier candidate) and the unreadable ones."""
    best, unreadable = None, []
    for candidate in candidates:
        try:
            info = inspect_checkpoint(candidate)
        except CheckpointError as error:
            unreadable.append((candidate, str(error)))
            continue
        if best is None or info.global_step > best.global_step:
            best = info
    return best, unreadable


def load_model(ckpt_path: str | Path) -> tuple[torch.nn.Module, Any]:
    """The trained LM (eval mode, on CPU) and the composed config it was trained with."""
    from omegaconf import OmegaConf

    from wavetrain.models.lm import build_model

    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a .ckpt from a run's checkpoints/ folder")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters", {})
    if "cfg" not in hparams:
        raise ValueError(f"{path} is not a wavetrain checkpoint (no config in its hyper_parameters)")
    cfg = OmegaConf.create(hparams["cfg"])
    model = build_model(cfg, int(hparams["vocab_size"]))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval(), cfg
