"""Reliability (wavetrain/run/): exact resume after kill -9, preemption signals, atomic and corrupt
checkpoints, the NaN guard, run-directory hygiene, and bad inputs that fail before anything is written."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from wavetrain import compose_config, config
from wavetrain.config import ConfigError, check_cli_overrides, run_stamp
from wavetrain.lightning_module import LanguageModelTask
from wavetrain.run.checkpoint_io import (AtomicCheckpointIO, CheckpointError, StorageError, file_sha256,
                                         inspect_checkpoint)
from wavetrain.run.determinism import RunPositionSampler
from wavetrain.run.guards import NonFiniteLossError
from wavetrain.run.preemption import Preempted
from wavetrain.run.resume import ResumePlan, plan_resume, tidy_checkpoint_dir
from wavetrain.run.lock import RunDirInUse, RunDirLock
from wavetrain.train import train
from wavetrain.trainer_settings import resolve_precision

TINY = ["scale=tiny", "seq_len=32", "data.batch_size=8", "data.val_windows=16", "optim.warmup_steps=2",
        "trainer.precision=32-true", "trainer.deterministic=true", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1"]
# the reference protocol of the resume tests: dropout on, so that the RNG streams must be restored too
PROTOCOL = TINY + ["scale.dropout=0.1", "trainer.max_steps=30", "trainer.val_check_interval=10",
                   "run.checkpoint_every_n_steps=4"]


def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """``python -m wavetrain`` in the background, its output going to files (a pipe nobody reads would fill up)."""
    logs = [open(cwd / f".cli-{time.time_ns()}.{name}", "w+") for name in ("out", "err")]
    process = subprocess.Popen([sys.executable, "-m", "wavetrain", *args], cwd=cwd, stdout=logs[0], stderr=logs[1],
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    process.logs = logs
    return process


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    process.wait(timeout=timeout)
    out, err = (handle.seek(0) or handle.read() for handle in process.logs)
    for handle in process.logs:
        handle.close()
        Path(handle.name).unlink()
    return process.returncode, out, err


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            _, out, err = _finish(process)
            raise AssertionError(f"the run ended before the signal could be sent:\n{out[-2000:]}\n{err[-3000:]}")
        assert time.time() < deadline, "timed out waiting for the run to reach its first checkpoint"
        time.sleep(0.02)


def _val_rows(run_dir: Path) -> list[tuple[str, str]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as handle:
        return [(r["step"], r["val/loss"]) for r in csv.DictReader(handle) if r.get("val/loss")]


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under root with its size, mtime and bytes: equal snapshots = nothing written or replaced."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted CLI run of PROTOCOL, started in the background; ``wait()`` gives its results."""
    root = tmp_path_factory.mktemp("reference")
    process = _cli(PROTOCOL + [f"hydra.run.dir={root / 'run'}"], root)

    class Reference:
        run_dir = root / "run"

        def wait(self) -> dict:
            if process.returncode is None:
                code, _, err = _finish(process)
                assert code == 0, err[-3000:]
            return json.loads((root / "run" / "results.json").read_text())

    yield Reference()
    if process.returncode is None:
        process.kill()
        _finish(process)


# ---------------------------------------------------------------------------------------------------------------
# Exact resume and preemption (real CPU runs in subprocesses)


@pytest.mark.slow
def test_kill9_then_rerun_resumes_bitwise_identically(reference, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = PROTOCOL + [f"hydra.run.dir={run_dir}"]
    killed = _cli(command, tmp_path)
    _wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), killed)
    time.sleep(0.3)  # somewhere after the first checkpoint: mid-step, mid-validation or mid-save
    killed.send_signal(signal.SIGKILL)
    _finish(killed)
    assert not (run_dir / "results.json").exists(), "the run finished before kill -9: lengthen PROTOCOL"
    code, out, err = _finish(_cli(command, tmp_path))  # the same command again
    assert code == 0, err[-3000:]
    assert "wavetrain: resuming" in out
    resumed, uninterrupted = json.loads((run_dir / "results.json").read_text()), reference.wait()
    assert resumed["steps"] == uninterrupted["steps"] == 30
    assert resumed["val_loss"] == uninterrupted["val_loss"]  # bitwise: the same float64 from JSON
    assert resumed["best_val_loss"] == uninterrupted["best_val_loss"]
    assert _val_rows(run_dir) == _val_rows(reference.run_dir)  # the whole curve, no gap or duplicate
    print(f"kill -9 resume: val_loss {resumed['val_loss']!r} == uninterrupted {uninterrupted['val_loss']!r}")


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_exits_cleanly(reference, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = PROTOCOL + ["run.checkpoint_every_n_steps=2", f"hydra.run.dir={run_dir}"]
    process = _cli(command, tmp_path)
    _wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), process)
    process.send_signal(signal.SIGTERM)
    code, out, err = _finish(process)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "preempted" and stopped["signal"] == "SIGTERM"
    step = stopped["steps"]
    assert f"SIGTERM received: stopped at step {step} (saved {run_dir / 'checkpoints' / 'last.ckpt'})" in out
    assert "not requeued" in out  # SIGTERM alone (scancel) never requeues
    assert 2 <= step < 30 and inspect_checkpoint(run_dir / "checkpoints" / "last.ckpt").global_step == step
    code, out, err = _finish(_cli(command, tmp_path))
    assert code == 0, err[-3000:]
    assert f"(step {step})" in out
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["val_loss"] == reference.wait()["val_loss"]


