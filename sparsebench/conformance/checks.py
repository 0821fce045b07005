"""The conformance kit's checks: plain functions raising ``AssertionError`` with the reason.

Each takes what :func:`~sparsebench.conformance.tiny_runs.run_kit` recorded (a
:class:`~sparsebench.conformance.tiny_runs.KitRecord`) and the method class; they work inside
or outside pytest.
"""

from __future__ import annotations

import io
import math
from typing import Any, Optional

from sparsebench.conformance.tiny_runs import KitRecord, _tensor_equal


def check_config(method_cls: type, overrides: Optional[dict] = None) -> None:
    """``Config()`` works with defaults only, round-trips through JSON, documents every option,
    and accepts ``overrides``."""
    from pydantic import ValidationError

    from sparsebench.errors import PluginError
    from sparsebench.methods import check_method_class

    try:
        check_method_class(method_cls, "conformance kit")
    except PluginError as exc:
        raise AssertionError(str(exc)) from None
    config_cls = method_cls.Config
    defaults = config_cls()
    dumped = defaults.model_dump(mode="json")
    assert config_cls(**dumped) == defaults, (
        f"method '{method_cls.name}': Config defaults do not survive a JSON round trip ({dumped})"
    )
    undocumented = [n for n, f in config_cls.model_fields.items() if not f.description]
    assert not undocumented, (
        f"method '{method_cls.name}': options without a description (Field(..., description=...)): "
        + ", ".join(undocumented)
    )
    try:
        config_cls(**(overrides or {}))
    except ValidationError as exc:
        raise AssertionError(f"method '{method_cls.name}': the kit's overrides are invalid: {exc}") from None


def _require_run(record: KitRecord) -> None:
    assert record.error is None, f"the kit's tiny run failed: {record.error}"


def check_initial_masks(record: KitRecord, method_cls: type, sparsity: float, tolerance: float) -> None:
    """Initial masks cover every sparsifiable weight with its shape and are at the target
    density, or the model starts dense and the class declares ``changes_density = True``."""
    _require_run(record)
    assert set(record.initial_masks) == set(record.sparsifiable), "initial masks do not cover the sparsifiable weights"
    for name, mask in record.initial_masks.items():
        assert tuple(mask.shape) == record.sparsifiable[name], f"initial mask of '{name}' has the wrong shape"
    if getattr(method_cls, "ignores_sparsity", False):
        return
    density = KitRecord.density(record.initial_masks)
    if density == 1.0:
        assert getattr(method_cls, "changes_density", False), (
            f"method '{method_cls.name}' starts dense but does not declare changes_density = True, "
            f"so it can never reach the target sparsity {sparsity}"
        )
        return
    assert abs(density - (1.0 - sparsity)) <= tolerance, (
        f"method '{method_cls.name}': initial density {density:.4f}, target {1.0 - sparsity:.4f} "
        f"(tolerance {tolerance})"
    )


def check_updates(record: KitRecord, method_cls: type) -> int:
    """Every mask change kept shapes and dtype, did not edit the current masks in place and
    (unless ``changes_density``) kept each **logical** layer's active count — GPT-2's fused
    ``c_attn`` must keep the count of its q, k and v parts separately. Returns the number of changes."""
    _require_run(record)
    keeps_counts = not getattr(method_cls, "changes_density", False)
    for change in record.changes:
        assert not change.problems, f"step {change.step}: " + "; ".join(change.problems)
        if keeps_counts:
            moved = {n: (change.old_counts[n], c) for n, c in change.new_counts.items()
                     if n in change.old_counts and change.old_counts[n] != c}
            assert not moved, (
                f"step {change.step}: active counts changed (logical layer: before → after) "
                + ", ".join(f"{n}: {a} → {b}" for n, (a, b) in moved.items())
            )
    return len(record.changes)


def check_final_density(record: KitRecord, method_cls: type, sparsity: float, tolerance: float) -> None:
    """At the end of training the masks are at the target density."""
    _require_run(record)
    if getattr(method_cls, "ignores_sparsity", False):
        return
    density = KitRecord.density(record.final_masks)
    assert abs(density - (1.0 - sparsity)) <= tolerance, (
        f"method '{method_cls.name}': final density {density:.4f}, target {1.0 - sparsity:.4f} (tolerance {tolerance})"
    )


def check_state_dict(record: KitRecord, method_cls: type, overrides: Optional[dict] = None) -> None:
    """``state_dict()`` of the trained instance survives ``torch.save`` / ``torch.load(weights_only=True)``
    and a fresh instance's ``load_state_dict`` → ``state_dict()`` reproduces it."""
    import torch

    _require_run(record)
    state = record.method.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        loaded = torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise AssertionError(
            f"method '{method_cls.name}': state_dict() holds something torch.load(weights_only=True) refuses "
            f"(use tensors, numbers, strings, lists and dicts): {exc}"
        ) from None
    fresh = method_cls(method_cls.Config(**(overrides or {})))
    fresh.load_state_dict(loaded)
    difference = _first_difference(fresh.state_dict(), state)
    assert difference is None, f"method '{method_cls.name}': state_dict round trip differs at {difference}"


def check_determinism(first: KitRecord, second: KitRecord) -> None:
    """Two runs with the same seed end with the same masks and made the same changes."""
    _require_run(first)
    _require_run(second)
    for label, a, b in (("initial", first.initial_masks, second.initial_masks),
                        ("final", first.final_masks, second.final_masks)):
        differ = [n for n in a if not _tensor_equal(a[n], b[n])]
        assert not differ, f"the same seed gave different {label} masks for {', '.join(differ)} (use run.generator)"
    assert [c.step for c in first.changes] == [c.step for c in second.changes], "the same seed changed masks at different steps"


def _first_difference(a: Any, b: Any, path: str = "state") -> Optional[str]:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _tensor_equal(a, b)
        return None if ok else path
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path} (keys {sorted(map(str, set(a) ^ set(b)))})"
        for key in a:
            found = _first_difference(a[key], b[key], f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{path} ({a!r} vs {b!r})"
