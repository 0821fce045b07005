"""``set``: removal counts of both variants, random regrowth, exact counts, ER initial densities."""

from __future__ import annotations

import math

import pytest
import torch

from sparsebench import hookimpl
from sparsebench.api import grow_random, update_due
from sparsebench.conformance import start_run, tiny_setup
from sparsebench.loop import train
from sparsebench.masks import LayerInfo, er_densities
from sparsebench_plugins.set_method import SET, set_drop
from sparsebench_plugins.static import Static


def _layer(n_pos=50, n_neg=30, n_inactive=20, seed=0):
    """A flat layer: n_pos active positive, n_neg active negative weights, n_inactive pruned zeros."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n_pos, generator=g) + 0.01
    neg = -(torch.rand(n_neg, generator=g) + 0.01)
    w = torch.cat([pos, neg, torch.zeros(n_inactive)])
    perm = torch.randperm(len(w), generator=g)
    mask = torch.cat([torch.ones(n_pos + n_neg, dtype=torch.bool), torch.zeros(n_inactive, dtype=torch.bool)])
    return w[perm], mask[perm]


def test_original_variant_removes_zeta_of_positives_and_of_negatives_closest_to_zero_separately():
    w, mask = _layer(n_pos=50, n_neg=30)
    kept = set_drop(mask, w, 0.3, "original")
    removed = mask & ~kept
    assert int((removed & (w > 0)).sum()) == math.floor(0.3 * 50) == 15
    assert int((removed & (w < 0)).sum()) == math.floor(0.3 * 30) == 9
    assert not bool((kept & ~mask).any())
    # the removed ones are the positives closest to zero and the negatives closest to zero
    pos_sorted = torch.sort(w[mask & (w > 0)]).values
    neg_sorted = torch.sort(w[mask & (w < 0)], descending=True).values  # -0.01 first
    assert torch.equal(torch.sort(w[removed & (w > 0)]).values, pos_sorted[:15])
    assert torch.equal(torch.sort(w[removed & (w < 0)], descending=True).values, neg_sorted[:9])


def test_magnitude_variant_removes_zeta_of_all_active_weights_by_absolute_value():
    w, mask = _layer(n_pos=50, n_neg=30)
    kept = set_drop(mask, w, 0.3, "magnitude")
    removed = mask & ~kept
    assert int(removed.sum()) == math.floor(0.3 * 80) == 24
    assert float(w[removed].abs().max()) <= float(w[kept].abs().min())


def test_variants_differ_when_one_sign_holds_the_small_weights():
    w = torch.tensor([0.01, 0.02, 0.03, 0.04, -1.0, -2.0, -3.0, -4.0])
    mask = torch.ones(8, dtype=torch.bool)
    original = mask & ~set_drop(mask, w, 0.5, "original")
    magnitude = mask & ~set_drop(mask, w, 0.5, "magnitude")
    assert original.tolist() == [True, True, False, False, True, True, False, False]
    assert magnitude.tolist() == [True, True, True, True, False, False, False, False]


def test_active_zero_weights_count_as_negative_closest_to_zero():
    w = torch.tensor([0.0, 0.5, 0.6, -0.5, -0.6])
    kept = set_drop(torch.ones(5, dtype=torch.bool), w, 0.5, "original")
    # positives: ⌊0.5·2⌋ = 1 (0.5); non-positives: ⌊0.5·3⌋ = 1 (the zero)
    assert kept.tolist() == [False, False, True, True, True]


def test_grow_random_activates_exactly_k_inactive_positions_uniformly():
    mask = torch.zeros(200, 100, dtype=torch.bool)
    mask[:100] = True
    grown = grow_random(mask, 5000, torch.Generator().manual_seed(0))
    assert int(grown.sum()) == 20_000 - 5000 and torch.equal(grown[:100], mask[:100])
    per_row = grown[100:].sum(dim=1).float()  # Binomial-ish(100, 0.5) per row: mean 50, sd 5
    assert abs(float(per_row.mean()) - 50) < 1e-9 and float(per_row.std()) < 8


def test_update_happens_every_delta_t_steps_strictly_before_the_end():
    assert [t for t in range(1, 301) if update_due(t, 100, 300)] == [100, 200]
    assert [t for t in range(1, 301) if update_due(t, 25, 225)] == list(range(25, 225, 25))


def _counts(run):
    """Active count per logical layer (GPT-2's c_attn as q, k and v)."""
    return {n: int(layer.mask(run.masks).sum()) for n, layer in run.logical_layers.items()}


class Probe:
    name = "probe"
    observer = True

    def __init__(self):
        self.initial, self.changes = {}, []

    @hookimpl
    def on_train_start(self, run):
        self.initial = _counts(run)

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        regrown_values = [float(run.sparsifiable[n].detach()[new[n] & ~old[n]].abs().sum()) for n in new]
        self.changes.append((step, _counts(run),
                             {n: (int((old[n] & ~new[n]).sum()), int(old[n].sum())) for n in new}, regrown_values))


@pytest.mark.parametrize("variant", ["original", "magnitude"])
def test_every_update_keeps_each_layers_count_and_regrows_at_zero(variant):
    probe = Probe()
    setup = tiny_setup(SET, {"delta_t": 3, "variant": variant}, observers=[("probe", probe)], steps=12)
    train(setup)
    assert [c[0] for c in probe.changes] == [3, 6, 9]
    for step, counts, removed, regrown_values in probe.changes:
        assert counts == probe.initial
        assert all(v == 0 for v in regrown_values)
        for name, (n_removed, n_active) in removed.items():
            # dropped = ⌊ζ·n⌋ (magnitude) or ⌊ζ·n_pos⌋ + ⌊ζ·n_neg⌋ ≤ ⌊ζ·n⌋ (original); some may regrow
            assert 0 < n_removed <= math.floor(0.3 * n_active)


@pytest.mark.parametrize("method,overrides", [(SET, {}), (Static, {"distribution": "er"})])
def test_initial_masks_follow_erdos_renyi(method, overrides):
    setup = tiny_setup(method, overrides, steps=1, sparsity=0.9)
    run = setup.run
    start_run(setup)
    densities = er_densities(run.layers, 0.9)
    for name, layer in run.logical_layers.items():
        assert int(layer.mask(run.masks).sum()) == round(densities[name] * layer.numel)
    setup.run.metrics.close()


def test_er_density_is_proportional_to_fan_in_plus_fan_out_over_their_product():
    def layer(name, n_in, n_out):
        return LayerInfo(name, torch.nn.Parameter(torch.empty(n_out, n_in)), fan_in=n_in, fan_out=n_out)

    layers = {l.name: l for l in [layer("a", 64, 256), layer("b", 256, 64), layer("c", 64, 64), layer("d", 512, 512)]}
    d = er_densities(layers, 0.9)
    raw = {n: (l.fan_in + l.fan_out) / (l.fan_in * l.fan_out) for n, l in layers.items()}
    eps = d["d"] / raw["d"]
    for name in layers:
        assert d[name] == pytest.approx(eps * raw[name], rel=1e-12)
    assert max(d.values()) < 1  # none capped at this sparsity, so one ε scales all four
    budget = sum(l.numel - math.floor(0.9 * l.numel) for l in layers.values())
    assert sum(d[n] * l.numel for n, l in layers.items()) == pytest.approx(budget)
