"""The conformance kit: run on every first-party method and on a test plugin, and shown to fail
on broken methods."""

from __future__ import annotations

import textwrap
from importlib.metadata import entry_points

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsebench import hookimpl
from sparsebench.conformance import (
    MethodConformance,
    check_config,
    check_determinism,
    check_final_density,
    check_initial_masks,
    check_state_dict,
    check_updates,
    run_kit,
)
from sparsebench.api import map_layers
from sparsebench.masks import random_masks, uniform_densities
from sparsebench.methods import Method
from sparsebench_plugins.dense import Dense
from sparsebench_plugins.gmp import GMP
from sparsebench_plugins.gumbel import Gumbel
from sparsebench_plugins.magnitude import Magnitude
from sparsebench_plugins.rigl import RigL
from sparsebench_plugins.set_method import SET
from sparsebench_plugins.static import Static

pytest_plugins = ["pytester"]


# ------------------------------------------------------------------------------ first-party methods


class TestDenseConformance(MethodConformance):
    method = Dense


class TestStaticERConformance(MethodConformance):
    method = Static
    overrides = {"distribution": "er"}


class TestMagnitudeConformance(MethodConformance):
    method = Magnitude
    expect_updates = True


class TestGMPConformance(MethodConformance):
    method = GMP
    overrides = {"delta_t": 2}
    expect_updates = True


class TestSETConformance(MethodConformance):
    method = SET
    overrides = {"delta_t": 3}
    expect_updates = True


class TestSETMagnitudeConformance(MethodConformance):
    method = SET
    overrides = {"delta_t": 3, "variant": "magnitude", "distribution": "uniform"}
    expect_updates = True


class TestRigLConformance(MethodConformance):
    method = RigL
    overrides = {"delta_t": 3}
    expect_updates = True


class TestGumbelConformance(MethodConformance):
    method = Gumbel
    expect_updates = True


def test_every_baseline_method_has_a_conformance_class():
    tested = {cls.method for cls in globals().values()
              if isinstance(cls, type) and issubclass(cls, MethodConformance) and cls.method is not None}
    assert {Dense, Static, Magnitude, GMP, SET, RigL, Gumbel} <= tested


# ------------------------------------------------------------------------------ a third-party plugin


class SwapConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = Field(5, ge=1, description="steps between swaps")


class RandomSwap(Method):
    """A test plugin written as a third party would: swaps one random weight per logical layer
    (``map_layers`` hands it each third of GPT-2's fused c_attn on its own)."""

    name = "random-swap"
    Config = SwapConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.swaps = 0

    @hookimpl
    def init_mask(self, run, model):
        return random_masks(run.layers, uniform_densities(run.layers, run.sparsity), run.generator)

    @hookimpl
    def update_mask(self, run, step, masks):
        if step % self.config.every:
            return None
        def swap_one(layer, mask):
            flat = mask.clone().reshape(-1)
            on, off = torch.nonzero(flat).view(-1), torch.nonzero(~flat).view(-1)
            flat[on[torch.randint(len(on), (1,), generator=run.generator)]] = False
            flat[off[torch.randint(len(off), (1,), generator=run.generator)]] = True
            return flat.view(layer.shape)

        self.swaps += 1
        return map_layers(masks, swap_one, run.layers)

    def state_dict(self):
        return {"swaps": self.swaps}

    def load_state_dict(self, state):
        self.swaps = state["swaps"]


class TestThirdPartyPluginConformance(MethodConformance):
    method = RandomSwap
    overrides = {"every": 3}
    expect_updates = True


# ------------------------------------------------------------------------------ the kit catches faults


class Miscounting(RandomSwap):
    """Prunes one weight without declaring changes_density (the harness refuses it)."""

    name = "miscounting"

    @hookimpl
    def update_mask(self, run, step, masks):
        if step != 3:
            return None
        name, mask = next(iter(masks.items()))
        flat = mask.clone().view(-1)
        flat[torch.nonzero(flat)[0]] = False
        return {name: flat.view_as(mask)}


class QueryToValue(RandomSwap):
    """Moves one active weight of every fused c_attn from its query third to its value third:
    the parameter's count is unchanged, the logical layers' counts are not."""

    name = "query-to-value"

    @hookimpl
    def update_mask(self, run, step, masks):
        if step != 3:
            return None
        new = {}
        for name, mask in masks.items():
            if name.endswith("attn.c_attn.weight"):
                m, third = mask.clone(), mask.shape[1] // 3  # Conv1D (in, out): q | k | v on axis 1
                row, col = map(int, torch.nonzero(m[:, :third])[0])
                m[row, col] = False
                row, col = map(int, torch.nonzero(~m[:, 2 * third:])[0])
                m[row, 2 * third + col] = True
                new[name] = m
        return new


