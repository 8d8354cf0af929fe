"""The per-layer choice between a fastunet op and PyTorch's own path, and its cache on disk.

Timings are injected: the logic is tested here, the speed by the benchmark suite.
"""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_bits

from fastunet import ReferenceUNet, UNet
from fastunet.nn import Conv2dReLU
from fastunet.ops import _choice


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory and a process that has chosen nothing yet."""
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_choice, "_caches", {})
    monkeypatch.setattr(_choice, "_decided", {})
    return tmp_path


def new_process(monkeypatch):
    """What a new process knows: only the files on disk."""
    monkeypatch.setattr(_choice, "_caches", {})
    monkeypatch.setattr(_choice, "_decided", {})


@pytest.fixture
def measured(monkeypatch):
    """No rule applies (as on a GPU), and measure() returns the timings in `measured.times`."""

    class Timer:
        def __init__(self):
            self.times, self.calls = {"fastunet": 1.0, "torch": 2.0}, 0

        def __call__(self, op, fastunet_fn, args):
            self.calls += 1
            return dict(self.times)

    timer = Timer()
    monkeypatch.setattr(_choice, "_rule", lambda op, x: None)
    monkeypatch.setattr(_choice, "measure", timer)
    return timer


def no_measuring(monkeypatch):
    def fail(*args):
        raise AssertionError("measured, but the choice should have come from elsewhere")

    monkeypatch.setattr(_choice, "measure", fail)


class Spy:
    """Wraps an op and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def conv_layer(seed=0):
    torch.manual_seed(seed)
    layer = Conv2dReLU(3, 4, 3, padding=1)
    return layer, torch.randn(2, 3, 6, 5)


def run_conv(layer, x, spy):
    return _choice.run_layer("conv2d_relu", spy, x, layer.weight, layer.bias, 1, True)


@pytest.mark.parametrize("faster", ["fastunet", "torch"])
def test_the_faster_path_runs(cache, measured, faster):
    from fastunet import ops

    measured.times = {"fastunet": 1.0, "torch": 2.0} if faster == "fastunet" else {
        "fastunet": 2.0, "torch": 1.0}  # fmt: skip
    layer, x = conv_layer()
    spy = Spy(ops.conv2d_relu)
    out = run_conv(layer, x, spy)
    assert spy.calls == (1 if faster == "fastunet" else 0)
    torch.testing.assert_close(out, F.relu(F.conv2d(x, layer.weight, layer.bias, padding=1)))
    key = _choice.call_key("conv2d_relu", (x, layer.weight, layer.bias, 1, True))
    assert _choice._decided[key].path == faster
    assert "measured" in _choice._decided[key].reason


def test_a_key_is_measured_once_and_each_pass_on_its_own(cache, measured):
    layer, x = conv_layer()
    spy = Spy(lambda *args: _choice.TORCH_PATHS["conv2d_relu"](*args))
    run_conv(layer, x, spy)
    run_conv(layer, x, spy)
    assert measured.calls == 1
    with torch.no_grad():  # inference is another pass, so another key
        run_conv(layer, x, spy)
    run_conv(layer, torch.randn(1, 3, 6, 5), spy)  # another shape
    run_conv(layer, x.contiguous(memory_format=torch.channels_last), spy)  # another layout
    assert measured.calls == 4


def test_ties_go_to_pytorch(cache, measured):
    measured.times = {"fastunet": 1.0, "torch": 1.0}
    layer, x = conv_layer()
    spy = Spy(lambda *args: None)
    run_conv(layer, x, spy)
    assert spy.calls == 0


def test_keys_name_device_op_pass_dtype_autocast_shapes_and_layout():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        key = _choice.layer_key("conv2d_relu", (x, w, None, 1, True))
    assert key == (
        "cpu|conv2d_relu|forward+backward|float32-autocast-bfloat16|2x3x8x8-nhwc|4x3x3x3|None|1|True"
    )


