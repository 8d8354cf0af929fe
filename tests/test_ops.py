"""The op layer: registration (opcheck), autograd formulas (gradcheck), errors, layouts."""

import functools
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import backend_device, output_and_grads, torch_conv2d_relu, torch_upsample_concat
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import forward_ad
from torch.library import opcheck

import fastunet.nn
from fastunet import ops
from fastunet.bench.parity import relative_error
from fastunet.nn import UpsampleConcat
from fastunet.ops import _backend, _choice
from fastunet.ops._common import in_memory_format, memory_format_of
from fastunet.ops.conv2d_relu import conv2d_grad, conv2d_relu_grad_output
from fastunet.ops.max_pool2d import max_pool2d_backward
from fastunet.ops.upsample_concat import upsample_grad


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


# opcheck runs each op several times, so these shapes are small: the interpreter is slow.
def opcheck_cases():
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    out = ops.conv2d_relu(x, w, b).detach()
    grad = channels_last(torch.randn(2, 5, 7, 6))
    small = torch.randn(2, 4, 3, 5, requires_grad=True)
    skip = torch.randn(2, 3, 7, 9, requires_grad=True)
    pooled, argmax = ops.max_pool2d_with_argmax(x.detach())
    return [
        (ops.conv2d_relu, (x, w, b, 1, True)),
        (ops.conv2d_relu, (channels_last(x.detach()).requires_grad_(), w, None, 0, False)),
        (conv2d_relu_grad_output, (grad, out)),
        (conv2d_grad, (grad, x.detach(), w.detach(), 1, True, True)),
        (conv2d_grad, (grad, x.detach(), w.detach(), 1, True, False)),
        (conv2d_grad, (grad, x.detach(), w.detach(), 1, False, True)),
        (ops.upsample_concat, (small, skip, "nearest", False)),
        (ops.upsample_concat, (small, channels_last(skip.detach()), "bilinear", True)),
        (upsample_grad, (channels_last(torch.randn(2, 4, 7, 9)), 3, 5, "bilinear", False)),
        (ops.max_pool2d_with_argmax, (x,)),
        (ops.max_pool2d_with_argmax, (channels_last(x.detach()).requires_grad_(),)),
        (max_pool2d_backward, (torch.randn_like(pooled), argmax, 7, 6)),
        (ops.conv2d_relu, (x, w, b, 1, True, 0.1)),
        (conv2d_relu_grad_output, (grad, out, 0.1)),
        (ops.upsample_concat, (small, skip, "bilinear", False, False)),
    ]


@pytest.mark.parametrize("case", range(15))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    opcheck(op, args)


# gradcheck in float64 checks each autograd formula against finite differences.
@pytest.mark.parametrize(
    "relu,bias,padding,kernel",
    [(True, True, 1, 3), (False, False, 0, 1), (True, False, 2, 3), (False, True, 0, 2)],
)
def test_conv2d_relu_gradcheck(relu, bias, padding, kernel):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    torch.autograd.gradcheck(lambda *a: ops.conv2d_relu(*a, padding, relu), (x, w, b))


@pytest.mark.parametrize(
    "mode,align", [("nearest", False), ("bilinear", False), ("bilinear", True)]
)
def test_upsample_concat_gradcheck(mode, align):
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: ops.upsample_concat(a, b, mode, align), (x, skip))


def test_leaky_relu_and_upsampled_first_gradcheck():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: ops.conv2d_relu(*a, 1, True, 0.2), (x, w, b))
    skip = torch.randn(2, 2, 9, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda a, s: ops.upsample_concat(a, s, "bilinear", False, False), (x, skip)
    )


def test_max_pool2d_gradcheck():
    # Distinct values, so no window has a tie that finite differences would straddle.
    x = torch.randperm(2 * 3 * 5 * 7, dtype=torch.float64).reshape(2, 3, 5, 7)
    x.requires_grad_()
    torch.autograd.gradcheck(ops.max_pool2d, (x,))


def _decoder_composite(x, skip, weight, bias):
    return torch_conv2d_relu(
        torch_upsample_concat(x, skip, "nearest", False), weight, bias, 1, True
    )


