"""The per-run context handed to every hook as ``run``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from sparsebench.data.batches import HeldoutPool
from sparsebench.config import RunConfig


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step.

    Everything logged during a step (by the harness or by plugins through ``run.log``) is merged
    into that step's record, which is written when the step ends.
    """

    def __init__(self, path: Optional[Path]):
        self.path = path
        self._file: Optional[TextIO] = open(path, "a", encoding="utf-8") if path else None
        self.pending: dict[str, Any] = {}

    def add(self, values: dict[str, Any]) -> None:
        self.pending.update(values)

    def flush(self, step: int) -> Optional[dict[str, Any]]:
        if not self.pending:
            return None
        record = {"step": step, **self.pending}
        self.pending = {}
        if self._file is not None:
            self._file.write(json.dumps(record, default=_json_default, allow_nan=True) + "\n")
            self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot log {type(value).__name__}")


@dataclass
class Run:
    """What a plugin may read (and, where documented, change) during a run.

    Fixed attributes (the contract): ``model, optimizer, masks, sparsifiable, sparsity, step,
    total_steps, device, generator, config``. Beside them: ``layers`` (parameter name →
    LayerInfo with fan-in/out and its logical layers), :attr:`logical_layers` (logical name →
    :class:`~sparsebench.logical_layers.LogicalLayer`: GPT-2's ``c_attn`` is three), ``heldout`` (a pool of held-out batches for scoring masks), ``ledger`` (the FLOPs
    ledger: ``run.ledger.charge(name, flops)``), ``data`` (token splits), ``out_dir`` and
    :meth:`log`.
    """

    config: RunConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sparsifiable: dict[str, torch.nn.Parameter]
    layers: dict[str, Any]
    sparsity: float
    total_steps: int
    device: torch.device
    generator: torch.Generator
    heldout: HeldoutPool
    ledger: Any
    data: Any
    metrics: MetricsLog
    out_dir: Optional[Path] = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    #: the kernels this run computes with, ``"torch"`` or ``"triton"`` (``training.kernels`` resolved
    #: for the device); plugins pass it to the kernels of :mod:`sparsebench.api`
    kernels: str = "torch"
    #: set by the loop: which plugin instances take part, by registered name
    plugins: dict[str, Any] = field(default_factory=dict)

    def log(self, **values: Any) -> None:
        """Add values to this step's record in ``metrics.jsonl`` (names like ``rigl/n_swapped``)."""
        self.metrics.add(values)

    @property
    def tokens_per_step(self) -> int:
        t = self.config.training
        return t.batch_size * t.grad_accum * self.config.data.seq_len

    @property
    def logical_layers(self) -> dict[str, Any]:
        """Logical name → LogicalLayer (a fused weight's parts, every other weight whole), in
        parameter order. Everything per-layer (densities, kept counts, statistics) uses these."""
        from sparsebench.logical_layers import logical_layers

        return logical_layers(self.layers)

    def density(self, name: str) -> float:
        mask = self.masks.get(name)
        return 1.0 if mask is None else float(mask.float().mean())


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
