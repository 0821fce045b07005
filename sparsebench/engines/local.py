"""The engine of one process: plain PyTorch, reductions are the identity."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from sparsebench.engines.base import Engine
from sparsebench.engines.mask_ops import apply_mask_change


class LocalEngine(Engine):
    """``loss.backward()``, ``clip_grad_norm_`` and ``optimizer.step()`` on ``run.model``.

    The module's weights and ``run.optimizer``'s state are the only copies, so applying a mask
    change is :func:`~sparsebench.engines.mask_ops.apply_mask_change` and plugins' weight edits
    need no adopting.
    """

    name = "local"

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.run.config.training.grad_accum).backward()

    def apply_mask_change(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, int]:
        return apply_mask_change(self.run.optimizer, self.run.sparsifiable, old, new, keep_dense=self.keeps_dense)

    def step(self) -> Optional[float]:
        self.run.optimizer.step()
        self.run.optimizer.zero_grad(set_to_none=True)
        return self._grad_norm
