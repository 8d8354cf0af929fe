"""Compile fastunet's Triton kernels for NVIDIA targets without a GPU, through their launchers,
and report each build.

The interpreter runs the kernels' logic on CPU tensors but compiles nothing, so a kernel that
cannot be lowered for a GPU (a type error, an unsupported op, a tile that overflows shared
memory) would pass CI. Triton compiles offline for a named target. This script compiles what a
real call would: it calls the launchers in fastunet.kernels, so each kernel gets the launcher's
own arguments with the types and specialisations (16-divisible sizes, integers equal to 1,
aligned pointers) that a launch gives them.
- A stand-in driver names the target. The kernels get CPU tensors for CUDA ones: compiling
  reads only their dtype and address.
- A launch compiles and does not run. An autotuned launch compiles each tile it would time, in
  parallel as before the autotuner times them (`TileCompiles`), or in most cases just the first.
- fp32 convolutions compile with TF32, as on CUDA with PyTorch's defaults, unless a case says
  IEEE (the launcher's own rule reads the tensors' device).

Prints one JSON line per build, then one per parallel compile of an autotuned launch's tiles.
Run it without TRITON_INTERPRET: tests/test_gpu_compile.py does.
"""

import contextlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from fastunet.kernels import conv2d_relu, upsample_concat


class TargetDriver:
    """The part of Triton's driver that compiling reads: the device (here its compute
    capability, so that each target gets its own per-device cache) and its target."""

    capability = 90

    def get_current_device(self):
        return self.capability

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.capability, 32)


DRIVER = TargetDriver()
BUILDS: list[dict] = []
PARALLEL_COMPILES: list[dict] = []
_case = {"name": "", "aligned": True, "every_tile": False, "fp32_precision": "tf32"}
_compile = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    compiled = _compile(self, *args, grid=grid, warmup=True, **kwargs)
    if isinstance(compiled, triton.FutureKernel) or compiled is None:  # compiling in a thread
        return compiled
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    BUILDS.append({
        "record": "build",
        "kernel": self.__name__,
        "case": _case["name"],
        "aligned": _case["aligned"],
        "capability": DRIVER.capability,
        "dtype": str(args[0].dtype).removeprefix("torch."),
        "precision": kwargs.get("INPUT_PRECISION"),
        "config": {k: v for k, v in kwargs.items() if k.startswith("BLOCK_")}
        | {"warps": compiled.metadata.num_warps, "stages": compiled.metadata.num_stages},
        "shared_bytes": compiled.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        "async_copies": ttgir.count("async_copy_global_to_local"),
        "wide_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
        "wide_stores": ptx.count("st.global.v4"),
    })  # fmt: skip
    return compiled


def _compile_tiles(self, *args, grid, warmup, **kwargs):
    self.nargs = dict(zip(self.arg_names, args, strict=False))
    tiles = self.prune_configs({"grid": grid, "warmup": warmup, **kwargs})
    if _case["every_tile"]:  # at once, as before the autotuner times them; then each is cached
        kernel_cache = self.fn.device_caches[DRIVER.capability][0]
        before = len(kernel_cache)
        self.tile_compiles.fire()
        PARALLEL_COMPILES.append({"record": "parallel_compile", "kernel": self.fn.__name__,
                                  "case": _case["name"], "tiles": len(tiles),
                                  "compiled": len(kernel_cache) - before})  # fmt: skip
    for config in tiles if _case["every_tile"] else tiles[:1]:
        self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
    self.nargs = None


@contextlib.contextmanager
def case(name, capability=90, aligned=True, every_tile=False, fp32_precision="tf32"):
    """Builds made inside are reported under `name`; `aligned`: its sizes are multiples of 16
    (where 16-byte accesses are possible)."""
    DRIVER.capability = capability
    _case.update(name=name, aligned=aligned, every_tile=every_tile, fp32_precision=fp32_precision)
    yield


def _input_precision(x):
    return _case["fp32_precision"] if x.dtype == torch.float32 else "ieee"


