"""Collectives: the process group and the few messages ranks exchange, identities in one process.

Every function here works without a process group (one process): ranks are ``0`` of ``1``,
reductions return their input, barriers return at once. CPU ranks talk through gloo, GPU ranks
through NCCL. DeepSpeed is imported only to join a group (its launcher's environment).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from sparsebench.errors import SparsebenchError


class DistributedError(SparsebenchError):
    """A ``distributed:`` setting that cannot work (bad DeepSpeed config, missing package)."""


def launched() -> bool:
    """True inside a process started by a distributed launcher (``deepspeed``, ``torchrun``)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    """Whether this process writes results (always true without a process group)."""
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(ranks: int, args: list[str], module: str = "sparsebench") -> list[str]:
    """``deepspeed --num_gpus N --module sparsebench ARGS``: what ``sparsebench run --gpus N`` runs.

    The launcher starts one process per GPU (per CPU rank where there is no GPU) with
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set; a free local port keeps two launches apart.
    """
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    if not Path(launcher).is_file():
        raise DistributedError("--gpus needs the DeepSpeed launcher: pip install 'sparsebench[deepspeed]'")
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(_free_port()), "--module", module, *args]


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise DistributedError(
            "distributed.backend is 'deepspeed' but DeepSpeed is not installed: pip install 'sparsebench[deepspeed]'"
        ) from None
    return deepspeed


def init_distributed(timeout_s: float = 1800.0) -> None:
    """Join the process group the launcher describes (idempotent).

    Without a launcher a one-process group is made on a free local port, so that a
    ``backend: deepspeed`` run also works as a plain ``sparsebench run``. CPU ranks talk through
    gloo, GPU ranks through NCCL (each on the GPU of its ``LOCAL_RANK``).
    """
    if is_initialized():
        return
    deepspeed = import_deepspeed()
    if not launched():  # DeepSpeed's engine reads these from the environment, later too
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # torch.device("cuda") is this rank's GPU
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    """Tear the group down before the interpreter exits.

    Left to exit, a rank sometimes aborted after finishing its work ("terminate called without
    an active exception", exit -6): the process group's C++ threads were still running while
    static destructors ran.
    """
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block before the others (e.g. tokenising into a shared cache)."""
    if not is_rank0():
        barrier()
    yield
    if is_rank0():
        barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small decisions, not for tensors)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_masks(
    change: Optional[Mapping[str, torch.Tensor]], device: torch.device
) -> tuple[Optional[dict[str, torch.Tensor]], int]:
    """Rank 0's mask change on every rank, and how many positions any rank decided differently.

    The names, shapes and dtypes travel first (so a malformed change is refused by the same
    validation on every rank: a value that is not a tensor arrives as ``None``), then each mask
    as bytes.
    """
    if not is_initialized() or world_size() == 1:
        return (dict(change) if change else None), 0
    meta = {
        n: (tuple(m.shape), str(m.dtype)) if isinstance(m, torch.Tensor) else None for n, m in change.items()
    } if change else None
    meta = broadcast_object(meta)
    if not meta:
        disagreement = _count_disagreement(change, None, device)
        return None, disagreement
    out: dict[str, Any] = {}
    for name, spec in meta.items():
        if spec is None:
            out[name] = None
            continue
        shape, dtype = spec
        is_bool = dtype == str(torch.bool)
        if is_rank0():
            buf = change[name].to(device)
            buf = buf.to(torch.uint8) if is_bool else buf.contiguous()
        else:
            buf = torch.empty(shape, dtype=torch.uint8 if is_bool else getattr(torch, dtype.split(".")[-1]), device=device)
        dist.broadcast(buf, src=0)
        out[name] = buf.bool() if is_bool else buf
    return out, _count_disagreement(change, out, device)


def _count_disagreement(mine: Optional[Mapping], agreed: Optional[Mapping], device: torch.device) -> int:
    """Positions where this rank's own decision differs from rank 0's, summed over ranks."""
    mine, agreed = dict(mine or {}), dict(agreed or {})
    count = 0
    for name in set(mine) | set(agreed):
        a, b = mine.get(name), agreed.get(name)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            count += max(getattr(a, "numel", lambda: 1)(), getattr(b, "numel", lambda: 1)())
        elif a.shape != b.shape or a.dtype != b.dtype:
            count += max(a.numel(), b.numel())
        else:
            count += int((a.to(b.device) != b).sum())
    total = torch.tensor([count], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of each value (one collective for the whole list)."""
    if not is_initialized() or world_size() == 1 or not values:
        return list(values)
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return (buf / world_size()).tolist()
