"""Sweep files (sweeps/*.yaml): the header contract, dry runs of every file with the job count its grid implies,
seeds, command-line overrides, the submitit launchers (sbatch script built without a cluster) and the parallel local
launcher (a real two-worker multirun)."""
from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.types import HydraContext
from omegaconf import OmegaConf

from wavetrain import compose_config
from wavetrain.config import ConfigError, group_choices
from wavetrain.sweep import SWEEPS_DIR, dry_run, expand_sweep, list_jobs, sweep_names

SIMPLE_VALUE = re.compile(r"^[^(){}\[\]]*$")


def _raw(name: str):
    return OmegaConf.load(SWEEPS_DIR / f"{name}.yaml")


def _axis_size(key: str, value: str, raw) -> int:
    """Values of one sweep axis as written in the file (the seed axis: the file's sweep.seeds)."""
    if key == "seed":
        return len(raw.sweep.seeds)
    assert SIMPLE_VALUE.match(str(value)), f"{key}: {value} — extend _axis_size for this sweep syntax"
    return len([v for v in str(value).split(",") if v.strip()])


def test_sweeps_folder_is_the_sweep_group() -> None:
    assert "smoke" in sweep_names() and "mqar" in sweep_names() and "all_variants" in sweep_names()
    assert (Path(__file__).resolve().parent.parent / "conf" / "sweep").resolve() == SWEEPS_DIR.resolve()


@pytest.mark.parametrize("name", sweep_names())
def test_sweep_file_header_contract(name: str) -> None:
    raw = _raw(name)
    text = (SWEEPS_DIR / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_"), "sweep files set global keys"
    assert raw.sweep.name == name, f"sweep.name must be the file name {name!r}"
    assert raw.sweep.get("metric") and raw.sweep.get("goal") in ("min", "max") and raw.sweep.get("table")
    assert len(raw.sweep.seeds) >= 1
    assert "${sweep.name}" in str(raw._get_node("logger")._get_node("group")._value())
    assert "${sweep.name}" in str(raw.hydra.sweep._get_node("dir")._value())
    assert raw.hydra.sweep._get_node("dir")._value().startswith("multirun/${sweep.name}/")
    assert str(raw.hydra.sweeper.params._get_node("seed")._value()) == "${wavetrain.sweep_values:${sweep.seeds}}"
    assert re.search(rf"^# Run: +python -m wavetrain -m \+sweep={name}\b", text, re.M), "a # Run: header line"
    for ref in raw.get("reference") or []:
        assert {"match", "metric", "value", "source"} <= set(ref.keys()), f"reference {ref} lacks a field"


@pytest.mark.parametrize("name", sweep_names())
def test_every_sweep_file_lists_the_jobs_of_its_grid(name: str) -> None:
    raw = _raw(name)
    params = raw.hydra.sweeper.params
    expected = math.prod(_axis_size(k, params._get_node(k)._value(), raw) for k in params)
    jobs = list_jobs([f"+sweep={name}"], validate=False)  # every row is composed and validated by the dry run of
    # the file's "# Run:" command in test_documented_commands.py
    assert len(jobs) == expected, f"{name}: {len(jobs)} jobs, the file's grid gives {expected}"
    assert len({tuple(job) for job in jobs}) == len(jobs)
    for ref in raw.get("reference") or []:
        wanted = {f"{k}={v}" for k, v in ref.match.items()}
        assert any(wanted <= set(job) for job in jobs), f"{name}: reference {dict(ref.match)} matches no job"


def test_expansion_is_hydras_basic_sweeper() -> None:
    """wavetrain.sweep expands grids with Hydra's public API only; here it is checked against Hydra's own (private)
    BasicSweeper on every sweep file and command-line sweeps, so a Hydra release that changes the order shows."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for name in sweep_names():
        params = OmegaConf.to_container(_raw(name).hydra.sweeper.params, resolve=True)
        arguments = [f"{key}={value}" for key, value in params.items()] + [
            f"+sweep={name}", "seed=1,2", "scale.n_heads=range(1,4)", "attention=standard,wda", "seed=3"]
        hydra_jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]
        assert expand_sweep(arguments) == hydra_jobs, name


@pytest.mark.parametrize("name", ["all_variants", "mqar"])
def test_cross_architecture_tables_list_every_attention_config(name: str) -> None:
    listed = str(_raw(name).hydra.sweeper.params.attention).split(",")
    missing = sorted(set(group_choices("attention")) - set(listed))
    assert not missing, f"add {missing} to hydra.sweeper.params.attention in sweeps/{name}.yaml"
    assert len(listed) == len(set(listed)) and set(listed) <= set(group_choices("attention"))


def test_seeds_multiply_every_row_and_command_line_overrides_apply() -> None:
    jobs = list_jobs(["+sweep=smoke", "sweep.seeds=[1,2,3]", "scale=small", "trainer.max_steps=40"])
    assert sorted((j[0], j[1]) for j in jobs) == sorted(
        (f"attention={a}", f"seed={s}") for a in ("standard", "wavefield") for s in (1, 2, 3))
    cfg = compose_config(jobs[0])
    assert cfg.scale.d_model == compose_config(["scale=small"]).scale.d_model and cfg.trainer.max_steps == 40
    assert cfg.seed == 1 and cfg.run.choices["attention"] == "standard"
    assert list_jobs(["+sweep=smoke", "attention=wda"], validate=False) == [
        ["attention=wda", "seed=1337", "+sweep=smoke"]], "a command-line value replaces the sweep's axis"


def test_dry_run_cli_prints_jobs_and_rejects_bad_rows(capsys: pytest.CaptureFixture) -> None:
    assert dry_run(["-m", "+sweep=smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#0: attention=standard seed=1337 +sweep=smoke" in out and "2 jobs (nothing was trained)" in out
    assert dry_run(["-m", "+sweep=smoke", "scale.n_heads=2,3", "--dry-run"]) == 1
    assert "job #1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="divisible"):
        list_jobs(["+sweep=smoke", "scale.n_heads=3"])
    assert dry_run(["+sweep=smoke", "--cfg", "job", "--dry-run"]) == 2


def _launcher(overrides: list[str]):
    """The launcher Hydra would build for ``python -m wavetrain -m <overrides>`` (same config loader)."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    from wavetrain.__main__ import main
    from wavetrain.config import CONF_DIR

    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2("wavetrain", create_config_search_path(str(CONF_DIR)))
    cfg = hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN, with_log_configuration=False)
    context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(cfg))
    return Plugins.instance().instantiate_launcher(hydra_context=context, task_function=main, config=cfg), cfg


