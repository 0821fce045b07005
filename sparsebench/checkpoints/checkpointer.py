"""The loop's side of checkpoints: when to write one, and which one to resume from.

Resuming (see :meth:`Checkpointer.start`): the run is built as for a fresh start (``configure``
and ``init_mask`` run again, so state a plugin derives from the config is rebuilt), then the
newest usable checkpoint overwrites the run's state (:mod:`sparsebench.checkpoints.state`),
``metrics.jsonl`` is truncated to its length at the checkpoint (records of steps after it are
written again), and the loop continues at the next step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from sparsebench.atomic import remove_stale_temporaries
from sparsebench.checkpoints.files import (
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    read_checkpoint,
    remove_checkpoint,
    remove_orphan_digests,
    write_checkpoint,
)
from sparsebench.checkpoints.state import LoopState, apply_checkpoint, capture, check_compatible, truncate_metrics
from sparsebench.errors import PluginError
from sparsebench.interrupts import InterruptGuard, RunInterrupted

if TYPE_CHECKING:
    from sparsebench.run_setup import Setup

RESUME_LOG = "resume.log"


class Checkpointer:
    """Writes a run's checkpoints into ``run.out_dir`` and restores the newest usable one.

    Without an ``out_dir`` (a run trained in memory) nothing is written or read. This is the
    checkpointer of the local engine; an engine that partitions the optimizer state over ranks
    brings a subclass (:func:`sparsebench.engines.make_checkpointer`), so a plain one stays off
    for such runs rather than write checkpoints that miss that state.

    :param resume: continue from a checkpoint if one is usable (else start fresh); ``False``
        removes any checkpoint already there and starts fresh.
    :param notify: receives one line per resume decision (also appended to ``resume.log``).
    :param interrupt: the Ctrl-C guard of the process, if installed.
    """

    def __init__(
        self,
        setup: "Setup",
        resume: bool = False,
        notify: Optional[Callable[[str], None]] = None,
        interrupt: Optional[InterruptGuard] = None,
    ):
        self.setup = setup
        local = setup.run.config.distributed.backend == "none"
        self.run_dir: Optional[Path] = setup.run.out_dir if local else None
        self._optimizer_in_file = local  # an engine that partitions it keeps the optimizer state in its own files
        t = setup.run.config.training
        # keep_checkpoints: 0 still keeps one while training (to resume from); the runner deletes it at the end
        self.every, self.keep, self.total = t.checkpoint_every, max(t.keep_checkpoints, 1), t.steps
        self.resume, self.notify, self.interrupt = resume, notify, interrupt
        self.latest: Optional[Path] = None
        self._saved_step: Optional[int] = None

    @property
    def enabled(self) -> bool:
        return self.run_dir is not None

    def start(self) -> Optional[LoopState]:
        """Restore the newest usable checkpoint (``None``: a fresh start); then arm Ctrl-C.

        A checkpoint that cannot be used is reported in one line and removed, and the next
        older one is tried; if none is usable the run starts from scratch (and says so).
        """
        restored = self._restore() if self.enabled else None
        if self.enabled and self.interrupt is not None:
            self.interrupt.armed = self.setup.run.step < self.total
        return restored

    def attach(self, engine: Any) -> None:
        """Called once the engine has started: the local engine keeps all its state in the run."""

    def _restore(self) -> Optional[LoopState]:
        found = self._newest_usable()
        return None if found is None else self._apply(*found)

    def _newest_usable(self) -> Optional[tuple[Path, dict[str, Any]]]:
        """The newest checkpoint that reads back and fits this run, with its state.

        The one fallback loop: each unusable checkpoint is removed with a one-line reason and
        the next older one tried; with none usable, every checkpoint is removed and the metrics
        log emptied (a fresh start).
        """
        assert self.run_dir is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._clean()
        candidates = list_checkpoints(self.run_dir) if self.resume else []
        for i, (_, path) in enumerate(candidates):
            try:
                state = self._read_usable(path)
            except CheckpointError as exc:
                self._remove(path)
                later = f"falling back to {candidates[i + 1][1].name}" if i + 1 < len(candidates) else "starting from scratch"
                self._say(f"{exc}; {later}")
                continue
            return path, state
        for _, path in list_checkpoints(self.run_dir):
            self._remove(path)
        truncate_metrics(self.setup, 0)
        return None

    def _clean(self) -> None:
        """Remove what a killed writer left: temporaries and hash files without their checkpoint."""
        assert self.run_dir is not None
        remove_stale_temporaries(self.run_dir)
        remove_orphan_digests(self.run_dir)

    def _read_usable(self, path: Path) -> dict[str, Any]:
        state = read_checkpoint(path)
        check_compatible(self.setup, state, path.name, optimizer=self._optimizer_in_file)
        return state

    def _remove(self, path: Path) -> None:
        remove_checkpoint(path)

    def _apply(self, path: Path, state: dict[str, Any]) -> LoopState:
        try:
            loop = apply_checkpoint(self.setup, state)
        except PluginError:
            raise
        except Exception as exc:  # what the structure checks did not foresee: this attempt fails, not the next
            self._remove(path)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"{path.name}: could not be applied ({type(exc).__name__}: {first}); removed it, the next attempt "
                "falls back to an older checkpoint or starts from scratch"
            ) from exc
        self.latest, self._saved_step = path, int(state["step"])
        self._say(f"resumed from {path.name} (step {state['step']} of {self.total}{self._resume_note()})")
        return loop

    def _resume_note(self) -> str:
        return ""

    def due(self, step: int) -> bool:
        """A checkpoint is due every ``checkpoint_every`` steps, at the last step and after Ctrl-C."""
        if not self.enabled:
            return False
        periodic = bool(self.every) and step % self.every == 0
        return periodic or step == self.total or self.interrupted

    @property
    def interrupted(self) -> bool:
        return self.interrupt is not None and self.interrupt.requested

    def save(self, loop: LoopState) -> Path:
        """Write the checkpoint of the current step (once per step) and prune old ones."""
        assert self.run_dir is not None
        step = self.setup.run.step
        if self._saved_step != step:
            path = self.run_dir / checkpoint_name(step)
            self._write(path, loop)
            self.latest, self._saved_step = path, step
        if step >= self.total and self.interrupt is not None:
            self.interrupt.armed = False  # the final evaluation is cheap to redo: Ctrl-C stops at once
        return self.latest  # type: ignore[return-value]

    def _write(self, path: Path, loop: LoopState) -> None:
        write_checkpoint(path, capture(self.setup, loop))
        self._prune()

    def _prune(self) -> None:
        for _, old in list_checkpoints(self.run_dir)[self.keep:]:
            self._remove(old)

    def stop_if_interrupted(self) -> None:
        """Raise :class:`RunInterrupted` at the end of a step after Ctrl-C (its checkpoint is written)."""
        if self.interrupted:
            run = self.setup.run
            raise RunInterrupted(run.config.run_id, run.step, self.latest)

    def _say(self, message: str) -> None:
        assert self.run_dir is not None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.run_dir / RESUME_LOG, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {message}\n")
        if self.notify is not None:
            self.notify(f"{self.setup.run.config.run_id}: {message}")
