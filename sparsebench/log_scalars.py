"""What the logger plugins write besides ``metrics.jsonl``'s records: mask scalars and final figures.

One definition for every observer (TensorBoard, W&B, CSV), re-exported by :mod:`sparsebench.api`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

#: the summary.json figures a logger writes at the end of a run, as ``final/<key>``
FINAL_KEYS = ("val_ppl", "test_ppl", "sparsity_actual", "train_flops_vs_dense", "inference_flops_vs_dense",
              "overhead_frac", "turnover")


def finite(value: Any) -> bool:
    """A real, finite number (not a bool, not NaN or inf): what a scalar logger can plot."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mask_scalars(run: Any, initial: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``density/<parameter>`` of every mask and ``mask/turnover``: the fraction of the active
    weights that were not active in ``initial`` (the masks when the logger started)."""
    values = {f"density/{name}": run.density(name) for name in run.masks}
    active = sum(int(m.sum()) for m in run.masks.values())
    moved = sum(int((m & ~initial[n]).sum()) for n, m in run.masks.items() if n in initial)
    values["mask/turnover"] = moved / max(active, 1)
    return values


def final_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """``final/<key>`` of :data:`FINAL_KEYS` and ``final_density/<layer>`` of every (logical) layer."""
    values = {f"final/{key}": summary[key] for key in FINAL_KEYS if finite(summary.get(key))}
    values.update({f"final_density/{name}": d for name, d in (summary.get("layer_density") or {}).items()})
    return values
