"""Checkpoints: everything a run needs to continue bit for bit, written atomically, read as data.

A checkpoint is ``ckpt-<step>.pt`` in the run's folder (the step zero-padded to 8 digits, so the
names sort) with its SHA-256 beside it in ``ckpt-<step>.pt.sha256``. It holds the model, the
optimizer, the current and the initial masks, every plugin's ``state_dict()`` under its
registered name, every random state (torch, CUDA, numpy, python, ``run.generator``, the data
sampler, the held-out pool's position), the step, the FLOPs ledger, the hook timers, the wall
times accumulated so far, the peak memory so far, and the length of ``metrics.jsonl`` at that
step (with anything logged for the next record). The learning-rate schedule is a function of the step, so it has no state of its own.

Writing: ``torch.save`` to a temporary file, hash it, write the hash, rename the file into place,
then remove checkpoints beyond the newest ``training.keep_checkpoints``; the previous checkpoint
stays until the new one is complete. Reading: the hash must match (a truncated or corrupt file
is refused), and ``torch.load(weights_only=True)`` refuses anything but tensors and plain data,
so loading a checkpoint never runs code.

Resuming (see :meth:`Checkpointer.start`): the run is built as for a fresh start (``configure``
and ``init_mask`` run again, so state a plugin derives from the config is rebuilt), then the
newest usable checkpoint overwrites all of the state above, ``metrics.jsonl`` is truncated to
its length at the checkpoint (records of steps after it are written again), and the loop
continues at the next step.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from sparsebench.errors import PluginError, SparsebenchError
from sparsebench.results import atomic_write_text, file_mode, remove_stale_temporaries
from sparsebench.run_setup import Setup

FORMAT_VERSION = 1
RESUME_LOG = "resume.log"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_REQUIRED = {
    "format", "run_id", "step", "model", "optimizer", "masks", "initial_masks", "plugins", "rng",
    "ledger", "hook_seconds", "timings", "peak_memory_bytes", "metrics_offset", "metrics_pending",
}


class CheckpointError(SparsebenchError):
    """A checkpoint cannot be used: truncated, corrupt, not data, or written by another run."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at the end of a step, after its checkpoint was written."""

    def __init__(self, run_id: str, step: int, checkpoint: Optional[Path]):
        super().__init__(f"run {run_id} interrupted after step {step}")
        self.run_id, self.step, self.checkpoint = run_id, step, checkpoint


@dataclass
class LoopState:
    """What the training loop carries from step to step beside the run's own state."""

    initial_masks: dict[str, torch.Tensor]
    #: accumulated wall times (the fields of ``loop.Timings``); ``total_s`` is the time so far
    timings: dict[str, float]
    peak_memory_bytes: int


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoints in ``run_dir`` as (step, path), newest first."""
    found = []
    for path in Path(run_dir).glob("ckpt-*.pt"):
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    digest_path(path).unlink(missing_ok=True)


def _hash_and_sync(path: str) -> str:
    """SHA-256 of the file (read back from the page cache) after forcing it to disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Temporary file, hash, hash file, rename: a kill at any instant leaves no torn checkpoint."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        atomic_write_text(digest_path(path), f"{_hash_and_sync(tmp)}  {path.name}\n")
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Verify the hash and load the checkpoint as data; any problem is a one-line CheckpointError."""
    path = Path(path)
    try:
        expected = digest_path(path).read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        raise CheckpointError(f"{path.name}: its checksum file {digest_path(path).name} is missing or empty") from None
    if file_sha256(path) != expected:
        raise CheckpointError(f"{path.name}: checksum mismatch (the file is truncated or corrupt)")
    try:
        # Tensors return to the device they were saved from, or to the CPU on a machine without a GPU.
        state = torch.load(path, map_location=None if torch.cuda.is_available() else "cpu", weights_only=True)
    except Exception as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise CheckpointError(
                f"{path.name}: refused by torch.load(weights_only=True): it holds objects other than "
                "tensors and plain data"
            ) from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path.name}: unreadable ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path.name}: not a sparsebench checkpoint of format {FORMAT_VERSION}")
    missing = sorted(_REQUIRED - set(state))
    if missing:
        raise CheckpointError(f"{path.name}: incomplete checkpoint, missing {', '.join(missing)}")
    return state


# --------------------------------------------------------------------------------------------
# what is saved
# --------------------------------------------------------------------------------------------

_LEAF_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_SEQUENCE_TYPES = (list, tuple, set, torch.Size)
_MAPPING_TYPES = (dict, OrderedDict)


def check_loadable(value: Any, where: str) -> None:
    """Refuse a value that ``torch.load(weights_only=True)`` could not read back, naming its place.

    Allowed: tensors, bool/int/float/complex/str/bytes/None, torch dtypes and devices, and
    lists, tuples, sets and dicts of them. Types are checked exactly: a numpy scalar is a ``float``
    subclass that weights-only loading refuses.
    """
    if isinstance(value, torch.Tensor) or type(value) in _LEAF_TYPES:
        return
    if type(value) in _SEQUENCE_TYPES:
        for i, item in enumerate(value):
            check_loadable(item, f"{where}[{i}]")
        return
    if type(value) in _MAPPING_TYPES:
        for key, item in value.items():
            check_loadable(key, f"{where} key {key!r}")
            check_loadable(item, f"{where}[{key!r}]")
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    raise CheckpointError(
        f"{where}: a {kind} cannot be loaded with torch.load(weights_only=True); "
        "use tensors, numbers, strings, lists, tuples and dicts"
    )


def _stateful_plugins(setup: Setup) -> dict[str, Any]:
    return {
        name: plugin
        for name, plugin in setup.hooks.pm.list_name_plugin()
        if callable(getattr(plugin, "state_dict", None))
    }


def plugin_states(setup: Setup) -> dict[str, Any]:
    """Every plugin's ``state_dict()`` under its registered name, checked to be weights-only data."""
    states = {}
    for name, plugin in _stateful_plugins(setup).items():
        try:
            state = plugin.state_dict()
        except Exception as exc:
            raise PluginError(f"plugin '{name}' raised in state_dict(): {type(exc).__name__}: {exc}") from exc
        try:
            check_loadable(state, "state_dict()")
        except CheckpointError as exc:
            raise PluginError(f"plugin '{name}': {exc}") from None
        states[name] = state
    return states


