"""Conformance kit for method plugins: a pytest plugin (entry point ``pytest11``) and its checks.

A plugin author points the kit at a method class by subclassing :class:`MethodConformance` in a
test module (the pytest side lives in :mod:`sparsebench.conformance.pytest_plugin`)::

    # tests/test_my_method.py
    from sparsebench.conformance import MethodConformance
    from my_package import MyMethod

    class TestMyMethodConformance(MethodConformance):
        method = MyMethod
        overrides = {"delta_t": 4}   # so that updates happen within the kit's short run

Installing sparsebench registers :mod:`~sparsebench.conformance.pytest_plugin` with pytest
(entry point ``pytest11``), which supplies the
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
unit-testing hooks directly. Every name is importable from ``sparsebench.conformance``; this
package imports without pytest (a plain install): only :class:`MethodConformance` and the
fixture need it (``pip install sparsebench[test]``).
"""

from __future__ import annotations

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


_PYTEST_NAMES = ("MethodConformance", "ConformanceRecords", "conformance_records")


def __getattr__(name: str):
    """The pytest side on first use, so that ``import sparsebench.conformance`` needs no pytest."""
    if name in _PYTEST_NAMES:
        try:
            from sparsebench.conformance import pytest_plugin
        except ModuleNotFoundError as exc:
            if exc.name != "pytest":
                raise
            raise ImportError(f"sparsebench.conformance.{name} needs pytest: pip install sparsebench[test]") from None
        return getattr(pytest_plugin, name)
    raise AttributeError(f"module 'sparsebench.conformance' has no attribute '{name}'")
