"""Fused upsample + concat and its deterministic backward: Triton kernels and their launchers.

Forward: `out = cat([skip, interpolate(x, size=skip.shape[-2:])], 1)` (or the upsampled channels
first), channels_last, in one kernel that writes each output element once and never materialises
the upsampled tensor.
Backward: grad_x, the adjoint of the upsample, as a gather: each input element sums the gradient
of the output positions it contributed to, in a fixed order, with no atomics, so it is bitwise
repeatable. (PyTorch's bilinear backward on CUDA scatters with atomics.)

Both kernels read per-axis tables built once on the host in fp32 with PyTorch's own formulas, so
the forward matches PyTorch's indices and weights, and the backward is its exact adjoint.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastunet.kernels import cdiv, next_power_of_2

# Elements one program handles: enough to hide memory latency on an H100 and to amortise the
# per-pixel index math over the channels; channels are the contiguous axis of channels_last.
ELEMENTS_PER_PROGRAM = 4096
MAX_BLOCK_CHANNELS = 128
NUM_WARPS = 8


@dataclass(frozen=True)
class AxisTables:
    """How one axis of the output (size out) reads the input (size in), and the reverse.

    Output index o reads input indices src0[o] and src1[o] with weights lambda0[o] and lambda1[o];
    input index i receives from the contiguous output range [first[i], first[i] + count[i]).
    """

    src0: torch.Tensor  # int32 [out]
    src1: torch.Tensor  # int32 [out]
    lambda0: torch.Tensor  # fp32 [out]
    lambda1: torch.Tensor  # fp32 [out]
    first: torch.Tensor  # int32 [in]
    count: torch.Tensor  # int32 [in]
    max_count: int


def _fp32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


@functools.lru_cache(maxsize=256)
def axis_tables(
    in_size: int, out_size: int, mode: str, align_corners: bool, device: torch.device
) -> AxisTables:
    """PyTorch's source indices and weights for one axis, computed in fp32 as PyTorch does."""
    dst = torch.arange(out_size, dtype=torch.float32)
    if mode == "bilinear" and in_size == out_size:
        # compute_source_index_and_lambda copies an axis whose size does not change: src1 is src0
        # (weight 0), so a NaN or inf never leaks into a neighbour, forward or backward.
        src0 = src1 = dst.to(torch.int32)
        lambda1 = torch.zeros(out_size, dtype=torch.float32)
    elif mode == "nearest":
        # nearest_neighbor_compute_source_index: min(floor(dst * (in / out)), in - 1).
        scale = _fp32(in_size) / _fp32(out_size)
        src0 = torch.floor(dst * scale).clamp_(max=in_size - 1).to(torch.int32)
        src1 = src0
        lambda1 = torch.zeros(out_size, dtype=torch.float32)
    else:
        # area_pixel_compute_source_index (linear, not cubic).
        if align_corners:
            scale = _fp32(in_size - 1) / _fp32(out_size - 1) if out_size > 1 else _fp32(0)
            src = scale * dst
        else:
            # PyTorch's compiled kernels fuse this multiply-add (one rounding). float64 holds the
            # exact result for fp32 operands, so rounding it once to fp32 gives the same bits.
            scale = _fp32(in_size) / _fp32(out_size)
            src = (scale.double() * (dst + 0.5).double() - 0.5).float().clamp_(min=0)
        src0 = torch.floor(src).to(torch.int32)
        src1 = src0 + (src0 < in_size - 1).to(torch.int32)
        lambda1 = src - src0
    lambda0 = 1 - lambda1
    # src0 and src1 never decrease along the axis and differ by at most 1, so the outputs that
    # read input i (src0 == i or src1 == i) are those with src1 >= i and src0 <= i: a range.
    inputs = torch.arange(in_size, dtype=torch.int32)
    first = torch.searchsorted(src1, inputs, side="left", out_int32=True)
    count = torch.searchsorted(src0, inputs, side="right", out_int32=True) - first
    tables = (src0, src1, lambda0, lambda1, first, count)
    return AxisTables(*(t.to(device) for t in tables), max_count=int(count.max()))


def _block_sizes(channels: int) -> tuple[int, int]:
    """(pixels, channels) per program: channels as wide as they go, pixels to fill the rest."""
    block_channels = min(next_power_of_2(channels), MAX_BLOCK_CHANNELS)
    return ELEMENTS_PER_PROGRAM // block_channels, block_channels


