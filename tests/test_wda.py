"""Wave-Density Attention (spec wda.md §2, invariants of §8): fast paths against the naive reference, routing,
densities, causality per gate_pooling mode, live mask rendering, parameter counts, bf16 autocast."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from causality import assert_causal, dependency_matrix, max_future_influence  # noqa: E402

from wavetrain.models.attention import wda  # noqa: E402
from wavetrain.models.attention.wda import (  # noqa: E402
    WaveDensityAttention,
    _reversed_lags_to_position,
    _StochasticThreshold,
    causal_linear_attention,
    offset_encoding,
    straight_through_topk,
    triangle_wave,
    wda_reference,
)
from wavetrain.models.field_ops import causal_fft_conv  # noqa: E402

SMALL = dict(dim=32, n_heads=2, seq_len=48, num_masks=4, num_waves_per_mask=2, topk_masks=2, gate_hidden=8,
             content_rank=3, mod_rank=3)


pytestmark = pytest.mark.usefixtures("single_thread")


def small(seed: int = 0, **options) -> WaveDensityAttention:
    torch.manual_seed(seed)
    return WaveDensityAttention(**{**SMALL, **options}).double()


def inputs(batch: int = 2, length: int = 48, dim: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def outputs_and_grads(fn, module: torch.nn.Module, x: torch.Tensor, seed: int = 7):
    """Output and the gradients of a fixed random projection of it w.r.t. x and every parameter (None kept)."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # identical threshold noise for the fast path and the reference
    y = fn(module, x)
    probe = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((y * probe).sum(), [x, *module.parameters()], allow_unused=True)
    return y, grads


class Reseeded(torch.nn.Module):
    """Fixes the threshold noise of density=sampling, so that repeated calls differ only through the input."""

    def __init__(self, inner: WaveDensityAttention) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(99)
        return self.inner(x)


# --------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("length", [1, 7, 48])
def test_fft_application_equals_naive_causal_sum(length: int) -> None:
    """causal_fft_conv with a per-row kernel and with a per-mask kernel bank (the shapes the module and its reference
    use) equals the direct Σ_{d≤t} k(d)·z_{t−d} in float64, values and gradients (spec §8.2)."""
    gen = torch.Generator().manual_seed(length)
    signal = torch.randn(2, 3, 5, length, dtype=torch.float64, generator=gen, requires_grad=True)  # (B,H,C,N)
    row_kernel = torch.rand(2, 3, 1, length, dtype=torch.float64, generator=gen, requires_grad=True)
    bank_kernel = torch.rand(1, 3, 4, 1, length, dtype=torch.float64, generator=gen, requires_grad=True)

    def direct(sig: torch.Tensor, ker: torch.Tensor) -> torch.Tensor:
        sig, ker = torch.broadcast_tensors(sig, ker)
        return torch.stack([sum(ker[..., d] * sig[..., t - d] for d in range(t + 1)) for t in range(length)], -1)

    for fast, slow, leaves in (
        (causal_fft_conv(signal, row_kernel), direct(signal, row_kernel), (signal, row_kernel)),
        (causal_fft_conv(signal.unsqueeze(2), bank_kernel), direct(signal.unsqueeze(2), bank_kernel),
         (signal, bank_kernel)),
    ):
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
        probe = torch.randn(fast.shape, dtype=torch.float64, generator=gen)
        for g_fast, g_slow in zip(torch.autograd.grad((fast * probe).sum(), leaves),
                                  torch.autograd.grad((slow * probe).sum(), leaves)):
            torch.testing.assert_close(g_fast, g_slow, rtol=1e-12, atol=1e-12)


def test_reversed_lag_skew_builds_the_causal_matrix() -> None:
    n = 9
    lagged = torch.randn(2, 3, n, n, dtype=torch.float64)  # [t, d]
    reversed_padded = torch.nn.functional.pad(lagged.flip(-1), (0, 1), value=float("nan"))  # pad column unread
    matrix = _reversed_lags_to_position(torch.nan_to_num(reversed_padded, nan=123.0))
    expected = torch.zeros_like(matrix)
    for t in range(n):
        for j in range(t + 1):
            expected[..., t, j] = lagged[..., t, t - j]
    assert torch.equal(matrix, expected)


