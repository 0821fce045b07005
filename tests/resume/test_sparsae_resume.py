"""A SparsAE run resumed from a checkpoint ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import shutil

import pytest
import torch

from sparsebench.checkpoints import Checkpointer
from sparsebench.conformance import single_thread
from sparsebench.loop import train
from sparsebench.run_setup import setup_run
from tests.helpers import run_configs

TRAINING = {"steps": 12, "batch_size": 2, "lr": 3e-3, "warmup_steps": 0, "eval_every": 0, "eval_batches": 1,
            "log_every": 2, "device": "cpu", "heldout_batches": 3, "heldout_batch_size": 2,
            "checkpoint_every": 4, "keep_checkpoints": 3}


def _train(cfg, registry, run_dir, resume):
    run_dir.mkdir(exist_ok=True)
    setup = setup_run(cfg, registry, run_dir)
    try:
        return setup, train(setup, checkpoints=Checkpointer(setup, resume=resume, notify=lambda message: None))
    finally:
        setup.run.metrics.close()


@pytest.mark.parametrize("resume_at", [5, 8])  # inside a burn-in (K = 3, 5 steps) and between updates
def test_resumed_sparsae_run_ends_identical_to_an_uninterrupted_one(write_suite, registry, tmp_path, resume_at):
    options = {"mask_update_every": 3, "p_mutate": 0.05, "distill_warmup": 2, "lambda_": 3}
    training = {**TRAINING, "checkpoint_every": resume_at}
    cfg = run_configs(write_suite(methods=[{"sparsae": options}], training=training), registry)[0]
    with single_thread():
        full_setup, full = _train(cfg, registry, tmp_path / "full", resume=False)
        partial = tmp_path / "partial"
        partial.mkdir()  # what a kill after the checkpoint leaves: that checkpoint and the whole log
        name = f"ckpt-{resume_at:08d}.pt"
        for suffix in ("", ".sha256"):
            shutil.copy(tmp_path / "full" / (name + suffix), partial / (name + suffix))
        shutil.copy(tmp_path / "full" / "metrics.jsonl", partial / "metrics.jsonl")
        resumed_setup, resumed = _train(cfg, registry, partial, resume=True)
    assert full_setup.run.plugins["sparsae_search"].counters["mask_changes"] > 0
    assert resumed.val_loss == full.val_loss and resumed.test_loss == full.test_loss
    for key, value in full_setup.run.model.state_dict().items():
        assert torch.equal(resumed_setup.run.model.state_dict()[key], value), key
    for name, mask in full_setup.run.masks.items():
        assert torch.equal(resumed_setup.run.masks[name], mask), name
    teacher = dict(resumed_setup.run.plugins["ema_distill"].teacher.named_parameters())
    for key, value in full_setup.run.plugins["ema_distill"].teacher.named_parameters():
        assert torch.equal(teacher[key], value), key
    a, b = full_setup.run.plugins["sparsae_search"], resumed_setup.run.plugins["sparsae_search"]
    assert a.counters == b.counters and a.proxy.state_dict() == b.proxy.state_dict()