def test_the_call_key_tells_apart_what_the_layer_key_does():
    x = torch.randn(2, 3, 8, 8)
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)

    def both_keys(*args):
        return _choice.layer_key("conv2d_relu", args), _choice.call_key("conv2d_relu", args)

    keys = {
        "plain": both_keys(x, w, None, 1, True),
        "other pass": both_keys(x, w.detach(), None, 1, True),
        "other dtype": both_keys(x.double(), w.double(), None, 1, True),
        "other shape": both_keys(x[:1], w, None, 1, True),
        "other layout": both_keys(x_nhwc, w, None, 1, True),
        "other value": both_keys(x, w, None, 0, True),
        "bias": both_keys(x, w, torch.zeros(4), 1, True),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys["autocast"] = both_keys(x, w, None, 1, True)
    assert len({text for text, _ in keys.values()}) == len(keys)
    assert len({memo for _, memo in keys.values()}) == len(keys)
    assert both_keys(x.clone(), w, None, 1, True) == keys["plain"]


def test_a_new_process_reads_the_choice_and_gets_the_same_bits(cache, measured, monkeypatch):
    from fastunet import ops

    measured.times = {"fastunet": 2.0, "torch": 1.0}
    layer, x = conv_layer()
    first = run_conv(layer, x, Spy(ops.conv2d_relu))
    (saved,) = cache.glob("choices-*.json")
    assert json.loads(saved.read_text())["stamp"] == _choice.stamp()
    new_process(monkeypatch)
    no_measuring(monkeypatch)
    spy = Spy(ops.conv2d_relu)
    assert torch.equal(run_conv(layer, x, spy), first)
    assert spy.calls == 0


def test_a_stale_cache_is_ignored_with_a_warning(cache, measured, monkeypatch):
    layer, x = conv_layer()
    run_conv(layer, x, Spy(lambda *a: None))
    new_process(monkeypatch)
    upgraded = {**_choice.stamp(), "torch": "9.9"}
    monkeypatch.setattr(_choice, "stamp", lambda: upgraded)
    with pytest.warns(RuntimeWarning, match=r"made by torch .* \(now 9.9\)"):
        run_conv(layer, x, Spy(lambda *a: None))
    assert measured.calls == 2
    (saved,) = cache.glob("choices-*.json")
    assert json.loads(saved.read_text())["stamp"]["torch"] == "9.9"


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"stamp": {}, "choices": {"k": {"path": "cudnn"}}}']
)
def test_a_corrupt_cache_is_ignored_with_a_warning(cache, measured, content):
    x = torch.empty(0)
    _choice.cache_file(x.device).write_text(content)
    layer, x = conv_layer()
    with pytest.warns(RuntimeWarning, match="choice cache"):
        run_conv(layer, x, Spy(lambda *a: None))
    assert measured.calls == 1
    saved = json.loads(_choice.cache_file(x.device).read_text())
    assert next(iter(saved["choices"].values()))["path"] == "fastunet"


