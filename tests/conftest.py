"""Shared fixtures. Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection, before
any test module imports fastunet.
"""

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile's on-disk caches key a graph by its forward ops, not by a custom op's registered
# backward (PyTorch issue #144344): a cache written by older sources would run their backward,
# even call an op that no longer exists. Each test session compiles into a cache of its own.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastunet-inductor-")
# Nor do the tests read or write the user's per-layer choices (~/.cache/fastunet): a choice saved
# there would pick a test's path for it.
os.environ["FASTUNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastunet-choices-")

import pytest
from helpers import AUTOTUNED_CONFIGS, KERNEL_DEVICE, assert_kernel_backend, interpreter_problem

from fastunet.kernels import INTERPRET
from fastunet.kernels import conv2d_relu as conv2d_relu_kernels
from fastunet.ops._backend import package_version

for session_directory in (os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["FASTUNET_CACHE_DIR"]):
    atexit.register(shutil.rmtree, session_directory, ignore_errors=True)  # when the process exits

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def pytest_configure(config):
    """One clear error, not an InterpreterError per kernel test, on a Triton/numpy pair whose
    interpreter is broken."""
    problem = interpreter_problem(INTERPRET, package_version("triton"), package_version("numpy"))
    if problem:
        raise pytest.UsageError(problem)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="GPU tier: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the torch composite for every op (FASTUNET_BACKEND=torch)."""
    monkeypatch.setenv("FASTUNET_BACKEND", "torch")


@pytest.fixture
def kernels_backend(monkeypatch):
    """Every layer of a model runs fastunet's kernels (FASTUNET_BACKEND=fastunet): on a GPU the
    per-layer choice is measured and may take PyTorch's path for a layer, which a test of the
    kernels must not leave to chance. Its tensors belong on KERNEL_DEVICE."""
    assert_kernel_backend("conv2d_relu", KERNEL_DEVICE, torch.float32)
    monkeypatch.setenv("FASTUNET_BACKEND", "fastunet")


@pytest.fixture(params=["kernels", "torch"])
def backend(request):
    """Run the test on each backend: "kernels" (`kernels_backend`: the Triton kernels, in the
    interpreter without a GPU, and `_C` for max-pool) and "torch" (the composite,
    FASTUNET_BACKEND=torch). Put the tensors on `helpers.backend_device(backend)`."""
    request.getfixturevalue(f"{request.param}_backend")
    return request.param


@pytest.fixture(autouse=True)
def _one_tile(monkeypatch):
    """FASTUNET_TESTS_ONE_TILE=1 (benchmarks/gpu_check.sh sets it): on a GPU each conv kernel runs
    its pruner's fallback tile, untimed, instead of timing up to 9 for every new shape (about
    0.3 s a shape, minutes over the property tests). test_every_autotuned_tile still runs each
    tile; the bench runs the autotuner."""
    if os.environ.get("FASTUNET_TESTS_ONE_TILE") == "1" and not INTERPRET:
        for name, configs in AUTOTUNED_CONFIGS.items():
            monkeypatch.setattr(getattr(conv2d_relu_kernels, name), "configs", configs[-1:])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 tolerances assume IEEE fp32, so TF32 (on by default for cuDNN) is off unless a test
    turns it on (test_tf32_follows_cudnn_setting does). Saved and restored by hand: pytest 9.2's
    monkeypatch deletes torch.backends.cuda.matmul.allow_tf32 on undo, which raises."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = saved
