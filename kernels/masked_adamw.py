"""One masked AdamW step per parameter: mask the gradient, both moments, the decoupled-weight-decay
update and the re-masking of the weight, exactly as ``torch.optim.AdamW`` between
``mask_grads()`` and ``mask_weights()``.

The harness does this in three passes over memory (mask the gradients, ``optimizer.step()``, mask
the weights). :func:`masked_adamw_torch` is the plain-PyTorch reference; the Triton kernel
(:mod:`._triton_adamw`) reads the parameter, gradient, both moments and the mask once and writes
the parameter and both moments once. :func:`masked_adamw_step` runs either over a whole
``torch.optim.AdamW`` and keeps its state dict exactly as AdamW's own (checkpoints, the harness's
moment resets and a later ``optimizer.step()`` see no difference).

Semantics, for ``keep = mask`` (all ones when ``mask`` is ``None``)::

    g = keep ? grad : 0             # a pruned NaN/inf gradient becomes 0 (``grad * mask`` would keep NaN)
    p = p * (1 - lr * weight_decay)
    m = lerp(m, g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    p = p + (-lr / (1 - beta1**step)) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
    p = keep ? p : 0

So a pruned position whose weight and moments are 0 keeps them at exactly 0 (the harness zeroes
the moments of every position a mask change touches). Arithmetic is fp32 whatever the storage
dtype (fp32 or bf16 parameters, gradients and moments), with one rounding on store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch


#: How far the Triton step may be from :func:`masked_adamw_torch` after a few steps (``torch.testing``
#: rtol/atol per storage dtype). The step is elementwise, so fp32 differs by an ulp where torch's
#: CPU sqrt is not correctly rounded or a compiler contracts a multiply-add; bf16 by at most one
#: rounding of each stored value.
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-5}}


@dataclass(frozen=True)
class AdamWScalars:
    """Per-step scalars, computed in double precision on the host as ``torch.optim.AdamW`` does."""

    decay: float  # 1 - lr * weight_decay
    lerp_weight: float  # 1 - beta1
    beta2: float
    one_minus_beta2: float
    eps: float
    neg_step_size: float  # -lr / (1 - beta1**step)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**step)


def adamw_scalars(step: float, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> AdamWScalars:
    """The scalars of AdamW step ``step`` (1-based, after the increment)."""
    if step < 1:
        raise ValueError(f"AdamW step count must be >= 1 after the increment, got {step}")
    beta1, beta2 = (float(b) for b in betas)
    lr = float(lr)
    return AdamWScalars(
        decay=1.0 - lr * weight_decay,
        lerp_weight=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        eps=float(eps),
        neg_step_size=-(lr / (1.0 - beta1**step)),
        bias_correction2_sqrt=math.sqrt(1.0 - beta2**step),
    )


def _check(param, grad, exp_avg, exp_avg_sq, mask) -> None:
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("mask", mask)):
        if t is not None and t.shape != param.shape:
            raise ValueError(f"masked AdamW: {name} has shape {tuple(t.shape)}, the parameter {tuple(param.shape)}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"masked AdamW: mask must be a bool tensor, got {mask.dtype}")


@torch.no_grad()
def masked_adamw_torch(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                       mask: Optional[torch.Tensor], scalars: AdamWScalars) -> None:
    """Reference: the masked AdamW step in plain PyTorch ops (``param`` and both moments in place)."""
    _check(param, grad, exp_avg, exp_avg_sq, mask)
    p, m, v = (t.float() for t in (param, exp_avg, exp_avg_sq))  # the tensors themselves when fp32
    g = grad.float()
    if mask is not None:
        g = torch.where(mask, g, 0.0)
    p.mul_(scalars.decay)
    m.lerp_(g, scalars.lerp_weight)
    v.mul_(scalars.beta2).addcmul_(g, g, value=scalars.one_minus_beta2)
    denom = (v.sqrt() / scalars.bias_correction2_sqrt).add_(scalars.eps)
    p.addcdiv_(m, denom, value=scalars.neg_step_size)
    if mask is not None:
        p.masked_fill_(~mask, 0.0)
    for dst, src in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
        if dst is not src:
            dst.copy_(src)


def masked_adamw(param, grad, exp_avg, exp_avg_sq, mask, scalars: AdamWScalars, backend: str = "torch") -> None:
    """One masked AdamW step of one tensor with ``backend`` ``"torch"`` or ``"triton"``."""
    if backend == "torch":
        masked_adamw_torch(param, grad, exp_avg, exp_avg_sq, mask, scalars)
    elif backend == "triton":
        from sparsebench_kernels._triton_adamw import masked_adamw_triton

        masked_adamw_triton(param, grad, exp_avg, exp_avg_sq, mask, scalars)
    else:
        raise ValueError(f"masked AdamW: unknown backend '{backend}'. Allowed: torch, triton")


def _state_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    """AdamW's own state of ``p``, created as ``torch.optim.AdamW`` creates it (non-fused, non-capturable)."""
    state = optimizer.state[p]
    if not state:
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def masked_adamw_step(optimizer: torch.optim.Optimizer, masks: Mapping[torch.Tensor, torch.Tensor],
                      backend: str = "torch") -> None:
    """Replace ``mask_grads(); optimizer.step(); mask_weights()`` by one pass per parameter.

    ``optimizer`` is a ``torch.optim.AdamW`` (its groups' ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` are read every call, so a schedule that writes ``group["lr"]`` works);
    ``masks`` maps a parameter (the tensor object) to its bool mask; parameters without one are
    stepped unmasked. ``p.grad`` is left as it was (unmasked). The step count stays a CPU tensor,
    so nothing here waits for the device.
    """
    if not isinstance(optimizer, torch.optim.AdamW):
        raise TypeError(f"masked_adamw_step needs a torch.optim.AdamW, got {type(optimizer).__name__}")
    by_id = {id(p): m for p, m in masks.items()}  # tensors hash by identity but compare elementwise
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "maximize", "capturable", "fused", "differentiable"):
            if group.get(flag):
                raise ValueError(f"masked_adamw_step: AdamW option {flag}=True is not supported; use optimizer.step()")
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("masked_adamw_step: sparse gradients are not supported")
            state = _state_of(optimizer, p)
            state["step"] += 1
            scalars = adamw_scalars(float(state["step"]), group["lr"], group["betas"], group["eps"],
                                    group["weight_decay"])
            masked_adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], by_id.get(id(p)), scalars, backend)
