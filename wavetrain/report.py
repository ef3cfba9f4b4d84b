"""The report of one sweep: ``python -m wavetrain.report <multirun folder | sweep name> [--launch LAUNCH]``.

Reads the multirun folder's ``multirun.yaml`` (the sweep's metadata, its protocol, published values and job grid) and
every job's ``results.json``, ``.hydra/overrides.yaml`` and ``logs/metrics.csv``; writes ``report.md`` and
``report.png`` (validation-loss curves of every row, and a bar chart of the headline metric with the published values
marked) into the multirun folder.  The report's header says what ran: the launch (and the sweep's other launches),
the protocol (the experiment, conf/experiment/*), the overrides every job shares, the budget the jobs actually ran,
the departures from the published computation its rows carry, and any ``columns`` key no results.json holds.  Its
table has one row per variant: the metrics as mean ± std over seeds, the published value, the difference and a
status (done, failed with the error's first line, or missing).  A row stands beside a published number only when it
ran that protocol unchanged: an override of a ``protocol.keys`` setting (data, tokenizer, seq_len, scale, budget, ...)
or a value published under another experiment makes its Δ cell "not comparable", naming why.  A failed or missing
job never stops the report.  The sweep-file format is documented in sweeps/README.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf


SEED_KEY = "seed"
DEFAULT_COLUMNS = ("val_loss", "val_ppl", "val_acc")
LABELS = {"val_loss": "val loss", "val_ppl": "val ppl", "val_acc": "val acc", "best_val_loss": "best val loss",
          "test_loss": "test loss", "test_ppl": "test ppl", "test_acc": "test acc", "tokens_per_sec": "tokens/s",
          "n_parameters": "params"}


@dataclass
class Job:
    """One launched (or expected) job of the sweep."""

    number: int
    overrides: list[str]
    directory: Path | None
    results: dict | None = None

    @property
    def status(self) -> str:
        if self.results is None:
            return "missing"
        return str(self.results.get("status", "done"))

    @property
    def error(self) -> str:
        return str((self.results or {}).get("error", "")).strip()


@dataclass
class Row:
    """The jobs of one variant (its sweep overrides without the seed), one per seed."""

    key: tuple[tuple[str, str], ...]
    jobs: list[Job] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)
    protocol: str | None = None                              # the experiment the row ran (protocol.name)
    changed: list[str] = field(default_factory=list)         # its overrides of protocol.keys (not comparable)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.key) or "(all)"

    def values(self, metric: str) -> list[float]:
        out = []
        for job in self.jobs:
            value = (job.results or {}).get(metric) if job.status == "done" else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.append(float(value))
        return out

    def mean(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.fmean(values) if values else None

    def status(self) -> str:
        done = sum(job.status == "done" for job in self.jobs)
        failed = [job for job in self.jobs if job.status == "failed"]
        missing = sum(job.status == "missing" for job in self.jobs)
        n = len(self.jobs)

        def count(k: int) -> str:
            return "" if n == 1 else f" {k}/{n}"

        parts = [f"done{count(done)}"] if done else []
        if failed:
            parts.append(f"failed{count(len(failed))}: {failed[0].error or 'no error recorded'}")
        if missing:
            parts.append(f"missing{count(missing)}")
        return "; ".join(parts)


@dataclass
class Sweep:
    """A multirun folder with its metadata and rows."""

    directory: Path
    name: str
    table: str
    metric: str
    goal: str
    columns: list[str]
    references: list[dict]
    rows: list[Row]
    pivot: dict | None = None
    source: str | None = None                                # where the protocol is written down
    shared: list[str] = field(default_factory=list)          # the command-line overrides of every job
    budget: dict = field(default_factory=dict)               # the budget settings of the launch's config
    departures: list[tuple[str, list[str]]] = field(default_factory=list)  # (what, labels of the rows carrying it)


def _read_yaml_list(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    return [str(item) for item in OmegaConf.to_container(OmegaConf.load(path))]


def _read_results(directory: Path) -> dict | None:
    path = directory / "results.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as error:
        return {"status": "failed", "error": f"unreadable results.json: {error}"}


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def expected_jobs(master: DictConfig) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for this multirun (from multirun.yaml), in launch order."""
    from wavetrain.sweep import expand_sweep

    params = OmegaConf.to_container(master.hydra.sweeper.get("params") or {}, resolve=True)
    arguments = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in master.hydra.overrides.task]
    return expand_sweep(arguments)


