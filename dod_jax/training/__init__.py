"""Training: the stage steps, a run, checkpoints."""
