"""Triton kernels run on a GPU where there is one, else in Triton's CPU interpreter.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, i.e. when
``sparsebench_kernels._triton_*`` is first imported; the kernel modules load lazily on the first
``backend="triton"`` call, so setting the variable when pytest imports this conftest (during
collection, before any test runs) is early enough for the whole session.
"""

from __future__ import annotations

import os

import pytest
import torch

from sparsebench_kernels.dispatch import triton_installed

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run in this session: CUDA, or CPU under the interpreter.

    Tests of the Triton path skip only where the package cannot be installed (it ships for
    Linux x86-64, where it is a dependency of sparsebench).
    """
    if not triton_installed():
        pytest.skip("triton is not installed (it ships for Linux x86-64 only)")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return torch.device("cuda" if torch.cuda.is_available() and not interpreting else "cpu")
