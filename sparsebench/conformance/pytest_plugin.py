"""The conformance kit's pytest side: the ``conformance_records`` fixture and :class:`MethodConformance`.

Registered with pytest by the ``pytest11`` entry point; the checks it runs are plain functions in
:mod:`sparsebench.conformance.checks` (see the package docstring for what they check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from sparsebench.conformance.checks import (
    check_config,
    check_determinism,
    check_final_density,
    check_initial_masks,
    check_state_dict,
    check_updates,
)
from sparsebench.conformance.tiny_runs import KitRecord, run_kit


class ConformanceRecords:
    """The kit's runs for one test class: the first eagerly, the determinism rerun on demand."""

    def __init__(self, spec: type, cache_dir: Path):
        self.spec, self.cache_dir = spec, cache_dir
        self.first = self._run()
        self._second: Optional[KitRecord] = None

    def _run(self) -> KitRecord:
        s = self.spec
        return run_kit(s.method, s.overrides, sparsity=s.sparsity, steps=s.steps, seed=0, cache_dir=self.cache_dir)

    @property
    def second(self) -> KitRecord:
        if self._second is None:
            self._second = self._run()
        return self._second


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "conformance: sparsebench method conformance checks (sparsebench.conformance)")


@pytest.fixture(scope="class")
def conformance_records(request, tmp_path_factory) -> ConformanceRecords:
    """The recorded tiny runs of the test class's ``method`` (see :class:`MethodConformance`)."""
    spec = request.cls
    if spec is None or getattr(spec, "method", None) is None:
        raise pytest.UsageError("conformance_records is for subclasses of MethodConformance that set `method`")
    return ConformanceRecords(spec, tmp_path_factory.getbasetemp() / "sparsebench-conformance-cache")


@pytest.mark.conformance
class MethodConformance:
    """Subclass as ``Test…`` and set ``method`` (the class under test); optional knobs below."""

    #: the method class under test
    method: Optional[type] = None
    #: Config overrides for the kit's run (e.g. a short ``delta_t`` so updates happen)
    overrides: dict = {}
    #: target sparsity and length of the kit's run
    sparsity: float = 0.8
    steps: int = 16
    #: allowed |density − (1 − sparsity)| of initial and final masks
    density_tolerance: float = 0.01
    #: fail (rather than skip) when the method made no mask change in the run
    expect_updates: bool = False

    def test_config_defaults_are_valid_and_documented(self):
        check_config(self.method, self.overrides)

    def test_initial_masks_are_at_the_target_density(self, conformance_records):
        check_initial_masks(conformance_records.first, self.method, self.sparsity, self.density_tolerance)

    def test_updates_preserve_shapes_and_counts(self, conformance_records):
        n = check_updates(conformance_records.first, self.method)
        if n == 0:
            message = f"method '{self.method.name}' changed no mask in {self.steps} steps"
            if self.expect_updates:
                raise AssertionError(message)
            pytest.skip(message + " (set `overrides` so that it does)")

    def test_final_density_is_the_target(self, conformance_records):
        check_final_density(conformance_records.first, self.method, self.sparsity, self.density_tolerance)

    def test_state_dict_round_trips(self, conformance_records):
        check_state_dict(conformance_records.first, self.method, self.overrides)

    def test_same_seed_gives_same_masks(self, conformance_records):
        check_determinism(conformance_records.first, conformance_records.second)
