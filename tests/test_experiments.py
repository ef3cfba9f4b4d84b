"""The experiment group (conf/experiment/*): every published protocol composes to the values its spec section states,
each sweep file is its experiment plus a grid (no protocol setting written twice), and the published defaults
(Wave Field G = 1024 where causal, DWARF condA–D G = 4096 in the DWARF tables)."""
from __future__ import annotations

import logging

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from wavetrain import build_attention, build_model, compose_config
from wavetrain.config import ConfigError, check_cli_overrides, group_choices
from wavetrain.models.attention.wavefield import WaveFieldAttention
from wavetrain.models.lm import count_parameters
from wavetrain.sweep import SWEEPS_DIR, list_jobs, sweep_names

EXPERIMENTS = ["dwarf_13m", "dwarf_13m_ad", "dwarf_85m", "mqar", "wavefield_wt2", "wavefield_wt2_bpe8k", "wda_130m",
               "wda_ablation"]


def _optim(cfg) -> tuple:
    o = cfg.optim
    return (o.lr, o.min_lr, tuple(o.betas), o.eps, o.weight_decay, o.decay_all, o.schedule, o.grad_clip)


def _shape(cfg) -> tuple:
    return cfg.scale.d_model, cfg.scale.n_layers, cfg.scale.n_heads, cfg.scale.ffn_dim


def test_the_group_holds_one_file_per_published_protocol() -> None:
    assert group_choices("experiment") == EXPERIMENTS
    for name in EXPERIMENTS:
        cfg = compose_config([f"experiment={name}"])
        assert cfg.protocol.name == name and cfg.protocol.source and cfg.run.choices["experiment"] == name


def test_dwarf_13m_is_protocol_2() -> None:
    """spec dwarf.md §1, §2: OpenWebText 100k docs 95/2.5/2.5 streamed with </s>, BPE 32k <s>/</s> on 50k docs,
    N = 2047, micro-batch 8 × 4, AdamW 3e-4 (0.9, 0.95) wd 0.1 on all, cosine to 0 without warmup, clip 1.0, 10
    epochs, test at the best-validation checkpoint, fp16."""
    cfg = compose_config(["experiment=dwarf_13m", "attention=dwarf_condK"])
    assert cfg.run.choices["attention"] == "dwarf_condK", "the command line picks the condition"
    assert compose_config(["experiment=dwarf_13m"]).run.choices["attention"] == "dwarf_standard"
    source = cfg.data.source
    assert (cfg.data.name, cfg.data.packing, cfg.data.doc_separator, source.max_docs, dict(source.carve)) == (
        "owt", "sequential", "eos", 100_000, {"train": 0.95, "validation": 0.025, "test": 0.025})
    assert (cfg.tokenizer.kind, cfg.tokenizer.vocab_size, list(cfg.tokenizer.special_tokens),
            cfg.tokenizer.train_docs) == ("bpe", 32000, ["<pad>", "<unk>", "<s>", "</s>"], 50_000)
    assert cfg.seq_len == 2047 and _shape(cfg) == (256, 6, 8, 1024) and cfg.scale.dropout == 0.1
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (8, 4)
    assert _optim(cfg) == (3e-4, 0.0, (0.9, 0.95), 1e-8, 0.1, True, "cosine", 1.0) and cfg.optim.warmup_steps == 0
    assert (cfg.run.epochs, cfg.run.test, cfg.trainer.precision) == (10, True, "16-mixed")
    assert count_parameters(build_model(cfg)) == 13_855_424  # condK as run (spec §1 table)
    assert count_parameters(build_model(compose_config(["experiment=dwarf_13m"]))) == 13_455_360  # the baseline


