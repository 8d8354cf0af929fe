"""Fused convolution + bias + ReLU (stride 1, zero padding) as Triton implicit GEMMs.

Activations are channels_last (NHWC), so a pixel's channels are contiguous and one tile of the
implicit im2col matrix is a masked, contiguous load per pixel. Every kernel accumulates in fp32.

- forward:     out[m, co] = act(bias[co] + sum_k A[m, k] * W[co, k]),  m = (n, oh, ow),
               k = (kh, kw, ci): GEMM M = N*H_out*W_out, N = C_out, K = KH*KW*C_in.
- grad_input:  the same kernel on grad with the kernel flipped and C_in/C_out swapped
               (a stride-1 transposed convolution is a convolution with padding KH-1-pad).
               An inf or NaN weight times that zero padding gives NaN at grad_x's border,
               where PyTorch's col2im never forms the product.
- grad_weight: dW[co, k] = sum_m grad[m, co] * A[m, k], a reduction over N*H*W split into
               SPLIT slices that fill the GPU; the slices are summed in a fixed order (no atomics).
- relu_grad:   the ReLU (or LeakyReLU) mask applied to grad_output, with the bias gradient from
               the same pass.

The forward and grad_weight kernels also serve the decoder op upsample_concat_conv2d_relu: with
UPSAMPLE set, their loader reads the input cat([skip, upsample(x)]) from skip and x directly, so
the concat is never stored (`concat=(skip, mode, align_corners)` in the launchers).

Addressing: x is read through its strides (any channels_last tensor); every other operand is
indexed by its shape, so the launchers make it dense first (weight and bias contiguous, grad and
out channels_last).
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl

from fastunet.kernels import INTERPRET, IndexRangeError, cdiv, cudnn_convolves, next_power_of_2
from fastunet.kernels.upsample_concat import axis_tables, bilinear_blend

# Tile sizes used under TRITON_INTERPRET (autotuning needs a GPU): few, large programs run fastest.
INTERPRETER_TILES = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)


def _config(block_m, block_n, block_k, stages, warps, **extra):
    kwargs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **extra)
    return triton.Config(kwargs, num_stages=stages, num_warps=warps)


GEMM_CONFIGS = [
    _config(128, 128, 64, 3, 8, GROUP_M=8),
    _config(128, 256, 64, 3, 8, GROUP_M=8),
    _config(256, 128, 64, 3, 8, GROUP_M=8),
    _config(128, 64, 64, 4, 4, GROUP_M=8),
    _config(64, 128, 64, 4, 4, GROUP_M=8),
    _config(128, 128, 32, 4, 4, GROUP_M=8),
    _config(64, 64, 32, 4, 4, GROUP_M=8),
    _config(128, 32, 32, 4, 4, GROUP_M=8),
    _config(128, 16, 32, 4, 4, GROUP_M=8),
]

GRAD_WEIGHT_CONFIGS = [
    _config(64, 128, 64, 3, 8),
    _config(128, 128, 64, 3, 8),
    _config(64, 64, 64, 4, 4),
    _config(128, 64, 32, 4, 4),
    _config(64, 32, 32, 4, 4),
    _config(64, 16, 16, 4, 4),
]

# The longest reduction slice of grad_weight is a multiple of every BLOCK_M above.
SPLIT_GRANULE = 256


def _fits(config, n_size, k_size, element_size):
    """Drop tiles much wider than the problem and those whose pipeline overflows shared memory."""
    kw = config.kwargs
    if kw["BLOCK_N"] > max(16, next_power_of_2(n_size)):
        return False
    if kw["BLOCK_K"] > max(16, next_power_of_2(k_size)):
        return False
    stage_bytes = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size
    return stage_bytes * config.num_stages <= 160 * 1024


def _prune_configs(configs, named_args, **kwargs):
    """In both kernels BLOCK_N tiles C_out and BLOCK_K tiles C_in."""
    element_size = named_args["x_ptr"].element_size()
    kept = [c for c in configs if _fits(c, named_args["C_OUT"], named_args["C_IN"], element_size)]
    return kept or configs[-1:]


def _tuning_bench(kernel_call, quantiles):
    # Shorter than Triton's default (25 ms warm-up, 100 ms timing) so a UNet's ~60 shapes tune
    # in seconds; a config's time still averages dozens of launches.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


@functools.cache
def _compile_pool() -> ThreadPoolExecutor:
    # Triton's compiler (its MLIR passes and ptxas) releases the GIL, so threads compile at once.
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="fastunet-compile")


class TileCompiles:
    """Compiles all the tiles of an autotuned launch at once, before the autotuner times them.

    Otherwise each timing run compiles its own tile first, one after another, and a UNet's cold
    first training step compiles about 60 tiles (0.5-1.2 s each for sm_90 on a 2-core CPU).
    `arm` runs in the prune hook, at every tuning key this process has not seen. `fire` runs in
    the timing hook, which runs only when the tuning is not in Triton's cache: a warm cache
    still loads just the chosen tile. Until then it holds the launch's tensors weakly, so a
    cached tuning keeps none of them alive.
    """

    def __init__(self, kernel):
        self.kernel = kernel  # the JITFunction
        self.pending = None

    def arm(self, tiles, named_args, kwargs) -> None:
        args = {k: weakref.ref(v) if isinstance(v, torch.Tensor) else v
                for k, v in named_args.items()}  # fmt: skip
        self.pending = tiles, args, {**kwargs, "warmup": True}

    def fire(self) -> None:
        if self.pending is None:
            return
        tiles, args, kwargs = self.pending
        self.pending = None
        args = {k: v() if isinstance(v, weakref.ref) else v for k, v in args.items()}
        if any(v is None for v in args.values()):
            return
        # A tile that fails to compile is left out of the kernel's cache; the autotuner then
        # compiles it again at its timing run, and handles the error as it would have.
        mode = triton.AsyncCompileMode(_compile_pool(), ignore_errors=True)
        try:
            mode.__enter__()
        except RuntimeError:  # the caller compiles in an AsyncCompileMode of its own
            return
        try:
            for tile in tiles:
                self.kernel.run(**args, **kwargs, **tile.all_kwargs())
        finally:
            mode.__exit__(None, None, None)


def _autotune(configs, key):
    if INTERPRET:  # the interpreter cannot time configs; the launcher passes INTERPRETER_TILES
        return lambda kernel: kernel

    def tune(kernel):
        compiles = TileCompiles(kernel)

        def prune(configs, named_args, **kwargs):
            tiles = _prune_configs(configs, named_args)
            compiles.arm(tiles, named_args, kwargs)
            return tiles

        def time_tile(kernel_call, quantiles):
            compiles.fire()
            return _tuning_bench(kernel_call, quantiles)

        tuned = triton.autotune(
            configs,
            key=key,
            prune_configs_by={"early_config_prune": prune},
            do_bench=time_tile,
            # Kept in Triton's cache (keyed by the kernel source, Triton version, GPU and
            # shape): a new process neither re-tunes nor picks other tiles, so its bits stay.
            cache_results=True,
        )(kernel)
        tuned.tile_compiles = compiles
        return tuned

    return tune


# The tile each autotuned kernel picked, by its tuning key and dtypes, with the config list it
# was picked from (tests swap a kernel's list).
_picked: dict[tuple, tuple[list, triton.Config]] = {}
# One first launch at a time: each reads back the autotuner's best_config, which is shared.
_picking = threading.Lock()


@functools.cache
def _key_positions(kernel, positional: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Where kernel's tuning key arguments are in a launch with this many positional arguments:
    (their indices there, the names of those passed by keyword)."""
    indices = {name: kernel.arg_names.index(name) for name in kernel.keys}
    return (
        tuple(i for i in indices.values() if i < positional),
        tuple(name for name, i in indices.items() if i >= positional),
    )