class InPlace(RandomSwap):
    """Edits the current mask in place (declares changes_density so only the kit notices)."""

    name = "in-place"
    changes_density = True

    @hookimpl
    def update_mask(self, run, step, masks):
        if step != 3:
            return None
        name, mask = next(iter(masks.items()))
        mask.view(-1)[torch.nonzero(mask.view(-1))[0]] = False
        return {name: mask}


class WrongDensity(RandomSwap):
    name = "wrong-density"

    @hookimpl
    def init_mask(self, run, model):
        return random_masks(run.layers, uniform_densities(run.layers, 0.5), run.generator)


class DenseForever(Method):
    """Starts dense without declaring changes_density: can never reach the target."""

    name = "dense-forever"


class Unseeded(RandomSwap):
    name = "unseeded"

    @hookimpl
    def init_mask(self, run, model):
        fresh = torch.Generator()
        fresh.seed()  # seeded from OS entropy: not reproducible from run.generator
        return random_masks(run.layers, uniform_densities(run.layers, run.sparsity), fresh)


class LossyState(RandomSwap):
    name = "lossy-state"

    def load_state_dict(self, state):
        pass


class UndocumentedConfig(BaseModel):
    every: int = 5


class Undocumented(RandomSwap):
    name = "undocumented"
    Config = UndocumentedConfig


def test_kit_reports_a_count_change_without_changes_density():
    record = run_kit(Miscounting, steps=4)
    with pytest.raises(AssertionError, match="changed the active count"):
        check_updates(record, Miscounting)


def test_kit_checks_counts_per_logical_layer_of_a_fused_weight():
    record = run_kit(QueryToValue, steps=4)
    assert record.error is None and record.changes
    with pytest.raises(AssertionError, match=r"c_attn.weight\[q\]: \d+ → \d+.*c_attn.weight\[v\]"):
        check_updates(record, QueryToValue)


def test_kit_reports_masks_modified_in_place():
    record = run_kit(InPlace, steps=4)
    with pytest.raises(AssertionError, match="in place"):
        check_updates(record, InPlace)


def test_kit_reports_a_wrong_initial_density_and_a_dense_start_that_cannot_prune():
    with pytest.raises(AssertionError, match="initial density 0.5"):
        check_initial_masks(run_kit(WrongDensity, steps=2), WrongDensity, 0.8, 0.01)
    record = run_kit(DenseForever, steps=2)
    with pytest.raises(AssertionError, match="changes_density"):
        check_initial_masks(record, DenseForever, 0.8, 0.01)
    with pytest.raises(AssertionError, match="final density 1.0000"):
        check_final_density(record, DenseForever, 0.8, 0.01)


def test_kit_reports_randomness_outside_run_generator():
    first = run_kit(Unseeded, steps=2)
    second = run_kit(Unseeded, steps=2)
    with pytest.raises(AssertionError, match="different initial masks"):
        check_determinism(first, second)


def test_kit_reports_a_state_dict_that_does_not_round_trip():
    record = run_kit(LossyState, {"every": 2}, steps=4)
    with pytest.raises(AssertionError, match=r"state\['swaps'\]"):
        check_state_dict(record, LossyState, {"every": 2})


def test_kit_reports_undocumented_options():
    with pytest.raises(AssertionError, match=r"without a description .*: every"):
        check_config(Undocumented)


def test_kit_registers_as_a_pytest11_plugin():
    assert "sparsebench.conformance.pytest_plugin" in {ep.value for ep in entry_points(group="pytest11")}


def test_a_third_party_test_file_runs_the_kit_through_the_installed_plugin(pytester):
    """What a plugin author writes: a Test… subclass; the fixture comes from the entry point."""
    pytester.makepyfile(test_author=textwrap.dedent("""
        from pydantic import BaseModel, ConfigDict
        from sparsebench import hookimpl
        from sparsebench.conformance import MethodConformance
        from sparsebench.masks import random_masks, uniform_densities
        from sparsebench.methods import Method

        class Opts(BaseModel):
            model_config = ConfigDict(extra="forbid")

        class Fixed(Method):
            name = "fixed"
            Config = Opts

            @hookimpl
            def init_mask(self, run, model):
                return random_masks(run.layers, uniform_densities(run.layers, run.sparsity), run.generator)

        class TestFixed(MethodConformance):
            method = Fixed
            steps = 3
    """))
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, skipped=1)


def test_the_kit_imports_without_pytest_and_names_the_extra_when_pytest_is_missing():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pytest'] = None\n"  # a plain install: no pytest
        "import sparsebench.conformance as kit\n"
        "assert callable(kit.check_config) and callable(kit.tiny_setup)\n"
        "try:\n    kit.MethodConformance\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sparsebench.conformance.MethodConformance needs pytest: pip install sparsebench[test]"
