"""SparsAE against its specification: constant EMA β 0.999, no mask update at the last step, a
32-row stagnation micro-batch kept apart from the scoring batches; and the comparable-score option
(``candidate_adapt_steps``): reverted adaptation steps, exact restore, charged on the ledger."""

from __future__ import annotations

import pytest
import torch

from sparsebench.conformance import single_thread, start_run, tiny_setup
from sparsebench.losses import cross_entropy
from sparsebench.loop import train
from sparsebench_plugins.sparsae import MaskSearch, SparsAE
from sparsebench_plugins.sparsae.distill import DistillConfig, ema_decay
from sparsebench_plugins.sparsae.search import SearchConfig
from sparsebench_plugins.sparsae.swaps import Candidate


def _started(overrides=None, **kwargs):
    with single_thread():
        setup = tiny_setup(SparsAE, {"mask_update_every": 1000, **(overrides or {})}, **kwargs)
        start_run(setup)
    return setup


def _with_gradient(setup):
    run = setup.run
    batch = setup.sampler.next()
    cross_entropy(run.model(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
    return run


def test_the_ema_teacher_uses_the_specifications_constant_beta_by_default():
    assert DistillConfig().ema_beta == 0.999 and DistillConfig().ema_warmup is False
    assert ema_decay(0.999, 0, warmup=False) == 0.999
    assert ema_decay(0.999, 0, warmup=True) == pytest.approx(0.1)  # the ramp stays an option
    setup = _started()
    run, ema = setup.run, setup.run.plugins["ema_distill"]
    ema.on_train_start(run=run)
    name, student = next(iter(run.model.named_parameters()))
    teacher = dict(ema.teacher.named_parameters())[name]
    before = teacher.detach().clone()
    with torch.no_grad():
        student.add_(1.0)
    ema.after_optimizer_step(run=run, step=1)  # the very first update already uses β = 0.999
    expected = 0.999 * before + 0.001 * student.detach()
    assert torch.allclose(teacher, expected, atol=1e-6)
    run.metrics.close()


def test_no_mask_update_happens_at_the_last_step():
    with single_thread():
        setup = tiny_setup(SparsAE, {"mask_update_every": 4, "p_mutate": 0.02}, steps=8)
        try:
            train(setup)
        finally:
            setup.run.metrics.close()
    search = setup.run.plugins["sparsae_search"]
    assert search.updates == 1  # step 4; step 8 is the last step
    run = setup.run
    assert search.update_mask(run=run, step=run.total_steps, masks=run.masks) is None
    assert search.updates == 1


def test_the_stagnation_micro_batch_has_32_rows_kept_apart_from_the_scoring_batches():
    assert SearchConfig().stagnation_rows == 32
    setup = _started()
    search, pool = setup.run.plugins["sparsae_search"], setup.run.heldout.batches
    batch = search.stagnation_batch(pool)
    assert batch["input_ids"].shape[0] == 32
    scoring = pool[:len(pool) - search.stagnation_batches(pool)]
    assert scoring, "no batch left to score candidates"
    reserved = torch.cat([b["input_ids"] for b in pool[len(scoring):]])
    assert torch.equal(batch["input_ids"], reserved[:32])
    for b in scoring:  # no scoring row is a stagnation row
        assert not any(bool((row == batch["input_ids"]).all(-1).any()) for row in b["input_ids"])
    setup.run.metrics.close()


def _search_once(overrides):
    setup = _started(overrides)
    run = _with_gradient(setup)
    search = run.plugins["sparsae_search"]
    before = {n: p.detach().clone() for n, p in run.sparsifiable.items()}
    charged = run.ledger.by_name.get("sparsae_search", 0.0)
    search.search(run, 1000, run.masks)
    record = dict(run.metrics.pending)
    after = {n: p.detach().clone() for n, p in run.sparsifiable.items()}
    return setup, run, search, before, after, run.ledger.by_name["sparsae_search"] - charged, record


def test_adaptation_steps_are_reverted_bit_for_bit_and_charged():
    setup, run, search, before, after, charged, record = _search_once({"candidate_adapt_steps": 2})
    for name in before:  # the search returns masks; it never leaves a weight changed
        assert torch.equal(before[name].view(torch.int32), after[name].view(torch.int32)), name
    pool = run.heldout.batches
    densities = {n: float(m.float().mean()) for n, m in run.masks.items()}
    tokens = pool[0]["input_ids"].numel()
    ppl_tokens = search.stagnation_batch(pool)["input_ids"].numel()
    n = len(record["sparsae/candidates"])
    # the stagnation forward; per candidate 3 × (the scoring batch + 2 adaptation steps on a batch of
    # the scoring pool, here its only batch)
    expected = run.ledger.forward_cost(ppl_tokens, densities) + n * 3 * run.ledger.forward_cost(3 * tokens, densities)
    assert charged == pytest.approx(expected)
    run.metrics.close()


def test_adaptation_moves_only_the_candidates_active_weights_by_at_most_the_step_size():
    setup = _started({"candidate_adapt_steps": 1})
    run = _with_gradient(setup)
    search = run.plugins["sparsae_search"]
    before = {n: p.detach().clone() for n, p in run.sparsifiable.items()}
    lr = float(run.optimizer.param_groups[0]["lr"])
    search.adapt(run, run.masks, Candidate("current"), run.heldout.batches[0])
    moved = 0
    for name, p in run.sparsifiable.items():
        delta = (p.detach() - before[name]).abs()
        assert float(delta[~run.masks[name]].sum()) == 0.0  # pruned weights stay at zero
        assert float(delta.max()) <= lr * (1 + 1e-4)
        moved += int((delta > 0).sum())
    assert moved > 0
    run.metrics.close()


def test_adaptation_changes_the_incumbents_score():
    plain = _search_once({})[-1]["sparsae/candidates"][0]["ce"]
    adapted = _search_once({"candidate_adapt_steps": 3, "candidate_adapt_lr_scale": 10.0})[-1]
    assert adapted["sparsae/candidates"][0]["kind"] == "current"
    assert adapted["sparsae/candidates"][0]["ce"] != pytest.approx(plain, abs=1e-6)


def test_the_options_are_documented_and_reach_the_search_component():
    config = SparsAE.Config(candidate_adapt_steps=2, stagnation_rows=16)
    search = dict(SparsAE(config).components())[MaskSearch.name]
    assert search.config.candidate_adapt_steps == 2 and search.config.stagnation_rows == 16
