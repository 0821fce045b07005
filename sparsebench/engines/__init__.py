"""Execution engines: how a training step runs, on one process or on several.

- :mod:`~sparsebench.engines.base`: the :class:`Engine` interface the loop talks to;
- :mod:`~sparsebench.engines.local`: :class:`LocalEngine`, one process;
- :mod:`~sparsebench.engines.deepspeed_engine`: :class:`DeepSpeedEngine`, ZeRO 0–2 over ranks,
  with its config (:mod:`~sparsebench.engines.deepspeed_config`) and checkpoints
  (:mod:`~sparsebench.engines.deepspeed_checkpoints`);
- :mod:`~sparsebench.engines.collectives`: the process group and what ranks exchange;
- :mod:`~sparsebench.engines.mask_ops`: validating masks, applying a change, keeping weights masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from sparsebench.checkpoints.checkpointer import Checkpointer
from sparsebench.engines.base import Engine
from sparsebench.engines.deepspeed_checkpoints import DeepSpeedCheckpointer
from sparsebench.engines.deepspeed_config import uses_deepspeed
from sparsebench.engines.deepspeed_engine import DeepSpeedEngine
from sparsebench.engines.local import LocalEngine
from sparsebench.interrupts import InterruptGuard

if TYPE_CHECKING:
    from sparsebench.run_setup import Setup

__all__ = ["Engine", "LocalEngine", "DeepSpeedEngine", "make_engine", "make_checkpointer"]


def make_engine(setup: "Setup") -> Engine:
    """The engine of a run: :class:`DeepSpeedEngine` for ``distributed.backend: deepspeed``, else local."""
    return DeepSpeedEngine(setup) if uses_deepspeed(setup.run.config) else LocalEngine(setup)


def make_checkpointer(
    setup: "Setup", run_dir: Optional[Path], resume: bool,
    notify: Optional[Callable[[str], None]] = None, interrupt: Optional[InterruptGuard] = None,
) -> Checkpointer:
    """The checkpointer of a run: DeepSpeed's for a ``backend: deepspeed`` run with a folder."""
    if uses_deepspeed(setup.run.config) and run_dir is not None:
        return DeepSpeedCheckpointer(setup, run_dir, resume, notify, interrupt)
    return Checkpointer(setup, resume, notify, interrupt)
