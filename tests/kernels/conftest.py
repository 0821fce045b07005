"""Triton kernels run on a GPU where there is one, else in Triton's CPU interpreter.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, i.e. when a
``sparsebench_kernels._triton_*`` module is first imported, and the interpreter reads it again
while a kernel runs. Without CUDA this conftest imports the kernel modules with
``TRITON_INTERPRET=1`` when pytest collects this folder (before any test runs, whatever imports
them later) and sets the variable again for every test in this folder only, so the rest of the
suite (and the processes it starts, e.g. DeepSpeed's) never sees it.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from sparsebench_kernels.dispatch import triton_installed

INTERPRETED = not torch.cuda.is_available()

if INTERPRETED and triton_installed():
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for _module in ("sparsebench_kernels._triton_adamw", "sparsebench_kernels._triton_grad_activity"):
            importlib.import_module(_module)
    finally:
        if _before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _before


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run in this session: CUDA, or CPU under the interpreter.

    Tests of the Triton path skip only where the package cannot be installed (it ships for
    Linux x86-64, where it is a dependency of sparsebench).
    """
    if not triton_installed():
        pytest.skip("triton is not installed (it ships for Linux x86-64 only)")
    return torch.device("cpu" if INTERPRETED else "cuda")
