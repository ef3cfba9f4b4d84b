"""Shared fixtures: an isolated cache and offline services for every test, and the real corpora of ../shared/data."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs of the CLI in subprocesses (seconds to a minute)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one); python -m wavetrain.bench "
                                       "--suite gpu runs them first")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Token/tokenizer caches go to a per-session temporary folder, never to ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "wavetrain-cache"
    monkeypatch.setenv("WAVETRAIN_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def single_thread():
    """Small fp64 problems run fastest on one intra-op thread; extra OpenMP threads only contend on a loaded
    2-core machine (use with ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora in ../shared/data (see its SOURCES.md); tests that need them skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data fixtures need {SHARED_DATA} (the shared/ folder beside the repository)")
    return SHARED_DATA
