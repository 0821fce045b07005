"""The fused masked AdamW step: reference vs torch.optim.AdamW + masking, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from sparsebench_kernels.masked_adamw import TOLERANCE, adamw_scalars, masked_adamw, masked_adamw_step

# sizes around and off the kernel's block of 1024, one 3-D weight, one tiny vector
SHAPES = [(37, 53), (1024,), (2500,), (3, 5, 7), (3,)]
LRS = [3e-3, 1e-2, 5e-3, 1e-3, 2e-3]  # a schedule writes group["lr"] before every step


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0, premask=True):
    """Parameters with ~70% of most tensors pruned (masks keyed by the parameter).

    ``premask=False`` leaves the pruned weights non-zero, so the step itself must zero them.
    """
    gen = torch.Generator().manual_seed(seed)
    params, masks = [], {}
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device=device, dtype=dtype))
        params.append(p)
        if len(shape) >= 2 or shape == (2500,):
            mask = (torch.rand(shape, generator=gen) < 0.3).to(device)
            if premask:
                with torch.no_grad():
                    p.mul_(mask)
            masks[p] = mask
    return params, masks


def make_adamw(params, betas=(0.9, 0.95), **kw):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LRS[0], betas=betas, eps=1e-8, **kw)


def set_grads(params, step, nan_where_pruned=None):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        if nan_where_pruned is not None and p in nan_where_pruned:
            g[~nan_where_pruned[p]] = float("nan")
        p.grad = g


def three_pass_step(optimizer, params, masks):
    """What the harness does today: mask the gradients, AdamW, mask the weights."""
    with torch.no_grad():
        for p in params:
            if p in masks:
                p.grad.mul_(masks[p].to(p.dtype))
        optimizer.step()
        for p in params:
            if p in masks:
                p.mul_(masks[p].to(p.dtype))


def assert_same_state(opt_a, params_a, opt_b, params_b, tol):
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pb.detach(), pa.detach(), **tol)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(sa["step"]) == float(sb["step"]) and sa["step"].dtype == sb["step"].dtype
        assert sa["step"].device == sb["step"].device
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[key], sa[key], **tol)


@pytest.mark.parametrize("foreach", [False, True])
def test_reference_matches_torch_adamw_between_grad_and_weight_masking(foreach):
    params_a, masks_a = make_params(SHAPES, premask=False)
    params_b, masks_b = make_params(SHAPES, premask=False)
    opt_a, opt_b = make_adamw(params_a, foreach=foreach), make_adamw(params_b)
    for step, lr in enumerate(LRS, start=1):
        for opt in (opt_a, opt_b):
            for group in opt.param_groups:
                group["lr"] = lr
        set_grads(params_a, step)
        set_grads(params_b, step)
        three_pass_step(opt_a, params_a, masks_a)
        masked_adamw_step(opt_b, masks_b, backend="torch")
    assert_same_state(opt_a, params_a, opt_b, params_b, TOLERANCE[torch.float32])


def test_adamw_continues_from_the_state_the_fused_step_leaves():
    params_a, masks_a = make_params(SHAPES)
    params_b, masks_b = make_params(SHAPES)
    opt_a, opt_b = make_adamw(params_a), make_adamw(params_b)
    for step in range(1, 5):
        set_grads(params_a, step)
        set_grads(params_b, step)
        three_pass_step(opt_a, params_a, masks_a)
        if step <= 2:
            masked_adamw_step(opt_b, masks_b, backend="torch")
        else:
            three_pass_step(opt_b, params_b, masks_b)
    assert_same_state(opt_a, params_a, opt_b, params_b, TOLERANCE[torch.float32])


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.3, 0.999)])  # lerp weight 1 − β₁ below and above 0.5
def test_triton_step_matches_reference_over_several_steps(device, betas):
    params_t, masks_t = make_params(SHAPES, device=device, premask=False)
    params_k, masks_k = make_params(SHAPES, device=device, premask=False)
    opt_t, opt_k = make_adamw(params_t, betas=betas), make_adamw(params_k, betas=betas)
    for step, lr in enumerate(LRS, start=1):
        for opt in (opt_t, opt_k):
            for group in opt.param_groups:
                group["lr"] = lr
        set_grads(params_t, step)
        set_grads(params_k, step)
        grads_before = [p.grad.clone() for p in params_k]
        masked_adamw_step(opt_t, masks_t, backend="torch")
        masked_adamw_step(opt_k, masks_k, backend="triton")
        assert all(torch.equal(p.grad, g) for p, g in zip(params_k, grads_before)), "the gradient must stay as it was"
    assert_same_state(opt_t, params_t, opt_k, params_k, TOLERANCE[torch.float32])
    assert all(torch.all(p.detach()[~mask] == 0) for p, mask in masks_k.items())
    moved = [not torch.equal(p.detach(), q.detach()) for p, q in zip(params_k, make_params(SHAPES, device=device)[0])]
    assert all(moved)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pruned_positions_stay_exactly_zero_even_under_nan_gradients(device, backend):
    params, masks = make_params(SHAPES, device=device)
    opt = make_adamw(params)
    for step in range(1, 4):
        set_grads(params, step, nan_where_pruned=masks)
        masked_adamw_step(opt, masks, backend=backend)
    for p, mask in masks.items():
        state = opt.state[p]
        for t in (p.detach(), state["exp_avg"], state["exp_avg_sq"]):
            assert torch.all(t[~mask] == 0)
            assert torch.isfinite(t).all()
        assert torch.all(state["exp_avg_sq"][mask] > 0)


def test_triton_step_on_bf16_parameters_matches_reference(device):
    shapes = [(37, 53), (2500,)]
    params_t, masks_t = make_params(shapes, dtype=torch.bfloat16, device=device)
    params_k, masks_k = make_params(shapes, dtype=torch.bfloat16, device=device)
    opt_t, opt_k = make_adamw(params_t), make_adamw(params_k)
    for step in range(1, 4):
        set_grads(params_t, step)
        set_grads(params_k, step)
        masked_adamw_step(opt_t, masks_t, backend="torch")
        masked_adamw_step(opt_k, masks_k, backend="triton")
    assert_same_state(opt_t, params_t, opt_k, params_k, TOLERANCE[torch.bfloat16])
    for p, mask in masks_k.items():
        assert p.dtype == opt_k.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.all(p.detach()[~mask] == 0) and torch.all(opt_k.state[p]["exp_avg"][~mask] == 0)


def test_bad_input_is_refused_with_the_reason():
    params, masks = make_params([(4, 4)])
    p = params[0]
    scalars = adamw_scalars(1, 1e-3, (0.9, 0.95), 1e-8, 0.0)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        masked_adamw(p.data, torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4), None, scalars, backend="cuda")
    with pytest.raises(ValueError, match="grad has shape"):
        masked_adamw(p.data, torch.zeros(4), torch.zeros(4, 4), torch.zeros(4, 4), None, scalars)
    with pytest.raises(ValueError, match="bool tensor"):
        masked_adamw(p.data, torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4), torch.ones(4, 4), scalars)
    p.grad = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        masked_adamw_step(torch.optim.AdamW([p], amsgrad=True), masks)
    with pytest.raises(TypeError, match="needs a torch.optim.AdamW"):
        masked_adamw_step(torch.optim.SGD([p], lr=0.1), masks)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in the interpreter
def test_non_finite_values_are_stored_like_the_reference_in_bf16(device):
    params_t, masks_t = make_params([(37, 53)], dtype=torch.bfloat16, device=device)
    params_k, masks_k = make_params([(37, 53)], dtype=torch.bfloat16, device=device)
    opt_t, opt_k = make_adamw(params_t), make_adamw(params_k)
    active = masks_k[params_k[0]].view(-1).nonzero().view(-1)[:2].tolist()
    for params in (params_t, params_k):
        set_grads(params, 1)
        params[0].grad.view(-1)[active[0]] = float("inf")
        params[0].grad.view(-1)[active[1]] = float("nan")
    masked_adamw_step(opt_t, masks_t, backend="torch")
    masked_adamw_step(opt_k, masks_k, backend="triton")
    for t, k in ((params_t[0].detach(), params_k[0].detach()), (opt_t.state[params_t[0]]["exp_avg_sq"],
                                                               opt_k.state[params_k[0]]["exp_avg_sq"])):
        assert not torch.isfinite(k.view(-1)[active]).any()
        torch.testing.assert_close(k, t, equal_nan=True, **TOLERANCE[torch.bfloat16])
