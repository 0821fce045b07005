"""``nm``: N:M masks along the input dimension, SR-STE's straight-through gradient and decay term."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from pydantic import ValidationError

from sparsebench import hookimpl
from sparsebench.conformance import MethodConformance, start_run, tiny_setup
from sparsebench.errors import HookError
from sparsebench.loop import train
from sparsebench_plugins.nm import NM, NMConfig, nm_mask


class TestNMConformance(MethodConformance):
    method = NM
    expect_updates = True


def _trained(overrides=None, **kwargs):
    setup = tiny_setup(NM, overrides, **kwargs)
    try:
        train(setup)
    finally:
        setup.run.metrics.close()
    return setup


def _groups_along_input(mask: torch.Tensor, in_dim: int, m: int) -> torch.Tensor:
    """Active count of every group of ``m`` consecutive positions along the input axis."""
    return mask.movedim(in_dim, -1).reshape(-1, m).sum(dim=1)


def _unhooked_copy_with_zeros(model: torch.nn.Module, masks: dict) -> torch.nn.Module:
    """A copy of ``model`` without the method's hooks, its pruned weights set to zero."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return ref


class _Probe:
    """An observer recording the initial masks, and the weights and method masks after each step."""

    name = "probe"
    observer = True

    def __init__(self):
        self.initial: dict = {}
        self.after_step: dict = {}

    @hookimpl
    def on_train_start(self, run):
        self.initial = {n: m.clone() for n, m in run.masks.items()}

    @hookimpl(trylast=True)  # after the method recomputed its masks
    def after_optimizer_step(self, run, step):
        weights = {n: p.detach().clone() for n, p in run.sparsifiable.items()}
        self.after_step[step] = (weights, dict(run.plugins["nm"].masks))


# --------------------------------------------------------------------------------------------- masks


def test_nm_mask_keeps_the_largest_magnitudes_of_each_group_along_the_input_axis():
    linear = torch.tensor([[1.0, -5.0, 2.0, 0.5, 0.1, 0.3, -0.2, 9.0]])  # (out=1, in=8)
    assert nm_mask(linear, 1, 2, 4).tolist() == [[False, True, True, False, False, True, False, True]]
    conv1d = linear.t().contiguous()  # (in=8, out=1): the groups run down the column
    assert nm_mask(conv1d, 0, 2, 4).equal(nm_mask(linear, 1, 2, 4).t())
    assert nm_mask(linear, 1, 1, 8).tolist() == [[False] * 7 + [True]]


@pytest.mark.parametrize("model", ["gpt-nano", "llama-nano"])
def test_final_masks_hold_exactly_n_of_every_m_along_the_input_dim_and_pruned_weights_are_zero(model):
    setup = _trained({"n": 2, "m": 4}, steps=6, model=model)
    run = setup.run
    expected_in_dim = 0 if model == "gpt-nano" else 1  # GPT-2's Conv1D (in, out); nn.Linear (out, in)
    for name, info in run.layers.items():
        mask = run.masks[name]
        assert info.in_dim == expected_in_dim
        assert _groups_along_input(mask, info.in_dim, 4).eq(2).all(), name
        assert run.sparsifiable[name][~mask].eq(0).all(), f"{name}: pruned weights are not zero at the end"
        assert run.sparsifiable[name][mask].ne(0).all()
        assert nm_mask(run.sparsifiable[name], info.in_dim, 2, 4).equal(mask)  # the mask of the final |W|
    assert sum(int(m.sum()) for m in run.masks.values()) * 2 == sum(m.numel() for m in run.masks.values())


def test_other_patterns_hold_exactly_n_of_m():
    setup = _trained({"n": 1, "m": 8}, steps=3)
    for name, info in setup.run.layers.items():
        assert _groups_along_input(setup.run.masks[name], info.in_dim, 8).eq(1).all()


def test_masks_are_recomputed_from_magnitudes_during_training():
    probe = _Probe()
    setup = _trained(steps=12, observers=[("probe", probe)])
    method = setup.run.plugins["nm"]
    assert method.recomputations == 11  # after every step but the last
    assert method.flips > 0
    assert any(not probe.initial[n].equal(m) for n, m in setup.run.masks.items()), "no mask ever changed"
    for step, (weights, masks) in probe.after_step.items():  # the next forward's mask comes from |W|
        if step < 12:
            for name, weight in weights.items():
                assert masks[name].equal(nm_mask(weight, setup.run.layers[name].in_dim, 2, 4)), (step, name)


def test_update_every_spaces_the_recomputations():
    setup = _trained({"update_every": 4}, steps=12)
    assert setup.run.plugins["nm"].recomputations == 2  # after steps 4 and 8


# --------------------------------------------------------------------------------------------- SR-STE


