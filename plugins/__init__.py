"""First-party sparsebench methods, registered through the ``sparsebench`` entry-point group.

Every method here is written exactly as a third-party plugin would be: a class with ``name``,
``Config`` and ``@hookimpl`` methods, registered by :func:`register_methods`.
"""

from sparsebench_plugins.dense import Dense
from sparsebench_plugins.gmp import GMP
from sparsebench_plugins.gumbel import Gumbel
from sparsebench_plugins.magnitude import Magnitude
from sparsebench_plugins.nm import NM
from sparsebench_plugins.rigl import RigL
from sparsebench_plugins.set_method import SET
from sparsebench_plugins.sparsae import METHODS as SPARSAE_METHODS
from sparsebench_plugins.static import Static

METHODS = [Dense, Static, Magnitude, GMP, SET, RigL, Gumbel]
METHODS += SPARSAE_METHODS  # sparsae and its components (sparsae_search, kaiming_regrow, burn_in, ema_distill)
METHODS += [NM]


def register_methods(register):
    for cls in METHODS:
        register(cls)