def test_slurm_launcher_builds_the_sbatch_script_without_a_cluster(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    fake_srun = tmp_path / "bin" / "srun"  # submitit only checks that srun exists
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\nexit 0\n")
    fake_srun.chmod(fake_srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}:{Path('/usr/bin')}:{Path('/bin')}")
    submitted: dict = {}

    def capture(self, delayed_submissions):  # instead of calling sbatch: keep the script and the jobs
        submitted["script"] = self._make_submission_file_text("python -u -m submitit.core._submit", "uid")
        submitted["parameters"] = dict(self.parameters)
        submitted["jobs"] = [d.args[0] for d in delayed_submissions]
        submitted["first"] = delayed_submissions[0]
        submitted["max_num_timeout"] = self.max_num_timeout
        raise RuntimeError("captured")

    monkeypatch.setattr(SlurmExecutor, "_internal_process_submissions", capture)
    overrides = ["+sweep=smoke", "trainer=gpu", "trainer.devices=4", "trainer.num_nodes=2", "hydra/launcher=slurm",
                 "hydra.launcher.partition=gpu-a100", "hydra.launcher.account=proj42", "hydra.launcher.timeout_min=90",
                 "+hydra.launcher.additional_parameters.mail-type=END", f"hydra.sweep.dir={tmp_path}/sweep"]
    launcher, cfg = _launcher(overrides)
    try:
        with pytest.raises(RuntimeError, match="captured"):
            launcher.launch(list_jobs(overrides, validate=False), initial_job_idx=0)
    finally:
        GlobalHydra.instance().clear()
    script = submitted["script"]
    for line in ("--partition=gpu-a100", "--account=proj42", "--time=90", "--nodes=2", "--ntasks-per-node=4",
                 "--gpus-per-node=4", "--cpus-per-task=8", "--mail-type=END", "--signal=USR2@120",
                 "--job-name=wavetrain"):  # hydra.job.name, not __main__
        assert f"#SBATCH {line}" in script, f"{line} missing from\n{script}"
    assert submitted["max_num_timeout"] == 3 and len(submitted["jobs"]) == 2
    first = submitted["first"]  # on timeout/preemption submitit resubmits what the job's checkpoint() returns
    requeued = first.function.checkpoint(*first.args, **first.kwargs)
    assert isinstance(requeued, submitit.helpers.DelayedSubmission) and requeued.function is first.function
    assert requeued.args == first.args and requeued.args[0] == submitted["jobs"][0], "the same job is requeued"


def test_local_submitit_launcher_config_composes() -> None:
    launcher, cfg = _launcher(["+sweep=smoke", "hydra/launcher=local"])
    GlobalHydra.instance().clear()
    assert type(launcher).__name__ == "LocalLauncher"
    assert launcher.params["timeout_min"] == 240 and launcher.params["tasks_per_node"] == 1
    assert launcher.params["submitit_folder"].endswith("/.submitit/%j")


def test_parallel_launcher_config_composes() -> None:
    launcher, cfg = _launcher(["+sweep=smoke", "hydra/launcher=parallel"])
    GlobalHydra.instance().clear()
    assert type(launcher).__name__ == "JoblibLauncher"
    assert cfg.hydra.launcher.n_jobs == -1 and cfg.hydra.launcher.pre_dispatch == "n_jobs"
    mqar_launcher, _ = _launcher(["+sweep=mqar"])
    GlobalHydra.instance().clear()
    assert type(mqar_launcher).__name__ == "JoblibLauncher", "the MQAR table is the CPU table: one job per core"


@pytest.mark.slow
def test_parallel_launcher_runs_every_job_once_in_worker_processes(tmp_path: Path) -> None:
    """Two workers, four jobs, two of which fail: every job runs once, failures are recorded, the exit is non-zero."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = ["-m", "+sweep=smoke", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "scale.n_heads=2,3",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "optim.warmup_steps=1", "data.val_windows=4"]
    out = subprocess.run([sys.executable, "-m", "wavetrain", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 1 and "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr, out.stderr[-3000:]
    (launch,) = list((tmp_path / "multirun" / "smoke").iterdir())
    results = [json.loads(path.read_text()) for path in sorted(launch.glob("*/results.json"))]
    assert sorted(r["status"] for r in results) == ["done", "done", "failed", "failed"], out.stderr[-3000:]
    assert all(r["steps"] == 4 for r in results if r["status"] == "done")
