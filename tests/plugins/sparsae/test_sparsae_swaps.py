"""SparsAE mutants as swap lists: exact swap counts, global count, layer bounds, exact revert."""

from __future__ import annotations

import pytest
import torch

from sparsebench_plugins.sparsae.swaps import (
    Candidate,
    apply_swaps,
    count_bounds,
    revert_swaps,
    sample_layer_counts,
    sample_mutant,
)


def _random_mask(numel: int, active: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=g)[:active]] = True
    return mask


def _masks(spec: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """name → (numel, active) as 2-D masks of shape (numel // 32, 32)."""
    return {n: _random_mask(numel, active, i).view(-1, 32) for i, (n, (numel, active)) in enumerate(spec.items())}


def _zeros(name, n):
    return torch.zeros(n)


def _check_valid(candidate: Candidate, masks: dict) -> None:
    for name, s in candidate.layers.items():
        flat = masks[name].view(-1)
        assert bool(flat[s.off].all()), "a deactivated position was not active"
        assert not bool(flat[s.on].any()), "an activated position was already active"
        assert s.off.unique().numel() == s.off.numel() and s.on.unique().numel() == s.on.numel()
        assert s.init.numel() == s.on.numel()


@pytest.mark.parametrize("p_mutate", [0.005, 0.02, 0.1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutant_makes_exactly_round_p_times_active_swaps_and_keeps_the_global_count(p_mutate, seed):
    masks = _masks({"a": (9600, 960), "b": (3200, 320), "c": (12288, 1229)})
    counts = {n: int(m.sum()) for n, m in masks.items()}
    bounds = {n: count_bounds(m.numel(), 0.5, 0.95) for n, m in masks.items()}
    total = sum(counts.values())
    n_swaps = round(p_mutate * total)
    candidate, _ = sample_mutant("mutant", masks, counts, bounds, n_swaps, torch.Generator().manual_seed(seed), _zeros)
    _check_valid(candidate, masks)
    assert candidate.n_swaps == n_swaps
    assert sum(s.on.numel() for s in candidate.layers.values()) == n_swaps
    new = {**masks, **candidate.new_masks(masks)}
    assert sum(int(m.sum()) for m in new.values()) == total
    assert candidate.active_counts(counts) == {n: int(m.sum()) for n, m in new.items()}


def test_swaps_that_would_break_a_layer_bound_are_resampled_inside_the_layers():
    # "tight" sits exactly at max sparsity 0.95, "full" exactly at min sparsity 0.5: swaps that
    # take from the first or give to the second must be re-sampled, never dropped.
    masks = _masks({"tight": (10240, 512), "full": (1024, 512), "free": (4096, 820)})
    counts = {n: int(m.sum()) for n, m in masks.items()}
    bounds = {n: count_bounds(m.numel(), 0.5, 0.95) for n, m in masks.items()}
    assert counts["tight"] == bounds["tight"][0] and counts["full"] == bounds["full"][1]
    total = sum(counts.values())
    resampled_total = 0
    for seed in range(20):
        candidate, resampled = sample_mutant("mutant", masks, counts, bounds, round(0.1 * total),
                                             torch.Generator().manual_seed(seed), _zeros)
        _check_valid(candidate, masks)
        after = candidate.active_counts(counts)
        assert candidate.n_swaps == round(0.1 * total) and candidate.dropped == 0
        assert sum(after.values()) == total
        for name, (lo, hi) in bounds.items():
            assert lo <= after[name] <= hi, (name, after[name], lo, hi)
        resampled_total += resampled
    assert resampled_total > 0  # the bound was actually exercised


def test_layer_outside_its_bounds_only_moves_towards_them():
    # an ERK start may leave a small layer dense: it may lose connections but never gain any
    counts, numel = [1024, 500], [1024, 5000]
    lo, hi = [count_bounds(n, 0.5, 0.95)[0] for n in numel], [count_bounds(n, 0.5, 0.95)[1] for n in numel]
    for seed in range(10):
        n_off, n_on, _, dropped = sample_layer_counts(counts, numel, lo, hi, 100, torch.Generator().manual_seed(seed))
        assert n_on[0] <= n_off[0]
        assert sum(n_off) == sum(n_on) == 100 - dropped


def test_count_bounds_are_exact_at_round_sparsities():
    assert count_bounds(1000, 0.5, 0.95) == (50, 500)
    assert count_bounds(96 * 288, 0.5, 0.9) == (2765, 13824)


def test_apply_then_revert_restores_weights_bit_for_bit():
    torch.manual_seed(0)
    masks = _masks({"w": (4096, 410), "v": (2048, 205)})
    params = {}
    for name, m in masks.items():
        w = torch.randn(m.shape)
        w[~m] = -0.0 * torch.sign(torch.randn(int((~m).sum())))  # pruned weights may hold -0.0
        params[name] = torch.nn.Parameter(w)
    before = {n: p.detach().clone() for n, p in params.items()}
    counts = {n: int(m.sum()) for n, m in masks.items()}
    bounds = {n: count_bounds(m.numel(), 0.5, 0.95) for n, m in masks.items()}
    candidate, _ = sample_mutant("mutant", masks, counts, bounds, 40, torch.Generator().manual_seed(3),
                                 lambda name, n: torch.full((n,), 7.0))
    saved = apply_swaps(params, candidate)
    for name, s in candidate.layers.items():
        flat = params[name].detach().view(-1)
        assert bool((flat[s.off] == 0).all()) and bool((flat[s.on] == 7.0).all())
    revert_swaps(params, candidate, saved)
    for name, p in params.items():
        assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32))