def _sweep_axes(jobs: list[list[str]]) -> list[str]:
    """Override keys that vary across the jobs (without the seed), in their order of appearance."""
    seen: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            key, value = _split_override(override)
            seen.setdefault(key, set()).add(value)
    return [k for k, values in seen.items() if len(values) > 1 and k != SEED_KEY]


def _matches(reference: dict, key: dict[str, str]) -> bool:
    wanted = reference.get("match") or {}
    return all(str(key.get(k)) == str(v) for k, v in wanted.items())


def load_sweep(directory: Path) -> Sweep:
    """Every job of the multirun folder (launched or not) grouped into rows, with the published values."""
    directory = Path(directory)
    master_path = directory / "multirun.yaml"
    master = OmegaConf.load(master_path) if master_path.exists() else None
    # unresolved: sweep.launch interpolates Hydra's ${now:} (the folder name already says when it ran)
    meta = OmegaConf.to_container(master.sweep, resolve=False) if master is not None and "sweep" in master else {}
    references = OmegaConf.to_container(master.reference, resolve=False) \
        if master is not None and master.get("reference") else []
    expected: list[list[str]] = []
    if master is not None:
        try:
            expected = expected_jobs(master)
        except Exception as error:  # an unreadable grid must not stop the report: fall back to the job folders
            print(f"wavetrain.report: cannot expand the job grid of {master_path} ({error}); reporting the job "
                  f"folders found", file=sys.stderr)
    found = {int(p.name): p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()}
    jobs = []
    for number in range(max(len(expected), max(found, default=-1) + 1)):
        job_dir = found.get(number)
        overrides = _read_yaml_list(job_dir / ".hydra" / "overrides.yaml") if job_dir else None
        if overrides is None:
            overrides = expected[number] if number < len(expected) else []
        jobs.append(Job(number, overrides, job_dir, _read_results(job_dir) if job_dir else None))
    axes = _sweep_axes([job.overrides for job in jobs])
    rows: dict[tuple, Row] = {}
    for job in jobs:
        values = dict(_split_override(o) for o in job.overrides)
        key = tuple((axis, values.get(axis, "")) for axis in axes)
        row = rows.setdefault(key, Row(key))
        row.jobs.append(job)
    protocol = _container(master, "protocol") or {}
    file_axes = set((_container(master, "hydra.sweeper.params") or {}).keys())
    for row in rows.values():  # a reference matches on any override of the row's jobs, varying or not
        overrides = dict(_split_override(o) for o in row.jobs[0].overrides)
        row.references = [r for r in references if _matches(r, overrides)]
        row.protocol = overrides.get("experiment", protocol.get("name"))
        row.changed = protocol_changes(row.jobs[0].overrides, protocol, file_axes)
    departures = []
    for departure in protocol.get("departures") or []:
        carriers = [row.label for row in rows.values()
                    if all(str(_job_value(master, row.jobs[0], k)) == str(v) for k, v in departure["when"].items())]
        if carriers:
            departures.append((" ".join(str(departure["what"]).split()), carriers))
    metric = str(meta.get("metric", "val_loss"))
    columns = [c for c in meta.get("columns", DEFAULT_COLUMNS) if c != metric]
    shared = [o for o in (_container(master, "hydra.overrides.task") or [])
              if not _split_override(o)[0].startswith("sweep")]
    budget = {key: OmegaConf.select(master, key, default=None, throw_on_resolution_failure=False)
              for key in BUDGET_KEYS} if master is not None else {}
    return Sweep(directory, str(meta.get("name", directory.name)), str(meta.get("table", directory.name)), metric,
                 str(meta.get("goal", "min")), columns, references, list(rows.values()), meta.get("pivot"),
                 protocol.get("source"), shared, budget, departures)


BUDGET_KEYS = ("trainer.max_steps", "run.epochs", "data.batch_size", "trainer.accumulate_grad_batches", "seq_len")


def _container(master: DictConfig | None, key: str):
    """A node of multirun.yaml as plain Python, unresolved (None when absent)."""
    node = OmegaConf.select(master, key, default=None) if master is not None else None
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def protocol_changes(overrides: list[str], protocol: dict, file_axes: set[str]) -> list[str]:
    """The overrides of a job that change its protocol: those of a ``protocol.keys`` setting (or a key below one),
    other than where the data lives (``protocol.locations``) and the sweep file's own axes (its rows)."""
    keys, locations = protocol.get("keys") or [], protocol.get("locations") or []
    changed = []
    for override in overrides:
        key, _ = _split_override(override)
        if key in file_axes or key == SEED_KEY or _under(key, locations) or not _under(key, keys):
            continue
        changed.append(override)
    return changed


