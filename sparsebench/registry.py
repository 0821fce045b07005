"""Finding method classes (entry points) and wiring them into a per-run plugin manager.

First-party methods live in ``plugins/`` (importable as ``sparsebench_plugins``) and are found
through the same ``sparsebench`` entry-point group as a third-party package's.
"""

from __future__ import annotations

import difflib
import os
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Optional

import pluggy

from sparsebench import PROJECT_NAME, hookspecs
from sparsebench.errors import HookError, PluginError
from sparsebench.methods import check_method_class

ENTRY_POINT_GROUP = "sparsebench"
TRACE_ENV = "SPARSEBENCH_TRACE_HOOKS"


@dataclass
class MethodEntry:
    cls: type
    package: str  # "dist-name version" of the package that registered it


@dataclass
class Registry:
    """Method name → class, with the package each came from."""

    entries: dict[str, MethodEntry] = field(default_factory=dict)

    def register(self, cls: type, package: str) -> None:
        check_method_class(cls, package)
        if cls.name in self.entries:
            other = self.entries[cls.name].package
            raise PluginError(
                f"method name '{cls.name}' is registered twice: by {other} and by {package}; "
                "rename one of them"
            )
        self.entries[cls.name] = MethodEntry(cls, package)

    def get(self, name: str) -> type:
        try:
            return self.entries[name].cls
        except KeyError:
            raise PluginError(unknown_name_message("method", name, self.names())) from None

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries


def unknown_name_message(kind: str, name: str, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'.{hint} Allowed: {', '.join(allowed)}"


def _package_label(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return f"entry point '{ep.name}' ({ep.value})"
    return f"{dist.metadata['Name']} {dist.version}"


def load_registry(extra_modules: Iterable[tuple[Any, str]] = ()) -> Registry:
    """Collect method classes from every ``sparsebench`` entry point.

    Each entry point names a module (or object) with ``register_methods(register)``.
    ``extra_modules`` — (module, package label) pairs — are registered the same way (tests).
    """
    registry = Registry()
    sources: list[tuple[Callable[[], Any], str]] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        sources.append((ep.load, _package_label(ep)))
    for module, label in extra_modules:
        sources.append((lambda m=module: m, label))
    for load, label in sources:
        try:
            target = load()
        except Exception as exc:
            raise PluginError(f"could not load plugin package {label}: {exc}") from exc
        register_methods = getattr(target, "register_methods", None)
        if register_methods is None:
            raise PluginError(f"plugin package {label} has no register_methods(register) function")
        register_methods(lambda cls, _label=label: registry.register(cls, _label))
    return registry


# --------------------------------------------------------------------------------------------
# per-run plugin manager
# --------------------------------------------------------------------------------------------


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

    Keyword-only arguments make a wrong or missing argument a ``TypeError`` at the call site,
    not a silently empty hook call.
    """

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._h = pm.hook

    def configure(self, *, run: Any) -> None:
        self._h.configure(run=run)

    def init_mask(self, *, run: Any, model: Any) -> Optional[dict]:
        return self._h.init_mask(run=run, model=model)

    def on_train_start(self, *, run: Any) -> None:
        self._h.on_train_start(run=run)

    def loss_terms(self, *, run: Any, step: int, batch: Any, outputs: Any) -> dict:
        merged: dict = {}
        for terms in self._h.loss_terms(run=run, step=step, batch=batch, outputs=outputs):
            for name, value in (terms or {}).items():
                if name in merged:
                    raise PluginError(f"loss term '{name}' is returned by two plugins")
                merged[name] = value
        return merged

    def update_mask(self, *, run: Any, step: int, masks: Any) -> Optional[dict]:
        return self._h.update_mask(run=run, step=step, masks=masks)

    def on_mask_change(self, *, run: Any, step: int, old: Any, new: Any) -> None:
        self._h.on_mask_change(run=run, step=step, old=old, new=new)

    def before_optimizer_step(self, *, run: Any, step: int) -> None:
        self._h.before_optimizer_step(run=run, step=step)

    def after_optimizer_step(self, *, run: Any, step: int) -> None:
        self._h.after_optimizer_step(run=run, step=step)

    def on_evaluate(self, *, run: Any, step: int, metrics: Any) -> None:
        self._h.on_evaluate(run=run, step=step, metrics=metrics)

    def on_log(self, *, run: Any, step: int, record: Any) -> None:
        self._h.on_log(run=run, step=step, record=record)

    def on_run_end(self, *, run: Any, summary: Any) -> dict:
        extra: dict = {}
        for result in self._h.on_run_end(run=run, summary=summary):
            extra.update(result or {})
        return extra
