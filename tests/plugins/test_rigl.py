"""``rigl``: the cosine drop schedule, drop/grow rule, exact counts, both Adam moments reset, and the
FLOPs ledger against the paper's (3·f_S·ΔT + 2·f_S + f_D)/(ΔT + 1)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsebench import hookimpl
from sparsebench.api import cosine_drop_fraction
from sparsebench.conformance import start_run, tiny_setup
from sparsebench.loop import train
from sparsebench.masks import erk_densities
from sparsebench_plugins.rigl import DENSE_GRAD, RigL, rigl_update


def test_drop_fraction_is_half_alpha_times_one_plus_cosine():
    for t in (0, 1, 100, 3000, 5000, 7499):
        assert cosine_drop_fraction(t, 0.3, 7500) == pytest.approx(0.15 * (1 + math.cos(math.pi * t / 7500)))
    assert cosine_drop_fraction(0, 0.3, 7500) == pytest.approx(0.3)
    assert cosine_drop_fraction(7500, 0.3, 7500) == 0.0 and cosine_drop_fraction(9000, 0.3, 7500) == 0.0


def test_update_drops_smallest_magnitudes_and_grows_largest_gradients_among_the_inactive():
    w = torch.tensor([0.9, -0.1, 0.5, 0.05, 0.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    grad = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3, 0.1, 0.7, 0.2])
    new = rigl_update(mask, w, grad, 0.5)  # k = ⌊0.5·4⌋ = 2: drop 0.05 and -0.1; grow 0.7 and 0.3
    assert new.tolist() == [True, False, True, False, True, False, True, False]


def test_a_just_dropped_weight_may_regrow():
    w = torch.tensor([0.9, 0.01, 0.0, 0.0])
    mask = torch.tensor([True, True, False, False])
    grad = torch.tensor([0.0, 5.0, 0.1, 0.2])  # the dropped weight has the largest gradient
    assert torch.equal(rigl_update(mask, w, grad, 0.5), mask)


def test_initial_masks_are_erk_by_default():
    setup = tiny_setup(RigL, steps=1, sparsity=0.9)
    start_run(setup)
    densities = erk_densities(setup.run.layers, 0.9)
    for name, layer in setup.run.logical_layers.items():
        assert int(layer.mask(setup.run.masks).sum()) == round(densities[name] * layer.numel)
    setup.run.metrics.close()


def _counts(run):
    """Active count per logical layer (GPT-2's c_attn as q, k and v)."""
    return {n: int(layer.mask(run.masks).sum()) for n, layer in run.logical_layers.items()}


class Probe:
    """Checks every change as the harness applied it, and records the ledger at each step start."""

    name = "probe"
    observer = True

    def __init__(self):
        self.initial, self.changes, self.ledger_at_start = {}, [], {}

    @hookimpl
    def on_train_start(self, run):
        self.initial = _counts(run)

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        if step not in self.ledger_at_start:  # first micro-batch: nothing of this step is charged yet
            self.ledger_at_start[step] = run.ledger.total

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        report = {"step": step, "counts": _counts(run), "layers": {}}
        for name in new:
            changed = old[name] != new[name]
            state = run.optimizer.state[run.sparsifiable[name]]
            report["layers"][name] = {
                "n_changed": int(changed.sum()),
                "exp_avg": float(state["exp_avg"][changed].abs().sum()),
                "exp_avg_sq": float(state["exp_avg_sq"][changed].abs().sum()),
                "kept_exp_avg_sq": float(state["exp_avg_sq"][~changed].abs().sum()),
                "regrown": float(run.sparsifiable[name].detach()[new[name] & ~old[name]].abs().sum()),
            }
        self.changes.append(report)


def _run(steps=16, grad_accum=1, **overrides):
    probe = Probe()
    setup = tiny_setup(RigL, {"delta_t": 4, **overrides}, observers=[("probe", probe)], steps=steps,
                       grad_accum=grad_accum)
    train(setup)
    return setup.run, probe


def test_counts_stay_exact_regrown_start_at_zero_and_both_adam_moments_are_reset():
    run, probe = _run()
    assert [c["step"] for c in probe.changes] == [4, 8]  # T_end = round(0.75·16) = 12, strictly before
    for change in probe.changes:
        assert change["counts"] == probe.initial
        for layer in change["layers"].values():
            assert layer["n_changed"] > 0
            assert layer["exp_avg"] == 0 and layer["exp_avg_sq"] == 0  # both moments, not only the first
            assert layer["kept_exp_avg_sq"] > 0
            assert layer["regrown"] == 0


def test_updates_are_counted_in_optimizer_steps_under_gradient_accumulation():
    _, plain = _run(grad_accum=1)
    _, accumulated = _run(grad_accum=2)
    assert [c["step"] for c in accumulated.changes] == [c["step"] for c in plain.changes] == [4, 8]


def test_ledger_charges_the_dense_gradient_so_update_periods_follow_the_papers_formula():
    delta_t, steps = 4, 17
    run, probe = _run(steps=steps, end_fraction=1.0)
    tokens = run.tokens_per_step
    densities = {n: float(m.float().mean()) for n, m in run.masks.items()}
    f_s = run.ledger.forward_cost(tokens, densities)
    f_d = run.ledger.forward_cost(tokens)
    starts = [probe.ledger_at_start[t] for t in range(1, steps + 1)] + [run.ledger.total]
    cost = {t: starts[t] - starts[t - 1] for t in range(1, steps + 1)}
    updates = [4, 8, 12, 16]
    for t, c in cost.items():
        assert c == pytest.approx(2 * f_s + f_d if t in updates else 3 * f_s, rel=1e-12), t
    # ΔT sparse steps plus one update step, e.g. steps 5..9: the paper's per-step average
    paper = (3 * f_s * delta_t + 2 * f_s + f_d) / (delta_t + 1)
    for first in (1, 5, 9):
        window = range(first, first + delta_t + 1)
        assert sum(cost[t] for t in window) / (delta_t + 1) == pytest.approx(paper, rel=1e-12)
    assert run.ledger.by_name[DENSE_GRAD] == pytest.approx(len(updates) * (f_d - f_s), rel=1e-12)
