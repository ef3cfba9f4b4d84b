"""model.compile and the GPU execution path, checked on the CPU (issue 15).

- Compiled attention modules (``fullgraph=True``: a graph break anywhere in the forward or the traced backward
  fails the test) give the eager outputs and gradients, and stay causal.  Traced with the ``aot_eager`` backend:
  the same Dynamo + AOTAutograd graphs as inductor, without the code generation that takes a minute per module on
  this CPU (inductor itself is exercised by the CUDA tests, tests/test_cuda.py).
- ``compile_blocks`` compiles in place: the state_dict keys stay those of the eager model, and identical blocks
  share one compiled graph.
- The one-launch-per-op execution path that GPUs take (``field_ops.batched_execution``) equals the naive references.
"""
from __future__ import annotations

import pytest
import torch
from causality import max_future_influence

from wavetrain import build_model, compose_config
from wavetrain.lightning_module import fused_adamw
from wavetrain.models import lm
from wavetrain.models.attention import wda
from wavetrain.models.attention.wda import wda_reference
from wavetrain.models.field_ops import (batched_execution, bilinear_conv_gather, bilinear_gather_rows,
                                        bilinear_positions, bilinear_scatter_rows, cache_blocked,
                                        causal_conv_reference)
from wavetrain.models.lm import build_attention, check_compile_setting, compile_blocks, compile_enabled

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_SHAPE = ["seq_len=16", "scale.d_model=16", "scale.n_heads=2", "scale.n_layers=2", "scale.ffn_dim=32"]
COMPILED_VARIANTS = [("standard", []), ("wavefield", []), ("wda", ["attention.gate_pooling=prefix_mixdens"]),
                     ("wda", []), ("dwarf_condK", [])]


