"""SparsAE's composite proxy, running normalisation, annealed weights and conditional rules."""

from __future__ import annotations

import math

import pytest

from sparsebench_plugins.sparsae.proxy import (
    CompositeProxy,
    RunningNorm,
    annealed_weight,
    diversity,
    layer_grad_term,
    select,
)
from sparsebench_plugins.sparsae.triggers import AdaptiveBounds, Stagnation


def test_kl_diversity_is_sum_of_s_log_s_over_target():
    s, t = [0.85, 0.9, 0.95], 0.9
    expected = 0.85 * math.log(0.85 / 0.9) + 0.0 + 0.95 * math.log(0.95 / 0.9)
    assert diversity(s, t, "kl") == pytest.approx(expected, rel=1e-12)
    assert diversity([0.9] * 4, 0.9, "kl") == 0.0


def test_rms_diversity_is_root_mean_square_deviation_from_target():
    assert diversity([0.8, 0.9, 1.0], 0.9, "rms") == pytest.approx(math.sqrt((0.01 + 0 + 0.01) / 3), rel=1e-12)


def test_layer_grad_term_is_norm_over_sqrt_active():
    assert layer_grad_term(16.0, 4) == pytest.approx(2.0)
    assert layer_grad_term(5.0, 0) == 0.0


def test_running_norm_starts_from_the_first_candidates_then_decays_with_the_selected_values():
    norm = RunningNorm(decay=0.99, eps=1e-5)
    values = [1.0, 2.0, 4.0]
    normed = norm.normalise_all(values)
    mu, var = 7 / 3, sum((v - 7 / 3) ** 2 for v in values) / 3
    assert normed == pytest.approx([(v - mu) / (math.sqrt(var) + 1e-5) for v in values])
    # fold in the selected value 2.0, then 3.0: δ = x − μ; μ += (1−d)δ; σ² = d(σ² + (1−d)δ²)
    for x in (2.0, 3.0):
        delta = x - mu
        mu, var = mu + 0.01 * delta, 0.99 * (var + 0.01 * delta * delta)
        norm.update(x)
        assert norm.mu == pytest.approx(mu, rel=1e-12) and norm.sigma == pytest.approx(math.sqrt(var), rel=1e-12)
    assert norm.normalise(5.0) == pytest.approx((5.0 - mu) / (math.sqrt(var) + 1e-5))


def test_proxy_is_weighted_normalised_ce_plus_div_minus_grad():
    proxy = CompositeProxy(w_ce=1.0, w_div=0.01, w_grad=0.005)
    raws = [{"ce": 3.0, "div": 0.1, "grad": 0.2}, {"ce": 2.9, "div": 0.3, "grad": 0.1}]
    weights = {"ce": 1.0, "div": 0.01, "grad": 0.005}
    scored = proxy.score(raws, weights)
    for s in scored:
        n = {c: proxy.norms[c].normalise(s.raw[c]) for c in ("ce", "div", "grad")}
        assert s.norm == pytest.approx(n)
        assert s.proxy == pytest.approx(n["ce"] + 0.01 * n["div"] - 0.005 * n["grad"])
    proxy.update(scored[1].raw)
    assert proxy.norms["ce"].mu == pytest.approx(2.95 + 0.01 * (2.9 - 2.95))


def test_div_and_grad_weights_decay_quadratically_to_zero_over_70_percent_of_updates():
    # 10 planned updates: U = 7
    assert annealed_weight(0.01, 0, 10, 0.7) == 0.01
    assert annealed_weight(0.01, 3, 10, 0.7) == pytest.approx(0.01 * (1 - 3 / 7) ** 2)
    assert annealed_weight(0.005, 6, 10, 0.7) == pytest.approx(0.005 * (1 / 7) ** 2)
    assert annealed_weight(0.01, 7, 10, 0.7) == 0.0
    assert annealed_weight(0.01, 9, 10, 0.7) == 0.0
    w = CompositeProxy().weights(3, 10)
    assert w["ce"] == 1.0 and w["div"] == pytest.approx(0.01 * (4 / 7) ** 2) and w["grad"] == pytest.approx(0.005 * (4 / 7) ** 2)


def test_lowest_proxy_wins_the_current_mask_wins_ties_and_rejected_candidates_never_win():
    class S:
        def __init__(self, p):
            self.proxy = p

    assert select([S(0.5), S(-1.0), S(0.2)]) == 1
    assert select([S(0.1), S(0.1)]) == 0
    assert select([None, S(2.0), None]) == 1
    assert select([None, None]) is None


def test_stagnation_boosts_for_exactly_the_next_two_updates_after_five_without_improvement():
    rule = Stagnation(patience=5, boost_updates=2)
    ppls = [10.0] + [11.0] * 11 + [9.0, 9.5]
    boosted = []
    for ppl in ppls:
        rule.observe(ppl)
        boosted.append(rule.take_boost())
    # update 0 sets the best; updates 1..5 do not improve → boost at updates 5 and 6;
    # the count restarts, 7..10 → boost at 10 and 11; 12 improves
    assert [i for i, b in enumerate(boosted) if b] == [5, 6, 10, 11]


def test_stagnation_counts_a_nan_perplexity_as_no_improvement():
    rule = Stagnation(patience=2, boost_updates=1)
    assert [rule.observe(p) for p in (5.0, float("nan"), float("nan"))] == [False, False, True]


def _bounds(target, cap, numel=1000):
    return AdaptiveBounds({"a": 0.95, "b": 0.95}, {"a": numel, "b": numel}, target, threshold=1e-4, patience=10,
                          step=0.05, cap=cap)


def test_flat_layer_bound_is_raised_after_ten_updates_below_the_floor_and_logged():
    bounds = _bounds(target=0.93, cap="target")
    for _ in range(9):
        assert bounds.observe({"a": 1e-5, "b": 1e-3}) == []
    changes = bounds.observe({"a": 1e-5, "b": 1e-3})
    assert changes == [{"layer": "a", "old_max_sparsity": 0.95, "new_max_sparsity": pytest.approx(0.98),
                        "grad": 1e-5, "updates_below": 10}]
    assert bounds.max_sparsity["b"] == 0.95
    # capped at target + 5%: ten more flat updates change nothing
    for _ in range(10):
        assert bounds.observe({"a": 1e-5, "b": 1e-3}) == []


def test_one_update_above_the_floor_restarts_the_count():
    bounds = _bounds(target=0.93, cap="target")
    for g in [1e-5] * 9 + [1e-3] + [1e-5] * 9:
        assert bounds.observe({"a": g, "b": 1e-3}) == []


def test_literal_cap_never_raises_a_default_bound_at_target_0_9_but_bound_cap_does():
    literal, loose = _bounds(target=0.9, cap="target"), _bounds(target=0.9, cap="bound")
    for _ in range(10):
        assert literal.observe({"a": 0.0, "b": 1.0}) == []
        loose_changes = loose.observe({"a": 0.0, "b": 1.0})
    assert loose_changes and loose.max_sparsity["a"] == pytest.approx(1.0 - 1 / 1000)
