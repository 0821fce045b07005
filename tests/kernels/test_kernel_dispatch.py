"""``training.kernels: auto | torch | triton`` → a backend, with the reason where Triton cannot run."""

from __future__ import annotations

import pytest
import torch

from sparsebench_kernels import dispatch
from sparsebench_kernels.dispatch import available, select_backend, unavailable_reason


def test_torch_is_always_available_and_auto_never_interprets_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("torch", "cpu") == "torch"
    assert select_backend("auto", "cpu") == "torch"  # the interpreter is for tests, never for training


def test_triton_on_cpu_runs_only_under_the_interpreter(monkeypatch):
    if not dispatch.triton_installed():
        pytest.skip("triton is not installed (it ships for Linux x86-64 only)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available("cpu") and select_backend("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not available("cpu")
    with pytest.raises(RuntimeError, match=r"training.kernels: 'triton' cannot run on device 'cpu'.*TRITON_INTERPRET"):
        select_backend("triton", "cpu")


def test_triton_requested_without_the_package_names_the_package(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    assert "'triton' package is not installed" in unavailable_reason("cpu")
    assert select_backend("auto", "cpu") == "torch"
    with pytest.raises(RuntimeError, match="'triton' package is not installed.*use 'auto' or 'torch'"):
        select_backend("triton", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_explained(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert unavailable_reason("cuda") == "no CUDA device is available"
    assert select_backend("auto", "cuda") == "torch"


@pytest.mark.skipif(not torch.cuda.is_available() or not dispatch.triton_installed(), reason="needs CUDA and triton")
def test_auto_picks_triton_on_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expected = "triton" if torch.cuda.get_device_capability() >= (7, 0) else "torch"
    assert select_backend("auto", "cuda") == expected


def test_unknown_choice_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="training.kernels: unknown value 'cuda'. Allowed: auto, torch, triton"):
        select_backend("cuda", "cpu")
