"""SparsAE's two conditional rules, as small state machines fed once per mask update.

* :class:`Stagnation` — when the held-out perplexity has not improved for ``patience``
  consecutive mask updates, the global-reset probability is boosted for the next
  ``boost_updates`` updates.
* :class:`AdaptiveBounds` — when a layer's Grad term stays below ``threshold`` for ``patience``
  consecutive updates, its maximum sparsity is raised by ``step`` (5% of the layer), capped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Stagnation:
    """Counts mask updates without a new best held-out perplexity.

    :meth:`observe` is called with the perplexity measured at the start of an update (before its
    mutants are drawn); when it returns True the boost covers that update and the next
    ``boost_updates - 1`` ones — :meth:`take_boost` says, once per update, whether it applies.
    A non-finite perplexity counts as no improvement.
    """

    patience: int = 5
    boost_updates: int = 2
    best: float = math.inf
    stale: int = 0
    boost_left: int = 0

    def observe(self, ppl: float) -> bool:
        if ppl < self.best:
            self.best, self.stale = ppl, 0
        else:
            self.stale += 1
        if self.stale >= self.patience:
            self.stale = 0
            self.boost_left = self.boost_updates
            return True
        return False

    def take_boost(self) -> bool:
        if self.boost_left > 0:
            self.boost_left -= 1
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "stale": self.stale, "boost_left": self.boost_left}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.stale, self.boost_left = float(state["best"]), int(state["stale"]), int(state["boost_left"])


@dataclass
class AdaptiveBounds:
    """Per-layer maximum sparsity, loosened for layers whose gradient stays flat.

    ``cap``: ``"target"`` (the specification): a raised bound never exceeds target sparsity +
    ``step``; with the default bounds (max 0.95) and targets ≤ 0.9 this never loosens anything.
    ``"bound"``: never above the configured ``max_sparsity`` + ``step`` (at most one raise).
    Either way a bound stays below 1 − 1/numel, so a layer keeps at least one connection.
    """

    max_sparsity: dict[str, float]
    numel: dict[str, int]
    target: float
    threshold: float = 1e-4
    patience: int = 10
    step: float = 0.05
    cap: Literal["target", "bound"] = "target"
    below: dict[str, int] = field(default_factory=dict)
    configured: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.configured = self.configured or dict(self.max_sparsity)
        self.below = self.below or {name: 0 for name in self.max_sparsity}

    def limit(self, name: str) -> float:
        base = self.target if self.cap == "target" else self.configured[name]
        return round(min(base + self.step, 1.0 - 1.0 / self.numel[name]), 9)  # 0.9 + 0.05 is not 0.95

    def observe(self, layer_grad: dict[str, float]) -> list[dict]:
        """Feed the selected mask's per-layer Grad terms; return the bound changes made."""
        changes = []
        for name, g in layer_grad.items():
            self.below[name] = self.below[name] + 1 if g < self.threshold else 0
            if self.below[name] < self.patience:
                continue
            self.below[name] = 0
            old = self.max_sparsity[name]
            new = min(round(old + self.step, 9), self.limit(name))
            if new > old:
                self.max_sparsity[name] = new
                changes.append({"layer": name, "old_max_sparsity": old, "new_max_sparsity": new,
                                "grad": g, "updates_below": self.patience})
        return changes

    def state_dict(self) -> dict:
        return {"max_sparsity": dict(self.max_sparsity), "below": dict(self.below)}

    def load_state_dict(self, state: dict) -> None:
        self.max_sparsity = dict(state["max_sparsity"])
        self.below = dict(state["below"])
