"""Framework overhead: the Lightning Trainer path against a hand-written PyTorch loop of the same model
(``python -m wavetrain.bench --overhead``)."""
from __future__ import annotations

import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from wavetrain.bench.report import device_name, load_average
from wavetrain.bench.timing import sync
from wavetrain.config import compose_config
from wavetrain.models.lm import build_model, compile_blocks, compile_enabled


def plain_loop_seconds_per_step(cfg, device: torch.device, warmup_steps: int, timed_steps: int,
                                clock: Callable[[], float] = time.perf_counter) -> float:
    """Wall seconds per steady-state step of a hand-written PyTorch loop doing what the Trainer does for
    LanguageModelTask: same data windows, model (compiled where model.compile says so), AdamW parameter groups (fused on
    CUDA), LR schedule, grad clipping and precision."""
    import lightning as L
    from torch.utils.data import DataLoader

    from wavetrain.data.datamodule import StreamWindows
    from wavetrain.lightning_module import fused_adamw, lr_factor, parameter_groups
    from wavetrain.train import build_datamodule
    from wavetrain.trainer_settings import resolve_precision

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    data = build_datamodule(cfg)
    vocab_size = data.prepare()
    model = build_model(cfg, vocab_size).to(device)
    model.train()
    opt = cfg.optim
    if compile_enabled(cfg.model.get("compile", "auto"), device):
        compile_blocks(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, float(opt.weight_decay), bool(opt.decay_all)),
                                  lr=float(opt.lr), betas=tuple(opt.betas), eps=float(opt.eps),
                                  fused=fused_adamw(model))
    max_steps = int(opt.get("schedule_steps") or cfg.trainer.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, schedule=opt.schedule, warmup_steps=int(opt.warmup_steps), max_steps=max_steps, lr=float(opt.lr),
        min_lr=float(opt.min_lr)))
    batch = int(cfg.data.batch_size)
    steps = warmup_steps + timed_steps
    windows = StreamWindows(data.splits["train"], int(cfg.seq_len), int(cfg.seed), 0, steps * batch,
                            int(cfg.data.get("min_supervised", 0)))
    loader = DataLoader(windows, batch_size=batch, shuffle=False, num_workers=int(cfg.data.get("num_workers", 0)))
    precision = resolve_precision(cfg.trainer)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision.startswith("bf16") \
        else nullcontext()
    clip = float(opt.grad_clip or 0.0)
    start = None
    for step, (x, y) in enumerate(loader):
        if step == warmup_steps:
            sync(device)
            start = clock()
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    sync(device)
    return (clock() - start) / timed_steps


def trainer_seconds(cfg, steps: int, run_dir: Path, clock: Callable[[], float] = time.perf_counter
                    ) -> tuple[float, dict]:
    """Wall seconds of one wavetrain.train.train run of ``steps`` optimiser steps (validation only at the end)."""
    from omegaconf import open_dict

    from wavetrain.train import train

    with open_dict(cfg):
        cfg.trainer.max_steps = steps
        cfg.trainer.val_check_interval = steps
    start = clock()
    results = train(cfg, run_dir=run_dir)
    return clock() - start, results


def measure_overhead(overrides: list[str], device: torch.device, warmup_steps: int, timed_steps: int,
                     out: Path, clock_name: str = "wall") -> dict:
    """Per-step time (wall, or process CPU time) of the Trainer path vs the plain loop for the same config (default:
    the default standard run). The Trainer's per-step time is the difference of two train() runs of W and W + S steps
    divided by S, so setup, the final validation and the checkpoint cancel and every per-step cost of the framework
    stays in."""
    base = ["attention=standard", "trainer.enable_progress_bar=false", "data.val_windows=8",
            "trainer.limit_val_batches=1", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
            *overrides]
    out.mkdir(parents=True, exist_ok=True)
    clock = time.process_time if clock_name == "process" else time.perf_counter
    cfg = compose_config(base + [f"trainer.max_steps={warmup_steps + timed_steps}"])
    if int(cfg.optim.warmup_steps) >= warmup_steps:
        base.append(f"optim.warmup_steps={max(warmup_steps - 1, 0)}")
    print(f"wavetrain.bench --overhead: {' '.join(base)}; {timed_steps} timed steps after {warmup_steps}; "
          f"{device_name(device)}, {'process CPU time' if clock_name == 'process' else 'wall clock'}; load average "
          f"{load_average()}", flush=True)
    plain = plain_loop_seconds_per_step(compose_config(base + [f"trainer.max_steps={warmup_steps + timed_steps}"]),
                                        device, warmup_steps, timed_steps, clock)
    print(f"plain PyTorch loop: {plain * 1e3:,.1f} ms/step", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        short, _ = trainer_seconds(compose_config(base), warmup_steps, Path(tmp) / "short", clock)
        long, results = trainer_seconds(compose_config(base), warmup_steps + timed_steps, Path(tmp) / "long", clock)
    lightning = (long - short) / timed_steps
    cfg = compose_config(base)
    tokens = int(cfg.data.batch_size) * int(cfg.seq_len)
    report = {"plain_ms_per_step": plain * 1e3, "trainer_ms_per_step": lightning * 1e3,
              "trainer_over_plain": lightning / plain, "tokens_per_step": tokens,
              "trainer_logged_tokens_per_sec": results.get("tokens_per_sec"),
              "overrides": base, "clock": clock_name, "device": device_name(device),
              "load_average": load_average()}
    print(f"Trainer path: {lightning * 1e3:,.1f} ms/step (train() of {warmup_steps + timed_steps} steps took "
          f"{long:.1f} s, of {warmup_steps} steps {short:.1f} s)", flush=True)
    print(f"Trainer ÷ plain loop = {lightning / plain:.3f} (target ≤ 1.10); the plain loop ran "
          f"{tokens / plain:,.0f} tokens/s on this clock, the ThroughputMonitor logged "
          f"{results.get('tokens_per_sec') or 0:,.0f} tokens/s (wall clock)", flush=True)
    (out / "overhead.json").write_text(json.dumps(report, indent=2))
    return report
