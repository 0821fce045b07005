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
* every mask change keeps names, shapes and bool dtype, keeps each layer's active count unless
  the class declares ``changes_density``, and leaves the ``masks`` argument unmodified;
* the final density equals the target (within tolerance);
* ``state_dict()`` survives ``torch.save``/``torch.load(weights_only=True)`` and
  ``load_state_dict`` into a fresh instance reproduces it;
* the same seed gives the same masks (all randomness comes from ``run.generator``).

The check functions (``check_*``) are plain functions raising ``AssertionError`` and can be
used outside pytest; :func:`tiny_setup` / :func:`start_run` build a tiny run for unit-testing
hooks directly.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from sparsebench import hookimpl

#: the kit's model: a 2-block GPT-2 with 24,576 sparsifiable weights
TINY_MODEL = {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32}
TINY_DATA = {"vocab_size": 32, "branching": 4, "train_tokens": 40_000, "valid_tokens": 4_096, "test_tokens": 4_096}


# --------------------------------------------------------------------------------------------
# building tiny runs
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block (restored after).

    The kit's model is tiny: on two busy cores a second intra-op thread made a 16-step run ~20×
    slower (8 s instead of 0.4 s wall) by contending for a core it cannot use.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_run_config(
    method_cls: type,
    overrides: Optional[dict] = None,
    *,
    sparsity: float = 0.8,
    steps: int = 16,
    seed: int = 0,
    grad_accum: int = 1,
    batch_size: int = 4,
    cache_dir: Optional[Path] = None,
    plugins: tuple[type, ...] = (),
    model: Optional[dict] = None,
):
    """A resolved :class:`~sparsebench.config.RunConfig` of a tiny CPU run of ``method_cls``.

    ``plugins``: extra method classes added to the run (observers, probes, components).
    """
    from sparsebench.config import DataConfig, MethodSpec, RunConfig, TrainingConfig

    config = method_cls.Config(**(overrides or {})).model_dump(mode="json")
    return RunConfig(
        suite="conformance",
        run_id=f"{method_cls.name}-conformance",
        method=MethodSpec(name=method_cls.name, config=config),
        plugins=[MethodSpec(name=p.name) for p in plugins],
        data=DataConfig(dataset="synthetic", seq_len=16, synthetic=TINY_DATA, cache_dir=cache_dir),
        model=model or TINY_MODEL,
        training=TrainingConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=3e-3,
                                warmup_steps=min(2, steps), eval_every=0, eval_batches=1, log_every=5, device="cpu"),
        sparsity=sparsity,
        seed=seed,
    )


def tiny_setup(method_cls: type, overrides: Optional[dict] = None, observers=(), **kwargs):
    """A :class:`~sparsebench.setup.Setup` of a tiny run (nothing called yet); ``kwargs`` go to
    :func:`tiny_run_config`. The method instance is ``setup.run.plugins[method_cls.name]``."""
    from sparsebench.registry import Registry
    from sparsebench.run_setup import setup_run

    registry = Registry()
    for cls in (method_cls, *kwargs.get("plugins", ())):
        registry.register(cls, "conformance kit")
    return setup_run(tiny_run_config(method_cls, overrides, **kwargs), registry, None, list(observers))


def start_run(setup) -> None:
    """Do what the loop does before step 1 (``configure``, ``init_mask``, apply the masks), so a
    test can call a method's hooks directly on ``setup.run``."""
    from sparsebench.loop import complete_masks
    from sparsebench.engines.mask_ops import MaskUpkeep, validate_masks

    run = setup.run
    setup.hooks.configure(run=run)
    masks = complete_masks(run, setup.hooks.init_mask(run=run, model=run.model))
    validate_masks(masks, run.sparsifiable, None, run.config.method.name, keep_counts=False)
    run.masks = masks
    upkeep = MaskUpkeep(run.sparsifiable, not setup.keeps_dense)
    upkeep.set_masks(masks)
    upkeep.mask_weights()


# --------------------------------------------------------------------------------------------
# recording a run
# --------------------------------------------------------------------------------------------


@dataclass
class Change:
    """One applied mask change, as the recorder saw it."""

    step: int
    old_counts: dict[str, int]
    new_counts: dict[str, int]
    problems: list[str]


