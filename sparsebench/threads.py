"""How many intra-op threads torch uses for a run (``training.threads: auto | <int>``).

Why not torch's default (one thread per physical core): on a shared machine the cores are not
free. An intra-op parallel region ends at a barrier, so one descheduled thread stalls the whole
operation; with a tiny model every matmul is only microseconds of work, the region's start and
barrier cost as much as the work itself, and on a busy 2-core machine the smoke suite ran 10–50×
slower with two threads than with one.

The ``auto`` rule (:func:`choose_threads`, a pure function):

1. ``OMP_NUM_THREADS`` set in the environment is the user's explicit choice: use it.
2. A model under :data:`TINY_PARAMS` parameters gets one thread: its operations are too small to
   split (a 10M-parameter GPT's largest matmul is ~1 MFLOP per token row) and a single thread
   never waits for a descheduled sibling.
3. Otherwise the cores this process may run on (``os.sched_getaffinity``) minus the ones other
   processes keep busy (the 1-minute load average, rounded down), at least one:
   ``min(affinity, max(1, affinity - floor(load)))``.

An integer ``training.threads`` overrides all of this (and ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

#: Models smaller than this train on one intra-op thread under ``auto``.
TINY_PARAMS = 10_000_000


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count of a run and why it was chosen (printed in the run header)."""

    threads: int
    reason: str

    def describe(self) -> str:
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''} ({self.reason})"


def _env_threads(env: Optional[str]) -> Optional[int]:
    """The thread count an ``OMP_NUM_THREADS`` value asks for (``"4"``, or ``"4,2"`` for nested levels)."""
    if not env:
        return None
    try:
        value = int(env.split(",")[0].strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def choose_threads(
    setting: Union[str, int], n_params: int, affinity: int, load: float, env: Optional[str] = None
) -> ThreadChoice:
    """The intra-op thread count for ``training.threads = setting`` (see the module docstring).

    ``affinity``: cores this process may run on; ``load``: the 1-minute load average;
    ``env``: the ``OMP_NUM_THREADS`` environment variable (``None`` when unset).
    """
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 1:
            raise ValueError(f"training.threads: {setting} is not a positive integer. Allowed: auto or an integer >= 1")
        return ThreadChoice(setting, "training.threads")
    if setting != "auto":
        raise ValueError(f"training.threads: unknown value '{setting}'. Allowed: auto or an integer >= 1")
    from_env = _env_threads(env)
    if from_env is not None:
        return ThreadChoice(from_env, "OMP_NUM_THREADS")
    affinity = max(1, int(affinity))
    if n_params < TINY_PARAMS:
        return ThreadChoice(1, f"auto: {n_params / 1e6:.2g}M parameters < {TINY_PARAMS // 1_000_000}M")
    busy = max(0, math.floor(load))
    threads = min(affinity, max(1, affinity - busy))
    return ThreadChoice(threads, f"auto: {affinity} cores, load {load:.1f}")


def free_cores() -> tuple[int, float]:
    """This process's usable cores (affinity mask) and the 1-minute load average of the machine."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        affinity = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return affinity, load


def set_threads(setting: Union[str, int], n_params: int) -> ThreadChoice:
    """Choose the run's thread count from this machine's state and give it to torch."""
    affinity, load = free_cores()
    choice = choose_threads(setting, n_params, affinity, load, os.environ.get("OMP_NUM_THREADS"))
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
