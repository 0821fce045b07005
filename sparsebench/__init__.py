"""sparsebench: a benchmark harness for sparse training of transformer language models.

Plugin authors need only :data:`hookimpl` (and, optionally, :class:`sparsebench.methods.Method`
as a base class); see ``sparsebench/hookspecs.py`` for the hooks.
"""

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "sparsebench"
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

__all__ = ["hookimpl", "hookspec", "__version__", "PROJECT_NAME"]