@pytest.mark.parametrize("condition", ["dwarf_condA", "dwarf_condB", "dwarf_condC", "dwarf_condD"])
def test_dwarf_tables_run_conditions_a_to_d_at_the_published_field(condition: str) -> None:
    """spec dwarf.md §3.A–D, §1 (85M): G = 4096 in every DWARF table, also at the §2 table's N = 2047, where the
    condition's own auto rule (2·seq_len) would give 4094."""
    for experiment in ("dwarf_13m", "dwarf_13m_ad", "dwarf_85m"):
        cfg = compose_config([f"experiment={experiment}", f"attention={condition}"])
        assert cfg.attention.field_size == 4096, experiment
    module = build_attention(compose_config(["experiment=dwarf_13m", f"attention={condition}"]))
    assert module.field_size == 4096 and module.seq_len == 2047
    assert compose_config([f"attention={condition}"]).attention.field_size == "auto", "outside the DWARF tables"


def test_dwarf_13m_ad_is_protocol_2a() -> None:
    """spec dwarf.md §1.A, §2.A: per-document windows of up to 2049 tokens (strip, > 50 chars, int(0.95n) /
    int(0.975n)), BPE 32k <bos>/<eos>, 8 × 4, AdamW 3e-4, WarmupCosineScheduler(spe, 10·spe, 1e-5) counted in
    micro-batches, clip 1.0, 10 epochs."""
    cfg = compose_config(["experiment=dwarf_13m_ad"])
    source = cfg.data.source
    assert cfg.run.choices["attention"] == "dwarf_condA"
    assert (cfg.data.name, cfg.data.packing, cfg.data.doc_separator, source.strip, source.min_chars,
            source.carve_edges, source.max_docs) == ("owt_docs", "documents", "none", True, 50, "floor", 100_000)
    assert list(cfg.tokenizer.special_tokens) == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert (cfg.tokenizer.vocab_size, cfg.tokenizer.train_docs) == (32000, 50_000)
    assert cfg.seq_len == 2048 and _shape(cfg) == (256, 6, 8, 1024)
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (8, 4)
    assert _optim(cfg) == (3e-4, 1e-5, (0.9, 0.95), 1e-8, 0.1, True, "warmup_cosine", 1.0)
    assert (cfg.optim.warmup_epochs, cfg.optim.schedule_epochs, cfg.optim.epoch_steps) == (1, 10, "micro_batches")
    assert (cfg.run.epochs, cfg.run.test, cfg.trainer.precision) == (10, True, "16-mixed")
    assert cfg.model.position == "none"  # the §1.A shell
    assert count_parameters(build_model(cfg)) == 13_326_352  # condA as run (spec §1 table)


