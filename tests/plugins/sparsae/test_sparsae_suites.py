"""The suites that run SparsAE: smoke includes it; the ablation covers every component switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsebench.errors import SuiteError
from sparsebench.suites import expand_suite

SUITES = Path(__file__).parents[3] / "suites"


def test_smoke_suite_runs_sparsae_with_mask_updates_inside_its_steps(registry):
    _, runs = expand_suite(SUITES / "smoke.yaml", registry)
    sparsae = [r for r in runs if r.method.name == "sparsae"]
    assert len(sparsae) == 1
    k = sparsae[0].method.config["mask_update_every"]
    assert sparsae[0].training.steps // k >= 3


def test_ablation_suite_switches_each_component_off_and_compares_with_rigl_and_static(registry):
    suite, runs = expand_suite(SUITES / "sparsae_ablation.yaml", registry)
    assert len(suite.seeds) >= 3
    by_label = {r.method.display: r for r in runs if r.seed == suite.seeds[0]}
    full = by_label["sparsae-full"].method.config
    assert {r.sparsity for r in runs} == {0.9} and len({r.training.steps for r in runs}) == 1

    def differs(label):
        cfg = by_label[label].method.config
        return {k: v for k, v in cfg.items() if full[k] != v}

    assert {b["burn_in_steps"] for b in (full, by_label["sparsae-burnin0"].method.config,
                                         by_label["sparsae-burnin10"].method.config)} == {0, 5, 10}
    assert {differs("sparsae-lambda1")["lambda_"], full["lambda_"], differs("sparsae-lambda5")["lambda_"]} == {1, 3, 5}
    assert differs("sparsae-no-distill") == {"distill": False}
    assert differs("sparsae-ce-only") == {"w_div": 0.0, "w_grad": 0.0}
    assert differs("sparsae-no-reset") == {"global_reset": False}
    assert by_label["rigl"].method.name == "rigl" and by_label["static-uniform"].method.name == "static"
    assert [w.name for w in by_label["rigl+ema_distill"].method.with_] == ["ema_distill"]


def test_unknown_sparsae_option_is_refused_listing_the_allowed_ones(registry, write_suite):
    path = write_suite(methods=[{"sparsae": {"lamda": 3}}])
    with pytest.raises(SuiteError, match=r"unknown option of method 'sparsae'. Did you mean 'lambda_'\?"):
        expand_suite(path, registry)


@pytest.mark.parametrize("method", ["sparsae", "sparsae_search"])
def test_a_suite_without_heldout_data_is_refused_naming_heldout_fraction(method, registry):
    with pytest.raises(SuiteError, match=r"data\.heldout_fraction is 0.*set data\.heldout_fraction > 0"):
        expand_suite(SUITES / "smoke.yaml", registry, {"data.heldout_fraction": 0, "methods": [method]})
