"""Training: the loss, one iteration (network and task-mask subnet), run folders and checkpoints, DDP."""
