"""``sparsae_search``: the (1+λ) evolution strategy over the binary mask.

Every ``mask_update_every`` (K) optimizer steps, inside ``update_mask``:

1. the held-out perplexity is measured on a micro-batch of ``stagnation_rows`` (32) sequences kept
   apart for it (the rows of the last ⌈32 / heldout_batch_size⌉ batches of ``run.heldout``) and
   fed to the stagnation rule, which may boost the reset probability;
2. λ mutants of the current mask M are drawn as swap lists (:mod:`.swaps`): each makes exactly
   ``round(p_mutate · active)`` swaps — or, with probability ``p_global_reset``, re-shuffles
   ``reset_fraction`` of the active connections — at an unchanged global count, within the
   per-layer sparsity bounds;
3. M and every mutant are evaluated on the same search micro-batch (the other held-out batches,
   rotated between updates; with ``candidate_adapt_steps`` > 0 each candidate first takes that
   many reverted adaptation steps on the next batch of the rotation, see :meth:`MaskSearch.adapt`):
   the swaps are applied to the weights in place, one forward and one backward (``torch.autograd.grad``, so the training gradient in ``p.grad`` is kept) give the
   cross-entropy and the gradient, then the weights are restored bit for bit;
4. candidates with a non-finite loss or gradient are rejected; the lowest composite proxy
   (:mod:`.proxy`) wins, and the running statistics and adaptive bounds see the winner.

No update runs at the last step (as for RigL and SET): a mask changed then would be evaluated with
its regrown weights untrained.

Activated weights are evaluated with the values they would get if their candidate won: the run's
``kaiming_regrow`` draws (handed over to it for the winner), or zero without that component (the
harness's value for regrown weights). So a candidate is scored as exactly the model that training
continues from.
"""

from __future__ import annotations

import math
import time
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sparsebench import Method, hookimpl
from sparsebench.api import PluginError, autocast_context, cross_entropy, gradient_activity, perplexity, random_start
from sparsebench_plugins.sparsae.adapt import adapt_candidate
from sparsebench_plugins.sparsae.proxy import CompositeProxy, diversity, layer_grad_term, select
from sparsebench_plugins.sparsae.regrow import KaimingRegrow
from sparsebench_plugins.sparsae.swaps import (Candidate, apply_swaps, count_bounds, logical_masks, revert_swaps,
                                               sample_mutant, to_parameters)
from sparsebench_plugins.sparsae.triggers import AdaptiveBounds, Stagnation


def active_counts(masks: dict) -> dict[str, int]:
    """Active connections per layer (one device sync for all layers)."""
    names = list(masks)
    return dict(zip(names, torch.stack([masks[n].sum() for n in names]).tolist()))


