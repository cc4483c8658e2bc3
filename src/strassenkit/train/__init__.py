"""Training: the loop, distillation losses, checkpoints, distributed data parallel."""