def capture_rng(setup: Setup) -> dict[str, Any]:
    run = setup.run
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # weights-only loading refuses ndarrays: numpy's key vector travels as a tensor
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "run_generator": run.generator.get_state(),
        "sampler": setup.sampler.state_dict(),
        "heldout": run.heldout.state_dict(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(setup: Setup, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    setup.run.generator.set_state(state["run_generator"])
    setup.sampler.load_state_dict(state["sampler"])
    setup.run.heldout.load_state_dict(state["heldout"])


def _metrics_size(setup: Setup) -> int:
    path = setup.run.metrics.path
    return path.stat().st_size if path is not None and path.exists() else 0


def capture(setup: Setup, loop: LoopState) -> dict[str, Any]:
    """The checkpoint of ``setup`` at the end of step ``run.step``."""
    run = setup.run
    return {
        "format": FORMAT_VERSION,
        "run_id": run.config.run_id,
        "step": int(run.step),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "masks": dict(run.masks),
        "initial_masks": dict(loop.initial_masks),
        "plugins": plugin_states(setup),
        "rng": capture_rng(setup),
        "ledger": run.ledger.state_dict(),
        "hook_seconds": dict(setup.timer.seconds),
        "timings": {k: float(v) for k, v in loop.timings.items()},
        "peak_memory_bytes": int(loop.peak_memory_bytes),
        "metrics_offset": _metrics_size(setup),  # every record is flushed as it is written
        "metrics_pending": _pending_metrics(setup),
    }


def _pending_metrics(setup: Setup) -> dict[str, Any]:
    """What a plugin logged after the step's record was written (in ``on_log``): the next record's."""
    pending = dict(setup.run.metrics.pending)
    try:
        check_loadable(pending, "run.log(...)")
    except CheckpointError as exc:
        raise CheckpointError(f"cannot checkpoint a logged value: {exc}") from None
    return pending


# --------------------------------------------------------------------------------------------
# restoring
# --------------------------------------------------------------------------------------------


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def check_compatible(setup: Setup, state: dict[str, Any], name: str) -> None:
    """Refuse a checkpoint that another run (or another version of this one) wrote."""
    run = setup.run
    if state["run_id"] != run.config.run_id:
        raise CheckpointError(f"{name}: written by run '{state['run_id']}', not by this run")
    if not 0 <= int(state["step"]) <= run.total_steps:
        raise CheckpointError(f"{name}: step {state['step']} is outside 0..{run.total_steps}")
    if _shapes(state["model"]) != _shapes(run.model.state_dict()):
        raise CheckpointError(f"{name}: its model weights do not match this run's model")
    params = {n: p for n, p in run.sparsifiable.items()}
    for key in ("masks", "initial_masks"):
        if _shapes(state[key]) != _shapes(params):
            raise CheckpointError(f"{name}: its {key} do not match this run's sparsifiable weights")
    expected = set(_stateful_plugins(setup))
    if set(state["plugins"]) != expected:
        raise CheckpointError(
            f"{name}: holds the state of plugins {sorted(state['plugins'])}, this run has {sorted(expected)}"
        )


def truncate_metrics(setup: Setup, offset: int) -> None:
    path = setup.run.metrics.path
    if path is not None and path.exists() and path.stat().st_size > offset:
        # The log is open in append mode, so later records land at the new end.
        os.truncate(path, offset)


def apply_checkpoint(setup: Setup, state: dict[str, Any]) -> LoopState:
    """Overwrite the run's state with a checkpoint's (read and checked before)."""
    run = setup.run
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.masks = {n: m.to(run.sparsifiable[n].device) for n, m in state["masks"].items()}
    initial = {n: m.to(run.sparsifiable[n].device) for n, m in state["initial_masks"].items()}
    plugins = _stateful_plugins(setup)
    for name, plugin_state in state["plugins"].items():
        load = getattr(plugins[name], "load_state_dict", None)
        if not callable(load):
            raise PluginError(f"plugin '{name}' has state_dict() but no load_state_dict(state)")
        try:
            load(plugin_state)
        except Exception as exc:
            raise PluginError(f"plugin '{name}' raised in load_state_dict(): {type(exc).__name__}: {exc}") from exc
    run.ledger.load_state_dict(state["ledger"])
    setup.timer.seconds = dict(state["hook_seconds"])
    run.step = int(state["step"])
    # what configure/init_mask logged again belongs to no step; the checkpoint's pending values do
    run.metrics.pending = dict(state["metrics_pending"])
    truncate_metrics(setup, int(state["metrics_offset"]))
    restore_rng(setup, state["rng"])  # last: nothing above may draw from a restored generator
    return LoopState(initial, dict(state["timings"]), int(state["peak_memory_bytes"]))


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------


class InterruptGuard:
    """Makes Ctrl-C (SIGINT) stop a run at the end of a step, after a checkpoint.

    While *armed* (the training steps), the first Ctrl-C only sets ``requested``; the loop
    writes a checkpoint at the end of the step and raises :class:`RunInterrupted`. A second
    Ctrl-C, or one outside the steps, raises ``KeyboardInterrupt`` at once. The handler is
    installed only in the main thread and only where SIGINT has Python's default handler (a
    process started with SIGINT ignored keeps ignoring it).
    """

    def __init__(self) -> None:
        self.requested = False
        self.armed = False
        self._installed = False

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.armed or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step, once its checkpoint is written (Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# the loop's side
# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Writes a run's checkpoints into ``run.out_dir`` and restores the newest usable one.

    Without an ``out_dir`` (a run trained in memory) nothing is written or read.

    :param resume: continue from a checkpoint if one is usable (else start fresh); ``False``
        removes any checkpoint already there and starts fresh.
    :param notify: receives one line per resume decision (also appended to ``resume.log``).
    :param interrupt: the Ctrl-C guard of the process, if installed.
    """

    def __init__(
        self,
        setup: Setup,
        resume: bool = False,
        notify: Optional[Callable[[str], None]] = None,
        interrupt: Optional[InterruptGuard] = None,
    ):
        self.setup = setup
        # DeepSpeed keeps partitioned master weights and moments that these files do not hold:
        # its runs use distributed_checkpoints.DeepSpeedCheckpointer, which sets run_dir itself.
        deepspeed = setup.run.config.distributed.backend == "deepspeed"
        self.run_dir: Optional[Path] = None if deepspeed else setup.run.out_dir
        t = setup.run.config.training
        self.every, self.keep, self.total = t.checkpoint_every, max(t.keep_checkpoints, 1), t.steps  # 0: runner deletes at the end
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

    def _restore(self) -> Optional[LoopState]:
        assert self.run_dir is not None
        remove_stale_temporaries(self.run_dir)
        for digest in self.run_dir.glob("ckpt-*.pt.sha256"):  # a writer killed before its rename
            if not digest.with_suffix("").exists():
                digest.unlink()
        candidates = list_checkpoints(self.run_dir) if self.resume else []
        for i, (step, path) in enumerate(candidates):
            try:
                state = read_checkpoint(path)
                check_compatible(self.setup, state, path.name)
            except CheckpointError as exc:
                remove_checkpoint(path)
                later = f"falling back to {candidates[i + 1][1].name}" if i + 1 < len(candidates) else "starting from scratch"
                self._say(f"{exc}; {later}")
                continue
            loop = apply_checkpoint(self.setup, state)
            self.latest, self._saved_step = path, step
            self._say(f"resumed from {path.name} (step {step} of {self.total})")
            return loop
        for _, path in list_checkpoints(self.run_dir):
            remove_checkpoint(path)
        truncate_metrics(self.setup, 0)
        return None

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
            write_checkpoint(path, capture(self.setup, loop))
            self.latest, self._saved_step = path, step
            for _, old in list_checkpoints(self.run_dir)[self.keep:]:
                remove_checkpoint(old)
        if step >= self.total and self.interrupt is not None:
            self.interrupt.armed = False  # the final evaluation is cheap to redo: Ctrl-C stops at once
        return self.latest  # type: ignore[return-value]

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
