"""What a checkpoint holds: capturing a run's state, checking it fits, putting it back.

The state: the model, the optimizer, the current and the initial masks, every plugin's
``state_dict()`` under its registered name, every random state (torch, CUDA, numpy, python,
``run.generator``, the data sampler, the held-out pool's position), the step, the FLOPs ledger,
the hook timers, the wall times accumulated so far, the peak memory so far, and the length of
``metrics.jsonl`` at that step (with anything logged for the next record). The learning-rate
schedule is a function of the step, so it has no state of its own.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sparsebench.checkpoints.files import FORMAT_VERSION, CheckpointError
from sparsebench.checkpoints.structure import check_structure
from sparsebench.errors import PluginError

if TYPE_CHECKING:
    from sparsebench.run_setup import Setup


@dataclass
class LoopState:
    """What the training loop carries from step to step beside the run's own state."""

    initial_masks: dict[str, torch.Tensor]
    #: accumulated wall times (the fields of ``loop.Timings``); ``total_s`` is the time so far
    timings: dict[str, float]
    peak_memory_bytes: int


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


def check_compatible(setup: Setup, state: dict[str, Any], name: str, optimizer: bool = True) -> None:
    """Refuse a checkpoint that another run (or another version of this one) wrote, or whose contents
    have the wrong kinds or shapes (:func:`~sparsebench.checkpoints.structure.check_structure`)."""
    if state["run_id"] != setup.run.config.run_id:
        raise CheckpointError(f"{name}: written by run '{state['run_id']}', not by this run")
    check_structure(setup, state, name, optimizer)
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