# (op, PyTorch's composite, input shapes): each op with every tensor input differentiated.
SECOND_ORDER_CASES = {
    "conv2d_relu": (
        ops.conv2d_relu, functools.partial(torch_conv2d_relu, padding=1, relu=True),
        [(1, 2, 4, 5), (3, 2, 3, 3), (3,)],
    ),
    "conv2d_leaky_relu": (
        lambda x, w: ops.conv2d_relu(x, w, None, 1, True, 0.1),
        lambda x, w: torch_conv2d_relu(x, w, None, 1, True, 0.1),
        [(2, 2, 4, 4), (3, 2, 3, 3)],
    ),
    "conv2d": (
        lambda x, w: ops.conv2d_relu(x, w, None, 0, False),
        lambda x, w: torch_conv2d_relu(x, w, None, 0, False),
        [(1, 3, 5, 4), (2, 3, 2, 2)],
    ),
    "upsample_concat": (
        lambda x, s: ops.upsample_concat(x, s, "bilinear", False, False),
        lambda x, s: torch_upsample_concat(x, s, "bilinear", False, False),
        [(1, 2, 3, 3), (1, 1, 6, 7)],
    ),
    "max_pool2d": (ops.max_pool2d, lambda x: F.max_pool2d(x, 2), [(2, 2, 5, 4)]),
    "upsample_concat_conv2d_relu": (
        ops.upsample_concat_conv2d_relu, _decoder_composite,
        [(1, 2, 3, 3), (1, 1, 6, 6), (3, 3, 3, 3), (3,)],
    ),
}  # fmt: skip


def _penalty_gradients(function, inputs):
    """The gradient of a gradient penalty (the squared norm of the gradients, create_graph=True)
    with respect to each input that requires one."""
    wrt = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(function(*inputs).square().sum(), wrt, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), wrt)