def _channels_last(shape, dtype):
    return torch.zeros(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


def conv_launches(dtype, n, c_in, c_out, size, kernel=3, bias=True):
    """The conv op's launches, as its forward and backward make them: forward, grad_input (the
    same kernel, flipped weight), grad_weight and the ReLU gradient."""
    h, w = size
    padding = kernel // 2
    x = _channels_last((n, c_in, h, w), dtype)
    weight = torch.zeros(c_out, c_in, kernel, kernel, dtype=dtype)
    out = conv2d_relu.forward(x, weight, torch.zeros(c_out, dtype=dtype) if bias else None,
                              padding, True)  # fmt: skip
    grad, _ = conv2d_relu.relu_grad(out, out)
    conv2d_relu.grad_input(grad, weight, h, w, padding)
    conv2d_relu.grad_weight(grad, x, kernel, kernel, padding)


def decoder_conv_launches(dtype, n, c_skip, c_x, size, mode, align_corners=False):
    """The fused decoder conv: its input is cat([skip, upsample(x)]), never stored."""
    h, w = size
    skip = _channels_last((n, c_skip, h, w), dtype)
    x = _channels_last((n, c_x, (h + 1) // 2, (w + 1) // 2), dtype)
    weight = torch.zeros(c_skip, c_skip + c_x, 3, 3, dtype=dtype)
    concat = (skip, mode, align_corners)
    out = conv2d_relu.forward(x, weight, torch.zeros(c_skip, dtype=dtype), 1, True, concat)
    conv2d_relu.grad_weight(out, x, 3, 3, 1, concat)


def upsample_concat_launches(dtype, n, c_skip, c_x, size, mode, skip_first=True):
    h, w = size
    skip = _channels_last((n, c_skip, h, w), dtype)
    x = _channels_last((n, c_x, (h + 1) // 2, (w + 1) // 2), dtype)
    out = _channels_last((n, c_skip + c_x, h, w), dtype)
    upsample_concat.upsample_concat_forward(x, skip, mode, False, out, skip_first)
    upsample_concat.upsample_backward(out[:, c_skip:], mode, False, torch.zeros_like(x))


def main() -> int:
    driver.set_active(DRIVER)
    JITFunction.run, Autotuner.run = _compile_only, _compile_tiles
    conv2d_relu._input_precision = _input_precision
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        with case(f"conv {dtype} 128->128 every tile", every_tile=True):
            conv_launches(dtype, 2, 128, 128, (32, 32))
    with case("conv bf16 Ampere", capability=80):
        conv_launches(torch.bfloat16, 2, 64, 64, (32, 32))
    with case("conv fp32 Ampere every tile", capability=80, every_tile=True):
        conv_launches(torch.float32, 2, 128, 128, (32, 32))  # fp32: the widest stages
    with case("conv fp32 IEEE, 1x1 head, no bias", fp32_precision="ieee"):
        conv_launches(torch.float32, 2, 64, 16, (32, 32), kernel=1, bias=False)
    with case("conv odd sizes (N=1, C_in=3)", aligned=False):
        conv_launches(torch.float16, 1, 3, 5, (7, 9))
    with case("conv leaky ReLU"):
        out = conv2d_relu.forward(_channels_last((2, 64, 16, 16), torch.bfloat16),
                                  torch.zeros(64, 64, 3, 3, dtype=torch.bfloat16), None, 1,
                                  True, negative_slope=0.1)  # fmt: skip
        conv2d_relu.relu_grad(out, out, 0.1)
    for mode in ("nearest", "bilinear"):
        with case(f"decoder conv {mode}"):
            decoder_conv_launches(torch.bfloat16, 2, 64, 128, (32, 32), mode)
        with case(f"decoder conv {mode}, odd sizes", aligned=False):
            decoder_conv_launches(torch.float32, 1, 3, 5, (7, 9), mode, align_corners=True)
        for dtype in (torch.bfloat16, torch.float32):
            with case(f"upsample_concat {mode} {dtype}"):
                upsample_concat_launches(dtype, 2, 128, 256, (32, 32), mode)
        with case(f"upsample_concat {mode}, odd sizes, upsampled first", aligned=False):
            upsample_concat_launches(torch.float16, 1, 3, 5, (7, 9), mode, skip_first=False)
    for record in BUILDS + PARALLEL_COMPILES:
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
