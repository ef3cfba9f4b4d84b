"""One training run's directory and its reliability: one owner, exact resume, atomic checkpoints, preemption,
divergence guard.

- :mod:`wavetrain.run.rundir`: :class:`~wavetrain.run.rundir.RunDir`, the directory's one owner: lock -> checks ->
  resume plan -> first write -> fit -> results, in that order;
- :mod:`wavetrain.run.resume`: where a run starts (newest readable checkpoint, config/model/vocabulary fit, tidy-up);
- :mod:`wavetrain.run.checkpoint_io`: atomic checkpoint files with a recorded SHA-256, ``weights_only`` reads;
- :mod:`wavetrain.run.preemption`: signals, step-boundary checkpoints, requeue;
- :mod:`wavetrain.run.guards`: the NaN/inf guard;
- :mod:`wavetrain.run.determinism`: the training RNG stream and the run-position sampler;
- :mod:`wavetrain.run.lock`, :mod:`~wavetrain.run.results`, :mod:`~wavetrain.run.logs`: the directory lock,
  results.json, metrics.csv and the W&B run id.
"""
