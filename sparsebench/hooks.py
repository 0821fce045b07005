"""A run's plugin manager: registering plugins, timing and guarding their hooks, tracing, and
:class:`Hooks`, the typed front the loop calls.

Every run gets a fresh :class:`pluggy.PluginManager` (:func:`make_plugin_manager`); there is no
global one. ``SPARSEBENCH_TRACE_HOOKS=1`` prints every hook call and its result to stderr.
"""

from __future__ import annotations

import difflib
import inspect
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
_IMPL_ATTR = f"{PROJECT_NAME}_impl"
_SPEC_ATTR = f"{PROJECT_NAME}_spec"


# --------------------------------------------------------------------------- unknown hooks


def spec_names(source: Any) -> set[str]:
    """Names of the hook specifications in a module or class (``@hookspec`` functions)."""
    if source is None:
        return set()
    return {name for name, value in inspect.getmembers(source) if hasattr(value, _SPEC_ATTR)}


#: the core hook specifications (sparsebench/hookspecs.py)
CORE_HOOKS = frozenset(spec_names(hookspecs))


def implemented_hooks(plugin: Any) -> dict[str, str]:
    """Attribute name → hook name of every ``@hookimpl`` on a class or instance (``specname``
    honoured; ``optionalhook=True`` implementations are left out, as pluggy does)."""
    out = {}
    for name, value in inspect.getmembers(plugin):
        opts = getattr(value, _IMPL_ATTR, None)
        if isinstance(opts, dict) and not opts.get("optionalhook"):
            out[name] = opts.get("specname") or name
    return out


def unknown_hooks(plugin: Any, known: Iterable[str]) -> list[tuple[str, Optional[str]]]:
    """``(hook name, closest known name or None)`` for every ``@hookimpl`` of ``plugin`` that no
    specification in ``known`` (plus the plugin's own ``hookspecs``) declares."""
    names = set(known) | spec_names(getattr(plugin, "hookspecs", None))
    out = []
    for hook in sorted(set(implemented_hooks(plugin).values())):
        if hook not in names:
            close = difflib.get_close_matches(hook, sorted(names), n=1, cutoff=0.6)
            out.append((hook, close[0] if close else None))
    return out


def describe_unknown(unknown: list[tuple[str, Optional[str]]]) -> str:
    """``unknown hook 'init_masks' (did you mean 'init_mask'?)`` for each unknown hook."""
    return ", ".join(f"unknown hook '{hook}'" + (f" (did you mean '{close}'?)" if close else "")
                     for hook, close in unknown)


def unknown_hook_message(label: str, unknown: list[tuple[str, Optional[str]]]) -> str:
    """One line: the unknown hook(s), the closest known ones and what to do."""
    return (f"{label}: {describe_unknown(unknown)}: no hook specification has this name, so it would never "
            "be called; rename it or declare it in the method's `hookspecs`")


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
    _refuse_unknown_hooks(pm)
    if os.environ.get(TRACE_ENV):
        _enable_tracing(pm)
    return pm


def _refuse_unknown_hooks(pm: pluggy.PluginManager) -> None:
    """Before anything runs: every hook implementation of every plugin of the run must have a
    specification (the core ones or any plugin's ``hookspecs``), as ``pm.check_pending()`` asks."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        known = set(CORE_HOOKS)
        for _, plugin in pm.list_name_plugin():
            known |= spec_names(getattr(plugin, "hookspecs", None))
        for name, plugin in pm.list_name_plugin():
            unknown = unknown_hooks(plugin, known)
            if unknown:
                raise PluginError(unknown_hook_message(f"plugin '{name}'", unknown)) from None
        raise


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