def layer_counts(run, masks: dict) -> dict[str, int]:
    """Active connections per logical layer (GPT-2's c_attn counts as its q, k and v)."""
    return active_counts(logical_masks(run.logical_layers, masks))


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mask_update_every: int = Field(1000, ge=1, description="K: optimizer steps between mask updates")
    lambda_: int = Field(3, ge=1, description="mutants per update (M itself is always a candidate)")
    p_mutate: float = Field(0.005, gt=0, lt=1, description="swaps per mutant as a fraction of the active connections")
    min_layer_sparsity: float = Field(0.5, ge=0, lt=1, description="no swap makes a layer denser than 1 − this")
    max_layer_sparsity: float = Field(0.95, gt=0, lt=1, description="no swap makes a layer sparser than this")
    global_reset: bool = Field(True, description="false: no reset mutations at all (an ablation)")
    p_global_reset: float = Field(0.01, ge=0, le=1, description="probability that a mutant is a global reset")
    reset_fraction: float = Field(0.05, gt=0, lt=1, description="share of the active connections a reset re-shuffles")
    stagnation_patience: int = Field(5, ge=1, description="updates without a held-out ppl improvement before a boost")
    boost_updates: int = Field(2, ge=1, description="updates the boosted reset probability lasts")
    boosted_p_global_reset: float = Field(0.1, ge=0, le=1, description="reset probability while boosted after stagnation")
    diversity: Literal["kl", "rms"] = Field("kl", description="kl: Σ s_l log(s_l/s_t); rms: sqrt(mean (s_l − s_t)²)")
    w_ce: float = Field(1.0, ge=0, description="weight of the cross-entropy term (constant)")
    w_div: float = Field(0.01, ge=0, description="initial weight of the diversity term")
    w_grad: float = Field(0.005, ge=0, description="initial weight of the gradient term")
    anneal_fraction: float = Field(0.7, gt=0, le=1, description="w_div, w_grad reach 0 after this share of the planned updates")
    norm_decay: float = Field(0.99, gt=0, lt=1, description="decay of the running mean and variance of each proxy component")
    norm_eps: float = Field(1e-5, gt=0, description="ε of the normalisation (x − μ) / (σ + ε)")
    grad_floor: float = Field(1e-4, ge=0, description="adaptive bound: a layer's Grad below this counts as flat")
    grad_floor_patience: int = Field(10, ge=1, description="adaptive bound: consecutive flat updates before a raise")
    bound_step: float = Field(0.05, gt=0, lt=1, description="adaptive bound: raise of a layer's max sparsity")
    bound_cap: Literal["target", "bound"] = Field(
        "target", description="target: a raised bound ≤ target sparsity + bound_step (the spec); bound: ≤ max_layer_sparsity + bound_step"
    )
    candidate_init: Literal["regrow", "zero"] = Field(
        "regrow", description="values of activated weights while evaluated: the run's regrow draws (zero without one), or zero"
    )
    distribution: Literal["uniform", "erk", "er"] = Field("uniform", description="initial per-layer densities")
    stagnation_rows: int = Field(
        32, ge=1, description="rows (sequences) of the stagnation micro-batch, from held-out batches kept for it alone"
    )
    candidate_adapt_steps: int = Field(
        0, ge=0, description="beyond the spec: reverted adaptation steps of every candidate on a held-out batch before it is scored"
    )
    candidate_adapt_lr_scale: float = Field(
        1.0, gt=0, description="step size of those adaptation steps relative to the run's current learning rate"
    )

    @model_validator(mode="after")
    def _bounds(self) -> "SearchConfig":
        if self.min_layer_sparsity > self.max_layer_sparsity:
            raise ValueError(f"min_layer_sparsity ({self.min_layer_sparsity}) exceeds max_layer_sparsity ({self.max_layer_sparsity})")
        return self