@pytest.mark.parametrize("wrt", ["all", "first"])
@pytest.mark.parametrize("case", SECOND_ORDER_CASES)
def test_a_gradient_penalty_matches_pytorchs(backend, case, wrt):
    """Differentiating a gradient (create_graph=True) records the backward ops with their own
    formula, PyTorch's composite recomputed: the result is PyTorch's, on each backend's first
    order (the Triton and _C backward kernels), with every input or the first alone requiring
    a gradient. Before, it raised "no autograd formula"."""
    op, composite, shapes = SECOND_ORDER_CASES[case]
    device = backend_device(backend)
    inputs = [torch.randn(s, device=device, requires_grad=i == 0 or wrt == "all")
              for i, s in enumerate(shapes)]  # fmt: skip
    expected = _penalty_gradients(composite, inputs)
    for got, want in zip(_penalty_gradients(op, inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", SECOND_ORDER_CASES)
def test_input_gradients_have_the_layouts_pytorchs_give(backend, case, layout):
    """As the composite's: the layer before may compute in the gradient's layout (PyTorch
    2.13's CPU InstanceNorm2d backward is wrong at batch 1 for a channels_last gradient), and
    NCHW in, NCHW gradient out. Before, every conv and upsample input gradient was
    channels_last."""
    op, composite, shapes = SECOND_ORDER_CASES[case]
    device = backend_device(backend)
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[layout]
    inputs = [torch.randn(s, device=device).contiguous(memory_format=fmt).requires_grad_()
              if len(s) == 4 else torch.randn(s, device=device, requires_grad=True)
              for s in shapes]  # fmt: skip
    grad_out = torch.randn_like(composite(*inputs)).contiguous(memory_format=fmt)
    ours = torch.autograd.grad(op(*inputs), inputs, grad_out)
    theirs = torch.autograd.grad(composite(*inputs), inputs, grad_out)
    for got, expected in zip(ours, theirs, strict=True):
        assert got.stride() == expected.stride()


@pytest.mark.parametrize("case", SECOND_ORDER_CASES)
def test_second_derivatives_gradgradcheck(case):
    """Second derivatives against finite differences of the first, in float64."""
    op, _, shapes = SECOND_ORDER_CASES[case]
    inputs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradgradcheck(op, inputs)


@pytest.mark.parametrize("case", ["conv2d_leaky_relu", "upsample_concat_conv2d_relu"])
def test_third_derivatives_gradgradcheck(case):
    """The backward ops' formula is differentiable again: third derivatives, through a cube
    (whose third derivative is not zero), against finite differences."""
    op, _, shapes = SECOND_ORDER_CASES[case]
    inputs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]

    def gradients(*tensors):
        return torch.autograd.grad(op(*tensors).pow(3).sum(), tensors, create_graph=True)

    assert torch.autograd.gradgradcheck(gradients, inputs)


@pytest.mark.parametrize("how", ["torch.func.jvp", "forward_ad"])
@pytest.mark.parametrize(
    "op,shapes",
    [
        (ops.conv2d_relu, [(1, 2, 4, 4), (3, 2, 3, 3), (3,)]),
        (ops.upsample_concat, [(1, 2, 3, 3), (1, 1, 6, 6)]),
        (ops.max_pool2d, [(1, 2, 4, 4)]),
        (ops.upsample_concat_conv2d_relu, [(1, 2, 3, 3), (1, 1, 6, 6), (3, 3, 3, 3)]),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_forward_mode_ad_is_refused_not_silently_zero(backend, op, shapes, how):
    """A custom op drops forward-mode tangents without an error (torch 2.13): the JVP came out
    zero. The ops refuse instead, and run as before once the dual level is left."""
    device = backend_device(backend)
    inputs = [torch.randn(s, device=device) for s in shapes]
    tangents = [torch.ones_like(t) for t in inputs]
    with pytest.raises(RuntimeError, match="no forward-mode AD"):
        if how == "torch.func.jvp":
            torch.func.jvp(op, tuple(inputs), tuple(tangents))
        else:
            with forward_ad.dual_level():
                op(*(forward_ad.make_dual(t, d) for t, d in zip(inputs, tangents, strict=True)))
    assert op(*inputs).shape[0] == 1


def test_torch_func_vmap_equals_a_loop_and_grad_is_refused(backend):
    """vmap batches the ops (over x and a per-example weight, say); torch.func.grad of an op
    called directly raises PyTorch's error for a custom op's autograd, not a wrong gradient."""
    device = backend_device(backend)
    x, weights = (
        torch.randn(3, 1, 2, 5, 4, device=device),
        torch.randn(3, 4, 2, 3, 3, device=device),
    )
    skips = torch.randn(3, 1, 1, 9, 7, device=device)
    cases = [
        (lambda a, w, s: ops.conv2d_relu(a, w), torch.allclose),
        (lambda a, w, s: ops.upsample_concat(a, s, "bilinear"), torch.allclose),
        (lambda a, w, s: ops.max_pool2d(a), torch.equal),
    ]
    for op, same in cases:
        looped = torch.stack([op(*args) for args in zip(x, weights, skips, strict=True)])
        assert same(torch.func.vmap(op)(x, weights, skips), looped)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda a: ops.conv2d_relu(a, weights[0]).sum())(x[0])


def test_torch_func_grad_through_a_layer_names_the_op_and_the_way_out(backend):
    """Where a layer runs the op, torch.func.grad (and vjp, jacrev) would raise PyTorch's error
    about setup_context; the layer says which op and what to use. A function whose layer does
    not depend on grad's argument still works."""
    device = backend_device(backend)
    layer = fastunet.nn.Conv2dReLU(2, 3, 3, padding=1).to(device)
    x = torch.randn(1, 2, 5, 4, device=device)
    with pytest.raises(RuntimeError, match=r"conv2d_relu: torch\.func\.grad, vjp and jacrev"):
        torch.func.grad(lambda a: layer(a).sum())(x)
    scale = torch.tensor(2.0, device=device)
    assert torch.func.grad(lambda s: layer(x).sum() * s)(scale) == layer(x).sum()


def test_ops_equal_their_composites():
    x, w, b = torch.randn(2, 3, 9, 8), torch.randn(6, 3, 3, 3), torch.randn(6)
    torch.testing.assert_close(ops.conv2d_relu(x, w, b), F.relu(F.conv2d(x, w, b, padding=1)))
    up, skip = torch.randn(2, 4, 4, 3), torch.randn(2, 2, 9, 7)
    torch.testing.assert_close(
        ops.upsample_concat(up, skip, "bilinear", True),
        torch.cat([skip, F.interpolate(up, (9, 7), mode="bilinear", align_corners=True)], 1),
    )
    assert torch.equal(ops.max_pool2d(x), F.max_pool2d(x, 2))


def test_output_layouts():
    x = torch.randn(2, 3, 8, 6)
    assert ops.conv2d_relu(x, torch.randn(4, 3, 3, 3)).is_contiguous(
        memory_format=torch.channels_last
    )
    assert ops.upsample_concat(x, torch.randn(2, 2, 9, 9)).is_contiguous(
        memory_format=torch.channels_last
    )
    assert ops.max_pool2d(x).is_contiguous()
    assert ops.max_pool2d(channels_last(x)).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: ops.conv2d_relu(torch.randn(3, 8, 8), torch.randn(4, 3, 3, 3)), ValueError,
         "x must be 4-D"),
        (lambda: ops.conv2d_relu(torch.randn(1, 2, 8, 8), torch.randn(4, 3, 3, 3)), ValueError,
         "x has 2 channels .* weight expects 3"),
        (lambda: ops.conv2d_relu(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3)), ValueError,
         "weight must be 4-D"),
        (lambda: ops.conv2d_relu(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(3)),
         ValueError, r"bias must have shape \(4,\)"),
        (lambda: ops.conv2d_relu(torch.ones(1, 3, 8, 8, dtype=torch.int32),
                                 torch.randn(4, 3, 3, 3)), TypeError, "floating-point.*int32"),
        (lambda: ops.conv2d_relu(torch.randn(1, 3, 8, 8).half(), torch.randn(4, 3, 3, 3)),
         TypeError, "weight is torch.float32 but x is torch.float16"),
        (lambda: ops.conv2d_relu(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3, device="meta")),
         ValueError, "weight is on meta but x is on cpu"),
        (lambda: ops.conv2d_relu(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 5, 5), padding=1),
         ValueError, "smaller than the 5x5 kernel"),
        (lambda: ops.conv2d_relu(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), padding=-1),
         ValueError, "padding must be >= 0"),
        # PyTorch returns (N, 0, H_out, W_out) for no input channels, not C_out channels of bias
        (lambda: ops.conv2d_relu(torch.randn(2, 0, 5, 5), torch.randn(4, 0, 3, 3), torch.ones(4)),
         ValueError, r"x has no channels or an empty spatial size, shape \(2, 0, 5, 5\)"),
        (lambda: ops.conv2d_relu(torch.randn(2, 3, 0, 5), torch.randn(4, 3, 3, 3), padding=2),
         ValueError, "x has no channels or an empty spatial size"),
        (lambda: ops.upsample_concat_conv2d_relu(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 8, 0),
                                                 torch.randn(4, 5, 3, 3)),
         ValueError, "upsample_concat_conv2d_relu: skip has an empty spatial size"),
        (lambda: ops.conv2d_relu(torch.randn(1, 2, 3, 3), torch.randn(0, 2, 3, 3)), ValueError,
         r"weight has no output channels, shape \(0, 2, 3, 3\)"),
        # PyTorch refuses these whatever the batch, a batch of none too
        (lambda: ops.upsample_concat(torch.randn(0, 0, 2, 2), torch.randn(0, 2, 4, 4)),
         ValueError, "x has no channels or an empty spatial size"),
        (lambda: ops.upsample_concat(torch.randn(0, 1, 2, 2), torch.randn(0, 2, 0, 4)),
         ValueError, "skip has an empty spatial size"),
        (lambda: ops.max_pool2d(torch.randn(2, 0, 4, 4)), ValueError, "x has no channels"),
        (lambda: ops.conv2d_relu(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3),
                                 negative_slope=-0.1), ValueError, "negative_slope must be"),
        (lambda: ops.conv2d_relu(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), relu=False,
                                 negative_slope=0.1), ValueError, "needs relu=True"),
        (lambda: ops.upsample_concat(torch.randn(2, 3, 4, 4), torch.randn(1, 3, 8, 8)),
         ValueError, "x has batch 2 .* skip has batch 1"),
        (lambda: ops.upsample_concat(torch.randn(2, 3, 4), torch.randn(2, 3, 8, 8)), ValueError,
         "x must be 4-D"),
        (lambda: ops.upsample_concat(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8), "bicubic"),
         ValueError, "mode must be one of"),
        # F.interpolate refuses it too
        (lambda: ops.upsample_concat(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8), "nearest",
                                     True),
         ValueError, "align_corners=True is for mode 'bilinear', not 'nearest'"),
        (lambda: ops.upsample_concat_conv2d_relu(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 8, 8),
                                                 torch.randn(4, 5, 3, 3), align_corners=True),
         ValueError, "upsample_concat_conv2d_relu: align_corners=True is for mode 'bilinear'"),
        # At construction: on the CPU, PyTorch's path would have taken bicubic until a GPU
        (lambda: UpsampleConcat("nearest", True), ValueError,
         "UpsampleConcat: align_corners=True is for mode 'bilinear'"),
        (lambda: UpsampleConcat("bicubic"), ValueError, "UpsampleConcat: mode must be one of"),
        # nn.Conv2d takes it, and its forward refuses it
        (lambda: fastunet.nn.Conv2dReLU(3, 4, 3, padding=True), TypeError,
         "padding must be an int, got True"),
        (lambda: fastunet.nn.Conv2dReLU(3, 4, 3, padding="same"), TypeError,
         "padding must be an int, got 'same'"),
        # nn.Conv2d's fourth is stride: keyword-only, so no one pads by mistake
        (lambda: fastunet.nn.Conv2dReLU(3, 4, 3, 1), TypeError, "positional argument"),
        (lambda: ops.upsample_concat(torch.randn(1, 3, 4, 4).double(), torch.randn(1, 3, 8, 8)),
         TypeError, "skip is torch.float32 but x is torch.float64"),
        (lambda: ops.upsample_concat(torch.randn(1, 3, 4, 4),
                                     torch.randn(1, 3, 8, 8, device="meta")),
         ValueError, "skip is on meta but x is on cpu"),
        (lambda: ops.max_pool2d(torch.randn(1, 3, 1, 8)), ValueError, "H and W must be >= 2"),
        (lambda: ops.max_pool2d(torch.ones(1, 3, 4, 4, dtype=torch.bool)), TypeError,
         "floating-point.*bool"),
    ],
)  # fmt: skip
def test_bad_arguments_get_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _layer_and_pytorch(case, device):
    """(fastunet.nn layer, its torch.nn / F counterpart with the same weights, inputs)."""
    kind, *arguments = LAYER_CASES[case]
    x = torch.randn(arguments[0], device=device)
    if kind == "pool":
        x = x if arguments[1:] == [] else (x * 9).to(arguments[1])
        return fastunet.nn.MaxPool2d(), lambda t: F.max_pool2d(t, 2), (x,)
    if kind == "upsample":
        skip_dtype = arguments[3] if len(arguments) > 3 else x.dtype
        skip = torch.randn(arguments[1], device=device, dtype=skip_dtype)
        layer = UpsampleConcat("bilinear", arguments[2])
        return layer, lambda a, b: torch_upsample_concat(a, b, "bilinear", True), (x, skip)
    c_in, padding = arguments[1:]
    layer = fastunet.nn.Conv2dReLU(c_in, 4, 3, padding=padding).to(device)
    pytorch = torch.nn.Conv2d(c_in, 4, 3, padding=padding).to(device)
    pytorch.load_state_dict(layer.state_dict())
    return layer, lambda t: F.relu(pytorch(t)), (x,)


