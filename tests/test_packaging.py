"""Packaging: the wheel carries every config (conf/ and sweeps/ stay at the top level of the repository) and works
outside the repository; a checkout / editable install composes from the repository's own conf/."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from wavetrain.config import CONF_DIR
from wavetrain.sweep import SWEEPS_DIR

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "wavetrain", "conf", "sweeps")


def _config_files(root: Path) -> set[str]:
    """Every yaml under a conf folder (links followed: conf/sweep is sweeps/), relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*.yaml")} | {
        f"sweep/{p.name}" for p in (root / "sweep").glob("*.yaml")}


def test_a_checkout_composes_from_the_top_level_conf_and_sweeps() -> None:
    assert CONF_DIR == REPO / "conf" and SWEEPS_DIR == REPO / "sweeps"
    assert (REPO / "wavetrain" / "conf").resolve() == CONF_DIR, "wavetrain/conf links the package to conf/"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources, installed into a fresh virtual environment that reuses this
    environment's dependencies (torch, lightning, ...) through a .pth line, so no network is needed. Returns
    the new environment's python."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:  # a copy: the build's build/ and *.egg-info never touch the working tree
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("wavetrain-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # after the new site-packages on sys.path; .pth files there are not run, so the editable install stays off
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return python


def _run(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_installed_wheel_works_outside_the_repository(installed_wheel: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(installed_wheel, ["-c", "import wavetrain.config as c; print(c.__file__); print(c.CONF_DIR)"],
                 elsewhere)
    module, conf = where.stdout.split()
    assert module.startswith(str(installed_wheel.parent.parent)) and REPO not in Path(conf).parents, where.stdout
    assert _config_files(Path(conf)) == _config_files(CONF_DIR), "every config of conf/ and sweeps/ is in the wheel"

    help_text = _run(installed_wheel, ["-m", "wavetrain", "--help"], elsewhere)
    assert help_text.returncode == 0, help_text.stderr[-2000:]
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    for group in groups:  # every group, also ones added later (experiment, ...) and the sweep files
        assert f"\n{group}: " in help_text.stdout, f"group {group} missing from --help"

    dry = _run(installed_wheel, ["-m", "wavetrain", "-m", "+sweep=smoke", "--dry-run"], elsewhere)
    assert dry.returncode == 0 and "2 jobs (nothing was trained)" in dry.stdout, dry.stderr[-2000:]

    run = _run(installed_wheel, ["-m", "wavetrain", "scale=tiny", "seq_len=32", "data.batch_size=4",
                                 "data.val_windows=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                 "optim.warmup_steps=0", "trainer.precision=32-true", "hydra.run.dir=run"], elsewhere)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((elsewhere / "run" / "results.json").read_text())
    assert results["status"] == "done" and results["steps"] == 2 and results["val_loss"] > 0
    assert sorted(p.name for p in elsewhere.iterdir()) == ["run"], "nothing written outside the run directory"
