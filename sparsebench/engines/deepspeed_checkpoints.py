"""Checkpoints of DeepSpeed runs: DeepSpeed's partitioned files plus the sparsebench state.

A one-process run's checkpoint (:mod:`sparsebench.checkpoints`) holds the model and the
optimizer; under ZeRO the fp32 master weights and the Adam moments are partitioned over the
ranks, so a DeepSpeed run's checkpoint is a pair: DeepSpeed's ``engine.save_checkpoint`` folder
and rank 0's sparsebench file (masks, plugin states, random states, ledger, ...).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist

from sparsebench.checkpoints.checkpointer import Checkpointer
from sparsebench.checkpoints.files import CheckpointError, list_checkpoints, read_checkpoint, remove_checkpoint, write_checkpoint
from sparsebench.checkpoints.state import LoopState, capture
from sparsebench.engines.collectives import barrier, broadcast_object, is_rank0, world_size
from sparsebench.interrupts import InterruptGuard

if TYPE_CHECKING:
    from sparsebench.engines.deepspeed_engine import DeepSpeedEngine


class DeepSpeedCheckpointer(Checkpointer):
    """Checkpoints of a DeepSpeed run: DeepSpeed's files plus the sparsebench state.

    ``<run_dir>/deepspeed/ckpt-<step>/`` is written by ``engine.save_checkpoint`` (every rank
    writes its ZeRO partition of the master weights and Adam moments); then rank 0 writes
    ``<run_dir>/ckpt-<step>.pt`` as for one process (masks, plugin states, random states,
    ledger, ...), which commits the pair: a DeepSpeed folder without it is an unfinished write and
    is removed. Rank 0 chooses the checkpoint to resume from (the fallback loop of
    :class:`Checkpointer`) and tells the others; a resumed run must use the same number of ranks
    and ZeRO stage (DeepSpeed's partitions depend on both).
    """

    def __init__(self, setup: Any, run_dir: Path, resume: bool = False,
                 notify: Optional[Callable[[str], None]] = None, interrupt: Optional[InterruptGuard] = None):
        super().__init__(setup, resume, notify, interrupt)
        self.run_dir = Path(run_dir)
        self.engine: Optional["DeepSpeedEngine"] = None
        self._tag: Optional[str] = None

    @property
    def ds_dir(self) -> Path:
        return self.run_dir / "deepspeed"

    def _restore(self) -> Optional[LoopState]:
        found = self._newest_usable() if is_rank0() else None
        chosen = broadcast_object(str(found[0]) if found else None)
        if chosen is None:
            return None
        path = Path(chosen)
        state = found[1] if found else read_checkpoint(path)
        # The moments live in DeepSpeed's files (loaded in attach); the fresh optimizer keeps its own.
        state["optimizer"] = self.setup.run.optimizer.state_dict()
        self._tag = path.stem
        return self._apply(path, state)

    def _clean(self) -> None:
        """Also remove DeepSpeed folders without their committing file (all of them for a fresh start)."""
        super()._clean()
        committed = {path.stem for _, path in list_checkpoints(self.run_dir)}
        for folder in self.ds_dir.glob("ckpt-*") if self.ds_dir.is_dir() else []:
            if folder.name not in committed or not self.resume:
                shutil.rmtree(folder, ignore_errors=True)

    def _read_usable(self, path: Path) -> dict[str, Any]:
        if not (self.ds_dir / path.stem).is_dir():
            raise CheckpointError(f"{path.name}: its DeepSpeed folder deepspeed/{path.stem} is missing")
        return super()._read_usable(path)

    def _remove(self, path: Path) -> None:
        remove_checkpoint(path)
        shutil.rmtree(self.ds_dir / path.stem, ignore_errors=True)

    def _resume_note(self) -> str:
        return f", {world_size()} ranks"

    def _say(self, message: str) -> None:
        if is_rank0():
            super()._say(message)

    def attach(self, engine: "DeepSpeedEngine") -> None:
        """Keep the engine for saving; a resumed run loads DeepSpeed's checkpoint into it."""
        self.engine = engine
        if self._tag is not None:
            loaded, _ = engine.engine.load_checkpoint(
                str(self.ds_dir), tag=self._tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if loaded is None:
                raise CheckpointError(f"deepspeed/{self._tag}: DeepSpeed could not load it")

    @property
    def interrupted(self) -> bool:
        """Ctrl-C on any rank stops every rank after the same step (one tiny all-reduce)."""
        local = super().interrupted
        if world_size() == 1:
            return local
        flag = torch.tensor([float(local)], device=self.setup.run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _write(self, path: Path, loop: LoopState) -> None:
        assert self.engine is not None, "the DeepSpeed engine is attached before the first step"
        self.engine.engine.save_checkpoint(str(self.ds_dir), tag=path.stem, save_latest=False)
        barrier()  # every partition is on disk before rank 0 commits
        if is_rank0():
            state = capture(self.setup, loop)
            state["optimizer"] = {}  # in DeepSpeed's folder, partitioned
            write_checkpoint(path, state)
            self._prune()
        barrier()
