"""``candidate_adapt_steps``: a few reverted adaptation steps of a candidate before it is scored.

Why: a mutant's new connections are untrained (Kaiming draws, or zero) and it lost trained
ones, so scored as drawn it nearly always loses to M, which had every training step. Each
candidate, M included, therefore takes the same few steps before it is scored; the score
compares masks after a little training, not a trained mask with an untrained one.

A step is AdamW's without momentum: w ← w − η·g/(√v̂ + 1e-8) on the candidate's active
weights only, with η = ``candidate_adapt_lr_scale`` × the run's current learning rate and
v̂ = max(the optimizer's bias-corrected second moment, g²). A new connection has no moment
(the harness resets it), so its step is η·sign(g), exactly Adam's first step; a trained
weight moves by at most η, less where its gradient has been large. The steps use a held-out
batch other than the scoring batch (so a candidate cannot win by fitting the batch it is
scored on; the same batch only when the scoring pool holds one) and are never kept:
training continues from the candidate as drawn, so no held-out data leaks into the weights.
Cost: 3 forward passes per step and candidate, charged with the search; memory: one copy of
the sparsifiable weights.
"""

from __future__ import annotations

import torch

from sparsebench.api import autocast_context, cross_entropy
from sparsebench_plugins.sparsae.swaps import Candidate


def adapt_candidate(run, masks: dict, candidate: Candidate, batch: dict, steps: int, lr_scale: float) -> None:
    """``steps`` adaptation steps of the candidate (its swaps already applied) on ``batch``, in
    place; the caller restores the weights."""
    params = run.sparsifiable
    names = list(params)
    lr = lr_scale * float(run.optimizer.param_groups[0]["lr"])
    active = {n: masks[n] for n in names}
    active.update(candidate.new_masks(masks))
    moments = second_moments(run)
    for _ in range(steps):
        with torch.enable_grad(), autocast_context(run):
            ce = cross_entropy(run.model(input_ids=batch["input_ids"]).logits, batch["labels"])
        grads = torch.autograd.grad(ce, [params[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for name, g in zip(names, grads):
                if g is None:
                    continue
                g = g.float()
                v = g * g if moments.get(name) is None else torch.maximum(moments[name], g * g)
                step = (g / (v.sqrt() + 1e-8)) * active[name]
                params[name].sub_((lr * step).to(params[name].dtype))


def second_moments(run) -> dict:
    """AdamW's bias-corrected second moments of the sparsifiable weights (None where absent)."""
    betas = {id(p): g.get("betas", (0.9, 0.999))[1] for g in run.optimizer.param_groups for p in g["params"]}
    out = {}
    for name, p in run.sparsifiable.items():
        state = run.optimizer.state.get(p, {})
        if "exp_avg_sq" not in state or id(p) not in betas:
            out[name] = None
            continue
        t = float(state["step"])
        out[name] = state["exp_avg_sq"].float() / (1.0 - betas[id(p)] ** t) if t > 0 else None
    return out
