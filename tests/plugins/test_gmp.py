"""``gmp``: the cubic schedule of Zhu & Gupta (2017), and the density after every pruning step."""

from __future__ import annotations

import pytest
import torch

from sparsebench import hookimpl
from sparsebench.conformance import tiny_setup
from sparsebench.loop import train
from sparsebench_plugins.gmp import GMP, GMPConfig, GMPSchedule


def zhu_gupta(t, s_i, s_f, t0, n, delta_t):
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * delta_t)) ** 3


def test_schedule_is_the_cubic_formula_on_its_grid_with_the_papers_defaults():
    schedule = GMPSchedule(GMPConfig(initial_sparsity=0.05), total_steps=10_000, final_sparsity=0.9)
    assert (schedule.t0, schedule.n, schedule.delta_t) == (1000, 65, 100)  # 10% .. 75% of training, Δt 100
    assert schedule.steps == list(range(1000, 7501, 100))
    for t in schedule.steps:
        assert schedule.sparsity(t) == pytest.approx(zhu_gupta(t, 0.05, 0.9, 1000, 65, 100), abs=1e-12)
    assert schedule.sparsity(1000) == pytest.approx(0.05)
    assert schedule.sparsity(7500) == pytest.approx(0.9)
    assert [t for t in range(1, 10_001) if schedule.is_pruning_step(t)] == schedule.steps


def test_last_pruning_step_is_the_last_grid_point_before_end_fraction():
    schedule = GMPSchedule(GMPConfig(delta_t=30), total_steps=300, final_sparsity=0.8)
    assert schedule.t0 == 30 and schedule.n == (225 - 30) // 30
    assert schedule.steps[-1] == 30 + 6 * 30 and schedule.sparsity(schedule.steps[-1]) == 0.8


def test_a_window_shorter_than_delta_t_prunes_once_to_the_final_sparsity():
    schedule = GMPSchedule(GMPConfig(delta_t=100), total_steps=40, final_sparsity=0.8)
    assert schedule.steps == [4] and schedule.sparsity(4) == 0.8


def test_initial_sparsity_above_the_target_is_refused():
    setup = tiny_setup(GMP, {"initial_sparsity": 0.9}, sparsity=0.5, steps=4)
    with pytest.raises(Exception, match="initial_sparsity"):
        train(setup)


class Probe:
    name = "probe"
    observer = True

    def __init__(self):
        self.weights, self.masks_before, self.after = {}, {}, {}

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        self.weights[step] = {n: p.detach().clone() for n, p in run.sparsifiable.items()}
        self.masks_before[step] = {n: m.clone() for n, m in run.masks.items()}

    @hookimpl
    def after_optimizer_step(self, run, step):
        self.after[step] = {n: m.clone() for n, m in run.masks.items()}


def _run(scope, grad_accum=1):
    probe = Probe()
    overrides = {"initial_sparsity": 0.3, "delta_t": 2, "scope": scope}
    setup = tiny_setup(GMP, overrides, observers=[("probe", probe)], steps=20, sparsity=0.8, grad_accum=grad_accum)
    train(setup)
    return setup, probe


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_density_after_every_pruning_step_is_the_schedule_up_to_rounding(scope):
    setup, probe = _run(scope)
    schedule = setup.run.plugins["gmp"].schedule
    assert schedule.steps == [2, 4, 6, 8, 10, 12, 14]
    for step in schedule.steps:
        s_t = zhu_gupta(step, 0.3, 0.8, 2, 6, 2)
        masks = probe.after[step]
        if scope == "layer":  # per logical layer: each third of a fused c_attn on its own
            for name, layer in setup.run.logical_layers.items():
                assert int(layer.mask(masks).sum()) == round((1 - s_t) * layer.numel), (step, name)
        else:
            total = sum(m.numel() for m in masks.values())
            assert sum(int(m.sum()) for m in masks.values()) == round((1 - s_t) * total), step


def test_each_pruning_step_removes_the_smallest_magnitudes_and_never_regrows():
    setup, probe = _run("layer")
    for step in setup.run.plugins["gmp"].schedule.steps:
        for layer in setup.run.logical_layers.values():  # ranked within each logical layer
            before, after = layer.mask(probe.masks_before[step]), layer.mask(probe.after[step])
            assert not bool((after & ~before).any()), "a pruned weight came back"
            w = layer.view(probe.weights[step][layer.parent]).abs()
            pruned_now = before & ~after
            if pruned_now.any():
                assert float(w[pruned_now].max()) <= float(w[after].min())


def test_masks_only_change_on_pruning_steps_and_gradient_accumulation_does_not_move_them():
    for grad_accum in (1, 2):
        setup, probe = _run("layer", grad_accum)
        changed = [s for s in range(1, 21)
                   if any(not torch.equal(probe.masks_before[s][n], probe.after[s][n]) for n in probe.after[s])]
        assert changed == [2, 4, 6, 8, 10, 12, 14]
