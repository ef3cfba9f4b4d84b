"""Checkpoint files: atomic writes with a recorded SHA-256, and reads that never run pickled code.

:class:`AtomicCheckpointIO` writes to a temporary file, fsyncs and renames, and records the file's SHA-256 beside it
(``<name>.sha256``): a crash while saving leaves the previous file intact, and a truncated or corrupted file is
recognised (:func:`inspect_checkpoint`) and skipped in favour of the previous good one.

Every read (resuming, ``run.ckpt_path``, evaluation, :func:`load_model`, Lightning's own restore through
:class:`AtomicCheckpointIO`) is ``torch.load(weights_only=True)``: a file that holds pickled objects (a hostile
``__reduce__``) is refused before anything in it runs.  wavetrain's checkpoints need no extra safe globals: Lightning
stores tensors, numbers, strings, lists, tuples and dicts, and the RNG states are kept as tensors
(wavetrain.run.determinism).
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from wavetrain.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"
DIGEST_SUFFIX = ".sha256"
# errors that mean the disk, not wavetrain, refused a write
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: the message names the file and the previous good one."""


class StorageError(ConfigError):
    """The disk refused a write (full, read-only, no permission): the message names the file and the fix."""


def storage_failure(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (itself, its cause or its context) when the disk refused a write.  torch.save
    reports a full disk as "unexpected pos", with the ENOSPC only in the exception's context."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def storage_error(cause: OSError, path: Path, what: str) -> StorageError:
    """A one-line StorageError for a write of ``what`` to ``path`` that the disk refused."""
    reason = STORAGE_ERRNOS.get(cause.errno, cause.strerror or "refused")
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space (or point hydra.run.dir at a larger disk) and rerun the same command to resume"
    else:
        fix = "make the run directory writable, or give the run a writable hydra.run.dir"
    return StorageError(f"writing {what} {path} failed: {reason}: {fix}")


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


def recorded_digests(folder: Path) -> set[str]:
    """Every SHA-256 recorded in a ``*.sha256`` file of ``folder`` (hidden ones of unfinished saves included).

    A checkpoint is intact when its hash is one of these, not only the one beside it: each rename pair (a save's
    file + digest, a rotation's last -> previous + digest) has a moment where a crash leaves a complete file next to
    its predecessor's digest, while its own digest is still recorded under the other name."""
    digests = set()
    for entry in os.scandir(folder) if folder.is_dir() else []:
        if entry.name.endswith(DIGEST_SUFFIX):
            words = Path(entry.path).read_text(errors="replace").split()
            digests.update(words[:1])
    return digests


def rotate(path: Path, target: Path) -> None:
    """Rename a checkpoint and its digest (``last.ckpt`` -> ``previous.ckpt``); see :func:`recorded_digests` for
    why a crash between the two renames leaves both files readable."""
    os.replace(path, target)
    if _digest_path(path).exists():
        os.replace(_digest_path(path), _digest_path(target))


def record_digest(path: Path) -> None:
    """(Re)write ``<name>.sha256`` for an intact checkpoint whose own digest a crash left stale."""
    tmp = _digest_path(path.with_name(f".{path.name}.tmp-{os.getpid()}"))
    tmp.write_text(f"{file_sha256(path)}  {path.name}\n")
    os.replace(tmp, _digest_path(path))


def load_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``: tensors and plain values only, no pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to ``.<name>.tmp-<pid>``, fsynced, then renamed over the target, with the file's
    SHA-256 in ``<name>.sha256``: the target is always either the complete old file or the complete new one.
    Reads (Lightning's restore of ``ckpt_path``) always use ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        digest_tmp = _digest_path(tmp)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                writer = _HashingWriter(handle)
                torch.save(checkpoint, writer)
                handle.flush()
                os.fsync(handle.fileno())
            digest_tmp.write_text(f"{writer.digest.hexdigest()}  {path.name}\n")
            os.replace(tmp, path)  # until the next rename the new hash is recorded in the temporary digest
            os.replace(digest_tmp, _digest_path(path))
            _fsync_dir(path.parent)
        except BaseException as error:
            if tmp.exists():  # the target was not replaced: drop the partial file
                tmp.unlink()
                digest_tmp.unlink(missing_ok=True)
            elif digest_tmp.exists():  # the new file is in place: record its digest
                os.replace(digest_tmp, _digest_path(path))
            cause = storage_failure(error)
            if cause is not None:
                raise storage_error(cause, path, "checkpoint") from error
            raise

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint(path)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        _digest_path(Path(path)).unlink(missing_ok=True)


@dataclass
class CheckpointInfo:
    """A readable training checkpoint: its path, optimiser step, the config and vocabulary it was trained with, the
    shape of every tensor of its model and the sizes of its optimiser's parameter groups."""

    path: Path
    global_step: int
    cfg: dict | None
    vocab_size: int | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    param_groups: list[int] = field(default_factory=list)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Read a checkpoint completely (``weights_only=True``) and check it is an intact whole training state
    (CheckpointError naming the file)."""
    path = Path(path)
    if _digest_path(path).exists() and file_sha256(path) not in recorded_digests(path.parent):
        raise CheckpointError(f"{path} is corrupt: its SHA-256 differs from the one recorded in "
                              f"{_digest_path(path).name} when it was written (truncated or damaged on disk)")
    try:
        try:
            checkpoint = load_checkpoint(path, mmap=True)
        except RuntimeError as error:  # a legacy (non-zip) torch file cannot be mapped: read it, still safely
            if "mmap can only be used" not in str(error):
                raise
            checkpoint = load_checkpoint(path)
    except Exception as error:  # torch raises RuntimeError/EOFError/UnpicklingError/... on damaged files
        if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
            raise CheckpointError(
                f"{path} is refused: it holds pickled Python objects ({_pickled_global(error)}), which could run "
                f"code when loaded, and wavetrain checkpoints hold only tensors and plain values: pass a .ckpt "
                f"written by wavetrain training") from None
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt: {_first_line(error)})") from error
    required = ("state_dict", "optimizer_states", "loops", "global_step")
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a complete training checkpoint (missing {missing}): resume from a "
                              f"checkpoint written by wavetrain training")
    hparams = checkpoint.get("hyper_parameters") or {}
    optimizers = checkpoint["optimizer_states"] or [{}]
    return CheckpointInfo(path, int(checkpoint["global_step"]), hparams.get("cfg"), hparams.get("vocab_size"),
                          {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")},
                          [len(group.get("params", [])) for group in optimizers[0].get("param_groups", [])])


def _pickled_global(error: BaseException) -> str:
    """What a weights_only load refused, e.g. ``GLOBAL posix.system`` or ``Unsupported operand 149``."""
    text = str(error)
    found = re.search(r"(GLOBAL [\w.]+|Unsupported global: [^ ]+)", text)
    if found:
        return found.group(1)
    detail = [line.strip() for line in text.split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
    return detail[0] if "WeightsUnpickler error:" in text and detail else "a construct weights_only rejects"


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
    try:
        checkpoint = load_checkpoint(path)
    except Exception as error:
        raise CheckpointError(f"{path} could not be loaded safely ({_first_line(error)}): pass a .ckpt written by "
                              f"wavetrain training") from None
    hparams = checkpoint.get("hyper_parameters", {})
    if "cfg" not in hparams:
        raise ValueError(f"{path} is not a wavetrain checkpoint (no config in its hyper_parameters)")
    cfg = OmegaConf.create(hparams["cfg"])
    model = build_model(cfg, int(hparams["vocab_size"]))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval(), cfg