def _job_value(master: DictConfig | None, job: Job, key: str):
    """A job's value of ``key``: its override, else its own composed config (``.hydra/config.yaml``, once the job
    started), else the group choice or config value of multirun.yaml (the sweep's defaults)."""
    overrides = dict(_split_override(o) for o in job.overrides)
    if key in overrides:
        return overrides[key]
    own = job.directory / ".hydra" / "config.yaml" if job.directory else None
    if own is not None and own.exists():
        return OmegaConf.select(OmegaConf.load(own), key, default=None, throw_on_resolution_failure=False)
    if master is None:
        return None
    choices = OmegaConf.select(master, "hydra.runtime.choices", default=None) or {}
    if key in choices:
        return choices[key]
    return OmegaConf.select(master, key, default=None, throw_on_resolution_failure=False)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def _mean_std(row: Row, metric: str) -> str:
    values = row.values(metric)
    if not values:
        return "—"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(statistics.fmean(values))} ± {_fmt(statistics.stdev(values), 2)}"


def incomparable(row: Row, reference: dict) -> str | None:
    """Why the row may not stand beside this published value (None when it ran the value's protocol unchanged)."""
    if row.protocol is None:
        return "no published protocol recorded (run the table through its experiment)"
    published_under = reference.get("protocol") or row.protocol
    if published_under != row.protocol:
        return f"published under {published_under}, this row ran {row.protocol}"
    if row.changed:
        return "overrides " + " ".join(row.changed)
    return None


def _published(row: Row, metric: str) -> tuple[str, str]:
    """(published, difference) cells: the references of the row, ours − published on the reference's metric, or
    "not comparable" with the reason where the row did not run the value's protocol unchanged."""
    if not row.references:
        return "—", "—"
    published, differences = [], []
    for ref in row.references:
        ref_metric, value = str(ref.get("metric", metric)), ref.get("value")
        suffix = "" if ref_metric == metric else f" ({LABELS.get(ref_metric, ref_metric)})"
        published.append(f"{_fmt(value)}{suffix}" if isinstance(value, (int, float)) else f"{value}{suffix}")
        ours, reason = row.mean(ref_metric), incomparable(row, ref)
        if not isinstance(value, (int, float)):
            differences.append("—")
        elif reason:
            differences.append(f"not comparable{suffix}: {reason}")
        else:
            differences.append(f"{ours - value:+.3g}{suffix}" if ours is not None else "—")
    return "; ".join(published), "; ".join(differences)


