"""The engine of one process: plain PyTorch, reductions are the identity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional

import torch

from sparsebench.engines.base import Engine
from sparsebench.engines.mask_ops import apply_mask_change

if TYPE_CHECKING:
    from sparsebench.run_setup import Setup


class LocalEngine(Engine):
    """``loss.backward()``, ``clip_grad_norm_`` and ``optimizer.step()`` on ``run.model``.

    The module's weights and ``run.optimizer``'s state are the only copies, so applying a mask
    change is :func:`~sparsebench.engines.mask_ops.apply_mask_change` and plugins' weight edits
    need no adopting.

    ``training.compile: true``: training forwards go through ``torch.compile(run.model)``, which
    shares the module's parameters, so masking them in place is seen by the next forward.

    ``training.kernels`` resolved to ``"triton"``: the optimizer step, the gradient masking it
    needs and the re-masking of the weights are one fused masked AdamW kernel per tensor
    (:func:`sparsebench_kernels.masked_adamw_step`) instead of three passes. The gradients are
    still masked before the step where something reads them (clipping, a
    ``before_optimizer_step`` hook), and the kernel keeps AdamW's own state, so checkpoints and
    moment resets are unchanged.
    """

    name = "local"
    supports_compile = True

    def __init__(self, setup: "Setup"):
        super().__init__(setup)
        self.kernels = setup.kernels
        self._fused_masks: dict[torch.Tensor, torch.Tensor] = {}
        self._weights_masked = False  # the fused step has already re-masked the weights
        if self.kernels == "triton":
            hooks = setup.hooks.pm.hook.before_optimizer_step.get_hookimpls()
            self._grads_read_before_step = bool(setup.run.config.training.grad_clip) or bool(hooks)

    def start(self) -> None:
        if self.run.config.training.compile:
            self.model = torch.compile(self.run.model)

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        super().set_masks(masks)
        if self.kernels == "triton":  # fully dense layers step unmasked
            self._fused_masks = {
                self.upkeep.params[n]: masks[n].to(self.upkeep.params[n].device).contiguous() for n in self.upkeep.names
            }

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.run.config.training.grad_accum).backward()

    def apply_mask_change(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, int]:
        return apply_mask_change(self.run.optimizer, self.run.sparsifiable, old, new, keep_dense=self.keeps_dense)

    @torch.no_grad()
    def mask_grads(self) -> None:
        if self.kernels != "triton" or self._grads_read_before_step:  # else the kernel masks them
            super().mask_grads()

    @torch.no_grad()
    def mask_weights(self) -> None:
        if self._weights_masked:
            self._weights_masked = False
            return
        super().mask_weights()

    def step(self) -> Optional[torch.Tensor]:
        if self.kernels == "triton":
            from sparsebench_kernels import masked_adamw_step

            masked_adamw_step(self.run.optimizer, self._fused_masks, backend="triton")
            # what the kernel masked needs no second pass (nothing, under a method that keeps dense
            # weights: the harness's one zeroing after the last step then still runs)
            self._weights_masked = bool(self._fused_masks)
        else:
            self.run.optimizer.step()
        self.run.optimizer.zero_grad(set_to_none=True)
        return self._grad_norm
