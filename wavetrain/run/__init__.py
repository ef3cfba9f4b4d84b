"""One training run's directory and its reliability: exact resume, atomic checkpoints, preemption, divergence guard.

- :mod:`wavetrain.run.rundir`: the run directory (lock, results, metrics log, W&B id);
- :mod:`wavetrain.run.resume`: where a run starts (newest readable checkpoint, config compatibility);
- :mod:`wavetrain.run.checkpoint_io`: atomic checkpoint files with a recorded SHA-256, checked reads;
- :mod:`wavetrain.run.preemption`: signals, step-boundary checkpoints, requeue;
- :mod:`wavetrain.run.guards`: the NaN/inf guard;
- :mod:`wavetrain.run.determinism`: the training RNG stream and the run-position sampler.
"""
