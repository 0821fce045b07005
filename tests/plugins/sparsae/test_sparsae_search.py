"""SparsAE's mask search on a tiny run: exact restore, Grad term, rejection, resets, stagnation, logs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsebench import hookimpl
from sparsebench.errors import HookError
from sparsebench.losses import cross_entropy
from sparsebench.methods import Method
from sparsebench.run_setup import setup_run
from sparsebench.summary import build_summary
from sparsebench_plugins.sparsae.search import layer_counts
from tests.helpers import registry_with, run_configs, train_config

TRAINING = {"steps": 2, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "eval_every": 0, "eval_batches": 1,
            "log_every": 2, "device": "cpu", "heldout_batches": 4, "heldout_batch_size": 4}


def _config(write_suite, registry, steps=2, **options):
    options = {"mask_update_every": 1000, **options}
    path = write_suite(methods=[{"sparsae": options}], training={**TRAINING, "steps": steps})
    return run_configs(path, registry)[0]


def _ready(write_suite, registry, **options):
    """A run after a few training steps, with a fresh training gradient in every ``p.grad``."""
    setup, _ = train_config(_config(write_suite, registry, **options), registry)
    run = setup.run
    batch = setup.sampler.next()
    cross_entropy(run.model(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
    return setup, run, run.plugins["sparsae_search"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int32) if t.dtype == torch.float32 else t.detach().clone()


def _snapshot(run) -> dict:
    snap = {f"param:{n}": _bits(p) for n, p in run.model.named_parameters()}
    snap.update({f"grad:{n}": _bits(p.grad) for n, p in run.model.named_parameters() if p.grad is not None})
    snap.update({f"mask:{n}": m.clone() for n, m in run.masks.items()})
    for i, (p, state) in enumerate(run.optimizer.state.items()):
        snap.update({f"opt{i}:{k}": _bits(v) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return snap


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def test_evaluating_candidates_leaves_model_gradients_masks_and_optimizer_bit_identical(write_suite, registry):
    setup, run, search = _ready(write_suite, registry, lambda_=5, p_global_reset=0.5)
    before = _snapshot(run)
    counts = layer_counts(run, run.masks)
    candidates = search.draw_candidates(run, run.masks, counts, p_reset=0.5)
    assert {c.kind for c in candidates} >= {"current", "mutant"} and len(candidates) == 6
    batch = run.heldout.batches[0]
    for cand in candidates:
        search.evaluate(run, run.masks, counts, cand, batch)
    _assert_same(before, _snapshot(run))
    # a whole search step (with its held-out check) also leaves everything as it was
    search.search(run, 1000, run.masks)
    _assert_same(before, _snapshot(run))
    assert run.model.training


def test_candidate_memory_is_swap_lists_not_copies_of_masks_or_weights(write_suite, registry):
    setup, run, search = _ready(write_suite, registry, lambda_=5)
    counts = layer_counts(run, run.masks)
    candidates = search.draw_candidates(run, run.masks, counts, p_reset=0.0)
    n_swaps = round(0.005 * sum(counts.values()))
    for cand in candidates[1:]:
        assert cand.n_swaps == n_swaps
        # int64 off + int64 on + float32 init per swap
        assert cand.nbytes == n_swaps * (8 + 8 + 4)


def test_candidate_grad_term_is_the_masked_gradient_norm_over_sqrt_active(write_suite, registry):
    setup, run, search = _ready(write_suite, registry, lambda_=1)
    counts = layer_counts(run, run.masks)
    mutant = search.draw_candidates(run, run.masks, counts, p_reset=0.0)[1]
    batch = run.heldout.batches[0]
    result = search.evaluate(run, run.masks, counts, mutant, batch)
    # independent computation: build M' and W ⊙ M' explicitly, differentiate through the product
    new_masks = {**run.masks, **mutant.new_masks(run.masks)}
    import copy

    model = copy.deepcopy(run.model).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, s in mutant.layers.items():
            params[name].view(-1)[s.on] = s.init
    originals = {n: params[n].detach().clone().requires_grad_(True) for n in run.sparsifiable}
    for name in run.sparsifiable:
        module_name, attr = name.rsplit(".", 1)
        delattr(model.get_submodule(module_name), attr)
        setattr(model.get_submodule(module_name), attr, originals[name] * new_masks[name])
    loss = cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    grads = dict(zip(originals, torch.autograd.grad(loss, list(originals.values()))))
    parts = run.logical_layers  # per logical layer: c_attn's q, k and v are three terms
    terms = [float(p.view(grads[p.parent]).norm()) / math.sqrt(int(p.mask(new_masks).sum())) for p in parts.values()]
    assert len(terms) == len(run.sparsifiable) + 2 * 2  # the kit's GPT-2 has two c_attn
    assert result["raw"]["ce"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert result["raw"]["grad"] == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    assert result["layer_sparsity"] == pytest.approx(
        {n: 1 - float(p.mask(new_masks).float().mean()) for n, p in parts.items()})


def test_the_grad_term_goes_through_the_gradient_activity_kernel_on_the_runs_backend(write_suite, registry, monkeypatch):
    import sparsebench_plugins.sparsae.search as search_module

    setup, run, search = _ready(write_suite, registry, lambda_=1)
    assert run.kernels == setup.kernels == "torch"  # training.kernels: auto on a CPU
    calls = []
    real = search_module.gradient_activity
    monkeypatch.setattr(search_module, "gradient_activity",
                        lambda g, m, swaps, backend: calls.append(backend) or real(g, m, swaps, backend=backend))
    counts = layer_counts(run, run.masks)
    mutant = search.draw_candidates(run, run.masks, counts, p_reset=0.0)[1]
    search.evaluate(run, run.masks, counts, mutant, run.heldout.batches[0])
    assert calls == ["torch"] * len(run.logical_layers)  # one call per logical layer


def _poison_first_mutant(search):
    draw = search.draw_candidates

    def poisoned(run, masks, counts, p_reset):
        candidates = draw(run, masks, counts, p_reset)
        for s in candidates[1].layers.values():
            s.init.fill_(float("nan"))
        return candidates

    search.draw_candidates = poisoned


def test_candidates_with_nonfinite_loss_are_rejected_and_logged(write_suite, registry):
    setup, run, search = _ready(write_suite, registry, lambda_=2, candidate_init="regrow")
    _poison_first_mutant(search)
    before = _snapshot(run)
    change = search.search(run, 1000, run.masks)
    record = run.metrics.pending
    rows = record["sparsae/candidates"]
    assert rows[1]["valid"] is False and rows[1]["reject"] == "non-finite loss" and "proxy" not in rows[1]
    assert rows[0]["valid"] and rows[2]["valid"]
    assert record["sparsae/winner"] in (0, 2)
    assert search.counters["rejected_nonfinite"] == 1
    _assert_same(before, _snapshot(run))  # the NaN weights were reverted too
    if change:
        assert not any(bool(torch.isnan(run.sparsifiable[n]).any()) for n in change)


def test_global_reset_mutants_reshuffle_reset_fraction_of_the_active_connections(write_suite, registry):
    setup, run, search = _ready(write_suite, registry, lambda_=3, p_global_reset=1.0, reset_fraction=0.08)
    search.search(run, 1000, run.masks)
    rows = run.metrics.pending["sparsae/candidates"]
    total = sum(int(m.sum()) for m in run.masks.values())
    assert [r["kind"] for r in rows] == ["current", "reset", "reset", "reset"]
    assert all(r["swaps"] == round(0.08 * total) for r in rows[1:])
    assert run.metrics.pending["sparsae/reset"]["mutants"] == 3


def test_no_reset_mutants_when_global_reset_is_off_even_when_boosted(write_suite, registry):
    setup, run, search = _ready(write_suite, registry, lambda_=3, global_reset=False, p_global_reset=1.0,
                                stagnation_patience=1)
    for _ in range(3):
        search.search(run, 1000, run.masks)
        assert run.metrics.pending["sparsae/reset"]["p"] == 0.0
        assert {r["kind"] for r in run.metrics.pending["sparsae/candidates"]} == {"current", "mutant"}


def test_stagnation_raises_the_reset_probability_for_exactly_two_updates(write_suite, registry):
    setup, run, search = _ready(write_suite, registry, lambda_=1)
    ppls = iter([10.0] + [11.0] * 9)
    search.heldout_ppl = lambda run, batch: next(ppls)
    seen = []
    for _ in range(10):
        search.search(run, 1000, run.masks)
        reset = run.metrics.pending["sparsae/reset"]
        seen.append((reset["p"], reset["trigger"]))
    assert seen == [(0.01, None)] * 5 + [(0.1, "stagnation")] * 2 + [(0.01, None)] * 3


def test_search_charges_each_candidate_forward_and_backward_on_the_ledger(write_suite, registry):
    setup, run, search = _ready(write_suite, registry, lambda_=3)
    before = run.ledger.by_name.get("sparsae_search", 0.0)
    search.search(run, 1000, run.masks)
    densities = {n: run.density(n) for n in run.masks}
    tokens = run.heldout.batches[0]["input_ids"].numel()
    ppl_tokens = search.stagnation_batch(run.heldout.batches)["input_ids"].numel()
    expected = run.ledger.forward_cost(ppl_tokens, densities) + run.ledger.forward_cost(tokens, densities) * 4 * 3
    # the stagnation check's forward + 4 candidates × (fwd + bwd)
    assert run.ledger.by_name["sparsae_search"] - before == pytest.approx(expected)


def test_first_update_normalises_by_the_candidates_spread_then_by_the_selected_history(write_suite, registry):
    setup, run, search = _ready(write_suite, registry, lambda_=3)
    search.search(run, 1000, run.masks)
    first = run.metrics.pending
    valid = [r for r in first["sparsae/candidates"] if r["valid"]]
    ces = [r["ce"] for r in valid]
    mu = sum(ces) / len(ces)
    assert first["sparsae/norm"]["ce"]["mu"] == pytest.approx(mu)
    winner = first["sparsae/candidates"][first["sparsae/winner"]]
    assert winner["proxy"] == min(r["proxy"] for r in valid)
    assert search.proxy.norms["ce"].mu == pytest.approx(mu + 0.01 * (winner["ce"] - mu))


class EvaluatedModelProbe(Method):
    """After each SparsAE mask change, recomputes the winner's loss on its search batch."""

    name = "evaluated_model_probe"

    def __init__(self, config=None):
        super().__init__(config)
        self.pairs = []

    @hookimpl(trylast=True)
    def on_mask_change(self, run, step, old, new):
        search = run.plugins["sparsae_search"]
        pool = run.heldout.batches
        search_pool = pool[:len(pool) - search.stagnation_batches(pool)]
        batch = search_pool[(search.batch_position - 1) % len(search_pool)]
        logged = run.metrics.pending["sparsae/candidates"][run.metrics.pending["sparsae/winner"]]["ce"]
        run.model.eval()
        with torch.no_grad():
            ce = float(cross_entropy(run.model(input_ids=batch["input_ids"]).logits, batch["labels"]))
        run.model.train()
        self.pairs.append((logged, ce))


