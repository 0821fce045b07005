"""SparsAE's gradient-activity term for every candidate mask of a layer from one pass over its gradient.

The proxy's ``grad`` component (``sparsae/proxy.py``) is, per layer, ‖∇W ⊙ M′‖₂ / √active(M′).
Each candidate M′ is given as swap deltas against the incumbent mask M: ``off`` (flat indices
active in M that M′ drops) and ``on`` (flat indices inactive in M that M′ grows). So

    Σ_{M′} g² = Σ_M g² − Σ_off g² + Σ_on g²

needs one reduction over the gradient (Σ g² over the layer and over M) plus gathers of the deltas.
:func:`grad_activity_torch` is exactly what ``sparsae_search.evaluate`` computes today (``sq =
g.float().square(); sq[mask].sum() − flat[off].sum() + flat[on].sum()``); the Triton path
(:mod:`._triton_grad_activity`) reads the gradient once and never materialises ``sq`` or
``sq[mask]``. Both return a float32 tensor on the gradient's device, so the caller can gather the
values of every layer with one host synchronisation.

Today's search evaluates each candidate under its own gradient (its swaps applied), so it calls
this with one candidate per gradient; several candidates against one gradient (the first-order
proxy of the specification) are one call.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

#: How far the Triton sums may be from :func:`grad_activity_torch` (``torch.testing`` rtol/atol):
#: fp32 sums in another order (per-block trees, then the blocks), so ~1e-6 relative on real layers.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}

Swap = Optional[tuple[torch.Tensor, torch.Tensor]]  # (off, on) flat indices; None = the incumbent M


def _check(grad: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.shape != grad.shape:
        raise ValueError(f"gradient activity: mask has shape {tuple(mask.shape)}, the gradient {tuple(grad.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"gradient activity: mask must be a bool tensor, got {mask.dtype}")


@torch.no_grad()
def grad_activity_torch(grad: torch.Tensor, mask: torch.Tensor, swaps: Sequence[Swap]) -> torch.Tensor:
    """Reference: ``[Σ g² over the layer, Σ g² over M′_1, …, Σ g² over M′_K]`` (float32).

    The first entry is what the search checks for a non-finite gradient. ``off`` must lie inside
    M and ``on`` outside it (as ``sparsae.swaps`` draws them); neither is checked here.
    """
    _check(grad, mask)
    sq = grad.float().square()
    active = sq[mask].sum()
    flat = sq.view(-1)
    out = [sq.sum()]
    for swap in swaps:
        out.append(active if swap is None else active - flat[swap[0]].sum() + flat[swap[1]].sum())
    return torch.stack(out)


def grad_activity(grad: torch.Tensor, mask: torch.Tensor, swaps: Sequence[Swap], backend: str = "torch") -> torch.Tensor:
    """:func:`grad_activity_torch` with ``backend`` ``"torch"`` or ``"triton"``."""
    if backend == "torch":
        return grad_activity_torch(grad, mask, swaps)
    if backend == "triton":
        from sparsebench_kernels._triton_grad_activity import grad_activity_triton

        return grad_activity_triton(grad, mask, swaps)
    raise ValueError(f"gradient activity: unknown backend '{backend}'. Allowed: torch, triton")


def layer_grad_terms(sums: Sequence[float], n_active: Sequence[int]) -> list[float]:
    """‖∇W ⊙ M′‖₂ / √active per candidate from its Σ g² (0 for an empty layer), as ``layer_grad_term``."""
    return [math.sqrt(max(float(s), 0.0)) / math.sqrt(n) if n > 0 else 0.0 for s, n in zip(sums, n_active)]
