"""How far fastunet.UNet is from the reference, forward and backward, in a given dtype.

The truth is ReferenceUNet in float64 on the same weights and inputs. Each model's relative error
against it, ||out - truth|| / ||truth||, is reported for fastunet and for PyTorch's own module in
the same dtype, and their ratio is the parity figure (flash-attention's rule: at most 2).
"""

from __future__ import annotations

import torch

from fastunet.models import ReferenceUNet, UNet
from fastunet.ops import _choice

# On the CPU fastunet's layers run the reference's own aten calls (`_choice.CPU_CHOICE`): parity
# there checks the model around them, not fastunet's kernels.
CPU_RULE_NOTE = (
    "fastunet's layers ran PyTorch's own path by the CPU rule, the reference's aten calls, so a "
    "ratio of about 1 is expected; TRITON_INTERPRET=1 runs fastunet's kernels"
)


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """||value - truth|| / ||truth|| in float64; inf if value has a NaN or Inf the truth lacks."""
    value, truth = value.detach().double(), truth.detach().double()
    if not torch.equal(torch.isfinite(value), torch.isfinite(truth)):
        return float("inf")
    finite = torch.isfinite(truth)
    diff = torch.linalg.vector_norm((value - truth)[finite])
    scale = torch.linalg.vector_norm(truth[finite])
    return float(diff / scale) if scale > 0 else float(diff)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def error_ratio(error: float, torch_error: float) -> float:
    """fastunet's error over PyTorch's own; 0 when both are exact."""
    if torch_error > 0:
        return error / torch_error
    return 0.0 if error == 0 else float("inf")


def layer_paths(calls: list) -> dict:
    """How many of fastunet's layer calls ran each path, and why; whether all ran PyTorch's path
    by the CPU rule; and the layout the model chose to run in (on the CPU; None where it chose
    none)."""
    reasons: dict[str, int] = {}
    layout = None
    cpu_rule = bool(calls)
    for _, choice in calls:
        if choice.path in _choice.LAYOUTS:
            layout = choice.path
            continue
        reason = choice.reason.split(":")[0]  # "measured", "CPU", ...: the figures stay out
        reasons[reason] = reasons.get(reason, 0) + 1
        cpu_rule = cpu_rule and choice is _choice.CPU_CHOICE
    return {**_choice.summarize(calls), "reasons": reasons, "cpu_rule": cpu_rule, "layout": layout}


def _run(model, x, grad_out, autocast_dtype):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(x)
    out.backward(grad_out.to(out.dtype))
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    return out.detach(), x.grad.detach(), grads


def compare(
    batch: int = 2,
    size: int = 64,
    base_channels: int = 8,
    depth: int = 3,
    in_channels: int = 3,
    num_classes: int = 2,
    upsample: str = "nearest",
    dtype: torch.dtype = torch.float32,
    autocast: bool = False,
    channels_last: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict:
    """Errors of UNet and ReferenceUNet against the float64 reference, forward and backward.

    With autocast, the models hold fp32 weights and run under torch.autocast(dtype).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    truth_model = ReferenceUNet(
        in_channels, num_classes, base_channels, depth, upsample=upsample
    ).to(device=device, dtype=torch.float64)
    model_dtype = torch.float32 if autocast else dtype
    reference = truth_model.convert_to(ReferenceUNet).to(dtype=model_dtype)
    fast = UNet.from_reference(reference)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, in_channels, size, size, generator=generator, dtype=torch.float64)
    x = x.to(device).contiguous(memory_format=layout)
    grad_out = torch.randn(batch, num_classes, size, size, generator=generator, dtype=torch.float64)
    grad_out = grad_out.to(device)

    truth = _run(truth_model, x, grad_out, None)
    autocast_dtype = dtype if autocast else None
    results, calls = {}, []
    for name, model in (("reference", reference), ("fastunet", fast)):
        with _choice.recording() as recorded:  # only fastunet's layers record their path
            got = _run(model, x.to(model_dtype), grad_out, autocast_dtype)
        calls += recorded
        results[name] = {
            key: relative_error(value, expected)
            for key, value, expected in zip(
                ("output", "grad_input", "grad_params"), got, truth, strict=True
            )
        }
    ratio = {
        key: error_ratio(results["fastunet"][key], results["reference"][key])
        for key in results["fastunet"]
    }
    return {
        "case": dict(
            batch=batch, size=size, base_channels=base_channels, depth=depth,
            upsample=upsample, dtype=dtype_name(dtype), autocast=autocast,
            channels_last=channels_last, device=str(device),
        ),
        **results,
        "ratio": ratio,
        "layers": layer_paths(calls),
    }  # fmt: skip
