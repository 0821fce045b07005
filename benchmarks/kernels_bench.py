"""The Triton kernels against the PyTorch paths they replace, side by side in one process.

1. Masked AdamW over GPT-2-small's sparsifiable weights (12 blocks × c_attn, attn.c_proj, c_fc,
   mlp.c_proj; 85M weights at 90% sparsity): the fused Triton step against today's three passes
   (``_foreach_mul_`` of the gradients, ``AdamW.step()``, ``_foreach_mul_`` of the weights), with
   AdamW ``foreach=True`` (the harness today) and ``fused=True`` (issue 13 §1).
2. SparsAE's gradient-activity term of one 768×3072 layer: the Triton kernels against today's
   computation, for one candidate per gradient (today's search) and for λ+1 = 4 candidates against
   one gradient.

Every measurement alternates the paths in each repeat (CUDA events, median). Before timing, a
correctness check compares Triton with the references on small shapes within the documented
tolerances; on a machine without CUDA only that check runs (in Triton's interpreter) and the
script exits 0.

    python benchmarks/kernels_bench.py [--repeats 50] [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first imported

from sparsebench_kernels import adamw_scalars, grad_activity, masked_adamw, masked_adamw_step  # noqa: E402
from sparsebench_kernels.dispatch import unavailable_reason  # noqa: E402
from sparsebench_kernels.grad_activity import TOLERANCE as GRAD_TOL  # noqa: E402
from sparsebench_kernels.masked_adamw import TOLERANCE as ADAMW_TOL  # noqa: E402

GPT2_SMALL = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12


def random_mask(shape, density, device, gen):
    return (torch.rand(shape, generator=gen) < density).to(device)


def check_correctness(device) -> bool:
    """Triton vs the references on small shapes (non-multiples of the blocks), fp32 and bf16."""
    gen = torch.Generator().manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        shape = (37, 301)
        mask = random_mask(shape, 0.3, device, gen)
        base = [torch.randn(shape, generator=gen) * scale for scale in (1.0, 1e-2)]
        base = [t.to(device, dtype) for t in base + [base[1].square()]]  # param, exp_avg, exp_avg_sq ≥ 0
        states = [[t.clone() for t in base] for _ in range(2)]
        for step in range(1, 4):
            g = torch.randn(shape, generator=gen).to(device, dtype)
            for backend, (p, m, v) in zip(("torch", "triton"), states):
                masked_adamw(p, g, m, v, mask, adamw_scalars(step, 1e-2, (0.9, 0.95), 1e-8, 0.1), backend)
        for ref, out, name in zip(states[0], states[1], ("param", "exp_avg", "exp_avg_sq")):
            err = ((out.float() - ref.float()).abs() / (ADAMW_TOL[dtype]["atol"] + ADAMW_TOL[dtype]["rtol"] * ref.float().abs())).max()
            ok &= bool(err <= 1) and (name != "param" or bool(torch.all(out[~mask] == 0)))
            print(f"  masked AdamW {str(dtype):15s} {name:10s} max error / tolerance = {float(err):.3f}")
    g = torch.randn(70, 90, generator=gen).to(device)
    mask = random_mask(g.shape, 0.3, device, gen)
    flat = mask.view(-1)
    swaps = [None, (flat.nonzero().view(-1)[:50], (~flat).nonzero().view(-1)[:1500])]
    ref, out = grad_activity(g, mask, swaps, "torch"), grad_activity(g, mask, swaps, "triton")
    err = ((out - ref).abs() / (GRAD_TOL["atol"] + GRAD_TOL["rtol"] * ref.abs())).max()
    ok &= bool(err <= 1)
    print(f"  gradient activity sums            max error / tolerance = {float(err):.3f}")
    return ok


def alternate(fns: dict, repeats: int, warmup: int = 5) -> dict:
    """Median milliseconds of each function, the functions alternating in every repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in times.items()}


def adamw_setup(density, device, **adamw):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02) for s in GPT2_SMALL]
    masks = [random_mask(s, density, device, gen) for s in GPT2_SMALL]
    with torch.no_grad():
        for p, m in zip(params, masks):
            p.mul_(m)
            p.grad = torch.randn(p.shape, device=device) * 1e-3
    return params, masks, torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, **adamw)


def bench_adamw(density, repeats, device) -> None:
    paths = {}
    for label, kw in (("three passes, AdamW foreach", {"foreach": True}), ("three passes, AdamW fused", {"fused": True})):
        params, masks, opt = adamw_setup(density, device, **kw)
        floats = [m.float() for m in masks]

        def three_pass(params=params, floats=floats, opt=opt):
            with torch.no_grad():
                torch._foreach_mul_([p.grad for p in params], floats)
                opt.step()
                torch._foreach_mul_(params, floats)
        paths[label] = three_pass
    params, masks, opt = adamw_setup(density, device, foreach=False)
    by_param = dict(zip(params, masks))
    paths["fused Triton masked AdamW"] = lambda: masked_adamw_step(opt, by_param, backend="triton")
    ms = alternate(paths, repeats)
    n = sum(p.numel() for p in params)
    print(f"\nMasked AdamW step, {len(params)} tensors, {n / 1e6:.1f}M weights, density {density}:")
    triton_ms = ms["fused Triton masked AdamW"]
    for label, t in ms.items():
        print(f"  {label:30s} {t:8.3f} ms   ({t / triton_ms:.2f}× the Triton time)")


def bench_grad_activity(density, repeats, device) -> None:
    gen = torch.Generator().manual_seed(1)
    shape = (768, 3072)
    mask = random_mask(shape, density, device, gen)
    g = torch.randn(shape, generator=gen).to(device) * 1e-3
    flat = mask.view(-1)
    active, inactive = flat.nonzero().view(-1), (~flat).nonzero().view(-1)
    n_swaps = [max(1, round(0.005 * active.numel()))] * 2 + [round(0.05 * active.numel())]  # 2 mutants + 1 reset
    swaps = [(active[torch.randperm(active.numel(), device=device)[:k]].sort().values,
              inactive[torch.randperm(inactive.numel(), device=device)[:k]].sort().values) for k in n_swaps]
    cases = {
        "today: 1 candidate, torch": lambda: grad_activity(g, mask, swaps[:1], "torch"),
        "today: 1 candidate, Triton": lambda: grad_activity(g, mask, swaps[:1], "triton"),
        "4 candidates, torch": lambda: grad_activity(g, mask, [None] + swaps, "torch"),
        "4 candidates, Triton": lambda: grad_activity(g, mask, [None] + swaps, "triton"),
    }
    ms = alternate(cases, repeats)
    print(f"\nGradient activity of one {shape[0]}×{shape[1]} layer, density {density}, swaps {n_swaps}:")
    for label, t in ms.items():
        print(f"  {label:30s} {t * 1000:8.1f} µs")
    print(f"  torch / Triton: {ms['today: 1 candidate, torch'] / ms['today: 1 candidate, Triton']:.2f}× (1 candidate), "
          f"{ms['4 candidates, torch'] / ms['4 candidates, Triton']:.2f}× (4 candidates)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = unavailable_reason(device)
    if reason is not None:
        print(f"Triton kernels cannot run here: {reason}")
        return 0
    print(f"Correctness on {device}{' (Triton interpreter)' if device.type == 'cpu' else ''}:")
    if not check_correctness(device):
        print("FAILED: a Triton kernel is outside the documented tolerance")
        return 1
    if device.type != "cuda":
        print("Timing needs a CUDA device; only the correctness check ran.")
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bench_adamw(1.0 - args.sparsity, args.repeats, device)
    bench_grad_activity(1.0 - args.sparsity, args.repeats, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
