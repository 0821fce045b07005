"""``gumbel_tokens``: a Gumbel-sigmoid mask over positions that skips each block's MLP; the MLP
sees the kept rows only, the gradient reaches the predictor, FLOPs are charged and credited by
hand count, it composes with weight-sparsity methods, and runs resume exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from sparsebench.conformance import MethodConformance, single_thread, start_run, tiny_run_config, tiny_setup
from sparsebench.loop import train
from sparsebench.registry import Registry
from sparsebench.run_setup import setup_run
from sparsebench_plugins.gumbel_tokens import GATE_FLOPS, SKIPPED_FLOPS, GumbelTokens, TokenGate
from sparsebench_plugins.rigl import RigL
from sparsebench_plugins.static import Static

LLAMA = {"family": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 2}


class TestGumbelTokensConformance(MethodConformance):
    method = GumbelTokens


def _started(model=None, **overrides):
    with single_thread():
        setup = tiny_setup(GumbelTokens, overrides, steps=8, sparsity=0.0, model=model)
        start_run(setup)
    return setup


def _rows_seen(run, method):
    """Rows each gated MLP's first matmul receives (a forward hook per block)."""
    seen = []
    handles = [run.model.get_submodule(name).get_submodule(first).register_forward_hook(
        lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        for name, first in ((n, "c_fc" if "transformer" in n else "gate_proj") for n in method.module_names)]
    return seen, handles


@pytest.mark.parametrize("model, names", [(None, ["transformer.h.0.mlp", "transformer.h.1.mlp"]),
                                          (LLAMA, ["model.layers.0.mlp", "model.layers.1.mlp"])])
def test_every_block_mlp_is_gated_and_sees_only_the_kept_rows(model, names):
    setup = _started(model)
    run, method = setup.run, setup.run.plugins["gumbel_tokens"]
    assert method.module_names == names
    seen, handles = _rows_seen(run, method)
    ids = torch.randint(0, 32, (4, 16))
    run.model.train()
    logits = run.model(input_ids=ids).logits
    assert logits.shape == (4, 16, 32)
    kept = [int((g.detach() > 0.5).sum()) for g in method._kept]
    assert seen == kept and all(0 < k < 64 for k in kept)  # bias 0: about half of the 64 positions
    skipped = 1 - sum(kept) / 128
    assert 0.3 < skipped < 0.7
    for h in handles:
        h.remove()
    run.metrics.close()


def test_all_kept_is_the_plain_model_and_all_skipped_never_runs_the_mlp():
    setup = _started()
    run, method = setup.run, setup.run.plugins["gumbel_tokens"]
    ids = torch.randint(0, 32, (2, 16))
    run.model.eval()
    with torch.no_grad():
        for gate in method.gates.values():
            gate.predictor[2].bias.fill_(100.0)
        gated = run.model(input_ids=ids).logits
        plain = {}
        for name in method.module_names:  # the class's own forward, unpatched
            module = run.model.get_submodule(name)
            plain[name] = module.__dict__.pop("forward")
        reference = run.model(input_ids=ids).logits
        for name, fwd in plain.items():
            run.model.get_submodule(name).forward = fwd
        assert torch.allclose(gated, reference, atol=1e-6)
        for gate in method.gates.values():
            gate.predictor[2].bias.fill_(-100.0)
        seen, handles = _rows_seen(run, method)
        run.model(input_ids=ids)
        assert seen == []
    for h in handles:
        h.remove()
    run.metrics.close()


def test_the_straight_through_gradient_reaches_the_predictor_and_the_fill_in():
    setup = _started()
    run, method = setup.run, setup.run.plugins["gumbel_tokens"]
    ids = torch.randint(0, 32, (4, 16))
    run.model.train()
    outputs = run.model(input_ids=ids)
    terms = method.loss_terms(run=run, step=1, batch={"input_ids": ids, "labels": ids}, outputs=outputs)
    torch.nn.functional.cross_entropy(outputs.logits.reshape(-1, 32), ids.reshape(-1)).backward()
    for gate in method.gates.values():
        assert float(gate.predictor[0].weight.grad.abs().sum()) > 0
        assert float(gate.fill[0].weight.grad.abs().sum()) > 0
    # the penalty alone: more skipping is wanted (current < target would push the logits down)
    for gate in method.gates.values():
        gate.zero_grad()
    method.config = method.config.model_copy(update={"target": 1.0})
    outputs = run.model(input_ids=ids)
    terms = method.loss_terms(run=run, step=1, batch={"input_ids": ids, "labels": ids}, outputs=outputs)
    terms["gumbel_tokens"].backward()
    assert all(float(g.predictor[2].bias.grad) > 0 for g in method.gates.values())  # descent lowers the bias
    run.metrics.close()


def test_flops_charged_and_credited_match_a_hand_count():
    setup = _started()
    run, method = setup.run, setup.run.plugins["gumbel_tokens"]
    seen, handles = _rows_seen(run, method)
    ids = torch.randint(0, 32, (4, 16))
    run.model.train()
    outputs = run.model(input_ids=ids)
    method.loss_terms(run=run, step=1, batch={"input_ids": ids, "labels": ids}, outputs=outputs)
    d, positions = 32, 4 * 16
    per_position = 2 * (d * 16 + 16) + 2 * 3 * (2 * 16 + 16 * 16 + 16 * 2) + 4 * d
    assert TokenGate.flops_per_position(d, 3) == per_position
    assert run.ledger.by_name[GATE_FLOPS] == 3 * 2 * positions * per_position  # 2 blocks, forward + backward
    mlp_per_token = 2 * (32 * 128) + 2 * (128 * 32)  # c_fc and c_proj, dense weights
    skipped = 2 * positions - sum(seen)
    assert run.ledger.by_name[SKIPPED_FLOPS] == -3 * skipped * mlp_per_token
    for h in handles:
        h.remove()
    run.metrics.close()


def _composed(base, base_overrides):
    registry = Registry()
    for cls in (base, GumbelTokens):
        registry.register(cls, "tests")
    cfg = tiny_run_config(base, base_overrides, steps=12, sparsity=0.8)
    cfg.method.with_.append(type(cfg.method)(name="gumbel_tokens"))
    with single_thread():
        setup = setup_run(cfg, registry)
        try:
            train(setup)
        finally:
            setup.run.metrics.close()
    return setup.run


@pytest.mark.parametrize("base, overrides", [(Static, {}), (RigL, {"delta_t": 3})])
def test_composes_with_a_weight_sparsity_method(base, overrides):
    run = _composed(base, overrides)
    density = sum(int(m.sum()) for m in run.masks.values()) / sum(m.numel() for m in run.masks.values())
    assert density == pytest.approx(0.2, abs=0.01)
    assert run.ledger.by_name[GATE_FLOPS] > 0 and run.ledger.by_name[SKIPPED_FLOPS] < 0
    method = run.plugins["gumbel_tokens"]
    # the credit priced the MLPs at their sparse densities: less than dense MLPs would have been
    assert all(cost < 2 * 2 * 32 * 128 for cost in method._mlp_cost.values())
    if base is RigL:
        assert run.ledger.by_name.get("rigl_dense_grad", 0) > 0


def test_state_loaded_before_configure_is_applied_when_configured():
    setup = _started()
    state = setup.run.plugins["gumbel_tokens"].state_dict()
    with torch.no_grad():
        state["gates"] = {k: v + 1.0 for k, v in state["gates"].items()}
    fresh = GumbelTokens()
    fresh.load_state_dict(state)
    other = tiny_setup(GumbelTokens, {}, steps=8, sparsity=0.0)
    fresh.configure(run=other.run)
    for k, v in fresh.gates.state_dict().items():
        assert torch.equal(v, state["gates"][k])
    setup.run.metrics.close()
    other.run.metrics.close()


def _checkpointed(run_dir, resume):
    from sparsebench.checkpoints import Checkpointer

    cfg = tiny_run_config(GumbelTokens, steps=16, sparsity=0.0)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"checkpoint_every": 7, "keep_checkpoints": 5})})
    registry = Registry()
    registry.register(GumbelTokens, "tests")
    run_dir.mkdir(parents=True, exist_ok=True)
    with single_thread():
        setup = setup_run(cfg, registry, run_dir)
        try:
            result = train(setup, checkpoints=Checkpointer(setup, resume=resume))
        finally:
            setup.run.metrics.close()
    return setup.run, result


def test_a_resumed_run_ends_exactly_where_the_uninterrupted_one_did(tmp_path):
    from sparsebench.checkpoints import checkpoint_name, digest_path

    reference, ref_result = _checkpointed(tmp_path / "ref", resume=False)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    ckpt = tmp_path / "ref" / checkpoint_name(7)
    shutil.copy(ckpt, resumed_dir / ckpt.name)
    shutil.copy(digest_path(ckpt), resumed_dir / digest_path(ckpt).name)
    shutil.copy(tmp_path / "ref" / "metrics.jsonl", resumed_dir / "metrics.jsonl")
    run, result = _checkpointed(resumed_dir, resume=True)
    assert result.val_loss == ref_result.val_loss
    assert run.ledger.total == reference.ledger.total
    ref_gates = reference.plugins["gumbel_tokens"].gates.state_dict()
    for k, v in run.plugins["gumbel_tokens"].gates.state_dict().items():
        assert torch.equal(v, ref_gates[k]), k


def test_a_pattern_that_matches_no_module_is_refused_with_its_name():
    with pytest.raises(Exception, match="no module of the model matches module_pattern"):
        _started(module_pattern="^nothing$")
