"""Post-training analyses of trained wavetrain models (diagnostics reports and plots)."""
