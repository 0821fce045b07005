"""Conformance kit for method plugins: a pytest plugin (entry point ``pytest11``) and its checks.

A plugin author points the kit at a method class by subclassing :class:`MethodConformance` in a
test module::

    # tests/test_my_method.py
    from sparsebench.conformance import MethodConformance
    from my_package import MyMethod

    class TestMyMethodConformance(MethodConformance):
        method = MyMethod
        overrides = {"delta_t": 4}   # so that updates happen within the kit's short run

Installing sparsebench registers this module with pytest, which supplies the
``conformance_records`` fixture the inherited tests use. The kit trains the method once (and a
second time for the determinism check) on a tiny GPT-2 with tiny synthetic data — a few seconds
on a CPU — and checks:

* the ``Config`` defaults are valid, survive a JSON round trip and every option is documented;
* the initial masks are at the target density (within ``density_tolerance``), or the method
  starts dense and declares ``changes_density = True``;
* every mask change keeps names, shapes and bool dtype, keeps each logical layer's active count
  (the kit's GPT-2 has fused ``c_attn`` weights: q, k and v are counted apart) unless the class
  declares ``changes_density``, and leaves the ``masks`` argument unmodified;
* the final density equals the target (within tolerance);
* ``state_dict()`` survives ``torch.save``/``torch.load(weights_only=True)`` and
  ``load_state_dict`` into a fresh instance reproduces it;
* the same seed gives the same masks (all randomness comes from ``run.generator``).

The check functions (``check_*``, in :mod:`sparsebench.conformance.checks`) are plain functions
raising ``AssertionError`` and can be used outside pytest; :func:`tiny_setup` /
:func:`start_run` (in :mod:`sparsebench.conformance.tiny_runs`) build a tiny run for
unit-testing hooks directly. Every name is importable from ``sparsebench.conformance``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from sparsebench.conformance.checks import (
    _first_difference,  # noqa: F401  (tests import it from here)
    check_config,
    check_determinism,
    check_final_density,
    check_initial_masks,
    check_state_dict,
    check_updates,
)
from sparsebench.conformance.tiny_runs import (
    TINY_DATA,
    TINY_MODEL,
    Change,
    KitRecord,
    _tensor_equal,  # noqa: F401
    run_kit,
    single_thread,
    start_run,
    tiny_run_config,
    tiny_setup,
)

__all__ = [
    "MethodConformance",
    "ConformanceRecords",
    "conformance_records",
    "TINY_MODEL",
    "TINY_DATA",
    "Change",
    "KitRecord",
    "run_kit",
    "single_thread",
    "start_run",
    "tiny_run_config",
    "tiny_setup",
    "check_config",
    "check_determinism",
    "check_final_density",
    "check_initial_masks",
    "check_state_dict",
    "check_updates",
]


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
