"""Finding method classes: the ``sparsebench`` entry points, the registry, "did you mean" errors.

First-party methods live in ``plugins/`` (importable as ``sparsebench_plugins``) and are found
through the same ``sparsebench`` entry-point group as a third-party package's. Wiring instances
into a run's plugin manager is :mod:`sparsebench.hooks`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Optional

from sparsebench.errors import PluginError
# The per-run manager moved to sparsebench.hooks; these names stay importable from here.
from sparsebench.hooks import TRACE_ENV, Hooks, HookTimer, make_plugin_manager  # noqa: F401
from sparsebench.hooks import CORE_HOOKS, spec_names, unknown_hook_message, unknown_hooks
from sparsebench.methods import check_method_class

ENTRY_POINT_GROUP = "sparsebench"


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
        """The class of method ``name``.

        Raises:
            PluginError: no such method (with a did-you-mean), or the method is broken (a hook
                implementation no specification declares: see :meth:`problem`), so that no
                suite that uses it validates or trains.
        """
        try:
            entry = self.entries[name]
        except KeyError:
            raise PluginError(unknown_name_message("method", name, self.names())) from None
        problem = self.problem(name)
        if problem:
            raise PluginError(problem)
        return entry.cls

    def unknown_hooks(self, name: str) -> list[tuple[str, Optional[str]]]:
        """``(hook, closest known hook)`` for every ``@hookimpl`` of method ``name`` whose name is no
        hook specification — the core ones, or a ``hookspecs`` of any registered method (a
        method may implement a hook that a plugin it runs with declares)."""
        known = set(CORE_HOOKS)
        for entry in self.entries.values():
            known |= spec_names(getattr(entry.cls, "hookspecs", None))
        return unknown_hooks(self.entries[name].cls, known)

    def problem(self, name: str) -> Optional[str]:
        """Why method ``name`` cannot run, in one line, or ``None`` if it can."""
        unknown = self.unknown_hooks(name)
        if not unknown:
            return None
        return unknown_hook_message(f"method '{name}' ({self.entries[name].package})", unknown)

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
