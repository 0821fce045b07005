"""Mini burn-in: only newly activated weights take scaled steps, on a linear 1.0 → 1.5 schedule."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from sparsebench_plugins.sparsae.burn_in import BurnIn, BurnInConfig, burn_in_multiplier


def _run(seed: int = 0):
    """A one-layer "run": a masked weight trained by AdamW with weight decay (as the harness does)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(32, 48, generator=g))
    mask = torch.rand(32, 48, generator=g) < 0.3
    with torch.no_grad():
        w.mul_(mask)
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1, foreach=True)
    return types.SimpleNamespace(sparsifiable={"w": w}, masks={"w": mask}, optimizer=opt)


def _grad(run, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    run.sparsifiable["w"].grad = torch.randn(32, 48, generator=g) * run.masks["w"]


def _swap(run) -> tuple[torch.Tensor, torch.Tensor]:
    """Change the mask: the first 20 active positions off, the first 20 inactive ones on."""
    old = run.masks["w"]
    flat = old.clone().view(-1)
    off = torch.nonzero(flat)[:20].view(-1)
    on = torch.nonzero(~flat)[:20].view(-1)
    flat[off], flat[on] = False, True
    new = flat.view_as(old)
    with torch.no_grad():
        run.sparsifiable["w"].mul_(new)
        run.sparsifiable["w"].view(-1)[on] = 0.05
    run.masks = {"w": new}
    return old, new


def _step(run, step: int, burn_in=None) -> None:
    _grad(run, step)
    if burn_in is not None:
        burn_in.before_optimizer_step(run=run, step=step)
    run.optimizer.step()
    with torch.no_grad():
        run.sparsifiable["w"].mul_(run.masks["w"])
    if burn_in is not None:
        burn_in.after_optimizer_step(run=run, step=step)


def test_multiplier_rises_linearly_from_one_to_the_final_value_over_the_burn_in():
    assert [burn_in_multiplier(k, 5, 1.5) for k in range(5)] == pytest.approx([1.0, 1.125, 1.25, 1.375, 1.5])
    assert burn_in_multiplier(0, 1, 1.5) == 1.5


def test_burn_in_scales_only_the_steps_of_new_weights_everything_else_bit_identical():
    plain, burned = _run(), _run()
    burn_in = BurnIn(BurnInConfig(burn_in_steps=5, burn_in_lr_mult=1.5))
    for step in (1, 2):  # some Adam history first
        _step(plain, step)
        _step(burned, step)
    old, new = _swap(plain)
    _swap(burned)
    burn_in.on_mask_change(run=burned, step=3, old={"w": old}, new={"w": new})
    regrown = (new & ~old).view(-1)
    for step in range(3, 10):
        _step(plain, step)
        _step(burned, step, burn_in)
        k = step - 3
        after_plain = plain.sparsifiable["w"].detach().view(-1)
        after_burned = burned.sparsifiable["w"].detach().view(-1)
        if k == 0:
            assert torch.equal(after_plain, after_burned)
        # weights outside the new positions: identical bits to a run without burn-in
        assert torch.equal(after_plain[~regrown].view(torch.int32), after_burned[~regrown].view(torch.int32))
        if 0 < k < 5:
            assert not torch.equal(after_plain[regrown], after_burned[regrown])
    # the optimizer state never differs: only weights are rescaled
    sp, sb = plain.optimizer.state[plain.sparsifiable["w"]], burned.optimizer.state[burned.sparsifiable["w"]]
    assert torch.equal(sp["exp_avg"][~regrown.view_as(new)], sb["exp_avg"][~regrown.view_as(new)])


def test_new_weights_move_by_the_multiplier_times_their_plain_step():
    run = _run()
    burn_in = BurnIn(BurnInConfig(burn_in_steps=5, burn_in_lr_mult=1.5))
    _step(run, 1)
    old, new = _swap(run)
    burn_in.on_mask_change(run=run, step=2, old={"w": old}, new={"w": new})
    regrown = (new & ~old).view(-1)
    for step, mult in zip(range(2, 9), [1.0, 1.125, 1.25, 1.375, 1.5, 1.0, 1.0]):
        reference = _clone(run)
        before = run.sparsifiable["w"].detach().clone().view(-1)
        _step(reference, step)  # plain AdamW from the same state
        _step(run, step, burn_in)
        plain_delta = reference.sparsifiable["w"].detach().view(-1) - before
        delta = run.sparsifiable["w"].detach().view(-1) - before
        assert delta[regrown] == pytest.approx(mult * plain_delta[regrown], rel=1e-5, abs=1e-7)
        assert torch.equal(delta[~regrown], plain_delta[~regrown])


def _clone(run):
    w = torch.nn.Parameter(run.sparsifiable["w"].detach().clone())
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1, foreach=True)
    opt.load_state_dict(copy.deepcopy(run.optimizer.state_dict()))  # load_state_dict keeps the tensors
    return types.SimpleNamespace(sparsifiable={"w": w}, masks=dict(run.masks), optimizer=opt)


def test_a_position_pruned_during_its_burn_in_leaves_the_cohort():
    run = _run()
    burn_in = BurnIn(BurnInConfig(burn_in_steps=5))
    old, new = _swap(run)
    burn_in.on_mask_change(run=run, step=1, old={"w": old}, new={"w": new})
    regrown = torch.nonzero((new & ~old).view(-1)).view(-1)
    pruned_again = new.clone()
    pruned_again.view(-1)[regrown[:5]] = False
    pruned_again.view(-1)[torch.nonzero(~new.view(-1))[:5].view(-1)] = True
    burn_in.on_mask_change(run=run, step=2, old={"w": new}, new={"w": pruned_again})
    first, second = burn_in.cohorts
    assert torch.equal(first.positions["w"], regrown[5:])
    assert second.positions["w"].numel() == 5
