"""The conformance kit's tiny runs: a 2-block GPT-2 on tiny synthetic data, on one CPU thread.

:func:`tiny_setup` / :func:`start_run` build a tiny run for unit-testing a method's hooks
directly; :func:`run_kit` trains one and records what happened (:class:`KitRecord`) for the
checks in :mod:`sparsebench.conformance.checks`. Harness modules are imported inside the
functions so that loading the pytest plugin costs nothing in a test session that never uses it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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
    """A :class:`~sparsebench.run_setup.Setup` of a tiny run (nothing called yet); ``kwargs`` go to
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
    upkeep = MaskUpkeep(run.sparsifiable, enabled=not setup.keeps_dense)
    upkeep.set_masks(masks)
    upkeep.mask_weights()


# --------------------------------------------------------------------------------------------
# recording a run
# --------------------------------------------------------------------------------------------


@dataclass
class Change:
    """One applied mask change, as the recorder saw it."""

    step: int
    old_counts: dict[str, int]  # per logical layer, of the parameters the change touched
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
            old_counts=_logical_counts(run, {n: self.before[n] for n in new if n in self.before}),
            new_counts=_logical_counts(run, {n: m for n, m in new.items() if n in params}),
            problems=problems,
        ))


def _logical_counts(run, masks: dict) -> dict[str, int]:
    """Active count per logical layer (GPT-2's ``c_attn`` counts as its [q], [k] and [v])."""
    from sparsebench.logical_layers import parts_of

    return {part.name: int(part.view(mask).sum()) for name, mask in masks.items()
            if tuple(mask.shape) == tuple(run.sparsifiable[name].shape)
            for part in parts_of(run.layers[name])}


def _tensor_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))


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