def test_forward_uses_the_masked_weights_while_the_pruned_ones_keep_their_values():
    setup = tiny_setup(NM)
    setup.run.metrics.close()
    start_run(setup)
    run = setup.run
    for name, mask in run.masks.items():
        assert run.sparsifiable[name][~mask].ne(0).all(), "the harness zeroed a weight the method keeps dense"
    ref = _unhooked_copy_with_zeros(run.model, run.masks)
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    for training in (True, False):
        run.model.train(training)
        ref.train(training)
        with torch.no_grad():
            assert torch.equal(run.model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_gradient_is_straight_through_plus_the_sparse_refined_decay_term():
    decay = 0.05
    setup = tiny_setup(NM, {"decay": decay})
    setup.run.metrics.close()
    start_run(setup)
    run, method = setup.run, setup.run.plugins["nm"]
    method.on_train_start(run=run)
    ref = _unhooked_copy_with_zeros(run.model, run.masks)
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(2))
    run.model(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    ref_params = dict(ref.named_parameters())
    dense = {n: run.sparsifiable[n].detach().clone() for n in run.sparsifiable}
    for name, param in run.sparsifiable.items():  # straight-through: ∂L/∂W = ∂L/∂W̃ at every position
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-5, atol=1e-7)
    before = {n: p.grad.clone() for n, p in run.sparsifiable.items()}
    method.before_optimizer_step(run=run, step=1)
    for name, param in run.sparsifiable.items():
        mask = run.masks[name]
        expected = before[name].clone()
        expected[~mask] += decay * dense[name][~mask]  # λ_W · (¬E ⊙ W), by hand
        torch.testing.assert_close(param.grad, expected, rtol=1e-6, atol=1e-9)  # the decay is ~1e-3: rounding only
        assert torch.equal(param.grad[mask], before[name][mask])


def test_pruned_weights_keep_training_and_their_optimizer_state():
    probe = _Probe()
    setup = _trained(steps=4, observers=[("probe", probe)])
    run = setup.run
    for name, param in run.sparsifiable.items():
        pruned = ~run.masks[name]
        values = [probe.after_step[s][0][name][pruned] for s in (1, 2, 3)]
        assert values[0].ne(0).all() and not values[0].equal(values[1]), f"{name}: pruned weights stopped training"
        assert run.optimizer.state[param]["exp_avg_sq"][pruned].gt(0).all(), f"{name}: optimizer state was reset"


# --------------------------------------------------------------------------------------------- options


def test_n_must_be_below_m():
    with pytest.raises(ValidationError, match=r"n \(4\) must be smaller than m \(4\)"):
        NMConfig(n=4, m=4)
    with pytest.raises(ValidationError):
        NMConfig(unknown=1)


def test_m_must_divide_every_input_dimension():
    setup = tiny_setup(NM, {"n": 1, "m": 3})
    setup.run.metrics.close()
    with pytest.raises(HookError, match=r"ValueError: nm: m=3 does not divide the input dimension \(32\) of 'transformer.h.0"):
        setup.hooks.configure(run=setup.run)


def test_state_dict_round_trip_restores_the_forward_masks():
    setup = _trained(steps=5)
    method = setup.run.plugins["nm"]
    fresh = NM(method.config)
    fresh.load_state_dict(copy.deepcopy(method.state_dict()))
    assert fresh.recomputations == method.recomputations and fresh.flips == method.flips
    assert all(fresh.masks[n].equal(m) for n, m in method.masks.items())


class _DenseStandIn:
    """Stands in for a semi-structured tensor class on CPU: ``from_dense`` keeps the dense
    ``(out, in)`` matrix, so the layouts handed to ``addmm``/``F.linear`` are checked, not the kernels."""

    BACKEND = "stand-in"
    refuse_rows: int = -1

    @classmethod
    def from_dense(cls, dense):
        if dense.shape[0] == cls.refuse_rows:
            raise RuntimeError("shape not supported")
        return dense.clone()