def _launch(kernel, grid, args: tuple, constexprs: dict, dtypes: tuple) -> None:
    """`kernel[grid](*args, **constexprs)`. Once an autotuned kernel has picked its tile for
    this key, the tile launches directly: Triton's Autotuner.run rebuilds its key from every
    argument at each launch, 27-30 us of host time for these kernels (Triton 3.6 and 3.9, 2-core
    x86 CPU, the launch itself stubbed out), as long as a small layer's kernel runs; this, 5 us.
    `dtypes`: those of the launch's data tensors (the others' are fixed), as the autotuner's key
    holds every tensor's dtype."""
    if INTERPRET:  # no autotuner: the launcher passes the interpreter's tile
        kernel[grid](*args, **constexprs)
        return
    configs = kernel.configs
    if len(configs) == 1:
        config = configs[0]
    else:
        indices, names = _key_positions(kernel, len(args))
        key = (kernel, *[args[i] for i in indices], *[constexprs[n] for n in names], *dtypes)
        picked = _picked.get(key)
        if picked is None or picked[0] is not configs:
            with _picking:
                kernel.best_config = None
                kernel[grid](*args, **constexprs)
                if isinstance(kernel.best_config, triton.Config):  # what it picked and ran
                    _picked[key] = (configs, kernel.best_config)
            return
        config = picked[1]
    if config.pre_hook is not None:
        kernel[grid](*args, **constexprs)
        return
    kernel.fn.run(*args, grid=grid, warmup=False, **constexprs, **config.all_kwargs())


