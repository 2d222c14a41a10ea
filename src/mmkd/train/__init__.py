"""Training: the loop, distributed helpers and atomic, resumable checkpoints."""