def markdown_table(sweep: Sweep) -> str:
    """The report table: one row per variant."""
    headline = LABELS.get(sweep.metric, sweep.metric)
    arrow = "↓" if sweep.goal == "min" else "↑"
    header = ["row", "seeds", f"{headline} {arrow}", "published", "Δ (ours − published)",
              *[LABELS.get(c, c) for c in sweep.columns], "params", "tokens/s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sweep.rows:
        published, difference = _published(row, sweep.metric)
        params = row.mean("n_parameters")
        rate = row.mean("tokens_per_sec")
        cells = [f"`{row.label}`", str(len(row.jobs)), _mean_std(row, sweep.metric), published, difference,
                 *[_mean_std(row, c) for c in sweep.columns], f"{params:,.0f}" if params else "—",
                 f"{rate:,.0f}" if rate else "—", row.status().replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class PivotGrid:
    """The headline metric of a ``sweep.pivot`` as a grid: one row per value of ``row_key`` (best mean first), one
    column per combination of ``column_keys``."""
    row_key: str
    column_keys: list[str]
    columns: list[tuple]
    cells: dict[str, dict[tuple, float | None]]
    means: dict[str, float | None]        # a row's mean over the grid (None if a cell is missing)
    ordered: list[str]

    def titles(self, separator: str = " ") -> list[str]:
        return [separator.join(f"{k.split('.')[-1]}={v}" for k, v in zip(self.column_keys, column))
                for column in self.columns]


def pivot_grid(sweep: Sweep) -> PivotGrid | None:
    """With ``sweep.pivot: {rows: <key>, columns: [<keys>]}``: the grid of :func:`pivot_table` and the heatmap."""
    if not sweep.pivot:
        return None
    row_key = str(sweep.pivot.get("rows", "attention"))
    column_keys = [str(k) for k in sweep.pivot.get("columns", [])]
    cells: dict[str, dict[tuple, float | None]] = {}
    columns: list[tuple] = []
    for row in sweep.rows:
        key = dict(row.key)
        column = tuple(key.get(k, "") for k in column_keys)
        if column not in columns:
            columns.append(column)
        cells.setdefault(key.get(row_key, ""), {})[column] = row.mean(sweep.metric)
    means = {}
    for name, values in cells.items():
        present = [v for v in values.values() if v is not None]
        means[name] = statistics.fmean(present) if len(present) == len(columns) else None
    ordered = sorted(cells, key=lambda n: (means[n] is None, (means[n] or 0) * (1 if sweep.goal == "min" else -1)))
    return PivotGrid(row_key, column_keys, columns, cells, means, ordered)


def pivot_table(sweep: Sweep, grid: PivotGrid) -> str:
    """The headline metric as a grid, plus each pivot row's mean over the grid (the ordering of the variants)."""
    headline = LABELS.get(sweep.metric, sweep.metric)
    lines = [f"| {grid.row_key} | " + " | ".join(grid.titles()) + f" | mean {headline} |",
             "|" + "---|" * (len(grid.columns) + 2)]
    for name in grid.ordered:
        cells = [_fmt(grid.cells[name].get(column)) for column in grid.columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(grid.means[name])} |")
    return "\n".join(lines)


def plot_pivot(sweep: Sweep, grid: PivotGrid, path: Path) -> None:
    """The pivot grid as a heatmap (rows best first, each cell annotated; blank where a run is missing or failed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if grid.cells[name].get(c) is None else grid.cells[name][c] for c in grid.columns]
                       + [np.nan if grid.means[name] is None else grid.means[name]] for name in grid.ordered])
    fig, axis = plt.subplots(figsize=(2.0 + 1.3 * values.shape[1], 1.2 + 0.32 * values.shape[0]))
    cmap = plt.get_cmap("viridis" if sweep.goal == "max" else "viridis_r").copy()
    cmap.set_bad("lightgrey")
    image = axis.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            axis.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7,
                      color="white" if image.norm(value) < 0.5 else "black")
    headline = LABELS.get(sweep.metric, sweep.metric)
    axis.set_xticks(range(values.shape[1]), grid.titles("\n") + [f"mean {headline}"], fontsize=7)
    axis.set_yticks(range(values.shape[0]), grid.ordered, fontsize=7)
    axis.axvline(len(grid.columns) - 0.5, color="white", lw=2)
    fig.colorbar(image, ax=axis, label=f"{headline} ({'lower' if sweep.goal == 'min' else 'higher'} is better)")
    axis.set_title(sweep.table, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_curve(job: Job, metric: str = "val/loss") -> tuple[list[int], list[float]]:
    """(steps, values) of one logged metric from the job's logs/metrics.csv (empty when absent)."""
    path = job.directory / "logs" / "metrics.csv" if job.directory else None
    if path is None or not path.exists():
        return [], []
    steps, values = [], []
    with open(path, newline="") as handle:
        for record in csv.DictReader(handle):
            if record.get(metric):
                steps.append(int(float(record["step"])))
                values.append(float(record[metric]))
    return steps, values


def plot_report(sweep: Sweep, path: Path) -> None:
    """Validation-loss curves of every row (left) and the headline metric per row with published values (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(sweep.rows)
    height = max(4.0, 0.28 * n + 1.5)
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(15, height), gridspec_kw={"width_ratios": [1.2, 1]})
    palette = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    colors = palette if n <= 20 else plt.matplotlib.colors.ListedColormap(
        [palette(0.05 + 0.9 * i / (n - 1)) for i in range(n)])  # one distinct colour per row
    for index, row in enumerate(sweep.rows):
        color = colors(index % colors.N)
        for seed_index, job in enumerate(row.jobs):
            steps, values = read_curve(job)
            if steps:
                curves.plot(steps, values, color=color, alpha=0.9 if seed_index == 0 else 0.5, lw=1.2,
                            label=row.label if seed_index == 0 else None)
    curves.set_xlabel("optimiser step")
    curves.set_ylabel("validation loss")
    curves.set_title("validation loss")
    curves.grid(alpha=0.3)
    if n <= 24 and curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=6 if n > 10 else 7, loc="best", framealpha=0.6)
    positions = list(range(n))
    means = [row.mean(sweep.metric) for row in sweep.rows]
    errors = [statistics.stdev(v) if len(v := row.values(sweep.metric)) > 1 else 0.0 for row in sweep.rows]
    bars.barh(positions, [m if m is not None else 0.0 for m in means], xerr=errors,
              color=[colors(i % colors.N) for i in positions], alpha=0.85)
    marked: set[str] = set()
    for i, row in enumerate(sweep.rows):
        if means[i] is None:
            bars.text(0, i, f"  {row.status().split(':')[0]}", va="center", fontsize=7, color="crimson")
        for ref in row.references:
            if str(ref.get("metric", sweep.metric)) == sweep.metric and isinstance(ref.get("value"), (int, float)):
                comparable = incomparable(row, ref) is None
                label = "published" if comparable else "published (not comparable)"
                bars.plot(ref["value"], i, marker="D", color="black", ms=6, ls="none",
                          markerfacecolor="black" if comparable else "none",
                          label=None if label in marked else label)
                marked.add(label)
    bars.set_yticks(positions, [row.label for row in sweep.rows], fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel(f"{LABELS.get(sweep.metric, sweep.metric)} ({'lower' if sweep.goal == 'min' else 'higher'} "
                    f"is better; mean ± std over seeds)")
    bars.grid(axis="x", alpha=0.3)
    if marked:
        bars.legend(fontsize=8, loc="lower right")
    fig.suptitle(sweep.table)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def missing_columns(sweep: Sweep) -> list[str]:
    """The headline metric and ``columns`` keys that no finished job's results.json holds (an empty column is a
    misspelt key or a metric the runs never produce)."""
    done = [job.results for row in sweep.rows for job in row.jobs if job.status == "done"]
    if not done:
        return []
    return [key for key in (sweep.metric, *sweep.columns) if not any(key in results for results in done)]


def budget_line(sweep: Sweep) -> str:
    """The budget the jobs actually ran: optimiser steps from their results.json, the settings from multirun.yaml."""
    steps = sorted({int(job.results["steps"]) for row in sweep.rows for job in row.jobs
                    if job.status == "done" and isinstance((job.results or {}).get("steps"), (int, float))})
    ran = ("no job finished yet" if not steps else f"{steps[0]:,} optimiser steps per job" if len(steps) == 1
           else f"{steps[0]:,}–{steps[-1]:,} optimiser steps per job")
    settings = sweep.budget
    planned = (f"run.epochs={settings['run.epochs']}" if settings.get("run.epochs") is not None
               else f"trainer.max_steps={settings.get('trainer.max_steps')}")
    shape = (f"{settings.get('data.batch_size')} × {settings.get('trainer.accumulate_grad_batches') or 1} "
             f"sequences of ≤ {settings.get('seq_len')} tokens per step")
    return f"Budget run: {ran} ({planned}; {shape})."


def _launch_line(sweep: Sweep, others: list[str]) -> str:
    text = f"Sweep `{sweep.name}`, launch `{sweep.directory.name}` (folder `{sweep.directory}`)"
    if others:
        text += (f"; other launches of this sweep: {', '.join(f'`{o}`' for o in others)} "
                 f"(`python -m wavetrain.report {sweep.name} --launch <launch>` reports one)")
    return text + "."


def header(sweep: Sweep, others: list[str] | None = None) -> list[str]:
    """What ran: launch, protocol, shared overrides, budget, departures, columns no results.json holds."""
    counts = {s: sum(job.status == s for row in sweep.rows for job in row.jobs) for s in ("done", "failed", "missing")}
    protocols = sorted({row.protocol for row in sweep.rows if row.protocol})
    lines = [_launch_line(sweep, others or []),
             f"{sum(counts.values())} jobs — {counts['done']} done, {counts['failed']} failed, {counts['missing']} "
             f"missing. Metrics are mean ± std over seeds; Δ = ours − published, set only where the row ran the "
             f"published protocol unchanged.",
             "Protocol: " + (", ".join(f"`experiment={p}`" for p in protocols) + (f" ({sweep.source})" if sweep.source
                                                                                   else "")
                             if protocols else "none (no experiment): no published number is comparable") + ".",
             "Shared overrides: " + (f"`{' '.join(sweep.shared)}`" if sweep.shared else "none") + ".",
             budget_line(sweep)]
    missing = missing_columns(sweep)
    if missing:
        lines.append("No results.json of this launch holds " + ", ".join(f"`{key}`" for key in missing)
                     + ": a misspelt key, or a metric these runs do not produce (its column stays empty).")
    if sweep.departures:
        lines.append("Departures from the published computation:")
        lines += [f"- {what} — rows: {', '.join(f'`{label}`' for label in labels)}" for what, labels in sweep.departures]
    return lines


def write_report(directory: Path, others: list[str] | None = None) -> tuple[Path, Path]:
    """Write report.md and report.png (and report_grid.png, the heatmap of a ``sweep.pivot``) into the multirun
    folder; returns the paths of report.md and report.png.  ``others``: the sweep's other launches, named in the
    header."""
    sweep = load_sweep(directory)
    lines = header(sweep, others)
    paragraph = [line for line in lines if not line.startswith("- ")]  # one paragraph, then the departures list
    parts = [f"# {sweep.table}", "", "  \n".join(paragraph), "", *[line for line in lines if line.startswith("- ")],
             "", markdown_table(sweep)]
    grid = pivot_grid(sweep)
    if grid is not None:
        parts += ["", f"## {LABELS.get(sweep.metric, sweep.metric)} by {grid.row_key}", "",
                  pivot_table(sweep, grid), "", "![grid](report_grid.png)"]
    sources = sorted({str(r.get("source")) for r in sweep.references if r.get("source")})
    if sources:
        parts += ["", "Published values: " + "; ".join(sources) + "."]
    parts += ["", "![report](report.png)", ""]
    markdown = directory / "report.md"
    markdown.write_text("\n".join(parts))
    figure = directory / "report.png"
    plot_report(sweep, figure)
    if grid is not None:
        plot_pivot(sweep, grid, directory / "report_grid.png")
    return markdown, figure


def launches(name: str, root: Path = Path("multirun")) -> list[Path]:
    """The multirun folders of sweep ``name`` (``multirun/<name>/<launch>``), oldest first."""
    folder = root / name
    found = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not found:
        known = ", ".join(sorted(p.name for p in root.glob("*") if p.is_dir())) or "none"
        raise FileNotFoundError(f"no multirun of sweep {name!r} under {root.resolve()} (sweeps run there: {known}): "
                                f"run `python -m wavetrain -m +sweep={name}` first, or pass a multirun folder")
    return found


def resolve_target(target: str, root: Path = Path("multirun"), launch: str | None = None) -> tuple[Path, list[str]]:
    """(the multirun folder, the names of the sweep's other launches): ``target`` as a folder, or a sweep name with
    its launch ``launch`` (the folder name or a unique prefix of it; the latest when None)."""
    path = Path(target)
    if path.is_dir():
        if not (path / "multirun.yaml").exists() and not any(p.name.isdigit() for p in path.iterdir()):
            raise FileNotFoundError(f"{path} holds no multirun.yaml and no numbered job folders: give a multirun "
                                    f"folder (multirun/<sweep>/<launch time>) or a sweep name")
        if launch is not None:
            raise FileNotFoundError(f"--launch {launch} picks a launch of a sweep name, not of the folder {path}: "
                                    f"give the sweep name, or the launch's folder alone")
        siblings = sorted(p.name for p in path.parent.iterdir() if p.is_dir() and p != path
                          and (p / "multirun.yaml").exists())
        return path, siblings
    found = launches(target, root)
    if launch is None:
        chosen = found[-1]
    else:
        matches = [p for p in found if p.name == launch] or [p for p in found if p.name.startswith(launch)]
        if len(matches) != 1:
            listed = ", ".join(p.name for p in found)
            raise FileNotFoundError(f"--launch {launch} {'matches several' if matches else 'matches no'} launch of "
                                    f"sweep {target!r}: give one of {listed}")
        chosen = matches[0]
    return chosen, [p.name for p in found if p != chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wavetrain.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a multirun folder, or a sweep name (its latest launch under --root)")
    parser.add_argument("--launch", help="with a sweep name: the launch to report (its folder name under "
                                         "multirun/<sweep>/, or a unique prefix such as the date)")
    parser.add_argument("--root", default="multirun", help="where sweeps write their runs (default: multirun)")
    args = parser.parse_args(argv)
    try:
        directory, others = resolve_target(args.target, Path(args.root), args.launch)
    except FileNotFoundError as error:
        print(f"wavetrain.report: {error}", file=sys.stderr)
        return 1
    markdown, figure = write_report(directory, others)
    print(markdown.read_text())
    if others:
        print(f"reported launch {directory.name}; other launches of {args.target}: {', '.join(others)}")
    sweep_missing = missing_columns(load_sweep(directory))
    if sweep_missing:
        print(f"wavetrain.report: no results.json holds {', '.join(sweep_missing)}: check the sweep file's "
              f"metric/columns keys", file=sys.stderr)
    print(f"wrote {markdown} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
