"""The training sampler's prefetch (the CUDA path, exercised here on CPU tensors)."""

from __future__ import annotations

import numpy as np
import torch

from sparsebench.data.batches import TrainSampler


def _sampler(prefetch: bool) -> TrainSampler:
    tokens = np.arange(5_000, dtype=np.int64) % 251
    sampler = TrainSampler(tokens, seq_len=8, batch_size=3, seed=7, device=torch.device("cpu"))
    sampler.prefetch = prefetch  # on by default on CUDA only
    return sampler


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetching_yields_the_same_batches_as_drawing_on_demand():
    plain, ahead = _sampler(False), _sampler(True)
    for _ in range(5):
        assert _equal(plain.next(), ahead.next())


def test_a_checkpoint_taken_while_a_batch_is_prefetched_resumes_at_the_next_batch():
    plain, ahead = _sampler(False), _sampler(True)
    for _ in range(3):
        plain.next(), ahead.next()
    state = ahead.state_dict()  # one batch is already drawn ahead
    assert torch.equal(state["generator"], plain.state_dict()["generator"])
    resumed = _sampler(True)
    resumed.load_state_dict(state)
    for _ in range(3):
        expected = plain.next()
        assert _equal(resumed.next(), expected) and _equal(ahead.next(), expected)


def test_the_cpu_path_does_not_prefetch():
    assert not TrainSampler(np.arange(100), 8, 2, 0, torch.device("cpu")).prefetch