@pytest.mark.slow
def test_slurm_usr1_requeues_once_into_the_same_run_dir_and_wandb_run(reference, tmp_path: Path) -> None:
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_JOB_NAME": "wavetrain-test", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}", "WANDB_MODE": "offline"}
    command = PROTOCOL + ["run.checkpoint_every_n_steps=2", "logger=wandb"]  # default run dir: slurm/<job>-<hash>
    process = _cli(command, tmp_path, slurm)
    _wait_for(lambda: any((tmp_path / "outputs" / "slurm").glob("4242-*/checkpoints/last.ckpt")), process)
    process.send_signal(signal.SIGUSR1)
    code, out, err = _finish(process)
    assert code == 128 + signal.SIGUSR1, err[-3000:]
    assert calls.read_text().split("\n")[:-1] == ["requeue 4242"]  # exactly once
    assert "requeued SLURM job 4242" in out
    (run_dir,) = (tmp_path / "outputs" / "slurm").iterdir()
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    code, out, err = _finish(_cli(command, tmp_path, slurm))  # the requeued job: same command, same job id
    assert code == 0, err[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "slurm").iterdir()] == [run_dir.name]
    assert f"resuming {run_dir}" in out and calls.read_text().count("requeue") == 1
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(run_id) for name in wandb_runs)
    assert json.loads((run_dir / "results.json").read_text())["val_loss"] == reference.wait()["val_loss"]


def test_under_submitit_the_preemption_signal_saves_then_submitit_requeues_once(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    from submitit.core.job_environment import SignalHandler

    class Submitit(SignalHandler):  # submitit's handler as a submitit job installs it, minus the cluster
        def __init__(self) -> None:
            self.calls: list[int] = []

        def checkpoint_and_try_requeue(self, signum, frame=None) -> None:
            self.calls.append(signum)
            raise SystemExit(-1)  # submitit requeues the job and exits

    submitit = Submitit()
    previous = signal.signal(signal.SIGUSR2, submitit.checkpoint_and_try_requeue)
    original = LanguageModelTask.training_step

    def training_step(self, batch, batch_idx):  # SLURM signals the job during step 3
        if self.trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelTask, "training_step", training_step)
    try:
        with pytest.raises(SystemExit) as stop:
            train(compose_config(TINY + ["trainer.max_steps=8", "trainer.val_check_interval=4"]), run_dir=tmp_path)
        assert stop.value.code == -1 and submitit.calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) == submitit.checkpoint_and_try_requeue  # handed back afterwards
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert inspect_checkpoint(tmp_path / "checkpoints" / "last.ckpt").global_step == 4  # the step boundary after
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "preempted"


def _signal_at_step(monkeypatch: pytest.MonkeyPatch, signum: int, step: int) -> None:
    original = LanguageModelTask.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == step:
            os.kill(os.getpid(), signum)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelTask, "training_step", training_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_once_at_the_next_step_boundary_and_the_metrics_have_no_gap(signum: int, tmp_path: Path,
                                                                                   monkeypatch, capfd) -> None:
    command = TINY + ["trainer.max_steps=8", "trainer.val_check_interval=4", "run.checkpoint_every_n_steps=4"]
    _signal_at_step(monkeypatch, signum, 2)  # during the third step
    with pytest.raises(Preempted) as stop:
        train(compose_config(command), run_dir=tmp_path)
    name = signal.Signals(signum).name
    assert stop.value.code == 128 + signum and stop.value.step == 3
    assert inspect_checkpoint(tmp_path / "checkpoints" / "last.ckpt").global_step == 3
    printed = "".join(capfd.readouterr())
    assert printed.count(f"{name} received: stopped at step 3") == 1 and "KeyboardInterrupt" not in printed
    assert printed.count("SIGINT received: saving at the next step boundary") == (signum == signal.SIGINT)
    results = train(compose_config(command), run_dir=tmp_path)  # the same command again
    assert results["steps"] == 8
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(8))  # step 2's row was logged
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [3, 7]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files


def test_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, target)
    before = target.read_bytes()

    def dies_midway(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(StorageError, match=f"writing checkpoint {target} failed: no space left on the device: free "):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 2}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


