"""Which backend runs the kernels: ``triton`` where it can, ``torch`` (the references) otherwise.

``training.kernels: auto | torch | triton`` maps onto :func:`select_backend`. ``auto`` picks Triton
only on a CUDA device: the interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU
tensors, but one element at a time in NumPy, so it exists for tests and never pays in training.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Union

import torch

CHOICES = ("auto", "torch", "triton")
DeviceLike = Union[str, torch.device]


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (it ships for Linux x86-64)."""
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device: DeviceLike) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device``, or ``None`` when they can."""
    device = torch.device(device)
    if not triton_installed():
        return "the 'triton' package is not installed (it ships for Linux x86-64 only)"
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set, which runs Triton on CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if torch.cuda.get_device_capability(device) < (7, 0):
            return f"Triton needs a GPU of compute capability 7.0 or newer, got {torch.cuda.get_device_capability(device)}"
        return None
    if device.type == "cpu":
        return None if interpreting() else "Triton kernels run on CPU only in its interpreter (TRITON_INTERPRET=1)"
    return f"Triton kernels support cuda (and cpu under TRITON_INTERPRET=1), not '{device.type}'"


def available(device: DeviceLike) -> bool:
    """Whether the Triton kernels can run on ``device`` (see :func:`unavailable_reason`)."""
    return unavailable_reason(device) is None


def select_backend(choice: str, device: DeviceLike) -> str:
    """``"triton"`` or ``"torch"`` for ``training.kernels`` = ``choice`` on ``device``.

    ``auto`` is ``triton`` on a CUDA device where Triton runs, else ``torch``; ``triton`` where it
    cannot run is an error naming the reason.
    """
    if choice not in CHOICES:
        raise ValueError(f"training.kernels: unknown value '{choice}'. Allowed: {', '.join(CHOICES)}")
    if choice == "torch":
        return "torch"
    reason = unavailable_reason(device)
    if choice == "triton":
        if reason is not None:
            raise RuntimeError(f"training.kernels: 'triton' cannot run on device '{torch.device(device)}': {reason}; "
                               "use 'auto' or 'torch'")
        return "triton"
    return "triton" if reason is None and torch.device(device).type == "cuda" else "torch"
