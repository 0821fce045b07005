"""sparsebench's Triton kernels, each beside the plain-PyTorch reference its tests compare it with.

Importable without Triton: the Triton modules (``_triton_*``) load only when a ``"triton"``
backend is asked for. :func:`select_backend` turns ``training.kernels`` into a backend.
"""

from sparsebench_kernels.dispatch import CHOICES, available, select_backend, unavailable_reason
from sparsebench_kernels.grad_activity import grad_activity, grad_activity_torch, layer_grad_terms
from sparsebench_kernels.masked_adamw import (
    AdamWScalars,
    adamw_scalars,
    masked_adamw,
    masked_adamw_step,
    masked_adamw_torch,
)

__all__ = [
    "CHOICES", "available", "select_backend", "unavailable_reason",
    "grad_activity", "grad_activity_torch", "layer_grad_terms",
    "AdamWScalars", "adamw_scalars", "masked_adamw", "masked_adamw_step", "masked_adamw_torch",
]
