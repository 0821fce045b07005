"""Checkpoints: everything a run needs to continue bit for bit, written atomically, read as data.

- :mod:`~sparsebench.checkpoints.files`: ``ckpt-<step>.pt`` with its SHA-256, written and read;
- :mod:`~sparsebench.checkpoints.state`: what a checkpoint holds, captured from and applied to a run;
- :mod:`~sparsebench.checkpoints.checkpointer`: when the loop writes one and which one it resumes from.
"""

from sparsebench.checkpoints.checkpointer import RESUME_LOG, Checkpointer
from sparsebench.checkpoints.files import (
    CheckpointError,
    checkpoint_name,
    digest_path,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from sparsebench.checkpoints.state import LoopState

__all__ = [
    "RESUME_LOG", "Checkpointer", "CheckpointError", "LoopState", "checkpoint_name", "digest_path",
    "list_checkpoints", "read_checkpoint", "write_checkpoint",
]
