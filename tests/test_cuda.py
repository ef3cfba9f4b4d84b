"""GPU correctness (issue 15): run by ``pytest -m cuda``, first step of ``python -m wavetrain.bench --suite gpu``;
skipped without a CUDA device.

- The one-launch-per-op GPU path gives the CPU's results (fp32, values and gradients).
- Every wave variant stays causal on the GPU in fp32 and under bf16 autocast.
- Blocks compiled with inductor (``model.compile``) give the eager model's logits and gradients, and stay causal.
- Fused AdamW takes the same step as the for-each implementation.
Small shapes throughout: the whole file runs in about a minute, most of it compilation.
"""
from __future__ import annotations

import pytest
import torch

from wavetrain import build_model, compose_config
from wavetrain.lightning_module import fused_adamw
from wavetrain.models.lm import build_attention, compile_blocks

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]

SHAPE = ["seq_len=256", "scale.d_model=64", "scale.n_heads=4", "scale.n_layers=2", "scale.ffn_dim=128",
         "scale.dropout=0.0"]
VARIANTS = [("standard", []), ("wavefield", []), ("wda", []), ("wda", ["attention.gate_pooling=prefix_mixdens"]),
            ("dwarf_condA", []), ("dwarf_condK", []), ("dwarf_condN", []), ("dwarf_condP", [])]
IDS = ["standard", "wavefield", "wda", "wda-prefix_mixdens", "dwarf_condA", "dwarf_condK", "dwarf_condN",
       "dwarf_condP"]


def _config(name: str, extra: list[str]):
    return compose_config([f"attention={name}", *SHAPE, *extra])


def _inputs(batch: int = 2, n: int = 256, dim: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("name, extra", VARIANTS, ids=IDS)
def test_gpu_path_equals_cpu_in_fp32(name: str, extra: list[str]) -> None:
    torch.manual_seed(0)
    module = build_attention(_config(name, extra)).eval()
    x = _inputs()
    results = []
    for device in ("cpu", "cuda"):
        module.to(device)
        xd = x.to(device).requires_grad_(True)
        torch.manual_seed(1)
        y = module(xd)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1], device=device)).sum(),
                                    [xd, *module.parameters()], allow_unused=True)
        results.append((y.cpu(), [g.cpu() for g in grads if g is not None]))
    (y_cpu, g_cpu), (y_gpu, g_gpu) = results
    assert _relative(y_gpu, y_cpu) < 1e-4
    assert len(g_cpu) == len(g_gpu)
    for got, want in zip(g_gpu, g_cpu):
        assert _relative(got, want) < 1e-3


def _future_influence(module: torch.nn.Module, x: torch.Tensor, cut: int, autocast: bool) -> float:
    """max |Δy[:, :cut]| / max |y| when x[:, cut:] is replaced by noise."""
    changed = x.clone()
    changed[:, cut:] = torch.randn_like(changed[:, cut:])
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        before, after = module(x).float(), module(changed).float()
    return ((after[:, :cut] - before[:, :cut]).abs().max() / before.abs().max()).item()


@pytest.mark.parametrize("name, extra", VARIANTS, ids=IDS)
def test_causal_on_gpu_in_fp32_and_bf16(name: str, extra: list[str]) -> None:
    """Future tokens change past outputs only by round-off: ~1e-7 in fp32; in bf16 at most a rounding flip of an
    output (2⁻⁸ relative).  A real leak moves them by 1e-2 … 1."""
    torch.manual_seed(0)
    module = build_attention(_config(name, extra)).cuda().eval()
    x = _inputs().cuda()
    for cut in (1, 100, 255):
        assert _future_influence(module, x, cut, autocast=False) < 1e-5, f"fp32 leak at cut {cut}"
        assert _future_influence(module, x, cut, autocast=True) < 8e-3, f"bf16 leak at cut {cut}"


def _model(name: str, extra: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(_config(name, extra), vocab_size=97).cuda()


@pytest.mark.parametrize("name, extra", [("wavefield", []), ("wda", ["attention.gate_pooling=prefix_mixdens"])],
                         ids=["wavefield", "wda-prefix_mixdens"])
def test_compiled_blocks_equal_eager_and_stay_causal_in_bf16(name: str, extra: list[str]) -> None:
    eager, compiled = _model(name, extra), _model(name, extra)
    compile_blocks(compiled)
    ids = torch.randint(97, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
    outputs = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids)
        logits.float().square().mean().backward()
        outputs.append((logits.float(), model.blocks[0].norm1.weight.grad.clone()))
    (logits_eager, grad_eager), (logits_compiled, grad_compiled) = outputs
    assert _relative(logits_compiled, logits_eager) < 3e-2
    assert _relative(grad_compiled, grad_eager) < 5e-2
    changed = ids.clone()
    changed[:, 128:] = torch.randint(97, (2, 128), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the training graph again (no_grad would compile anew)
        before, after = compiled(ids).detach().float(), compiled(changed).detach().float()
    assert ((after[:, :128] - before[:, :128]).abs().max() / before.abs().max()).item() < 8e-3


def test_fused_adamw_takes_the_foreach_step() -> None:
    torch.manual_seed(0)
    models = [build_model(_config("wavefield", []), vocab_size=97).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    assert fused_adamw(models[0])
    ids = torch.randint(97, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
    for model, fused in zip(models, (True, False)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
        model(ids).float().square().mean().backward()
        optimizer.step()
    for fused_param, foreach_param in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(fused_param, foreach_param, rtol=1e-5, atol=1e-6)
