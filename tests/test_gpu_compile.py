"""The Triton kernels compile for Hopper and Ampere, with tensor cores and pipelined loads.

Runs without a GPU: tests/compile_for_gpu.py compiles offline for named targets.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HOPPER_SHARED_MEMORY = 227 * 1024


@pytest.fixture(scope="module")
def builds():
    script = Path(__file__).with_name("compile_for_gpu.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_autotune_config_compiles_within_shared_memory(builds):
    kernels = {b["kernel"] for b in builds}
    assert {"_conv2d_kernel", "_conv2d_grad_weight_kernel", "_relu_grad_kernel"} <= kernels
    for build in builds:
        assert 0 < build["shared_bytes"] <= HOPPER_SHARED_MEMORY, build


def test_matmul_kernels_use_tensor_cores_and_pipelined_loads(builds):
    for build in builds:
        if build["kernel"] == "_relu_grad_kernel":
            continue
        assert build["async_copies"] > 0, f"loads are not software-pipelined: {build}"
        if build["capability"] == 80:
            assert build["mma_sync"] > 0, build
        else:
            assert build["wgmma"] + build["mma_sync"] > 0, build

    def big_hopper_tile(build):
        config = build["config"]
        return build["capability"] == 90 and config["BLOCK_M"] >= 128 and config["BLOCK_N"] >= 64

    big_tiles = [b for b in builds if b["kernel"] != "_relu_grad_kernel" and big_hopper_tile(b)]
    assert big_tiles and all(b["wgmma"] > 0 for b in big_tiles)
