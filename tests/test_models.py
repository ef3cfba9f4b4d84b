"""The model shell and the standard attention: shapes, causality, the SDPA path against the naive form."""
from __future__ import annotations

import pytest
import torch

from causality import assert_causal
from wavetrain import build_attention, build_model, compose_config
from wavetrain.models.attention.standard import CausalSelfAttention, causal_attention_reference
from wavetrain.models.interference import CumulativeMeanPooling
from wavetrain.models.lm import count_parameters, sinusoidal_table


def test_sdpa_equals_naive_reference_with_gradients() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(dim=32, n_heads=4, seq_len=40).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    fast, naive = attn(x), causal_attention_reference(attn, x)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-12)
    g_fast = torch.autograd.grad(fast.square().sum(), x)[0]
    g_naive = torch.autograd.grad(naive.square().sum(), x)[0]
    torch.testing.assert_close(g_fast, g_naive, rtol=1e-10, atol=1e-12)


def test_standard_attention_is_causal() -> None:
    assert_causal(CausalSelfAttention(dim=32, n_heads=4, seq_len=64), n=64, dim=32)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_standard_model_is_causal_in_logits(norm: str) -> None:
    cfg = compose_config(["scale=tiny", "seq_len=48", f"model.norm={norm}",
                          "model.interference={_target_: wavetrain.models.interference.CumulativeMeanPooling,"
                          " blocks: [1], site: after_attention}"])
    model = build_model(cfg, vocab_size=37).double().eval()
    ids = torch.randint(0, 37, (2, 48), generator=torch.Generator().manual_seed(0))
    base = model(ids)
    for j in (5, 20, 47):
        changed = ids.clone()
        changed[:, j:] = (changed[:, j:] + 11) % 37
        assert (model(changed)[:, :j] - base[:, :j]).abs().max() < 1e-12
        assert (model(changed)[:, j] - base[:, j]).abs().max() > 1e-6  # the change itself is seen


def test_build_model_shapes_and_tied_head() -> None:
    cfg = compose_config(["scale=tiny", "seq_len=32"])
    model = build_model(cfg, vocab_size=100)
    assert model(torch.randint(0, 100, (3, 32))).shape == (3, 32, 100)
    assert model.head.weight is model.token_embedding.weight
    untied = build_model(compose_config(["scale=tiny", "seq_len=32", "model.tie_head=false"]), vocab_size=100)
    assert count_parameters(untied) == count_parameters(model) + 100 * 32


def test_gpt2_style_parameter_count() -> None:
    # V·D + rows·D + L·(12D² + 13D) + 2D (final LN) for the pre-norm GPT-2 block with biases
    cfg = compose_config(["scale=tiny", "seq_len=64"])
    d, layers, ffn = cfg.scale.d_model, cfg.scale.n_layers, cfg.scale.ffn_dim
    expected = 50 * d + 64 * d + layers * (4 * d * d + 4 * d + 2 * d * ffn + ffn + d + 4 * d) + 2 * d
    assert count_parameters(build_model(cfg, vocab_size=50)) == expected


def test_learned_positions_reject_longer_inputs() -> None:
    model = build_model(compose_config(["scale=tiny", "seq_len=16"]), vocab_size=10)
    with pytest.raises(ValueError, match="longer than the 16 learned positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_sinusoidal_table_matches_formula() -> None:
    table = sinusoidal_table(10, 8)
    assert table[3, 2] == pytest.approx(torch.sin(torch.tensor(3 * 10000 ** (-2 / 8))).item(), abs=1e-6)
    assert table[3, 3] == pytest.approx(torch.cos(torch.tensor(3 * 10000 ** (-2 / 8))).item(), abs=1e-6)


def test_normal_init_and_post_init_hook() -> None:
    cfg = compose_config(["scale=tiny", "seq_len=16"])
    model = build_model(cfg, vocab_size=10)
    qkv = model.blocks[0].attention.qkv
    assert qkv.bias.abs().max() == 0 and 0.015 < qkv.weight.std() < 0.025


def test_cumulative_mean_pooling_is_causal() -> None:
    assert_causal(CumulativeMeanPooling(dim=16), n=30, dim=16)


def test_build_attention_uses_scale() -> None:
    cfg = compose_config(["scale=tiny", "seq_len=20"])
    attn = build_attention(cfg)
    assert attn(torch.randn(1, 20, cfg.scale.d_model)).shape == (1, 20, cfg.scale.d_model)
    assert build_attention(cfg, dim=64)(torch.randn(1, 20, 64)).shape == (1, 20, 64)


def test_interference_that_places_no_module_warns() -> None:
    # condK_rp pools in blocks 2 and 5 (interval 3): a 2-layer model has neither, so the run equals condK.
    cfg = compose_config(["attention=dwarf_condK_rp", "scale=tiny", "seq_len=32"])
    with pytest.warns(UserWarning, match="no module in a 2-layer model.*scale.n_layers >= 3"):
        model = build_model(cfg, vocab_size=40)
    assert all(block.interference is None for block in model.blocks)
    placed = build_model(compose_config(["attention=dwarf_condK_rp", "scale=tiny", "scale.n_layers=3",
                                         "seq_len=32"]), vocab_size=40)
    assert [block.interference is not None for block in placed.blocks] == [False, False, True]
