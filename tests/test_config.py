"""Config composition: every option of every group composes, builds, and bad choices fail clearly."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.errors import HydraException

from wavetrain import build_attention, build_model, compose_config
from wavetrain.config import GROUPS, group_choices

NON_ATTENTION = [g for g in GROUPS if g != "attention"]


@pytest.mark.parametrize("group", NON_ATTENTION)
def test_every_group_option_composes(group: str) -> None:
    choices = group_choices(group)
    assert choices, f"conf/{group} has no options"
    for choice in choices:
        cfg = compose_config([f"{group}={choice}"])
        assert cfg.run.choices[group] == choice


@pytest.mark.parametrize("attention", group_choices("attention"))
def test_every_attention_builds_at_tiny_scale_and_odd_length(attention: str) -> None:
    cfg = compose_config([f"attention={attention}", "scale=tiny", "seq_len=96"])
    model = build_model(cfg, vocab_size=50)
    ids = torch.randint(0, 50, (2, 96))
    assert model(ids).shape == (2, 96, 50)
    attn = build_attention(cfg)
    assert attn(torch.randn(2, 96, cfg.scale.d_model)).shape == (2, 96, cfg.scale.d_model)


def test_default_config_contract() -> None:
    cfg = compose_config([])
    assert cfg.run.choices == {"attention": "standard", "scale": "small", "data": "shakespeare",
                               "tokenizer": "char", "optim": "adamw", "trainer": "default", "logger": "csv",
                               "experiment": None}
    assert {"seed", "seq_len"} <= set(cfg.keys())
    for key in ("d_model", "n_layers", "n_heads", "ffn_dim", "dropout"):
        assert key in cfg.scale
    for key in ("lr", "min_lr", "betas", "weight_decay", "warmup_steps", "grad_clip"):
        assert key in cfg.optim
    assert {"batch_size", "path"} <= set(cfg.data.keys())
    assert cfg.trainer.precision == "bf16-mixed"


def test_13m_preset_declares_bpe_32k() -> None:
    cfg = compose_config(["scale=13m"])
    assert (cfg.scale.d_model, cfg.scale.n_layers, cfg.scale.n_heads, cfg.scale.ffn_dim) == (256, 6, 8, 1024)
    assert cfg.tokenizer.kind == "bpe" and cfg.tokenizer.vocab_size == 32000
    model = build_model(cfg)
    assert model.head.weight.shape == (32000, 256)


def test_unknown_choice_names_the_valid_ones() -> None:
    with pytest.raises(HydraException) as err:
        compose_config(["attention=nonexistent"])
    assert "standard" in str(err.value)


def test_char_tokenizer_needs_vocab_from_corpus() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(compose_config(["scale=tiny"]))


def test_cli_help_lists_groups() -> None:
    out = subprocess.run([sys.executable, "-m", "wavetrain", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wavetrain: train and compare wave-based alternatives" in out.stdout
    for group in GROUPS:
        assert f"{group}:" in out.stdout
    assert "standard" in out.stdout and "shakespeare" in out.stdout


def _build_attention_on_meta(cfg) -> torch.nn.Module:
    """The attention module on the meta device (shapes, no memory, no init), or on the CPU where construction
    reads tensor values (Wave Field's field layout, DWARF's offsets), as wavetrain.config.check_model_builds does."""
    try:
        with torch.device("meta"):
            return build_attention(cfg)
    except Exception as error:  # hydra's InstantiationException wraps the meta-device error
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if "meta" not in str(cause) and not isinstance(cause, NotImplementedError):
            raise
        return build_attention(cfg)


@pytest.mark.parametrize("scale", group_choices("scale"))
def test_every_attention_builds_at_every_scale(scale: str) -> None:
    """Construction at every preset (the forward pass is checked at tiny scale above and in each mechanism's tests)."""
    for attention in group_choices("attention"):
        cfg = compose_config([f"attention={attention}", f"scale={scale}"])
        attn = _build_attention_on_meta(cfg)
        parameters = list(attn.parameters())
        assert parameters and sum(p.numel() for p in parameters) > 0, attention
        assert any(cfg.scale.d_model in p.shape for p in parameters), f"{attention}: no weight of width d_model"


SUBQUADRATIC = ["wavefield", "wda", "dwarf_condA", "dwarf_condE", "dwarf_condK", "dwarf_condN"]


@pytest.mark.parametrize("attention", SUBQUADRATIC)
def test_subquadratic_attentions_build_at_16k_context(attention: str) -> None:
    """A one-block tiny model built for, and run on, a 16,384-token context (fp32 CPU, a second or two)."""
    overrides = [f"attention={attention}", "scale=tiny", "scale.n_layers=1", "seq_len=16384"]
    if attention == "wda":
        overrides.append("attention.gate_pooling=prefix_mixdens")  # the O(M·N log N) mode for long contexts
    cfg = compose_config(overrides)
    model = build_model(cfg, vocab_size=20)
    with torch.no_grad():
        logits = model(torch.randint(0, 20, (1, 16384)))
    assert logits.shape == (1, 16384, 20) and torch.isfinite(logits).all()