@triton.jit
def _pixel_coordinates(offs_m, H_OUT, W_OUT):
    ow = offs_m % W_OUT
    rest = offs_m // W_OUT
    return rest // H_OUT, rest % H_OUT, ow


@triton.jit
def _load_shifted_pixels(
    x_ptr, x_base, oh, ow, pixel_valid, dh, dw, cs, H, W, C_IN, stride_xh, stride_xw
):
    """The [pixels, channels] tile of NHWC x at (oh + dh, ow + dw), zero outside the image."""
    ih = oh + dh
    iw = ow + dw
    inside = pixel_valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    pointers = x_ptr + (x_base + dh * stride_xh + dw * stride_xw)[:, None] + cs[None, :]
    return tl.load(pointers, mask=inside[:, None] & (cs < C_IN)[None, :], other=0.0)


@triton.jit
def _load_concat_pixels(
    skip_ptr, x_ptr, n, oh, ow, pixel_valid, dh, dw, cs, H, W, C_SKIP, C_IN,
    stride_sn, stride_sh, stride_sw, stride_xn, stride_xh, stride_xw,
    row_src0_ptr, row_src1_ptr, row_lambda0_ptr, row_lambda1_ptr,
    col_src0_ptr, col_src1_ptr, col_lambda0_ptr, col_lambda1_ptr,
    BILINEAR: tl.constexpr,
):  # fmt: skip
    """The [pixels, channels] tile of cat([skip, upsample(x)]) (NHWC, H x W) at (oh + dh,
    ow + dw), zero outside the image, read from skip and x: the concat is never stored.
    Upsampled values are x's at PyTorch's source indices (nearest), or PyTorch's fp32 blend of
    four rounded to x's dtype (bilinear), as upsample_concat would have stored them."""
    ih = oh + dh
    iw = ow + dw
    inside = pixel_valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    from_skip = inside[:, None] & (cs < C_SKIP)[None, :]
    skip_pixel = n.to(tl.int64) * stride_sn + ih * stride_sh + iw * stride_sw
    skip_values = tl.load(skip_ptr + skip_pixel[:, None] + cs[None, :], mask=from_skip, other=0.0)
    from_x = inside[:, None] & ((cs >= C_SKIP) & (cs < C_IN))[None, :]
    x_image = x_ptr + n.to(tl.int64)[:, None] * stride_xn + (cs - C_SKIP)[None, :]
    h0 = tl.load(row_src0_ptr + ih, mask=inside, other=0)
    w0 = tl.load(col_src0_ptr + iw, mask=inside, other=0)
    up = tl.load(x_image + (h0 * stride_xh + w0 * stride_xw)[:, None], mask=from_x, other=0.0)
    if BILINEAR:
        h1 = tl.load(row_src1_ptr + ih, mask=inside, other=0)
        w1 = tl.load(col_src1_ptr + iw, mask=inside, other=0)
        top_right = tl.load(x_image + (h0 * stride_xh + w1 * stride_xw)[:, None], mask=from_x,
                            other=0.0)  # fmt: skip
        bottom_left = tl.load(x_image + (h1 * stride_xh + w0 * stride_xw)[:, None], mask=from_x,
                              other=0.0)  # fmt: skip
        bottom_right = tl.load(x_image + (h1 * stride_xh + w1 * stride_xw)[:, None], mask=from_x,
                               other=0.0)  # fmt: skip
        up = bilinear_blend(
            up, top_right, bottom_left, bottom_right,
            tl.load(row_lambda0_ptr + ih, mask=inside, other=0)[:, None],
            tl.load(row_lambda1_ptr + ih, mask=inside, other=0)[:, None],
            tl.load(col_lambda0_ptr + iw, mask=inside, other=0)[:, None],
            tl.load(col_lambda1_ptr + iw, mask=inside, other=0)[:, None],
        ).to(skip_values.dtype)  # fmt: skip
    return tl.where(from_skip, skip_values, up)


