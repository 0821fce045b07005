"""``gumbel``: a mask learned through Gumbel-sigmoid sampling with a straight-through estimator."""

from __future__ import annotations

import time
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsebench import Method, hookimpl
from sparsebench.api import changed_only, fraction_step, keep_top, keep_top_global, map_layers

SCORE_FLOPS = "gumbel_scores"
# Elementwise work per sparsifiable weight and micro-batch. Forward: uniform draw, two logs, add,
# divide by τ, sigmoid (~4), threshold, the straight-through add/subtract, w·m. Backward: ∂/∂w
# (one multiply), ∂/∂m (one multiply), σ' = σ(1−σ) (two), 1/τ (one), the sparsity-loss sum (one).
FORWARD_FLOPS_PER_WEIGHT = 12
BACKWARD_FLOPS_PER_WEIGHT = 6


class GumbelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tau_start: float = Field(1.0, gt=0, description="Gumbel-sigmoid temperature at step 1")
    tau_end: float = Field(0.5, gt=0, description="temperature at the last learning step (geometric annealing)")
    sparsity_weight: float = Field(0.01, ge=0, description="weight of the loss (current_sparsity − target)²")
    finalize_fraction: float = Field(
        0.75, gt=0, lt=1, description="fraction of training at which the mask is fixed to the top scores"
    )
    score_init: float = Field(
        3.0, description="initial score of every weight; σ(3) ≈ 0.95: training starts near-dense and the scores rank weights"
    )
    score_lr_scale: float = Field(1.0, gt=0, description="learning rate of the scores relative to the weights'")
    scope: Literal["global", "layer"] = Field(
        "global", description="final top-score mask: global (one ranking over every layer) or per layer"
    )


class GumbelMask:
    """``w → w ⊙ m`` for one weight, ``m`` a hard Gumbel-sigmoid sample.

    Training: m = 1[(s + L)/τ > 0] with logistic noise L = log u − log(1 − u) (the difference of
    two Gumbels), and the straight-through gradient of σ((s + L)/τ). Evaluation: m = 1[s > 0]
    (the noise-free mode). The score lives on the method, not in the model, so it is neither in
    ``model.parameters()`` (nor in the gradient-clipping norm) nor in the model's ``state_dict``.
    """

    def __init__(self, owner: "Gumbel", name: str):
        self.owner, self.score_name = owner, name

    def __call__(self, weight: torch.Tensor, training: bool) -> torch.Tensor:
        score = self.owner.scores[self.score_name]
        if not training:
            return weight * (score > 0).to(weight.dtype)
        started = time.perf_counter()
        u = torch.rand(score.shape, generator=self.owner.noise, device=score.device)
        u = u.clamp_(1e-6, 1 - 1e-6)
        logits = (score + torch.log(u) - torch.log1p(-u)) / self.owner.tau
        soft = torch.sigmoid(logits)
        # (soft − soft.detach()) is exactly 0, so the forward value is exactly the hard 0/1 mask
        mask = (logits > 0).to(soft.dtype) + (soft - soft.detach())
        self.owner.sampled[self.score_name] = mask
        masked = weight * mask.to(weight.dtype)
        self.owner.sampling_s += time.perf_counter() - started
        return masked


def install_mask(module: torch.nn.Module, attr: str, sample: GumbelMask) -> list:
    """Make ``module.<attr>`` read as ``sample(weight)`` during ``module``'s forward pass only.

    A pre-hook puts the masked tensor into the instance ``__dict__`` (found before the registered
    parameter); a forward hook (``always_call``: also on an exception) takes it out again. Unlike
    ``torch.nn.utils.parametrize`` this leaves the parameter's name, the model's ``state_dict``
    and checkpoints unchanged. Returns the hook handles.
    """

    def before(mod, args):
        mod.__dict__[attr] = sample(mod._parameters[attr], mod.training)

    def after(mod, args, output):
        mod.__dict__.pop(attr, None)

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after, always_call=True)]


