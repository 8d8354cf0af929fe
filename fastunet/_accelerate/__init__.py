"""`fastunet.accelerate(model)`: a user's own UNet on fastunet's ops (see docs/accelerate.md)."""

from __future__ import annotations

import copy

from torch import nn

from fastunet._accelerate.modules import RuleScopedForward
from fastunet._accelerate.report import AccelerationReport
from fastunet._accelerate.swap import swap_modules
from fastunet._accelerate.traced import install_traced_forwards

REPORT_ATTRIBUTE = "fastunet_acceleration"


def accelerate(model: nn.Module, *, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """A module computing what `model` computes, with its UNet patterns on fastunet's ops.

    - Conv2d (stride 1, dilation 1, groups 1, zero padding alike on H and W), with what follows
      it in a Sequential: BatchNorm2d (folded while in eval mode), Identity and Dropout (while
      off), ReLU or LeakyReLU, as one `fastunet::conv2d_relu`; any other such Conv2d alone.
    - MaxPool2d(2) and `F.max_pool2d(x, 2)` as `fastunet::max_pool2d`.
    - `interpolate`/`Upsample` (nearest or bilinear, a size or scale_factor 2) then `cat` with a
      skip, in either order, through a zero or replicate pad whose amounts are zero for the
      sizes at hand, as `fastunet::upsample_concat`; conv [+ BatchNorm2d] + relu written in a
      forward, as `fastunet::conv2d_relu`. These are found by tracing each forward at its first
      call with new input shapes (see docs/accelerate.md).

    Everything else runs as it is. The parameters, buffers and state_dict keys are the model's,
    so checkpoints load strictly both ways; train/eval, autocast and torch.compile work as on the
    original. Activations keep the input's memory format, as in the original: channels_last input
    is the fast way (the ops compute channels_last, so NCHW costs a layout copy per layer).

    Args:
        model: the module to accelerate.
        inplace: change `model` itself (its parameters stay the same tensors, so an optimizer
            built on them keeps working) instead of a deep copy of it.
        verbose: print the report of what was replaced and what was left (see
            `acceleration_report`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, REPORT_ATTRIBUTE):
        raise ValueError("accelerate: this model is accelerated already")
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as error:  # a pruned or weight_norm'd model's computed weights
            raise RuntimeError(
                "accelerate: the model cannot be deep-copied, which accelerate does to leave it "
                f"unchanged; accelerate(model, inplace=True) changes the model itself ({error})"
            ) from error
    report = AccelerationReport()
    swap_modules(model, report)
    install_traced_forwards(model, report)
    model.forward = RuleScopedForward(model, model.__dict__.get("forward"))
    setattr(model, REPORT_ATTRIBUTE, report)
    if verbose:
        print(report)
    return model


def acceleration_report(model: nn.Module) -> AccelerationReport:
    """What `accelerate` replaced in `model` and what it left, and why: `print(...)` it. Patterns
    in forward code are added when that code first runs with new input shapes."""
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if not isinstance(report, AccelerationReport):
        raise ValueError("acceleration_report: the model was not made by fastunet.accelerate")
    return report


__all__ = ["AccelerationReport", "accelerate", "acceleration_report"]