@pytest.mark.parametrize("model", ["gpt-nano", "llama-nano"])
def test_evaluation_kernel_path_hands_each_layer_its_weight_in_the_layout_its_forward_reads(model):
    from sparsebench_plugins.nm import SemiStructuredEval

    setup = tiny_setup(NM, model=model)
    setup.run.metrics.close()
    start_run(setup)
    run, method = setup.run, setup.run.plugins["nm"]
    method.on_train_start(run=run)
    evaluator = SemiStructuredEval(run)
    evaluator.cls = type("Refusing", (_DenseStandIn,), {"refuse_rows": next(iter(run.sparsifiable.values())).shape[1]
                                                        if model == "gpt-nano" else -1})
    problems = evaluator.probe()
    assert all("shape not supported" in p for p in problems.values())
    assert len(problems) == (2 if model == "gpt-nano" else 0)  # c_attn of both blocks: its 3·n_embd output rows are refused
    method._eval = evaluator
    ref = _unhooked_copy_with_zeros(run.model, run.masks)
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3))
    run.model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(run.model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert len(evaluator.cache) == len(run.layers) - len(problems)
    method.after_optimizer_step(run=run, step=1)
    assert not evaluator.cache  # the weights changed: compressed again at the next evaluation


# --------------------------------------------------------------------------------------------- the run


def test_summary_reports_pattern_kernel_and_the_dense_weight_gradient_flops():
    setup = _trained(steps=4)
    run, method = setup.run, setup.run.plugins["nm"]
    extra = method.on_run_end(run=run, summary={})
    assert extra["sparsity_target"] == 0.5 and extra["nm_pattern"] == "2:4"
    assert extra["nm_kernel"].startswith("dense (CPU")
    ledger, tokens = run.ledger, run.tokens_per_step
    half = ledger.forward_cost(tokens, dict.fromkeys(run.sparsifiable, 0.5))
    assert ledger.by_name["nm_dense_weight_grad"] == pytest.approx(4 * (ledger.forward_cost(tokens) - half))
    # forward and input gradient at density 1/2, the weight gradient dense
    assert ledger.total == pytest.approx(4 * (2 * half + ledger.forward_cost(tokens)))


def test_cli_run_of_nm_ends_at_sparsity_one_half(write_suite, tmp_path):
    path = write_suite(sparsity=0.9)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sparsebench", "run", str(path), "--out", str(tmp_path / "out"),
                             "--set", "methods=[nm]", "--set", "training.steps=8"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    [summary_path] = (tmp_path / "out" / "tiny").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "ok" and summary["method"] == "nm"
    assert summary["sparsity_actual"] == 0.5 and summary["sparsity_target"] == 0.5
    assert set(summary["layer_density"].values()) == {0.5}
    masks = torch.load(summary_path.parent / "masks.pt", weights_only=True)
    for name, mask in masks.items():
        in_dim = 0  # GPT-2 Conv1D
        assert _groups_along_input(mask, in_dim, 4).eq(2).all(), name
    config = yaml.safe_load((summary_path.parent / "config.yaml").read_text())
    assert config["method"]["name"] == "nm"


def test_a_run_resumed_from_a_mid_run_checkpoint_ends_identical(tmp_path):
    import shutil

    from sparsebench.checkpoints import Checkpointer, checkpoint_name
    from sparsebench.checkpoints.files import remove_checkpoint
    from sparsebench.conformance import tiny_run_config
    from sparsebench.registry import Registry
    from sparsebench.run_setup import setup_run

    registry = Registry()
    registry.register(NM, "tests")
    cfg = tiny_run_config(NM, steps=8)
    cfg.training.checkpoint_every, cfg.training.keep_checkpoints = 4, 2

    messages = []

    def train_in(run_dir, resume):
        run_dir.mkdir(exist_ok=True)
        setup = setup_run(cfg, registry, run_dir)
        try:
            train(setup, checkpoints=Checkpointer(setup, resume=resume, notify=messages.append))
        finally:
            setup.run.metrics.close()
        return setup

    full = train_in(tmp_path / "full", resume=False)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    remove_checkpoint(tmp_path / "resumed" / checkpoint_name(8))  # as if killed between steps 4 and 8
    resumed = train_in(tmp_path / "resumed", resume=True)
    assert any("resumed from ckpt-00000004.pt" in m for m in messages), messages
    assert resumed.run.plugins["nm"].recomputations == full.run.plugins["nm"].recomputations
    for name, mask in full.run.masks.items():
        assert resumed.run.masks[name].equal(mask), name
    for key, value in full.run.model.state_dict().items():
        assert torch.equal(resumed.run.model.state_dict()[key], value), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the benchmark measures")
def test_speedup_benchmark_says_it_needs_cuda_and_measures_nothing(tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "nm_speedup.py"
    result = subprocess.run([sys.executable, str(script), "--json", str(tmp_path / "figures.json")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "need CUDA" in result.stdout and "Nothing measured" in result.stdout
    assert not (tmp_path / "figures.json").exists()


def test_a_deepspeed_suite_with_nm_is_refused_by_validate(write_suite, registry):
    from sparsebench.errors import SuiteError
    from sparsebench.suites import expand_suite

    path = write_suite(methods=["nm"], distributed={"backend": "deepspeed", "config": {}})
    with pytest.raises(SuiteError, match=r"method 'nm' keeps dense weights .* DeepSpeed runs do not support"):
        expand_suite(path, registry)
