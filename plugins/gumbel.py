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
# divide by τ, sigmoid (~4), threshold, the straight-through add/subtract, w·m (12); the expected
# sparsity: σ(score) (~4) and its sum (1). Backward: ∂/∂w (one multiply), ∂/∂m (one multiply),
# σ' = σ(1−σ) (two), 1/τ (one); the expected sparsity's σ' (two) and its scale (one).
FORWARD_FLOPS_PER_WEIGHT = 17
BACKWARD_FLOPS_PER_WEIGHT = 8


class GumbelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tau_start: float = Field(1.0, gt=0, description="Gumbel-sigmoid temperature at step 1")
    tau_end: float = Field(0.5, gt=0, description="temperature at the last learning step (geometric annealing)")
    finalize_fraction: float = Field(
        0.75, gt=0, lt=1, description="fraction of training at which the mask is fixed to the top scores"
    )
    score_init: float = Field(
        3.0, description="initial score of every weight; σ(3) ≈ 0.95: training starts near-dense and the scores rank weights"
    )
    score_lr_scale: float = Field(
        30.0, gt=0, description="learning rate of the scores relative to the weights' (scores must travel several units)"
    )
    scope: Literal["global", "layer"] = Field(
        "global", description="final top-score mask: global (one ranking over every layer) or per layer"
    )
    target_warmup: float = Field(
        0.5, ge=0, le=1,
        description="share of the learning phase over which the controller's target ramps linearly from 0 to the sparsity",
    )
    lambda_lr: float = Field(0.3, gt=0, description="gradient-ascent rate of the multiplier λ1 (per optimizer step)")
    lambda2_lr: float = Field(30.0, ge=0, description="gradient-ascent rate of the quadratic multiplier λ2 (per optimizer step)")