@pytest.mark.parametrize("length,chunk", [(11, 4), (48, 64), (130, 64)])
def test_chunked_content_attention_equals_naive(length: int, chunk: int) -> None:
    """§2.6 / §8.8: the vectorised chunked prefix sum equals the O(N²) φ-kernel attention, values and grads."""
    gen = torch.Generator().manual_seed(length)
    q = torch.rand(2, 3, length, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.rand(2, 3, length, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, 3, length, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    fast = causal_linear_attention(q, k, v, chunk=chunk)
    scores = (q @ k.transpose(-1, -2)).tril()
    naive = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-12)
    probe = torch.randn(fast.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad((fast * probe).sum(), (q, k, v)),
                    torch.autograd.grad((naive * probe).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_offset_encoding_and_triangle_wave() -> None:
    """§8.5: p(0) = (0, 0), p_1 = d/S_max, p_2 increasing; tri(0) = 0, tri(π/2) = −1, tri(3π/2) = +1."""
    lags = torch.arange(256, dtype=torch.float64)
    p = offset_encoding(lags, 256)
    assert torch.equal(p[0], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(p[:, 0], lags / 256)
    assert (p[1:, 1].diff() > 0).all() and p[1, 1] > 0
    points = torch.tensor([0.0, math.pi / 2, math.pi, 3 * math.pi / 2, 2 * math.pi, -math.pi / 2], dtype=torch.float64)
    torch.testing.assert_close(triangle_wave(points), torch.tensor([0.0, -1.0, 0.0, 1.0, 0.0, 1.0],
                                                                   dtype=torch.float64), atol=1e-12, rtol=0)
    grid = torch.linspace(-10, 10, 1001, dtype=torch.float64)
    torch.testing.assert_close(triangle_wave(grid), triangle_wave(grid + 2 * math.pi), atol=1e-12, rtol=0)
    assert triangle_wave(grid).abs().max() <= 1.0


# --------------------------------------------------------------------------- routing
def test_straight_through_topk_forward_uniform_and_softmax_gradient() -> None:
    """§2.3 step 3 / §8.3: forward exactly 1/k on the k largest logits and exactly 0 elsewhere; the gradient is
    that of softmax(logits / T) over all M masks."""
    logits = torch.randn(5, 7, 16, dtype=torch.float64, requires_grad=True)
    weights = straight_through_topk(logits, 8, temperature=0.7)
    top = logits.topk(8, dim=-1).indices
    expected = torch.zeros_like(weights).scatter(-1, top, 1.0 / 8)
    assert torch.equal(weights.detach(), expected)
    probe = torch.randn(weights.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights * probe).sum(), logits)
    (soft_grad,) = torch.autograd.grad((torch.softmax(logits / 0.7, -1) * probe).sum(), logits)
    torch.testing.assert_close(grad, soft_grad, rtol=0, atol=0)
    assert (grad != 0).all()


@pytest.mark.parametrize("pooling", ["prefix", "prefix_mixdens", "full"])
def test_mixture_weights_are_convex_over_exactly_topk(pooling: str) -> None:
    """§8.3 per row and position: w̃ ≥ 0, Σ w̃ = 1, exactly k nonzeros on the top-k logits, each in
    (1/(3k), 3/k); the gradient reaches every gate logit (all M rows of every head's output layer)."""
    module = small(gate_pooling=pooling, num_masks=6, topk_masks=3)
    x = inputs(length=20)
    weights = module.mixture_weights(x)
    expected_rows = 20 if pooling != "full" else 1
    assert weights.shape == (2, expected_rows, 2, 6)
    logits = module._headwise_mlp(module._pool(x), module.gate_in, module.gate_out)
    selected = torch.zeros_like(weights, dtype=torch.bool).scatter(-1, logits.topk(3, -1).indices, True)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)), atol=1e-6, rtol=0)
    assert torch.equal(weights != 0, selected)
    assert ((weights[selected] > 1 / 9) & (weights[selected] < 1.0)).all()
    module(x).square().sum().backward()
    assert (module.gate_out.weight.grad.abs().sum(-1) > 0).all()
    assert module.gate_in.weight.grad.abs().sum() > 0


