"""A run's plugin manager: registering plugins, timing and guarding their hooks, tracing, and
:class:`Hooks`, the typed front the loop calls.

Every run gets a fresh :class:`pluggy.PluginManager` (:func:`make_plugin_manager`); there is no
global one. ``SPARSEBENCH_TRACE_HOOKS=1`` prints every hook call and its result to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

import pluggy

from sparsebench import PROJECT_NAME, hookspecs
from sparsebench.errors import HookError, PluginError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sparsebench.context import Run

TRACE_ENV = "SPARSEBENCH_TRACE_HOOKS"


class HookTimer:
    """Wall time spent inside the hooks of each (non-observer) plugin."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _guard(function: Callable, plugin_name: str, hook_name: str, timer: Optional[HookTimer]) -> Callable:
    """Wrap a hook implementation: name the plugin and hook on error, time it."""

    def guarded(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args)
        except HookError:
            raise
        except Exception as exc:
            raise HookError(
                f"plugin '{plugin_name}' raised in hook '{hook_name}': {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if timer is not None:
                timer.seconds[plugin_name] = timer.seconds.get(plugin_name, 0.0) + time.perf_counter() - start

    guarded.__wrapped__ = function  # type: ignore[attr-defined]
    return guarded


def make_plugin_manager(plugins: Iterable[tuple[str, Any]], timer: Optional[HookTimer] = None) -> pluggy.PluginManager:
    """A fresh manager for one run with ``plugins`` — (name, instance) pairs — registered."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name, plugin in plugins:
        extra = getattr(plugin, "hookspecs", None)
        if extra is not None:
            pm.add_hookspecs(extra)
        if pm.has_plugin(name):
            raise PluginError(f"plugin '{name}' is added twice to the same run")
        pm.register(plugin, name=name)
        counted = timer if not getattr(plugin, "observer", False) else None
        for caller in pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function = _guard(impl.function, name, caller.name, counted)
    if os.environ.get(TRACE_ENV):
        _enable_tracing(pm)
    return pm


def _enable_tracing(pm: pluggy.PluginManager) -> None:
    """Print every hook call and its result to stderr (``SPARSEBENCH_TRACE_HOOKS=1``)."""

    def before(hook_name: str, impls: list, kwargs: dict) -> None:
        names = ", ".join(i.plugin_name for i in impls)
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items() if k != "run")
        print(f"[hook] {hook_name}({args}) -> [{names}]", file=sys.stderr)

    def after(outcome: Any, hook_name: str, impls: list, kwargs: dict) -> None:
        exc = outcome.exception
        result = f"raised {exc!r}" if exc else _short(outcome.get_result())
        print(f"[hook] {hook_name} returned {result}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(map(str, list(value)[:4])) + ("…}" if len(value) > 4 else "}")
    if isinstance(value, list):
        return f"[{len(value)} items]"
    if hasattr(value, "shape"):
        return f"tensor{tuple(value.shape)}"
    return repr(value)[:60]


class Hooks:
    """Typed front of a run's plugin manager: the loop calls ``hooks.update_mask(run=..., ...)``.

    One method per hook specification in :mod:`sparsebench.hookspecs`, with the specification's
    parameters (names, order and annotations) as keyword-only arguments, so a wrong or missing
    argument is a ``TypeError`` at the call site rather than a silently empty hook call. A test
    (``test_hooks_wrapper_matches_every_hookspec``) fails when a hookspec is added or changed
    without its method here. Hooks that call every plugin and return values merge the results.
    """

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._h = pm.hook

    def configure(self, *, run: "Run") -> None:
        self._h.configure(run=run)

    def init_mask(self, *, run: "Run", model: "torch.nn.Module") -> Optional[Mapping[str, "torch.Tensor"]]:
        return self._h.init_mask(run=run, model=model)

    def on_train_start(self, *, run: "Run") -> None:
        self._h.on_train_start(run=run)

    def loss_terms(
        self, *, run: "Run", step: int, batch: Mapping[str, "torch.Tensor"], outputs: Any
    ) -> dict[str, "torch.Tensor"]:
        """Every plugin's terms in one dict; a name returned by two plugins is an error."""
        merged: dict = {}
        for terms in self._h.loss_terms(run=run, step=step, batch=batch, outputs=outputs):
            for name, value in (terms or {}).items():
                if name in merged:
                    raise PluginError(f"loss term '{name}' is returned by two plugins")
                merged[name] = value
        return merged

    def update_mask(
        self, *, run: "Run", step: int, masks: Mapping[str, "torch.Tensor"]
    ) -> Optional[Mapping[str, "torch.Tensor"]]:
        return self._h.update_mask(run=run, step=step, masks=masks)

    def on_mask_change(
        self, *, run: "Run", step: int, old: Mapping[str, "torch.Tensor"], new: Mapping[str, "torch.Tensor"]
    ) -> None:
        self._h.on_mask_change(run=run, step=step, old=old, new=new)

    def before_optimizer_step(self, *, run: "Run", step: int) -> None:
        self._h.before_optimizer_step(run=run, step=step)

    def after_optimizer_step(self, *, run: "Run", step: int) -> None:
        self._h.after_optimizer_step(run=run, step=step)

    def on_evaluate(self, *, run: "Run", step: int, metrics: Mapping[str, float]) -> None:
        self._h.on_evaluate(run=run, step=step, metrics=metrics)

    def on_log(self, *, run: "Run", step: int, record: Mapping[str, Any]) -> None:
        self._h.on_log(run=run, step=step, record=record)

    def on_run_end(self, *, run: "Run", summary: Mapping[str, Any]) -> dict[str, Any]:
        """Every plugin's extra summary keys, merged into one dict."""
        extra: dict = {}
        for result in self._h.on_run_end(run=run, summary=summary):
            extra.update(result or {})
        return extra
