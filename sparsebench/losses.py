"""The loss every method trains on, the autocast context it is computed under, and the window in
which the loop keeps recent losses on the device until it reads them."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Mapping, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sparsebench.context import Run


def autocast_context(run: "Run"):
    """Autocast to ``training.dtype`` (a no-op for float32), as the loop runs every forward pass."""
    dtype = run.config.training.dtype
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=getattr(torch, dtype))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL in float32; ``labels`` are already shifted (``labels[t] = input_ids[t+1]``)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))


class LossWindow:
    """The training losses of the steps since the host last read them, left on the device.

    Reading a loss (``float(ce)``) makes the host wait for the device to finish the step: on CUDA
    one synchronisation per micro-batch. The loop keeps the detached loss tensors of recent steps
    here and reads them all at once (one ``tolist()``) where it has to wait anyway: at log steps,
    before a mask change, an evaluation or a checkpoint, and at the end. :meth:`read` then does
    exactly the float arithmetic the loop did per step (a float64 mean over micro-batches), so
    logged values and the non-finite check are what they would be with a read per step.
    """

    def __init__(self, grad_accum: int):
        self.grad_accum = grad_accum
        self._steps: list[int] = []
        self._values: list[torch.Tensor] = []
        self._keys: list[tuple[int, Optional[str]]] = []  # (index into _steps, None for cross-entropy or a term name)
        #: the newest step's (cross-entropy, terms) that the loop has read and checked (over ranks)
        self.latest: tuple[float, dict[str, float]] = (math.nan, {})

    def add(self, step: int, ce: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Keep one micro-batch's cross-entropy and extra terms of optimizer step ``step``."""
        if not self._steps or self._steps[-1] != step:
            self._steps.append(step)
        index = len(self._steps) - 1
        self._values.append(ce.detach())
        self._keys.append((index, None))
        for name, value in terms.items():
            self._values.append(value.detach())
            self._keys.append((index, name))

    def __len__(self) -> int:
        return len(self._steps)

    def read(self) -> list[tuple[int, float, dict[str, float]]]:
        """``(step, mean cross-entropy, mean terms)`` of every kept step, oldest first; empties the window."""
        if not self._values:
            return []
        device = self._values[0].device
        # float64 holds every float32/bf16 value exactly: the same numbers float(tensor) gives.
        numbers = torch.stack([v.reshape(()).to(device=device, dtype=torch.float64) for v in self._values]).tolist()
        out = [(step, 0.0, {}) for step in self._steps]
        for (index, name), number in zip(self._keys, numbers):
            step, ce, terms = out[index]
            if name is None:
                out[index] = (step, ce + number / self.grad_accum, terms)
            else:
                terms[name] = terms.get(name, 0.0) + number / self.grad_accum
        self._steps, self._values, self._keys = [], [], []
        return out
