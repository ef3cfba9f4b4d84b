"""``python -m wavetrain.bench``: arguments, checks, and the three modes (length scaling, --overhead, --suite gpu).

    python -m wavetrain.bench [--attention standard,wavefield,...] [--lengths 512,...,16384] [--device cpu|cuda]
    python -m wavetrain.bench --overhead        # Lightning Trainer step vs a hand-written PyTorch loop
    python -m wavetrain.bench --suite gpu --out DIR   # the GPU check of issue 15 (wavetrain/bench/gpu.py)
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

import torch

from wavetrain.bench.cases import (DEFAULT_LENGTHS, LONG_CONTEXT_VARIANTS, MEASURES, PARTS, BenchError, Settings,
                                   parse_lengths, select_variants)
from wavetrain.bench.gpu import SECTIONS, SuitePlan, run_suite
from wavetrain.bench.overhead import measure_overhead
from wavetrain.bench.scaling import run_benchmark
from wavetrain.bench.timing import default_memory_limit

OUT_ENV = "WAVETRAIN_BENCH_OUT"  # output folder when --out is not given (e.g. the GPU machine's $OUT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from wavetrain import bench

    parser = argparse.ArgumentParser(prog="python -m wavetrain.bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", help="comma-separated variants (conf/attention names, optionally "
                                            "name@key=value...); default: all configs + "
                                            + ", ".join(LONG_CONTEXT_VARIANTS) + "; standard is always added")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="sequence lengths N")
    parser.add_argument("--parts", default="attention,model",
                        help="attention (module alone: fwd, fwd+bwd) and/or model (one full step)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:K | auto (default cpu; cuda with --suite)")
    parser.add_argument("--precision", default=None, choices=("32-true", "bf16-mixed"),
                        help="default 32-true on CPU, bf16-mixed on CUDA")
    parser.add_argument("--batch", type=int, default=1, help="sequences per call")
    parser.add_argument("--dim", type=int, default=256, help="model width D")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the model-step benchmark")
    parser.add_argument("--ffn-dim", type=int, default=None, help="FFN hidden width (default 4·D)")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary of the model-step benchmark")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds per case (warm-up + timed runs), on the chosen --clock")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="skip cases predicted above this (default: half the free RAM / 90%% of the GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, the machine's cores)")
    parser.add_argument("--clock", default="wall", choices=("wall", "process"),
                        help="wall time (default), or this process's CPU time: on a CPU shared with other jobs, "
                             "--threads 1 --clock process times the work itself, not the wait for a core")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default ${OUT_ENV} if set, else outputs/bench/<time>)")
    parser.add_argument("--compile", action="store_true",
                        help="time every module and model compiled (torch.compile; the model's blocks in place)")
    parser.add_argument("--suite", choices=("gpu",), default=None,
                        help="gpu: the CUDA tests, then the issue-15 tables within --time-limit (see "
                             "wavetrain/bench/gpu.py); --attention sets its model-step variants")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="--suite gpu: which sections, in this order (" + ", ".join(SECTIONS) + ")")
    parser.add_argument("--time-limit", type=float, default=280.0,
                        help="--suite gpu: wall seconds after which no further case is started")
    parser.add_argument("--overhead", action="store_true",
                        help="compare the Trainer path (wavetrain.train.train) with a plain PyTorch loop instead")
    parser.add_argument("--overhead-steps", type=int, default=20, help="timed steps of --overhead")
    parser.add_argument("--overhead-warmup", type=int, default=5, help="untimed steps of --overhead")
    parser.add_argument("overrides", nargs="*", help="--overhead only: config overrides (key=value) of the run")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device={name} but torch sees no CUDA device: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device={name}: use cpu, cuda, cuda:K or auto")
    return device


def suite_plan(args: argparse.Namespace, device: torch.device, out: Path) -> SuitePlan:
    """The --suite gpu plan from the arguments."""
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise BenchError(f"--sections={args.sections!r}: use a comma-separated subset of {', '.join(SECTIONS)}")
    if device.type != "cuda":
        raise BenchError("--suite gpu measures a CUDA device: run it on a GPU machine with --device cuda")
    if args.time_limit <= 0:
        raise BenchError(f"--time-limit={args.time_limit} must be > 0 seconds")
    plan = SuitePlan(device=device, out=out, sections=sections, time_limit=args.time_limit)
    if args.attention:
        plan.step_variants = plan.attention_variants = args.attention
    select_variants(plan.step_variants)  # refuse an unknown variant before any work
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device or ("cuda" if args.suite else "cpu"))
        if args.threads is not None:
            if args.threads < 1:
                raise BenchError(f"--threads={args.threads} must be >= 1")
            torch.set_num_threads(args.threads)
        out = args.out or (Path(os.environ[OUT_ENV]) if os.environ.get(OUT_ENV) else
                           Path("outputs") / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        if args.suite:
            run_suite(suite_plan(args, device, out))
            return 0
        if args.overhead:
            if args.clock == "process" and device.type != "cpu":
                raise BenchError("--clock process times CPU work only: use --clock wall on a GPU")
            measure_overhead(args.overrides, device, args.overhead_warmup, args.overhead_steps, out, args.clock)
            return 0
        if args.overrides:
            raise BenchError(f"config overrides {args.overrides} apply to --overhead only; name attention options "
                             f"in --attention as name@key=value")
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise BenchError(f"--parts={args.parts!r}: use attention, model or attention,model")
        for name in ("batch", "dim", "heads", "layers", "vocab", "repeats"):
            if getattr(args, name) < 1:
                raise BenchError(f"--{name}={getattr(args, name)} must be >= 1")
        if args.dim % args.heads:
            raise BenchError(f"--dim={args.dim} is not divisible by --heads={args.heads}")
        if args.clock == "process" and device.type != "cpu":
            raise BenchError("--clock process times CPU work only: use --clock wall on a GPU")
        if args.warmup < 0 or args.budget <= 0:
            raise BenchError("--warmup must be >= 0 and --budget > 0")
        settings = Settings(
            device=device, lengths=parse_lengths(args.lengths), batch=args.batch, dim=args.dim, heads=args.heads,
            layers=args.layers, ffn_dim=args.ffn_dim or 4 * args.dim, vocab=args.vocab,
            precision=args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true"), clock=args.clock,
            warmup=args.warmup, repeats=args.repeats, budget=args.budget,
            max_memory=args.max_memory_gb * 2**30 if args.max_memory_gb else default_memory_limit(device),
            measures=tuple(m for m in MEASURES if any(m in PARTS[p] for p in parts)), compile=args.compile)
        run_benchmark(select_variants(args.attention), settings, out)
    except BenchError as error:
        print(f"wavetrain.bench: {error}", file=sys.stderr)
        return 2
    return 0