def test_reference_code_estimator_is_dense_softmax_without_gradient() -> None:
    """st_estimator=reference_code reproduces the reference's `hard + (soft − hard).detach()`: the forward weights
    are the dense softmax (then scaled and renormalised) and the gating MLP receives no gradient at all."""
    module = small(st_estimator="reference_code", gate_temp=0.7)
    x = inputs(length=12)
    weights = module.mixture_weights(x)
    assert (weights > 0).all()  # every mask participates
    pooled = module._pool(x)
    soft = torch.softmax(module._headwise_mlp(pooled, module.gate_in, module.gate_out) / 0.7, -1)
    scale = 0.5 * torch.tanh(torch.einsum("bthr,hrm->bthm", module._headwise_mlp(pooled, module.mod_in,
                                                                                   module.mod_out),
                                          module.mod_basis))
    expected = soft * (1 + scale)
    torch.testing.assert_close(weights, expected / (expected.sum(-1, keepdim=True) + 1e-8))
    module(x).square().sum().backward()
    assert module.gate_in.weight.grad is None and module.gate_out.weight.grad is None
    assert module.mod_in.weight.grad is not None and module.freqs.grad is not None
    sampling = small(st_estimator="reference_code", density="sampling")
    sampling(x).square().sum().backward()
    assert all(p.grad is None for p in (sampling.freqs, sampling.amps, sampling.phases, sampling.mod_basis))
    assert sampling.v_proj.weight.grad is not None


def test_topk_is_a_no_op_in_the_published_code() -> None:
    """The fidelity audit's finding (README): with the reference code's estimator the forward pass is the soft
    mixture over all M masks, so top-k 1 and top-k M give bitwise the same output from the same weights; the intended
    estimator's top-k does change it."""
    x = inputs(length=24)
    for pooling in ("full", "prefix"):
        one, all_masks = small(st_estimator="reference_code", topk_masks=1, gate_pooling=pooling), \
            small(st_estimator="reference_code", topk_masks=SMALL["num_masks"], gate_pooling=pooling)
        all_masks.load_state_dict(one.state_dict())
        assert torch.equal(one(x), all_masks(x)), pooling
    one, all_masks = small(topk_masks=1), small(topk_masks=SMALL["num_masks"])
    all_masks.load_state_dict(one.state_dict())
    assert (one(x) - all_masks(x)).abs().max() > 1e-3


# --------------------------------------------------------------------------- fast path == naive reference
REFERENCE_CASES = [
    dict(gate_pooling="prefix"),
    dict(gate_pooling="prefix", learned_content=False, use_sin_waves=True),
    dict(gate_pooling="prefix", content_mix=0.0, window_sigma_frac=0.0),
    dict(gate_pooling="prefix", density="raw"),
    dict(gate_pooling="prefix", density="sampling", noise_sigma=1.0, num_samples=16),
    dict(gate_pooling="prefix", st_estimator="reference_code", density="sampling", noise_sigma=1.0),
    dict(gate_pooling="prefix_mixdens"),
    dict(gate_pooling="prefix_mixdens", density="sampling", noise_sigma=1.0, num_samples=16),
    dict(gate_pooling="prefix_mixdens", topk_masks=4, learned_content=False),
    dict(gate_pooling="full"),
    dict(gate_pooling="full", density="raw", use_sin_waves=True),
    dict(gate_pooling="full", density="sampling", noise_sigma=1.0, num_samples=16),
    dict(gate_pooling="full", st_estimator="reference_code"),
]


