"""2:4 semi-structured sparse matmuls against dense ones, measured side by side in one process.

Prints ``inference_speedup`` and ``train_speedup`` (dense time ÷ 2:4 time, > 1 = faster) for the
linear layers of a gpt2-small block (n_embd 768: c_attn 768→2304, attn c_proj 768→768, mlp
c_fc 768→3072, mlp c_proj 3072→768) at ``--tokens`` tokens per batch, and the speedup of a whole
small GPT-2's forward pass whose block weights are 2:4 sparse. Dense and sparse timings
alternate (dense, sparse, dense, ...) so drifts in clock or load hit both sides equally; each
figure is the median over ``--repeats`` rounds of ``--iters`` calls timed with CUDA events.

What the 2:4 side does:

* inference: ``F.linear(x, W̃)`` with ``W̃ = to_sparse_semi_structured(W ⊙ E)`` compressed once;
* train (SR-STE, as the ``nm`` method trains): per step the mask ``E`` is recomputed from |W|,
  ``W ⊙ E`` is compressed, the forward runs sparse, the input gradient ``dY·W̃`` runs dense
  (the transpose of a 2:4 matrix is not 2:4 along its rows) and the weight gradient ``dYᵀ·X``
  is dense (the straight-through estimator needs every position). ``train_speedup_fixed_mask``
  leaves out the per-step mask and compression, i.e. what a method with a fixed 2:4 mask gets.

Semi-structured kernels need CUDA sm80+ (Ampere or newer). Without them the script says so and
measures nothing.

    python benchmarks/nm_speedup.py [--tokens 8192] [--dtype bfloat16] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from sparsebench_plugins.nm import nm_mask

GPT2_SMALL_LAYERS = {  # name: (in, out) of one gpt2-small block's projections
    "attn.c_attn": (768, 2304),
    "attn.c_proj": (768, 768),
    "mlp.c_fc": (768, 3072),
    "mlp.c_proj": (3072, 768),
}


def unavailable_reason() -> str:
    """Why semi-structured kernels cannot run here ('' when they can)."""
    if not torch.cuda.is_available():
        return "semi-structured 2:4 sparse kernels need CUDA (sm80+); this machine has no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"semi-structured 2:4 sparse kernels need sm80+; this GPU is sm{major}{minor}"
    return ""


def compress(dense: torch.Tensor) -> torch.Tensor:
    return torch.sparse.to_sparse_semi_structured(dense)


def timed(fn, iters: int) -> float:
    """Seconds per call of ``fn``, from CUDA events around ``iters`` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def side_by_side(dense_fn, sparse_fn, iters: int, repeats: int) -> tuple[float, float]:
    """Median seconds per call of each, measured alternately after a warm-up of both."""
    for fn in (dense_fn, sparse_fn):
        fn()
    torch.cuda.synchronize()
    dense, sparse = [], []
    for _ in range(repeats):
        dense.append(timed(dense_fn, iters))
        sparse.append(timed(sparse_fn, iters))
    return statistics.median(dense), statistics.median(sparse)


class _SparseForwardDenseBackward(torch.autograd.Function):
    """SR-STE's layer: the forward with the compressed ``W ⊙ E``; dense gradients, the weight's
    straight through to every position of ``W``."""

    @staticmethod
    def forward(ctx, x, weight, masked, compressed):
        ctx.save_for_backward(x, masked)
        return F.linear(x, compressed)

    @staticmethod
    def backward(ctx, grad):
        x, masked = ctx.saved_tensors
        return grad @ masked, grad.t() @ x, None, None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got − want| over the output's max |want|."""
    return float((got.float() - want.float()).abs().max()) / (float(want.float().abs().max()) or 1.0)


def check_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Half-precision products agree to ~1% of the output's scale; anything else is a broken kernel."""
    error = relative_error(got, want)
    if error > 2e-2:
        raise SystemExit(f"nm_speedup: {what}: the 2:4 product differs from the dense one (relative error {error:.3g})")


def layer_figures(n_in: int, n_out: int, tokens: int, dtype: torch.dtype, iters: int, repeats: int) -> dict:
    device = torch.device("cuda")
    weight = torch.randn(n_out, n_in, device=device, dtype=dtype, requires_grad=True)  # nn.Linear (out, in)
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, n_out, device=device, dtype=dtype)
    mask = nm_mask(weight, 1, 2, 4)
    masked = (weight * mask).detach()
    compressed = compress(masked)
    with torch.no_grad():
        check_close(F.linear(x, compressed), F.linear(x, masked), f"{n_in}→{n_out}")

    with torch.no_grad():
        inf_dense, inf_sparse = side_by_side(lambda: F.linear(x, weight), lambda: F.linear(x, compressed), iters, repeats)

    def dense_step():
        F.linear(x, weight).backward(grad_out)

    def sr_ste_step():
        with torch.no_grad():
            step_masked = weight * nm_mask(weight, 1, 2, 4)
            step_compressed = compress(step_masked)
        _SparseForwardDenseBackward.apply(x, weight, step_masked, step_compressed).backward(grad_out)

    def fixed_mask_step():
        _SparseForwardDenseBackward.apply(x, weight, masked, compressed).backward(grad_out)

    train_dense, train_sparse = side_by_side(dense_step, sr_ste_step, iters, repeats)
    fixed_dense, fixed_sparse = side_by_side(dense_step, fixed_mask_step, iters, repeats)
    return {
        "shape_in_out": [n_in, n_out],
        "inference_dense_s": inf_dense, "inference_sparse_s": inf_sparse,
        "train_dense_s": train_dense, "train_sparse_s": train_sparse,
        "train_fixed_mask_dense_s": fixed_dense, "train_fixed_mask_sparse_s": fixed_sparse,
    }


