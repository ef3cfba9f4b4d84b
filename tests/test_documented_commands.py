"""Every command the documentation shows runs, so none can rot: README.md and sweeps/README.md (code blocks and inline
code) and the ``# Run:`` / ``# Dry:`` / ``# Smoke:`` / ``# Offline:`` / ``# Report:`` header lines of every sweep file.

The commands are read from the files themselves, so a new one is covered without touching this test. Each runs as
cheaply as what it does allows: a training command (single run or sweep) as its dry run (every job listed, every row
composed and validated: the same code as ``--dry-run``), ``make`` targets as ``make -n``, the other modules' command
lines through their own argument parsers, the report on a stand-in multirun folder, Hydra's ``--help`` / ``--cfg``
for real. Placeholders: ``DIR``, ``CKPT``, ``...`` values and ``/dir/of/...`` paths become temporary paths; a header
line starting with ``...`` continues the sweep's ``# Run:`` command.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from wavetrain.sweep import SWEEPS_DIR, dry_run, list_jobs, validate_jobs

REPO = Path(__file__).resolve().parent.parent
DOCS = (REPO / "README.md", SWEEPS_DIR / "README.md")
HEADER_LABELS = ("Run", "Dry", "Smoke", "Offline", "Report")
LAUNCH = "2026-01-01_12-00-00-ab12"  # the launch folder the documentation's examples name


@dataclass(frozen=True)
class Command:
    where: str       # file:line
    text: str        # as documented, placeholders included

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def _name(path: Path) -> str:
    return str(path.resolve().relative_to(REPO))


def _code_block_commands(path: Path) -> list[Command]:
    """Lines of ```bash blocks: continuation backslashes joined, comments dropped, ``a && b`` split."""
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```console")
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        pending += line.rstrip().removesuffix("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        code = re.split(r"\s#\s", " " + pending)[0].strip()
        commands += [Command(f"{_name(path)}:{start}", part.strip()) for part in code.split("&&") if part.strip()]
        pending = ""
    return commands


def _inline_commands(path: Path) -> list[Command]:
    """Inline code that is a command (``python -m wavetrain…``, ``make …``), also where it wraps a line."""
    text = path.read_text()
    commands = []
    for match in re.finditer(r"`((?:\.venv/bin/)?python -m wavetrain[^`]*|make [a-z][^`]*)`", text):
        line = text.count("\n", 0, match.start()) + 1
        command = " ".join(match.group(1).split())
        if not command.endswith(("…", "...")):  # "make bench BENCH_ARGS=…": the code block shows it whole
            commands.append(Command(f"{_name(path)}:{line}", command))
    return commands


def _header_commands(path: Path) -> list[Command]:
    """``# Label: command`` lines of a sweep file's header, with their continuation lines (indented overrides);
    a trailing ``  (annotation)`` is dropped; a command starting with ``...`` continues the ``# Run:`` command."""
    labelled: list[tuple[str, int, str]] = []
    open_command = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("#"):
            break
        body = line[1:]
        label = re.match(rf"\s*({'|'.join(HEADER_LABELS)}):\s+(.*)$", body)
        if label:
            labelled.append((label.group(1), number, _without_annotation(label.group(2))))
            open_command = True
            continue
        words = _without_annotation(body).split()
        if open_command and body.startswith("     ") and words and all("=" in w or w.startswith("-") for w in words):
            name, start, text = labelled[-1]
            labelled[-1] = (name, start, f"{text} {' '.join(words)}")
        else:
            open_command = False
    run = next((text for name, _, text in labelled if name == "Run"), "")
    return [Command(f"{_name(path)}:{number}", f"{run} {text[3:].strip()}" if text.startswith("...") else text)
            for _, number, text in labelled]


def _without_annotation(text: str) -> str:
    """A header command without its remark: from the first word in parentheses on, e.g. ``(66 jobs: ...)``."""
    words = text.split()
    return " ".join(words[:next((i for i, w in enumerate(words) if w.startswith("(")), len(words))])


def documented_commands() -> list[Command]:
    found = [c for doc in DOCS for c in _code_block_commands(doc) + _inline_commands(doc)]
    found += [c for sweep in sorted(SWEEPS_DIR.glob("*.yaml")) for c in _header_commands(sweep)]
    unique = {}
    for command in found:  # once each; `.venv/bin/python` and `python` are the same command, and a training
        # command is checked as its dry run anyway
        unique.setdefault(command.text.removeprefix(".venv/bin/").replace(" --dry-run", ""), command)
    return [c for c in unique.values() if "<" not in c.text]  # <name>: the format's template, not a command


COMMANDS = documented_commands()


def _module(command: Command) -> str:
    argv = command.argv
    if argv[0] == "make":
        return "make"
    assert argv[0].endswith("python") and argv[1] == "-m", f"{command.where}: {command.text} is no command I know"
    return argv[2]


def _commands(kind: str) -> list[Command]:
    kinds = {"train": lambda c: _module(c) == "wavetrain" and not _hydra_flags(c),
             "hydra": lambda c: _module(c) == "wavetrain" and bool(_hydra_flags(c)),
             "report": lambda c: _module(c) == "wavetrain.report",
             "make": lambda c: _module(c) == "make",
             "cli": lambda c: _module(c) not in ("make", "wavetrain", "wavetrain.report")}
    return [c for c in COMMANDS if kinds[kind](c)]


def _hydra_flags(command: Command) -> list[str]:
    return [a for a in command.argv if a.startswith("-") and a not in ("-m", "--multirun", "--dry-run")]


def _params(kind: str):
    return [pytest.param(c, id=f"{c.where} {' '.join(c.argv[2:] if _module(c) != 'make' else c.argv)}")
            for c in _commands(kind)]


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("placeholders")
    (root / "data").mkdir()
    (root / "data" / "tokenizer.json").write_text("{}")
    return {"DIR": str(root / "data"), "...": str(root / "data"), "CKPT": str(root / "last.ckpt")}


def _substitute(argv: list[str], placeholders: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        key, equals, value = arg.partition("=")
        if equals and value in placeholders:
            arg = f"{key}={placeholders[value]}"
        elif equals and value.startswith("/dir/of/"):
            arg = f"{key}={placeholders['DIR']}/{value.removeprefix('/dir/of/')}"
        elif arg in placeholders:
            arg = placeholders[arg]
        out.append(arg)
    return out


def test_the_documentation_shows_commands_of_every_kind() -> None:
    for kind in ("train", "hydra", "report", "make", "cli"):
        assert _commands(kind), f"no {kind} command found: the extraction from {[d.name for d in DOCS]} broke"
    assert any(c.where.startswith("sweeps/all_variants.yaml") for c in COMMANDS), "sweep file headers"
    assert len(_commands("train")) >= 30, [c.text for c in _commands("train")]


def _training_argv(command: Command, placeholders: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    argv = _substitute(command.argv[3:], placeholders)
    if any("../shared/" in a for a in argv) and not (REPO.parent / "shared").is_dir():
        pytest.skip(f"{command.where} reads ../shared (absent beside {REPO})")
    monkeypatch.chdir(REPO)  # documented commands run from the repository root
    return [a for a in argv if a != "--dry-run"]


@pytest.mark.parametrize("command", _params("train"))
def test_training_command_lists_its_jobs_and_its_first_job_validates(
        command: Command, placeholders: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast check: the command composes, its grid expands, its first job's config is valid (the slow test
    below validates every row, as ``--dry-run`` does)."""
    jobs = list_jobs(_training_argv(command, placeholders, monkeypatch), validate=False)
    validate_jobs(jobs[:1])


@pytest.mark.slow
@pytest.mark.parametrize("command", _params("train"))
def test_training_command_dry_runs(command: Command, placeholders: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    """Every job listed, every row composed and validated: the command line's ``--dry-run``."""
    code = dry_run([*_training_argv(command, placeholders, monkeypatch), "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, f"{command.where}: `{command.text}` is refused:\n{out.err}"
    assert "(nothing was trained)" in out.out


@pytest.mark.slow
@pytest.mark.parametrize("command", _params("hydra"))
def test_hydra_flag_command_runs(command: Command, tmp_path: Path) -> None:
    """``--help``, ``--cfg job``: Hydra's own commands, for real (they train nothing)."""
    out = subprocess.run([sys.executable, *command.argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert out.returncode == 0 and out.stdout.strip(), f"{command.where}: `{command.text}`\n{out.stderr[-3000:]}"


@pytest.mark.parametrize("command", _params("make"))
def test_make_command_dry_runs(command: Command, placeholders: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``make -n``: the target exists and expands; a python command it runs is checked like the others."""
    out = subprocess.run(["make", "-n", *command.argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{command.where}: `{command.text}`\n{out.stderr}"
    for line in out.stdout.splitlines():
        argv = shlex.split(line)
        python = [i for i, a in enumerate(argv) if a.endswith("python") or a.endswith("python3")]
        if python and argv[python[0] + 1:python[0] + 2] == ["-m"] and argv[python[0] + 2].startswith("wavetrain."):
            _parse_only(argv[python[0] + 2], _substitute(argv[python[0] + 3:], placeholders), monkeypatch)


class _Parsed(Exception):
    """Raised in place of running a command once its arguments parsed."""


def _parse_only(module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The module's own ``main(argv)`` up to its argument parser: the module imports, and its parser accepts the
    documented options and values (argparse exits with status 2 on an unknown one); nothing else runs."""
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(_Parsed) as parsed:
        importlib.import_module(module).main(argv)
    return parsed.value.args[0]


@pytest.mark.parametrize("command", _params("cli"))
def test_module_command_line_parses(command: Command, placeholders: dict[str, str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Benchmarks and checkpoint tools (minutes, or a trained checkpoint): their parsers accept the command."""
    _parse_only(_module(command), _substitute(command.argv[3:], placeholders), monkeypatch)


@pytest.fixture(scope="module")
def multirun_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in launch of every sweep the report commands name (multirun.yaml as Hydra writes it, the first job
    done), under the launch name the documentation uses."""
    root = tmp_path_factory.mktemp("reports")
    names = {_report_target(c).split("/")[1] if "/" in _report_target(c) else _report_target(c)
             for c in _commands("report")}
    for name in sorted(names):
        launch = root / "multirun" / name / LAUNCH
        (launch / "0" / ".hydra").mkdir(parents=True)
        master = list_jobs_master(name)
        OmegaConf.save(master, launch / "multirun.yaml")
        job = list_jobs([f"+sweep={name}"], validate=False)[0]
        OmegaConf.save(OmegaConf.create(job), launch / "0" / ".hydra" / "overrides.yaml")
        metric = str(master.sweep.get("metric", "val_loss"))
        (launch / "0" / "results.json").write_text(json.dumps({"status": "done", "val_loss": 2.0, metric: 2.0,
                                                               "steps": 1, "overrides": job}))
    return root


def list_jobs_master(name: str):
    from wavetrain.sweep import _compose

    return _compose((f"+sweep={name}",), with_hydra=True)


def _report_target(command: Command) -> str:
    return next(a for a in command.argv[3:] if not a.startswith("-") and a != LAUNCH[:len(a)])


@pytest.mark.slow
@pytest.mark.parametrize("command", _params("report"))
def test_report_command_runs(command: Command, multirun_root: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    from matplotlib.figure import Figure

    from wavetrain.report import main as report_main

    def save_without_rendering(self, path, *args, **kwargs) -> None:  # the figure is built, not rasterised (the
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n")  # report's own tests check its images): seconds saved
    monkeypatch.setattr(Figure, "savefig", save_without_rendering)
    monkeypatch.chdir(multirun_root)
    assert report_main(command.argv[3:]) == 0, capsys.readouterr().err
    assert "wrote " in capsys.readouterr().out