# (kind, input shape, ...): what torch.nn's layers take and fastunet's ops do not, or arguments
# the ops' schemas would convert.
LAYER_CASES = {
    "unbatched-conv": ("conv", (3, 5, 6), 3, 1),
    "conv-without-input-channels": ("conv", (2, 0, 5, 5), 0, 1),
    "conv-numpy-padding": ("conv", (1, 3, 5, 5), 3, np.int64(2)),
    "unbatched-pool": ("pool", (3, 6, 7)),
    "integer-pool": ("pool", (1, 2, 4, 4), torch.int64),
    "align-corners-1": ("upsample", (1, 2, 3, 3), (1, 1, 6, 7), 1),
    "float64-skip": ("upsample", (1, 2, 3, 3), (1, 1, 6, 7), True, torch.float64),  # cat promotes
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_a_layer_takes_what_its_pytorch_counterpart_takes(backend, case):
    """On every path. Before, these ran on the CPU's PyTorch path but raised where the layer
    runs fastunet's op (a GPU, the interpreter, a forced backend)."""
    layer, pytorch, inputs = _layer_and_pytorch(case, backend_device(backend))
    with _choice.recording() as calls:
        out = layer(*inputs)
    torch.testing.assert_close(out, pytorch(*inputs), rtol=1e-5, atol=1e-5)
    # Counted and said why, as every layer's choice.
    taken = "numpy" in case or "align" in case
    assert [choice.reason for _, choice in calls if choice == _choice.NOT_TAKEN_CHOICE] == (
        [] if taken else [_choice.NOT_TAKEN_CHOICE.reason]
    )


def test_forced_backend_is_validated(monkeypatch):
    monkeypatch.setenv("FASTUNET_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTUNET_BACKEND='cudnn' is not understood"):
        ops.conv2d_relu(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3))


