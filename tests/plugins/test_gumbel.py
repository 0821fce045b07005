"""``gumbel``: hard Gumbel-sigmoid masks with straight-through gradients, the Lagrangian sparsity
controller, the temperature schedule, the exact top-score mask at ``finalize_fraction``, and its
charged costs."""

from __future__ import annotations

import json

import pytest
import torch

from sparsebench import hookimpl
from sparsebench.api import keep_top_global
from sparsebench.conformance import start_run, tiny_setup
from sparsebench.loop import train
from sparsebench_plugins.gumbel import (
    BACKWARD_FLOPS_PER_WEIGHT,
    FORWARD_FLOPS_PER_WEIGHT,
    SCORE_FLOPS,
    Gumbel,
    GumbelConfig,
    GumbelMask,
)


class Owner:
    """The state a GumbelMask reads from its method."""

    def __init__(self, score, tau, seed=0):
        self.scores = {"w": score}
        self.noise = torch.Generator().manual_seed(seed)
        self.tau, self.sampled, self.sampling_s = tau, {}, 0.0

    def eval_mask(self, name):
        return Gumbel.eval_mask(self, name)


def test_forward_mask_is_hard_and_the_score_gradient_is_straight_through():
    score = torch.nn.Parameter(torch.randn(6, 5))
    weight = torch.nn.Parameter(torch.randn(6, 5))
    owner = Owner(score, tau=0.7)
    out = GumbelMask(owner, "w")(weight, training=True)
    out.sum().backward()

    u = torch.rand((6, 5), generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    logits = (score.detach() + torch.log(u) - torch.log1p(-u)) / 0.7
    hard = (logits > 0).float()
    assert torch.equal(owner.sampled["w"].detach(), hard)  # values are exactly 0/1
    assert torch.allclose(out.detach(), weight.detach() * hard)
    sig = torch.sigmoid(logits)
    assert torch.allclose(score.grad, weight.detach() * sig * (1 - sig) / 0.7, atol=1e-6)  # d/ds of σ, not of the step
    assert torch.equal(weight.grad, hard)


def test_evaluation_keeps_the_top_scores_at_the_samples_expected_density():
    score = torch.tensor([[-1.0, 2.0], [0.5, -0.1]])  # Σσ(s) = 0.27 + 0.88 + 0.62 + 0.48 ≈ 2.25 → 2 kept
    owner = Owner(score, tau=1.0)
    owner.config, owner._eval_masks = GumbelConfig(), None
    out = GumbelMask(owner, "w")(torch.ones(2, 2), training=False)
    assert out.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_temperature_anneals_geometrically_from_tau_start_to_tau_end():
    method = Gumbel(GumbelConfig(tau_start=1.0, tau_end=0.5, finalize_fraction=0.75))
    taus = [method.tau_at(t, 100) for t in range(1, 76)]
    assert taus[0] == 1.0 and taus[-1] == pytest.approx(0.5)
    ratios = [b / a for a, b in zip(taus, taus[1:])]
    assert all(r == pytest.approx(0.5 ** (1 / 74)) for r in ratios)
    assert method.tau_at(90, 100) == 0.5


def test_lagrangian_term_uses_the_expected_sparsity_and_the_multipliers_ascend():
    setup = tiny_setup(Gumbel, {"score_init": 0.0, "target_warmup": 0.0}, steps=8, sparsity=0.8)
    start_run(setup)
    run, method = setup.run, setup.run.plugins["gumbel"]
    method.lambda1, method.lambda2 = -2.0, 3.0
    ids = torch.randint(0, 32, (2, 16))
    outputs = run.model(input_ids=ids)
    terms = method.loss_terms(run=run, step=1, batch={"input_ids": ids, "labels": ids}, outputs=outputs)
    gap = 0.5 - 0.8  # score 0: σ(0) = 1/2 is every weight's keep probability, so s = 0.5 exactly
    assert float(terms["gumbel_lagrangian"].detach()) == pytest.approx(-2.0 * gap + 3.0 * gap**2, rel=1e-5)
    # the term pulls every score down (towards sparsity) while λ1 + 2λ2·gap < 0
    terms["gumbel_lagrangian"].backward()
    assert all(bool((s.grad > 0).all()) for s in method.scores.values())
    method.after_optimizer_step(run=run, step=1)  # ascent: λ1 += η·gap, λ2 += η₂·gap²
    assert method.lambda1 == pytest.approx(-2.0 + 0.3 * gap)
    assert method.lambda2 == pytest.approx(3.0 + 30.0 * gap**2)
    run.metrics.close()


def test_target_ramps_from_zero_over_the_warmup_share_of_the_learning_phase():
    method = Gumbel(GumbelConfig(target_warmup=0.5, finalize_fraction=0.75))
    assert method.finalize_step(400) == 300
    assert method.target_at(0, 400, 0.8) == 0.0
    assert method.target_at(75, 400, 0.8) == pytest.approx(0.4)
    assert method.target_at(150, 400, 0.8) == pytest.approx(0.8)
    assert method.target_at(290, 400, 0.8) == pytest.approx(0.8)


class Probe:
    name = "probe"
    observer = True

    def __init__(self):
        self.masks, self.zeros = {}, {}

    @hookimpl
    def after_optimizer_step(self, run, step):
        self.masks[step] = {n: m.clone() for n, m in run.masks.items()}
        self.zeros[step] = sum(int((p.detach() == 0).sum()) for p in run.sparsifiable.values())


def _run(**overrides):
    probe = Probe()
    setup = tiny_setup(Gumbel, overrides, observers=[("probe", probe)], steps=12, sparsity=0.8)
    train(setup)
    return setup, probe


def test_learning_keeps_weights_then_fixes_the_top_scores_at_exactly_the_target():
    setup, probe = _run()
    run, method = setup.run, setup.run.plugins["gumbel"]
    final_step = method.finalize_step(12)
    assert final_step == 9
    for step in range(1, final_step):  # learning: harness masks all-True, no weight zeroed by a flip
        assert all(bool(m.all()) for m in probe.masks[step].values())
        assert probe.zeros[step] == 0
    n = sum(p.numel() for p in run.sparsifiable.values())
    expected = keep_top_global(method.scores, round(0.2 * n))  # the scores stop changing at finalize
    for step in range(final_step, 13):
        assert sum(int(m.sum()) for m in probe.masks[step].values()) == round(0.2 * n)
        for name, m in probe.masks[step].items():
            assert torch.equal(m, expected[name])
    # the sampling is gone (the forward uses the plain weights), the scores' Adam moments are freed
    module_name, _, attr = next(iter(run.sparsifiable)).rpartition(".")
    module = run.model.get_submodule(module_name)
    assert not module._forward_pre_hooks and attr not in module.__dict__
    assert all(s not in run.optimizer.state and not s.requires_grad for s in method.scores.values())
    # the model's parameter names never changed, so checkpoints stay compatible
    assert all(name in dict(run.model.named_parameters()) for name in run.sparsifiable)


def test_layer_scope_fixes_each_layer_at_the_target():
    setup, probe = _run(scope="layer")
    for layer in setup.run.logical_layers.values():  # c_attn's q, k and v each at the target
        assert int(layer.mask(probe.masks[12]).sum()) == round(0.2 * layer.numel)


def test_learning_phase_is_charged_dense_plus_the_sampling_and_the_scores_memory_is_reported():
    setup, _ = _run()
    run, method = setup.run, setup.run.plugins["gumbel"]
    n = sum(p.numel() for p in run.sparsifiable.values())
    tokens = run.tokens_per_step
    assert run.ledger.by_name[SCORE_FLOPS] == 9 * (FORWARD_FLOPS_PER_WEIGHT + BACKWARD_FLOPS_PER_WEIGHT) * n
    dense = run.ledger.forward_cost(tokens)
    sparse = run.ledger.forward_cost(tokens, {k: float(m.float().mean()) for k, m in run.masks.items()})
    assert run.ledger.by_name["train"] == pytest.approx(3 * (8 * dense + 4 * sparse))
    extra = method.on_run_end(run=run, summary={"method_time_s": 1.0, "train_time_s": 10.0})
    assert extra["gumbel_score_bytes"] == 12 * n
    assert extra["gumbel_sampling_time_s"] > 0
    assert extra["method_time_s"] == pytest.approx(1.0 + method.sampling_s)
    assert extra["overhead_frac"] == pytest.approx((1.0 + method.sampling_s) / 10.0)


def _tiny_400_steps(tmp_path):
    from sparsebench.conformance import single_thread, tiny_run_config
    from sparsebench.registry import Registry
    from sparsebench.run_setup import setup_run

    cfg = tiny_run_config(Gumbel, steps=400, sparsity=0.8, batch_size=8)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": 32}),
                                 "training": cfg.training.model_copy(update={"log_every": 10})})
    registry = Registry()
    registry.register(Gumbel, "tests")
    with single_thread():
        setup = setup_run(cfg, registry, tmp_path)
        try:
            train(setup)
        finally:
            setup.run.metrics.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return setup, records