class GumbelMask:
    """``w → w ⊙ m`` for one weight, ``m`` a hard Gumbel-sigmoid sample.

    Training: m = 1[(s + L)/τ > 0] with logistic noise L = log u − log(1 − u) (the difference of
    two Gumbels), and the straight-through gradient of σ((s + L)/τ). Evaluation: the owner's
    deterministic mask at the samples' expected density (the top round(Σσ(s)) scores): P(keep) =
    σ(s) at any τ, so at 80% sparsity most scores sit below 0 and the mode 1[s > 0] would evaluate
    an almost empty model. The score lives on the method, not in the model, so it is neither in
    ``model.parameters()`` (nor in the gradient-clipping norm) nor in the model's ``state_dict``.
    """

    def __init__(self, owner: "Gumbel", name: str):
        self.owner, self.score_name = owner, name

    def __call__(self, weight: torch.Tensor, training: bool) -> torch.Tensor:
        score = self.owner.scores[self.score_name]
        if not training:
            return weight * self.owner.eval_mask(self.score_name).to(weight.dtype)
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
    ``tau_end``), the backward pass the straight-through estimator. The mask reaches the target
    sparsity *by learning*, through a Lagrangian controller, before it is fixed.

    **Why a Lagrangian, not a penalty.** A penalty ``w·(s − t)²`` on the mean sparsity gives each
    of N scores a gradient ``2w(s − t)/N`` (≈ 1e-7 for gpt-nano): the task gradient wins and the
    sampled sparsity never leaves σ(−score_init). A fixed weight large enough for one model is
    wrong for the next. The Lagrangian of L0-style masks with a target sparsity (Wang, Wohlwend,
    Lei 2020; CoFi, Xia et al. 2022; Sheared-LLaMA, Xia et al. 2023) adds
    ``λ1·(s − t_k) + λ2·(s − t_k)²`` to the loss (``loss/gumbel_lagrangian``) and updates the
    multipliers by gradient *ascent*, ``λ1 += η(s − t_k)``, ``λ2 += η(s − t_k)²`` after every
    optimizer step (``lambda_lr`` = η; a manual update, so they are no optimizer's parameters and
    no learning-rate schedule touches them): while the mask is too dense λ1 grows negative until
    its pull on the scores beats the task gradient, whatever the model size; once the target is
    reached it stops growing, and an overshoot drives it back (λ2 ≥ 0 adds a restoring force).

    ``s`` is the *expected* sparsity ``1 − mean σ(score)``: the probability that a hard sample keeps
    a weight is P((s + L)/τ > 0) = σ(s) for logistic noise L, at any τ. It is differentiable and
    noise-free, so the controller does not chase sampling noise (the sampled sparsity is logged
    beside it: ``gumbel/sparsity`` and ``gumbel/expected_sparsity``). As in CoFi the target ramps
    linearly from 0 to the run's sparsity over the first ``target_warmup`` of the learning phase,
    so the mask thins gradually while the weights adapt, instead of the controller slamming every
    score down at step 1. The scores train with AdamW at ``score_lr_scale`` × the run's learning
    rate: Adam normalises the score gradients, so the controller sets the direction and the rate
    bounds how far the scores travel (from ``score_init`` = 3 to about σ⁻¹(1 − t)).

    The harness's masks stay all-True while the mask is learned, so weights are never zeroed when
    a sample flips. At step ``round(finalize_fraction · T)`` the mask is fixed to the top scores at
    exactly the target sparsity, the sampling is removed and the remaining steps fine-tune a
    sparse model, so the run's row is comparable with the other methods. How much that cut changed
    is reported in ``summary.json``: ``gumbel_cut_changed_frac``, the share of the final mask's
    active weights that the learned deterministic mask (the top Σσ(s) scores, also the mask of
    evaluation passes while learning) did not keep, ``gumbel_cut_changed_vs_sample_frac``, the same
    against the last hard sample trained with, and ``gumbel_learned_sparsity_at_cut`` /
    ``gumbel_sampled_sparsity_at_cut``. P(keep) = σ(s) does not depend on τ, so annealing τ
    sharpens the straight-through gradient, not the samples: a sample agrees with the final cut
    only where the scores have spread apart.

    Cost, charged and reported: the learning phase trains at dense FLOPs (the score gradient
    needs ∂L/∂(w ⊙ m) at every position, a dense weight-gradient product, and the sampled
    pattern changes every micro-batch); the sampling and the expected sparsity are charged as
    ``gumbel_scores`` (``FORWARD_FLOPS_PER_WEIGHT + BACKWARD_FLOPS_PER_WEIGHT`` elementwise FLOPs
    per weight and micro-batch). The scores and their Adam moments take 3 × 4 bytes per
    sparsifiable weight (``gumbel_score_bytes`` in ``summary.json``); the sampling's wall time,
    which runs inside ``forward`` where the hook timer does not see it, is added to
    ``method_time_s`` and ``overhead_frac``.

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
        self.lambda1 = 0.0  # Lagrange multipliers, updated by gradient ascent after each optimizer step
        self.lambda2 = 0.0
        self._gap = 0.0  # expected sparsity − target of the step in progress (detached)
        self.cut: dict[str, float] = {}  # what the final cut changed (summary.json)
        self._eval_masks: Optional[dict[str, torch.Tensor]] = None  # cached until the scores change
        self._last_sampled: dict[str, torch.Tensor] = {}  # the last learning step's hard samples

    # ---------------------------------------------------------------- schedule

    def finalize_step(self, total_steps: int) -> int:
        return fraction_step(self.config.finalize_fraction, total_steps)

    def target_at(self, step: int, total_steps: int, sparsity: float) -> float:
        """The controller's target at ``step``: a linear ramp from 0 to ``sparsity`` over the first
        ``target_warmup`` of the learning phase (CoFi's Lagrangian warm-up), ``sparsity`` after."""
        ramp = round(self.config.target_warmup * self.finalize_step(total_steps))
        if ramp <= 0:
            return sparsity
        return sparsity * min(1.0, step / ramp)

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
        sampled, self.sampled = self.sampled, {}
        self._last_sampled = sampled
        kept = sum(torch.sigmoid(s).sum() for s in self.scores.values())  # P(keep) = σ(score), any τ
        expected = 1.0 - kept / n_total
        gap = expected - self.target_at(step, run.total_steps, run.sparsity)
        self._gap = float(gap.detach())
        run.ledger.charge(SCORE_FLOPS, (FORWARD_FLOPS_PER_WEIGHT + BACKWARD_FLOPS_PER_WEIGHT) * n_total)
        if step % run.config.training.log_every == 0:
            kept_sampled = sum(float(m.detach().sum()) for m in sampled.values())
            run.log(**{
                "gumbel/tau": self.tau,
                "gumbel/sparsity": 1.0 - kept_sampled / n_total,
                "gumbel/expected_sparsity": float(expected.detach()),
                "gumbel/target": self.target_at(step, run.total_steps, run.sparsity),
                "gumbel/lambda1": self.lambda1,
                "gumbel/lambda2": self.lambda2,
            })
        return {"gumbel_lagrangian": self.lambda1 * gap + self.lambda2 * gap * gap}

    @hookimpl
    def update_mask(self, run, step, masks):
        if self.finalized or step != self.finalize_step(run.total_steps):
            return None
        new = self.final_masks(run.sparsity, run.layers)
        self.cut = self.cut_change(new)
        run.log(**{f"gumbel/{k}": v for k, v in self.cut.items()})
        self._stop_learning()
        return changed_only(masks, new) or None

    @hookimpl
    def after_optimizer_step(self, run, step):
        self.tau = self.tau_at(step + 1, run.total_steps)
        self._eval_masks = None
        if not self.finalized:  # gradient ascent on the multipliers: ∂L/∂λ1 = gap, ∂L/∂λ2 = gap²
            self.lambda1 += self.config.lambda_lr * self._gap
            self.lambda2 += self.config.lambda2_lr * self._gap ** 2

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
            "gumbel_lambda1": self.lambda1,
            "gumbel_lambda2": self.lambda2,
            **{f"gumbel_{k}": v for k, v in self.cut.items()},
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

    def eval_mask(self, name: str) -> torch.Tensor:
        """The deterministic mask of evaluation passes while learning: the top ``round(Σσ(s))``
        scores (globally, or per layer with ``scope: layer``), the samples' expected density."""
        if self._eval_masks is None:
            with torch.no_grad():
                if self.config.scope == "layer":
                    self._eval_masks = {n: keep_top(s, round(float(torch.sigmoid(s).sum())))
                                        for n, s in self.scores.items()}
                else:
                    kept = round(float(sum(torch.sigmoid(s).sum() for s in self.scores.values())))
                    self._eval_masks = keep_top_global(self.scores, kept)
        return self._eval_masks[name]

    def cut_change(self, final: dict[str, torch.Tensor]) -> dict[str, float]:
        """What the exact cut changes: ``cut_changed_frac`` = |final ∧ ¬learned| / |final|, the
        share of the final active weights that the learned deterministic mask (:meth:`eval_mask`)
        did not keep; ``cut_changed_vs_sample_frac``, the same against the last hard sample the
        model trained with; and the sparsities of both."""
        self._eval_masks = None
        learned = {n: self.eval_mask(n) for n in final}
        n_final = sum(int(k.sum()) for k in final.values())
        n_total = sum(k.numel() for k in final.values())
        out = {
            "cut_changed_frac": sum(int((k & ~learned[n]).sum()) for n, k in final.items()) / max(n_final, 1),
            "learned_sparsity_at_cut": 1.0 - sum(int(m.sum()) for m in learned.values()) / max(n_total, 1),
        }
        if self._last_sampled:
            sample = {n: m.detach() > 0.5 for n, m in self._last_sampled.items()}
            out["cut_changed_vs_sample_frac"] = (
                sum(int((k & ~sample[n]).sum()) for n, k in final.items()) / max(n_final, 1))
            out["sampled_sparsity_at_cut"] = 1.0 - sum(int(m.sum()) for m in sample.values()) / max(n_total, 1)
        return out

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
        self.sampled, self._last_sampled, self._eval_masks = {}, {}, None
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
            "lambda1": self.lambda1,
            "lambda2": self.lambda2,
            "cut": dict(self.cut),
        }

    def load_state_dict(self, state):
        if self.scores:
            self._restore(state)
        else:  # not configured yet: applied in configure()
            self._loaded = state
            self.tau, self.finalized = float(state["tau"]), bool(state["finalized"])
            self._restore_controller(state)

    def _restore(self, state) -> None:
        with torch.no_grad():
            for name, value in state["scores"].items():
                self.scores[name].copy_(value)
        self._eval_masks = None
        if state["noise"] is not None and self.noise is not None:
            self.noise.set_state(state["noise"])
        self.tau = float(state["tau"])
        self._restore_controller(state)
        if bool(state["finalized"]) and not self.finalized:
            self._stop_learning()  # resumed after the mask was fixed

    def _restore_controller(self, state) -> None:
        self.lambda1, self.lambda2 = float(state["lambda1"]), float(state["lambda2"])
        self.cut = {k: float(v) for k, v in state["cut"].items()}
