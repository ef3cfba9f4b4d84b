"""Bad input is refused with one line naming the key or file and the fix, before anything is written: a run
directory that holds a finished run keeps every byte (hashed before and after), a fresh one is not even created.
Checkpoints never run pickled code; config-named callables pass Hydra's target policy."""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wavetrain import compose_config
from wavetrain.__main__ import refusal_message
from wavetrain.config import ConfigError, config_callable
from wavetrain.data.sources import DataError
from wavetrain.run.checkpoint_io import (AtomicCheckpointIO, CheckpointError, StorageError, inspect_checkpoint,
                                         load_model)
from wavetrain.run.guards import NonFiniteLossError
from wavetrain.run.lock import RunDirLock
from wavetrain.run.rundir import HydraRecord
from wavetrain.train import train

TINY = ["scale=tiny", "seq_len=32", "data.batch_size=8", "data.val_windows=16", "optim.warmup_steps=2",
        "trainer.precision=32-true", "trainer.deterministic=true", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "trainer.max_steps=4", "trainer.val_check_interval=2"]
MARKER = "wavetrain-pwned"  # the file a hostile pickle or callable would create


def tree_hash(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones included) with its mode and the SHA-256 of its bytes."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): f"{p.stat().st_mode:o}:" + (hashlib.sha256(p.read_bytes()).hexdigest()
                                                                  if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


