"""The loss every method trains on, and the autocast context it is computed under."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

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
