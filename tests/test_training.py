"""End-to-end training: loss goes down, results.json, checkpoints, resume, loggers, the CLI, DDP on CPU."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb

from wavetrain import compose_config, load_model
from wavetrain.lightning_module import lr_factor
from wavetrain.train import train
from wandb_offline import read_offline_run

TINY = ["scale=tiny", "seq_len=32", "data.batch_size=8", "data.val_windows=16", "optim.warmup_steps=2",
        "trainer.val_check_interval=10", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def _val_losses(run_dir: Path) -> list[float]:
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return [float(r["val/loss"]) for r in rows if r.get("val/loss")]


def test_tiny_run_learns_and_writes_results(tmp_path: Path) -> None:
    cfg = compose_config(TINY + ["trainer.max_steps=40", "trainer.precision=32-true"])
    results = train(cfg, run_dir=tmp_path)
    losses = _val_losses(tmp_path)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("val_loss", "best_val_loss", "val_ppl", "tokens_per_sec", "wall_seconds", "n_parameters",
                "overrides", "steps"):
        assert saved[key] is not None, key
    assert saved["steps"] == 40 and saved["val_ppl"] == pytest.approx(torch.tensor(saved["val_loss"]).exp().item())
    assert saved["overrides"] == cfg.run.overrides and results["val_loss"] == saved["val_loss"]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    model, loaded_cfg = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert loaded_cfg.scale.d_model == cfg.scale.d_model and model(torch.zeros(1, 8, dtype=torch.long)).ndim == 3


def test_resume_continues_step_count_and_schedule(tmp_path: Path) -> None:
    first = tmp_path / "first"
    train(compose_config(TINY + ["trainer.max_steps=20", "trainer.precision=32-true"]), run_dir=first)
    resumed = tmp_path / "resumed"
    results = train(compose_config(TINY + ["trainer.max_steps=30", "trainer.precision=32-true",
                                           f"run.ckpt_path={first / 'checkpoints' / 'last.ckpt'}"]), run_dir=resumed)
    assert results["steps"] == 30
    steps = [int(r["step"]) for r in csv.DictReader(open(resumed / "logs" / "metrics.csv")) if r.get("train/loss")]
    assert min(steps) >= 20 and max(steps) == 29


def test_bf16_mixed_on_cpu_and_test_split(tmp_path: Path) -> None:
    results = train(compose_config(TINY + ["trainer.max_steps=10", "run.test=true",
                                           "data.source.test_fraction=0.05"]), run_dir=tmp_path)
    assert results["test_loss"] > 0 and results["test_ppl"] > 1


def test_wandb_offline_run_holds_name_tags_config_once_and_a_history_continued_on_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    # wandb starts a service for this process and names it in WANDB_SERVICE; restored (unset) after the test, so
    # CLI subprocesses of later tests start their own service instead of sharing this one
    monkeypatch.setenv("WANDB_SERVICE", "")
    options = ["logger=wandb", "logger.group=unit-test", "logger.job_type=smoke", "+logger.notes=from a test",
               "trainer.precision=32-true", "trainer.val_check_interval=2", "seed=7"]
    train(compose_config(TINY + options + ["trainer.max_steps=4"]), run_dir=tmp_path)
    wandb.finish()  # as the CLI does after every job (wavetrain.__main__.finish_wandb)
    (first,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(first)
    assert run.run_id == (tmp_path / "wandb_run_id").read_text().strip()
    assert (run.name, run.group, run.job_type, run.notes) == ("standard-tiny-shakespeare seed=7", "unit-test", "smoke",
                                                              "from a test"), "logger options pass through"
    assert {"attention=standard", "scale=tiny", "data=shakespeare", "seed=7"} <= set(run.tags)
    assert run.config_records == 0 and "cfg" not in run.config, "the config is logged once, not again as hparams"
    assert run.config["seed"] == 7 and run.config["scale"]["d_model"] == compose_config(["scale=tiny"]).scale.d_model
    assert [row["_step"] for row in run.history] == [0, 1, 2, 3]
    assert all(row["_step"] == row["trainer/global_step"] for row in run.history)
    assert [row["_step"] for row in run.history if "val/loss" in row] == [1, 3]

    train(compose_config(TINY + options + ["trainer.max_steps=6"]), run_dir=tmp_path)  # resumes from step 4
    wandb.finish()
    (second,) = set((tmp_path / "wandb").glob("offline-run-*")) - {first}
    resumed = read_offline_run(second)
    assert resumed.run_id == run.run_id, "a resumed run continues the same W&B run"
    assert [row["_step"] for row in resumed.history] == [0, 1, 2, 3, 4, 5], "no gap: offline, the steps before the " \
        "checkpoint are replayed from metrics.csv, and the history continues from the checkpoint's step"
    assert [row.get("train/loss") for row in resumed.history[:4]] == [row.get("train/loss") for row in run.history]
    assert (tmp_path / "logs" / "metrics.csv").exists()
    wandb.teardown()


def test_tensorboard_logger_writes_events_beside_the_csv(tmp_path: Path) -> None:
    train(compose_config(TINY + ["trainer.max_steps=10", "logger=tensorboard", "trainer.precision=32-true"]),
          run_dir=tmp_path)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "logs" / "metrics.csv").exists()


def test_lr_schedule_warmup_then_cosine_to_min_lr() -> None:
    kwargs = dict(schedule="warmup_cosine", warmup_steps=10, max_steps=110, lr=1e-3, min_lr=1e-4)
    assert lr_factor(0, **kwargs) == pytest.approx(0.1)
    assert lr_factor(9, **kwargs) == pytest.approx(1.0)
    assert lr_factor(60, **kwargs) == pytest.approx((1e-4 + 0.5 * 9e-4) / 1e-3)
    assert lr_factor(110, **kwargs) == pytest.approx(0.1)
    assert lr_factor(500, **{**kwargs, "schedule": "warmup_constant"}) == 1.0


def _cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "wavetrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_run_prints_one_line_per_event_and_saves_checkpoint(tmp_path: Path) -> None:
    quiet = [o for o in TINY if not o.startswith("trainer.enable_progress_bar")]  # the default: no bar when redirected
    out = _cli(quiet + ["trainer.max_steps=10", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wavetrain: val loss" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    lines = (out.stdout + out.stderr).splitlines()
    events = [line.split("] - ", 1)[-1] for line in lines if line.startswith("[")]  # log records, time stripped
    assert len(events) == len(set(events)), f"a log line printed twice:\n{out.stdout}"
    assert sum("| Name" in line for line in lines) == 1, "the model summary once"
    assert not any("Tip" in line or "it/s" in line or "\r" in line for line in lines), out.stdout
    assert any(event.startswith("step 10/10: val/loss") for event in events), "a line per validation instead"
    table = lines.index(next(line for line in lines if "| Name" in line))
    table_end = next(i for i in range(table, len(lines)) if lines[i].startswith("["))
    others = [line for line in lines[:table] + lines[table_end:] if not line.startswith(("[", "wavetrain: "))]
    assert not others, f"lines that are neither a log record nor the summary: {others}"
    assert len(events) <= 16, f"{len(events)} log records:\n" + "\n".join(events)  # 4 of them: data preparation
    log_file = (tmp_path / "run" / "wavetrain.log").read_text()  # hydra.job.name: wavetrain
    assert all(event in log_file for event in events)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_under_hydra_multirun_runs_each_job_once(tmp_path: Path) -> None:
    out = _cli(["-m", *TINY, "trainer=ddp", "trainer.max_steps=4", "trainer.val_check_interval=2",
                "trainer.precision=32-true", "seed=1,2", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1"], jobs
    for job in jobs:
        assert json.loads((tmp_path / "sweep" / job / "results.json").read_text())["steps"] == 4
    assert (out.stdout + out.stderr).count("Launching 2 jobs locally") == 1
    assert "distributed_backend=gloo" in out.stderr + out.stdout, "two CPU processes (gloo) per job"