@dataclass
class KitRecord:
    """What the kit saw during one tiny run."""

    method: Any = None
    sparsifiable: dict[str, tuple] = field(default_factory=dict)
    initial_masks: dict[str, Any] = field(default_factory=dict)
    final_masks: dict[str, Any] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    error: Optional[str] = None

    @staticmethod
    def density(masks: dict) -> float:
        total = sum(m.numel() for m in masks.values())
        return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0


class _Recorder:
    """An observer plugin: snapshots the masks before ``update_mask`` and inspects every change."""

    name = "conformance-recorder"
    observer = True

    def __init__(self, record: KitRecord):
        self.record = record
        self.before: dict = {}

    def _masks(self, run) -> dict:
        return {n: m.clone() for n, m in run.masks.items()}

    @hookimpl
    def on_train_start(self, run) -> None:
        self.record.initial_masks = self._masks(run)
        self.before = self.record.initial_masks

    @hookimpl
    def after_optimizer_step(self, run, step) -> None:
        # The next update_mask is called with these masks; a method must not edit them in place.
        self.before = self._masks(run)

    @hookimpl
    def on_mask_change(self, run, step, old, new) -> None:
        import torch

        problems = []
        params = run.sparsifiable
        for name, mask in new.items():
            if name not in params:
                problems.append(f"mask for unknown weight '{name}'")
                continue
            if mask.dtype != torch.bool:
                problems.append(f"'{name}': dtype {mask.dtype}, expected torch.bool")
            if tuple(mask.shape) != tuple(params[name].shape):
                problems.append(f"'{name}': shape {tuple(mask.shape)}, weight {tuple(params[name].shape)}")
            if name in self.before and not _tensor_equal(old[name], self.before[name]):
                problems.append(f"'{name}': update_mask modified the current mask in place")
        self.record.changes.append(Change(
            step=step,
            old_counts={n: int(self.before[n].sum()) for n in new if n in self.before},
            new_counts={n: int(m.sum()) for n, m in new.items()},
            problems=problems,
        ))


def run_kit(method_cls: type, overrides: Optional[dict] = None, **kwargs) -> KitRecord:
    """Train a tiny run of ``method_cls`` and record what happened (errors are recorded, not raised)."""
    from sparsebench.loop import train

    record = KitRecord()
    setup = None
    try:
        with single_thread():
            setup = tiny_setup(method_cls, overrides, observers=[("conformance-recorder", _Recorder(record))],
                               **kwargs)
            record.method = setup.run.plugins[method_cls.name]
            record.sparsifiable = {n: tuple(p.shape) for n, p in setup.run.sparsifiable.items()}
            train(setup)
            record.final_masks = {n: m.clone() for n, m in setup.run.masks.items()}
    except Exception as exc:  # reported by every check, with the reason
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        if setup is not None:
            setup.run.metrics.close()
    return record


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def check_config(method_cls: type, overrides: Optional[dict] = None) -> None:
    """``Config()`` works with defaults only, round-trips through JSON, documents every option,
    and accepts ``overrides``."""
    from pydantic import ValidationError

    from sparsebench.errors import PluginError
    from sparsebench.methods import check_method_class

    try:
        check_method_class(method_cls, "conformance kit")
    except PluginError as exc:
        raise AssertionError(str(exc)) from None
    config_cls = method_cls.Config
    defaults = config_cls()
    dumped = defaults.model_dump(mode="json")
    assert config_cls(**dumped) == defaults, (
        f"method '{method_cls.name}': Config defaults do not survive a JSON round trip ({dumped})"
    )
    undocumented = [n for n, f in config_cls.model_fields.items() if not f.description]
    assert not undocumented, (
        f"method '{method_cls.name}': options without a description (Field(..., description=...)): "
        + ", ".join(undocumented)
    )
    try:
        config_cls(**(overrides or {}))
    except ValidationError as exc:
        raise AssertionError(f"method '{method_cls.name}': the kit's overrides are invalid: {exc}") from None


def _require_run(record: KitRecord) -> None:
    assert record.error is None, f"the kit's tiny run failed: {record.error}"


