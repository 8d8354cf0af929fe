"""The Triton kernels compile for Hopper and Ampere, as their launchers call them: tensor cores
and pipelined loads for the convolutions, 16-byte accesses for the memory-bound kernels, shared
memory within the limit.

Runs without a GPU: tests/compile_for_gpu.py compiles offline for named targets, through the
launchers, so each kernel gets the argument types and specialisations of a real launch (a plain
conv's placeholder pointers once failed to compile there, which hand-written signatures missed).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The most shared memory one block may use.
SHARED_MEMORY = {90: 227 * 1024, 80: 163 * 1024}
MATMUL_KERNELS = {"_conv2d_kernel", "_conv2d_grad_weight_kernel"}
MEMORY_KERNELS = {
    "_relu_grad_kernel",
    "_upsample_concat_forward_kernel",
    "_upsample_backward_kernel",
}


@pytest.fixture(scope="module")
def records():
    script = Path(__file__).with_name("compile_for_gpu.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def builds(records):
    return [r for r in records if r["record"] == "build"]


def test_every_kernel_compiles_for_each_dtype_and_target_within_shared_memory(builds):
    built = {(b["kernel"], b["dtype"], b["capability"]) for b in builds}
    for kernel in MATMUL_KERNELS | MEMORY_KERNELS:
        assert {(kernel, dtype, 90) for dtype in ("bfloat16", "float16", "float32")} <= built
    assert {(kernel, "bfloat16", 80) for kernel in MATMUL_KERNELS} <= built
    assert any(not b["aligned"] for b in builds)  # odd sizes: other specialisations
    assert {(kernel, "float32", 80) for kernel in MATMUL_KERNELS} <= built  # every tile
    for build in builds:
        assert build["shared_bytes"] <= SHARED_MEMORY[build["capability"]], build


def test_convolutions_use_tensor_cores_and_pipelined_loads(builds):
    for build in (b for b in builds if b["kernel"] in MATMUL_KERNELS):
        if build["aligned"]:
            assert build["async_copies"] > 0, f"loads are not software-pipelined: {build}"
        if build["dtype"] == "float32" and build["precision"] == "ieee":
            continue  # exact fp32 products: no tensor core computes them
        assert build["wgmma"] + build["mma_sync"] > 0, build
        config = build["config"]
        if build["capability"] == 90 and config["BLOCK_M"] >= 128 and config["BLOCK_N"] >= 64:
            assert build["wgmma"] > 0, f"a large Hopper tile without wgmma: {build}"


def test_memory_bound_kernels_move_16_bytes_an_access(builds):
    for build in (b for b in builds if b["kernel"] in MEMORY_KERNELS and b["aligned"]):
        assert build["wide_loads"] > 0 and build["wide_stores"] > 0, build


def test_an_autotuned_launch_compiles_its_tiles_at_once_before_timing_them(records):
    """kernels.conv2d_relu.TileCompiles, as the autotuner's timing hook fires it: every tile
    the autotuner would time is compiled (in threads) before the first is timed."""
    fired = [r for r in records if r["record"] == "parallel_compile"]
    assert {r["kernel"] for r in fired} == MATMUL_KERNELS
    for record in fired:
        assert record["tiles"] > 1 and record["compiled"] == record["tiles"], record
