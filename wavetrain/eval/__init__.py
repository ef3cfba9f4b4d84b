"""Evaluations of trained checkpoints beyond the validation loss (``wavetrain.eval.passkey``: DWARF §5)."""
