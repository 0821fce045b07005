"""SparsAE on GPT-2: swaps, counts and layer bounds per logical layer (c_attn's q, k, v apart),
mapped back onto the parameters' masks and weights exactly."""

from __future__ import annotations

import torch

from sparsebench.logical_layers import logical_layers
from sparsebench.masks import random_masks, sparsifiable_layers, uniform_densities
from sparsebench.models import build_model
from sparsebench_plugins.sparsae.search import active_counts
from sparsebench_plugins.sparsae.swaps import (apply_swaps, count_bounds, logical_masks, revert_swaps, sample_mutant,
                                               to_parameters)


def _setup():
    model = build_model({"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32}, vocab_size=32, seq_len=8)
    layers = sparsifiable_layers(model)
    masks = random_masks(layers, uniform_densities(layers, 0.8), torch.Generator().manual_seed(0))
    return layers, logical_layers(layers), masks


def test_mutant_swaps_map_onto_the_parameters_with_exact_per_logical_layer_counts():
    layers, parts, masks = _setup()
    counts = active_counts(logical_masks(parts, masks))
    assert counts["transformer.h.0.attn.c_attn.weight[q]"] == 205  # round(0.2 · 32 · 32)
    bounds = {n: count_bounds(p.numel, 0.5, 0.95) for n, p in parts.items()}
    values = lambda name, n: torch.arange(1, n + 1, dtype=torch.float32)  # noqa: E731  (distinct, non-zero)
    for seed in range(3):
        mutant, _ = sample_mutant("mutant", logical_masks(parts, masks), counts, bounds, 60,
                                  torch.Generator().manual_seed(seed), values)
        moved = to_parameters(mutant, parts)
        assert set(moved.layers) <= set(masks) and set(moved.parts) == set(mutant.layers)
        new = {**masks, **moved.new_masks(masks)}
        after = {n: int(p.mask(new).sum()) for n, p in parts.items()}
        assert after == moved.active_counts(counts) == mutant.active_counts(counts)
        assert sum(after.values()) == sum(counts.values())
        for name, p in parts.items():  # every logical layer within its own bounds
            assert bounds[name][0] <= after[name] <= bounds[name][1], name
        params = {n: i.param for n, i in layers.items()}
        before = {n: p.detach().clone() for n, p in params.items()}
        saved = apply_swaps(params, moved)
        for name, swaps in mutant.layers.items():  # the logical positions got the candidate's values
            assert torch.equal(parts[name].weight().reshape(-1)[swaps.on], swaps.init)
        revert_swaps(params, moved, saved)
        assert all(torch.equal(params[n].detach(), before[n]) for n in params)


def test_unfused_candidates_are_left_as_they_are():
    layers, parts, masks = _setup()
    only_mlp = {n: p for n, p in parts.items() if ".mlp." in n}
    counts = active_counts(logical_masks(only_mlp, masks))
    bounds = {n: count_bounds(p.numel, 0.5, 0.95) for n, p in only_mlp.items()}
    mutant, _ = sample_mutant("mutant", logical_masks(only_mlp, masks), counts, bounds, 20,
                              torch.Generator().manual_seed(0), lambda name, n: torch.zeros(n))
    assert to_parameters(mutant, parts) is mutant
