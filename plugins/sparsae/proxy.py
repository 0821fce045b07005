"""SparsAE's composite proxy: P(M') = w_CE·N(CE) + w_Div·N(Div) − w_Grad·N(Grad).

The raw components of a candidate mask M' are

* ``ce``   — cross-entropy of the model under M' on the search micro-batch;
* ``div``  — layer-sparsity diversity against the target sparsity ``s_t``:
  ``kl``: Σ_l s_l·log(s_l / s_t) (the refined specification; a layer at sparsity 0 adds 0),
  ``rms``: sqrt(mean_l (s_l − s_t)²);
* ``grad`` — (1/L) Σ_l ‖∇_{W_l}(W_l ⊙ M'_l)‖₂ / sqrt(active_l): the root-mean-square gradient
  over the active weights of each layer, averaged over layers. Higher is better, hence the minus.

Each component is normalised by exponentially decaying running statistics (:class:`RunningNorm`),
updated with the components of the *selected* mask only. The weights of ``div`` and ``grad``
decay quadratically to 0 over the first ``anneal_fraction`` of the planned mask updates
(:func:`annealed_weight`); ``w_CE`` stays constant. The lowest P wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

COMPONENTS = ("ce", "div", "grad")


def diversity(layer_sparsity: Sequence[float], target: float, kind: str = "kl") -> float:
    """Layer-sparsity diversity of one mask (see the module docstring for both formulas).

    ``kl`` is not a divergence between distributions (the s_l do not sum to 1) and can be
    negative for layers of unequal size; only differences between candidates matter once the
    running normalisation has removed the offset.
    """
    if kind == "kl":
        if target <= 0:
            raise ValueError("diversity 'kl' needs a target sparsity > 0")
        return sum(s * math.log(s / target) for s in layer_sparsity if s > 0)
    if kind == "rms":
        return math.sqrt(sum((s - target) ** 2 for s in layer_sparsity) / len(layer_sparsity))
    raise ValueError(f"unknown diversity '{kind}'. Allowed: kl, rms")


def layer_grad_term(sum_sq_active: float, n_active: int) -> float:
    """‖∇_W(W ⊙ M')‖₂ / sqrt(active): the RMS gradient over a layer's active weights (0 if none)."""
    return math.sqrt(max(sum_sq_active, 0.0)) / math.sqrt(n_active) if n_active > 0 else 0.0


def annealed_weight(w0: float, update: int, planned_updates: int, fraction: float) -> float:
    """``w0·(1 − u/U)²`` for ``u < U = fraction · planned_updates``, then 0 (``u`` is 0-based)."""
    horizon = fraction * planned_updates
    if update >= horizon:
        return 0.0
    return w0 * (1.0 - update / horizon) ** 2


@dataclass
class RunningNorm:
    """``N(x) = (x − μ) / (σ + ε)`` with exponentially decaying μ and σ² (one per component).

    The first call of :meth:`normalise_all` (the first mask update) initialises μ and σ² from
    the spread of that update's candidates, since a single selected value gives no scale; every
    :meth:`update` then folds in the selected candidate's value x:
    ``δ = x − μ;  μ ← μ + (1 − d)·δ;  σ² ← d·(σ² + (1 − d)·δ²)``.
    """

    decay: float = 0.99
    eps: float = 1e-5
    mu: Optional[float] = None
    var: float = 0.0

    @property
    def sigma(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def normalise(self, x: float) -> float:
        assert self.mu is not None, "RunningNorm used before initialisation"
        return (x - self.mu) / (self.sigma + self.eps)

    def normalise_all(self, values: Sequence[float]) -> list[float]:
        if self.mu is None and values:
            self.mu = sum(values) / len(values)
            self.var = sum((v - self.mu) ** 2 for v in values) / len(values)
        return [self.normalise(v) for v in values]

    def update(self, x: float) -> None:
        if self.mu is None:
            self.mu, self.var = x, 0.0
            return
        delta = x - self.mu
        self.mu += (1.0 - self.decay) * delta
        self.var = self.decay * (self.var + (1.0 - self.decay) * delta * delta)

    def state_dict(self) -> dict:
        return {"mu": self.mu, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.mu, self.var = state["mu"], float(state["var"])


@dataclass
class Scored:
    """A candidate's raw components, normalised components and proxy value."""

    raw: dict[str, float]
    norm: dict[str, float]
    proxy: float


@dataclass
class CompositeProxy:
    """The proxy with its running statistics and annealed weights."""

    w_ce: float = 1.0
    w_div: float = 0.01
    w_grad: float = 0.005
    anneal_fraction: float = 0.7
    decay: float = 0.99
    eps: float = 1e-5
    norms: dict[str, RunningNorm] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.norms:
            self.norms = {c: RunningNorm(self.decay, self.eps) for c in COMPONENTS}

    def weights(self, update: int, planned_updates: int) -> dict[str, float]:
        """The weights of mask update ``update`` (0-based) out of ``planned_updates``."""
        return {
            "ce": self.w_ce,
            "div": annealed_weight(self.w_div, update, planned_updates, self.anneal_fraction),
            "grad": annealed_weight(self.w_grad, update, planned_updates, self.anneal_fraction),
        }

    def score(self, raws: Sequence[dict[str, float]], weights: dict[str, float]) -> list[Scored]:
        """Normalise every candidate's components with the current statistics and compute P."""
        normed = {c: self.norms[c].normalise_all([r[c] for r in raws]) for c in COMPONENTS}
        out = []
        for i, raw in enumerate(raws):
            norm = {c: normed[c][i] for c in COMPONENTS}
            proxy = weights["ce"] * norm["ce"] + weights["div"] * norm["div"] - weights["grad"] * norm["grad"]
            out.append(Scored(dict(raw), norm, proxy))
        return out

    def update(self, selected: dict[str, float]) -> None:
        """Fold the selected mask's raw components into the running statistics."""
        for c in COMPONENTS:
            self.norms[c].update(selected[c])

    def stats(self) -> dict[str, dict[str, Optional[float]]]:
        return {c: {"mu": n.mu, "sigma": n.sigma if n.mu is not None else None} for c, n in self.norms.items()}

    def state_dict(self) -> dict:
        return {c: n.state_dict() for c, n in self.norms.items()}

    def load_state_dict(self, state: dict) -> None:
        for c, s in state.items():
            self.norms[c].load_state_dict(s)


def select(scored: Sequence[Optional[Scored]]) -> Optional[int]:
    """Index of the lowest proxy among valid candidates (``None`` entries were rejected).

    Ties go to the earlier candidate, so the current mask (index 0) wins a tie.
    """
    best, best_p = None, math.inf
    for i, s in enumerate(scored):
        if s is not None and s.proxy < best_p:
            best, best_p = i, s.proxy
    return best
