"""Starting worker processes: locally (vptrain spawns them), under torchrun, or under srun."""