def test_max_pool2d_composite_gradient_is_bitwise_torchs(torch_backend):
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    grad = torch.randn(2, 3, 3, 3)
    grad[0, 0, 0] = -0.0  # PyTorch's scatter into zeros lands it as +0.0
    (expected,) = torch.autograd.grad(F.max_pool2d(x, 2), x, grad)
    (got,) = torch.autograd.grad(ops.max_pool2d(x), x, grad)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize(
    "capability,runs",
    [((9, 0), True), ((8, 6), True), ((8, 9), True), ((12, 0), True), ((10, 0), True),
     ((7, 5), True), ((7, 0), False), ((6, 1), False)],
)  # fmt: skip
def test_missing_arch_names_the_gpu_and_how_to_build(capability, runs):
    archs = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
    message = _backend.missing_arch(capability, archs)
    assert (message is None) == runs
    if not runs:
        arch = f"{capability[0]}{capability[1]}"
        assert f"this GPU is sm_{arch}" in message
        assert f"FASTUNET_CUDA_ARCHS={arch} pip install" in message
    # sm_80 machine code runs on sm_86 but not on sm_90, which needs PTX
    assert _backend.missing_arch((8, 6), ["sm_80"]) is None
    assert _backend.missing_arch((9, 0), ["sm_80"]) is not None


