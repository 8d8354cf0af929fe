"""`fastunet bench`'s accelerate cases: a UNet written in milesial's style
(`fastunet.bench.styles`), run through `fastunet.accelerate`, against the same model as written."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastunet import accelerate
from fastunet.bench import parity
from fastunet.bench.styles import MilesialStyleUNet


def build(base_channels: int, depth: int, device) -> tuple[nn.Module, nn.Module]:
    """(the model as written, its accelerated copy)."""
    original = MilesialStyleUNet(3, 2, base_channels, depth).to(device)
    return original, accelerate(original)


def flops(model: nn.Module, batch: int, size: int, backward: bool) -> int:
    """FLOPs of one step of the model as written, counted by PyTorch on the meta device."""
    model = copy.deepcopy(model).to("meta")
    x = torch.empty(batch, 3, size, size, device="meta", requires_grad=backward)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def compare(
    base_channels: int,
    depth: int,
    size: int,
    dtype: torch.dtype,
    autocast: bool,
    device,
    batch: int = 2,
    seed: int = 0,
) -> dict:
    """Errors of the model as written and of its accelerated copy against the float64 model,
    forward and backward, in eval mode (where the BatchNorms fold), in `parity.compare`'s form."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    truth_model = MilesialStyleUNet(3, 2, base_channels, depth).to(device, torch.float64).eval()
    model_dtype = torch.float32 if autocast else dtype
    original = copy.deepcopy(truth_model).to(model_dtype)
    fast = accelerate(original)
    x = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(batch, 2, size, size, generator=generator, dtype=torch.float64)
    truth = parity._run(truth_model, x, grad_out.to(device), None)
    autocast_dtype = dtype if autocast else None
    results = {}
    for name, model in (("reference", original), ("fastunet", fast)):
        if model is fast:  # its first call with these shapes runs the decoders' code as written
            parity._run(model, x.to(model_dtype), grad_out.to(device), autocast_dtype)
        got = parity._run(model, x.to(model_dtype), grad_out.to(device), autocast_dtype)
        results[name] = {
            key: parity.relative_error(value, expected)
            for key, value, expected in zip(
                ("output", "grad_input", "grad_params"), got, truth, strict=True
            )
        }
    ratio = {key: parity.error_ratio(results["fastunet"][key], results["reference"][key])
             for key in results["fastunet"]}  # fmt: skip
    return {**results, "ratio": ratio}
