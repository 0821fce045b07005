"""SparsAE's gradient-activity term: reference vs the candidates' full masks, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from sparsebench_kernels.grad_activity import TOLERANCE, grad_activity, grad_activity_torch, layer_grad_terms
from sparsebench_plugins.sparsae.proxy import layer_grad_term
from sparsebench_plugins.sparsae.swaps import count_bounds, sample_mutant

# (shape, active): sizes off the kernels' blocks of 4096 (stream) and 1024 (gathers)
LAYERS = {"a": ((70, 90), 1890), "b": ((33, 17), 140), "c": ((100, 120), 3600)}


def make_layers(device="cpu", seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    masks, grads = {}, {}
    for name, (shape, active) in LAYERS.items():
        numel = shape[0] * shape[1]
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.randperm(numel, generator=gen)[:active]] = True
        masks[name] = mask.view(shape).to(device)
        grads[name] = (torch.randn(shape, generator=gen) * 1e-2).to(device=device, dtype=dtype)
    return masks, grads


def make_candidates(masks, seed=1):
    """Mutants as sparsae_search draws them, plus a reset-sized one (more swaps than a gather block)."""
    gen = torch.Generator().manual_seed(seed)
    counts = {n: int(m.sum()) for n, m in masks.items()}
    bounds = {n: count_bounds(m.numel(), 0.5, 0.99) for n, m in masks.items()}
    zeros = lambda name, n: torch.zeros(n)  # noqa: E731
    candidates = [sample_mutant("mutant", masks, counts, bounds, n, gen, zeros)[0] for n in (3, 40, 2000)]
    assert max(t.numel() for c in candidates for s in c.layers.values() for t in (s.off, s.on)) > 1024
    return candidates


def swaps_of(candidates, name):
    """Each candidate's (off, on) for one layer; None where it leaves the layer as it is."""
    return [(c.layers[name].off, c.layers[name].on) if name in c.layers else None for c in candidates]


def test_reference_sums_the_squared_gradient_over_each_candidate_mask():
    masks, grads = make_layers()
    candidates = make_candidates(masks)
    for name, g in grads.items():
        sums = grad_activity_torch(g, masks[name], [None] + swaps_of(candidates, name))
        sq = g.double().square()
        expected = [sq.sum(), sq[masks[name]].sum()]
        expected += [sq[c.new_masks(masks).get(name, masks[name])].sum() for c in candidates]
        torch.testing.assert_close(sums.double(), torch.stack(expected), rtol=1e-5, atol=0)


def test_triton_matches_reference_for_all_candidates_in_one_call(device):
    masks, grads = make_layers(device)
    candidates = make_candidates(masks)
    empty = torch.empty(0, dtype=torch.long, device=device)
    for name, g in grads.items():
        swaps = [None] + swaps_of(candidates, name) + [(empty, empty)]
        reference = grad_activity_torch(g, masks[name], swaps)
        fused = grad_activity(g, masks[name], swaps, backend="triton")
        assert fused.shape == (len(swaps) + 1,) and fused.dtype == torch.float32 and fused.device == g.device
        torch.testing.assert_close(fused, reference, **TOLERANCE)
        assert fused[1] == fused[-1], "a candidate without swaps scores exactly as the incumbent"
        one_by_one = [grad_activity(g, masks[name], [s], backend="triton")[1] for s in swaps]
        assert torch.equal(fused[1:], torch.stack(one_by_one)), "batching candidates must not change a value"


def test_triton_reads_bf16_gradients_like_the_reference(device):
    masks, grads = make_layers(device, dtype=torch.bfloat16)
    candidates = make_candidates(masks)
    for name, g in grads.items():
        swaps = swaps_of(candidates, name)
        torch.testing.assert_close(grad_activity(g, masks[name], swaps, backend="triton"),
                                   grad_activity_torch(g, masks[name], swaps), **TOLERANCE)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_shows_in_the_total_of_both_backends(device, bad):
    masks, grads = make_layers(device)
    g = grads["a"].clone()
    g.view(-1)[5] = bad
    swaps = swaps_of(make_candidates(masks), "a")
    for backend in ("torch", "triton"):
        total = grad_activity(g, masks["a"], swaps, backend=backend)[0]
        assert not torch.isfinite(total)


def test_layer_terms_equal_the_proxy_formula():
    masks, grads = make_layers()
    candidates = make_candidates(masks)
    counts = {n: int(m.sum()) for n, m in masks.items()}
    for name, g in grads.items():
        sums = grad_activity_torch(g, masks[name], swaps_of(candidates, name))[1:].tolist()
        n_active = [c.active_counts(counts)[name] for c in candidates]
        assert layer_grad_terms(sums, n_active) == [layer_grad_term(s, n) for s, n in zip(sums, n_active)]
    assert layer_grad_terms([4.0, -1e-9, 1.0], [4, 3, 0]) == [1.0, 0.0, 0.0]


def test_bad_input_is_refused_with_the_reason():
    masks, grads = make_layers()
    with pytest.raises(ValueError, match="mask has shape"):
        grad_activity_torch(grads["a"], masks["b"], [None])
    with pytest.raises(ValueError, match="bool tensor"):
        grad_activity_torch(grads["a"], masks["a"].float(), [None])
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        grad_activity(grads["a"], masks["a"], [None], backend="cuda")