class Hostile:
    """A pickle whose loading would run a shell command (the audit's os.system payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run, with the .hydra/ files and job log the CLI writes, that every case also targets."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    cfg = compose_config(TINY)
    record = HydraRecord({"config.yaml": "seed: 1337\n", "overrides.yaml": "[]\n"}, "__main__.log")
    train(cfg, run_dir=run_dir, hydra=record)
    assert (run_dir / ".hydra" / "overrides.yaml").exists() and (run_dir / "__main__.log").exists()
    return run_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, finished_run: Path) -> dict[str, Path]:
    """Corpus files and checkpoints that the cases name as {name}."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty.txt").write_text("  \n")
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 200)
    (root / "short.txt").write_text("to be or not to be " * 3)
    (root / "rows.jsonl").write_text(json.dumps({"text": "fine " * 50}) + "\n" + json.dumps({"body": "x"}) + "\n")
    (root / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi " * 100}]}) + "\n")
    (root / "truncated.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (root / "notes.txt").write_text("a plain text file, not a checkpoint\n")
    torch.save({"state_dict": {}, "payload": Hostile(root / MARKER)}, root / "hostile.ckpt")
    (root / "hostile.pkl").write_bytes(pickle.dumps(Hostile(root / MARKER)))
    torch.save({"state_dict": {}, "global_step": 3}, root / "incomplete.ckpt")
    wide = root / "wide"  # the same tiny run with d_model 64: another architecture
    train(compose_config(TINY + ["scale.d_model=64", "trainer.max_steps=3"]), run_dir=wide)
    (root / "other_chars.txt").write_text("abcdefgh ijkl\n" * 400)  # another character vocabulary
    chars = root / "chars"
    train(compose_config(TINY + [f"data.path={root / 'other_chars.txt'}", "trainer.max_steps=3"]), run_dir=chars)
    return {**{p.name: p for p in root.iterdir() if p.is_file()},
            "wide.ckpt": wide / "checkpoints" / "last.ckpt", "chars.ckpt": chars / "checkpoints" / "last.ckpt"}


BAD_INPUTS = [  # (id, overrides, error type, the message's text) - {name}: a path from the `files` fixture
    # values out of range
    ("heads", ["scale.n_heads=3"], ConfigError,
     "scale.d_model=32 is not divisible by scale.n_heads=3: choose n_heads dividing d_model"),
    ("seq_len_zero", ["seq_len=0"], ConfigError, "seq_len=0 must be a positive integer: set seq_len to a whole"),
    ("layers", ["scale.n_layers=-1"], ConfigError, "scale.n_layers=-1 must be a positive integer"),
    ("steps", ["trainer.max_steps=0"], ConfigError, "trainer.max_steps=0 must be a positive integer"),
    ("lr", ["optim.lr=-0.001"], ConfigError, "optim.lr=-0.001 must be positive"),
    ("min_lr", ["optim.lr=0.002", "optim.min_lr=0.01"], ConfigError,
     "optim.min_lr=0.01 must lie in [0, optim.lr=0.002]: lower min_lr"),
    ("warmup", ["optim.warmup_steps=50", "trainer.max_steps=10"], ConfigError,
     "optim.warmup_steps=50 must lie in [0, trainer.max_steps=10): shorten the warmup or train longer"),
    ("batch", ["data.batch_size=0"], ConfigError, "data.batch_size=0 must be a positive integer"),
    ("logger", ["logger.kind=neptune"], ConfigError,
     "logger.kind='neptune' is unknown: use one of ['csv', 'tensorboard', 'wandb']"),
    ("val_interval", ["trainer.max_steps=10", "trainer.val_check_interval=50"], ConfigError,
     "trainer.val_check_interval=50 training batches is longer than the run"),
    ("schedule", ["optim.schedule=cosin"], ConfigError, "optim.schedule='cosin' is unknown"),
    ("seed", ["seed=-1"], ConfigError, "seed=-1 must be a non-negative integer"),
    ("betas", ["optim.betas=[0.9,1.5]"], ConfigError, "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    ("on_nonfinite", ["run.on_nonfinite=ignore"], ConfigError, "run.on_nonfinite='ignore' is unknown"),
    ("ckpt_every", ["run.checkpoint_every_n_steps=0"], ConfigError,
     "run.checkpoint_every_n_steps=0 must be a positive integer"),
    ("dropout", ["scale.dropout=1.5"], ConfigError, "scale.dropout=1.5 must be in [0, 1)"),
    ("special_tokens", ["tokenizer=bpe", "tokenizer.vocab_size=3"], ConfigError,
     "tokenizer.vocab_size=3 must exceed its 4 special tokens"),
    ("wavefield_stride", ["attention=wavefield", "attention.field_size=40"], ConfigError,
     "the model does not build with seq_len=32, attention=wavefield, scale=tiny: attention.field_size=40 breaks "
     "causality"),
    ("position_rows", ["model.position_rows=16"], ConfigError, "model.position_rows=16 is shorter than seq_len=32"),
    ("missing_path", ["data.path=/nonexistent/corpus.txt"], ConfigError,
     "data.path=/nonexistent/corpus.txt does not exist"),
    # wrong types: a string, a fraction, a boolean or a list where the default is another kind
    ("seq_len_str", ["seq_len=abc"], ConfigError, "seq_len='abc' is a string, but seq_len takes a number"),
    ("d_model_fraction", ["scale.d_model=32.5"], ConfigError, "scale.d_model=32.5 must be a positive integer"),
    ("heads_str", ["scale.n_heads=two"], ConfigError, "scale.n_heads='two' is a string, but scale.n_heads takes"),
    ("lr_str", ["optim.lr=fast"], ConfigError, "optim.lr='fast' is a string, but optim.lr takes a number"),
    ("batch_fraction", ["data.batch_size=8.5"], ConfigError, "data.batch_size=8.5 must be a positive integer"),
    ("seed_fraction", ["seed=1.5"], ConfigError, "seed=1.5 must be a non-negative integer"),
    ("steps_str", ["trainer.max_steps=many"], ConfigError, "trainer.max_steps='many' must be a positive integer"),
    ("tie_head_number", ["model.tie_head=3"], ConfigError,
     "model.tie_head=3 is a number, but model.tie_head takes a boolean (its default is true): e.g. model.tie_head=true"),
    ("test_str", ["run.test=maybe"], ConfigError, "run.test='maybe' is a string, but run.test takes a boolean"),
    ("ffn_dropout_str", ["model.ffn_dropout=hidden"], ConfigError,
     "model.ffn_dropout='hidden' is a string, but model.ffn_dropout takes a list (its default is [hidden])"),
    ("betas_number", ["optim.betas=0.9"], ConfigError, "optim.betas=0.9 is a number, but optim.betas takes a list"),
    ("gate_bias_str", ["attention=wavefield", "attention.gate_bias_init=abc"], ConfigError,
     "attention.gate_bias_init='abc' is a string, but attention.gate_bias_init takes a number"),
    ("val_interval_str", ["trainer.val_check_interval=often"], ConfigError,
     "trainer.val_check_interval='often' must be a number"),
    ("dropout_str", ["scale.dropout=some"], ConfigError, "scale.dropout='some' is a string, but scale.dropout takes"),
    # every enumerated attention / shell option with a value it does not know
    ("wda_density", ["attention=wda", "attention.density=soft"], ConfigError, "attention.density='soft' is unknown"),
    ("wda_pooling", ["attention=wda", "attention.gate_pooling=mean"], ConfigError,
     "attention.gate_pooling='mean' is unknown"),
    ("wda_estimator", ["attention=wda", "attention.st_estimator=x"], ConfigError, "attention.st_estimator='x' is "
                                                                                  "unknown"),
    ("dwarf_d4_order", ["attention=dwarf_condG", "attention.d4_order=up"], ConfigError,
     "attention.d4_order='up' is not one of ['forward', 'reversed']"),
    ("dwarf_gather", ["attention=dwarf_condG", "attention.gather=x"], ConfigError, "attention.gather='x' is not one"),
    ("dwarf_gate_source", ["attention=dwarf_condG", "attention.gate_source=x"], ConfigError,
     "attention.gate_source='x' is not one"),
    ("dwarf_oob", ["attention=dwarf_condG", "attention.oob_mode=x"], ConfigError, "attention.oob_mode='x' is not one"),
    ("dwarf_pos_bias", ["attention=dwarf_condG", "attention.pos_bias_init=x"], ConfigError,
     "attention.pos_bias_init='x' is not one"),
    ("dwarf_scale_gains", ["attention=dwarf_condG", "attention.scale_gains=x"], ConfigError,
     "attention.scale_gains='x' is not one"),
    ("dwarf_tap_set", ["attention=dwarf_condG", "attention.tap_set=x"], ConfigError, "attention.tap_set='x' is not "
                                                                                      "one"),
    ("dwarf_layout", ["attention=dwarf_condA", "attention.field_layout=x"], ConfigError,
     "attention.field_layout='x' is not one of ['stretch', 'stride1', 'reference']"),
    ("dwarf_kernel", ["attention=dwarf_condA", "attention.kernel=x"], ConfigError, "attention.kernel='x' is not one"),
    ("dwarf_field_size", ["attention=dwarf_condA", "attention.field_size=big"], ConfigError,
     "attention.field_size='big' must be an int or 'auto'"),
    ("dwarf_qkv_init", ["attention=dwarf_standard", "attention.qkv_init=x"], ConfigError,
     "attention.qkv_init='x' is unknown: use one of ['normal', 'xavier_shared']"),
    ("position", ["model.position=rotary"], ConfigError, "model.position='rotary' is not a position signal"),
    ("norm", ["model.norm=sandwich"], ConfigError, "model.norm='sandwich' is not a norm placement: use pre or post"),
    ("init", ["model.init=zeros"], ConfigError, "model.init='zeros' is not an init scheme"),
    ("ffn_sites", ["model.ffn_dropout=[everywhere]"], ConfigError, "model.ffn_dropout has unknown sites"),
    # trainer settings Lightning would refuse from inside L.Trainer
    ("devices_zero", ["trainer.devices=0"], ConfigError, "trainer.devices=0 is not a device count: give a positive"),
    ("devices_str", ["trainer.devices=many"], ConfigError, "trainer.devices='many' is not a device count"),
    ("accelerator_tpu", ["trainer.accelerator=tpu"], ConfigError,
     "trainer.accelerator=tpu, which needs a TPU (torch_xla) and this machine has none: use trainer=default"),
    ("trainer_gpu", ["trainer=gpu"], ConfigError,
     "trainer=gpu sets trainer.accelerator=gpu, which needs a CUDA GPU and this machine has none"),
    ("accelerator_unknown", ["trainer.accelerator=quantum"], ConfigError, "trainer.accelerator='quantum' is unknown"),
    ("precision", ["trainer.precision=bogus"], ConfigError, "trainer.precision='bogus' is unknown: use one of"),
    ("strategy", ["trainer.strategy=bogus"], ConfigError, "trainer.strategy='bogus': Lightning refuses this"),
    ("num_nodes", ["trainer.num_nodes=0"], ConfigError, "trainer.num_nodes=0 must be a positive integer"),
    # corpora the readers refuse
    ("empty_corpus", ["data.path={empty.txt}"], DataError, "is empty: give a file with text in it"),
    ("not_utf8", ["data.path={latin1.txt}"], DataError, "is not UTF-8 text"),
    ("short_corpus", ["data.path={short.txt}", "seq_len=128"], DataError,
     "fewer than one window of seq_len+1=129: use a longer corpus or a smaller seq_len"),
    ("jsonl_field", ["data=owt", "data.path={rows.jsonl}", "tokenizer=char"], DataError, "row 1 has no field 'text'"),
    ("packing", ["data.packing=random"], DataError, "data.packing='random' is unknown"),
    ("separator", ["data.doc_separator=nul"], DataError, "data.doc_separator='nul': use eos or none"),
    # config-named callables: Hydra's target policy
    ("formatter_system", ["data=ultrachat", "data.path={chat.jsonl}", "tokenizer=char", "data.source.formatter="
                          "os.system"], ConfigError, "data.source.formatter='os.system' is refused: Target "
                                                     "'os.system' is blocklisted"),
    ("formatter_alias", ["data=ultrachat", "data.path={chat.jsonl}", "tokenizer=char",
                         "data.source.formatter=posix.system"], ConfigError, "resolved from 'posix.system'"),
    ("formatter_subprocess", ["data=ultrachat", "data.path={chat.jsonl}", "tokenizer=char",
                              "data.source.formatter=subprocess.check_output"], ConfigError,
     "data.source.formatter='subprocess.check_output' is refused"),
    ("datamodule_popen", ["data.datamodule=subprocess.Popen"], ConfigError,
     "data.datamodule='subprocess.Popen' is refused"),
    # checkpoints: missing, damaged, hostile, of another model or vocabulary
    ("missing_ckpt", ["run.ckpt_path=/nonexistent/last.ckpt"], CheckpointError,
     "run.ckpt_path=/nonexistent/last.ckpt does not exist"),
    ("corrupt_ckpt", ["run.ckpt_path={truncated.ckpt}"], CheckpointError, "is unreadable (truncated or corrupt"),
    ("text_as_ckpt", ["run.ckpt_path={notes.txt}"], CheckpointError, "notes.txt is unreadable"),
    ("hostile_ckpt", ["run.ckpt_path={hostile.ckpt}"], CheckpointError,
     "hostile.ckpt is refused: it holds pickled Python objects (GLOBAL posix.system)"),
    ("hostile_pickle", ["run.ckpt_path={hostile.pkl}"], CheckpointError, "hostile.pkl is refused: it holds pickled"),
    ("incomplete_ckpt", ["run.ckpt_path={incomplete.ckpt}"], CheckpointError,
     "is not a complete training checkpoint (missing ['optimizer_states', 'loops'])"),
    ("other_architecture", ["run.ckpt_path={wide.ckpt}"], CheckpointError,
     "does not fit this run's model: 27 tensors of another shape (first: model.token_embedding.weight [66, 64] vs "
     "[66, 32])"),
    ("other_vocabulary", ["run.ckpt_path={chars.ckpt}"], CheckpointError,
     "does not fit this run's model: vocabulary of 15 tokens, this run's tokenizer has 66"),
    # evaluations the run could not do
    ("no_test_split", ["run.test=true"], ConfigError, "run.test=true but data=shakespeare has no test split"),
    ("epochs_stream", ["run.epochs=1"], ConfigError, "run.epochs needs a finite epoch"),
    ("passkey_chars", ["run.passkey=true"], ConfigError, "run.passkey=true: passkey candidates"),
]


FRESH_TOO = {"heads", "seq_len_str", "dwarf_gather", "precision", "jsonl_field", "formatter_system",
             "hostile_ckpt", "other_architecture", "no_test_split"}


@pytest.mark.parametrize("case,overrides,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(case, overrides, error, message, files,
                                                                      finished_run: Path, tmp_path: Path) -> None:
    for name, path in files.items():
        overrides = [o.replace(f"{{{name}}}", str(path)) for o in overrides]
    before = tree_hash(finished_run)
    cfg = compose_config(TINY + overrides)
    fresh = [tmp_path / "fresh"] if case in FRESH_TOO else []  # a new directory: one case per kind of check
    for run_dir in (*fresh, finished_run):  # and a directory holding a finished run: every case
        with pytest.raises(error) as raised:
            train(copy.deepcopy(cfg), run_dir=run_dir)
        assert message in str(raised.value), str(raised.value)
        line = refusal_message(raised.value)  # what the CLI prints: one line, no traceback
        assert line and "\n" not in line and message in line
    assert not (tmp_path / "fresh").exists()
    assert tree_hash(finished_run) == before
    assert not (files["hostile.ckpt"].parent / MARKER).exists()


def test_the_table_covers_the_audit() -> None:
    assert len(BAD_INPUTS) >= 60 and len({c[0] for c in BAD_INPUTS}) == len(BAD_INPUTS)


def test_another_runs_directory_is_refused(finished_run: Path) -> None:
    before = tree_hash(finished_run)
    with pytest.raises(ConfigError, match=r"already holds another run \(last.ckpt at step 4 was trained with "
                                          r"different settings: scale.d_model: 32 -> 64"):
        train(compose_config(TINY + ["trainer.max_steps=8", "scale.d_model=64"]), run_dir=finished_run)
    assert tree_hash(finished_run) == before


def test_a_checkpoint_from_elsewhere_never_replaces_a_run(finished_run: Path, tmp_path: Path) -> None:
    """The audit's data loss: a run.ckpt_path from another run into a directory holding a finished run trimmed its
    metrics and replaced its results before trainer.fit found out.  Now it is refused before anything is written,
    also when the checkpoint fits the model."""
    other = tmp_path / "other"
    train(compose_config(TINY + ["seed=2", "trainer.max_steps=3"]), run_dir=other)
    before = tree_hash(finished_run)
    with pytest.raises(ConfigError, match=f"hydra.run.dir={finished_run} already holds a run \\(last.ckpt, "
                                          f"best-step4.ckpt, logs/metrics.csv\\): starting it from run.ckpt_path=.* "
                                          f"would replace its checkpoints and metrics. Nothing was changed"):
        train(compose_config(TINY + ["trainer.max_steps=6", f"run.ckpt_path={other / 'checkpoints' / 'last.ckpt'}"]),
              run_dir=finished_run)
    assert tree_hash(finished_run) == before


def test_hostile_pickles_never_run(files: dict[str, Path], finished_run: Path, tmp_path: Path) -> None:
    """weights_only=True on every read: inspection, load_model, Lightning's restore, and automatic resume."""
    marker = files["hostile.ckpt"].parent / MARKER
    for path in (files["hostile.ckpt"], files["hostile.pkl"]):
        with pytest.raises(CheckpointError, match="is refused: it holds pickled Python objects"):
            inspect_checkpoint(path)
        with pytest.raises(CheckpointError, match="could not be loaded safely"):
            load_model(path)
        with pytest.raises(Exception, match="Weights only load failed"):
            AtomicCheckpointIO().load_checkpoint(path)
    run_dir = tmp_path / "run"  # a copy of a finished run whose newest checkpoint was replaced by a hostile file
    shutil.copytree(finished_run, run_dir)
    shutil.copy(files["hostile.ckpt"], run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "checkpoints" / "last.ckpt.sha256").unlink()
    with pytest.warns(UserWarning, match="last.ckpt is refused: it holds pickled Python objects .* Resuming from "
                                         "the previous good checkpoint"):
        results = train(compose_config(TINY + ["trainer.max_steps=5"]), run_dir=run_dir)
    assert results["steps"] == 5 and (run_dir / "checkpoints" / "last.ckpt.corrupt").exists()
    assert not marker.exists()


def test_config_named_callables_pass_hydras_target_policy() -> None:
    from wavetrain.data.sources import chat_segments

    assert config_callable("data.source.formatter", "wavetrain.data.sources.chat_segments").func is chat_segments
    for target in ("os.system", "posix.system", "builtins.eval", "subprocess.run", "os.remove"):
        with pytest.raises(ConfigError, match=f"data.source.formatter='{target}' is refused: Target"):
            config_callable("data.source.formatter", target)


def test_a_read_only_run_directory_is_refused_before_anything(finished_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    modes = {p: p.stat().st_mode for p in [run_dir, *run_dir.rglob("*")]}
    for path in modes:
        path.chmod(path.stat().st_mode & ~0o222)
    before = tree_hash(run_dir)
    try:
        with pytest.raises(StorageError, match=f"hydra.run.dir={run_dir} is read-only .*: make it writable "
                                               f"\\(chmod -R u\\+w {run_dir}\\) or give this run its own"):
            train(compose_config(TINY + ["trainer.max_steps=6"]), run_dir=run_dir)
        assert tree_hash(run_dir) == before
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from wavetrain.run import checkpoint_io

    written = checkpoint_io._HashingWriter.write

    def write(self, data):  # the disk fills up after the first checkpoint (step 2)
        if (tmp_path / "checkpoints" / "last.ckpt").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return written(self, data)

    monkeypatch.setattr(checkpoint_io._HashingWriter, "write", write)
    with pytest.raises(StorageError) as raised:
        train(compose_config(TINY + ["trainer.val_check_interval=4", "run.checkpoint_every_n_steps=2"]),
              run_dir=tmp_path)
    line = refusal_message(raised.value)
    assert line.startswith(f"writing checkpoint {tmp_path / 'checkpoints'}") and "no space left on the device: " \
        "free some space (or point hydra.run.dir at a larger disk) and rerun the same command to resume" in line
    assert inspect_checkpoint(tmp_path / "checkpoints" / "last.ckpt").global_step == 2
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # no partial file left behind
    assert json.loads((tmp_path / "results.json").read_text())["error"].startswith("StorageError: writing checkpoint")


def _nan_gradient_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """A finite loss whose gradient is NaN: d/dw sqrt(w - w) = inf · 0."""
    from wavetrain.lightning_module import LanguageModelTask

    original = LanguageModelTask.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if self.trainer.global_step == step:
            weight = next(self.parameters())
            loss = loss + 0.0 * torch.sqrt(weight - weight).sum()
        return loss

    monkeypatch.setattr(LanguageModelTask, "training_step", training_step)


@pytest.mark.parametrize("mode,fix", [
    ("stop", "or set run.on_nonfinite=skip to drop such steps"),
    ("skip", "0 steps were skipped already, the limit run.max_nonfinite_skips=0. Lower optim.lr"),
])
def test_a_nonfinite_gradient_is_named_as_such_with_the_fix_of_its_mode(mode: str, fix: str, tmp_path: Path,
                                                                       monkeypatch) -> None:
    _nan_gradient_at_step(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError) as raised:
        train(compose_config(TINY + [f"run.on_nonfinite={mode}", "run.max_nonfinite_skips=0"]), run_dir=tmp_path)
    message = refusal_message(raised.value)
    assert message.startswith("non-finite gradient (global norm nan) with a finite training loss ")
    assert "at step 2 (optimiser step 3 of 4)" in message and fix in message and "\n" not in message
    assert ("run.on_nonfinite=skip" in message) == (mode == "stop")  # never suggested while skipping already


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wavetrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


@pytest.mark.slow
def test_cli_refusals_print_one_line_and_leave_the_run_directory_as_it_was(files: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """The audit's CLI cases: Hydra's .hydra/*.yaml and job log, and the failure record, are written only by a run
    that passed its checks; a refusal is one line (HYDRA_FULL_ERROR=1 shows the traceback)."""
    first = _cli(TINY + ["hydra.run.dir=runs/a"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "a"
    assert {".hydra", "results.json", "checkpoints", "logs"} <= {p.name for p in run_dir.iterdir()}
    assert [p.suffix for p in run_dir.iterdir()].count(".log") == 1  # the job log, <hydra.job.name>.log
    assert "seed: 1337" in (run_dir / ".hydra" / "config.yaml").read_text()
    before = tree_hash(run_dir)
    foreign = os.path.relpath(files["wide.ckpt"], tmp_path)  # relative to where the command runs, not the job dir
    for extra, expected in [(["seed=7"], "already holds another run (last.ckpt at step 4 was trained with different "
                                         "settings: seed: 1337 -> 7). Nothing was changed"),
                            ([f"run.ckpt_path={foreign}"], f"run.ckpt_path={files['wide.ckpt']} does not fit this "
                                                            f"run's model")]:
        out = _cli(TINY + extra + ["hydra.run.dir=runs/a"], tmp_path)
        assert out.returncode == 1 and "Traceback" not in out.stderr and "Error executing job" not in out.stderr
        (line,) = [line for line in out.stderr.splitlines() if line.startswith("wavetrain")]
        assert line.startswith("wavetrain: ") and expected in line, out.stderr[-2000:]
    holder = RunDirLock(run_dir)
    holder.acquire()  # a live run holds the directory
    try:
        out = _cli(TINY + ["seed=7", "hydra.run.dir=runs/a"], tmp_path)
    finally:
        holder.release()
    assert out.returncode == 1 and f"is in use by another wavetrain run (pid {os.getpid()} on " in out.stderr
    out = _cli(TINY + ["scale.n_heads=3", "hydra.run.dir=runs/a"], tmp_path, HYDRA_FULL_ERROR="1")
    assert out.returncode == 1 and "Traceback" in out.stderr and "is not divisible by scale.n_heads=3" in out.stderr
    assert tree_hash(run_dir) == before
