"""sparsebench: a benchmark harness for sparse training of transformer language models.

Plugin authors import :data:`hookimpl` and :class:`~sparsebench.methods.Method` from here and
everything else they need from :mod:`sparsebench.api`; see ``sparsebench/hookspecs.py`` for the
hooks.
"""

from typing import Any

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "sparsebench"
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

__all__ = ["hookimpl", "hookspec", "Method", "__version__", "PROJECT_NAME"]


def __getattr__(name: str) -> Any:
    # Method pulls in pydantic; loading it on first use keeps `import sparsebench` (and so
    # `sparsebench --help`) from paying for it.
    if name == "Method":
        from sparsebench.methods import Method

        return Method
    raise AttributeError(f"module 'sparsebench' has no attribute '{name}'")