def _attention(name: str, extra: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_attention(compose_config([f"attention={name}", *TINY_SHAPE, *extra])).double()


def _outputs_and_grads(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    y = module(x)
    probe = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    leaves = [x, *(p for p in module.parameters() if p.requires_grad)]
    grads = torch.autograd.grad((y * probe).sum(), leaves, allow_unused=True)
    return y.detach(), [g for g in grads if g is not None]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name, extra", COMPILED_VARIANTS, ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_compiled_attention_has_no_graph_break_and_equals_eager(name: str, extra: list[str]) -> None:
    module = _attention(name, extra)
    x = torch.randn(2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y_eager, grads_eager = _outputs_and_grads(module, x)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=False)
    y, grads = _outputs_and_grads(compiled, x)
    torch.testing.assert_close(y, y_eager, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(grads_eager)
    for got, expected in zip(grads, grads_eager):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, extra", [("wavefield", []), ("wda", ["attention.gate_pooling=prefix_mixdens"])],
                         ids=["wavefield", "wda-prefix_mixdens"])
def test_compiled_attention_is_causal(name: str, extra: list[str]) -> None:
    compiled = torch.compile(_attention(name, extra), backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert max_future_influence(compiled, x, positions=[1, 5, 11, 15]) < 1e-12


def test_compile_blocks_in_place_keeps_keys_shares_one_graph_and_equals_eager() -> None:
    cfg = compose_config(["attention=wavefield", *TINY_SHAPE, "scale.n_layers=3", "scale.dropout=0.0",
                          "model.interference=null"])  # blocks with an interference module compile their own graph
    torch.manual_seed(0)
    eager = build_model(cfg, vocab_size=11).double()
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=11).double()
    keys = list(model.state_dict())
    compile_blocks(model, backend="aot_eager")
    assert list(model.state_dict()) == keys and type(model.blocks[0]) is type(eager.blocks[0])
    ids = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.utils.counters.clear()
    logits = model(ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # three blocks, one graph
    torch.testing.assert_close(logits, eager(ids), rtol=1e-12, atol=1e-12)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.blocks[-1].parameters())


@pytest.mark.parametrize("name, extra", [("wda", ["attention.gate_pooling=prefix_mixdens"]), ("wavefield", [])],
                         ids=["wda-prefix_mixdens", "wavefield"])
def test_compiled_blocks_train_under_bf16_autocast(name: str, extra: list[str]) -> None:
    """torch.compile traces the backward inside the caller's autocast region: the hand-written backward passes
    must still run in fp32 (a bf16 matmul into an fp32 accumulator fails)."""
    torch.manual_seed(0)
    model = build_model(compose_config([f"attention={name}", *TINY_SHAPE, *extra]), vocab_size=11)
    compile_blocks(model, backend="aot_eager")
    ids = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compile_setting_auto_is_cuda_only_and_bad_values_name_the_fix() -> None:
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda"))
    with pytest.raises(ValueError, match="model.compile=auto"):
        check_compile_setting("yes")
    with pytest.raises(ValueError, match="model.compile='on'"):
        build_model(compose_config(["model.compile=on"]), vocab_size=11)
    assert not fused_adamw(torch.nn.Linear(2, 2))  # CPU parameters: the for-each AdamW


def test_trainer_run_with_compiled_blocks_saves_eager_checkpoint_keys(tmp_path, monkeypatch) -> None:
    """model.compile=true through the Lightning Trainer: blocks compiled in setup, checkpoints keyed as eager."""
    from wavetrain import load_model
    from wavetrain.train import train

    monkeypatch.setattr(lm, "COMPILE_BACKEND", "aot_eager")
    overrides = ["scale=tiny", "seq_len=16", "data.batch_size=4", "data.val_windows=4", "trainer.max_steps=3",
                 "trainer.val_check_interval=3", "trainer.enable_progress_bar=false", "trainer.precision=32-true",
                 "model.compile=true"]
    torch._dynamo.utils.counters.clear()
    results = train(compose_config(overrides), run_dir=tmp_path)
    assert results["steps"] == 3 and results["val_loss"] > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks ran compiled
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    vocab = results["vocab_size"]
    eager_keys = {f"model.{k}" for k in build_model(compose_config(overrides), vocab_size=vocab).state_dict()}
    assert set(state) == eager_keys
    model, _ = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] == vocab


# ------------------------------------------------------------------------------------------ GPU execution path
def test_batched_execution_switch() -> None:
    cpu = torch.device("cpu")
    assert cache_blocked(cpu) and not cache_blocked(torch.device("cuda"))
    with batched_execution():
        assert not cache_blocked(cpu)
    assert cache_blocked(cpu)


@pytest.mark.parametrize("options", [dict(gate_pooling="prefix_mixdens"),
                                     dict(gate_pooling="prefix_mixdens", density="sampling", noise_sigma=1.0,
                                          num_samples=8)], ids=["sigmoid", "sampling"])
def test_batched_wda_mixture_equals_reference(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-launch mixture (GPU path) gives the naive reference's values and gradients; so does the blocked
    CPU path with blocks small enough that every boundary is crossed."""
    torch.manual_seed(0)
    module = wda.WaveDensityAttention(16, 2, 24, num_masks=4, num_waves_per_mask=3, topk_masks=2, gate_hidden=8,
                                      content_rank=2, mod_rank=2, **options).double()
    x = torch.randn(2, 19, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(fn):
        torch.manual_seed(5)  # the same threshold noise for density=sampling
        return _outputs_and_grads(_Call(fn, module), x)

    expected = run(wda_reference)
    with batched_execution():
        batched = run(lambda m, inp: m(inp))
    monkeypatch.setattr(wda, "MIXTURE_BLOCK_ELEMENTS", 7)
    monkeypatch.setattr(wda, "RENDER_CHUNK_ELEMENTS", 5)
    blocked = run(lambda m, inp: m(inp))
    for y, grads in (batched, blocked):
        torch.testing.assert_close(y, expected[0], rtol=1e-10, atol=1e-11)
        for got, want in zip(grads, expected[1]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


class _Call(torch.nn.Module):
    """Wraps ``fn(module, x)`` so _outputs_and_grads sees the module's parameters."""

    def __init__(self, fn, module: torch.nn.Module) -> None:
        super().__init__()
        self.fn, self.inner = fn, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.inner, x)


def test_batched_bilinear_conv_gather_equals_scatter_conv_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    """scatter → causal convolution → gather in one block (GPU path) and in one block per (batch, head) pair (CPU
    blocks shrunk) equal the composition of the naive primitives, values and gradients (float64)."""
    from wavetrain.models import field_ops

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, 4, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    kernel = torch.randn(3, 20, dtype=torch.float64, generator=generator, requires_grad=True)
    lower, frac = bilinear_positions(9, 2.0, 20)
    frac = frac.double()

    def naive() -> torch.Tensor:
        field = bilinear_scatter_rows(values, lower, frac, 20)
        return bilinear_gather_rows(causal_conv_reference(field, kernel[:, None]), lower, frac)

    def check(out: torch.Tensor) -> None:
        expected = naive()
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        probe = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        for got, want in zip(torch.autograd.grad((out * probe).sum(), (values, kernel)),
                             torch.autograd.grad((expected * probe).sum(), (values, kernel))):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    with batched_execution():
        check(bilinear_conv_gather(values, lower, frac, kernel, 20))
    monkeypatch.setattr(field_ops, "_BLOCK_SAMPLES", 1)
    check(bilinear_conv_gather(values, lower, frac, kernel, 20))
