"""Training: the loop, distillation losses, atomic checkpoints, resume, distributed data parallel.

Threads: :class:`TrainConfig` ``threads=1`` (default) sets one PyTorch thread per process; on the
2-core machines this project targets, small models train several times faster that way than with
PyTorch's default, and DDP runs one process per core.
"""

from .distill import distillation_loss
from .checkpoint import CorruptCheckpointError, latest_checkpoint, load_checkpoint, read_state, save_checkpoint, verify_checkpoint
from .loop import NonFiniteLossError, TrainConfig, batch_indices, evaluate, lr_factor, param_groups, train

__all__ = [
    "TrainConfig",
    "NonFiniteLossError",
    "train",
    "evaluate",
    "lr_factor",
    "param_groups",
    "batch_indices",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "read_state",
    "verify_checkpoint",
    "CorruptCheckpointError",
    "distillation_loss",
]
