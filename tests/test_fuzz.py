"""Property-based tests (hypothesis): each op on both backends against PyTorch in float64.

An example draws shapes (a zero-size batch, 1-pixel images, odd sizes, identity-size axes), a
memory layout for every tensor argument (NCHW, channels_last, a strided view at a storage
offset, a dense permuted layout, a stride-0 expansion), values (random; with NaN, +-inf and -0.0
sprinkled in; small integers with ties) and a dtype. The output and every gradient are compared
with PyTorch's composite on the same values: NaN and +-inf where it has them, finite values
within the dtype's tolerance of its float64 result, and max-pool, nearest upsampling and
grad_skip bit for bit, the sign of zero included.

Backends (the `backend` fixture): "kernels", the Triton kernels (in Triton's interpreter without
a GPU) and `_C`, in the kernels' dtypes; "torch", the composite, in fp32, fp16 and float64.
Examples are derandomized, so every run tries the same ones.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    KERNEL_DTYPES,
    UPSAMPLE_MODES,
    assert_parity,
    assert_same_bits,
    backend_device,
    drawn,
    in_layout,
    output_and_grads,
    torch_conv2d_relu,
    torch_upsample_concat,
)
from hypothesis import assume, given
from hypothesis import strategies as st

from fastunet import ops
from fastunet.bench.parity import dtype_name, relative_error
from fastunet.ops._backend import choose
from fastunet.ops._common import CHANNELS_LAST, in_memory_format

CASES = [("kernels", dtype) for dtype in KERNEL_DTYPES] + [
    ("torch", dtype) for dtype in (torch.float32, torch.float16, torch.float64)
]
backend_and_dtype = pytest.mark.parametrize(
    "backend,dtype",
    CASES,
    indirect=["backend"],
    ids=[f"{backend}-{dtype_name(dtype)}" for backend, dtype in CASES],
)

# Examples per (backend, dtype) case: about a minute for the file on 2 cores, nearly all of it in
# the interpreter (~0.2 s per conv example, forward and backward).
EXAMPLES = 100
# The interpreter computes with numpy, which warns on 0 * inf.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def fuzz(test, examples=EXAMPLES):
    """The property tests' settings (`helpers.drawn`), EXAMPLES examples unless told."""
    return drawn(examples)(test)


NAN, INF = float("nan"), float("inf")
CONTIGUOUS = torch.contiguous_format
SPECIALS = torch.tensor([NAN, INF, -INF, -0.0], dtype=torch.float64)
# A convolution's grad_input is a convolution of grad, zero-padded, with the flipped weight, so an
# inf or NaN weight times that padding reaches the border of grad_x where PyTorch's col2im drops
# it: weights get finite specials only.
FINITE_SPECIALS = torch.tensor([-0.0, 0.0], dtype=torch.float64)
VALUES = ["random", "special", "ties"]
SEEDS = st.integers(0, 2**32 - 1)
# "expanded" is a stride-0 view; the others store the same values in another layout.
LAYOUTS_4D = st.sampled_from(["contiguous", "channels_last", "strided", "permuted", "expanded"])
LAYOUTS_1D = st.sampled_from(["contiguous", "strided", "expanded"])


def make(shape, values, generator, specials):
    """float64 values: "random" normal; "special", normal with one to three specials sprinkled
    in; "ties", integers in [-2, 2] (half the zeros -0.0) with the same specials."""
    if values == "ties":
        t = torch.randint(-2, 3, shape, generator=generator).double()
        t[(t == 0) & (torch.rand(shape, generator=generator) < 0.5)] = -0.0
    else:
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
    if values != "random" and t.numel() > 0:
        count = int(torch.randint(1, 4, (), generator=generator))
        at = torch.randint(t.numel(), (count,), generator=generator)
        t.view(-1)[at] = specials[torch.randint(len(specials), (count,), generator=generator)]
    return t


def arrange(t, layout):
    """t in `layout`; "expanded" broadcasts t's first slice along its longest dim over that dim
    (stride 0), which changes the values: use what this returns."""
    if layout != "expanded":
        return in_layout(t, layout)
    if t.numel() == 0:
        return t
    dim = max(range(t.dim()), key=lambda d: t.shape[d])
    return t.narrow(dim, 0, 1).expand_as(t)


def tensors(shapes, layouts, values, seed, dtype, device, specials=None):
    """A tensor for each shape, in its layout; specials[i] (default SPECIALS) for tensor i."""
    generator = torch.Generator().manual_seed(seed)
    specials = specials or [SPECIALS] * len(shapes)
    return [
        arrange(make(shape, values, generator, kinds).to(device, dtype), layout)
        for shape, layout, kinds in zip(shapes, layouts, specials, strict=True)
    ]


