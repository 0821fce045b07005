"""Triton kernels of the gradient-activity term (semantics and reference: :mod:`.grad_activity`).

Two launches, both deterministic (fixed-order partial sums, no atomics): one streams the gradient
and the mask once (Σ g² over the layer and over M, per block); one gathers the swap deltas of all
candidates, packed into one index tensor, segment by segment.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from sparsebench_kernels.grad_activity import Swap, _check

BLOCK = 4096
GATHER_BLOCK = 1024


@triton.jit
def _add(a, b):
    return a + b


# ``tl.reduce`` with a combine function of this module, not ``tl.sum``: ``tl.sum`` is a jit function
# of Triton itself, which runs in the interpreter only if Triton was first imported with
# TRITON_INTERPRET=1 (in a full test session something else may import it earlier).
@triton.jit
def _sum_sq_kernel(g_ptr, keep_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    keep = tl.load(keep_ptr + offs, mask=inside, other=0) != 0
    sq = g * g
    tl.store(partial_ptr + 2 * pid, tl.reduce(sq, 0, _add))
    tl.store(partial_ptr + 2 * pid + 1, tl.reduce(tl.where(keep, sq, 0.0), 0, _add))


@triton.jit
def _segment_sum_sq_kernel(g_ptr, idx_ptr, bounds_ptr, partial_ptr, n_chunks, BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    chunk = tl.program_id(1)
    start = tl.load(bounds_ptr + seg)
    end = tl.load(bounds_ptr + seg + 1)
    offs = start + chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < end
    idx = tl.load(idx_ptr + offs, mask=inside, other=0)
    g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    tl.store(partial_ptr + seg * n_chunks + chunk, tl.reduce(g * g, 0, _add))


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without waiting for the stream (pinned, non-blocking)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def grad_activity_triton(grad: torch.Tensor, mask: torch.Tensor, swaps: Sequence[Swap]) -> torch.Tensor:
    """:func:`~sparsebench_kernels.grad_activity.grad_activity_torch` with Triton kernels."""
    _check(grad, mask)
    if not grad.is_contiguous() or not mask.is_contiguous():
        raise ValueError("gradient activity (triton): gradient and mask must be contiguous")
    device = grad.device
    n = grad.numel()
    n_blocks = max(triton.cdiv(n, BLOCK), 1)
    partial = torch.empty((n_blocks, 2), dtype=torch.float32, device=device)
    if n == 0:
        partial.zero_()
    else:
        _sum_sq_kernel[(n_blocks,)](grad, mask.view(torch.uint8), partial, n, BLOCK=BLOCK)
    total, active = partial.sum(0).unbind()

    deltas = [s for s in swaps if s is not None]
    if not deltas:
        return torch.stack([total] + [active] * len(swaps))
    segments = [t.reshape(-1).to(device=device, dtype=torch.int64) for s in deltas for t in s]  # off, on, off, on, …
    sizes = [t.numel() for t in segments]  # shapes are host metadata: no synchronisation
    bounds = _to_device([0] + torch.tensor(sizes).cumsum(0).tolist(), device)
    n_chunks = max(triton.cdiv(max(sizes), GATHER_BLOCK), 1)
    seg_partial = torch.zeros((len(segments), n_chunks), dtype=torch.float32, device=device)
    if max(sizes) > 0:
        _segment_sum_sq_kernel[(len(segments), n_chunks)](grad, torch.cat(segments), bounds, seg_partial, n_chunks,
                                                         BLOCK=GATHER_BLOCK)
    seg = seg_partial.sum(1)
    changed = active - seg[0::2] + seg[1::2]
    out, k = [total], 0
    for s in swaps:
        if s is None:
            out.append(active)
        else:
            out.append(changed[k])
            k += 1
    return torch.stack(out)
