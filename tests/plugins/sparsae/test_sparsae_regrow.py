"""Kaiming regrowth: new connections get truncated-normal values with std sqrt(2 / fan_in); nothing else moves."""

from __future__ import annotations

import math
import types

import pytest
import torch

from sparsebench.masks import LayerInfo
from sparsebench_plugins.sparsae.regrow import KaimingRegrow, truncated_std_factor


def _run(fan_in: int = 200, fan_out: int = 300):
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(fan_out, fan_in, generator=g))  # nn.Linear layout (out, in)
    old = torch.rand(fan_out, fan_in, generator=g) < 0.1
    with torch.no_grad():
        w.mul_(old)
    info = LayerInfo("w", w, fan_in=fan_in, fan_out=fan_out, out_dim=0, in_dim=1)
    run = types.SimpleNamespace(sparsifiable={"w": w}, layers={"w": info}, generator=torch.Generator().manual_seed(1))
    return run, old


def test_truncated_std_factor_matches_the_truncated_normal():
    assert truncated_std_factor(2.0) == pytest.approx(0.8796256610, rel=1e-8)


def test_regrown_weights_get_truncated_kaiming_values_and_nothing_else_changes():
    run, old = _run()
    new = old.clone()
    flat = new.view(-1)
    active = torch.nonzero(flat).view(-1)
    flat[active[:100]] = False  # pruned
    flat[torch.nonzero(~old.view(-1)).view(-1)[:40000]] = True  # regrown
    w = run.sparsifiable["w"]
    with torch.no_grad():  # what the harness does before on_mask_change
        w.mul_(new)
    before = w.detach().clone()
    KaimingRegrow().on_mask_change(run=run, step=1, old={"w": old}, new={"w": new})
    regrown = new & ~old
    values = w.detach()[regrown]
    std = math.sqrt(2 / 200)
    assert values.std().item() == pytest.approx(std, rel=0.02)
    assert values.mean().item() == pytest.approx(0.0, abs=0.02 * std)
    assert values.abs().max().item() <= 2 * std / truncated_std_factor(2.0) + 1e-6
    assert bool((values != 0).all())
    assert torch.equal(w.detach()[~regrown], before[~regrown])  # kept weights untouched, pruned stay 0
    assert bool((w.detach()[~new] == 0).all())


def test_offered_values_are_used_for_exactly_matching_positions_otherwise_fresh_draws():
    run, old = _run()
    new = old.clone()
    on = torch.nonzero(~old.view(-1)).view(-1)[:5]
    new.view(-1)[on] = True
    regrow = KaimingRegrow()
    regrow.offer("w", on, torch.arange(1.0, 6.0))
    regrow.on_mask_change(run=run, step=1, old={"w": old}, new={"w": new})
    assert run.sparsifiable["w"].detach().view(-1)[on].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    # an offer for other positions is ignored (and never reused)
    newer = new.clone()
    on2 = torch.nonzero(~new.view(-1)).view(-1)[:5]
    newer.view(-1)[on2] = True
    regrow.offer("w", on, torch.arange(1.0, 6.0))
    regrow.on_mask_change(run=run, step=2, old={"w": new}, new={"w": newer})
    assert 1.0 not in run.sparsifiable["w"].detach().view(-1)[on2].tolist()
    assert regrow._offered == {}
