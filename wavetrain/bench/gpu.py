"""The GPU check of issue 15 in one command: CUDA correctness tests first, then the benchmark tables, most important
first, within a wall-time limit.

    python -m wavetrain.bench --suite gpu --out DIR        # also: make gpu-check OUT=DIR

Sections, in this order (``--sections`` picks and orders them):

1. ``tests``: ``pytest -m cuda`` (compiled against eager, the GPU path against the CPU, causality in fp32 and bf16,
   fused AdamW); its output goes to tests.log.
2. ``step85_standard``: one training step of the standard model at the 85M shape (d 640, 12 layers, 8 heads, FFN
   2560, vocab 32000, batch 8 × 2048 tokens), eager and compiled: tokens/s and MFU against the device's bf16 peak.
3. ``attention``: the attention module alone, forward + backward, batch 1, D 256, 8 heads, N = 2K … 64K, eager,
   with SDPA ÷ this (targets: FFT family ≥ 1 at 16K and ≥ 8 at 64K; WDA prefix_mixdens ≥ 1/3 at 16K).
4. ``step13``: the step at the 13M shape (d 256, 6 layers) for every variant, eager, then compiled, with each
   variant's tokens/s over standard's in the same mode (target ≥ 0.8).
5. ``trainer``: the standard 85M model in the real Lightning Trainer (wavetrain.train.train, model.compile=auto,
   fused AdamW, bf16-mixed, synthetic MQAR tokens with a 32000-token vocabulary so nothing is downloaded): the
   ThroughputMonitor's tokens/s and MFU over the steps after the first logging window (which holds the compilation).
6. ``step85``: the 85M-shape step for the other variants.
7. ``attention_compiled``: the attention table's 16K and 64K rows with the modules compiled.

Files (flat and few, as a GPU machine's output folder returns them): suite.md (every table) and suite.csv (every
row, its table named in the first column), rewritten after each row so that a run cut short keeps its finished
rows; tests.log; trainer_results.json and trainer_metrics.csv of the Trainer run; suite.png (tokens/s per variant
at both shapes, fwd+bwd time against N).  A failing case prints its error in its row and the suite goes on.  A case
is not started when the time limit would be passed (a compiled case needs ``COMPILE_RESERVE_S`` left); suite.md
lists it as not run, and the last lines print the command that runs what is left.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from wavetrain.bench.cases import REFERENCE, Settings, Variant, attention_workload, model_workload, select_variants
from wavetrain.bench.report import device_name, percent
from wavetrain.bench.timing import Track, default_memory_limit, describe_error, measure_case
from wavetrain.flops import peak_bf16_flops

SECTIONS = ("tests", "step85_standard", "attention", "step13", "trainer", "step85", "attention_compiled")
# What a time-limited GPU call measures (issue 15): every FFT-family variant and the DWARF conditions the issue
# timed; --attention replaces both lists.
SUITE_VARIANTS = "standard,wavefield,wda,wda@gate_pooling=prefix_mixdens,dwarf_condA,dwarf_condK,dwarf_condN," \
                 "dwarf_condP"
ATTENTION_VARIANTS = "standard,wavefield,wda@gate_pooling=prefix_mixdens,dwarf_condA,dwarf_condK,dwarf_condN," \
                     "dwarf_condP"  # wda's exact prefix mode is O(N²) in memory by construction: not at 64K
COMPILE_RESERVE_S = 45.0  # seconds a compiled case needs left before the time limit (compilation included)
EAGER_RESERVE_S = 10.0


@dataclass
class SuitePlan:
    """Shapes and limits of one suite run (the defaults are issue 15's; the tests shrink them to run on a CPU)."""
    device: torch.device
    out: Path
    sections: tuple[str, ...] = SECTIONS
    step_variants: str = SUITE_VARIANTS
    attention_variants: str = ATTENTION_VARIANTS
    step_scales: dict[str, dict] = field(default_factory=lambda: {  # conf/scale/13m.yaml and 85m.yaml
        "13m": dict(dim=256, heads=8, layers=6, ffn_dim=1024, dropout=0.1),
        "85m": dict(dim=640, heads=8, layers=12, ffn_dim=2560, dropout=0.1)})
    step_tokens: int = 2048
    step_batch: int = 8
    vocab: int = 32000
    attention_lengths: tuple[int, ...] = (2048, 4096, 16384, 65536)
    compiled_attention_lengths: tuple[int, ...] = (16384, 65536)
    attention_dim: int = 256
    attention_heads: int = 8
    warmup: int = 3
    repeats: int = 10
    time_limit: float = 280.0
    tests_timeout: float = 120.0
    trainer_steps: int = 120
    trainer_scale: str = "85m"
    precision: str = "bf16-mixed"


# ------------------------------------------------------------------------------------------------ tables
@dataclass
class Table:
    """One Markdown table of the suite, kept as rows of cells (CSV: the same cells)."""
    name: str
    title: str
    note: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.note, "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines + [""])


class Suite:
    """The running suite: its plan, clock, tables and what was left out."""

    def __init__(self, plan: SuitePlan) -> None:
        self.plan = plan
        self.started = time.perf_counter()
        self.tables: dict[str, Table] = {}
        self.not_run: list[str] = []
        self.header = (f"{datetime.now():%Y-%m-%d %H:%M}; {device_name(plan.device)}; torch {torch.__version__}"
                       f"{_triton_version()}; {plan.precision}; CUDA-event timing (median of {plan.repeats} runs "
                       f"after {plan.warmup} warm-up, IQR % = interquartile range over the median)")
        peak_name = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else ""
        self.peak_flops = peak_bf16_flops(peak_name) if peak_name else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def has_time(self, compiled: bool) -> bool:
        reserve = COMPILE_RESERVE_S if compiled else EAGER_RESERVE_S
        return self.elapsed() + reserve <= self.plan.time_limit

    def table(self, name: str, title: str, note: str, columns: list[str]) -> Table:
        return self.tables.setdefault(name, Table(name, title, note, columns))

    def add(self, table: Table, row: list[str]) -> None:
        table.rows.append(row)
        print(f"[{self.elapsed():5.0f} s] {table.name}: " + " | ".join(row), flush=True)
        self.write()

    def write(self) -> None:
        self.plan.out.mkdir(parents=True, exist_ok=True)
        parts = ["# wavetrain GPU check (issue 15)", "", self.header + ".", ""]
        parts += [table.markdown() for table in self.tables.values()]
        if self.not_run:
            parts += ["## Not run (time limit)", "", *(f"- {item}" for item in self.not_run), ""]
        (self.plan.out / "suite.md").write_text("\n".join(parts))
        columns = list(dict.fromkeys(c for table in self.tables.values() for c in table.columns))
        with open(self.plan.out / "suite.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["table", *columns])
            for table in self.tables.values():
                for row in table.rows:
                    cells = dict(zip(table.columns, row))
                    writer.writerow([table.name, *(cells.get(c, "") for c in columns)])


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ", no triton"
    return f", triton {triton.__version__}"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------------ sections
def cuda_test_files(tests: Path) -> list[Path]:
    """The test files holding ``cuda``-marked tests: only these are collected, so the GPU machine needs none of the
    packages that the other test files import (datasets, wandb, ...)."""
    return sorted(path for path in tests.glob("test_*.py") if "pytest.mark.cuda" in path.read_text())


def run_tests(suite: Suite) -> None:
    """``pytest -m cuda`` in a subprocess (its own CUDA context), output in tests.log."""
    table = suite.table("tests", "CUDA correctness tests (pytest -m cuda)", "Output: tests.log.",
                        ["command", "result", "seconds"])
    tests = Path(__file__).resolve().parents[2] / "tests"
    files = cuda_test_files(tests) if tests.is_dir() else []
    if not files:
        suite.add(table, ["pytest -m cuda", f"not run: no cuda tests under {tests} (run from a checkout)", ""])
        return
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *map(str, files)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=suite.plan.tests_timeout)
        output, outcome = done.stdout + done.stderr, None
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        outcome = f"timed out after {suite.plan.tests_timeout:.0f} s"
    (suite.plan.out / "tests.log").write_text(output)
    if outcome is None:
        summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
        outcome = summary[-1].strip("= ") if summary else f"exit code {done.returncode}"
    suite.add(table, ["pytest -m cuda " + " ".join(f"tests/{f.name}" for f in files), outcome,
                      f"{time.perf_counter() - start:.0f}"])


def _step_table(suite: Suite, scale: str) -> Table:
    plan = suite.plan
    shape = plan.step_scales[scale]
    return suite.table(
        f"step{scale.removesuffix('m')}", f"Training step at the {scale.upper()} shape",
        f"One optimiser step (forward, cross-entropy, backward, AdamW; fused on CUDA) of the whole model: d "
        f"{shape['dim']}, {shape['layers']} layers, {shape['heads']} heads, FFN {shape['ffn_dim']}, vocab "
        f"{plan.vocab}, batch {plan.step_batch} × {plan.step_tokens} tokens, {plan.precision}. × standard = this "
        f"variant's tokens/s over standard's in the same mode (target ≥ 0.8). MFU = tokens/s × analytic "
        f"FLOPs/token (wavetrain/flops.py) / the device's dense bf16 peak. compile s = the first (compiling) step.",
        ["attention", "mode", "step ms", "IQR %", "tokens/s", "× standard", "MFU", "peak GiB", "compile s",
         "notes"])


def run_steps(suite: Suite, scale: str, variants: list[Variant]) -> None:
    """Model-step rows at one scale: every variant eager (seconds each), then every variant compiled (the
    compilation takes tens of seconds per variant), standard first in each: the reference of the ratios."""
    plan = suite.plan
    table = _step_table(suite, scale)
    shape = plan.step_scales[scale]
    for compiled in (False, True):
        for variant in variants:
            mode = "compiled" if compiled else "eager"
            if not suite.has_time(compiled):
                suite.not_run.append(f"{table.name}: {variant.label} {mode}")
                continue
            settings = Settings(device=plan.device, lengths=[plan.step_tokens], batch=plan.step_batch,
                                vocab=plan.vocab, precision=plan.precision, warmup=plan.warmup,
                                repeats=plan.repeats, budget=60.0, max_memory=default_memory_limit(plan.device),
                                measures=("step",), compile=compiled, **shape)
            flops: list[float | None] = [None]

            def make(v=variant, s=settings):
                run, flops[0] = model_workload(v, s, plan.step_tokens)
                return run
            result = measure_case(make, settings, Track(), plan.step_tokens)
            rate = plan.step_batch * plan.step_tokens / result.median_s if result.median_s else None
            reference = rate if variant.label == REFERENCE else _reference_rate(table, mode)
            mfu = rate * flops[0] / suite.peak_flops if rate and flops[0] and suite.peak_flops else None
            suite.add(table, [variant.label, mode, _ms(result.median_s), percent(result.spread),
                              _num(rate, ",.0f"), _num(rate / reference if rate and reference else None, ".2f"),
                              _num(mfu, ".1%"), _num(result.peak_bytes / 2**30 if result.peak_bytes else None,
                                                     ".1f"),
                              _num(result.compile_s, ".0f"), result.note])


def _reference_rate(table: Table, mode: str) -> float | None:
    for row in table.rows:
        if row[0] == REFERENCE and row[1] == mode and row[4]:
            return _value(row[4])
    return None


def run_attention(suite: Suite, variants: list[Variant], lengths: tuple[int, ...], compiled: bool) -> None:
    """Attention-module forward + backward rows, length-major (each length's SDPA row first)."""
    plan = suite.plan
    name = "attention_compiled" if compiled else "attention"
    table = suite.table(
        name, f"Attention module alone, forward + backward ({'compiled' if compiled else 'eager'})",
        f"Batch 1, D {plan.attention_dim}, {plan.attention_heads} heads, {plan.precision}. SDPA ÷ this = the time "
        f"of `standard` (torch SDPA, is_causal) over this variant's at the same N (> 1: faster than SDPA; "
        f"targets: FFT family ≥ 1 at 16K and ≥ 8 at 64K, WDA prefix_mixdens ≥ 0.33 at 16K).",
        ["attention", "N", "fwd+bwd ms", "IQR %", "SDPA ÷ this", "tokens/s", "peak GiB", "compile s", "notes"])
    tracks: dict[str, Track] = {}
    for n_tokens in lengths:
        for variant in variants:
            if not suite.has_time(compiled):
                suite.not_run.append(f"{name}: {variant.label} N={n_tokens}")
                continue
            settings = Settings(device=plan.device, lengths=list(lengths), batch=1, dim=plan.attention_dim,
                                heads=plan.attention_heads, layers=1, ffn_dim=4 * plan.attention_dim,
                                vocab=plan.vocab, precision=plan.precision, warmup=plan.warmup,
                                repeats=plan.repeats, budget=60.0, max_memory=default_memory_limit(plan.device),
                                measures=("fwdbwd",), compile=compiled)
            track = tracks.setdefault(variant.label, Track())
            result = measure_case(lambda v=variant, s=settings, n=n_tokens: attention_workload(v, s, n, "fwdbwd"),
                                  settings, track, n_tokens)
            mine = result.median_s * 1e3 if result.median_s else None
            reference = mine if variant.label == REFERENCE else next(
                (_value(r[2]) for r in table.rows if r[0] == REFERENCE and r[1] == str(n_tokens) and r[2]), None)
            suite.add(table, [variant.label, str(n_tokens), _ms(result.median_s), percent(result.spread),
                              _num(reference / mine if reference and mine else None, ".3g"),
                              _num(n_tokens / result.median_s if result.median_s else None, ",.0f"),
                              _num(result.peak_bytes / 2**30 if result.peak_bytes else None, ".2f"),
                              _num(result.compile_s, ".0f"), result.note])


def trainer_overrides(plan: SuitePlan) -> list[str]:
    """The Trainer run of the ``trainer`` section: standard at the 85M shape on synthetic 32000-token MQAR data."""
    accelerator = "gpu" if plan.device.type == "cuda" else "cpu"
    return ["attention=standard", f"scale={plan.trainer_scale}", "data=mqar", "tokenizer=synthetic",
            f"data.vocab_size={plan.vocab}", f"seq_len={plan.step_tokens}", f"data.batch_size={plan.step_batch}",
            f"data.train_examples={plan.trainer_steps * plan.step_batch}", "data.val_examples=8",
            "data.test_examples=8", f"trainer.accelerator={accelerator}", f"trainer.precision={plan.precision}",
            f"trainer.max_steps={plan.trainer_steps}", f"trainer.val_check_interval={plan.trainer_steps}",
            "trainer.limit_val_batches=1", f"trainer.log_every_n_steps={max(1, min(10, plan.trainer_steps // 4))}",
            "trainer.enable_progress_bar=false",
            f"run.checkpoint_every_n_steps={plan.trainer_steps}"]


def run_trainer(suite: Suite) -> None:
    """The standard model in the Lightning Trainer: results.json's tokens/s and MFU (first window excluded)."""
    from wavetrain.config import compose_config
    from wavetrain.train import train

    plan = suite.plan
    overrides = trainer_overrides(plan)
    table = suite.table(
        "trainer", "Standard model in the Lightning Trainer",
        f"`python -m wavetrain {' '.join(overrides)}` (model.compile=auto): tokens/s and MFU as the "
        f"ThroughputMonitor logs them (mean over the logging windows after the first, which holds the "
        f"compilation; target MFU ≥ 40 %). From its run directory: trainer_results.json, trainer_metrics.csv.",
        ["attention", "scale", "steps", "tokens/s", "MFU", "ms/step", "val loss", "wall s", "notes"])
    if not suite.has_time(True):
        suite.not_run.append("trainer: standard")
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            results = train(compose_config(overrides), run_dir=Path(tmp) / "run")
            note = ""
        except Exception as error:  # noqa: BLE001 - reported in the row, the suite goes on
            results, note = {}, describe_error(error)
        for name in ("results.json", "logs/metrics.csv"):
            if (Path(tmp) / "run" / name).exists():
                shutil.copy(Path(tmp) / "run" / name, plan.out / f"trainer_{Path(name).name}")
    rate = results.get("tokens_per_sec")
    suite.add(table, ["standard", plan.trainer_scale, str(results.get("steps", "")), _num(rate, ",.0f"),
                      _num(results.get("mfu"), ".1%"),
                      _num(plan.step_batch * plan.step_tokens / rate * 1e3 if rate else None, ".1f"),
                      _num(results.get("val_loss"), ".3f"), f"{time.perf_counter() - start:.0f}", note])


# ------------------------------------------------------------------------------------------------ figures
def write_figure(suite: Suite) -> None:
    """suite.png: tokens/s per variant and mode at each step shape, and log-log fwd+bwd time against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [suite.tables[name] for name in ("step13", "step85", "attention") if suite.tables.get(name)
              and suite.tables[name].rows]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for axis, table in zip(axes[0], panels):
        labels = list(dict.fromkeys(row[0] for row in table.rows))
        if table.name == "attention":
            for label in labels:
                points = [(int(r[1]), _value(r[2])) for r in table.rows if r[0] == label and r[2]]
                if points:
                    axis.plot(*zip(*points), "k-o" if label == REFERENCE else "-o", label=label, markersize=3)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("sequence length N")
            axis.set_ylabel("fwd+bwd ms")
            axis.grid(True, which="both", alpha=0.3)
        else:
            for offset, mode in ((-0.2, "compiled"), (0.2, "eager")):
                rates = [next((_value(r[4]) for r in table.rows if r[0] == label and r[1] == mode and r[4]), 0.0)
                         for label in labels]
                axis.bar([i + offset for i in range(len(labels))], rates, width=0.4, label=mode)
            axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            axis.set_ylabel("tokens/s")
        axis.set_title(table.title, fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(suite.plan.out / "suite.png", dpi=100)
    plt.close(figure)


def _value(cell: str) -> float:
    return float(cell.replace(",", ""))


# ------------------------------------------------------------------------------------------------ the suite
def run_suite(plan: SuitePlan) -> Suite:
    """Run the plan's sections in order within its time limit; returns the suite with its tables."""
    suite = Suite(plan)
    print(f"wavetrain GPU check: {suite.header}; sections {', '.join(plan.sections)}; time limit "
          f"{plan.time_limit:.0f} s; writing to {plan.out}", flush=True)
    suite.write()
    step_variants = select_variants(plan.step_variants)
    others = [v for v in step_variants if v.label != REFERENCE]
    for section in plan.sections:
        try:
            if section == "tests":
                run_tests(suite)
            elif section == "step85_standard":
                run_steps(suite, "85m", step_variants[:1])
            elif section == "step13":
                run_steps(suite, "13m", step_variants)
            elif section == "attention":
                run_attention(suite, select_variants(plan.attention_variants), plan.attention_lengths, False)
            elif section == "step85":
                if "step85_standard" not in plan.sections:
                    run_steps(suite, "85m", step_variants[:1])
                run_steps(suite, "85m", others)
            elif section == "trainer":
                run_trainer(suite)
            elif section == "attention_compiled":
                run_attention(suite, select_variants(plan.attention_variants), plan.compiled_attention_lengths,
                              True)
        except Exception as error:  # noqa: BLE001 - one broken section must not cost the others their rows
            suite.table("errors", "Sections that failed", "", ["section", "error"])
            suite.add(suite.tables["errors"], [section, describe_error(error)])
    write_figure(suite)
    suite.write()
    print(f"wavetrain GPU check: done in {suite.elapsed():.0f} s; wrote {plan.out / 'suite.md'}", flush=True)
    for command in continuation_commands(suite.not_run):
        print(f"not run within the time limit; to run it: {command}", flush=True)
    return suite


def continuation_commands(not_run: list[str]) -> list[str]:
    """One command per section with cases left, naming exactly the variants left (standard is always measured
    again: it is the reference of the ratios)."""
    left: dict[str, list[str]] = {}
    for item in not_run:
        section, case = item.split(": ", 1)
        section = "step85" if section == "step85_standard" else section
        label = case.split(" ")[0]
        if section != "trainer" and label not in left.setdefault(section, []):
            left[section].append(label)
        left.setdefault(section, [])
    commands = []
    for section in sorted(left, key=lambda name: SECTIONS.index(name) if name in SECTIONS else len(SECTIONS)):
        variants = [v for v in left[section] if v != REFERENCE]
        chosen = f" --attention {','.join(variants)}" if variants else ""
        commands.append(f"python -m wavetrain.bench --suite gpu --sections {section}{chosen} --out DIR")
    return commands


def suite_results(out: Path) -> dict[str, list[dict]]:
    """The rows of suite.csv by table name, each with the cells of its own table's columns (for scripts, tests)."""
    tables: dict[str, list[dict]] = {}
    for row in csv.DictReader(open(out / "suite.csv")):
        tables.setdefault(row.pop("table"), []).append(row)
    return tables
