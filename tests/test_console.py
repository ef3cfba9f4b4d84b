"""The console: the progress bar only on an interactive terminal, Lightning's records printed once, no tips."""
from __future__ import annotations

import io
import logging
import sys

import pytest

from wavetrain import console


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch):
    """stderr as an interactive terminal outside SLURM and multiruns (each test changes one of these)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    for key in ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(console, "in_multirun", lambda: False)
    return monkeypatch


def test_progress_bar_only_on_an_interactive_terminal(terminal: pytest.MonkeyPatch) -> None:
    assert console.progress_bar_enabled(None) is True
    assert console.progress_bar_enabled(False) is False, "an explicit setting wins"
    terminal.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert console.progress_bar_enabled(None) is False, "output redirected to a file"
    assert console.progress_bar_enabled(True) is True


def test_no_progress_bar_in_a_multirun_or_a_slurm_batch_job(terminal: pytest.MonkeyPatch) -> None:
    terminal.setattr(console, "in_multirun", lambda: True)
    assert console.progress_bar_enabled(None) is False
    terminal.setattr(console, "in_multirun", lambda: False)
    terminal.setenv("SLURM_NTASKS", "1")
    terminal.setenv("SLURM_JOB_ID", "4242")
    terminal.setenv("SLURM_JOB_NAME", "wavetrain")
    assert console.progress_bar_enabled(None) is False
    terminal.setenv("SLURM_JOB_NAME", "interactive")  # srun --pty: a terminal again
    assert console.progress_bar_enabled(None) is True
    assert console.console_callbacks(False) and not console.console_callbacks(True), "a line per validation instead"


def test_lightning_records_reach_the_root_handlers_once_without_tips() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    lightning = logging.getLogger("lightning.pytorch")
    own = logging.StreamHandler(stream)  # what Lightning adds when imported before logging is configured
    saved = (lightning.handlers[:], lightning.propagate, root.level)
    lightning.addHandler(own)
    lightning.propagate = False
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        console.quiet_console()
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[2])
        lightning.handlers[:], lightning.propagate = saved[0], saved[1]
    assert stream.getvalue() == "GPU available: False, used: False\n"
