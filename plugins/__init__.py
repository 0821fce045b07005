"""First-party sparsebench methods, registered through the ``sparsebench`` entry-point group.

Every method here is written exactly as a third-party plugin would be: a class with ``name``,
``Config`` and ``@hookimpl`` methods, registered by :func:`register_methods`.
"""

from sparsebench_plugins.dense import Dense
from sparsebench_plugins.static import Static

METHODS = [Dense, Static]


def register_methods(register):
    for cls in METHODS:
        register(cls)