def test_default_options_reach_the_target_by_learning_before_the_mask_is_fixed(tmp_path):
    setup, records = _tiny_400_steps(tmp_path)
    method = setup.run.plugins["gumbel"]
    fixed_at = method.finalize_step(400)
    learning = [r for r in records if "gumbel/sparsity" in r]
    assert [r["step"] for r in learning] == list(range(10, fixed_at + 1, 10))  # every logged learning step
    assert all("gumbel/expected_sparsity" in r for r in learning)
    last = learning[-1]
    assert last["step"] == fixed_at
    assert abs(last["gumbel/sparsity"] - 0.8) <= 0.05, [(r["step"], r["gumbel/sparsity"]) for r in learning]
    assert learning[0]["gumbel/sparsity"] < 0.1  # it started near-dense: the controller did the work
    # the cut is reported, and it changed little of what was learned
    summary = method.on_run_end(run=setup.run, summary={})
    assert 0.0 <= summary["gumbel_cut_changed_frac"] <= 0.25
    assert abs(summary["gumbel_learned_sparsity_at_cut"] - 0.8) <= 0.05
    assert 0.0 <= summary["gumbel_cut_changed_vs_sample_frac"] <= 1.0


def _checkpointed(run_dir, resume):
    from sparsebench.checkpoints import Checkpointer
    from sparsebench.conformance import tiny_run_config
    from sparsebench.registry import Registry
    from sparsebench.run_setup import setup_run

    cfg = tiny_run_config(Gumbel, steps=16, sparsity=0.8)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"checkpoint_every": 7, "keep_checkpoints": 5})})
    registry = Registry()
    registry.register(Gumbel, "tests")
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = setup_run(cfg, registry, run_dir)
    try:
        result = train(setup, checkpoints=Checkpointer(setup, resume=resume))
    finally:
        setup.run.metrics.close()
    return setup.run, result


@pytest.mark.parametrize("resume_from", [7, 14])  # learning phase; after the mask was fixed at step 12
def test_a_resumed_run_ends_exactly_where_the_uninterrupted_one_did(tmp_path, resume_from):
    import shutil

    from sparsebench.checkpoints import checkpoint_name, digest_path

    reference, ref_result = _checkpointed(tmp_path / "ref", resume=False)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    ckpt = tmp_path / "ref" / checkpoint_name(resume_from)
    shutil.copy(ckpt, resumed_dir / ckpt.name)
    shutil.copy(digest_path(ckpt), resumed_dir / digest_path(ckpt).name)
    shutil.copy(tmp_path / "ref" / "metrics.jsonl", resumed_dir / "metrics.jsonl")
    run, result = _checkpointed(resumed_dir, resume=True)
    assert result.val_loss == ref_result.val_loss
    for name, p in reference.sparsifiable.items():
        assert torch.equal(run.masks[name], reference.masks[name])
        assert torch.equal(run.sparsifiable[name], p)
