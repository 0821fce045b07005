"""Turning token arrays into batches: random training windows and fixed evaluation windows."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


def _window_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int, device: torch.device) -> Batch:
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    data = torch.from_numpy(rows)
    return {"input_ids": data[:, :-1].to(device), "labels": data[:, 1:].to(device)}


class TrainSampler:
    """Random windows of ``seq_len + 1`` tokens (nanoGPT style), drawn from ``generator``.

    The sampler's own generator makes the data order part of the run's seed and of its
    checkpoint (``state_dict``), independent of what methods draw from ``run.generator``.

    On CUDA the next batch is prepared while the device runs the current step: gathered into
    pinned host memory and copied with ``non_blocking=True`` (a copy from pageable memory would
    make the host wait for the device). The batches are the same as without prefetching; the
    checkpointed generator state is the one before the prefetched draw. On CPU nothing changes.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, device: torch.device):
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"the train split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size, self.device = tokens, seq_len, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.prefetch = torch.device(device).type == "cuda"
        self._ahead: Optional[tuple[torch.Tensor, Batch]] = None  # (generator state before the draw, batch)

    def _starts(self) -> np.ndarray:
        high = len(self.tokens) - self.seq_len - 1
        return torch.randint(0, high + 1, (self.batch_size,), generator=self.generator).numpy()

    def next(self) -> Batch:
        if not self.prefetch:
            return _window_batch(self.tokens, self._starts(), self.seq_len, self.device)
        if self._ahead is None:
            self._ahead = self._draw_ahead()
        batch = self._ahead[1]
        self._ahead = self._draw_ahead()
        return batch

    def _draw_ahead(self) -> tuple[torch.Tensor, Batch]:
        state = self.generator.get_state()
        starts = self._starts()
        rows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        data = torch.from_numpy(rows)
        if torch.device(self.device).type == "cuda":
            data = data.pin_memory()  # the caching host allocator keeps it until the copy is done
        data = data.to(self.device, non_blocking=True)
        return state, {"input_ids": data[:, :-1], "labels": data[:, 1:]}

    def state_dict(self) -> dict:
        state = self._ahead[0] if self._ahead is not None else self.generator.get_state()
        return {"generator": state}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._ahead = None


def fixed_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int, device: torch.device) -> list[Batch]:
    """Non-overlapping windows from the start of ``tokens``: the same for every run of a suite.

    Fewer batches are returned when the split is too short (at least one window is required).
    """
    n_windows = min(batch_size * n_batches, (len(tokens) - 1) // seq_len)
    if n_windows < 1:
        raise ValueError(f"a split of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
    starts = np.arange(n_windows) * seq_len
    return [
        _window_batch(tokens, starts[i : i + batch_size], seq_len, device)
        for i in range(0, n_windows, batch_size)
    ]


class HeldoutPool:
    """Pre-loaded batches from a held-out tail of the train split, for methods that score masks.

    These tokens are never trained on and are distinct from the validation batches that the
    reported perplexity uses. ``next()`` rotates through the pool.
    """

    def __init__(self, batches: list[Batch]):
        self.batches = batches
        self.position = 0

    def __len__(self) -> int:
        return len(self.batches)

    def next(self) -> Batch:
        if not self.batches:
            raise RuntimeError("the held-out pool is empty: set data.heldout_fraction > 0")
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