def assert_backend(op, backend, device, dtype):
    """Fail, not skip, when the op would run another backend than the case names."""
    chosen = choose(op, device, dtype)
    expected = "torch" if backend == "torch" else ("triton", "_C")
    assert chosen.name.startswith(expected), f"{op} runs {chosen.name}: {chosen.reason}"


# Finite values against float64, relative (norm): float64's composite calls PyTorch's float64
# code, and fp32 holds DESIGN's 1e-5; half types follow the parity rule (helpers.assert_parity).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def kind(t):
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return t.isnan().int() + 2 * t.isinf().int() + (t == -INF).int()


def assert_close(name, got, truth, torch_same_dtype, torch_channels_last=None):
    """NaN and +-inf where PyTorch has them, and the finite values near the float64 truth.

    Where PyTorch's float64 and same-dtype results differ in kind, a 0 met an inf and its own
    algorithms disagree (0 * inf at the zero padding in one conv algorithm and not in another;
    a bilinear weight that is 0 in float64 but 1e-8 in fp32), so any kind passes there. So too
    where its same-dtype results on contiguous and on channels_last copies differ in kind
    (`torch_channels_last`): its channels_last conv backward never multiplies the zero padding,
    where inf * 0 makes NaN, so either is PyTorch's answer (and fastunet's composite computes
    channels_last where PyTorch's would not)."""
    value, same = got.detach().cpu().double(), torch_same_dtype.double()
    agree = kind(truth) == kind(same)
    if torch_channels_last is not None:
        agree &= kind(torch_channels_last.double()) == kind(same)
    assert torch.equal(kind(value)[agree], kind(truth)[agree]), f"{name}: NaN/inf unlike PyTorch"
    finite = agree & truth.isfinite()
    if got.dtype in TOLERANCE:
        error = relative_error(value[finite], truth[finite])
        assert error <= TOLERANCE[got.dtype], f"{name}: relative error {error:.3g}"
    else:
        eps = torch.finfo(got.dtype).eps
        assert_parity(value[finite], same[finite], truth[finite], name, floor=eps)


def check(names, ours, truth, torch_same_dtype, bitwise=(), torch_channels_last=None):
    """Each output of ours against the float64 truth (None where an input had no gradient)."""
    channels_last = torch_channels_last or [None] * len(names)
    for name, got, exact, same, same_channels_last in zip(
        names, ours, truth, torch_same_dtype, channels_last, strict=True
    ):
        if exact is None:
            assert got is None, name
            continue
        assert got.dtype == same.dtype and got.shape == exact.shape, name
        if name in bitwise:
            assert_same_bits(got.cpu(), exact.to(got.dtype))
        else:
            assert_close(name, got, exact, same, same_channels_last)


def dense(t, layout):
    """A dense copy of t, in `layout` if it is 4-D."""
    return in_memory_format(t, layout) if t.dim() == 4 else t.contiguous()


def compare(function, reference, inputs, grad_out, *args, names, bitwise=()):
    """function against reference in float64 (the truth) and in the inputs' dtype, both on the
    CPU (PyTorch's semantics) and on contiguous copies (its fp16 conv backward rejects some
    layouts); for NaN and inf also PyTorch in the inputs' dtype on channels_last copies, where
    it takes them (see `assert_close`)."""
    ours = output_and_grads(function, inputs, grad_out, *args)
    results = []
    for dtype, layout in ((torch.float64, CONTIGUOUS), (grad_out.dtype, CONTIGUOUS),
                          (grad_out.dtype, CHANNELS_LAST)):  # fmt: skip
        copies = [None if t is None else dense(t.cpu().to(dtype), layout)
                  for t in (*inputs, grad_out)]  # fmt: skip
        try:
            results.append(output_and_grads(reference, copies[:-1], copies[-1], *args))
        except RuntimeError:  # a layout PyTorch's fp16 CPU kernels do not take
            results.append(None)
    check(names, ours, *results[:2], bitwise, results[2])


@backend_and_dtype
@fuzz
@given(
    n=st.integers(0, 2),
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 5),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    padding=st.integers(0, 2),
    bias=st.booleans(),
    activation=st.sampled_from([None, 0.0, 0.01, 0.2]),  # none, ReLU, LeakyReLU's slopes
    layouts=st.tuples(LAYOUTS_4D, LAYOUTS_4D, LAYOUTS_1D, LAYOUTS_4D),
    values=st.sampled_from(VALUES),
    seed=SEEDS,
)
def test_conv2d_relu(backend, dtype, n, c_in, c_out, h, w, kh, kw, padding, bias, activation,
                     layouts, values, seed):  # fmt: skip
    h_out, w_out = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    assume(h_out >= 1 and w_out >= 1)
    device = backend_device(backend)
    assert_backend("conv2d_relu", backend, device, dtype)
    shapes = [(n, c_in, h, w), (c_out, c_in, kh, kw), (c_out,), (n, c_out, h_out, w_out)]
    specials = [SPECIALS, FINITE_SPECIALS, SPECIALS, SPECIALS]
    x, weight, b, grad_out = tensors(shapes, layouts, values, seed, dtype, device, specials)
    relu, slope = activation is not None, activation or 0.0
    compare(
        ops.conv2d_relu, torch_conv2d_relu, (x, weight, b if bias else None), grad_out, padding,
        relu, slope, names=("out", "grad_x", "grad_weight", "grad_bias"),
    )  # fmt: skip


