"""Benchmarks: every attention variant against torch SDPA, the framework's overhead, and the GPU check.

    python -m wavetrain.bench [--attention standard,wavefield,...] [--lengths 512,...,16384] [--device cpu|cuda]
    python -m wavetrain.bench --overhead              # Lightning Trainer step vs a hand-written PyTorch loop
    python -m wavetrain.bench --suite gpu --out DIR   # CUDA tests + the issue-15 GPU tables in ~5 minutes

Length scaling (the default mode): for every variant and length N, after warm-up, the median of repeated runs of
- ``fwd``: the attention module alone, inference forward (eval mode, no autograd graph);
- ``fwd+bwd``: the attention module alone, training forward then backward of a fixed random cotangent;
- ``step``: one full model step (forward + cross-entropy + backward + AdamW step);
with the module/model built from the composed config (``attention=<variant>``, the chosen width, heads and depth,
``seq_len`` = N), the peak memory above the pre-run baseline, tokens/s, the growth exponent between lengths, the
speed ratio t_SDPA / t_variant measured in the same run and the analytic FLOPs of wavetrain/flops.py (spec
wavefield.md §5 "fair measured comparison").  Writes bench.md, bench.csv and bench.png to --out.  Timings on a
shared machine are noisy: the load average is recorded with them, and ``--threads 1 --clock process`` (this
process's CPU time) measures the work itself when other jobs compete for the cores.  ``--compile`` times the
compiled modules; on CUDA every run is timed with CUDA events.

A variant is a conf/attention name, optionally with attention options after ``@``:
``wda@gate_pooling=prefix_mixdens`` is the WDA config with ``attention.gate_pooling=prefix_mixdens``.

Modules: cases (variants, settings, workloads), timing (measurement), report (tables, CSV, plot), scaling (the
length sweep), overhead (Trainer vs plain loop), gpu (the GPU check), cli (arguments).
"""
from wavetrain.bench.cases import BenchError, Settings, Variant, parse_variant, select_variants
from wavetrain.bench.cli import main
from wavetrain.bench.report import growth_exponent
from wavetrain.bench.timing import Measurement, Track, measure_case

__all__ = ["BenchError", "Measurement", "Settings", "Track", "Variant", "growth_exponent", "main", "measure_case",
           "parse_variant", "select_variants"]