@triton.jit
def _load_input_pixels(
    x_ptr, x_base, n, oh, ow, pixel_valid, dh, dw, cs, H, W, C_IN, stride_xn, stride_xh, stride_xw,
    skip_ptr, C_SKIP, stride_sn, stride_sh, stride_sw,
    row_src0_ptr, row_src1_ptr, row_lambda0_ptr, row_lambda1_ptr,
    col_src0_ptr, col_src1_ptr, col_lambda0_ptr, col_lambda1_ptr,
    UPSAMPLE: tl.constexpr,
):  # fmt: skip
    """The A tile of the implicit GEMM: x's pixels, or with UPSAMPLE ("nearest", "bilinear")
    the pixels of cat([skip, upsample(x)])."""
    # An else, not an early return: Triton compiles the code after a constexpr if's return too,
    # and a plain conv's placeholder table pointers (x's type) would not type-check there.
    if UPSAMPLE == "none":
        pixels = _load_shifted_pixels(
            x_ptr, x_base, oh, ow, pixel_valid, dh, dw, cs, H, W, C_IN, stride_xh, stride_xw
        )
    else:
        pixels = _load_concat_pixels(
            skip_ptr, x_ptr, n, oh, ow, pixel_valid, dh, dw, cs, H, W, C_SKIP, C_IN,
            stride_sn, stride_sh, stride_sw, stride_xn, stride_xh, stride_xw,
            row_src0_ptr, row_src1_ptr, row_lambda0_ptr, row_lambda1_ptr,
            col_src0_ptr, col_src1_ptr, col_lambda0_ptr, col_lambda1_ptr,
            UPSAMPLE == "bilinear",
        )  # fmt: skip
    return pixels


# What a tile is tuned for: the shapes, and every compile-time flag but the tile's own (Triton
# keys its choice by these names and the tensors' dtypes only, so without the flags a TF32 and an
# IEEE run, nearest and bilinear, or a forward and a same-shape grad_input shared a tile).
CONV_TUNING_KEY = ["N", "H_OUT", "W_OUT", "C_IN", "C_OUT", "KH", "KW", "C_SKIP", "HAS_BIAS",
                   "RELU", "LEAKY", "INPUT_PRECISION", "UPSAMPLE"]  # fmt: skip
GRAD_WEIGHT_TUNING_KEY = ["N", "H_OUT", "W_OUT", "C_IN", "C_OUT", "KH", "KW", "M_PER_SPLIT",
                          "C_SKIP", "INPUT_PRECISION", "UPSAMPLE"]  # fmt: skip


