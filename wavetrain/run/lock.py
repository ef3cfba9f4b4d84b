"""The run directory's lock: one live run per directory."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from wavetrain.config import ConfigError

LOCK_FILE = ".wavetrain.lock"  # only where the filesystem cannot lock a directory (NFS)


class RunDirInUse(ConfigError):
    """The run directory is locked by another live wavetrain process."""


def lock_holder(run_dir: Path) -> str:
    """Who holds the flock on ``run_dir`` (or its lock file), from /proc/locks: ``pid N on host``."""
    ids = set()
    for path in (run_dir, run_dir / LOCK_FILE):
        try:
            info = os.stat(path)
        except OSError:
            continue
        ids.add((os.major(info.st_dev), os.minor(info.st_dev), info.st_ino))
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for fields in (line.split() for line in lines):  # "1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].count(":") == 2:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) in ids:
                return f"pid {fields[4]} on {socket.gethostname()}"
    return "another process"


class RunDirLock:
    """An exclusive flock on the run directory itself for the life of the run.  It writes nothing, the kernel
    drops it when the holder dies (kill -9), and a second process gets :class:`RunDirInUse` naming the holder.
    Where the filesystem cannot lock a directory (NFS emulates flock with write locks) ``.wavetrain.lock`` inside it
    is locked instead."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise
            except OSError:  # EBADF/ENOLCK: no directory locks on this filesystem
                os.close(fd)
                fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirInUse(f"hydra.run.dir={self.run_dir} is in use by another wavetrain run "
                              f"({lock_holder(self.run_dir)}): wait for it to finish, or give this run its own "
                              f"hydra.run.dir") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
