"""Checkpoints of DeepSpeed runs: DeepSpeed's partitioned files plus the sparsebench state.

A one-process run's checkpoint (:mod:`sparsebench.checkpoint`) holds the model and the optimizer;
under ZeRO the fp32 master weights and the Adam moments are partitioned over the ranks, so a
DeepSpeed run's checkpoint is a pair: DeepSpeed's ``engine.save_checkpoint`` folder and rank 0's
sparsebench file (masks, plugin states, random states, ledger, ...).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from sparsebench.checkpoint import (
    CheckpointError,
    Checkpointer,
    InterruptGuard,
    LoopState,
    truncate_metrics,
    apply_checkpoint,
    capture,
    check_compatible,
    checkpoint_name,
    list_checkpoints,
    read_checkpoint,
    remove_checkpoint,
    write_checkpoint,
)
from sparsebench.distributed import DeepSpeedTrainer, barrier, broadcast_object, is_rank0, uses_deepspeed, world_size
from sparsebench.results import remove_stale_temporaries


class DeepSpeedCheckpointer(Checkpointer):
    """Checkpoints of a DeepSpeed run: DeepSpeed's files plus the sparsebench state.

    ``<run_dir>/deepspeed/ckpt-<step>/`` is written by ``engine.save_checkpoint`` (every rank
    writes its ZeRO partition of the master weights and Adam moments); then rank 0 writes
    ``<run_dir>/ckpt-<step>.pt`` as for one process (masks, plugin states, random states,
    ledger, ...), which commits the pair: a DeepSpeed folder without it is an unfinished write and
    is removed. Rank 0 chooses the checkpoint to resume from and tells the others; a resumed run
    must use the same number of ranks and ZeRO stage (DeepSpeed's partitions depend on both).
    """

    def __init__(self, setup: Any, run_dir: Path, resume: bool = False,
                 notify: Optional[Callable[[str], None]] = None, interrupt: Optional[InterruptGuard] = None):
        super().__init__(setup, resume, notify, interrupt)
        self.run_dir = Path(run_dir)
        self.trainer: Optional[DeepSpeedTrainer] = None
        self._tag: Optional[str] = None

    @property
    def ds_dir(self) -> Path:
        return self.run_dir / "deepspeed"

    def _restore(self) -> Optional[LoopState]:
        chosen = broadcast_object(self._choose() if is_rank0() else None)
        if chosen is None:
            return None
        path = Path(chosen)
        state = read_checkpoint(path)
        # The moments live in DeepSpeed's files (loaded in attach); the fresh optimizer keeps its own.
        state["optimizer"] = self.setup.run.optimizer.state_dict()
        loop = apply_checkpoint(self.setup, state)
        self.latest, self._saved_step, self._tag = path, int(state["step"]), path.stem
        if is_rank0():
            self._say(f"resumed from {path.name} (step {state['step']} of {self.total}, {world_size()} ranks)")
        return loop

    def _choose(self) -> Optional[str]:
        """Rank 0: the newest usable checkpoint with its DeepSpeed folder; removes the unusable."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.run_dir)
        committed = {path.stem for _, path in list_checkpoints(self.run_dir)}
        for folder in self.ds_dir.glob("ckpt-*") if self.ds_dir.is_dir() else []:
            if folder.name not in committed or not self.resume:
                shutil.rmtree(folder, ignore_errors=True)
        candidates = list_checkpoints(self.run_dir) if self.resume else []
        for i, (_, path) in enumerate(candidates):
            try:
                if not (self.ds_dir / path.stem).is_dir():
                    raise CheckpointError(f"{path.name}: its DeepSpeed folder deepspeed/{path.stem} is missing")
                check_compatible(self.setup, read_checkpoint(path), path.name)
            except CheckpointError as exc:
                remove_checkpoint(path)
                shutil.rmtree(self.ds_dir / path.stem, ignore_errors=True)
                later = f"falling back to {candidates[i + 1][1].name}" if i + 1 < len(candidates) else "starting from scratch"
                self._say(f"{exc}; {later}")
                continue
            return str(path)
        for _, path in list_checkpoints(self.run_dir):
            remove_checkpoint(path)
        truncate_metrics(self.setup, 0)
        return None

    def attach(self, trainer: DeepSpeedTrainer) -> None:
        """Keep the engine for saving; a resumed run loads DeepSpeed's checkpoint into it."""
        self.trainer = trainer
        if self._tag is not None:
            loaded, _ = trainer.engine.load_checkpoint(
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

    def save(self, loop: LoopState) -> Path:
        step = self.setup.run.step
        if self._saved_step != step:
            assert self.trainer is not None, "the DeepSpeed engine is attached before the first step"
            path = self.run_dir / checkpoint_name(step)
            self.trainer.engine.save_checkpoint(str(self.ds_dir), tag=path.stem, save_latest=False)
            barrier()  # every partition is on disk before rank 0 commits
            if is_rank0():
                state = capture(self.setup, loop)
                state["optimizer"] = {}  # in DeepSpeed's folder, partitioned
                write_checkpoint(path, state)
                for _, old in list_checkpoints(self.run_dir)[self.keep:]:
                    remove_checkpoint(old)
                    shutil.rmtree(self.ds_dir / old.stem, ignore_errors=True)
            barrier()
            self.latest, self._saved_step = path, step
        if step >= self.total and self.interrupt is not None:
            self.interrupt.armed = False
        return self.latest  # type: ignore[return-value]


def make_checkpointer(
    setup: Any, run_dir: Optional[Path], resume: bool,
    notify: Optional[Callable[[str], None]] = None, interrupt: Optional[InterruptGuard] = None,
) -> Checkpointer:
    """The checkpointer of a run: DeepSpeed's for a ``backend: deepspeed`` run with a folder."""
    if uses_deepspeed(setup.run.config) and run_dir is not None:
        return DeepSpeedCheckpointer(setup, run_dir, resume, notify, interrupt)
    return Checkpointer(setup, resume, notify, interrupt)