def test_dwarf_85m_is_protocol_2a_at_85m() -> None:
    """spec dwarf.md §1 "85M configs": d 640, 12 layers, 8 heads, FFN 2560, G = 4096, batch 32 × 4, §2.A."""
    cfg = compose_config(["experiment=dwarf_85m", "attention=dwarf_condB"])
    ad = compose_config(["experiment=dwarf_13m_ad", "attention=dwarf_condB"])
    assert _shape(cfg) == (640, 12, 8, 2560) and cfg.scale.dropout == 0.1
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (32, 4)
    for key in ("data.name", "data.packing", "tokenizer", "seq_len", "optim", "run.epochs", "run.test",
                "trainer.precision", "attention"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(ad, key), key
    attention = build_attention(cfg)
    assert attention.field_size == 4096 and sum(p.numel() for p in attention.parameters()) == (
        640 * 1920 + 1920 + 2 * (640 * 640 + 640) + 8 * 4 + 64)  # qkv, out, gate, ω α φ β, coupling


def test_wda_130m_is_the_published_recipe() -> None:
    """spec wda.md §3–§5: 131,508,032 parameters, GPT-2 BPE, seq 256, C4 → UltraChat, batch 32, AdamW 2e-4 wd 1e-4
    on all, warmup 500 then constant, clip 0.5, 11,500 steps, validation every 100 steps on 30 × 32 windows."""
    cfg = compose_config(["experiment=wda_130m"])
    assert cfg.run.choices["attention"] == "wda" and cfg.data.name == "c4_ultrachat"
    assert (cfg.tokenizer.kind, cfg.tokenizer.vocab_size, cfg.seq_len) == ("gpt2", 50257, 256)
    assert _shape(cfg) == (768, 8, 4, 3072) and cfg.scale.dropout == 0.0
    attention = cfg.attention
    assert (attention.num_masks, attention.num_waves_per_mask, attention.topk_masks, attention.content_mix,
            attention.learned_content, attention.use_sin_waves) == (16, 8, 8, 0.15, True, False)
    assert (cfg.data.batch_size, cfg.data.val_windows, cfg.data.phase_a_steps) == (32, 960, 1500)
    assert _optim(cfg) == (2e-4, 2e-5, (0.9, 0.999), 1e-8, 1e-4, True, "warmup_constant", 0.5)
    assert (cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.trainer.val_check_interval, cfg.seed) == (
        500, 11500, 100, 42)
    with torch.device("meta"):
        assert count_parameters(build_model(cfg)) == 131_508_032


@pytest.mark.parametrize("knob,key,value", [("masks8", "attention.num_masks", 8), ("waves2",
                         "attention.num_waves_per_mask", 2), ("topk4", "attention.topk_masks", 4),
                         ("density_raw", "attention.density", "raw"), ("ffn2x", "scale.ffn_dim", 1536)])
def test_wda_ablation_changes_one_knob_of_the_130m_protocol(knob: str, key: str, value) -> None:
    """spec wda.md §6: the 130M configuration with one knob changed per ablation."""
    base = compose_config(["experiment=wda_130m"])
    cfg = compose_config(["experiment=wda_ablation", f"wda_ablation={knob}"])
    assert OmegaConf.select(cfg, key) == value and OmegaConf.select(base, key) != value
    differing = [k for k in ("data", "tokenizer", "seq_len", "optim", "trainer", "seed", "scale", "attention")
                 if OmegaConf.select(cfg, k) != OmegaConf.select(base, k)]
    assert differing == [key.split(".")[0]]
    assert OmegaConf.to_container(compose_config(["experiment=wda_ablation"]).attention) == \
        OmegaConf.to_container(base.attention), "the baseline knob is the 130M model"


@pytest.mark.parametrize("experiment,tokenizer,vocab,seq_len,stride,params", [
    ("wavefield_wt2", "wordchar1024", 1024, 128, 1023 / 128, 5_989_522),
    ("wavefield_wt2_bpe8k", "bpe8k", 8000, 256, 1023 / 256, 7_775_378)])
def test_wavefield_wikitext2_protocols(experiment: str, tokenizer: str, vocab: int, seq_len: int, stride: float,
                                       params: int) -> None:
    """spec wavefield.md §3, §4, §8: WikiText-2 raw, T = 128 (1024-id words-first) or 256 (BPE-8K), M = T + 1, G =
    1024, batch 32, AdamW 3e-4 (0.9, 0.999) wd 0.01 on all, 3 warmup epochs then cosine to 1e-5, clip 0.5, 30
    epochs, validation every 5, NaN batches skipped, test on the best checkpoint."""
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.data.name == "wikitext2" and cfg.data.source.hub_config == "wikitext-2-raw-v1"
    assert (cfg.run.choices["tokenizer"], cfg.tokenizer.vocab_size, cfg.seq_len, cfg.model.position_rows) == (
        tokenizer, vocab, seq_len, seq_len + 1)
    assert _shape(cfg) == (256, 6, 8, 1024) and cfg.scale.dropout == 0.1 and cfg.data.batch_size == 32
    assert _optim(cfg) == (3e-4, 1e-5, (0.9, 0.999), 1e-8, 0.01, True, "warmup_cosine", 0.5)
    assert (cfg.optim.warmup_epochs, cfg.run.epochs, cfg.run.test, cfg.run.on_nonfinite) == (3, 30, True, "skip")
    assert cfg.trainer.val_check_interval * 30 == pytest.approx(5)
    model = build_model(cfg)
    attention = model.blocks[0].attention
    assert (attention.field_size, attention.field_stride) == (1024, stride) and count_parameters(model) == params
    baseline = compose_config([f"experiment={experiment}", "attention=standard_encoder"])
    assert count_parameters(build_model(baseline)) == {128: 5_034_240, 256: 6_852_864}[seq_len]


def test_mqar_experiment_picks_the_checkpoint_on_accuracy() -> None:
    cfg = compose_config(["experiment=mqar"])
    assert (cfg.data.name, cfg.data.vocab_size, cfg.data.batch_size, cfg.seq_len, cfg.data.num_kv_pairs) == (
        "mqar", 32, 64, 64, 4)
    assert _shape(cfg) == (64, 2, 2, 256)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.weight_decay, cfg.trainer.max_steps) == (
        1e-3, "warmup_constant", 0.0, 600)
    assert (cfg.run.checkpoint_metric, cfg.run.checkpoint_mode) == ("val/acc", "max")
    assert compose_config([]).run.checkpoint_metric == "val/loss"


