"""A sweep's exit status: each refused job of a multirun prints its one-line reason and records it in its
results.json, and the sweep goes on; :class:`FailedJobs` then makes the whole launch exit with status 1 naming them.
It reads the jobs' results.json, so it works for every launcher (basic, joblib's parallel, SLURM)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class FailedJobs(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): exit 1 after a multirun in which a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = []
        for path in sorted(Path(str(config.hydra.sweep.dir)).glob("*/results.json")):
            try:
                results = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if results.get("status") == "failed":
                failed.append(f"{path.parent.name} ({' '.join(results.get('overrides') or [])}): "
                              f"{results.get('error')}")
        if failed:
            print(f"wavetrain: {len(failed)} job(s) of this sweep failed:\n  " + "\n  ".join(failed), file=sys.stderr)
            sys.exit(1)
