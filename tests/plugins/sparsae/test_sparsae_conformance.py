"""SparsAE through the conformance kit, and state round trips of the components the kit cannot run alone."""

from __future__ import annotations

import io

import torch

from sparsebench.conformance import MethodConformance, _first_difference, single_thread, start_run, tiny_setup
from sparsebench_plugins.sparsae import BurnIn, EmaDistill, KaimingRegrow, MaskSearch, SparsAE

KIT_OVERRIDES = {"mask_update_every": 3, "p_mutate": 0.02, "lambda_": 3}


class TestSparsAEConformance(MethodConformance):
    method = SparsAE
    overrides = KIT_OVERRIDES
    expect_updates = True


class TestSparsAESearchConformance(MethodConformance):
    method = MaskSearch
    overrides = KIT_OVERRIDES
    expect_updates = True


def _round_trip(instance, cls, config):
    buffer = io.BytesIO()
    torch.save(instance.state_dict(), buffer)
    buffer.seek(0)
    fresh = cls(config)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def test_component_states_survive_a_weights_only_round_trip_into_fresh_instances():
    from sparsebench.loop import train

    with single_thread():
        setup = tiny_setup(SparsAE, {**KIT_OVERRIDES, "distill_warmup": 2}, steps=9)
        try:
            train(setup)
        finally:
            setup.run.metrics.close()
    plugins = setup.run.plugins
    for cls in (MaskSearch, KaimingRegrow, BurnIn, EmaDistill):
        instance = plugins[cls.name]
        fresh = _round_trip(instance, cls, instance.config)
        assert _first_difference(fresh.state_dict(), instance.state_dict()) is None, cls.name
    assert plugins["sparsae_search"].state_dict()["updates"] == 2  # steps 3 and 6; none at the last step (9)


def test_state_loaded_before_configure_takes_effect_when_the_run_is_configured():
    with single_thread():
        setup = tiny_setup(SparsAE, KIT_OVERRIDES, steps=3)
        start_run(setup)
    ema = setup.run.plugins["ema_distill"]
    state = ema.state_dict()
    state["n_updates"] = 41
    fresh = EmaDistill(ema.config)
    fresh.load_state_dict(state)  # a resumed run may restore before configure
    with single_thread():
        other = tiny_setup(SparsAE, KIT_OVERRIDES, steps=3)
    fresh.configure(run=other.run)
    other.run.metrics.close()
    setup.run.metrics.close()
    assert fresh.n_updates == 41
    assert _first_difference(fresh.state_dict()["teacher"], state["teacher"]) is None
