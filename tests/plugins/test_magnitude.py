"""``magnitude``: one-shot pruning at ``prune_at``, masks equal to torch.nn.utils.prune's L1 pruning."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import prune

from sparsebench import hookimpl
from sparsebench.conformance import tiny_setup
from sparsebench.loop import train
from sparsebench_plugins.magnitude import Magnitude


class Probe:
    """Snapshots the weights when the step in ``at`` starts, and every mask change."""

    name = "probe"
    observer = True

    def __init__(self, at: int):
        self.at, self.weights, self.changes = at, None, []

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        if step == self.at:  # update_mask of this step sees exactly these weights
            self.weights = {n: p.detach().clone() for n, p in run.sparsifiable.items()}

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        self.changes.append(step)


def _holders(weights):
    holders = {}
    for name, w in weights.items():
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(w.clone())
        holders[name] = module
    return holders


def _trained(scope, steps=12, sparsity=0.8):
    prune_step = round(0.5 * steps)
    probe = Probe(prune_step)
    setup = tiny_setup(Magnitude, {"scope": scope}, observers=[("probe", probe)], steps=steps, sparsity=sparsity)
    train(setup)
    return setup.run, probe, prune_step


def test_global_scope_equals_torch_global_unstructured_l1_on_the_same_weights():
    run, probe, _ = _trained("global")
    holders = _holders(probe.weights)
    total = sum(w.numel() for w in probe.weights.values())
    n_prune = total - round(0.2 * total)
    prune.global_unstructured([(m, "weight") for m in holders.values()], pruning_method=prune.L1Unstructured,
                              amount=n_prune)
    for name, module in holders.items():
        assert torch.equal(run.masks[name], module.weight_mask.bool()), name
    assert sum(int(m.sum()) for m in run.masks.values()) == total - n_prune


def test_layer_scope_equals_torch_l1_unstructured_per_logical_layer():
    run, probe, _ = _trained("layer")
    layers = run.logical_layers  # GPT-2's c_attn: q, k and v pruned as three layers
    assert any(name.endswith("c_attn.weight[k]") for name in layers)
    parts = {name: layer.view(probe.weights[layer.parent]) for name, layer in layers.items()}
    for name, module in _holders(parts).items():
        n = module.weight.numel()
        prune.l1_unstructured(module, "weight", amount=n - round(0.2 * n))
        assert torch.equal(layers[name].mask(run.masks), module.weight_mask.bool()), name
        assert int(layers[name].mask(run.masks).sum()) == round(0.2 * n)


@pytest.mark.parametrize("prune_at,steps,expected", [(0.5, 12, 6), (0.25, 12, 3), (0.01, 12, 1)])
def test_prunes_once_at_prune_at_and_fine_tunes_the_rest(prune_at, steps, expected):
    probe = Probe(expected)
    setup = tiny_setup(Magnitude, {"prune_at": prune_at}, observers=[("probe", probe)], steps=steps)
    train(setup)
    run = setup.run
    assert probe.changes == [expected]
    # the pruned weights stayed at zero through the fine-tuning
    for name, p in run.sparsifiable.items():
        assert torch.all(p.detach()[~run.masks[name]] == 0)
    # dense FLOPs before the prune step, sparse from it on (the step that prunes runs sparse)
    tokens = run.tokens_per_step
    dense = run.ledger.forward_cost(tokens)
    sparse = run.ledger.forward_cost(tokens, {n: float(m.float().mean()) for n, m in run.masks.items()})
    assert run.ledger.by_name["train"] == pytest.approx(3 * ((expected - 1) * dense + (steps - expected + 1) * sparse))

