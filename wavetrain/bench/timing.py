"""How a case is timed: warm-up, then repeated runs within a per-case budget, with the peak memory.

On CUDA every run is timed by a pair of CUDA events recorded around it on the stream (no host synchronisation
between runs, so the launch queue stays full as in training); on a CPU by the wall clock or this process's CPU time
(``--clock process``).  A case reports the median and the interquartile spread of its runs.  Cases whose predicted
time or memory (extrapolated from the shorter lengths of the same variant) exceeds the budget are skipped with a
note, and so are the longer lengths of that variant; an error is reported in the case's note and the benchmark
goes on.
"""
from __future__ import annotations

import ctypes
import gc
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from wavetrain.bench.cases import Settings

MIN_TIMED_RUNS = 3  # a case is only started when warm-up + this many runs fit the budget


# ------------------------------------------------------------------------------------------------ memory
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _proc_status_kib(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory of the runs between :meth:`start` and :meth:`peak`, above the level at :meth:`start`.

    CUDA: the caching allocator's ``max_memory_allocated``.  CPU: the resident-set high-water mark (VmHWM), reset
    through /proc/self/clear_refs after returning freed heap pages to the system (malloc_trim), so memory reused from
    an earlier case is counted again; None where /proc does not allow it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.base = -1
            return
        self.base = (_proc_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> float | None:
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device) - self.base)
        high = _proc_status_kib("VmHWM")
        if self.base < 0 or high is None:
            return None
        return float(max(high * 1024 - self.base, 0))


def default_memory_limit(device: torch.device) -> float:
    """Half of the memory available now on CPU (the machine is shared), 90% of the GPU's memory on CUDA."""
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory
    try:
        available = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        return 0.5 * int(available.group(1)) * 1024
    except (OSError, AttributeError):
        return 8 * 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ measurement
@dataclass
class Measurement:
    """One case: the median seconds of ``runs`` timed runs, their interquartile range relative to the median, the
    peak memory, the seconds of the first (compiling) call when the case is compiled, and a note."""
    median_s: float | None = None
    runs: int = 0
    peak_bytes: float | None = None
    note: str = ""
    spread: float | None = None
    compile_s: float | None = None


@dataclass
class Track:
    """What earlier lengths of one (variant, measure) say about the next: points (N, seconds, bytes) and whether
    it stopped (a longer length cannot fit where a shorter one did not)."""
    points: list[tuple[int, float, float | None]] = field(default_factory=list)
    stopped: str = ""

    def stop(self, n_tokens: int, reason: str) -> Measurement:
        """Skip this length for ``reason`` and every longer one with a note pointing here."""
        self.stopped = f"skipped: N={n_tokens} was already skipped ({reason})"
        return Measurement(note=f"skipped: {reason}")

    def _predict(self, n_tokens: int, index: int, low: float, high: float) -> float | None:
        usable = [p for p in self.points if p[index] is not None and p[index] > 0]
        if not usable:
            return None
        exponent = 2.0  # one point only: assume quadratic growth
        if len(usable) >= 2:
            (n1, value1), (n2, value2) = ((p[0], p[index]) for p in usable[-2:])
            exponent = math.log(value2 / value1) / math.log(n2 / n1)
        exponent = min(max(exponent, low), high)
        n_last, value = usable[-1][0], usable[-1][index]
        return value * (n_tokens / n_last) ** exponent

    def predicted_seconds(self, n_tokens: int) -> float | None:
        return self._predict(n_tokens, 1, 1.0, 3.0)

    def predicted_bytes(self, n_tokens: int) -> float | None:
        return self._predict(n_tokens, 2, 1.0, 2.5)


def out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text \
        or "not enough memory" in text or "can't allocate memory" in text


def describe_error(error: BaseException) -> str:
    """``error: Type: first line`` of the innermost cause (hydra wraps a constructor's ValueError, for example)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"error: {type(error).__name__}: {lines[0][:200]}" if lines else f"error: {type(error).__name__}"


def relative_spread(times: list[float]) -> float | None:
    """Interquartile range over the median of ``times`` (None for fewer than two runs)."""
    if len(times) < 2:
        return None
    low, _, high = statistics.quantiles(times, n=4, method="inclusive")
    return (high - low) / statistics.median(times)


def timed_runs(run: Callable[[], None], settings: Settings, count: int) -> list[float]:
    """Seconds of ``count`` consecutive runs: CUDA events around each run on a GPU (one synchronisation at the
    end), the chosen clock around each run elsewhere."""
    if settings.device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(count)]
        sync(settings.device)
        for start, end in events:
            start.record()
            run()
            end.record()
        sync(settings.device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(count):
        start = settings.now()
        run()
        times.append(settings.now() - start)
    return times


def _first_call(run: Callable[[], None], settings: Settings) -> float:
    sync(settings.device)
    start = time.perf_counter()
    run()
    sync(settings.device)
    return time.perf_counter() - start


def measure_case(make: Callable[[], Callable[[], None]], settings: Settings, track: Track,
                 n_tokens: int) -> Measurement:
    """Warm-up, then up to ``settings.repeats`` timed runs within the per-case budget; skips with a note when the
    prediction from shorter lengths says the case cannot fit (time or memory).  A compiled case first makes one
    untimed call (the compilation, reported as ``compile_s``), outside the budget."""
    if track.stopped:
        return Measurement(note=track.stopped)
    predicted = track.predicted_seconds(n_tokens)
    if predicted is not None and predicted * (settings.warmup + MIN_TIMED_RUNS) > settings.budget:
        return track.stop(n_tokens, f"predicted {predicted:.1f} s per run, {settings.warmup} warm-up + "
                                    f"{MIN_TIMED_RUNS} runs exceed the {settings.budget:.0f} s budget")
    predicted_memory = track.predicted_bytes(n_tokens)
    if predicted_memory is not None and predicted_memory > settings.max_memory:
        return track.stop(n_tokens, f"predicted {predicted_memory / 2**30:.1f} GiB exceeds the "
                                    f"{settings.max_memory / 2**30:.1f} GiB memory limit")
    memory = PeakMemory(settings.device)
    run = None
    try:
        run = make()
        compile_s = _first_call(run, settings) if settings.compile else None
        memory.start()
        spent = sum(timed_runs(run, settings, 1)[0] for _ in range(settings.warmup))
        per_run = spent / max(settings.warmup, 1)
        if settings.warmup and per_run > settings.budget:
            skipped = track.stop(n_tokens, f"one run took {per_run:.1f} s, over the {settings.budget:.0f} s budget")
            skipped.peak_bytes = memory.peak()
            return skipped
        runs = settings.repeats if not settings.warmup else \
            max(1, min(settings.repeats, int((settings.budget - spent) / max(per_run, 1e-9))))
        times = timed_runs(run, settings, runs)
        result = Measurement(statistics.median(times), runs, memory.peak(), spread=relative_spread(times),
                             compile_s=compile_s)
        if runs < settings.repeats:
            result.note = f"{runs} of {settings.repeats} runs (budget)"
        track.points.append((n_tokens, result.median_s, result.peak_bytes))
        return result
    except Exception as error:  # noqa: BLE001 - a failing case is reported in the table, the benchmark goes on
        if not out_of_memory(error):
            return Measurement(note=describe_error(error))
        return track.stop(n_tokens, "out of memory")
    finally:
        del run
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
        if settings.compile:
            torch._dynamo.reset()  # every case compiles afresh: no recompile limit reached across variants