class Gumbel(Method):
    """Learns a score per sparsifiable weight; the forward pass uses a hard 0/1 mask sampled with
    Gumbel-sigmoid noise at temperature τ (annealed geometrically from ``tau_start`` to
    ``tau_end``), the backward pass the straight-through estimator. The loss gets
    ``sparsity_weight · (current_sparsity − target)²`` (returned as ``loss/gumbel_sparsity``),
    where current_sparsity is the zero fraction of this micro-batch's sampled masks.

    The harness's masks stay all-True while the mask is learned, so weights are never zeroed when
    a sample flips. At step ``round(finalize_fraction · T)`` the mask is fixed to the top scores at
    exactly the target sparsity, the sampling is removed and the remaining steps fine-tune a
    sparse model, so the run's row is comparable with the other methods.

    Cost, charged and reported: the learning phase trains at dense FLOPs (the score gradient
    needs ∂L/∂(w ⊙ m) at every position, a dense weight-gradient product, and the sampled
    pattern changes every micro-batch); the sampling itself is charged as ``gumbel_scores``
    (18 elementwise FLOPs per weight and micro-batch). The scores and their Adam moments take
    3 × 4 bytes per sparsifiable weight (``gumbel_score_bytes`` in ``summary.json``); the
    sampling's wall time, which runs inside ``forward`` where the hook timer does not see it, is
    added to ``method_time_s`` and ``overhead_frac``.

    The Gumbel-softmax/-sigmoid relaxation: Jang, Gu, Poole (2017); Maddison, Mnih, Teh (2017);
    straight-through estimator: Bengio, Léonard, Courville (2013).
    """

    name = "gumbel"
    Config = GumbelConfig
    changes_density = True

    def __init__(self, config=None):
        super().__init__(config)
        self.scores: dict[str, torch.nn.Parameter] = {}
        self.sampled: dict[str, torch.Tensor] = {}
        self.noise: Optional[torch.Generator] = None
        self.tau = self.config.tau_start
        self.finalized = False
        self.sampling_s = 0.0  # wall time of the sampling inside forward passes (not seen by the hook timer)
        self._handles: list = []
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._loaded: Optional[dict] = None

    # ---------------------------------------------------------------- schedule

    def finalize_step(self, total_steps: int) -> int:
        return fraction_step(self.config.finalize_fraction, total_steps)

    def tau_at(self, step: int, total_steps: int) -> float:
        """τ of the forward passes of ``step``: τ_start at step 1, τ_end at the last learning step,
        geometric in between (τ_end afterwards)."""
        last = self.finalize_step(total_steps)
        if last <= 1 or step >= last:
            return self.config.tau_end
        progress = (max(step, 1) - 1) / (last - 1)
        return self.config.tau_start * (self.config.tau_end / self.config.tau_start) ** progress

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def configure(self, run):
        seed = int(torch.randint(0, 2**62, (1,), generator=run.generator))
        self.noise = torch.Generator(device=run.device).manual_seed(seed)
        for name, param in run.sparsifiable.items():
            self.scores[name] = torch.nn.Parameter(torch.full_like(param, self.config.score_init, dtype=torch.float32))
            module_name, _, attr = name.rpartition(".")
            self._handles += install_mask(run.model.get_submodule(module_name), attr, GumbelMask(self, name))
        # The group stays after finalising (its scores simply get no gradient), so a checkpoint's
        # optimizer always has the same groups as a freshly configured run.
        run.optimizer.add_param_group({"params": list(self.scores.values()), "weight_decay": 0.0,
                                       "lr_scale": self.config.score_lr_scale})
        self._optimizer = run.optimizer
        if self._loaded is not None:
            self._restore(self._loaded)

    @hookimpl
    def on_train_start(self, run):
        self.tau = self.tau_at(run.step + 1, run.total_steps)

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        if self.finalized or not self.sampled:
            return None
        n_total = sum(s.numel() for s in self.scores.values())
        kept = sum(m.sum() for m in self.sampled.values())
        self.sampled = {}
        current = 1.0 - kept / n_total
        run.ledger.charge(SCORE_FLOPS, (FORWARD_FLOPS_PER_WEIGHT + BACKWARD_FLOPS_PER_WEIGHT) * n_total)
        if step % run.config.training.log_every == 0:
            run.log(**{"gumbel/tau": self.tau, "gumbel/sampled_sparsity": float(current.detach())})
        return {"gumbel_sparsity": self.config.sparsity_weight * (current - run.sparsity) ** 2}

    @hookimpl
    def update_mask(self, run, step, masks):
        if self.finalized or step != self.finalize_step(run.total_steps):
            return None
        new = self.final_masks(run.sparsity, run.layers)
        self._stop_learning()
        return changed_only(masks, new) or None

    @hookimpl
    def after_optimizer_step(self, run, step):
        self.tau = self.tau_at(step + 1, run.total_steps)

    @hookimpl
    def on_run_end(self, run, summary):
        """Report the scores' memory and FLOPs, and add the in-forward sampling time to the
        method's time: the harness times hooks only, and the sampling runs inside ``forward``."""
        n = sum(s.numel() for s in self.scores.values())
        method_time = summary.get("method_time_s", 0.0) + self.sampling_s
        train_time = summary.get("train_time_s") or 0.0
        return {
            "gumbel_score_bytes": 3 * 4 * n,
            "gumbel_score_flops": run.ledger.by_name.get(SCORE_FLOPS, 0.0),
            "gumbel_sampling_time_s": self.sampling_s,
            "method_time_s": method_time,
            "overhead_frac": method_time / train_time if train_time else 0.0,
        }

    # ---------------------------------------------------------------- finalising

    def final_masks(self, sparsity: float, layers=None) -> dict[str, torch.Tensor]:
        """The top scores at exactly the target: ``round((1 − s)·N)`` active weights globally, or
        ``round((1 − s)·n)`` per logical layer (``layers``: ``run.layers``)."""
        if self.config.scope == "layer":
            return map_layers(self.scores, lambda layer, s: keep_top(s, round((1.0 - sparsity) * layer.numel)), layers)
        total = sum(s.numel() for s in self.scores.values())
        return keep_top_global(self.scores, round((1.0 - sparsity) * total))

    def _stop_learning(self) -> None:
        """Remove the sampling and free the scores' Adam moments; the scores stay for reporting."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for score in self.scores.values():
            score.grad = None
            score.requires_grad_(False)
            if self._optimizer is not None:
                self._optimizer.state.pop(score, None)
        self.sampled = {}
        self.finalized = True

    # ---------------------------------------------------------------- state

    def state_dict(self):
        if not self.scores and self._loaded is not None:
            return self._loaded
        return {
            "scores": {n: s.detach().clone() for n, s in self.scores.items()},
            "noise": self.noise.get_state() if self.noise is not None else None,
            "tau": self.tau,
            "finalized": self.finalized,
        }

    def load_state_dict(self, state):
        if self.scores:
            self._restore(state)
        else:  # not configured yet: applied in configure()
            self._loaded = state
            self.tau, self.finalized = float(state["tau"]), bool(state["finalized"])

    def _restore(self, state) -> None:
        with torch.no_grad():
            for name, value in state["scores"].items():
                self.scores[name].copy_(value)
        if state["noise"] is not None and self.noise is not None:
            self.noise.set_state(state["noise"])
        self.tau = float(state["tau"])
        if bool(state["finalized"]) and not self.finalized:
            self._stop_learning()  # resumed after the mask was fixed
