"""SparsAE: a gradient-free (1+λ) evolution strategy over the binary mask, as composable plugins.

The ``sparsae`` method is one suite entry whose parts are separate plugins on the run's manager
(see ``sparsebench.run_setup.with_components``), each also a method of its own that any run can add
with the suite's ``with:`` key (e.g. ``- rigl: {with: [ema_distill, burn_in]}``):

==================  ===========================================================================
``sparsae_search``  the mask search: mutants as swap lists, composite proxy, resets, bounds
``kaiming_regrow``  truncated-normal Kaiming values for newly activated connections
``burn_in``         a rising learning-rate multiplier for new connections only
``ema_distill``     self-distillation from an EMA teacher (a dense copy of the model)
==================  ===========================================================================

``sparsae``'s options are the union of its components' options (flat, as the specification
names them) plus two switches: ``kaiming_init`` and ``distill``; ``burn_in_steps: 0`` drops the
burn-in and ``global_reset: false`` the reset mutations.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

from sparsebench import Method
from sparsebench_plugins.sparsae.burn_in import BurnIn, BurnInConfig
from sparsebench_plugins.sparsae.distill import DistillConfig, EmaDistill
from sparsebench_plugins.sparsae.regrow import KaimingRegrow, RegrowConfig
from sparsebench_plugins.sparsae.search import MaskSearch, SearchConfig


class SparsAEConfig(DistillConfig, BurnInConfig, RegrowConfig, SearchConfig):  # fields: search first
    kaiming_init: bool = Field(True, description="false: regrown connections start at zero (no kaiming_regrow)")
    distill: bool = Field(True, description="false: no EMA teacher (no ema_distill)")


def _pick(config_cls: type[BaseModel], config: BaseModel) -> Any:
    return config_cls(**{k: getattr(config, k) for k in config_cls.model_fields})


class SparsAE(Method):
    """The full method: mask search + Kaiming regrowth + mini burn-in + EMA-teacher distillation."""

    name = "sparsae"
    min_heldout_batches = 2  # the search scores candidates on one batch, the stagnation check uses another
    Config = SparsAEConfig
    #: its mask search moves connections between layers (the global count is exact)
    changes_density = True

    def __init__(self, config: Optional[SparsAEConfig] = None):
        super().__init__(config)

    def components(self) -> list[tuple[str, Any]]:
        c = self.config
        parts: list[tuple[str, Any]] = [(MaskSearch.name, MaskSearch(_pick(SearchConfig, c)))]
        if c.kaiming_init:
            parts.append((KaimingRegrow.name, KaimingRegrow(_pick(RegrowConfig, c))))
        if c.burn_in_steps > 0:
            parts.append((BurnIn.name, BurnIn(_pick(BurnInConfig, c))))
        if c.distill:
            parts.append((EmaDistill.name, EmaDistill(_pick(DistillConfig, c))))
        return parts


METHODS = [SparsAE, MaskSearch, KaimingRegrow, BurnIn, EmaDistill]

__all__ = ["SparsAE", "SparsAEConfig", "MaskSearch", "KaimingRegrow", "BurnIn", "EmaDistill", "METHODS"]
