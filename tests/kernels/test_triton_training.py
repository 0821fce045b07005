"""training.kernels: triton: the LocalEngine steps through the fused masked AdamW kernel.

Runs on CUDA where there is one, else in Triton's CPU interpreter (this folder's conftest).
"""

from __future__ import annotations

import pytest
import torch

from sparsebench_kernels.masked_adamw import TOLERANCE
from tests.helpers import registry_with, run_configs, train_config


def _static_run(write_suite, device, kernels, grad_clip):
    registry = registry_with()
    training = {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "eval_every": 0, "grad_clip": grad_clip,
                "eval_batches": 1, "log_every": 2, "device": device.type, "kernels": kernels}
    cfg = [c for c in run_configs(write_suite(training=training), registry) if c.method.name == "static"][0]
    return train_config(cfg, registry)


# With clipping the engine masks the gradients before the step (the norm needs them masked);
# without, only the kernel masks them. TOLERANCE is one step's; four steps feed each step's
# ulp-level differences back through forward and backward, so the trained weights and moments are
# compared at ten times its absolute tolerance (an Adam update near a zero gradient amplifies them).
TRAINED = {"rtol": TOLERANCE[torch.float32]["rtol"], "atol": 10 * TOLERANCE[torch.float32]["atol"]}
@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_the_triton_path_trains_the_weights_the_torch_path_trains_within_the_kernels_tolerance(
        write_suite, device, grad_clip):
    torch_setup, torch_result = _static_run(write_suite, device, "torch", grad_clip)
    triton_setup, triton_result = _static_run(write_suite, device, "triton", grad_clip)
    assert torch_setup.kernels == "torch" and triton_setup.kernels == "triton"
    torch_params = dict(torch_result.run.model.named_parameters())
    for name, p in triton_result.run.model.named_parameters():  # sparse and dense weights alike
        torch.testing.assert_close(p.detach(), torch_params[name].detach(), **TRAINED)
    for name, p in triton_result.run.sparsifiable.items():
        mask = triton_result.run.masks[name]
        assert torch.equal(mask, torch_result.run.masks[name])
        assert (p.detach()[~mask] == 0).all()  # exactly zero, re-masked inside the kernel
    torch_state = torch_result.run.optimizer.state
    for p, torch_p in zip(triton_result.run.model.parameters(), torch_result.run.model.parameters()):
        state = triton_result.run.optimizer.state[p]  # AdamW's own state, stepped by the kernel
        assert float(state["step"]) == float(torch_state[torch_p]["step"]) == 4
        for moment in ("exp_avg", "exp_avg_sq"):  # pruned positions' moments stay exactly 0 on both paths
            torch.testing.assert_close(state[moment], torch_state[torch_p][moment], **TRAINED)
    assert triton_result.val_loss == pytest.approx(torch_result.val_loss, rel=1e-5)