@st.composite
def upsample_shapes(draw):
    """(x shape, skip shape); an axis keeps its size often: PyTorch reads one element there."""
    n, c_x, c_skip = draw(st.integers(0, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    h_out, w_out = (draw(st.just(size) | st.integers(1, 9)) for size in (h, w))
    return (n, c_x, h, w), (n, c_skip, h_out, w_out)


@backend_and_dtype
@fuzz
@given(
    shapes=upsample_shapes(),
    mode=UPSAMPLE_MODES,
    layouts=st.tuples(LAYOUTS_4D, LAYOUTS_4D, LAYOUTS_4D),
    values=st.sampled_from(VALUES),
    seed=SEEDS,
    skip_first=st.booleans(),
)
def test_upsample_concat(backend, dtype, shapes, mode, layouts, values, seed, skip_first):
    device = backend_device(backend)
    assert_backend("upsample_concat", backend, device, dtype)
    (n, c_x, _, _), (_, c_skip, h_out, w_out) = shapes
    grad_shape = (n, c_skip + c_x, h_out, w_out)
    x, skip, grad_out = tensors((*shapes, grad_shape), layouts, values, seed, dtype, device)
    copies = ("out", "grad_skip") if mode[0] == "nearest" else ("grad_skip",)
    compare(
        ops.upsample_concat, torch_upsample_concat, (x, skip), grad_out, *mode, skip_first,
        names=("out", "grad_x", "grad_skip"), bitwise=copies,
    )  # fmt: skip


@backend_and_dtype
@fuzz
@given(
    n=st.integers(0, 2),
    c=st.integers(1, 5),
    h=st.integers(2, 7),
    w=st.integers(2, 7),
    layouts=st.tuples(LAYOUTS_4D, LAYOUTS_4D),
    values=st.sampled_from(VALUES),
    seed=SEEDS,
)
def test_max_pool2d(backend, dtype, n, c, h, w, layouts, values, seed):
    device = backend_device(backend)
    assert_backend("max_pool2d", backend, device, dtype)
    shapes = [(n, c, h, w), (n, c, h // 2, w // 2)]
    x, grad_out = tensors(shapes, layouts, values, seed, dtype, device)
    compare(
        ops.max_pool2d, lambda t: F.max_pool2d(t, 2), (x,), grad_out,
        names=("out", "grad_x"), bitwise=("out", "grad_x"),
    )  # fmt: skip


def torch_decoder_conv(x, skip, weight, bias, padding, relu, mode, align_corners):
    concat = torch_upsample_concat(x, skip, mode, align_corners)
    return torch_conv2d_relu(concat, weight, bias, padding, relu)


@backend_and_dtype
@functools.partial(fuzz, examples=EXAMPLES // 2)  # a conv and an upsample per example
@given(
    shapes=upsample_shapes(),
    c_out=st.integers(1, 4),
    kernel=st.sampled_from([1, 3]),
    bias=st.booleans(),
    relu=st.booleans(),
    mode=UPSAMPLE_MODES,
    layouts=st.tuples(LAYOUTS_4D, LAYOUTS_4D, LAYOUTS_4D, LAYOUTS_1D, LAYOUTS_4D),
    values=st.sampled_from(VALUES),
    seed=SEEDS,
)
def test_upsample_concat_conv2d_relu(backend, dtype, shapes, c_out, kernel, bias, relu, mode,
                                     layouts, values, seed):  # fmt: skip
    device = backend_device(backend)
    assert_backend("upsample_concat_conv2d_relu", backend, device, dtype)
    (n, c_x, _, _), (_, c_skip, h, w) = shapes
    shapes = [*shapes, (c_out, c_skip + c_x, kernel, kernel), (c_out,), (n, c_out, h, w)]
    specials = [SPECIALS, SPECIALS, FINITE_SPECIALS, SPECIALS, SPECIALS]
    x, skip, weight, b, grad_out = tensors(shapes, layouts, values, seed, dtype, device, specials)
    compare(
        ops.upsample_concat_conv2d_relu, torch_decoder_conv, (x, skip, weight, b if bias else None),
        grad_out, kernel // 2, relu, *mode,
        names=("out", "grad_x", "grad_skip", "grad_weight", "grad_bias"),
    )  # fmt: skip
