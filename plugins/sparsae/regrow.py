"""``kaiming_regrow``: newly activated connections start from a truncated-normal Kaiming draw.

The harness sets regrown weights to zero (and pruned ones stay zero); this component then gives
every position in ``new & ~old`` a value from a normal distribution truncated at ±``truncation``
standard deviations and rescaled so that the *truncated* distribution has standard deviation
``sqrt(gain / fan_in)`` (He et al. 2015; ``gain = 2``). Usable with any mask-changing method.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsebench import Method, hookimpl


class RegrowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init_gain: float = Field(2.0, gt=0, description="std of new weights = sqrt(init_gain / fan_in) (2: Kaiming/He)")
    init_truncation: float = Field(2.0, gt=0, description="draws are truncated at ± this many standard deviations")


def truncated_std_factor(truncation: float) -> float:
    """Standard deviation of a standard normal truncated to [−t, t] (0.8796 for t = 2)."""
    pdf = math.exp(-truncation**2 / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(truncation / math.sqrt(2))
    return math.sqrt(1.0 - 2.0 * truncation * pdf / mass)


def truncated_normal(n: int, std: float, truncation: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws (CPU, float32) from N(0, σ²) truncated to ±truncation·σ, with overall std ``std``."""
    sigma = std / truncated_std_factor(truncation)
    out = torch.randn(n, generator=generator)
    bad = out.abs() > truncation
    while bool(bad.any()):  # rejection: ~5% redrawn per round at t = 2
        out[bad] = torch.randn(int(bad.sum()), generator=generator)
        bad = out.abs() > truncation
    return out * sigma


class KaimingRegrow(Method):
    """Kaiming (He) initialisation of regrown connections, drawn from ``run.generator``.

    A mask search that already drew the values it evaluated a candidate with hands them over
    through :meth:`offer` so that training continues from exactly the evaluated weights.
    """

    name = "kaiming_regrow"
    Config = RegrowConfig

    def __init__(self, config: Optional[RegrowConfig] = None):
        super().__init__(config)
        self._offered: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.initialised = 0

    def std(self, run, name: str) -> float:
        return math.sqrt(self.config.init_gain / run.layers[name].fan_in)

    def draw(self, run, name: str, n: int) -> torch.Tensor:
        """Values for ``n`` new connections of layer ``name``."""
        return truncated_normal(n, self.std(run, name), self.config.init_truncation, run.generator)

    def offer(self, name: str, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Use ``values`` for the sorted flat ``positions`` of the next change of layer ``name``."""
        self._offered[name] = (positions, values)

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        offered, self._offered = self._offered, {}
        with torch.no_grad():
            self._initialise(run, old, new, offered)

    def _initialise(self, run, old, new, offered) -> None:
        for name, mask in new.items():
            regrown = torch.nonzero((mask & ~old[name]).view(-1)).view(-1)
            if regrown.numel() == 0:
                continue
            flat = run.sparsifiable[name].detach().view(-1)
            positions, values = offered.get(name, (None, None))
            if positions is None or not torch.equal(positions.to(regrown.device), regrown):
                values = self.draw(run, name, regrown.numel())
            flat[regrown] = values.to(device=flat.device, dtype=flat.dtype)
            self.initialised += regrown.numel()

    @hookimpl
    def on_run_end(self, run, summary):
        return {"kaiming_regrow_initialised": self.initialised}

    def state_dict(self):
        return {"initialised": self.initialised}

    def load_state_dict(self, state):
        self.initialised = int(state["initialised"])
