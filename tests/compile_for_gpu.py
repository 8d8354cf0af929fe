"""Compile fastunet's Triton kernels for NVIDIA targets without a GPU, and report each build.

The interpreter runs the kernels' logic on CPU tensors but compiles nothing, so a kernel that
cannot be lowered for a GPU (a type error, an unsupported op, a tile that overflows shared
memory) would pass CI. Triton compiles offline for a named target: this script does so with the
specialisations a real launch would get (16-divisible sizes and aligned pointers) and prints one
JSON line per build. Run it without TRITON_INTERPRET: tests/test_gpu_compile.py does.
"""

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastunet.kernels import conv2d_relu, upsample_concat


def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through @triton.autotune
    return kernel


def compile_for(kernel, args: dict, constexprs: dict, config, capability: int):
    """args: pointer arguments as their element type ("bf16"), integers and floats as sample
    values."""
    fn = jit_function(kernel)
    constexprs = {**constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        value = args.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, str):
            signature[name] = ("*" + value) if name.endswith("_ptr") else value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # Triton turns an integer argument equal to 1 into a constant
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return {
        "kernel": fn.__name__,
        "capability": capability,
        "config": {**config.kwargs, "warps": config.num_warps, "stages": config.num_stages},
        "shared_bytes": compiled.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        "async_copies": ttgir.count("async_copy_global_to_local"),
        "wide_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
        "wide_stores": ptx.count("st.global.v4"),
    }


def concat_arguments(dtype, n, h, w, c_skip):
    """The fused loader's arguments: skip (c_skip channels at h x w) and the axis tables."""
    names = [f"{axis}_{name}_ptr" for axis in ("row", "col")
             for name in ("src0", "src1", "lambda0", "lambda1")]  # fmt: skip
    tables = {name: "fp32" if "lambda" in name else "i32" for name in names}
    return dict(skip_ptr=dtype, C_SKIP=c_skip, stride_sn=h * w * c_skip, stride_sh=w * c_skip,
                stride_sw=c_skip, **tables)  # fmt: skip