def test_wavefield_default_is_the_published_field_where_causal(caplog: pytest.LogCaptureFixture) -> None:
    """spec wavefield.md §3, §7: attention=wavefield builds G = 1024 wherever that layout is causal (every seq_len up
    to 513) and the smallest causal field otherwise, saying so once per model (not per layer)."""
    assert build_attention(compose_config(["attention=wavefield", "scale=6m"])).field_size == 1024
    assert build_attention(compose_config(["attention=wavefield", "seq_len=513"])).field_size == 1024
    with caplog.at_level(logging.INFO, logger="wavetrain.models.attention.wavefield"):
        model = build_model(compose_config(["attention=wavefield", "scale=tiny", "scale.n_layers=3",
                                            "seq_len=2048"]), vocab_size=20)
    sizes = {m.field_size for m in model.modules() if isinstance(m, WaveFieldAttention)}
    assert sizes == {2049}
    said = [r.getMessage() for r in caplog.records if "published field G = 1024" in r.getMessage()]
    assert len(said) == 1 and "seq_len = 2048" in said[0] and "G = 2049" in said[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wavetrain.models.attention.wavefield"):
        build_attention(compose_config(["attention=wavefield", "seq_len=128"]))
        assert build_attention(compose_config(["attention=wavefield", "attention.field_size=auto"])).field_size == 129
    assert not caplog.records, "nothing to say where the published field is used or another is asked for"
    with pytest.raises(InstantiationException, match="field_size=1024 breaks causality"):  # an explicit G is strict
        build_attention(compose_config(["attention=wavefield", "attention.field_size=1024", "seq_len=2048"]))


def test_cli_precheck_knows_the_experiment_group() -> None:
    check_cli_overrides(["experiment=dwarf_13m", "attention=dwarf_condK", "dwarf_field_size=4096"])
    check_cli_overrides(["experiment=wda_ablation", "wda_ablation=topk4", "attention.topk_masks=2"])
    with pytest.raises(ConfigError, match="experiment=dwarf_13 is not an option.*did you mean experiment=dwarf_13m"):
        check_cli_overrides(["experiment=dwarf_13"])
    with pytest.raises(ConfigError, match="wda_ablation=topk5 is not an option.*did you mean wda_ablation=topk4"):
        check_cli_overrides(["experiment=wda_ablation", "wda_ablation=topk5"])
    with pytest.raises(ConfigError, match="the config has no key protocol.nam "):
        check_cli_overrides(["experiment=mqar", "protocol.nam=x"])


SWEEP_EXPERIMENTS = {"dwarf_13m": "dwarf_13m", "dwarf_13m_ad": "dwarf_13m_ad", "dwarf_85m": "dwarf_85m",
                     "dwarf_passkey": "dwarf_13m", "mqar": "mqar", "wavefield_wikitext2": "wavefield_wt2",
                     "wda_130m": "wda_130m", "wda_ablations": "wda_ablation"}
SWEEP_ONLY_KEYS = {"defaults", "sweep", "logger", "hydra", "reference"}


@pytest.mark.parametrize("name", sorted(SWEEP_EXPERIMENTS))
def test_sweep_file_is_its_experiment_plus_the_grid(name: str) -> None:
    raw = OmegaConf.load(SWEEPS_DIR / f"{name}.yaml")
    overrides = [entry for entry in raw.defaults if "override /experiment" in str(entry)]
    assert overrides == [{"override /experiment": SWEEP_EXPERIMENTS[name]}], "the protocol comes from its experiment"
    extra = set(raw.keys()) - SWEEP_ONLY_KEYS
    assert extra <= {"run"} and set((raw.get("run") or {}).keys()) <= {"passkey"}, \
        f"sweeps/{name}.yaml repeats protocol settings {sorted(extra)}: they belong in conf/experiment/"
    jobs = list_jobs([f"+sweep={name}"], validate=False)
    first = compose_config(jobs[0])
    experiment = dict(o.split("=", 1) for o in jobs[0]).get("experiment", SWEEP_EXPERIMENTS[name])
    assert first.protocol.name == experiment
    alone = compose_config([f"experiment={experiment}", *[o for o in jobs[0] if not o.startswith("+sweep")]])
    for key in ("data", "tokenizer", "seq_len", "scale", "optim", "model", "run.epochs", "trainer.max_steps"):
        assert OmegaConf.select(first, key) == OmegaConf.select(alone, key), f"{name}: {key}"


def test_every_sweep_with_published_values_runs_a_protocol() -> None:
    for name in sweep_names():
        raw = OmegaConf.load(SWEEPS_DIR / f"{name}.yaml")
        if raw.get("reference"):
            assert name in SWEEP_EXPERIMENTS, f"sweeps/{name}.yaml has published values but no experiment"


@pytest.fixture(scope="module")
def tiny_mqar_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A few steps of experiment=mqar (best checkpoint on accuracy) with a test split: its results.json."""
    from wavetrain.train import train

    run_dir = tmp_path_factory.mktemp("mqar") / "run"
    cfg = compose_config(["experiment=mqar", "seq_len=32", "data.num_kv_pairs=2", "data.train_examples=256",
                          "data.val_examples=32", "data.test_examples=32", "run.test=true", "trainer.max_steps=6",
                          "trainer.val_check_interval=2", "optim.warmup_steps=1"])
    results = train(cfg, run_dir=run_dir)
    return {"results": results, "run_dir": run_dir}


@pytest.mark.slow
def test_checkpoint_metric_picks_the_best_checkpoint_on_accuracy(tiny_mqar_run: dict) -> None:
    import csv

    results = tiny_mqar_run["results"]
    assert results["checkpoint_metric"] == "val/acc" and "best_val_loss" not in results
    with open(tiny_mqar_run["run_dir"] / "logs" / "metrics.csv", newline="") as handle:
        accuracies = [float(r["val/acc"]) for r in csv.DictReader(handle) if r.get("val/acc")]
    assert len(accuracies) == 3 and results["best_val_acc"] == pytest.approx(max(accuracies))


@pytest.mark.slow
def test_every_report_key_of_every_sweep_is_a_results_key(tiny_mqar_run: dict) -> None:
    """sweep.metric, sweep.columns and every reference metric name a results.json key (an empty column otherwise)."""
    produced = set(tiny_mqar_run["results"])
    assert {"val_loss", "val_acc", "test_ppl_batch_mean", "test_acc", "best_val_acc", "n_parameters"} <= produced
    known = produced | {"best_val_loss"}  # run.checkpoint_metric=val/loss (the default) writes best_val_loss
    known |= {"passkey_acc", "passkey_baseline", "passkey_distances"}  # run.passkey (wavetrain/eval/passkey.py)
    for name in sweep_names():
        raw = OmegaConf.load(SWEEPS_DIR / f"{name}.yaml")
        keys = {raw.sweep.metric, *(raw.sweep.get("columns") or []), *(r.metric for r in raw.get("reference") or [])}
        assert keys <= known, f"sweeps/{name}.yaml names {sorted(keys - known)}, which no results.json holds"


def test_help_names_the_experiment_group_and_its_usage() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "wavetrain", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "experiment=<protocol>" in out.stdout
    assert "experiment: " + ", ".join(EXPERIMENTS) in out.stdout
