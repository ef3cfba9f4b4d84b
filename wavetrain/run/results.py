"""results.json: read, written atomically, kept when a finished run is extended."""
from __future__ import annotations

import json
import os
from pathlib import Path

from wavetrain.run.checkpoint_io import storage_error, storage_failure


def read_results(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        cause = storage_failure(error)
        raise (storage_error(cause, path, "results") if cause else error) from error


def finished_results(results_path: Path, max_steps: int) -> dict | None:
    """The saved results when the run directory holds a run finished at ``max_steps`` or later, else None."""
    results = read_results(results_path)
    if not results or results.get("status") != "done" or int(results.get("steps") or 0) < int(max_steps):
        return None
    return results


def rotate_results(results_path: Path) -> Path | None:
    """Keep an earlier finished run's results as ``results.<k>.json`` (first free k) before this run writes its
    own; a record of a failed or preempted attempt is not a result and is simply replaced later."""
    results = read_results(results_path)
    if not results or results.get("status") != "done":
        return None
    k = 1
    while (target := results_path.with_name(f"{results_path.stem}.{k}{results_path.suffix}")).exists():
        k += 1
    os.replace(results_path, target)
    return target
