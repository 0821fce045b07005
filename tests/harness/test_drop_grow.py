"""The public drop/grow helpers (sparsebench.drop_grow, re-exported by sparsebench.api)."""

import math

import pytest
import torch

from sparsebench.api import (
    changed_only,
    cosine_drop_fraction,
    drop_lowest,
    drop_lowest_global,
    fraction_step,
    grow_highest,
    grow_random,
    keep_top,
    keep_top_global,
    magnitude_masks,
    update_due,
)


def mask(*bits):
    return torch.tensor(bits, dtype=torch.bool)


def test_drop_lowest_removes_exactly_the_lowest_active_entries_and_leaves_the_input_alone():
    current = mask(1, 1, 1, 0, 1)
    score = torch.tensor([5.0, 1.0, 3.0, 0.0, 2.0])  # the inactive entry's lowest score is never picked
    new = drop_lowest(current, score, 2)
    assert new.tolist() == [True, False, True, False, False]
    assert current.tolist() == [True, True, True, False, True]
    assert drop_lowest(current, score, 10).sum() == 0  # clamped to the active count


def test_grow_highest_activates_exactly_the_highest_inactive_entries():
    current = mask(1, 0, 0, 0)
    score = torch.tensor([9.0, 1.0, 3.0, 2.0])
    assert grow_highest(current, score, 2).tolist() == [True, False, True, True]
    assert grow_highest(current, score, 10).all()  # clamped to the inactive count


def test_grow_random_activates_k_inactive_entries_reproducibly_from_the_generator():
    current = torch.zeros(100, dtype=torch.bool)
    current[:10] = True
    a = grow_random(current, 7, torch.Generator().manual_seed(0))
    b = grow_random(current, 7, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and int(a.sum()) == 17 and a[:10].all()


def test_keep_top_keeps_exactly_k_and_respects_allowed():
    score = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    assert keep_top(score, 2).tolist() == [[True, True], [False, False]]
    allowed = torch.tensor([[False, True], [True, True]])
    assert keep_top(score, 2, allowed).tolist() == [[False, True], [True, False]]


def test_global_helpers_rank_all_layers_together():
    scores = {"a": torch.tensor([1.0, 8.0]), "b": torch.tensor([5.0, 2.0, 7.0])}
    kept = keep_top_global(scores, 3)
    assert kept["a"].tolist() == [False, True] and kept["b"].tolist() == [True, False, True]
    masks = {"a": mask(1, 1), "b": mask(1, 1, 0)}
    dropped = drop_lowest_global(scores, masks, 2)
    assert dropped["a"].tolist() == [False, True] and dropped["b"].tolist() == [True, False, False]


def test_magnitude_masks_keep_the_largest_weights_per_layer_or_globally():
    weights = {"a": torch.tensor([0.1, -0.9, 0.5, 0.2]), "b": torch.tensor([3.0, -2.0, 1.0, 0.05])}
    masks = {n: torch.ones(4, dtype=torch.bool) for n in weights}
    per_layer = magnitude_masks(weights, masks, 0.5, "layer")
    assert per_layer["a"].tolist() == [False, True, True, False] and per_layer["b"].tolist() == [True, True, False, False]
    overall = magnitude_masks(weights, masks, 0.5, "global")
    assert overall["b"].tolist() == [True, True, True, False] and overall["a"].tolist() == [False, True, False, False]


def test_changed_only_returns_the_layers_that_differ():
    old = {"a": mask(1, 0), "b": mask(0, 1)}
    changed = changed_only(old, {"a": mask(1, 0), "b": mask(1, 0)})
    assert list(changed) == ["b"] and changed["b"].tolist() == [True, False]


def test_schedules_count_optimizer_steps():
    assert fraction_step(0.75, 100) == 75 and fraction_step(0.001, 100) == 1
    assert [s for s in range(1, 101) if update_due(s, 25, 75)] == [25, 50]
    assert cosine_drop_fraction(0, 0.3, 75) == pytest.approx(0.3)
    assert cosine_drop_fraction(75, 0.3, 75) == 0.0
    assert cosine_drop_fraction(25, 0.3, 75) == pytest.approx(0.15 * (1 + math.cos(math.pi / 3)))
