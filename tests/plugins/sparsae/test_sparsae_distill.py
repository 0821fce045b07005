"""EMA-teacher self-distillation: the EMA formula, the KL direction, α's schedule, FLOPs, composition."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsebench.summary import build_summary
from sparsebench_plugins.sparsae.distill import DistillConfig, EmaDistill, alpha_at, ema_decay, kl_student_teacher
from tests.helpers import run_configs, train_config

TRAINING = {"steps": 6, "batch_size": 2, "lr": 3e-3, "warmup_steps": 0, "eval_every": 0, "eval_batches": 1,
            "log_every": 1, "device": "cpu", "heldout_batches": 2, "heldout_batch_size": 2}


def test_kl_is_student_to_teacher_as_computed_by_hand():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]]])

    def softmax(row):
        z = [math.exp(v) for v in row]
        return [v / sum(z) for v in z]

    expected = 0.0
    for s_row, t_row in zip(student[0].tolist(), teacher[0].tolist()):
        ps, pt = softmax(s_row), softmax(t_row)
        expected += sum(a * (math.log(a) - math.log(b)) for a, b in zip(ps, pt))
    expected /= 2
    reverse = float(kl_student_teacher(teacher, student))
    assert float(kl_student_teacher(student, teacher)) == pytest.approx(expected, rel=1e-6)
    assert abs(reverse - expected) > 1e-3  # the direction matters on these numbers


def test_alpha_is_off_during_warmup_then_cosine_from_alpha0_to_alphaf_over_70_percent_then_flat():
    cfg = DistillConfig(distill_warmup=0.1, alpha_0=0.5, alpha_f=0.1, distill_anneal_fraction=0.7)
    assert [alpha_at(s, 100, cfg) for s in (1, 10)] == [0.0, 0.0]
    assert alpha_at(11, 100, cfg) == pytest.approx(0.1 + 0.2 * (1 + math.cos(math.pi / 70)))
    assert alpha_at(45, 100, cfg) == pytest.approx(0.3)  # t = T/2
    assert alpha_at(80, 100, cfg) == pytest.approx(0.1)
    assert alpha_at(100, 100, cfg) == pytest.approx(0.1)
    assert alpha_at(3, 100, DistillConfig(distill_warmup=3)) == 0.0  # a value ≥ 1 counts steps
    assert alpha_at(4, 100, DistillConfig(distill_warmup=3)) > 0.49


def test_ema_decay_is_beta_or_the_warmed_up_decay():
    assert ema_decay(0.999, 0, warmup=False) == 0.999
    assert ema_decay(0.999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay(0.999, 90, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6, warmup=True) == 0.999


def _suite(write_suite, methods):
    return write_suite(methods=methods, training=TRAINING)


def test_teacher_follows_beta_times_teacher_plus_one_minus_beta_times_masked_weights(write_suite, registry):
    path = _suite(write_suite, [{"static": {"with": [{"ema_distill": {"ema_warmup": False, "ema_beta": 0.9}}]}}])
    cfg = run_configs(path, registry)[0]
    setup, _ = train_config(cfg, registry)
    run, ema = setup.run, setup.run.plugins["ema_distill"]
    teacher = {n: p.detach().clone() for n, p in ema.teacher.named_parameters()}
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.5)
        for name, p in run.sparsifiable.items():
            p.mul_(run.masks[name])
    ema.after_optimizer_step(run=run, step=7)
    for name, p in run.model.named_parameters():
        expected = 0.9 * teacher[name] + 0.1 * p.detach()
        assert torch.allclose(dict(ema.teacher.named_parameters())[name], expected, atol=1e-6), name
    # pruned positions of a sparse weight: the teacher keeps 0.9 × its old value there
    name = next(iter(run.sparsifiable))
    t = dict(ema.teacher.named_parameters())[name]
    assert torch.allclose(t[~run.masks[name]], 0.9 * teacher[name][~run.masks[name]], atol=1e-7)


def test_distill_term_is_alpha_times_kl_and_the_teacher_forward_is_charged(write_suite, registry, tmp_path):
    path = _suite(write_suite, [{"static": {"with": [{"ema_distill": {"distill_warmup": 2}}]}}])
    cfg = run_configs(path, registry)[0]
    setup, result = train_config(cfg, registry, out_dir=tmp_path)
    run, ema = setup.run, setup.run.plugins["ema_distill"]
    tokens = TRAINING["batch_size"] * cfg.data.seq_len
    # steps 3..6; the teacher is zero outside the (static) mask, so it is priced at the mask's density
    densities = {n: run.density(n) for n in run.masks}
    assert run.ledger.by_name["ema_teacher"] == pytest.approx(4 * run.ledger.forward_cost(tokens, densities))
    batch = setup.sampler.next()
    outputs = run.model(input_ids=batch["input_ids"])
    terms = ema.loss_terms(run=run, step=6, batch=batch, outputs=outputs)
    with torch.no_grad():
        teacher_logits = ema.teacher(input_ids=batch["input_ids"]).logits
    expected = alpha_at(6, 6, ema.config) * kl_student_teacher(outputs.logits, teacher_logits)
    assert torch.allclose(terms["distill"], expected)
    assert terms["distill"].requires_grad  # the gradient reaches the student
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/distill" in r] == [3, 4, 5, 6]
    assert [r["distill/alpha"] for r in records if "distill/alpha" in r][:2] == [0.0, 0.0]
    summary = build_summary(setup, result)
    assert summary["ema_memory_bytes"] == ema.memory_bytes > 0
    assert summary["label"] == "static+ema_distill"


def test_teacher_starts_as_the_masked_initial_model(write_suite, registry):
    path = _suite(write_suite, [{"static": {"with": ["ema_distill"]}}])
    cfg = run_configs(path, registry)[0].model_copy()
    cfg.training = cfg.training.model_copy(update={"steps": 1})
    setup, _ = train_config(cfg, registry)
    ema: EmaDistill = setup.run.plugins["ema_distill"]
    name = next(iter(setup.run.sparsifiable))
    # after one EMA update with the warm-up decay 0.1, pruned positions are still exactly 0
    assert bool((dict(ema.teacher.named_parameters())[name][~setup.run.masks[name]] == 0).all())


def test_teacher_support_is_the_union_of_every_mask_and_prices_its_forward(write_suite, registry):
    path = _suite(write_suite, [{"static": {"with": ["ema_distill"]}}])
    setup, _ = train_config(run_configs(path, registry)[0], registry)
    run, ema = setup.run, setup.run.plugins["ema_distill"]
    name = next(iter(run.masks))
    old = run.masks[name]
    new = old.clone().view(-1)
    off, on = torch.nonzero(new)[:7].view(-1), torch.nonzero(~new)[:7].view(-1)
    new[off], new[on] = False, True
    ema.on_mask_change(run=run, step=7, old={name: old}, new={name: new.view_as(old)})
    assert torch.equal(ema.support[name], old | new.view_as(old))
    assert ema.support_density[name] == pytest.approx((int(old.sum()) + 7) / old.numel())
    # every teacher weight outside its support is exactly zero
    teacher = dict(ema.teacher.named_parameters())
    for n, support in ema.support.items():
        assert bool((teacher[n][~support] == 0).all())


def test_teacher_flops_dense_prices_every_teacher_forward_densely(write_suite, registry):
    path = _suite(write_suite, [{"static": {"with": [{"ema_distill": {"distill_warmup": 2, "teacher_flops": "dense"}}]}}])
    cfg = run_configs(path, registry)[0]
    setup, _ = train_config(cfg, registry)
    tokens = TRAINING["batch_size"] * cfg.data.seq_len
    assert setup.run.ledger.by_name["ema_teacher"] == pytest.approx(4 * setup.run.ledger.forward_cost(tokens))