def model_forward_speedup(tokens: int, dtype: torch.dtype, iters: int, repeats: int, n_layer: int) -> dict:
    """A gpt2-small-wide GPT-2 of ``n_layer`` blocks: forward with dense vs 2:4 block weights."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    seq = 1024
    config = transformers.GPT2Config(n_layer=n_layer, n_head=12, n_embd=768, n_positions=seq, vocab_size=50304)
    model = transformers.GPT2LMHeadModel(config).to("cuda", dtype).eval()
    sparse_weights = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):  # (in, out): the 2:4 groups run along axis 0
            with torch.no_grad():
                module.weight.mul_(nm_mask(module.weight, 0, 2, 4))  # the dense side computes the same function
            sparse_weights[module] = compress(module.weight.detach().t().contiguous()).t()

    def dense():
        model(input_ids=ids)

    def sparse():
        for module, weight in sparse_weights.items():
            module.__dict__["weight"] = weight  # read before the registered parameter
        try:
            model(input_ids=ids)
        finally:
            for module in sparse_weights:
                module.__dict__.pop("weight", None)

    ids = torch.randint(0, config.vocab_size, (max(1, tokens // seq), seq), device="cuda")
    with torch.no_grad():
        want = model(input_ids=ids[:1]).logits
        for module, weight in sparse_weights.items():
            module.__dict__["weight"] = weight
        got = model(input_ids=ids[:1]).logits
        for module in sparse_weights:
            module.__dict__.pop("weight")
        logits_error = relative_error(got, want)  # twelve blocks of half-precision rounding: reported, not checked
        t_dense, t_sparse = side_by_side(dense, sparse, max(1, iters // 10), repeats)
    return {"n_layer": n_layer, "tokens": ids.numel(), "forward_dense_s": t_dense, "forward_sparse_s": t_sparse,
            "forward_speedup": t_dense / t_sparse, "logits_relative_error": logits_error}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch (batch × sequence)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=50, help="calls per timed round")
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds; the median is reported")
    parser.add_argument("--model-layers", type=int, default=12, help="blocks of the whole-model forward (0: skip)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    reason = unavailable_reason()
    if reason:
        print(f"nm_speedup: {reason}. Nothing measured (the nm method trains with dense kernels here).")
        return 0
    dtype = getattr(torch, args.dtype)
    if not torch.backends.cusparselt.is_available():
        torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True  # the other backend PyTorch ships
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, {args.tokens} tokens, "
          f"backend {'cutlass' if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS else 'cusparselt'}")
    layers = {name: layer_figures(*shape, args.tokens, dtype, args.iters, args.repeats)
              for name, shape in GPT2_SMALL_LAYERS.items()}
    total = {key: sum(f[key] for f in layers.values()) for key in next(iter(layers.values())) if key.endswith("_s")}
    figures = {
        "inference_speedup": total["inference_dense_s"] / total["inference_sparse_s"],
        "train_speedup": total["train_dense_s"] / total["train_sparse_s"],
        "train_speedup_fixed_mask": total["train_fixed_mask_dense_s"] / total["train_fixed_mask_sparse_s"],
        "layers": layers,
    }
    print(f"{'layer':<12} {'in→out':>11} {'inference':>10} {'train SR-STE':>13} {'train fixed':>12}")
    for name, f in layers.items():
        shape = "{}→{}".format(*f["shape_in_out"])
        ratios = [f[f"{k}dense_s"] / f[f"{k}sparse_s"] for k in ("inference_", "train_", "train_fixed_mask_")]
        print(f"{name:<12} {shape:>11} {ratios[0]:>9.2f}× {ratios[1]:>12.2f}× {ratios[2]:>11.2f}×")
    print(f"one block: inference_speedup {figures['inference_speedup']:.2f}×, train_speedup {figures['train_speedup']:.2f}× "
          f"(fixed mask {figures['train_speedup_fixed_mask']:.2f}×)")
    if args.model_layers:
        figures["model"] = model_forward_speedup(args.tokens, dtype, args.iters, args.repeats, args.model_layers)
        model = figures["model"]
        print(f"GPT-2 ({args.model_layers} blocks, n_embd 768) forward: {model['forward_speedup']:.2f}× "
              f"({model['tokens']} tokens; logits differ from dense by {model['logits_relative_error']:.2g} of their scale)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