def check_initial_masks(record: KitRecord, method_cls: type, sparsity: float, tolerance: float) -> None:
    """Initial masks cover every sparsifiable weight with its shape and are at the target
    density, or the model starts dense and the class declares ``changes_density = True``."""
    _require_run(record)
    assert set(record.initial_masks) == set(record.sparsifiable), "initial masks do not cover the sparsifiable weights"
    for name, mask in record.initial_masks.items():
        assert tuple(mask.shape) == record.sparsifiable[name], f"initial mask of '{name}' has the wrong shape"
    if getattr(method_cls, "ignores_sparsity", False):
        return
    density = KitRecord.density(record.initial_masks)
    if density == 1.0:
        assert getattr(method_cls, "changes_density", False), (
            f"method '{method_cls.name}' starts dense but does not declare changes_density = True, "
            f"so it can never reach the target sparsity {sparsity}"
        )
        return
    assert abs(density - (1.0 - sparsity)) <= tolerance, (
        f"method '{method_cls.name}': initial density {density:.4f}, target {1.0 - sparsity:.4f} "
        f"(tolerance {tolerance})"
    )


def check_updates(record: KitRecord, method_cls: type) -> int:
    """Every mask change kept shapes and dtype, did not edit the current masks in place and
    (unless ``changes_density``) kept each layer's active count. Returns the number of changes."""
    _require_run(record)
    keeps_counts = not getattr(method_cls, "changes_density", False)
    for change in record.changes:
        assert not change.problems, f"step {change.step}: " + "; ".join(change.problems)
        if keeps_counts:
            moved = {n: (change.old_counts[n], c) for n, c in change.new_counts.items()
                     if n in change.old_counts and change.old_counts[n] != c}
            assert not moved, (
                f"step {change.step}: active counts changed (layer: before → after) "
                + ", ".join(f"{n}: {a} → {b}" for n, (a, b) in moved.items())
            )
    return len(record.changes)


def check_final_density(record: KitRecord, method_cls: type, sparsity: float, tolerance: float) -> None:
    """At the end of training the masks are at the target density."""
    _require_run(record)
    if getattr(method_cls, "ignores_sparsity", False):
        return
    density = KitRecord.density(record.final_masks)
    assert abs(density - (1.0 - sparsity)) <= tolerance, (
        f"method '{method_cls.name}': final density {density:.4f}, target {1.0 - sparsity:.4f} (tolerance {tolerance})"
    )


def check_state_dict(record: KitRecord, method_cls: type, overrides: Optional[dict] = None) -> None:
    """``state_dict()`` of the trained instance survives ``torch.save`` / ``torch.load(weights_only=True)``
    and a fresh instance's ``load_state_dict`` → ``state_dict()`` reproduces it."""
    import torch

    _require_run(record)
    state = record.method.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        loaded = torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise AssertionError(
            f"method '{method_cls.name}': state_dict() holds something torch.load(weights_only=True) refuses "
            f"(use tensors, numbers, strings, lists and dicts): {exc}"
        ) from None
    fresh = method_cls(method_cls.Config(**(overrides or {})))
    fresh.load_state_dict(loaded)
    difference = _first_difference(fresh.state_dict(), state)
    assert difference is None, f"method '{method_cls.name}': state_dict round trip differs at {difference}"


def check_determinism(first: KitRecord, second: KitRecord) -> None:
    """Two runs with the same seed end with the same masks and made the same changes."""
    _require_run(first)
    _require_run(second)
    for label, a, b in (("initial", first.initial_masks, second.initial_masks),
                        ("final", first.final_masks, second.final_masks)):
        differ = [n for n in a if not _tensor_equal(a[n], b[n])]
        assert not differ, f"the same seed gave different {label} masks for {', '.join(differ)} (use run.generator)"
    assert [c.step for c in first.changes] == [c.step for c in second.changes], "the same seed changed masks at different steps"


def _tensor_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))


def _first_difference(a: Any, b: Any, path: str = "state") -> Optional[str]:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _tensor_equal(a, b)
        return None if ok else path
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path} (keys {sorted(map(str, set(a) ^ set(b)))})"
        for key in a:
            found = _first_difference(a[key], b[key], f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{path} ({a!r} vs {b!r})"


# --------------------------------------------------------------------------------------------
# the pytest side
# --------------------------------------------------------------------------------------------


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
