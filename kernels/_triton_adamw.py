"""Triton kernel of the masked AdamW step (semantics and reference: :mod:`.masked_adamw`)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from sparsebench_kernels.masked_adamw import AdamWScalars, _check

BLOCK = 1024


@triton.jit
def _stored(x, ptr):
    """``x`` (fp32) in ``ptr``'s dtype; bf16 rounds to nearest-even by hand, because Triton's CPU
    interpreter truncates on ``.to(tl.bfloat16)`` where the GPU rounds."""
    if ptr.dtype.element_ty == tl.bfloat16:  # decided at compile time
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, tl.full(bits.shape, 0x7FC00000, tl.uint32), bits)  # NaN stays NaN
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        x = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x


@triton.jit
def _masked_adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, keep_ptr, n, decay, lerp_weight, beta2, one_minus_beta2, eps,
                         neg_step_size, bias_correction2_sqrt, HAS_MASK: tl.constexpr, LERP_FROM_START: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    p = tl.load(p_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(keep_ptr + offs, mask=inside, other=0) != 0
        g = tl.where(keep, g, 0.0)
    p = p * decay
    # torch.lerp: start + w·(end − start) for w < 0.5, else end − (1 − w)·(end − start), as one fma
    if LERP_FROM_START:
        m = tl.fma(lerp_weight, g - m, m)
    else:
        m = tl.fma(lerp_weight - 1.0, g - m, g)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)  # torch.addcmul: self + (value·t1)·t2, one fma
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)
    if HAS_MASK:
        p = tl.where(keep, p, 0.0)
    tl.store(p_ptr + offs, _stored(p, p_ptr), mask=inside)
    tl.store(m_ptr + offs, _stored(m, m_ptr), mask=inside)
    tl.store(v_ptr + offs, _stored(v, v_ptr), mask=inside)


def masked_adamw_triton(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        mask: Optional[torch.Tensor], scalars: AdamWScalars) -> None:
    """The masked AdamW step of one tensor in one Triton launch (``param`` and both moments in place)."""
    _check(param, grad, exp_avg, exp_avg_sq, mask)
    tensors = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "mask": mask}
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"masked AdamW (triton): {name} must be contiguous")
        if t.device != param.device:
            raise ValueError(f"masked AdamW (triton): {name} is on {t.device}, the parameter on {param.device}")
        if name != "mask" and t.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"masked AdamW (triton): {name} has dtype {t.dtype}; allowed: float32, bfloat16")
    n = param.numel()
    if n == 0:
        return
    keep = mask.view(torch.uint8) if mask is not None else param  # an unused pointer when there is no mask
    s = scalars
    _masked_adamw_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, keep, n, s.decay, s.lerp_weight, s.beta2, s.one_minus_beta2, s.eps,
        s.neg_step_size, s.bias_correction2_sqrt, HAS_MASK=mask is not None, LERP_FROM_START=s.lerp_weight < 0.5,
        BLOCK=BLOCK,
    )
