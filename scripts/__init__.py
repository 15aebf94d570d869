"""Tools beside the trainer, and the analysis modules they share (experiment_*, flops)."""