def test_a_gpu_without_code_in_the_build_gets_a_clear_error(monkeypatch):
    op_module = sys.modules["fastunet.ops.max_pool2d"]  # fastunet.ops.max_pool2d is the op
    unsupported = _backend.Backend("unsupported", "this GPU is sm_70, ...")
    monkeypatch.setattr(op_module, "choose", lambda *args: unsupported)
    with pytest.raises(RuntimeError, match="max_pool2d: this GPU is sm_70"):
        ops.max_pool2d(torch.randn(1, 1, 4, 4))


def test_without_triton_the_triton_ops_say_why_and_run_the_composite(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton fails
    _backend.triton_kernels_error.cache_clear()
    try:
        backend = _backend.choose("conv2d_relu", "cuda", torch.float16)
    finally:
        _backend.triton_kernels_error.cache_clear()
    assert backend.name == "torch"
    assert "triton is not importable" in backend.reason


@pytest.mark.parametrize("fused", [False, True], ids=["conv2d_relu", "upsample_concat_conv2d_relu"])
def test_bf16_cpu_tensors_run_the_composite_even_with_the_kernels_forced(fused, monkeypatch):
    """Triton's interpreter (TRITON_INTERPRET=1, how the kernels run on CPU tensors) computes
    bf16 values wrongly without an error: a conv came out 1e10 off. bf16 CPU tensors run the
    composite, whatever FASTUNET_BACKEND says."""
    monkeypatch.setenv("FASTUNET_BACKEND", "fastunet")
    generator = torch.Generator().manual_seed(0)
    x, skip = (torch.randn(s, generator=generator).bfloat16() for s in [(2, 4, 3, 4), (2, 3, 6, 8)])
    weight = torch.randn(5, 7 if fused else 4, 3, 3, generator=generator).bfloat16()
    bias = torch.randn(5, generator=generator).bfloat16()
    if fused:
        inputs = [x, skip, weight, bias]
        ours = functools.partial(ops.upsample_concat_conv2d_relu, mode="bilinear")

        def theirs(x, skip, weight, bias):
            return torch_conv2d_relu(
                torch_upsample_concat(x, skip, "bilinear", False), weight, bias, 1, True
            )
    else:
        inputs, ours = [x, weight, bias], ops.conv2d_relu
        theirs = functools.partial(torch_conv2d_relu, padding=1, relu=True)
    for op in _backend.TRITON_OPS:
        assert _backend.choose(op, "cpu", torch.bfloat16).name == "torch"
    grad_out = torch.randn(2, 5, *(skip if fused else x).shape[-2:], generator=generator)
    got = output_and_grads(ours, inputs, grad_out)
    expected = output_and_grads(theirs, inputs, grad_out)
    names = ["out", "x", "skip", "weight", "bias"] if fused else ["out", "x", "weight", "bias"]
    for name, a, b in zip(names, got, expected, strict=True):
        assert relative_error(a, b) < 2e-2, name


# Four answers that differed from PyTorch's, on both backends (tests/test_fuzz.py generalises them).


def test_conv2d_relu_reads_a_strided_or_expanded_bias(backend):
    device = backend_device(backend)
    x, weight = torch.randn(1, 3, 5, 5, device=device), torch.randn(3, 3, 3, 3, device=device)
    for bias in (torch.randn(6, device=device)[::2], torch.tensor([0.5], device=device).expand(3)):
        expected = torch_conv2d_relu(x, weight, bias, 1, True)
        torch.testing.assert_close(ops.conv2d_relu(x, weight, bias), expected)


def test_relu_backward_passes_the_gradient_where_the_output_is_nan(backend):
    device = backend_device(backend)
    x, weight = torch.randn(1, 2, 4, 4, device=device), torch.randn(3, 2, 3, 3, device=device)
    x[0, 0, 1, 2] = float("nan")
    bias, grad_out = torch.randn(3, device=device), torch.randn(1, 3, 4, 4, device=device)
    ours = output_and_grads(ops.conv2d_relu, (x, weight, bias), grad_out, 1, True)
    expected = output_and_grads(torch_conv2d_relu, (x, weight, bias), grad_out, 1, True)
    torch.testing.assert_close(ours, expected, equal_nan=True)  # [out, grad_x, grad_w, grad_b]


def test_leaky_relu_scales_the_fp16_output_after_it_overflows(backend):
    """PyTorch rounds the convolution to fp16 and then applies the slope: an overflow is -inf
    whatever the slope (the slope applied in fp32 first gave a finite -1200). Found by an
    adversarial run, with its values."""
    device = backend_device(backend)
    x = torch.full((1, 1, 3, 3), -300.0, dtype=torch.float16, device=device)
    x[0, 0, 1, 1] = 1.0
    weight = torch.full((2, 1, 3, 3), 100.0, dtype=torch.float16, device=device)
    weight[1] = 0.001  # finite outputs beside the overflows
    ours = ops.conv2d_relu(x, weight, None, 1, True, 0.01)
    expected = F.leaky_relu(F.conv2d(x.float(), weight.float(), padding=1).half(), 0.01)
    assert torch.isneginf(expected[0, 0]).all() and torch.isfinite(expected[0, 1]).all()
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("size", [(4, 6), (8, 3)], ids=["same-height", "same-width"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_reads_one_element_on_an_axis_that_keeps_its_size(backend, size, align_corners):
    device = backend_device(backend)
    x, skip = torch.randn(1, 2, 4, 3, device=device), torch.randn(1, 1, *size, device=device)
    x[0, 0, 1, 1], x[0, 1, 2, 0] = float("inf"), float("nan")
    grad_out = torch.randn(1, 3, *size, device=device)
    grad_out[0, 1, 2, 2] = float("inf")
    args = (x, skip), grad_out, "bilinear", align_corners
    ours = output_and_grads(ops.upsample_concat, *args)  # [out, grad_x, grad_skip]
    expected = output_and_grads(torch_upsample_concat, *args)
    torch.testing.assert_close(ours, expected, equal_nan=True)


@pytest.mark.parametrize("relu", [True, False])
def test_float64_bias_gradient_sums_in_float64(relu):
    x, weight = torch.randn(2, 3, 9, 9).double(), torch.randn(4, 3, 3, 3).double()
    bias, grad_out = torch.randn(4).double(), torch.randn(2, 4, 9, 9).double()
    ours = output_and_grads(ops.conv2d_relu, (x, weight, bias), grad_out, 1, relu)[3]
    expected = output_and_grads(torch_conv2d_relu, (x, weight, bias), grad_out, 1, relu)[3]
    torch.testing.assert_close(ours, expected, rtol=1e-14, atol=0)  # fp32 sums are 4e-8 off


CONVOLUTION_BACKWARD = "aten::convolution_backward"


@pytest.mark.parametrize("op", ["conv2d_relu", "upsample_concat_conv2d_relu"])
@pytest.mark.parametrize(
    "needs", [(True, True), (True, False), (False, True)], ids=["both", "input", "weight"]
)
def test_composite_backward_is_one_convolution_backward(torch_backend, op, needs):
    """grad_input and grad_weight come from one aten call, which on the CPU shares work
    between them, and only the gradients asked for are computed."""
    need_input, need_weight = needs
    x = torch.randn(2, 3, 5, 4, requires_grad=need_input)
    skip = torch.randn(2, 2, 10, 8, requires_grad=need_input)
    weight = torch.randn(4, 5 if op != "conv2d_relu" else 3, 3, 3, requires_grad=need_weight)
    bias = torch.randn(4, requires_grad=True)
    args = (x, skip, weight, bias) if op != "conv2d_relu" else (x, weight, bias)
    out = getattr(ops, op)(*args)
    with torch.profiler.profile(record_shapes=True) as profile:
        out.sum().backward()
    masks = [e.concrete_inputs[-1] for e in profile.events() if e.name == CONVOLUTION_BACKWARD]
    assert masks == [[need_input, need_weight, False]]
    assert (x.grad is not None) == need_input and (weight.grad is not None) == need_weight


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    shape=st.tuples(*[st.integers(0, 3)] * 4),
    strides=st.tuples(*[st.sampled_from([0, 1, 2, 3, 4, 6, 8, 12, 24])] * 4),
)
def test_memory_format_of_reads_strides_as_pytorch_does(shape, strides):
    """The layout fastunet's ops hand on is the one PyTorch's own ops read from the strides
    (c10's suggest_memory_format), for any strides: dense, views, stride 0, and the ambiguous
    strides of one channel or a 1x1 image. PyTorch's CPU max-pool allocates its output in that
    layout; a size-0 axis reads as NCHW."""
    x = torch.empty(1000).as_strided(shape, strides)
    if x.numel() == 0:
        assert memory_format_of(x) == torch.contiguous_format
        return
    pytorchs = F.max_pool2d(x, 1).stride()
    assert torch.empty(shape, memory_format=memory_format_of(x)).stride() == pytorchs


@pytest.mark.parametrize("shape", [(2, 1, 3, 4), (1, 1, 3, 4), (2, 5, 1, 1), (0, 1, 3, 4)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_in_memory_format_gives_the_layouts_own_strides(shape, layout):
    """Where `contiguous` keeps strides that fit both layouts, the result still reads as the
    layout asked for (PyTorch's convolutions then compute in it), as a view of the same data."""
    x = torch.randn(shape, requires_grad=True)
    y = in_memory_format(x, layout)
    assert torch.equal(y, x)
    grad = torch.randn(shape)
    y.backward(grad)  # the gradient flows back through the view unchanged
    assert torch.equal(x.grad, grad)
    if x.numel():
        assert memory_format_of(y) == layout
        assert y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        weight = torch.randn(3, shape[1], 1, 1)
        assert memory_format_of(F.conv2d(y, weight)) == layout


def test_in_place_edits_of_what_the_ops_save_raise_in_backward():
    """The ops save other tensors than their composites (README): an in-place edit that PyTorch
    allows there raises autograd's error here, never a wrong gradient."""
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    out = ops.conv2d_relu(x, weight, None, 1, True, 0.1)  # saves its output
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    skip = torch.randn(1, 2, 8, 8, requires_grad=True).clone()
    out = ops.upsample_concat_conv2d_relu(x, skip, torch.randn(4, 5, 3, 3))  # saves skip
    skip.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