def test_a_crash_between_the_two_renames_of_a_save_or_a_rotation_leaves_every_checkpoint_readable(
        tmp_path: Path) -> None:
    io, state = AtomicCheckpointIO(), {"state_dict": {}, "optimizer_states": [], "loops": {}}
    last, previous = tmp_path / "last.ckpt", tmp_path / "previous.ckpt"
    io.save_checkpoint({**state, "global_step": 1}, last)
    io.save_checkpoint({**state, "global_step": 2}, tmp_path / "new.ckpt")
    # a save killed between its renames: the new file in place, its digest still in the temporary digest file
    os.replace(tmp_path / "new.ckpt", last)
    os.replace(tmp_path / "new.ckpt.sha256", tmp_path / f".last.ckpt.tmp-{os.getpid() + 1}.sha256")
    assert inspect_checkpoint(last).global_step == 2
    # a rotation killed between its renames: last.ckpt is previous.ckpt now, its digest still under last's name
    os.replace(last, previous)
    assert inspect_checkpoint(previous).global_step == 2
    tidy_checkpoint_dir(ResumePlan(inspect_checkpoint(previous)), tmp_path)  # what RunDir.begin runs
    assert (tmp_path / "previous.ckpt.sha256").read_text().split()[0] == file_sha256(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous.ckpt", "previous.ckpt.sha256"]


def test_corrupt_checkpoints_are_named_and_the_previous_good_one_is_used(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # checkpoints: last = step 10 (end), previous = step 9, best-step8 (validation at 4 and 8)
    base = TINY + ["trainer.val_check_interval=4", "run.checkpoint_every_n_steps=3"]
    train(compose_config(base + ["trainer.max_steps=10"]), run_dir=run_dir)
    ckpts = run_dir / "checkpoints"
    assert inspect_checkpoint(ckpts / "previous.ckpt").global_step == 9
    last = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(last[: len(last) // 2])  # truncated (e.g. a copy cut short)
    with pytest.raises(CheckpointError) as error:  # explicit: a clear error naming the file and the good one
        train(compose_config(base + ["trainer.max_steps=12", f"run.ckpt_path={ckpts / 'last.ckpt'}"]),
              run_dir=tmp_path / "other")
    message = str(error.value)
    assert f"run.ckpt_path: {ckpts / 'last.ckpt'} is corrupt" in message
    assert f"previous good checkpoint there is {ckpts / 'previous.ckpt'} (step 9)" in message
    assert not (tmp_path / "other").exists()
    previous = bytearray((ckpts / "previous.ckpt").read_bytes())
    previous[len(previous) // 2] ^= 0xFF  # one flipped bit inside tensor data: only the digest notices
    (ckpts / "previous.ckpt").write_bytes(bytes(previous))
    plan = plan_resume(None, run_dir)
    assert plan.checkpoint.path.name == "best-step8.ckpt" and plan.step == 8
    assert {p.name for p, _ in plan.unreadable} == {"last.ckpt", "previous.ckpt"}
    with pytest.warns(UserWarning, match="Resuming from the previous good checkpoint .*best-step8.ckpt \\(step 8\\)"):
        results = train(compose_config(base + ["trainer.max_steps=12"]), run_dir=run_dir)  # automatic
    assert results["steps"] == 12
    names = {p.name for p in ckpts.iterdir()}
    assert {"last.ckpt.corrupt", "previous.ckpt.corrupt"} <= names  # kept aside, never rotated over a good file
    assert inspect_checkpoint(ckpts / "last.ckpt").global_step == 12


# ---------------------------------------------------------------------------------------------------------------
# Divergence


def _nan_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    original = LanguageModelTask.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == step else loss

    monkeypatch.setattr(LanguageModelTask, "training_step", training_step)


def test_nonfinite_loss_stops_naming_step_loss_and_last_good_checkpoint(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at_step(monkeypatch, 5)
    cfg = compose_config(TINY + ["trainer.max_steps=8", "trainer.val_check_interval=4",
                                 "run.checkpoint_every_n_steps=4"])
    with pytest.raises(NonFiniteLossError) as error:
        train(cfg, run_dir=tmp_path)
    message = str(error.value)
    assert message.startswith("non-finite training loss nan (gradient norm nan) at step 5 (optimiser step 6 of 8)")
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'} (step 4)" in message
    assert "run.on_nonfinite=skip" in message
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def test_nonfinite_skip_mode_drops_the_update_and_counts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at_step(monkeypatch, 5)
    cfg = compose_config(TINY + ["trainer.max_steps=8", "trainer.val_check_interval=4", "run.on_nonfinite=skip"])
    results = train(cfg, run_dir=tmp_path)
    assert results["steps"] == 8 and results["skipped_steps"] == 1 and results["val_loss"] < 10
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())


# ---------------------------------------------------------------------------------------------------------------
# Run directories in use (bad inputs: tests/test_refusals.py)


def test_a_directory_in_use_is_refused(tmp_path: Path) -> None:
    holder = RunDirLock(tmp_path)
    holder.acquire()  # another live run
    try:
        with pytest.raises(RunDirInUse, match=f"hydra.run.dir={tmp_path} is in use by another wavetrain run "
                                              f"\\(pid {os.getpid()}"):
            train(compose_config(TINY + ["trainer.max_steps=3", "trainer.val_check_interval=3"]), run_dir=tmp_path)
    finally:
        holder.release()
    assert list(tmp_path.iterdir()) == []  # the lock is on the directory itself: nothing written


def test_cli_checks_group_choices_and_keys_before_hydra_creates_directories(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="attention=standrd is not an option of the attention group: choose one "
                                          "of .*standard.*; did you mean attention=standard\\?"):
        check_cli_overrides(["attention=standrd"])
    with pytest.raises(ConfigError, match="logger=wandbb is not an option of the logger group"):
        check_cli_overrides(["-m", "logger=csv,wandbb"])
    with pytest.raises(ConfigError, match="optim.lrr=1: the config has no key optim.lrr \\(closest: optim.lr"):
        check_cli_overrides(["-m", "seed=1,2", "optim.lrr=1,2"])  # a sweep over a key that does not exist
    check_cli_overrides(["-m", "+sweep=smoke", "attention=standard,wavefield", "optim.lr=1e-3", "seed=1,2"])
    code, out, err = _finish(_cli(["-m", "scale=tiny", "optim.lrr=1e-3,2e-3"], tmp_path))
    assert code == 1 and "wavetrain: optim.lrr=0.001: the config has no key optim.lrr" in err
    assert list(tmp_path.iterdir()) == []  # no outputs/ or multirun/ directory


def test_bf16_without_hardware_support_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import wavetrain.trainer_settings as settings

    monkeypatch.setattr(settings, "cpu_supports_bf16", lambda: False)
    cfg = compose_config(["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"])
    with pytest.warns(UserWarning, match="trainer.precision=bf16-mixed requested but this CPU has no bf16 support: "
                                         "falling back to 32-true"):
        assert resolve_precision(cfg.trainer) == "32-true"


# ---------------------------------------------------------------------------------------------------------------
# Output hygiene


def test_rerun_of_a_finished_run_changes_nothing_and_extending_keeps_its_results(tmp_path: Path,
                                                                                 capsys) -> None:
    # warmup (max_steps // 10) and the validation interval (max_steps // 4) follow the step budget
    base = [o for o in TINY if not o.startswith("optim.warmup_steps")]
    first = train(compose_config(base + ["trainer.max_steps=10"]), run_dir=tmp_path)
    before = _snapshot(tmp_path)
    again = train(compose_config(base + ["trainer.max_steps=10"]), run_dir=tmp_path)
    assert again == json.loads((tmp_path / "results.json").read_text()) and again["val_loss"] == first["val_loss"]
    assert "already holds this run, finished at step 10: nothing to do" in capsys.readouterr().out
    assert _snapshot(tmp_path) == before
    longer = train(compose_config(base + ["trainer.max_steps=20"]), run_dir=tmp_path)  # extended, as advised
    assert longer["steps"] == 20
    kept = json.loads((tmp_path / "results.1.json").read_text())
    assert kept["steps"] == 10 and kept["val_loss"] == first["val_loss"]
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv")) if r.get("train/loss")]
    assert steps == list(range(20))  # the earlier metrics are kept and continued, not deleted


def test_run_directories_are_unique_within_a_second_and_stable_under_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    script = ("import importlib.util as u; s = u.spec_from_file_location('config', {!r}); m = u.module_from_spec(s); "
              "s.loader.exec_module(m); print(m.run_stamp('seed=1'))").format(str(Path(config.__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]  # two runs started in the same second
    stamps = {process.communicate()[0].strip() for process in processes}
    assert len(stamps) == 2, stamps
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert run_stamp("seed=1") == run_stamp("seed=1") != run_stamp("seed=2")  # a requeue recomputes the same
    assert run_stamp("seed=1").startswith("slurm/77-")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # an interactive allocation: time-stamped again
    assert not run_stamp("seed=1").startswith("slurm/")


def test_run_sampler_is_the_whole_run_started_at_the_current_step() -> None:
    rows, world, start = 24, 2, 5  # rows per rank, ranks, first row index of the rank (= step · accumulation · batch)
    dataset = list(range(rows * world))
    for rank in range(world):
        reference = list(DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False))
        sampler = RunPositionSampler(rows, start, rank, world)
        assert len(sampler) == rows and sampler.run_rows == rows * world
        assert list(sampler) == reference[start:]
        assert isinstance(sampler, DistributedSampler)  # so Lightning keeps it instead of wrapping it under DDP
