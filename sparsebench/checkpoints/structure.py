"""The shape of a checkpoint's contents, checked before any of it is applied to a run.

A checkpoint whose checksum is valid may still not be one this run can load: written by a
buggy or other version, or crafted by hand (``step: "abc"``, an empty optimizer state, a
``model`` that is not a mapping). Each such case is a one-line :class:`CheckpointError`, so the
fallback loop of :class:`~sparsebench.checkpoints.Checkpointer` treats it as a corrupt file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, NoReturn

import torch

from sparsebench.checkpoints.files import CheckpointError

if TYPE_CHECKING:
    from sparsebench.run_setup import Setup


def _refuse(name: str, what: str) -> NoReturn:
    raise CheckpointError(f"{name}: {what}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensor_map(state: Any, key: str, expected: Mapping[str, torch.Tensor], name: str, bool_only: bool = False) -> None:
    """``state`` maps exactly the names of ``expected`` to tensors of the same shapes."""
    if not isinstance(state, Mapping):
        _refuse(name, f"its {key}: a {type(state).__name__}, not a mapping of tensors")
    if set(state) != set(expected):
        _refuse(name, f"its {key} do not match this run's ({len(state)} entries, this run has {len(expected)})")
    for n, t in state.items():
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(expected[n].shape):
            _refuse(name, f"its {key} do not match this run's: entry {n!r}")
        if bool_only and t.dtype != torch.bool:
            _refuse(name, f"its {key} entry {n!r} is {t.dtype}, not a boolean mask")


def check_optimizer(setup: "Setup", state: Any, name: str) -> None:
    """An optimizer state this run's optimizer can load: same groups, state per known parameter."""
    if not isinstance(state, Mapping) or not isinstance(state.get("state"), Mapping) \
            or not isinstance(state.get("param_groups"), list):
        _refuse(name, "its optimizer state is not an optimizer's state_dict (state, param_groups)")
    groups = setup.run.optimizer.param_groups
    saved = state["param_groups"]
    if len(saved) != len(groups) or any(
        not isinstance(s, Mapping) or not isinstance(s.get("params"), list) or len(s["params"]) != len(g["params"])
        for s, g in zip(saved, groups)
    ):
        _refuse(name, "its optimizer state has other parameter groups than this run's optimizer")
    params = {pid: p for s, g in zip(saved, groups) for pid, p in zip(s["params"], g["params"])}
    for pid, entry in state["state"].items():
        if pid not in params or not isinstance(entry, Mapping):
            _refuse(name, f"its optimizer state has an entry for an unknown parameter {pid!r}")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(params[pid].shape):
                _refuse(name, f"its optimizer state {key!r} of parameter {pid!r} has the wrong shape")


def check_rng(state: Any, name: str) -> None:
    """Random states of the kinds :func:`~sparsebench.checkpoints.state.restore_rng` puts back."""
    def byte_tensor(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == torch.uint8

    if not isinstance(state, Mapping):
        _refuse(name, "its random states are not a mapping")
    n = state.get("numpy")
    ok = (
        byte_tensor(state.get("torch")) and byte_tensor(state.get("run_generator"))
        and isinstance(n, Mapping) and isinstance(n.get("kind"), str) and isinstance(n.get("keys"), torch.Tensor)
        and _is_int(n.get("pos")) and _is_int(n.get("has_gauss")) and _is_number(n.get("cached_gaussian"))
        and isinstance(state.get("python"), tuple)
        and isinstance(state.get("sampler"), Mapping) and isinstance(state.get("heldout"), Mapping)
    )
    if not ok:
        _refuse(name, "its random states are incomplete or of the wrong kinds")


def check_structure(setup: "Setup", state: dict[str, Any], name: str, optimizer: bool = True) -> None:
    """Refuse a checkpoint whose contents have the wrong kinds or shapes for this run.

    ``optimizer=False``: the optimizer state is kept elsewhere (DeepSpeed's partitioned files).
    """
    run = setup.run
    if not isinstance(state["run_id"], str):
        _refuse(name, "its run_id is not a string")
    if not _is_int(state["step"]) or not 0 <= state["step"] <= run.total_steps:
        _refuse(name, f"its step {state['step']!r} is not a whole number in 0..{run.total_steps}")
    _tensor_map(state["model"], "model weights", run.model.state_dict(), name)
    for key in ("masks", "initial_masks"):
        _tensor_map(state[key], key, run.sparsifiable, name, bool_only=True)
    if optimizer:
        check_optimizer(setup, state["optimizer"], name)
    if not isinstance(state["plugins"], Mapping):
        _refuse(name, "its plugin states are not a mapping")
    check_rng(state["rng"], name)
    ledger = state["ledger"]
    if not isinstance(ledger, Mapping) or not isinstance(ledger.get("by_name"), Mapping) or not all(
        _is_number(ledger.get(k)) for k in ("dense_total", "steps", "tokens")
    ):
        _refuse(name, "its FLOPs ledger is incomplete")
    numbers = {"hook_seconds": state["hook_seconds"], "timings": state["timings"]}
    for key, value in numbers.items():
        if not isinstance(value, Mapping) or not all(_is_number(v) for v in value.values()):
            _refuse(name, f"its {key} are not a mapping of numbers")
    for key in ("peak_memory_bytes", "metrics_offset"):
        if not _is_int(state[key]) or state[key] < 0:
            _refuse(name, f"its {key} {state[key]!r} is not a whole number ≥ 0")
    if not isinstance(state["metrics_pending"], Mapping):
        _refuse(name, "its metrics_pending is not a mapping")