def conv_builds():
    n, h, w, c_in, c_out = 16, 64, 64, 128, 128
    tensors = ("x_ptr", "w_ptr", "bias_ptr", "out_ptr")
    strides = dict(stride_xn=h * w * c_in, stride_xh=w * c_in, stride_xw=c_in)
    sizes = dict(
        N=n, H=h, W=w, C_IN=c_in, H_OUT=h, W_OUT=w, C_OUT=c_out, PAD_H=1, PAD_W=1,
        NEGATIVE_SLOPE=0.1, **strides,
    )  # fmt: skip
    plain = dict(UPSAMPLE="none")
    for dtype, precision, size in (("bf16", "ieee", 2), ("fp16", "ieee", 2), ("fp32", "tf32", 4)):
        args = {**sizes, **dict.fromkeys(tensors, dtype), **concat_arguments(dtype, n, h, w, 0)}
        named = {"x_ptr": _Sized(size), "C_IN": c_in, "C_OUT": c_out}
        for config in conv2d_relu._prune_configs(conv2d_relu.GEMM_CONFIGS, named):
            constexprs = dict(KH=3, KW=3, HAS_BIAS=True, RELU=True, INPUT_PRECISION=precision,
                              LEAKY=False, **plain)  # fmt: skip
            yield conv2d_relu._conv2d_kernel, args, constexprs, config, 90
    grad_args = {**sizes, "grad_ptr": "bf16", "x_ptr": "bf16", "partial_ptr": "fp32",
                 "M_PER_SPLIT": 4096, **concat_arguments("bf16", n, h, w, 0)}  # fmt: skip
    named = {"x_ptr": _Sized(2), "C_IN": c_in, "C_OUT": c_out}
    for config in conv2d_relu._prune_configs(conv2d_relu.GRAD_WEIGHT_CONFIGS, named):
        constexprs = dict(KH=3, KW=3, INPUT_PRECISION="ieee", **plain)
        yield conv2d_relu._conv2d_grad_weight_kernel, grad_args, constexprs, config, 90
    first = conv2d_relu.GEMM_CONFIGS[0]
    args = {**sizes, **dict.fromkeys(tensors, "bf16"), **concat_arguments("bf16", n, h, w, 0)}
    constexprs = dict(KH=1, KW=1, HAS_BIAS=False, RELU=False, LEAKY=False, INPUT_PRECISION="ieee",
                      **plain)  # fmt: skip
    yield conv2d_relu._conv2d_kernel, args, constexprs, first, 80  # Ampere: mma.sync
    leaky = dict(constexprs, RELU=True, LEAKY=True)  # the LeakyReLU epilogue
    yield conv2d_relu._conv2d_kernel, args, leaky, first, 90
    # The decoder conv: skip (c_in / 3 channels) and x (2 c_in / 3 at half size) read directly.
    c_skip, c_x = 64, 128
    low = dict(stride_xn=h * w * c_x // 4, stride_xh=w * c_x // 2, stride_xw=c_x)
    fused = {**sizes, **low, "C_IN": c_skip + c_x, **dict.fromkeys(tensors, "bf16"),
             **concat_arguments("bf16", n, h, w, c_skip)}  # fmt: skip
    for mode in ("nearest", "bilinear"):
        constexprs = dict(KH=3, KW=3, HAS_BIAS=True, RELU=True, INPUT_PRECISION="ieee",
                          UPSAMPLE=mode, LEAKY=False)  # fmt: skip
        yield conv2d_relu._conv2d_kernel, fused, constexprs, first, 90
        grad_fused = {**fused, "grad_ptr": "bf16", "partial_ptr": "fp32", "M_PER_SPLIT": 4096}
        constexprs = dict(KH=3, KW=3, INPUT_PRECISION="ieee", UPSAMPLE=mode)
        yield (
            conv2d_relu._conv2d_grad_weight_kernel,
            grad_fused,
            constexprs,
            conv2d_relu.GRAD_WEIGHT_CONFIGS[0],
            90,
        )
    relu_args = dict(grad_out_ptr="bf16", out_ptr="bf16", grad_ptr="bf16",
                     bias_partial_ptr="fp32", M=n * h * w, C=c_out, NEGATIVE_SLOPE=0.1)  # fmt: skip
    relu_config = triton.Config({}, num_warps=4, num_stages=1)
    for leaky in (False, True):
        relu_constexprs = dict(BLOCK_M=conv2d_relu.RELU_GRAD_BLOCK_M, BLOCK_C=128, LEAKY=leaky)
        yield conv2d_relu._relu_grad_kernel, relu_args, relu_constexprs, relu_config, 90


def upsample_builds():
    n, c, h, w = 16, 128, 128, 128  # x: 2c at h/2 -> skip: c at h, channels_last
    block_pixels, block_channels = upsample_concat._block_sizes(2 * c)
    config = triton.Config({}, num_warps=upsample_concat.NUM_WARPS, num_stages=1)
    tables = [f"{axis}_{name}_ptr" for axis in ("row", "col")
              for name in ("src0", "src1", "lambda0", "lambda1", "first", "count")]  # fmt: skip
    table_types = {name: "fp32" if "lambda" in name else "i32" for name in tables}

    def strides(prefix, channels, height, width):
        names = [f"{prefix}_stride_{axis}" for axis in ("n", "c", "h", "w")]
        return dict(zip(names, (height * width * channels, 1, width * channels, channels),
                        strict=True))  # fmt: skip

    for dtype in ("bf16", "fp32"):
        for nearest in (True, False):
            constexprs = dict(NEAREST=nearest, BLOCK_PIXELS=block_pixels,
                              BLOCK_CHANNELS=block_channels)  # fmt: skip
            forward = dict(x_ptr=dtype, skip_ptr=dtype, out_ptr=dtype, **table_types,
                           num_pixels=n * h * w, out_height=h, out_width=w, skip_channels=c,
                           x_channels=2 * c, **strides("x", 2 * c, h // 2, w // 2),
                           **strides("skip", c, h, w), **strides("out", 3 * c, h, w),
                           skip_offset=2 * c, x_offset=0)  # fmt: skip
            yield upsample_concat._upsample_concat_forward_kernel, forward, constexprs, config, 90
            backward = dict(grad_up_ptr=dtype, grad_x_ptr=dtype, **table_types,
                            num_pixels=n * h * w // 4, in_height=h // 2, in_width=w // 2,
                            channels=2 * c, max_rows=4, max_cols=4,
                            **strides("grad_up", 3 * c, h, w),
                            **strides("grad_x", 2 * c, h // 2, w // 2))  # fmt: skip
            yield upsample_concat._upsample_backward_kernel, backward, constexprs, config, 90


class _Sized:
    """Stands in for a tensor argument where the prune functions read element_size()."""

    def __init__(self, size):
        self.size = size

    def element_size(self):
        return self.size


def main() -> int:
    for kernel, args, constexprs, config, capability in (*conv_builds(), *upsample_builds()):
        print(json.dumps(compile_for(kernel, args, constexprs, config, capability)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