@_autotune(GEMM_CONFIGS, CONV_TUNING_KEY)
@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    N, H, W, C_IN, H_OUT, W_OUT, C_OUT,
    stride_xn, stride_xh, stride_xw,
    PAD_H, PAD_W, NEGATIVE_SLOPE,
    skip_ptr, C_SKIP, stride_sn, stride_sh, stride_sw,
    row_src0_ptr, row_src1_ptr, row_lambda0_ptr, row_lambda1_ptr,
    col_src0_ptr, col_src1_ptr, col_lambda0_ptr, col_lambda1_ptr,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, LEAKY: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPSAMPLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out (NHWC) = [act](conv(x, w) + bias), act ReLU, or LeakyReLU(NEGATIVE_SLOPE) with LEAKY;
    w is [C_OUT, KH, KW, C_IN] contiguous. With UPSAMPLE, the conv's input is
    cat([skip, upsample(x)]) (H x W, C_IN = C_SKIP + x's)."""
    M = N * H_OUT * W_OUT
    # Grouped program order: GROUP_M row-tiles share their weight tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_OUT, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size
    pid_n = (pid % pids_per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    n_valid = offs_n < C_OUT
    n, oh, ow = _pixel_coordinates(offs_m, H_OUT, W_OUT)
    x_base = n.to(tl.int64) * stride_xn + oh * stride_xh + ow * stride_xw
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * (KH * KW * C_IN)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_blocks = tl.cdiv(C_IN, BLOCK_K)
    for step in range(KH * KW * c_blocks):
        tap = step // c_blocks
        cs = (step % c_blocks) * BLOCK_K + offs_k
        kh = tap // KW
        kw = tap % KW
        a = _load_input_pixels(
            x_ptr, x_base, n, oh, ow, m_valid, kh - PAD_H, kw - PAD_W, cs,
            H, W, C_IN, stride_xn, stride_xh, stride_xw,
            skip_ptr, C_SKIP, stride_sn, stride_sh, stride_sw,
            row_src0_ptr, row_src1_ptr, row_lambda0_ptr, row_lambda1_ptr,
            col_src0_ptr, col_src1_ptr, col_lambda0_ptr, col_lambda1_ptr, UPSAMPLE,
        )  # fmt: skip
        b = tl.load(
            w_rows + (tap * C_IN + cs)[:, None],
            mask=(cs < C_IN)[:, None] & n_valid[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    if LEAKY:  # the slope scales the rounded output, as PyTorch's conv2d + leaky_relu does
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # (an fp16 overflow is -inf)
    if RELU:  # NaN stays NaN, as in torch.relu and leaky_relu; ReLU gives +0.0, not -0.0
        acc = tl.where(acc < 0, acc * NEGATIVE_SLOPE if LEAKY else 0.0, acc)
    out_pointers = out_ptr + offs_m.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
    tl.store(
        out_pointers,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_valid[:, None] & n_valid[None, :],
    )


@_autotune(GRAD_WEIGHT_CONFIGS, GRAD_WEIGHT_TUNING_KEY)
@triton.jit
def _conv2d_grad_weight_kernel(
    grad_ptr, x_ptr, partial_ptr,
    N, H, W, C_IN, H_OUT, W_OUT, C_OUT,
    stride_xn, stride_xh, stride_xw,
    PAD_H, PAD_W, M_PER_SPLIT,
    skip_ptr, C_SKIP, stride_sn, stride_sh, stride_sw,
    row_src0_ptr, row_src1_ptr, row_lambda0_ptr, row_lambda1_ptr,
    col_src0_ptr, col_src1_ptr, col_lambda0_ptr, col_lambda1_ptr,
    KH: tl.constexpr, KW: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPSAMPLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """partial[split, co, (kh, kw, ci)] = sum over this split's pixels of grad[m, co] * x[m + tap].

    Program (tile, split): tile = (co block, tap, ci block) so each x tile is one shifted,
    contiguous NHWC load; BLOCK_N spans C_out and BLOCK_K spans C_in.
    """
    M = N * H_OUT * W_OUT
    pid = tl.program_id(0)
    split = tl.program_id(1)
    c_blocks = tl.cdiv(C_IN, BLOCK_K)
    pid_n = pid // (KH * KW * c_blocks)
    tap = (pid // c_blocks) % (KH * KW)
    kh = tap // KW
    kw = tap % KW
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cs = (pid % c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    co_valid = offs_co < C_OUT

    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < m_end
        n, oh, ow = _pixel_coordinates(offs_m, H_OUT, W_OUT)
        x_base = n.to(tl.int64) * stride_xn + oh * stride_xh + ow * stride_xw
        a = _load_input_pixels(
            x_ptr, x_base, n, oh, ow, m_valid, kh - PAD_H, kw - PAD_W, cs,
            H, W, C_IN, stride_xn, stride_xh, stride_xw,
            skip_ptr, C_SKIP, stride_sn, stride_sh, stride_sw,
            row_src0_ptr, row_src1_ptr, row_lambda0_ptr, row_lambda1_ptr,
            col_src0_ptr, col_src1_ptr, col_lambda0_ptr, col_lambda1_ptr, UPSAMPLE,
        )  # fmt: skip
        # grad is [M, C_OUT] row-major; load its transpose tile [BLOCK_N, BLOCK_M].
        g = tl.load(
            grad_ptr + offs_m.to(tl.int64)[None, :] * C_OUT + offs_co[:, None],
            mask=co_valid[:, None] & m_valid[None, :],
            other=0.0,
        )
        acc = tl.dot(g, a, acc, input_precision=INPUT_PRECISION)

    k_total = KH * KW * C_IN
    partial_pointers = (
        partial_ptr
        + split.to(tl.int64) * C_OUT * k_total
        + offs_co[:, None] * k_total
        + (tap * C_IN + cs)[None, :]
    )
    tl.store(partial_pointers, acc, mask=co_valid[:, None] & (cs < C_IN)[None, :])


@triton.jit
def _relu_grad_kernel(
    grad_out_ptr, out_ptr, grad_ptr, bias_partial_ptr, M, C, NEGATIVE_SLOPE,
    LEAKY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad = 0 where out <= 0 else grad_out ([M, C] row-major), or with LEAKY grad_out where
    out > 0 else grad_out * NEGATIVE_SLOPE; and per-block column sums."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    offsets = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    grad_out = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0)
    out = tl.load(out_ptr + offsets, mask=mask, other=0.0)
    # As in PyTorch: a NaN output passes the gradient through ReLU, and scales it in LeakyReLU.
    if LEAKY:  # the product in fp32, as PyTorch's: a half scalar would round the slope first
        grad = tl.where(out > 0, grad_out, grad_out.to(tl.float32) * NEGATIVE_SLOPE)
    else:
        grad = tl.where(out <= 0, 0.0, grad_out)
    tl.store(grad_ptr + offsets, grad, mask=mask)
    column_sums = tl.sum(grad.to(tl.float32), axis=0)
    tl.store(bias_partial_ptr + pid_m * C + offs_c, column_sums, mask=offs_c < C)


def _input_precision(x: torch.Tensor) -> str:
    """TF32 for fp32 exactly when PyTorch's own CUDA convolution uses it, so both paths give the
    same numbers: cuDNN's convolution setting, or without cuDNN (off or not built) that of
    cuBLAS, whose matrix products PyTorch's fallback convolution makes.

    From torch 2.9 the settings are `fp32_precision`: the older `allow_tf32` flags raise once a
    user sets them through it (cuDNN's conv and RNN differing), so those are read only before."""
    if x.dtype != torch.float32 or not x.is_cuda:
        return "ieee"
    if cudnn_convolves():
        conv = getattr(torch.backends.cudnn, "conv", None)
        tf32 = torch.backends.cudnn.allow_tf32 if conv is None else conv.fp32_precision == "tf32"
    else:
        matmul = torch.backends.cuda.matmul
        precision = getattr(matmul, "fp32_precision", None)
        tf32 = matmul.allow_tf32 if precision is None else precision == "tf32"
    return "tf32" if tf32 else "ieee"


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _check_image_size(x: torch.Tensor) -> None:
    # Offsets within one image are int32; across the batch they are int64.
    if x.shape[1:].numel() >= 2**31:
        raise IndexRangeError(
            f"conv2d_relu: one image of shape {tuple(x.shape[1:])} is >= 2**31 elements, more "
            "than the Triton kernels index; run this layer on PyTorch's path "
            "(FASTUNET_BACKEND=torch)"
        )


def _check_pixel_count(n: int, height: int, width: int) -> None:
    # A GEMM row is a pixel (n, h, w), indexed in int32.
    if n * height * width >= 2**31:
        raise IndexRangeError(
            f"conv2d_relu: {n} images of {height}x{width} are >= 2**31 pixels, more than the "
            "Triton kernels index; run this layer on PyTorch's path (FASTUNET_BACKEND=torch) or "
            "in smaller batches"
        )


def _input_arguments(x, concat):
    """The conv input's (N, C_in, H, W), the fused loader's arguments (skip, C_skip, skip's
    strides, the eight axis tables; placeholders for a plain conv) and UPSAMPLE.

    concat: None, or (skip, mode, align_corners) for the input cat([skip, upsample(x)]), with
    x channels_last (skip is made so here)."""
    if concat is None:
        return x.shape, (x, 0, 0, 0, 0, *[x] * 8), "none"
    skip, mode, align_corners = concat
    skip = _channels_last(skip)
    _check_image_size(skip)
    rows = axis_tables(x.shape[2], skip.shape[2], mode, align_corners, x.device)
    cols = axis_tables(x.shape[3], skip.shape[3], mode, align_corners, x.device)
    tables = [t for a in (rows, cols) for t in (a.src0, a.src1, a.lambda0, a.lambda1)]
    shape = (skip.shape[0], skip.shape[1] + x.shape[1], *skip.shape[2:])
    skip_arguments = (skip, skip.shape[1], skip.stride(0), skip.stride(2), skip.stride(3))
    return shape, (*skip_arguments, *tables), mode


def _launch_conv(x, weight_khwc, bias, out, pad_h, pad_w, relu, concat=None, negative_slope=0.0):
    """out = [act](conv(x, weight) + bias) for NHWC x and out, weight as [C_out, KH, KW, C_in],
    act ReLU or LeakyReLU(negative_slope > 0); with concat (see `_input_arguments`) the conv's
    input is cat([skip, upsample(x)])."""
    (n, c_in, h, w), concat_arguments, upsample = _input_arguments(x, concat)
    c_out, kh, kw, _ = weight_khwc.shape
    h_out, w_out = out.shape[2:]
    _check_image_size(x)
    _check_image_size(out)
    _check_pixel_count(n, h_out, w_out)
    tiles = INTERPRETER_TILES | dict(GROUP_M=8) if INTERPRET else {}

    def grid(meta):
        m_tiles = cdiv(n * h_out * w_out, meta["BLOCK_M"])
        return (m_tiles * cdiv(c_out, meta["BLOCK_N"]),)

    args = (
        x, weight_khwc, bias if bias is not None else x, out,
        n, h, w, c_in, h_out, w_out, c_out,
        x.stride(0), x.stride(2), x.stride(3),
        pad_h, pad_w, float(negative_slope), *concat_arguments,
    )  # fmt: skip
    constexprs = dict(
        KH=kh, KW=kw, HAS_BIAS=bias is not None, RELU=relu, LEAKY=negative_slope > 0,
        INPUT_PRECISION=_input_precision(x), UPSAMPLE=upsample, **tiles,
    )  # fmt: skip
    skip = concat_arguments[0]
    dtypes = (x.dtype, weight_khwc.dtype, bias is not None and bias.dtype, out.dtype, skip.dtype)
    _launch(_conv2d_kernel, grid, args, constexprs, dtypes)
    return out


def forward(
    x, weight, bias, padding: int, relu: bool, concat=None, negative_slope: float = 0.0
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias, padding)) as a channels_last tensor, leaky_relu with
    negative_slope > 0; with concat = (skip, mode, align_corners) the input is
    cat([skip, upsample(x, skip's size)]), unstored."""
    n = x.shape[0]
    h, w = (x if concat is None else concat[0]).shape[2:]
    c_out, _, kh, kw = weight.shape
    out = torch.empty(
        (n, c_out, h + 2 * padding - kh + 1, w + 2 * padding - kw + 1),
        dtype=x.dtype, device=x.device, memory_format=torch.channels_last,
    )  # fmt: skip
    if out.numel() == 0:
        return out
    weight_khwc = weight.permute(0, 2, 3, 1).contiguous()
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[co] at offset co: no view, no stride 0
    return _launch_conv(
        _channels_last(x), weight_khwc, bias, out, padding, padding, relu, concat, negative_slope
    )


def grad_input(grad, weight, input_height: int, input_width: int, padding: int) -> torch.Tensor:
    """d(loss)/d(x) from the pre-activation gradient: a convolution with the flipped kernel."""
    n = grad.shape[0]
    _, c_in, kh, kw = weight.shape
    out = torch.empty(
        (n, c_in, input_height, input_width),
        dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last,
    )  # fmt: skip
    if out.numel() == 0:
        return out
    if grad.numel() == 0:
        return out.zero_()
    # flipped[ci, kh, kw, co] = weight[co, ci, KH-1-kh, KW-1-kw]
    flipped = weight.flip(2, 3).permute(1, 2, 3, 0).contiguous()
    return _launch_conv(
        _channels_last(grad), flipped, None, out, kh - 1 - padding, kw - 1 - padding, False
    )


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_count(m: int, tiles: int, device: torch.device) -> int:
    """Reduction slices so that about four programs per multiprocessor run, each >= 1 granule."""
    wanted = cdiv(4 * _multiprocessors(device), tiles)
    return max(1, min(wanted, cdiv(m, SPLIT_GRANULE)))


def grad_weight(
    grad, x, kernel_height: int, kernel_width: int, padding: int, concat=None
) -> torch.Tensor:
    """d(loss)/d(weight) from the pre-activation gradient, [C_out, C_in, KH, KW] contiguous;
    with concat = (skip, mode, align_corners) the conv's input was cat([skip, upsample(x)])."""
    x, grad = _channels_last(x), _channels_last(grad)
    (n, c_in, h, w), concat_arguments, upsample = _input_arguments(x, concat)
    c_out, h_out, w_out = grad.shape[1:]
    kh, kw = kernel_height, kernel_width
    m = n * h_out * w_out
    if m == 0:
        return torch.zeros((c_out, c_in, kh, kw), dtype=grad.dtype, device=grad.device)
    _check_image_size(x)
    _check_pixel_count(n, h_out, w_out)
    # Tile count at 64x64 sets the split; it must not depend on the autotuned tile.
    tiles = cdiv(c_out, 64) * kh * kw * cdiv(c_in, 64)
    split = _split_count(m, tiles, x.device)
    m_per_split = cdiv(cdiv(m, split), SPLIT_GRANULE) * SPLIT_GRANULE
    split = cdiv(m, m_per_split)
    partial = torch.empty((split, c_out, kh * kw * c_in), dtype=torch.float32, device=x.device)
    tiles = INTERPRETER_TILES if INTERPRET else {}

    def grid(meta):
        c_blocks = cdiv(c_in, meta["BLOCK_K"])
        return (cdiv(c_out, meta["BLOCK_N"]) * kh * kw * c_blocks, split)

    args = (
        grad, x, partial,
        n, h, w, c_in, h_out, w_out, c_out,
        x.stride(0), x.stride(2), x.stride(3),
        padding, padding, m_per_split, *concat_arguments,
    )  # fmt: skip
    constexprs = dict(KH=kh, KW=kw, INPUT_PRECISION=_input_precision(x), UPSAMPLE=upsample, **tiles)
    dtypes = (grad.dtype, x.dtype, concat_arguments[0].dtype)
    _launch(_conv2d_grad_weight_kernel, grid, args, constexprs, dtypes)
    total = partial[0] if split == 1 else partial.sum(0)
    return total.view(c_out, kh, kw, c_in).permute(0, 3, 1, 2).to(grad.dtype).contiguous()


RELU_GRAD_BLOCK_M = 64


def relu_grad(grad_out, out, negative_slope: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_out, zero where out <= 0, or times negative_slope > 0 where out is not > 0,
    channels_last; its sum over N, H, W for the bias)."""
    n, c, h, w = out.shape
    grad_out, out = _channels_last(grad_out), _channels_last(out)
    grad = torch.empty_like(out, memory_format=torch.channels_last)
    m = n * h * w
    if m == 0:
        return grad, torch.zeros(c, dtype=out.dtype, device=out.device)
    _check_pixel_count(n, h, w)
    block_c = min(128, next_power_of_2(c))
    m_blocks = cdiv(m, RELU_GRAD_BLOCK_M)
    partial = torch.empty((m_blocks, c), dtype=torch.float32, device=out.device)
    _relu_grad_kernel[(m_blocks, cdiv(c, block_c))](
        grad_out, out, grad, partial, m, c, float(negative_slope),
        LEAKY=negative_slope > 0, BLOCK_M=RELU_GRAD_BLOCK_M, BLOCK_C=block_c,
    )  # fmt: skip
    return grad, partial.sum(0).to(out.dtype)
