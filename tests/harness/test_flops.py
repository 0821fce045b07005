"""Analytic FLOPs against torch's FlopCounterMode, density scaling, and the training ledger."""

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsebench.flops import FlopsLedger, forward_flops
from sparsebench.masks import sparsifiable_layers
from sparsebench.models import build_model

VOCAB, SEQ, BATCH = 64, 16, 2
SPECS = {
    "gpt2": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32},
    # grouped-query attention: 4 query heads share 2 key/value heads
    "llama": {"family": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
              "num_attention_heads": 4, "num_key_value_heads": 2},
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def eager_model(request):
    # FlopCounterMode sees no matmul inside CPU SDPA, so compare on eager attention.
    torch.manual_seed(0)
    return build_model(SPECS[request.param], VOCAB, SEQ, attn_implementation="eager")


def counted_flops(model):
    """FlopCounterMode totals of one forward and of its backward, measured separately."""
    x = torch.randint(0, VOCAB, (BATCH, SEQ))
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fwd:
        loss = model(x, labels=x).loss
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def test_dense_forward_flops_equal_flop_counter_mode(eager_model):
    counted, _ = counted_flops(eager_model)
    analytic = forward_flops(eager_model, SEQ, batch_size=BATCH)
    assert analytic.total == counted  # exact: same matmuls, bias adds/norms/softmax in neither
    assert analytic.dense_total == analytic.total


def test_training_step_is_three_forwards_as_flop_counter_mode_counts_it(eager_model):
    # Every matmul's backward is two matmuls of its size (input gradient + weight gradient), the
    # LM head and the attention products included; the embedding backward is a scatter-add, which
    # FlopCounterMode counts as 0 just as the forward lookup. With every parameter trainable, the
    # first block's input gradient is also needed (it flows into the embeddings), so the identity
    # backward = 2 × forward is exact.
    fwd, bwd = counted_flops(eager_model)
    analytic = forward_flops(eager_model, SEQ, batch_size=BATCH).total
    assert bwd == 2 * fwd
    assert fwd + bwd == 3 * analytic


def test_attention_products_are_counted_once_per_layer_in_full(eager_model):
    per_layer = forward_flops(eager_model, SEQ).per_layer
    attention = {k: v for k, v in per_layer.items() if k.endswith(".attention")}
    assert len(attention) == 2
    d_model = 32
    # Q·Kᵀ and P·V over all query heads: 2·T²·d_model each, causal masking ignored
    assert set(attention.values()) == {2 * 2 * SEQ * SEQ * d_model}


def test_a_layer_at_density_point_one_costs_a_tenth(eager_model):
    name = next(iter(sparsifiable_layers(eager_model)))
    dense = forward_flops(eager_model, SEQ, batch_size=BATCH)
    sparse = forward_flops(eager_model, SEQ, {name: 0.1}, batch_size=BATCH)
    assert sparse.per_layer[name] == pytest.approx(0.1 * dense.per_layer[name])
    assert dense.total - sparse.total == pytest.approx(0.9 * dense.per_layer[name])
    assert sparse.dense_total == dense.total


def test_tied_lm_head_stays_dense_when_the_embedding_is_sparse():
    model = build_model(SPECS["gpt2"], VOCAB, SEQ)
    dense = forward_flops(model, SEQ)
    sparse = forward_flops(model, SEQ, {"transformer.wte.weight": 0.1})
    assert sparse.total == dense.total and sparse.per_layer["lm_head.weight"] == 2 * 32 * VOCAB * SEQ


def test_flops_scale_with_batch_size(eager_model):
    one = forward_flops(eager_model, SEQ, batch_size=1).total
    assert forward_flops(eager_model, SEQ, batch_size=3).total == 3 * one


@pytest.fixture
def ledger_and_densities(eager_model):
    names = list(sparsifiable_layers(eager_model))
    densities = {n: 0.1 + 0.8 * i / len(names) for i, n in enumerate(names)}
    return eager_model, FlopsLedger(eager_model, SEQ, names), densities


def test_ledger_total_is_steps_times_three_forwards(ledger_and_densities):
    model, ledger, densities = ledger_and_densities
    steps, tokens = 7, BATCH * SEQ
    for _ in range(steps):
        ledger.add_step(tokens, densities)
    forward = forward_flops(model, SEQ, densities, batch_size=BATCH).total
    dense = forward_flops(model, SEQ, batch_size=BATCH).total
    assert ledger.total == pytest.approx(steps * 3 * forward, rel=1e-12)
    assert ledger.dense_total == pytest.approx(steps * 3 * dense, rel=1e-12)
    assert ledger.dense_step_flops(tokens) == pytest.approx(3 * dense, rel=1e-12)
    assert ledger.forward_cost(tokens, densities) == pytest.approx(forward, rel=1e-12)
    assert (ledger.steps, ledger.tokens) == (steps, steps * tokens)


def test_ledger_charges_add_up_under_their_names(ledger_and_densities):
    _, ledger, densities = ledger_and_densities
    ledger.add_step(32, densities)
    ledger.charge("rigl_dense_grad", 100.0)
    ledger.charge("teacher", 5.0)
    ledger.charge("rigl_dense_grad", 50.0)
    assert ledger.by_name["rigl_dense_grad"] == 150.0 and ledger.by_name["teacher"] == 5.0
    assert ledger.total == pytest.approx(ledger.by_name["train"] + 155.0)
    assert ledger.dense_total == ledger.dense_step_flops(32)  # charges are not part of the dense baseline
    with pytest.raises(ValueError, match="reserved"):
        ledger.charge("train", 1.0)


def test_ledger_state_round_trips(ledger_and_densities):
    model, ledger, densities = ledger_and_densities
    ledger.add_step(32, densities)
    ledger.charge("teacher", 7.0)
    resumed = FlopsLedger(model, SEQ, list(densities))
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.state_dict() == ledger.state_dict() and resumed.total == ledger.total


def test_ledger_step_costs_microseconds(ledger_and_densities):
    _, ledger, densities = ledger_and_densities
    ledger.add_step(32, densities)  # fills the cache
    start = time.perf_counter()
    for _ in range(1000):
        ledger.add_step(32, densities)
    assert (time.perf_counter() - start) / 1000 < 200e-6
