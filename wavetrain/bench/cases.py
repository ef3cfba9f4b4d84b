"""What the benchmark measures: the variants, the run settings and the workload of one case.

A variant is a conf/attention name, optionally with attention options after ``@``:
``wda@gate_pooling=prefix_mixdens`` is the WDA config with ``attention.gate_pooling=prefix_mixdens`` (a key with a
dot, e.g. ``model.norm=pre``, is passed to the composition as it is).  A case is one variant at one length N: the
module (or model) is built from the composed config with ``seq_len`` = N, so N-dependent sizes such as the Wave
Field's field derive from it.
"""
from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from wavetrain.config import compose_config, group_choices
from wavetrain.flops import attention_flops, model_flops_per_token
from wavetrain.lightning_module import fused_adamw
from wavetrain.models.lm import build_attention, build_model, compile_blocks, compile_in_place

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
# Rows added to the default selection: the long-context form the issue benchmarks WDA in (spec wda.md §2.8).
LONG_CONTEXT_VARIANTS = ("wda@gate_pooling=prefix_mixdens",)
REFERENCE = "standard"
MEASURES = ("fwd", "fwdbwd", "step")
MEASURE_TITLES = {"fwd": "fwd", "fwdbwd": "fwd+bwd", "step": "model step"}
PARTS = {"attention": ("fwd", "fwdbwd"), "model": ("step",)}


class BenchError(ValueError):
    """A bad benchmark argument: the message names it and the fix."""


# ------------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """One benchmarked attention: a conf/attention config plus overrides; ``label`` is how tables name it."""
    label: str
    config: str
    overrides: tuple[str, ...] = ()


def parse_variant(spec: str, available: list[str]) -> Variant:
    """``name[@key=value...]`` -> Variant; keys without a dot are attention options."""
    name, *settings = spec.strip().split("@")
    if name not in available:
        raise BenchError(f"--attention names {name!r}, which is not a config in conf/attention: choose from "
                         f"{', '.join(available)}")
    overrides = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise BenchError(f"--attention variant {spec!r}: {setting!r} is not key=value (e.g. "
                             f"wda@gate_pooling=prefix_mixdens)")
        overrides.append(setting if "." in key else f"attention.{key}={value}")
    return Variant(spec.strip(), name, tuple(overrides))


def select_variants(selection: str | None) -> list[Variant]:
    """The variants of ``--attention`` (default: every config plus the long-context rows); SDPA always first."""
    available = group_choices("attention")
    if selection:
        specs = [s for s in selection.split(",") if s.strip()]
    else:
        specs = available + [v for v in LONG_CONTEXT_VARIANTS if v.split("@")[0] in available]
    variants = [parse_variant(spec, available) for spec in specs]
    if REFERENCE not in [v.label for v in variants]:
        variants.insert(0, Variant(REFERENCE, REFERENCE))
    else:
        variants.sort(key=lambda v: v.label != REFERENCE)
    return variants


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(token) for token in text.split(",") if token.strip()})
    except ValueError:
        raise BenchError(f"--lengths={text!r} must be comma-separated integers, e.g. 512,1024,2048") from None
    if not lengths or lengths[0] < 2:
        raise BenchError(f"--lengths={text!r}: give at least one length >= 2")
    return lengths


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    """One benchmark run.  ``dropout`` overrides scale.dropout when given; ``compile`` runs every module and model
    compiled (``torch.compile``, the model's blocks in place)."""
    device: torch.device
    lengths: list[int]
    batch: int
    dim: int
    heads: int
    layers: int
    ffn_dim: int
    vocab: int
    precision: str
    warmup: int
    repeats: int
    budget: float
    max_memory: float  # bytes
    measures: tuple[str, ...]
    clock: str = "wall"
    compile: bool = False
    dropout: float | None = None

    def now(self) -> float:
        """Seconds on the chosen clock: wall time, or this process's CPU time (``--clock process``, CPU only)."""
        return time.process_time() if self.clock == "process" else time.perf_counter()

    def autocast(self):
        if self.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def case_overrides(variant: Variant, settings: Settings, n_tokens: int) -> list[str]:
    """The composition of one case: the variant's config at width/heads/depth of the run and seq_len = N."""
    dropout = [] if settings.dropout is None else [f"scale.dropout={settings.dropout}"]
    return [f"attention={variant.config}", f"seq_len={n_tokens}", f"scale.d_model={settings.dim}",
            f"scale.n_heads={settings.heads}", f"scale.n_layers={settings.layers}",
            f"scale.ffn_dim={settings.ffn_dim}", *dropout, f"model.position_rows={n_tokens}", *variant.overrides]


@functools.lru_cache(maxsize=16)
def _composed(overrides: tuple[str, ...]):
    return compose_config(list(overrides))


def case_config(variant: Variant, settings: Settings, n_tokens: int):
    """The composed config of one case (composed once per variant and length; read-only)."""
    return _composed(tuple(case_overrides(variant, settings, n_tokens)))


# ------------------------------------------------------------------------------------------------ workloads
def attention_workload(variant: Variant, settings: Settings, n_tokens: int, measure: str) -> Callable[[], None]:
    """One call of the attention module alone: inference forward (``fwd``) or forward + backward (``fwdbwd``)."""
    module = build_attention(case_config(variant, settings, n_tokens)).to(settings.device)
    if settings.compile:
        compile_in_place(module)
    shape = (settings.batch, n_tokens, settings.dim)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=generator).to(settings.device)
    if measure == "fwd":
        module.eval()

        def run() -> None:
            with torch.no_grad(), settings.autocast():
                module(x)
        return run
    module.train()
    x.requires_grad_(True)
    cotangent = torch.randn(shape, generator=generator).to(settings.device)

    def run() -> None:
        with settings.autocast():
            y = module(x)
        y.backward(cotangent.to(y.dtype))
        x.grad = None
        module.zero_grad(set_to_none=True)
    return run


def model_workload(variant: Variant, settings: Settings, n_tokens: int) -> tuple[Callable[[], None], float | None]:
    """One optimiser step of the whole model (forward, cross-entropy, backward, AdamW — fused on CUDA), and its
    analytic training FLOPs per token (None where an attention has no formula)."""
    model = build_model(case_config(variant, settings, n_tokens), vocab_size=settings.vocab).to(settings.device)
    model.train()
    if settings.compile:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(model))
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(settings.vocab, (settings.batch, n_tokens + 1), generator=generator).to(settings.device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    try:
        flops = model_flops_per_token(model, n_tokens)
    except KeyError:
        flops = None

    def run() -> None:
        with settings.autocast():
            logits = model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run, flops


def analytic_attention_flops(variant: Variant, settings: Settings, n_tokens: int) -> float | None:
    """Forward FLOPs of the attention module for one batch (wavetrain/flops.py); None without a formula."""
    try:
        module = build_attention(case_config(variant, settings, n_tokens))
        return attention_flops(module, n_tokens, settings.batch).total
    except Exception:  # noqa: BLE001 - no formula or a config that does not build: the measured cases say why
        return None
