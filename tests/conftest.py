"""Shared fixtures. Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection, before
any test module imports fastunet.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="GPU tier: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the torch composite for every op (FASTUNET_BACKEND=torch)."""
    monkeypatch.setenv("FASTUNET_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    """fp32 tolerances assume IEEE fp32, so TF32 (on by default for cuDNN) is off unless a test
    turns it on (test_tf32_follows_cudnn_setting does)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
