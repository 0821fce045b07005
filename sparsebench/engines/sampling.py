"""The training batches of one rank: its rows of the global micro-batch."""

from __future__ import annotations

from typing import Any

import torch

from sparsebench.engines.collectives import DistributedError


class RankSlice:
    """This rank's rows of the global micro-batch drawn by the run's :class:`TrainSampler`.

    Every rank draws the same global batch from the shared generator and keeps rows
    ``[rank·b, (rank+1)·b)``; the sampler's state (and so a checkpoint) is the same on every rank.
    """

    def __init__(self, sampler: Any, rank_: int, world: int):
        if sampler.batch_size % world:
            raise DistributedError(f"the global micro-batch of {sampler.batch_size} rows does not divide by {world} ranks")
        self.sampler, self.rank, self.world = sampler, rank_, world
        self.rows = sampler.batch_size // world

    def next(self) -> dict[str, torch.Tensor]:
        batch = self.sampler.next()
        lo = self.rank * self.rows
        return {k: v[lo : lo + self.rows] for k, v in batch.items()}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
