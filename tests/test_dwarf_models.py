"""DWARF conditions in the shared shell: exact parameter counts (spec dwarf.md §1 table, T9), shells, causality."""
from __future__ import annotations

import pytest
import torch

from wavetrain import build_model, compose_config
from wavetrain.models.lm import count_parameters

# spec dwarf.md §1: exact 13M parameter counts (vocab 32000, tied head), each with the shell its config selects
PARAMS_13M = {
    "dwarf_condA": 13_326_352, "dwarf_condB": 13_326_400, "dwarf_condC": 13_326_784, "dwarf_condD": 13_326_832,
    "dwarf_condE": 14_115_344, "dwarf_condF": 14_115_344, "dwarf_condG": 14_115_728,
    "dwarf_condI": 14_117_840, "dwarf_condJ": 14_117_504, "dwarf_condK": 13_855_424,
    "dwarf_condK_rp": 14_119_616, "dwarf_condL": 13_852_736, "dwarf_condL_rp": 14_115_968,
    "dwarf_condM": 13_984_480, "dwarf_condN": 14_116_928, "dwarf_condP": 14_118_368,
}
# the standard baseline as run (spec §1): 2048 position rows, dropout on attention probabilities, none after out_proj
STANDARD_BASELINE = ["attention=standard", "attention.attn_dropout=0.1", "model.position_rows=2048",
                     "model.attn_output_dropout=false"]


@pytest.mark.parametrize("attention", sorted(PARAMS_13M))
def test_13m_parameter_counts(attention: str) -> None:
    model = build_model(compose_config([f"attention={attention}", "scale=13m"]), vocab_size=32000)
    assert count_parameters(model) == PARAMS_13M[attention]


def test_condH_parameter_count() -> None:
    # condH = condG + 2 long-skip weights per layer (spec §3.H; no count in the §1 table)
    model = build_model(compose_config(["attention=dwarf_condH", "scale=13m"]), vocab_size=32000)
    assert count_parameters(model) == PARAMS_13M["dwarf_condG"] + 6 * 2


def test_standard_baseline_13m() -> None:
    assert count_parameters(build_model(compose_config([*STANDARD_BASELINE, "scale=13m"]))) == 13_455_360


@pytest.mark.parametrize("attention,params", [("dwarf_condA", 84_487_456), ("dwarf_condB", 84_487_552),
                                              ("dwarf_condC", 84_488_320)])
def test_85m_parameter_counts(attention: str, params: int) -> None:
    cfg = compose_config([f"attention={attention}", "scale=85m"])
    assert cfg.tokenizer.vocab_size == 32000
    assert count_parameters(build_model(cfg)) == params


def test_condM_is_a_5_to_1_hybrid_with_one_pooling_unit() -> None:
    model = build_model(compose_config(["attention=dwarf_condM", "scale=13m"]), vocab_size=32000)
    kinds = [type(block.attention).__name__ for block in model.blocks]
    assert kinds == ["DwarfDyadicAttention"] * 5 + ["DwarfFullAttention"]
    assert [i for i, block in enumerate(model.blocks) if block.interference is not None] == [2]


@pytest.mark.parametrize("attention", sorted(PARAMS_13M) + ["dwarf_condH"])
def test_every_condition_is_causal_as_a_model(attention: str) -> None:
    cfg = compose_config([f"attention={attention}", "scale=tiny", "seq_len=40", "model.position_rows=null"])
    model = build_model(cfg, vocab_size=31).double().eval()
    ids = torch.randint(0, 31, (1, 40), generator=torch.Generator().manual_seed(0))
    base = model(ids)
    changed = ids.clone()
    changed[:, 25:] = (changed[:, 25:] + 7) % 31
    assert (model(changed)[:, :25] - base[:, :25]).abs().max() < 1e-9
