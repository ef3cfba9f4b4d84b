"""The sweep report (wavetrain/report.py): a real tiny multirun end to end (failed rows, W&B offline grouping, table
and PNG), and the table's arithmetic on a hand-built multirun folder (seeds, published values, missing jobs)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from wavetrain.report import load_sweep, main as report_main, resolve_target
from wandb_offline import read_offline_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_sweep_end_to_end_with_failed_rows_wandb_groups_and_report(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = ["-m", "+sweep=smoke", "scale.n_heads=2,3", "trainer.max_steps=6", "trainer.val_check_interval=3",
            "optim.warmup_steps=1", "data.val_windows=8", "logger=wandb"]
    out = subprocess.run([sys.executable, "-m", "wavetrain", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode != 0, "a failed row makes the multirun exit non-zero (after every job ran)"
    (launch,) = list((tmp_path / "multirun" / "smoke").iterdir())
    jobs = sorted(int(p.name) for p in launch.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == [0, 1, 2, 3], out.stderr[-3000:]
    results = {j: json.loads((launch / str(j) / "results.json").read_text()) for j in jobs}
    statuses = {(r["choices"]["attention"], [o for o in r["overrides"] if o.startswith("scale.n_heads=")][0]):
                r["status"] for r in results.values()}
    assert statuses == {("standard", "scale.n_heads=2"): "done", ("standard", "scale.n_heads=3"): "failed",
                        ("wavefield", "scale.n_heads=2"): "done", ("wavefield", "scale.n_heads=3"): "failed"}, \
        out.stderr[-3000:]
    failed = next(r for r in results.values() if r["status"] == "failed")
    assert failed["error"].startswith("ConfigError: scale.d_model=32 is not divisible by scale.n_heads=3")

    group = f"smoke-{launch.name}"  # the W&B group: sweep name + the launch time of the multirun folder
    for job, result in results.items():
        if result["status"] != "done":
            continue
        (run,) = (launch / str(job) / "wandb").glob("offline-run-*/run-*.wandb")
        record = run.read_bytes()
        attention = result["choices"]["attention"]
        assert group.encode() in record, f"job {job} is not in W&B group {group}"
        assert f"attention={attention}".encode() in record and b"scale=tiny" in record and b"data=shakespeare" in record
        assert b"seq_len" in record and b"${" not in record, "the resolved config travels with the run"
        wandb_run = read_offline_run(run)  # the name says what differs within the sweep; tags: sweep and seed
        assert wandb_run.name == f"attention={attention} scale.n_heads=2 seed=1337", wandb_run.name
        assert {"sweep=smoke", "seed=1337", f"attention={attention}"} <= set(wandb_run.tags), wandb_run.tags

    assert report_main(["smoke", "--root", str(tmp_path / "multirun")]) == 0
    markdown = (launch / "report.md").read_text()
    assert "| `attention=standard scale.n_heads=2` | 1 |" in markdown
    assert "failed: ConfigError: scale.d_model=32 is not divisible by scale.n_heads=3" in markdown
    assert "4 jobs — 2 done, 2 failed, 0 missing" in markdown
    # the header says what ran: the budget actually trained and the shared overrides, not the file's 60 steps
    assert "60 steps" not in markdown and "Budget run: 6 optimiser steps per job (trainer.max_steps=6;" in markdown
    assert "trainer.max_steps=6 trainer.val_check_interval=3" in markdown.split("Shared overrides:")[1].split("\n")[0]
    assert (launch / "report.png").read_bytes()[:8] == PNG_MAGIC


PROTOCOL = {"name": "demo_protocol", "source": "Paper §2", "keys": ["data", "seq_len", "trainer.max_steps"],
            "locations": ["data.path"],
            "departures": [{"when": {"attention": "b"}, "what": "row b runs a causal variant of the published b"},
                           {"when": {"attention.flag": "on"}, "what": "the flag is on"}]}


def _write_master(root: Path, task: list[str], columns: list[str] | None = None, max_steps: int = 5,
                  seq_len: int = 64) -> None:
    """multirun.yaml as Hydra writes it: the composed config with the command-line overrides (``task``) applied."""
    sweep = {"name": "demo", "table": "Demo table", "metric": "val_ppl", "goal": "min", "seeds": [1, 2]}
    OmegaConf.save(OmegaConf.create({
        "sweep": sweep if columns is None else {**sweep, "columns": columns},
        "protocol": PROTOCOL, "seq_len": seq_len, "trainer": {"max_steps": max_steps, "accumulate_grad_batches": 2},
        "data": {"batch_size": 16}, "run": {"epochs": None}, "attention": {"flag": "off"},
        "reference": [{"match": {"attention": "a"}, "metric": "val_ppl", "value": 10.0, "source": "Paper T1"},
                      {"match": {"attention": "b"}, "metric": "val_acc", "value": 0.5, "source": "Paper T2"},
                      {"match": {"attention": "a"}, "metric": "val_loss", "value": 2.0, "source": "Paper T3",
                       "protocol": "older_protocol"}],
        "hydra": {"sweeper": {"params": {"attention": "a,b,c", "seed": "1,2"}}, "overrides": {"task": task},
                  "runtime": {"choices": {"attention": "a"}}}}), root / "multirun.yaml")


def _write_job(root: Path, number: int, overrides: list[str], results: dict | None,
               curve: list[float] | None = None) -> None:
    job = root / str(number)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    if curve:
        (job / "logs").mkdir()
        lines = ["step,train/loss,val/loss"] + [f"{10 * i},{v + 0.1},{v}" for i, v in enumerate(curve)]
        (job / "logs" / "metrics.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def hand_built_multirun(tmp_path: Path) -> Path:
    """Rows a (2 seeds done), b (1 failed, 1 running), c (never launched); references on a and b."""
    root = tmp_path / "multirun" / "demo" / "2025-01-01_00-00-00"
    root.mkdir(parents=True)
    _write_master(root, ["+sweep=demo", "data.path=/local/copy"])
    common = ["+sweep=demo", "data.path=/local/copy"]
    _write_job(root, 0, ["attention=a", "seed=1", *common],
               {"status": "done", "val_ppl": 11.0, "val_loss": 2.4, "val_acc": 0.4, "n_parameters": 1000,
                "steps": 5}, [3.0, 2.6, 2.4])
    _write_job(root, 1, ["attention=a", "seed=2", *common],
               {"status": "done", "val_ppl": 13.0, "val_loss": 2.6, "val_acc": 0.3, "n_parameters": 1000,
                "steps": 5}, [3.1, 2.8, 2.6])
    _write_job(root, 2, ["attention=b", "seed=1", *common],
               {"status": "failed", "error": "RuntimeError: out of memory"})
    _write_job(root, 3, ["attention=b", "seed=2", *common], None, [3.2])
    return root


def test_rows_seeds_references_and_missing_jobs(hand_built_multirun: Path) -> None:
    sweep = load_sweep(hand_built_multirun)
    assert [row.label for row in sweep.rows] == ["attention=a", "attention=b", "attention=c"]
    a, b, c = sweep.rows
    assert [len(r.jobs) for r in sweep.rows] == [2, 2, 2]
    assert a.mean("val_ppl") == 12.0 and a.status() == "done 2/2"
    assert b.status() == "failed 1/2: RuntimeError: out of memory; missing 1/2"
    assert c.status() == "missing 2/2" and c.mean("val_ppl") is None
    assert [r["source"] for r in a.references] == ["Paper T1", "Paper T3"] and b.references[0]["metric"] == "val_acc"

    assert report_main([str(hand_built_multirun)]) == 0
    markdown = (hand_built_multirun / "report.md").read_text()
    std = statistics.stdev([11.0, 13.0])
    assert f"| `attention=a` | 2 | 12 ± {std:.2g} | 10; 2 (val loss) | +2; not comparable (val loss): published " \
           f"under older_protocol, this row ran demo_protocol |" in markdown
    assert "| `attention=b` | 2 | — | 0.5 (val acc) | — |" in markdown
    assert "| `attention=c` | 2 | — | — | — |" in markdown and "missing 2/2 |" in markdown
    assert "6 jobs — 2 done, 1 failed, 3 missing" in markdown and "Paper T1; Paper T2; Paper T3" in markdown
    assert "Protocol: `experiment=demo_protocol` (Paper §2)." in markdown
    assert "Shared overrides: `data.path=/local/copy`." in markdown  # where the data lives: still comparable
    assert "Budget run: 5 optimiser steps per job (trainer.max_steps=5; 16 × 2 sequences of ≤ 64 tokens" in markdown
    assert "- row b runs a causal variant of the published b — rows: `attention=b`" in markdown
    assert "the flag is on" not in markdown, "a departure no row carries is not listed"
    assert (hand_built_multirun / "report.png").read_bytes()[:8] == PNG_MAGIC


def test_a_changed_protocol_is_never_set_beside_the_published_number(hand_built_multirun: Path) -> None:
    launch = hand_built_multirun.parent / "2025-02-02_00-00-00"
    launch.mkdir()
    common = ["+sweep=demo", "trainer.max_steps=2", "seq_len=8", "data.path=/x", "trainer.precision=32-true"]
    _write_master(launch, common, columns=["val_acc", "val_ppl_batch_mean"], max_steps=2, seq_len=8)
    _write_job(launch, 0, ["attention=a", "seed=1", *common], {"status": "done", "val_ppl": 40.0, "steps": 2})
    assert report_main(["demo", "--root", str(hand_built_multirun.parent.parent)]) == 0  # the latest launch
    markdown = (launch / "report.md").read_text()
    assert "| 10; 2 (val loss) | not comparable: overrides trainer.max_steps=2 seq_len=8;" in markdown
    assert "Budget run: 2 optimiser steps per job (trainer.max_steps=2; 16 × 2 sequences of ≤ 8 tokens" in markdown
    assert "other launches of this sweep: `2025-01-01_00-00-00`" in markdown
    assert "No results.json of this launch holds `val_acc`, `val_ppl_batch_mean`" in markdown


def test_launch_option_picks_a_launch_and_names_the_others(hand_built_multirun: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    root = hand_built_multirun.parent.parent
    later = hand_built_multirun.parent / "2025-03-03_00-00-00"
    later.mkdir()
    _write_master(later, ["+sweep=demo"])
    assert resolve_target("demo", root) == (later, ["2025-01-01_00-00-00"])
    assert resolve_target("demo", root, "2025-01") == (hand_built_multirun, ["2025-03-03_00-00-00"])
    assert report_main(["demo", "--root", str(root), "--launch", "2025-01-01_00-00-00"]) == 0
    out = capsys.readouterr().out
    assert "launch `2025-01-01_00-00-00`" in out and "other launches of this sweep: `2025-03-03_00-00-00`" in out
    assert report_main(["demo", "--root", str(root), "--launch", "2025"]) == 1
    assert "matches several launch" in capsys.readouterr().err
    assert report_main(["demo", "--root", str(root), "--launch", "1999"]) == 1
    assert "give one of 2025-01-01_00-00-00, 2025-03-03_00-00-00" in capsys.readouterr().err


def test_pivot_orders_variants_by_their_mean(tmp_path: Path) -> None:
    root = tmp_path / "grid"
    root.mkdir()
    OmegaConf.save(OmegaConf.create({
        "sweep": {"name": "grid", "table": "Grid", "metric": "val_acc", "goal": "max", "seeds": [1],
                  "pivot": {"rows": "attention", "columns": ["seq_len"]}},
        "hydra": {"sweeper": {"params": {"attention": "x,y", "seq_len": "8,16", "seed": "1"}},
                  "overrides": {"task": []}}}), root / "multirun.yaml")
    accuracy = {("x", "8"): 0.2, ("x", "16"): 0.1, ("y", "8"): 0.9, ("y", "16"): 0.7}
    for number, ((attention, seq), acc) in enumerate(accuracy.items()):
        _write_job(root, number, [f"attention={attention}", f"seq_len={seq}", "seed=1"],
                   {"status": "done", "val_acc": acc})
    assert report_main([str(root)]) == 0
    markdown = (root / "report.md").read_text()
    pivot = markdown.split("## val acc by attention")[1]
    assert "| attention | seq_len=8 | seq_len=16 | mean val acc |" in pivot
    assert pivot.index("| y | 0.9 | 0.7 | 0.8 |") < pivot.index("| x | 0.2 | 0.1 | 0.15 |")
    assert "![grid](report_grid.png)" in pivot and (root / "report_grid.png").read_bytes()[:8] == PNG_MAGIC
    (root / "0" / "results.json").unlink()  # a missing cell: a blank in the heatmap, no mean for its row
    (root / "report_grid.png").unlink()
    assert report_main([str(root)]) == 0
    assert "| x | — | 0.1 | — |" in (root / "report.md").read_text()
    assert (root / "report_grid.png").read_bytes()[:8] == PNG_MAGIC


def test_unknown_sweep_or_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_main(["nosuchsweep", "--root", str(tmp_path)]) == 1
    assert "python -m wavetrain -m +sweep=nosuchsweep" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no multirun.yaml"):
        resolve_target(str(tmp_path / "empty"), tmp_path / "multirun")


def _real_multirun(root: Path, name: str, results: dict[int, dict], task: tuple[str, ...] = ()) -> None:
    """A multirun folder of the real sweep file ``name`` as Hydra writes it (multirun.yaml = the composed config
    with its hydra node; one folder per listed job with its overrides and results.json)."""
    from wavetrain import compose_config
    from wavetrain.sweep import list_jobs

    root.mkdir(parents=True)
    raw = OmegaConf.load(Path(__file__).resolve().parent.parent / "sweeps" / f"{name}.yaml")
    master = compose_config([f"+sweep={name}", *task])
    OmegaConf.set_struct(master, False)
    master.hydra = {"sweeper": {"params": OmegaConf.to_container(raw.hydra.sweeper.params, resolve=False)},
                    "overrides": {"task": [f"+sweep={name}", *task]},
                    "runtime": {"choices": dict(master.run.choices)}}
    OmegaConf.save(master, root / "multirun.yaml")
    jobs = list_jobs([f"+sweep={name}", *task], validate=False)
    for number, result in results.items():
        _write_job(root, number, jobs[number], result)


def test_wda_ablation_rows_state_their_departures_and_sit_beside_the_published_code(tmp_path: Path) -> None:
    launch = tmp_path / "wda_ablations" / "2026-01-01_00-00-00"
    _real_multirun(launch, "wda_ablations", {0: {"status": "done", "val_ppl": 21.0, "steps": 11500},
                                              1: {"status": "done", "val_ppl": 22.0, "steps": 11500}})
    assert report_main([str(launch)]) == 0
    markdown = (launch / "report.md").read_text()
    assert "Protocol: `experiment=wda_ablation` (spec wda.md §6" in markdown
    pooling = next(line for line in markdown.splitlines() if line.startswith("- WDA causal gate pooling"))
    estimator = next(line for line in markdown.splitlines() if line.startswith("- WDA intended straight-through"))
    assert "`wda_ablation=baseline attention.st_estimator=reference_code`" in pooling  # every row pools causally
    assert "`wda_ablation=baseline attention.st_estimator=intended`" in estimator
    assert "reference_code" not in estimator.split("rows:")[1], "the published code's rows carry no estimator change"
    assert "| `wda_ablation=baseline attention.st_estimator=reference_code` | 1 | 22 | 20.5 | +1.5 |" in markdown
    assert "| `wda_ablation=baseline attention.st_estimator=intended` | 1 | 21 | — |" in markdown


def test_dwarf_13m_marks_conditions_published_under_another_protocol(tmp_path: Path) -> None:
    launch = tmp_path / "dwarf_13m" / "2026-01-01_00-00-00"
    _real_multirun(launch, "dwarf_13m", {1: {"status": "done", "test_ppl": 90.0, "steps": 16470},
                                          11: {"status": "done", "test_ppl": 85.0, "steps": 16470}})
    assert report_main([str(launch)]) == 0
    markdown = (launch / "report.md").read_text()
    assert "| `attention=dwarf_condA` | 1 | 90 | 86.8 | not comparable: published under dwarf_13m_ad, this row ran " \
           "dwarf_13m |" in markdown
    assert "| `attention=dwarf_condK` | 1 | 85 | 84.7 | +0.3 |" in markdown
    assert "- DWARF condE on the causal stride-1 layout" in markdown and "rows: `attention=dwarf_condE`" in markdown
    smoke = tmp_path / "dwarf_13m" / "2026-01-02_00-00-00"
    _real_multirun(smoke, "dwarf_13m", {11: {"status": "done", "test_ppl": 900.0, "steps": 20}},
                   task=("scale=tiny", "run.epochs=null", "trainer.max_steps=20", "data.path=/local/owt"))
    assert report_main([str(smoke)]) == 0
    markdown = (smoke / "report.md").read_text()
    assert "| 84.7 | not comparable: overrides scale=tiny run.epochs=null trainer.max_steps=20 |" in markdown
    assert "Budget run: 20 optimiser steps per job (trainer.max_steps=20;" in markdown