def test_training_continues_from_exactly_the_model_the_winner_was_scored_as(write_suite):
    registry = registry_with(EvaluatedModelProbe)
    cfg = _config(write_suite, registry, steps=12, mask_update_every=3, lambda_=3, p_mutate=0.02)
    cfg.method.with_.append(type(cfg.method)(name="evaluated_model_probe"))
    setup, _ = train_config(cfg, registry)
    pairs = setup.run.plugins["evaluated_model_probe"].pairs
    assert pairs, "no mask change happened"
    for logged, recomputed in pairs:
        assert recomputed == pytest.approx(logged, rel=1e-5)


def test_sparsae_run_keeps_the_global_count_and_logs_every_update(write_suite, registry, tmp_path):
    cfg = _config(write_suite, registry, steps=12, mask_update_every=3, lambda_=3, p_mutate=0.02, distill_warmup=2)
    setup, result = train_config(cfg, registry, out_dir=tmp_path)
    run = setup.run
    assert sum(int(m.sum()) for m in run.masks.values()) == sum(int(m.sum()) for m in result.initial_masks.values())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "sparsae/update" in r]
    assert [r["step"] for r in updates] == [3, 6, 9]  # none at the last step (12), as for RigL and SET
    for r in updates:
        assert len(r["sparsae/candidates"]) == 4
        assert {"ce", "div", "grad", "n_ce", "n_div", "n_grad", "proxy"} <= set(r["sparsae/candidates"][0])
        assert set(r["sparsae/norm"]) == {"ce", "div", "grad"} and "sigma" in r["sparsae/norm"]["div"]
        assert set(r["sparsae/layer_sparsity"]) == set(run.logical_layers) == set(r["sparsae/layer_grad"])
        assert {"winner", "swaps", "reset", "bound_changes", "search_s", "heldout_ppl"} <= {
            k.split("/", 1)[1] for k in r if k.startswith("sparsae/")}
        assert r["sparsae/swaps"] == (0 if r["sparsae/winner"] == 0 else round(0.02 * sum(
            int(m.sum()) for m in result.initial_masks.values())))
    assert any("loss/distill" in r for r in records)
    summary = build_summary(setup, result)
    assert 0 < summary["sparsae_search_time_frac"] < 1
    assert summary["sparsae_updates"] == 3
    assert summary["ema_memory_bytes"] == sum(p.numel() * 4 for p in run.model.parameters()) + sum(
        b.numel() * b.element_size() for b in run.model.buffers())
    assert summary["flops_by_name"]["sparsae_search"] > 0 and summary["flops_by_name"]["ema_teacher"] > 0
    assert summary["sparsae_mask_changes"] == sum(r["sparsae/winner"] != 0 for r in updates)
    # the spec's diagnostics: running μ, σ before and after the update, the choice, the acceptance rate
    for r in updates:
        assert r["sparsae/accepted"] == (r["sparsae/winner"] != 0)
        for key in ("sparsae/norm", "sparsae/norm_updated"):
            assert all({"mu", "sigma"} == set(v) for v in r[key].values())
        assert r["sparsae/heldout_rows"] == 12  # 3 of the 4 held-out batches of 4 rows; one left for scoring
    assert summary["sparsae_accept_rate"] == pytest.approx(summary["sparsae_mask_changes"] / 3)


def test_components_can_be_switched_off(write_suite, registry):
    cfg = _config(write_suite, registry, burn_in_steps=0, distill=False, kaiming_init=False)
    setup = setup_run(cfg, registry)
    setup.run.metrics.close()
    assert set(setup.run.plugins) == {"sparsae", "sparsae_search"}
    cfg = _config(write_suite, registry)
    setup = setup_run(cfg, registry)
    setup.run.metrics.close()
    assert set(setup.run.plugins) == {"sparsae", "sparsae_search", "kaiming_regrow", "burn_in", "ema_distill"}


def test_target_sparsity_outside_the_layer_bounds_is_a_one_line_error(write_suite, registry):
    path = write_suite(methods=[{"sparsae": {"max_layer_sparsity": 0.7}}], training=TRAINING)
    cfg = run_configs(path, registry)[0]
    with pytest.raises(HookError, match=r"sparsity 0.8 is outside \[min_layer_sparsity, max_layer_sparsity\]"):
        train_config(cfg, registry)