REFERENCE_CASES += [dict(gate_pooling=pooling, length=length)
                    for pooling in ("prefix", "prefix_mixdens", "full") for length in (1, 7)]


@pytest.mark.parametrize("options", REFERENCE_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fast_path_equals_naive_reference(options: dict) -> None:
    """float64 outputs and gradients (x and every parameter) of the batched module equal the naive per-head,
    per-position reference with explicit kernels and direct causal sums."""
    options = dict(options)
    x = inputs(length=options.pop("length", 24))
    module = small(**options)
    y, grads = outputs_and_grads(lambda m, inp: m(inp), module, x)
    y_ref, grads_ref = outputs_and_grads(wda_reference, module, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    for (name, _), g, g_ref in zip([("x", None), *module.named_parameters()], grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("options", [dict(gate_pooling="prefix_mixdens"),
                                     dict(gate_pooling="prefix_mixdens", density="sampling", noise_sigma=1.0,
                                          num_samples=16),
                                     dict(gate_pooling="prefix", use_sin_waves=True)], ids=str)
def test_blocked_paths_equal_reference_with_many_blocks(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache-sized blocks of the mask mixture and the lag chunks of the mask rendering cover one block at test
    sizes; shrunk to a few entries, every block boundary is crossed and values and gradients still equal the naive
    reference (float64)."""
    monkeypatch.setattr(wda, "MIXTURE_BLOCK_ELEMENTS", 7)
    monkeypatch.setattr(wda, "RENDER_CHUNK_ELEMENTS", 5)
    x = inputs(length=19)
    module = small(**options)
    y, grads = outputs_and_grads(lambda m, inp: m(inp), module, x)
    y_ref, grads_ref = outputs_and_grads(wda_reference, module, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None)
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


def test_raw_density_mixdens_equals_prefix() -> None:
    """A raw (linear) density makes the mixture of densities equal the density of the mixture (§2.8)."""
    x = inputs(length=25)
    prefix = small(density="raw", gate_pooling="prefix")
    mixdens = small(density="raw", gate_pooling="prefix_mixdens")
    mixdens.load_state_dict(prefix.state_dict())
    torch.testing.assert_close(prefix(x), mixdens(x), rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------- causality (§7.1, §8.1)
@pytest.mark.parametrize("pooling", ["prefix", "prefix_mixdens"])
@pytest.mark.parametrize("density", ["sigmoid", "raw", "sampling"])
def test_prefix_modes_are_causal(pooling: str, density: str) -> None:
    """prefix uses direct sums, so future tokens leave past outputs bit-identical; prefix_mixdens convolves by FFT,
    whose round-off (1e-16 relative) spreads over all positions and is amplified by the small normaliser of the
    raw density, hence the looser (still ≪ any real leak, which is ≥ 1e-4 here) tolerances."""
    module = small(gate_pooling=pooling, density=density, noise_sigma=1.0)
    tol = 1e-15 if pooling == "prefix" else (1e-9 if density == "raw" else 1e-12)
    assert_causal(Reseeded(module) if density == "sampling" else module, n=48, dim=32, tol=tol,
                  positions=[1, 2, 5, 17, 30, 47])


def test_prefix_read_set_is_exactly_lower_triangular() -> None:
    module = small(gate_pooling="prefix")
    dep = dependency_matrix(module, inputs(length=16))
    visible = torch.ones(16, 16, dtype=torch.bool).tril()
    assert (dep[~visible] == 0).all() and (dep[visible] > 0).all()


def test_full_pooling_leaks_the_future() -> None:
    """gate_pooling=full is the reference behaviour: the whole-sequence mean routes every position, so past
    outputs move when future tokens change (kept to document the leak behind the published perplexities)."""
    x = inputs(length=48)
    # at init the routing rarely flips, so the leak runs through the (small, mod_basis ~ 0.05) mask scaling:
    # measured 3.7e-5 here, 1e7 times the round-off level; the reference's dense softmax leaks 1.3e-3
    module = small(gate_pooling="full")
    leak = max_future_influence(module, x, positions=[1, 12, 24, 47])
    assert leak > 1e-5, f"full pooling should leak, measured {leak:.3e}"
    reference_code = small(gate_pooling="full", st_estimator="reference_code")
    leak = max_future_influence(reference_code, x, positions=[1, 12, 24, 47])
    assert leak > 1e-4, f"full pooling with the reference's gate should leak, measured {leak:.3e}"
    assert (dependency_matrix(module, inputs(length=12)).triu(1) > 0).any()


def test_shorter_inputs_are_prefixes_of_longer_ones() -> None:
    """S < S_max works, with the offset encoding and window of S_max (§1, §8.9)."""
    module = small(gate_pooling="prefix")
    x = inputs(length=48)
    torch.testing.assert_close(module(x[:, :13]), module(x)[:, :13], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- densities (§2.4, §6, §8.4)
def test_sigmoid_density_range_and_window() -> None:
    module = small(gate_pooling="prefix")
    kernels = module.density_kernels(inputs(length=48))  # (B, H, t, d)
    window = module.window(48)
    assert window[0] == 1 and (window <= 1).all() and (window > 0).all()
    visible = torch.ones(48, 48, dtype=torch.bool).tril()
    assert (kernels[..., visible] > 0).all() and (kernels[..., ~visible] == 0).all()
    assert (kernels <= window + 1e-15).all()
    torch.testing.assert_close(module.window(), torch.exp(-torch.arange(48.0, dtype=torch.float64) ** 2
                                                          / (2 * (0.25 * 48) ** 2)))


def test_raw_density_is_windowed_mixture() -> None:
    module = small(gate_pooling="prefix", density="raw")
    x = inputs(length=20)
    weights = module.mixture_weights(x)
    mixture = torch.einsum("bthm,hml->bhtl", weights, module.render_masks(20))
    torch.testing.assert_close(module.density_kernels(x), (mixture * module.window(20)).tril())


def test_sampling_density_counts_and_resamples() -> None:
    module = small(gate_pooling="prefix", density="sampling", num_samples=8)
    module.eval()
    x = inputs(length=20)
    kernels = module.density_kernels(x) / module.window(20)
    assert torch.allclose(kernels * 8, (kernels * 8).round(), atol=1e-9)  # multiples of 1/n
    assert (kernels >= 0).all() and (kernels <= 1 + 1e-12).all()
    assert not torch.equal(module(x), module(x))  # noise redrawn at every call, eval included


def test_stochastic_threshold_matches_explicit_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward = mean_s 1[K + ε_s > 0]; backward = mean_s d/dK σ(step_alpha·(K + ε_s)); the chunked backward
    (forced to several chunks here) equals the explicit per-sample straight-through."""
    monkeypatch.setattr(wda, "SAMPLE_CHUNK_ELEMENTS", 100)
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(2, 3, 5, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    noise = 0.3 * torch.randn(2, 3, 13, 11, dtype=torch.float64, generator=gen)
    fast = _StochasticThreshold.apply(kernel, noise, 6.0)
    z = kernel.unsqueeze(-2) + noise.unsqueeze(2)
    soft = torch.sigmoid(6.0 * z)
    explicit = ((z > 0).to(z.dtype) + soft - soft.detach()).mean(-2)
    torch.testing.assert_close(fast, explicit, rtol=0, atol=1e-15)  # the explicit form rounds in 1 + s − s
    probe = torch.randn(fast.shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(torch.autograd.grad((fast * probe).sum(), kernel)[0],
                               torch.autograd.grad((explicit * probe).sum(), kernel)[0], rtol=1e-12, atol=1e-14)


def test_context_is_convex_combination_of_past_values() -> None:
    """§8.4: with the content path off, the pre-projection output at t lies in the coordinate-wise range of
    v_0 … v_t (the normalised average and the qm gate both stay inside it)."""
    module = small(gate_pooling="prefix", content_mix=0.0)
    with torch.no_grad():
        module.out_proj.weight.copy_(torch.eye(32))
        module.out_proj.bias.zero_()
    x = inputs(length=40)
    out = module(x).detach()
    values = module.v_proj(x).detach()
    low, high = values.cummin(1).values, values.cummax(1).values
    slack = 1e-6 * values.abs().max()
    assert (out >= low - slack).all() and (out <= high + slack).all()


# --------------------------------------------------------------------------- live masks (§2.2, §7.9, §8.10)
def test_masks_are_rendered_from_live_parameters() -> None:
    module = small(gate_pooling="prefix")
    module.eval()
    x = inputs(length=20)
    before_masks, before_out = module.render_masks(), module(x)
    with torch.no_grad():
        module.phases.add_(0.3)
    assert not torch.allclose(module.render_masks(), before_masks)
    assert (module(x) - before_out).abs().max() > 1e-4
    eval_kernels = module.density_kernels(x)
    module.train()
    torch.testing.assert_close(module.density_kernels(x), eval_kernels, rtol=0, atol=0)


# --------------------------------------------------------------------------- sizes and init (§2.1, §3, §8.6-7)
def test_attention_parameter_count_at_130m_config() -> None:
    module = WaveDensityAttention(dim=768, n_heads=4, seq_len=256)
    counts: dict[str, int] = {}
    for name, param in module.named_parameters():
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + param.numel()
    assert counts["v_proj"] + counts["out_proj"] == 1_181_184
    assert counts["content_q_proj"] + counts["content_k_proj"] == 49_152
    assert counts["q_mod"] + counts["k_mod"] == 6_152
    assert counts["gate_in"] + counts["gate_out"] == 401_984
    assert counts["mod_in"] + counts["mod_out"] == 397_856
    assert counts["mod_basis"] == 512
    assert counts["freqs"] + counts["amps"] + counts["phases"] == 2_048
    assert sum(counts.values()) == 2_038_888
    wave_count = sum(p.numel() for p in module.wave_parameters())
    assert wave_count == 2_048 and 8 * wave_count == 16_384
    share = 8 * wave_count / 131_508_032
    assert 0.0001245 < share < 0.00013  # 0.01246 %: above the paper's "< 0.01 %"
    assert not any(name.startswith("content_w") for name, _ in module.named_buffers())  # learned content only


def test_wave_and_mask_inits_follow_the_reference() -> None:
    torch.manual_seed(0)
    module = WaveDensityAttention(dim=768, n_heads=4, seq_len=256, num_masks=64, num_waves_per_mask=32)
    assert abs(module.freqs.std().item() - 1.5) < 0.05
    assert abs(module.amps.mean().item() - 0.5) < 0.002 and abs(module.amps.std().item() - 0.02) < 0.001
    assert abs(module.phases.std().item() - math.pi) < 0.1
    assert abs(module.mod_basis.std().item() - 0.05) < 0.003
    bound = 1 / math.sqrt(128)  # PyTorch default for a per-head Linear(G, M): U(±1/√G)
    assert module.gate_out.weight.abs().max() <= bound and module.gate_out.weight.abs().max() > 0.95 * bound


def test_fixed_content_features_use_the_reference_seed() -> None:
    module = WaveDensityAttention(dim=64, n_heads=4, seq_len=32, learned_content=False, content_rank=8)
    gen = torch.Generator().manual_seed(1337 + 64 * 31 + 32 * 17 + 4 * 13 + 8 * 7)
    wq = torch.randn(4, 16, 8, generator=gen) / 4
    wk = torch.randn(4, 16, 8, generator=gen) / 4
    assert torch.equal(module.content_wq, wq) and torch.equal(module.content_wk, wk)
    assert "content_wq" not in module.state_dict()


# --------------------------------------------------------------------------- precision and validation
@pytest.mark.parametrize("pooling", ["prefix", "prefix_mixdens", "full"])
def test_bf16_autocast_runs_close_to_fp32(pooling: str) -> None:
    torch.manual_seed(0)
    module = WaveDensityAttention(dim=64, n_heads=4, seq_len=64, gate_pooling=pooling)
    x = torch.randn(2, 64, 64)
    reference = module(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert module.render_masks().dtype == torch.float32
        assert module.mixture_weights(x).dtype == torch.float32
        out = module(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    relative = (out.float() - reference).abs().mean() / reference.abs().mean()
    assert relative < 0.05, f"bf16 autocast deviates by {relative:.3f} from fp32"
    out.float().square().mean().backward()
    assert torch.isfinite(module.freqs.grad).all()


def test_invalid_settings_raise() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        small()(inputs(length=49))
    with pytest.raises(ValueError, match="topk_masks"):
        WaveDensityAttention(**{**SMALL, "topk_masks": 5})
    with pytest.raises(ValueError, match="gate_pooling"):
        WaveDensityAttention(**{**SMALL, "gate_pooling": "causal"})
    with pytest.raises(ValueError, match="density"):
        WaveDensityAttention(**{**SMALL, "density": "softmax"})
    with pytest.raises(ValueError, match="use_sampling"):
        WaveDensityAttention(**{**SMALL, "density": "raw", "use_sampling": True})
    with pytest.raises(ValueError, match="st_estimator"):
        WaveDensityAttention(**{**SMALL, "st_estimator": "gumbel"})
    with pytest.raises(ValueError, match="n_heads"):
        WaveDensityAttention(**{**SMALL, "n_heads": 3})
    assert WaveDensityAttention(**{**SMALL, "use_sampling": True}).density == "sampling"


# --------------------------------------------------------------------------- analysis (wavetrain.analysis.wda_masks)
def test_kernel_sparsity_extremes() -> None:
    from wavetrain.analysis.wda_masks import kernel_sparsity

    flat = kernel_sparsity(torch.ones(20))
    spike = kernel_sparsity(torch.zeros(20).index_fill(0, torch.tensor([3]), 2.0))
    assert abs(flat["top10_mass"].item() - 0.1) < 1e-12 and abs(flat["gini"].item()) < 1e-12
    assert abs(flat["entropy"].item() - 1.0) < 1e-12
    assert spike["top10_mass"].item() == 1.0 and abs(spike["gini"].item() - 19 / 20) < 1e-12
    assert spike["entropy"].item() == 0.0


class _TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.blocks = torch.nn.ModuleList(
            WaveDensityAttention(dim=16, n_heads=2, seq_len=24, layer_idx=i, num_masks=4, topk_masks=2)
            for i in range(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return x


def test_mask_plots_and_sparsity_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    import wavetrain
    from omegaconf import OmegaConf

    from wavetrain.analysis import wda_masks

    model = _TinyLM()
    rows = wda_masks.mask_sparsity(model, torch.randint(50, (2, 24)))
    assert [(row["layer"], row["head"]) for row in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in rows:
        assert 0.1 <= row["top10_mass"] <= 1 and 0 <= row["gini"] < 1 and 0 < row["entropy"] <= 1
        assert 0.1 <= row["kernel_top10_mass"] <= 1
    png = wda_masks.plot_masks(model, tmp_path / "figure.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(wavetrain, "load_model", lambda path: (model, OmegaConf.create({"seq_len": 24})))
    assert wda_masks.main(["unused.ckpt", "--out", str(tmp_path / "out"), "--random-probe"]) == 0
    printed = capsys.readouterr().out
    assert "| layer | head | top-10% lag mass |" in printed and "applied Gini" in printed
    assert (tmp_path / "out" / "wda_masks.png").stat().st_size > 0
    assert (tmp_path / "out" / "wda_sparsity.md").read_text().count("\n") == 2 + len(rows)