def test_an_unwritable_cache_warns_once_and_keeps_choices_in_memory(
    tmp_path, measured, monkeypatch
):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(blocker / "cache"))  # under a file: no mkdir
    monkeypatch.setattr(_choice, "_caches", {})
    monkeypatch.setattr(_choice, "_decided", {})
    layer, x = conv_layer()
    with pytest.warns(RuntimeWarning, match="cannot save"):
        run_conv(layer, x, Spy(lambda *a: None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_conv(layer, torch.randn(1, 3, 6, 5), Spy(lambda *a: None))


def test_two_processes_merge_their_choices(cache, measured, monkeypatch):
    layer, x = conv_layer()
    run_conv(layer, x, Spy(lambda *a: None))
    new_process(monkeypatch)
    run_conv(layer, torch.randn(1, 3, 6, 5), Spy(lambda *a: None))
    (saved,) = cache.glob("choices-*.json")
    assert len(json.loads(saved.read_text())["choices"]) == 2


@pytest.mark.parametrize("forced", ["fastunet", "torch"])
def test_a_forced_backend_runs_fastunet_ops_without_measuring(cache, monkeypatch, forced):
    monkeypatch.setenv("FASTUNET_BACKEND", forced)
    no_measuring(monkeypatch)
    layer, x = conv_layer()
    spy = Spy(lambda *a: None)
    run_conv(layer, x, spy)
    assert spy.calls == 1


def test_the_interpreter_runs_the_kernels_and_the_cpu_runs_aten(cache, monkeypatch):
    no_measuring(monkeypatch)
    x = conv_layer()[1]
    monkeypatch.setattr(_choice, "INTERPRET", True)
    assert _choice.choose_path("conv2d_relu", None, (x,)) is _choice.INTERPRETER_CHOICE
    monkeypatch.setattr(_choice, "INTERPRET", False)
    assert _choice.choose_path("conv2d_relu", None, (x,)) is _choice.CPU_CHOICE


def test_dtypes_without_a_kernel_take_pytorchs_path(cache, measured):
    layer, x = conv_layer()
    layer.double()
    spy = Spy(lambda *a: None)
    run_conv(layer, x.double(), spy)
    assert spy.calls == 0 and measured.calls == 0


def test_torch_compile_traces_the_fastunet_op_without_measuring(cache, measured, monkeypatch):
    from fastunet import ops

    no_measuring(monkeypatch)
    layer, x = conv_layer()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ops.conv2d_relu(x, layer.weight, layer.bias, 1))


def test_measure_times_both_paths_and_leaves_inputs_and_rng_alone():
    from fastunet import ops

    layer, x = conv_layer()
    x.requires_grad_()
    args = (x, layer.weight, layer.bias, 1, True)
    rng = torch.get_rng_state()
    for grad_enabled in (False, True):
        with torch.set_grad_enabled(grad_enabled):
            times = _choice.measure("conv2d_relu", ops.conv2d_relu, args)
        assert set(times) == {"fastunet", "torch"} and all(t > 0 for t in times.values())
    assert x.grad is None and layer.weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_on_the_cpu_unet_is_referenceunet_bit_for_bit(monkeypatch, upsample):
    """The CPU rule runs PyTorch's own path in every layer: the same calls as the reference."""
    monkeypatch.setattr(_choice, "INTERPRET", False)
    torch.manual_seed(0)
    reference = ReferenceUNet(3, 2, 4, 2, upsample=upsample)
    fast = UNet.from_reference(reference)
    x = torch.randn(2, 3, 16, 12)
    with _choice.recording() as calls:
        out = fast(x)
    assert _choice.summarize(calls) == {"fastunet": 0, "torch": len(calls)}
    expected = reference(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for (name, a), b in zip(fast.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("skip_first", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("size", [(6, 4), (1, 2)])
def test_pytorchs_nearest_2x_concat_is_interpolate_and_cat_bit_for_bit(
    skip_first, layout, dtype, size, monkeypatch
):
    """Without autograd, PyTorch's path writes an exact 2x nearest upsample straight into the
    concat: the same bits, the same layout."""
    x = torch.randn(2, 3, *size, dtype=dtype).contiguous(memory_format=layout)
    skip = torch.randn(2, 5, 2 * size[0], 2 * size[1], dtype=dtype)
    skip = skip.contiguous(memory_format=layout)
    x[0, 0, 0, 0], skip[1, 1, 0, 0] = float("nan"), -0.0
    up = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
    expected = torch.cat([skip, up] if skip_first else [up, skip], 1)
    monkeypatch.setattr(F, "interpolate", None)  # the direct write, not interpolate, runs
    with torch.no_grad():
        got = _choice.TORCH_PATHS["upsample_concat"](x, skip, "nearest", False, skip_first)
    assert got.stride() == expected.stride()
    assert_same_bits(got, expected)