class MaskSearch(Method):
    """SparsAE's mask search: init_mask (random at the target) and the (1+λ) ES in update_mask."""

    name = "sparsae_search"
    min_heldout_batches = 2  # the search scores candidates on one batch, the stagnation check uses another
    Config = SearchConfig
    #: swaps move connections between layers (the global count is kept exactly, layer counts are not)
    changes_density = True

    def __init__(self, config: Optional[SearchConfig] = None):
        super().__init__(config)
        c = self.config
        self.proxy = CompositeProxy(c.w_ce, c.w_div, c.w_grad, c.anneal_fraction, c.norm_decay, c.norm_eps)
        self.stagnation = Stagnation(c.stagnation_patience, c.boost_updates)
        self.bounds: Optional[AdaptiveBounds] = None
        self.updates = 0  # mask updates done
        self.batch_position = 0
        self.search_time_s = 0.0
        self.counters = {"mask_changes": 0, "swaps": 0, "resets_tried": 0, "resets_accepted": 0,
                         "rejected_nonfinite": 0, "bound_changes": 0, "resampled": 0, "dropped": 0}
        self.peak_candidate_bytes = 0
        self._pending_bounds: Optional[dict] = None
        self._ppl_rows = 0

    # ---------------------------------------------------------------------------- set-up

    @hookimpl
    def configure(self, run):
        c = self.config
        if not c.min_layer_sparsity <= run.sparsity <= c.max_layer_sparsity:
            raise PluginError(
                f"sparsae: sparsity {run.sparsity} is outside [min_layer_sparsity, max_layer_sparsity] = "
                f"[{c.min_layer_sparsity}, {c.max_layer_sparsity}]; no mask meets every layer bound"
            )
        if len(run.heldout) < 2:
            raise PluginError("sparsae: training.heldout_batches must be >= 2 (the stagnation check keeps batches for "
                              f"its {c.stagnation_rows} rows, at least one is left to score candidates)")
        numel = {n: layer.numel for n, layer in run.logical_layers.items()}  # bounds per logical layer
        self.bounds = AdaptiveBounds({n: c.max_layer_sparsity for n in numel}, numel, run.sparsity, c.grad_floor,
                                     c.grad_floor_patience, c.bound_step, c.bound_cap)
        if self._pending_bounds is not None:  # state loaded before the run was configured
            self.bounds.load_state_dict(self._pending_bounds)
            self._pending_bounds = None

    @hookimpl
    def init_mask(self, run, model):
        return random_start(run, self.config.distribution)

    def stagnation_batches(self, pool: list) -> int:
        """How many batches at the end of the held-out pool the stagnation check keeps for itself:
        enough for ``stagnation_rows`` rows, but never the first batch (candidates are scored there)."""
        reserved, rows = 0, 0
        while rows < self.config.stagnation_rows and reserved < len(pool) - 1:
            reserved += 1
            rows += int(pool[-reserved]["input_ids"].shape[0])
        return reserved

    def stagnation_batch(self, pool: list) -> dict:
        """The stagnation micro-batch: up to ``stagnation_rows`` rows of the reserved batches (fewer
        only when the pool is too small; ``sparsae/heldout_rows`` logs how many)."""
        reserved = pool[len(pool) - self.stagnation_batches(pool):]
        rows = self.config.stagnation_rows
        return {k: torch.cat([b[k] for b in reserved])[:rows] for k in ("input_ids", "labels")}

    def planned_updates(self, run) -> int:
        return run.total_steps // self.config.mask_update_every

    # ---------------------------------------------------------------------------- the search

    @hookimpl
    def update_mask(self, run, step, masks):
        if step % self.config.mask_update_every != 0 or step >= run.total_steps:
            return None
        start = time.perf_counter()
        try:
            return self.search(run, step, masks)
        finally:
            elapsed = time.perf_counter() - start
            self.search_time_s += elapsed
            run.log(**{"sparsae/search_s": elapsed})

    def search(self, run, step: int, masks: dict) -> Optional[dict]:
        """One mask update; returns the winner's changed masks or None (M won)."""
        c = self.config
        pool = run.heldout.batches
        ppl_batch = self.stagnation_batch(pool)
        self._ppl_rows = int(ppl_batch["input_ids"].shape[0])
        search_pool = pool[:len(pool) - self.stagnation_batches(pool)]
        search_batch = search_pool[self.batch_position % len(search_pool)]
        adapt_batch = search_pool[(self.batch_position + 1) % len(search_pool)]
        self.batch_position += 1

        ppl = self.heldout_ppl(run, ppl_batch)
        triggered = self.stagnation.observe(ppl)
        boosted = self.stagnation.take_boost()
        p_reset = 0.0 if not c.global_reset else (c.boosted_p_global_reset if boosted else c.p_global_reset)

        parts = run.logical_layers  # counts, bounds and swaps per logical layer (c_attn's q, k, v apart)
        counts = layer_counts(run, masks)
        candidates = self.draw_candidates(run, masks, counts, p_reset)
        evaluations = [self.evaluate(run, masks, counts, cand, search_batch, adapt_batch) for cand in candidates]
        tokens = search_batch["input_ids"].numel()
        param_counts = {n: 0 for n in masks}
        for name, layer in parts.items():
            param_counts[layer.parent] += counts[name]
        densities = {n: param_counts[n] / masks[n].numel() for n in masks}
        adapt_tokens = c.candidate_adapt_steps * adapt_batch["input_ids"].numel()
        run.ledger.charge("sparsae_search", run.ledger.forward_cost(ppl_batch["input_ids"].numel(), densities)
                          + len(candidates) * 3 * run.ledger.forward_cost(tokens + adapt_tokens, densities))

        weights = self.proxy.weights(self.updates, self.planned_updates(run))
        valid = [i for i, e in enumerate(evaluations) if e["valid"]]
        scored = [None] * len(candidates)
        for i, s in zip(valid, self.proxy.score([evaluations[i]["raw"] for i in valid], weights)):
            scored[i] = s
        stats_used = self.proxy.stats()  # what normalised this update (the first one initialises them)
        winner = select(scored)

        bound_changes = []
        if winner is not None:
            chosen = evaluations[winner]
            self.proxy.update(chosen["raw"])
            bound_changes = self.bounds.observe(chosen["layer_grad"])
        self._log(run, step, candidates, evaluations, scored, stats_used, weights, winner, ppl, triggered,
                  boosted, p_reset, bound_changes)
        self.updates += 1
        self.counters["bound_changes"] += len(bound_changes)
        self.counters["rejected_nonfinite"] += len(candidates) - len(valid)
        self.counters["resets_tried"] += sum(cand.kind == "reset" for cand in candidates)
        if winner is None or candidates[winner].kind == "current":
            return None
        return self._adopt(run, masks, candidates[winner])

    def draw_candidates(self, run, masks: dict, counts: dict, p_reset: float) -> list[Candidate]:
        """M plus λ mutants (each a global reset with probability ``p_reset``); ``counts`` per
        logical layer (:func:`layer_counts`), swaps drawn per logical layer."""
        c = self.config
        masks = logical_masks(run.logical_layers, masks)
        total = sum(counts.values())
        bounds = {n: count_bounds(masks[n].numel(), c.min_layer_sparsity, self.bounds.max_sparsity[n]) for n in masks}
        init = self._init_values(run)
        candidates = [Candidate("current")]
        for _ in range(c.lambda_):
            is_reset = p_reset > 0 and float(torch.rand((), generator=run.generator)) < p_reset
            fraction = c.reset_fraction if is_reset else c.p_mutate
            n_swaps = max(1, round(fraction * total))
            mutant, resampled = sample_mutant("reset" if is_reset else "mutant", masks, counts, bounds, n_swaps,
                                              run.generator, init)
            mutant = to_parameters(mutant, run.logical_layers)
            self.counters["resampled"] += resampled
            self.counters["dropped"] += mutant.dropped
            candidates.append(mutant)
        self.peak_candidate_bytes = max(self.peak_candidate_bytes, sum(cand.nbytes for cand in candidates))
        return candidates

    def _regrow(self, run) -> Optional[KaimingRegrow]:
        return next((p for p in run.plugins.values() if isinstance(p, KaimingRegrow)), None)

    def _init_values(self, run):
        regrow = self._regrow(run) if self.config.candidate_init == "regrow" else None
        if regrow is None:
            return lambda name, n: torch.zeros(n)
        parts = run.logical_layers
        return lambda name, n: regrow.draw(run, parts[name].parent, n)

    @torch.no_grad()
    def heldout_ppl(self, run, batch) -> float:
        """Perplexity of the current model on the stagnation micro-batch (one forward)."""
        was_training = run.model.training
        run.model.eval()
        try:
            with autocast_context(run):
                logits = run.model(input_ids=batch["input_ids"]).logits
            return perplexity(float(cross_entropy(logits, batch["labels"])))
        finally:
            run.model.train(was_training)

    def evaluate(self, run, masks: dict, counts: dict, candidate: Candidate, batch: dict,
                 adapt_batch: Optional[dict] = None) -> dict:
        """Forward + backward of the model under ``candidate``; the weights are restored exactly.

        With ``candidate_adapt_steps`` > 0 the candidate first takes those adaptation steps on
        ``adapt_batch`` (:meth:`adapt`); every sparsifiable weight is then restored from a copy.
        Returns ``valid`` (finite loss and gradients), ``reject`` (why not), ``raw`` (ce, div, grad)
        and ``layer_grad`` / ``layer_sparsity`` per layer.
        """
        params = run.sparsifiable
        names = list(params)
        was_training = run.model.training
        run.model.eval()  # no dropout: every candidate sees the same function of its weights
        saved = None
        adapting = self.config.candidate_adapt_steps > 0 and adapt_batch is not None
        snapshot = [params[n].detach().clone() for n in names] if adapting else None
        try:
            saved = apply_swaps(params, candidate)
            if adapting:
                self.adapt(run, masks, candidate, adapt_batch)
            with torch.enable_grad(), autocast_context(run):
                logits = run.model(input_ids=batch["input_ids"]).logits
                ce = cross_entropy(logits, batch["labels"])
            grads = torch.autograd.grad(ce, [params[n] for n in names], allow_unused=True)
        finally:
            revert_swaps(params, candidate, saved)
            if snapshot is not None:
                with torch.no_grad():
                    for name, value in zip(names, snapshot):
                        params[name].copy_(value)
            run.model.train(was_training)
        grad_of = {n: g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, grads)}
        parts = run.logical_layers  # per logical layer: c_attn's q, k and v are three layers
        names = list(parts)
        rows = []
        for name, layer in parts.items():  # [Σg², Σg² over M′] from one pass (a Triton kernel on GPUs)
            swaps = (candidate.parts or candidate.layers).get(name)
            rows.append(gradient_activity(layer.view(grad_of[layer.parent]).contiguous(),
                                          layer.view(masks[layer.parent]).contiguous(),
                                          [None if swaps is None else (swaps.off, swaps.on)], backend=run.kernels))
        values = torch.cat([ce.detach().float().view(1), torch.stack(rows).view(-1)]).tolist()  # one sync
        ce_value, per_layer = values[0], values[1:]
        totals, active_sq = per_layer[0::2], per_layer[1::2]
        after = candidate.active_counts(counts)
        layer_sparsity = {n: 1.0 - after[n] / parts[n].numel for n in names}
        layer_grad = {n: layer_grad_term(a, after[n]) for n, a in zip(names, active_sq)}
        reject = None
        if not math.isfinite(ce_value):
            reject = "non-finite loss"
        elif not all(math.isfinite(t) for t in totals):
            reject = "non-finite gradient"
        raw = {
            "ce": ce_value,
            "div": diversity(list(layer_sparsity.values()), run.sparsity, self.config.diversity),
            "grad": sum(layer_grad.values()) / len(layer_grad),
        }
        return {"valid": reject is None, "reject": reject, "raw": raw, "layer_grad": layer_grad,
                "layer_sparsity": layer_sparsity}

    def adapt(self, run, masks: dict, candidate: Candidate, batch: dict) -> None:
        """``candidate_adapt_steps`` reverted adaptation steps on ``batch`` (see :mod:`.adapt`)."""
        adapt_candidate(run, masks, candidate, batch, self.config.candidate_adapt_steps,
                        self.config.candidate_adapt_lr_scale)

    def _adopt(self, run, masks: dict, winner: Candidate) -> dict:
        """The winner's new masks; its evaluated init values go to the regrow component."""
        regrow = self._regrow(run)
        if regrow is not None and self.config.candidate_init == "regrow":
            for name, s in winner.layers.items():
                regrow.offer(name, s.on, s.init)
        self.counters["mask_changes"] += 1
        self.counters["swaps"] += winner.n_swaps
        self.counters["resets_accepted"] += winner.kind == "reset"
        return winner.new_masks(masks)

    # ---------------------------------------------------------------------------- logging

    def _log(self, run, step, candidates, evaluations, scored, stats, weights, winner, ppl, triggered, boosted,
             p_reset, bound_changes) -> None:
        rows = []
        for cand, ev, s in zip(candidates, evaluations, scored):
            row = {"kind": cand.kind, "swaps": cand.n_swaps, "valid": ev["valid"], "reject": ev["reject"], **ev["raw"]}
            if s is not None:  # rejected candidates are not normalised
                row.update({f"n_{k}": v for k, v in s.norm.items()}, proxy=s.proxy)
            rows.append(row)
        chosen = evaluations[winner] if winner is not None else evaluations[0]
        run.log(**{
            "sparsae/update": self.updates,
            "sparsae/candidates": rows,
            "sparsae/norm": stats,  # running μ, σ per component that normalised this update
            "sparsae/norm_updated": self.proxy.stats(),  # after folding in the chosen candidate
            "sparsae/weights": weights,
            "sparsae/winner": winner,
            "sparsae/winner_kind": candidates[winner].kind if winner is not None else None,
            "sparsae/accepted": winner is not None and candidates[winner].kind != "current",
            "sparsae/swaps": candidates[winner].n_swaps if winner is not None else 0,
            "sparsae/heldout_ppl": ppl,
            "sparsae/heldout_rows": self._ppl_rows,
            "sparsae/stale_updates": self.stagnation.stale,
            "sparsae/reset": {"p": p_reset, "boosted": boosted, "trigger": "stagnation" if boosted else None,
                              "triggered_now": triggered,
                              "mutants": sum(cand.kind == "reset" for cand in candidates)},
            "sparsae/layer_sparsity": chosen["layer_sparsity"],
            "sparsae/layer_grad": chosen["layer_grad"],
            "sparsae/max_layer_sparsity": dict(self.bounds.max_sparsity),
            "sparsae/bound_changes": bound_changes,
        })

    # ---------------------------------------------------------------------------- results

    @hookimpl
    def on_run_end(self, run, summary):
        train_s = summary.get("train_time_s") or 0.0
        return {
            "sparsae_search_time_s": self.search_time_s,
            "sparsae_search_time_frac": self.search_time_s / train_s if train_s else 0.0,
            "sparsae_updates": self.updates,
            # accepted mutants per mask update: does the search do anything?
            "sparsae_accept_rate": self.counters["mask_changes"] / self.updates if self.updates else 0.0,
            "sparsae_candidate_bytes_peak": self.peak_candidate_bytes,
            **{f"sparsae_{k}": v for k, v in self.counters.items()},
        }

    def state_dict(self):
        return {
            "proxy": self.proxy.state_dict(), "stagnation": self.stagnation.state_dict(),
            "bounds": self.bounds.state_dict() if self.bounds else self._pending_bounds, "updates": self.updates,
            "batch_position": self.batch_position, "search_time_s": self.search_time_s,
            "counters": dict(self.counters), "peak_candidate_bytes": self.peak_candidate_bytes,
        }

    def load_state_dict(self, state):
        self.proxy.load_state_dict(state["proxy"])
        self.stagnation.load_state_dict(state["stagnation"])
        if state["bounds"] is not None and self.bounds is not None:
            self.bounds.load_state_dict(state["bounds"])
        else:
            self._pending_bounds = state["bounds"]
        self.updates = int(state["updates"])
        self.batch_position = int(state["batch_position"])
        self.search_time_s = float(state["search_time_s"])
        self.counters = dict(state["counters"])
        self.peak_candidate_bytes = int(state["peak_candidate_bytes"])