@triton.jit
def _pixel_block(pixel_block, num_pixels, height, width, BLOCK_PIXELS: tl.constexpr):
    """The mask and (n, h, w) of this block's pixels, in int64: offsets of tensors with more
    than 2**31 elements."""
    pixels = pixel_block.to(tl.int64) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
    w = pixels % width
    h = (pixels // width) % height
    n = pixels // width // height
    return pixels < num_pixels, n, h, w


@triton.jit
def bilinear_blend(
    top_left, top_right, bottom_left, bottom_right, h_lambda0, h_lambda1, w_lambda0, w_lambda1
):
    """PyTorch's order, in fp32: h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d). Shared with
    the decoder conv's loader, so both round the upsampled values alike."""
    top = w_lambda0 * top_left.to(tl.float32) + w_lambda1 * top_right.to(tl.float32)
    bottom = w_lambda0 * bottom_left.to(tl.float32) + w_lambda1 * bottom_right.to(tl.float32)
    return h_lambda0 * top + h_lambda1 * bottom


@triton.jit
def _upsample_concat_forward_kernel(
    x_ptr, skip_ptr, out_ptr,
    row_src0_ptr, row_src1_ptr, row_lambda0_ptr, row_lambda1_ptr,
    col_src0_ptr, col_src1_ptr, col_lambda0_ptr, col_lambda1_ptr,
    num_pixels, out_height, out_width, skip_channels, x_channels,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    skip_stride_n, skip_stride_c, skip_stride_h, skip_stride_w,
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    skip_offset, x_offset,
    NEAREST: tl.constexpr, BLOCK_PIXELS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_PIXELS output pixels x BLOCK_CHANNELS channels, either of skip's
    # channels (a copy) or of x's (the upsample), written from output channel skip_offset or
    # x_offset. The channel blocks of one pixel block are neighbours in launch order, so they
    # share the cache lines of the output rows.
    num_skip_blocks = tl.cdiv(skip_channels, BLOCK_CHANNELS)
    num_channel_blocks = num_skip_blocks + tl.cdiv(x_channels, BLOCK_CHANNELS)
    pid = tl.program_id(0)
    pixel_block = pid // num_channel_blocks
    channel_block = pid % num_channel_blocks

    pixel_mask, n, oh, ow = _pixel_block(
        pixel_block, num_pixels, out_height, out_width, BLOCK_PIXELS
    )
    out_pixel = out_ptr + n * out_stride_n + oh * out_stride_h + ow * out_stride_w

    if channel_block < num_skip_blocks:
        channels = channel_block.to(tl.int64) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
        mask = pixel_mask[:, None] & (channels < skip_channels)[None, :]
        skip_pixel = skip_ptr + n * skip_stride_n + oh * skip_stride_h + ow * skip_stride_w
        values = tl.load(skip_pixel[:, None] + channels[None, :] * skip_stride_c, mask=mask)
        out_channels = skip_offset + channels
        tl.store(out_pixel[:, None] + out_channels[None, :] * out_stride_c, values, mask=mask)
    else:
        channels = (channel_block - num_skip_blocks).to(tl.int64) * BLOCK_CHANNELS + tl.arange(
            0, BLOCK_CHANNELS
        )
        mask = pixel_mask[:, None] & (channels < x_channels)[None, :]
        x_image = x_ptr + n[:, None] * x_stride_n + channels[None, :] * x_stride_c
        h0 = tl.load(row_src0_ptr + oh, mask=pixel_mask, other=0).to(tl.int64)
        w0 = tl.load(col_src0_ptr + ow, mask=pixel_mask, other=0).to(tl.int64)
        top_left = tl.load(x_image + (h0 * x_stride_h + w0 * x_stride_w)[:, None], mask=mask)
        if NEAREST:
            # A copy, so bitwise equal to PyTorch, Inf and NaN included.
            values = top_left
        else:
            h1 = tl.load(row_src1_ptr + oh, mask=pixel_mask, other=0).to(tl.int64)
            w1 = tl.load(col_src1_ptr + ow, mask=pixel_mask, other=0).to(tl.int64)
            h_lambda0 = tl.load(row_lambda0_ptr + oh, mask=pixel_mask, other=0)[:, None]
            h_lambda1 = tl.load(row_lambda1_ptr + oh, mask=pixel_mask, other=0)[:, None]
            w_lambda0 = tl.load(col_lambda0_ptr + ow, mask=pixel_mask, other=0)[:, None]
            w_lambda1 = tl.load(col_lambda1_ptr + ow, mask=pixel_mask, other=0)[:, None]
            top_right = tl.load(x_image + (h0 * x_stride_h + w1 * x_stride_w)[:, None], mask=mask)
            bottom_left = tl.load(x_image + (h1 * x_stride_h + w0 * x_stride_w)[:, None], mask=mask)
            bottom_right = tl.load(
                x_image + (h1 * x_stride_h + w1 * x_stride_w)[:, None], mask=mask
            )
            values = bilinear_blend(
                top_left, top_right, bottom_left, bottom_right,
                h_lambda0, h_lambda1, w_lambda0, w_lambda1,
            ).to(out_ptr.dtype.element_ty)  # fmt: skip
        out_channels = x_offset + channels
        tl.store(out_pixel[:, None] + out_channels[None, :] * out_stride_c, values, mask=mask)


@triton.jit
def _read_term(reads, weight, grad):
    # Only the reads that happened: a 0 weight times an Inf gradient would add a NaN.
    return tl.where(reads[:, None], weight[:, None] * grad, 0.0)


@triton.jit
def _upsample_backward_kernel(
    grad_up_ptr, grad_x_ptr,
    row_src0_ptr, row_src1_ptr, row_lambda0_ptr, row_lambda1_ptr, row_first_ptr, row_count_ptr,
    col_src0_ptr, col_src1_ptr, col_lambda0_ptr, col_lambda1_ptr, col_first_ptr, col_count_ptr,
    num_pixels, in_height, in_width, channels, max_rows, max_cols,
    grad_up_stride_n, grad_up_stride_c, grad_up_stride_h, grad_up_stride_w,
    grad_x_stride_n, grad_x_stride_c, grad_x_stride_h, grad_x_stride_w,
    NEAREST: tl.constexpr, BLOCK_PIXELS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_PIXELS input pixels x BLOCK_CHANNELS channels of grad_x.
    num_channel_blocks = tl.cdiv(channels, BLOCK_CHANNELS)
    pid = tl.program_id(0)
    pixel_block = pid // num_channel_blocks
    channel_block = pid % num_channel_blocks

    pixel_mask, n, ih, iw = _pixel_block(pixel_block, num_pixels, in_height, in_width, BLOCK_PIXELS)
    channel_index = channel_block.to(tl.int64) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_index < channels
    grad_image = (
        grad_up_ptr + n[:, None] * grad_up_stride_n + channel_index[None, :] * grad_up_stride_c
    )

    first_row = tl.load(row_first_ptr + ih, mask=pixel_mask, other=0)
    row_count = tl.load(row_count_ptr + ih, mask=pixel_mask, other=0)
    first_col = tl.load(col_first_ptr + iw, mask=pixel_mask, other=0)
    col_count = tl.load(col_count_ptr + iw, mask=pixel_mask, other=0)

    # PyTorch's scatter adds, for each output position and each of its (up to four) reads of an
    # input element, (row lambda * column lambda) * grad; for nearest, grad itself. The gather
    # adds the same terms, in row-major order of the output: the same order on every run.
    acc = tl.zeros((BLOCK_PIXELS, BLOCK_CHANNELS), dtype=tl.float32)
    for i in range(0, max_rows):
        row_valid = pixel_mask & (i < row_count)
        oh = (first_row + i).to(tl.int64)
        if not NEAREST:
            row_reads0 = tl.load(row_src0_ptr + oh, mask=row_valid, other=-1) == ih
            row_reads1 = tl.load(row_src1_ptr + oh, mask=row_valid, other=-1) == ih
            row_lambda0 = tl.load(row_lambda0_ptr + oh, mask=row_valid, other=0)
            row_lambda1 = tl.load(row_lambda1_ptr + oh, mask=row_valid, other=0)
        for j in range(0, max_cols):
            valid = row_valid & (j < col_count)
            ow = (first_col + j).to(tl.int64)
            grad = tl.load(
                grad_image + (oh * grad_up_stride_h + ow * grad_up_stride_w)[:, None],
                mask=valid[:, None] & channel_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            if NEAREST:
                # The range holds exactly the outputs that copied this input element.
                acc += grad
            else:
                col_reads0 = tl.load(col_src0_ptr + ow, mask=valid, other=-1) == iw
                col_reads1 = tl.load(col_src1_ptr + ow, mask=valid, other=-1) == iw
                col_lambda0 = tl.load(col_lambda0_ptr + ow, mask=valid, other=0)
                col_lambda1 = tl.load(col_lambda1_ptr + ow, mask=valid, other=0)
                acc += _read_term(row_reads0 & col_reads0, row_lambda0 * col_lambda0, grad)
                acc += _read_term(row_reads0 & col_reads1, row_lambda0 * col_lambda1, grad)
                acc += _read_term(row_reads1 & col_reads0, row_lambda1 * col_lambda0, grad)
                acc += _read_term(row_reads1 & col_reads1, row_lambda1 * col_lambda1, grad)

    grad_x_pixel = grad_x_ptr + n * grad_x_stride_n + ih * grad_x_stride_h + iw * grad_x_stride_w
    tl.store(
        grad_x_pixel[:, None] + channel_index[None, :] * grad_x_stride_c,
        acc.to(grad_x_ptr.dtype.element_ty),
        mask=pixel_mask[:, None] & channel_mask[None, :],
    )


def _check_out(out: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must be {like.dtype} on {like.device} with shape {shape}, got "
            f"{out.dtype} on {out.device} with shape {tuple(out.shape)}"
        )


def upsample_concat_forward(
    x: torch.Tensor,
    skip: torch.Tensor,
    mode: str,
    align_corners: bool,
    out: torch.Tensor,
    skip_first: bool = True,
) -> torch.Tensor:
    """Write `cat([skip, interpolate(x, size=skip.shape[-2:])], 1)` into out and return it, or
    `cat([interpolate(...), skip], 1)` when not skip_first.

    x, skip and out: [N, C, H, W] of one dtype and device, any strides (the op layer validates
    x and skip and allocates out channels_last). mode: "nearest" or "bilinear".
    """
    n, skip_channels, out_height, out_width = skip.shape
    x_channels, in_height, in_width = x.shape[1:]
    _check_out(out, (n, skip_channels + x_channels, out_height, out_width), skip)
    if out.numel() == 0:
        return out
    rows = axis_tables(in_height, out_height, mode, align_corners, x.device)
    cols = axis_tables(in_width, out_width, mode, align_corners, x.device)
    num_pixels = n * out_height * out_width
    block_pixels, block_channels = _block_sizes(max(skip_channels, x_channels))
    num_channel_blocks = cdiv(skip_channels, block_channels) + cdiv(x_channels, block_channels)
    grid = (cdiv(num_pixels, block_pixels) * num_channel_blocks,)
    _upsample_concat_forward_kernel[grid](
        x, skip, out,
        rows.src0, rows.src1, rows.lambda0, rows.lambda1,
        cols.src0, cols.src1, cols.lambda0, cols.lambda1,
        num_pixels, out_height, out_width, skip_channels, x_channels,
        *x.stride(), *skip.stride(), *out.stride(),
        0 if skip_first else x_channels, skip_channels if skip_first else 0,
        NEAREST=mode == "nearest", BLOCK_PIXELS=block_pixels, BLOCK_CHANNELS=block_channels,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def upsample_backward(
    grad_up: torch.Tensor, mode: str, align_corners: bool, out: torch.Tensor
) -> torch.Tensor:
    """Write grad_x, the adjoint of the upsample applied to grad_up, into out and return it.

    grad_up: [N, C, H_out, W_out], e.g. the upsampled channels' slice of the concatenated
    gradient; out: [N, C, H_in, W_in]; any strides. Bitwise deterministic.
    """
    n, channels, out_height, out_width = grad_up.shape
    in_height, in_width = out.shape[2:]
    _check_out(out, (n, channels, in_height, in_width), grad_up)
    if out.numel() == 0:
        return out
    rows = axis_tables(in_height, out_height, mode, align_corners, grad_up.device)
    cols = axis_tables(in_width, out_width, mode, align_corners, grad_up.device)
    num_pixels = n * in_height * in_width
    block_pixels, block_channels = _block_sizes(channels)
    grid = (cdiv(num_pixels, block_pixels) * cdiv(channels, block_channels),)
    _upsample_backward_kernel[grid](
        grad_up, out,
        rows.src0, rows.src1, rows.lambda0, rows.lambda1, rows.first, rows.count,
        cols.src0, cols.src1, cols.lambda0, cols.lambda1, cols.first, cols.count,
        num_pixels, in_height, in_width, channels, rows.max_count, cols.max_count,
        *grad_up.stride(), *out.stride(),
        NEAREST=mode == "nearest", BLOCK_PIXELS=block_pixels, BLOCK_CHANNELS=block_channels,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return out
