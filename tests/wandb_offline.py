"""Read an offline W&B run (``wandb/offline-run-*/run-<id>.wandb``) the way ``wandb sync`` does: a LevelDB-style
record log of ``wandb_internal_pb2.Record`` protobufs, so tests check what a synced run would show (name, tags,
config, history), not only that a folder exists."""
from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7          # ":W&B" + 2-byte version + 1 byte
BLOCK = 32 * 1024   # records are split into chunks that never cross a 32 KiB block
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run_id: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    group: str = ""
    job_type: str = ""
    notes: str = ""
    config: dict = field(default_factory=dict)
    config_records: int = 0         # config updates after the run record (the run record carries the initial config)
    history: list[dict] = field(default_factory=list)
    finished: bool = False          # the exit record is there (wandb writes the file in the background)


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, payload = HEADER, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(path: Path, timeout: float = 60.0) -> OfflineRun:
    """``path``: an ``offline-run-*`` folder or its ``run-<id>.wandb`` file; waits up to ``timeout`` seconds for
    wandb's background writer to finish the file (after ``wandb.finish()`` / the end of the process)."""
    deadline = time.monotonic() + timeout
    while True:
        run = _read(Path(path))
        if run.finished or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _read(path: Path) -> OfflineRun:
    if path.is_dir():
        (path,) = path.glob("run-*.wandb")
    run = OfflineRun()
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the first run record, and updates of it later (empty fields = unchanged)
            for attribute, value in (("run_id", record.run.run_id), ("name", record.run.display_name),
                                     ("group", record.run.run_group), ("tags", list(record.run.tags)),
                                     ("job_type", record.run.job_type), ("notes", record.run.notes)):
                if value:
                    setattr(run, attribute, value)
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config_records += 1
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "exit":
            run.finished = True
    return run
