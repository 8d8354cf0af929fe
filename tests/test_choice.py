"""The per-layer choice between a fastunet op and PyTorch's own path, and its cache on disk.

Timings are injected: the logic is tested here, the speed by the benchmark suite.
"""

import copy
import functools
import json
import os
import threading
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    INPUT_LAYOUTS,
    UNET_AXES,
    UPSAMPLE_MODES,
    drawn,
    in_layout,
    unet_size,
)
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from fastunet import ReferenceUNet, UNet
from fastunet.bench.parity import relative_error
from fastunet.cli import main
from fastunet.nn import Conv2dReLU
from fastunet.ops import _backend, _choice


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


def cache_text(choices: dict, stamp: dict | None = None) -> str:
    """A cache file's text: the stamp, then a line per choice."""
    lines = [json.dumps({"stamp": stamp or _choice.stamp()})]
    lines += [json.dumps({"key": key, "choice": entry}) for key, entry in choices.items()]
    return "\n".join(lines) + "\n"


def read_cache(path) -> tuple[dict, dict]:
    """(stamp, choices) of a cache file; the first line of a key counts."""
    header, *lines = path.read_text().splitlines()
    choices = {}
    for line in lines:
        record = json.loads(line)
        choices.setdefault(record["key"], record["choice"])
    return json.loads(header)["stamp"], choices


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


def test_out_of_memory_while_timing_runs_pytorch_and_is_not_saved(cache, measured, monkeypatch):
    """Timing needs more memory than the step: a model that fills the GPU gets PyTorch's path
    for that layer in this process, and a later process measures again."""

    def out_of_memory(*args):
        measured.calls += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(_choice, "measure", out_of_memory)
    layer, x = conv_layer()
    spy = Spy(lambda *args: None)
    for _ in range(2):
        out = run_conv(layer, x, spy)
    assert spy.calls == 0 and measured.calls == 1
    torch.testing.assert_close(out, F.relu(F.conv2d(x, layer.weight, layer.bias, padding=1)))
    assert not list(cache.glob("choices-*.jsonl"))
    new_process(monkeypatch)
    monkeypatch.setattr(_choice, "measure", measured)
    run_conv(layer, x, spy)
    assert spy.calls == 1 and measured.calls == 2


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_a_layer_beyond_the_kernels_indices_runs_pytorch(cache, monkeypatch, training):
    """The Triton kernels refuse 2**31 pixels or more (int32 indices) before any launch: where
    the path is measured, such a layer runs PyTorch's path instead of failing. The real
    measure(), on a stand-in op that refuses as the launchers do."""
    from fastunet import kernels

    monkeypatch.setattr(_choice, "_rule", lambda op, x: None)

    def refuses(*args):
        raise kernels.IndexRangeError("conv2d_relu: 2 images of 6x5 are >= 2**31 pixels")

    layer, x = conv_layer()
    spy = Spy(refuses)
    with torch.set_grad_enabled(training):
        out = run_conv(layer, x, spy)
        key = _choice.call_key("conv2d_relu", (x, layer.weight, layer.bias, 1, True))
    assert spy.calls == 1  # the measurement's; the call itself ran PyTorch's path
    torch.testing.assert_close(out, F.relu(F.conv2d(x, layer.weight, layer.bias, padding=1)))
    assert _choice._decided[key].path == "torch"
    assert "beyond fastunet's kernels: conv2d_relu: 2 images" in _choice._decided[key].reason


def test_keys_name_device_op_pass_dtype_autocast_shapes_and_layout():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        key = _choice.layer_key("conv2d_relu", (x, w, None, 1, True))
    cpu = _choice.device_name(x.device)  # the CPU's model
    assert key == (
        f"{cpu}|conv2d_relu|forward+backward|float32-autocast-bfloat16|2x3x8x8-nhwc|4x3x3x3|None|1|"
        "True"
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
    (saved,) = cache.glob("choices-*.jsonl")
    assert read_cache(saved)[0] == _choice.stamp()
    new_process(monkeypatch)
    no_measuring(monkeypatch)
    spy = Spy(ops.conv2d_relu)
    assert torch.equal(run_conv(layer, x, spy), first)
    assert spy.calls == 0


@pytest.mark.gpu
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_on_a_gpu_each_layer_is_measured_once_and_a_new_process_reuses_it(
    cache, monkeypatch, training
):
    """The measured choice as a GPU runs it, not injected: both paths of each layer timed with
    CUDA events on the layer's own inputs (forward, or forward and backward). UNet then matches
    ReferenceUNet; a second call, and a new process reading the file, measure nothing and take
    the same paths, with the same bits in the forward."""
    pool = _backend.choose("max_pool2d", "cuda", torch.float32)
    assert pool.name == "_C.cuda", f"the pools would not be measured: {pool.reason}"
    torch.manual_seed(0)
    reference = ReferenceUNet(3, 2, 8, 2).cuda()
    fast = UNet.from_reference(reference)
    x = torch.randn(2, 3, 24, 20, device="cuda", requires_grad=training)

    def run(model):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(training), _choice.recording() as calls:
            out = model(x)
        if training:
            out.sum().backward()
        grads = [p.grad for p in model.parameters()] if training else []
        return out, grads, [choice for _, choice in calls]

    out, grads, choices = run(fast)
    # 6 encoder convs, 2 pools, per decoder level the fused upsample-concat-conv and a conv,
    # the head
    assert len(choices) == 13
    assert all(choice.reason.startswith("measured: ") for choice in choices)
    expected, expected_grads, _ = run(reference)
    assert relative_error(out, expected) <= 1e-5
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert relative_error(grad, expected_grad) <= 1e-5
    no_measuring(monkeypatch)
    for _ in range(2):  # this process, then a new one that reads the file
        again, _, choices_again = run(fast)
        assert choices_again == choices
        assert torch.equal(again, out)
        new_process(monkeypatch)


def test_a_stale_cache_is_ignored_with_a_warning(cache, measured, monkeypatch):
    layer, x = conv_layer()
    run_conv(layer, x, Spy(lambda *a: None))
    new_process(monkeypatch)
    upgraded = {**_choice.stamp(), "torch": "9.9"}
    monkeypatch.setattr(_choice, "stamp", lambda: upgraded)
    with pytest.warns(
        RuntimeWarning, match=r"made by torch .* \(now 9.9\); its choices are ig"
    ) as w:
        run_conv(layer, x, Spy(lambda *a: None))
    assert w[0].filename == __file__  # the line that called fastunet, not fastunet's own
    assert measured.calls == 2
    (saved,) = cache.glob("choices-*.jsonl")
    assert read_cache(saved)[0]["torch"] == "9.9"


def test_the_stamp_changes_with_a_rebuilt_extension(tmp_path, monkeypatch):
    """A rebuilt `_C` (other size or time) makes the saved choices stale: its max-pool may run
    at another speed."""
    library = tmp_path / "_C.so"
    library.write_bytes(b"\0" * 100)
    monkeypatch.setattr(_choice, "native_extension", lambda: SimpleNamespace(__file__=library))
    stamp = _choice.stamp.__wrapped__
    built = stamp()
    assert stamp() == built
    library.write_bytes(b"\0" * 101)
    resized = stamp()
    assert resized["kernels"] != built["kernels"]
    os.utime(library, ns=(0, library.stat().st_mtime_ns + 10**9))
    assert stamp()["kernels"] not in (built["kernels"], resized["kernels"])


@pytest.mark.parametrize(
    "content",
    ["", "{not json\n", "[]\n", "[" * 100_000],  # json recurses: RecursionError, not ValueError
    ids=["empty", "not-json", "list", "deep"],
)
def test_a_cache_file_without_a_stamp_is_ignored_with_a_warning(cache, measured, content):
    x = torch.empty(0)
    _choice.cache_file(x.device).write_text(content)
    layer, x = conv_layer()
    with pytest.warns(RuntimeWarning, match="choice cache .*; its choices are ignored"):
        run_conv(layer, x, Spy(lambda *a: None))
    assert measured.calls == 1
    stamp, choices = read_cache(_choice.cache_file(x.device))  # written again
    assert stamp == _choice.stamp() and next(iter(choices.values()))["path"] == "fastunet"


@pytest.mark.parametrize(
    "line",
    [
        "{not json",
        json.dumps({"key": "k", "choice": {"path": "cudnn", "reason": "r"}}),
        json.dumps({"key": "k", "choice": {"path": "torch", "reason": "r", "note": "an edit"}}),
        json.dumps({"key": "k", "choice": {"path": "torch", "reason": "r", "times_ms": [1.0]}}),
        json.dumps({"key": 1, "choice": {"path": "torch", "reason": "r"}}),
        "[" * 100_000,
    ],
    ids=["not-json", "unknown-path", "unknown-field", "times-not-a-dict", "key-not-text", "deep"],
)
def test_lines_that_are_not_choices_are_ignored_with_a_warning(cache, measured, line):
    """The file's other choices are taken, and the next save writes it again without them."""
    layer, x = conv_layer()
    key = _choice.layer_key("conv2d_relu", (x, layer.weight, layer.bias, 1, True))
    saved = {key: {"path": "torch", "reason": "saved", "times_ms": None}}
    path = _choice.cache_file(x.device)
    path.write_text(cache_text(saved).replace("\n", f"\n{line}\n", 1))
    with pytest.warns(RuntimeWarning, match="1 lines of the choice cache .* are not choices"):
        run_conv(layer, x, Spy(lambda *a: None))
    assert measured.calls == 0  # the saved one was taken
    run_conv(layer, torch.randn(1, 3, 6, 5), Spy(lambda *a: None))  # a new key: a save
    assert measured.calls == 1
    assert line not in path.read_text() and len(read_cache(path)[1]) == 2


def test_a_save_appends_a_line_in_place_of_one_a_crash_cut_short(cache, measured):
    """A save appends; it does not write the file again (which cost 0.1 s a choice at 6,000
    choices). A line a crash cut short at the end is not read, nor warned of (it may be one
    another process is writing); under the lock the save cuts it off (followed by a newline, it
    was a bad line that every new process warned of)."""
    path = _choice.cache_file(torch.device("cpu"))
    before = cache_text({"k": {"path": "torch", "reason": "saved", "times_ms": None}})
    path.write_text(before + '{"key": "cut", "choi')
    file = path.stat().st_ino
    layer, x = conv_layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_conv(layer, x, Spy(lambda *a: None))
        text = path.read_text()
        assert path.stat().st_ino == file and text.startswith(before)
        (appended,) = text[len(before) :].splitlines()
        assert json.loads(appended)["choice"]["path"] == "fastunet" and measured.calls == 1
        assert len(_choice.ChoiceCache(path).entries) == 2  # no warning


def test_a_last_line_without_its_newline_is_taken(cache, measured):
    """A file whose last line lacks its newline (an editor's save) lost that choice without a
    warning: it was read as a piece a crash cut short, and cut away by the next save."""
    layer, x = conv_layer()
    key = _choice.layer_key("conv2d_relu", (x, layer.weight, layer.bias, 1, True))
    path = _choice.cache_file(x.device)
    path.write_text(cache_text({key: {"path": "torch", "reason": "saved"}}).rstrip("\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_conv(layer, x, Spy(lambda *a: None))
        assert measured.calls == 0  # the saved one was taken
        run_conv(layer, torch.randn(1, 3, 6, 5), Spy(lambda *a: None))  # a new key: a save
    assert measured.calls == 1 and len(read_cache(path)[1]) == 2


def test_unlocked_saves_at_once_leave_no_empty_line(cache, monkeypatch):
    """Without flock (Windows) another process may append between a read and a save: the save
    took its lines for a crash's piece and wrote a newline, an empty line that every new process
    then warned of."""
    monkeypatch.setattr(_choice, "fcntl", None)
    path = cache / "choices.jsonl"
    ours, theirs = _choice.ChoiceCache(path), _choice.ChoiceCache(path)
    ours.put("first", _choice.Choice("torch", "ours"))
    theirs.put("second", _choice.Choice("torch", "theirs"))
    monkeypatch.setattr(ours, "_read_new_lines", lambda *args, **kwargs: None)  # raced
    ours.put("third", _choice.Choice("torch", "ours"))
    assert "\n\n" not in path.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(_choice.ChoiceCache(path).entries) == 3


def test_a_file_written_again_in_place_is_read_from_its_start(cache):
    """cp writes into the old inode, and a freed inode number is taken again at once (ext4): a
    process went on reading the new file at its offset in the old one, from the middle of a
    line, and wrote its own choice for a key another process had saved first."""
    path = cache / "choices.jsonl"
    ours = _choice.ChoiceCache(path)
    ours.put("mine", _choice.Choice("fastunet", "ours"))
    file = path.stat().st_ino
    theirs = {key: {"path": "torch", "reason": "theirs", "times_ms": None}
              for key in ("shared", "a-longer-key-than-mine")}  # fmt: skip
    path.write_text(cache_text(theirs))
    assert path.stat().st_ino == file
    assert ours.put("shared", _choice.Choice("fastunet", "ours")).reason == "theirs"
    assert ours.get("a-longer-key-than-mine").reason == "theirs"


def test_a_cache_file_that_is_not_a_regular_file_is_ignored_with_a_warning(cache):
    """A FIFO: opening it waited for a writer, so the first layer hung with no warning."""
    path = cache / "choices.jsonl"
    os.mkfifo(path)
    read = []
    thread = threading.Thread(
        target=lambda: read.append(len(_choice.ChoiceCache(path).entries)), daemon=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        thread.start()
        thread.join(timeout=60)
    assert read == [0], "reading a FIFO hung"
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        assert _choice.ChoiceCache(path).entries == {}


def test_a_save_that_failed_is_made_with_the_next_one(tmp_path):
    """`save_failed` (tune exits 2 with it) says whether a choice is not in the file now."""
    blocker = tmp_path / "cache"
    blocker.write_text("")  # a file where the directory goes
    choices = _choice.ChoiceCache(blocker / "choices.jsonl")
    with pytest.warns(RuntimeWarning, match="cannot save"):
        choices.put("first", _choice.Choice("torch", "measured"))
    assert choices.save_failed
    blocker.unlink()
    choices.put("second", _choice.Choice("torch", "measured"))
    assert not choices.save_failed
    assert read_cache(blocker / "choices.jsonl")[1].keys() == {"first", "second"}


def test_a_save_reads_what_other_processes_appended(cache, measured, monkeypatch):
    """Their choices are taken, not measured again, and a file replaced (a new version) is read
    from its start."""
    layer, x = conv_layer()
    ours = _choice.cache_for(x.device)
    assert ours.entries == {}  # read, while the file is empty
    other = _choice.ChoiceCache(_choice.cache_file(x.device))
    key = _choice.layer_key("conv2d_relu", (x, layer.weight, layer.bias, 1, True))
    other.put(key, _choice.Choice("torch", "the other's"))
    run_conv(layer, torch.randn(1, 3, 6, 5), Spy(lambda *a: None))  # another key: a save
    assert ours.get(key).reason == "the other's"
    _choice.cache_file(x.device).write_text(cache_text({"k2": {"path": "torch", "reason": "new"}}))
    run_conv(layer, torch.randn(1, 3, 7, 5), Spy(lambda *a: None))
    assert ours.get("k2").reason == "new"
    assert measured.calls == 2


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


@pytest.mark.parametrize("looped", ["file", "directory"])
def test_a_cache_path_in_a_loop_of_links_warns_and_keeps_choices_in_memory(
    tmp_path, measured, monkeypatch, looped
):
    """Path.resolve raises RuntimeError for a loop before Python 3.13: it came out of the
    layer's call."""
    directory = tmp_path / "loop" if looped == "directory" else tmp_path
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(directory))
    new_process(monkeypatch)
    layer, x = conv_layer()
    looping = directory if looped == "directory" else _choice.cache_file(x.device)
    looping.symlink_to(looping.name)
    with (
        pytest.warns(RuntimeWarning, match="cannot read the choice cache"),
        pytest.warns(RuntimeWarning, match="cannot save the choice cache .*; keeping it in mem"),
    ):
        run_conv(layer, x, Spy(lambda *a: None))
    assert _choice.cache_for(x.device).save_failed and measured.calls == 1


def test_two_processes_merge_their_choices(cache, measured, monkeypatch):
    layer, x = conv_layer()
    run_conv(layer, x, Spy(lambda *a: None))
    new_process(monkeypatch)
    run_conv(layer, torch.randn(1, 3, 6, 5), Spy(lambda *a: None))
    (saved,) = cache.glob("choices-*.jsonl")
    assert len(read_cache(saved)[1]) == 2


def test_threads_saving_choices_at_once_keep_every_one(cache):
    """Threads of one process (a server's) share the cache file's temporary name: saved one at a
    time, none fails ("cannot save") and none is lost (7 warnings and 123 of 800 kept, unlocked)."""
    choices = _choice.ChoiceCache(cache / "choices.jsonl")

    def save(thread):
        for i in range(100):
            choices.put(f"{thread}-{i}", _choice.Choice("torch", "measured"))

    threads = [threading.Thread(target=save, args=(t,)) for t in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning raised in a thread ends its saving
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    saved = read_cache(cache / "choices.jsonl")[1]
    assert len(saved) == len(choices.entries) == 800


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


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    "op, mode, training, deterministic_only, fastunets",
    [
        ("upsample_concat", "bilinear", True, True, True),
        ("upsample_concat_conv2d_relu", "bilinear", True, True, True),
        ("upsample_concat", "nearest", True, True, False),  # PyTorch's is deterministic
        ("upsample_concat", "bilinear", False, True, False),  # no backward
        ("upsample_concat", "bilinear", True, False, False),  # not asked for
    ],
)  # fmt: skip
def test_deterministic_algorithms_take_fastunets_bilinear_backward_on_cuda(
    cache, measured, op, mode, training, deterministic_only, fastunets
):
    """PyTorch's CUDA bilinear backward raises under torch.use_deterministic_algorithms;
    fastunet's is deterministic, so it runs without measuring (fake CUDA tensors here; the GPU
    tier trains a UNet). Elsewhere the choice is measured as always."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 3, 3, device="cuda", requires_grad=training)
        skip = torch.empty(2, 2, 6, 6, device="cuda")
        weight = torch.empty(3, 6, 3, 3, device="cuda")
        args = (x, skip, mode, False, True) if op == "upsample_concat" else (
            x, skip, weight, None, 1, True, mode, False)  # fmt: skip
        torch.use_deterministic_algorithms(deterministic_only)
        try:
            rule = _choice._deterministic_rule(op, args)
            if fastunets:
                assert _choice.choose_path(op, Spy(None), args) is _choice.DETERMINISTIC_CHOICE
        finally:
            torch.use_deterministic_algorithms(False)
    assert rule is (_choice.DETERMINISTIC_CHOICE if fastunets else None)
    assert measured.calls == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bilinear_unet_trains_deterministically_where_pytorch_refuses(
    cache, deterministic, dtype
):
    torch.manual_seed(0)
    reference = ReferenceUNet(3, 2, 8, 2, upsample="bilinear").cuda().to(dtype)
    x = torch.randn(2, 3, 24, 20, device="cuda", dtype=dtype)
    with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        reference(x).sum().backward()
    fast = UNet.from_reference(reference)
    grads = []
    for _ in range(2):
        fast.zero_grad(set_to_none=True)
        fast(x).float().sum().backward()
        grads.append([p.grad for p in fast.parameters()])
    for first, second in zip(*grads, strict=True):
        assert torch.equal(first, second)


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


@pytest.fixture
def cpu_rule(monkeypatch):
    """The CPU rule holds, as outside this suite, whose conftest turns the interpreter on."""
    monkeypatch.setattr(_choice, "INTERPRET", False)


@pytest.fixture
def layout_times(monkeypatch):
    """_measure_layouts returns the timings in `layout_times.times` and counts its calls."""

    class Timer:
        def __init__(self):
            self.times, self.calls = {"contiguous": 2.0, "channels_last": 1.0}, 0

        def __call__(self, run, x, params, training):
            self.calls += 1
            return dict(self.times)

    timer = Timer()
    monkeypatch.setattr(_choice, "_measure_layouts", timer)
    return timer


def faster_layout(timer, name):
    timer.times = {"contiguous": 1.0, "channels_last": 2.0} if name == "contiguous" else {
        "contiguous": 2.0, "channels_last": 1.0}  # fmt: skip
    return _choice.LAYOUTS[name]


@pytest.mark.parametrize("input_layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("faster", ["contiguous", "channels_last"])
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_on_the_cpu_unet_is_referenceunet_in_the_faster_layout_bit_for_bit(
    cache, cpu_rule, layout_times, upsample, faster, input_layout
):
    """The CPU rule runs PyTorch's own path in every layer, so in the layout that measured
    faster UNet makes the same calls as ReferenceUNet in that layout: the same bits, forward
    and every gradient. The output keeps the input's layout."""
    layout = faster_layout(layout_times, faster)
    torch.manual_seed(0)
    reference = ReferenceUNet(3, 2, 4, 2, upsample=upsample)
    fast = UNet.from_reference(reference)
    reference = reference.to(memory_format=layout)
    x = torch.randn(2, 3, 16, 12).contiguous(memory_format=input_layout)
    with _choice.recording() as calls:
        out = fast(x)
    layers = [key for key, choice in calls if choice.path in _choice.PATHS]
    assert _choice.summarize(calls) == {"fastunet": 0, "torch": len(layers)}
    convs_inputs = [key.split("|")[4] for key in layers if "|conv2d_relu|" in key]
    assert all(x.endswith("-nhwc") == (faster == "channels_last") for x in convs_inputs)
    assert out.is_contiguous(memory_format=input_layout)
    expected = reference(x.contiguous(memory_format=layout))
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for (name, a), b in zip(fast.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


@drawn(100)
@given(
    batch=st.integers(0, 2),
    in_channels=st.integers(1, 3),
    depth=st.integers(1, 3),
    # Not 1: PyTorch's elementwise ops hand a one-channel activation on in NCHW strides
    # whatever its layout, so ReferenceUNet itself does not stay in one layout.
    base_channels=st.integers(2, 4),
    axes=UNET_AXES,
    upsample=UPSAMPLE_MODES,
    input_layout=INPUT_LAYOUTS,
    faster=st.sampled_from(list(_choice.LAYOUTS)),
    grad=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_on_the_cpu_drawn_models_are_referenceunet_in_the_faster_layout_bit_for_bit(
    cache, cpu_rule, layout_times, monkeypatch, batch, in_channels, depth, base_channels, axes,
    upsample, input_layout, faster, grad, seed,
):  # fmt: skip
    """The same claim on models, inputs and passes that hypothesis draws: one input channel
    too, whose NCHW strides fit channels_last as well (there `contiguous` keeps them, and the
    first conv computed NCHW whatever layout measured faster)."""
    new_process(monkeypatch)  # each example chooses afresh, in its own `faster` layout
    for saved in cache.glob("choices-*.jsonl"):
        saved.unlink()
    layout = faster_layout(layout_times, faster)
    torch.manual_seed(seed)
    reference = ReferenceUNet(in_channels, 2, base_channels, depth, *upsample)
    fast = UNet.from_reference(reference)
    reference = reference.to(memory_format=layout)
    x = in_layout(torch.randn(batch, in_channels, *unet_size(depth, axes)), input_layout)
    with torch.set_grad_enabled(grad):
        out = fast(x)
        expected = reference(x.contiguous(memory_format=layout))
    assert torch.equal(out, expected)
    if grad:
        out.sum().backward()
        expected.sum().backward()
        for (name, a), b in zip(fast.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), name


class ConvCounter(TorchFunctionMode):
    """A torch-function mode that counts the calls of F.conv2d."""

    def __init__(self):
        super().__init__()
        self.convs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.convs += func is F.conv2d
        return func(*args, **(kwargs or {}))


# Watchers that would count the timing runs: how to start one, and what it counted.
COUNTERS = {
    "flop-counter": (lambda: FlopCounterMode(display=False), FlopCounterMode.get_total_flops),
    "function-mode": (ConvCounter, lambda counter: counter.convs),
    "profiler": (
        torch.profiler.profile,
        lambda profile: sum(event.name == "aten::conv2d" for event in profile.events()),
    ),
}


@pytest.mark.parametrize("watcher", COUNTERS)
def test_a_layer_is_timed_out_of_sight_of_a_checkpoint_and_not_where_it_would_be_counted(
    cache, monkeypatch, watcher
):
    """The per-layer timing (a forward and backward of both paths) inside a non-reentrant
    checkpoint, which counts what its region saves, is hidden from it; under a dispatch mode
    (FlopCounterMode), a torch-function mode or a profiler, which would count it, nothing is
    timed. `torch.device(...)`, a torch-function mode that only sets new tensors' device, does
    not count."""
    monkeypatch.setattr(_choice, "_rule", lambda op, x: None)  # as on a GPU
    measure = Spy(_choice.measure)
    monkeypatch.setattr(_choice, "measure", measure)
    layer, x = conv_layer()
    x.requires_grad_()
    start, _ = COUNTERS[watcher]
    with start():
        layer(x).sum().backward()
    assert measure.calls == 0 and not _choice._decided
    with torch.device("cpu"):
        out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    out.sum().backward()
    assert measure.calls == 1 and len(_choice._decided) == 1


def _ensemble_step(models, x):
    """The models' outputs at once, as torch.func.vmap over their stacked parameters."""
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def run(p, b):
        return torch.func.functional_call(base, (p, b), (x,))

    return torch.func.vmap(run)(params, buffers)


@pytest.mark.parametrize(
    "watcher", ["checkpoint", "forward-hook", "gradient-hook", *COUNTERS, "vmap"]
)
def test_the_layout_timing_is_not_seen_by_the_caller(cache, cpu_rule, watcher):
    """The first call of a shape times UNet in both layouts. A non-reentrant checkpoint, which
    counts the tensors its region saves, does not see those runs; hooks, a dispatch mode, a
    torch-function mode, a profiler and a functorch transform would, so there nothing is timed
    and x's layout runs. Each sees one call of UNet, as of ReferenceUNet."""
    torch.manual_seed(0)
    reference = ReferenceUNet(3, 2, 4, 2)
    fast = UNet.from_reference(reference)
    x = torch.randn(2, 3, 16, 12)
    if watcher == "checkpoint":
        out = torch.utils.checkpoint.checkpoint(fast, x, use_reentrant=False)
        out.sum().backward()
        reference(x).sum().backward()
        for (name, a), b in zip(fast.named_parameters(), reference.parameters(), strict=True):
            assert relative_error(a.grad, b.grad) < 1e-5, name
    elif watcher in ("forward-hook", "gradient-hook"):
        calls = []
        if watcher == "forward-hook":
            fast.encoders[0].register_forward_hook(lambda *args: calls.append(1))
        else:
            fast.head.weight.register_hook(lambda grad: calls.append(1))
        fast(x).sum().backward()
        assert calls == [1]
    elif watcher in COUNTERS:
        start, counted = COUNTERS[watcher]
        counts = []
        for model in (fast, reference):
            with start() as counter:
                model(x).sum().backward()
            counts.append(counted(counter))
        assert counts[0] == counts[1] > 0
    else:
        others = [UNet(3, 2, 4, 2), ReferenceUNet(3, 2, 4, 2)]
        for _ in range(2):  # and again, with x's shape timed and its layout kept
            out = _ensemble_step([fast, others[0]], x)
            expected = _ensemble_step([reference, others[0].to_reference()], x)
            assert relative_error(out, expected) < 1e-5
            fast(x)


def test_the_layout_is_measured_once_per_shape_and_pass_whatever_the_input_layout(
    cache, cpu_rule, layout_times
):
    fast = UNet(3, 2, 4, 2)
    x = torch.randn(2, 3, 16, 12)
    out = fast(x)
    assert torch.equal(fast(x.contiguous(memory_format=torch.channels_last)), out)
    assert layout_times.calls == 1
    with torch.no_grad():  # inference is another pass
        fast(x)
    fast(x[:1])  # another shape
    UNet(3, 2, 4, 2, upsample="bilinear")(x)  # another model
    assert layout_times.calls == 4
    with _choice.recording() as calls:
        fast(x)
    assert layout_times.calls == 4
    (key, choice), *_ = calls
    cpu = _choice.device_name(x.device)
    assert key.startswith(f"{cpu}|unet-layout|forward+backward|float32|2x3x16x12|in_channels=3|")
    threads = torch.get_num_threads()
    assert key.endswith(f"|weights=contiguous_format|threads={threads}")
    assert choice.path == "channels_last"
    # channels_last weights make oneDNN compute channels_last in either layout: another key.
    fast.to(memory_format=torch.channels_last)(x)
    assert layout_times.calls == 5
    torch.set_num_threads(threads + 1)  # another thread count: another key (it was reused)
    try:
        fast(x)
    finally:
        torch.set_num_threads(threads)
    assert layout_times.calls == 6


def test_another_cpu_model_measures_again_in_a_file_of_its_own(
    cache, cpu_rule, layout_times, monkeypatch
):
    """Machines with other CPUs sharing a home directory (a cluster's) do not take each other's
    choices: the file and the key name the CPU's model."""
    fast = UNet(3, 2, 4, 2)
    x = torch.randn(2, 3, 16, 12)
    fast(x)
    new_process(monkeypatch)
    monkeypatch.setattr(_choice, "cpu_model", lambda: ("Other CPU 9000", ("amx_bf16",)))
    monkeypatch.setattr(_choice, "device_name", _choice.device_name.__wrapped__)  # not cached
    fast(x)
    assert layout_times.calls == 2
    assert "choices-other-cpu-9000-amx-bf16.jsonl" in {path.name for path in cache.iterdir()}
    assert len(list(cache.glob("choices-*.jsonl"))) == 2


def test_a_new_process_reads_the_layout_and_gets_the_same_bits(
    cache, cpu_rule, layout_times, monkeypatch
):
    fast = UNet(3, 2, 4, 2)
    x = torch.randn(2, 3, 16, 12)
    for faster in ("channels_last", "contiguous"):
        faster_layout(layout_times, faster)
        first = fast(x)
        new_process(monkeypatch)
        layout_times.times = None  # a measurement now would fail
        assert torch.equal(fast(x), first)
        (saved,) = cache.glob("choices-*.jsonl")
        (entry,) = read_cache(saved)[1].values()
        assert entry["path"] == faster
        saved.unlink()
        new_process(monkeypatch)


def test_a_layers_entry_of_the_other_kind_is_ignored_with_a_warning(cache, measured):
    """A layer's key holding a layout (an edit, another version) is not a choice: the layer is
    measured and its choice saved in place of the line. The save handed the line back, and the
    layer quietly ran PyTorch's path."""
    layer, x = conv_layer()
    key = _choice.layer_key("conv2d_relu", (x, layer.weight, layer.bias, 1, True))
    path = _choice.cache_file(x.device)
    path.write_text(cache_text({key: {"path": "channels_last", "reason": "a layout"}}))
    spy = Spy(lambda *a: None)
    with pytest.warns(RuntimeWarning, match="1 lines of the choice cache .* are not choices"):
        run_conv(layer, x, spy)
    assert measured.calls == spy.calls == 1
    assert read_cache(path)[1][key]["path"] == "fastunet"


def test_a_layout_entry_of_the_other_kind_is_ignored_with_a_warning(
    cache, cpu_rule, layout_times, monkeypatch
):
    """A model's layout key holding a layer's path: the save handed it back, and UNet's call
    raised KeyError: 'torch'. The layout is measured and saved in place of the line."""
    fast, x = UNet(3, 2, 4, 2), torch.randn(2, 3, 16, 12)
    with _choice.recording() as calls:
        fast(x)
    ((key, _),) = [(key, choice) for key, choice in calls if choice.path in _choice.LAYOUTS]
    path = _choice.cache_file(x.device)
    path.write_text(cache_text({key: {"path": "torch", "reason": "a layer's path"}}))
    new_process(monkeypatch)
    with pytest.warns(RuntimeWarning, match="1 lines of the choice cache .* are not choices"):
        fast(x)
    assert layout_times.calls == 2
    assert read_cache(path)[1][key]["path"] == "channels_last"


@pytest.mark.parametrize("why", ["interpreter", "forced backend", "torch.compile"])
def test_the_layout_is_the_inputs_where_the_cpu_rule_does_not_hold(cache, monkeypatch, why):
    monkeypatch.setattr(_choice, "_measure_layouts", None)  # measuring would fail
    if why == "forced backend":
        monkeypatch.setattr(_choice, "INTERPRET", False)
        monkeypatch.setenv("FASTUNET_BACKEND", "torch")
    fast = UNet(3, 2, 4, 1)
    if why == "torch.compile":
        monkeypatch.setattr(_choice, "INTERPRET", False)
        fast = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), fast(x.contiguous(memory_format=torch.channels_last)))


def test_measure_layouts_times_both_and_leaves_grads_rng_and_recording_alone(cache, cpu_rule):
    fast = UNet(3, 2, 4, 2)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    rng = torch.get_rng_state()
    for grad_enabled in (False, True):
        with torch.set_grad_enabled(grad_enabled), _choice.recording() as calls:
            fast(x)
        (layout,) = [choice for _, choice in calls if choice.path in _choice.LAYOUTS]
        assert set(layout.times_ms) == set(_choice.LAYOUTS)
        assert all(t > 0 for t in layout.times_ms.values())
        assert len(calls) == 1 + 13  # the layout and one forward's layer calls, not the timed ones
    assert x.grad is None and all(p.grad is None for p in fast.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_info_says_which_layout_unets_activations_take(cache, monkeypatch):
    cpu = torch.device("cpu")
    assert _choice.describe(cpu)["unet_layout"] == "the input's"  # the interpreter
    monkeypatch.setattr(_choice, "INTERPRET", False)
    assert "whichever measures faster" in _choice.describe(cpu)["unet_layout"]


def test_a_jit_trace_of_a_layer_measures_nothing(cache, measured, monkeypatch):
    """A trace would record the timing runs into its graph: the fastunet op runs instead."""
    from fastunet import ops

    no_measuring(monkeypatch)
    layer, x = conv_layer()
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)
        torch.testing.assert_close(traced(x), ops.conv2d_relu(x, layer.weight, layer.bias, 1))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_a_jit_trace_of_unet_on_the_cpu_keeps_the_inputs_layout_and_passes_its_check(
    cache, cpu_rule, layout_times, grad
):
    """A trace measures nothing: it records the reference's calls in the input's layout. Its
    check re-traces without grad, so the PyTorch path must not take its no-grad shortcut (the 2x
    nearest upsample written into the concat) in a trace: the graphs differed."""
    reference = ReferenceUNet(3, 2, 4, 2)
    fast = UNet.from_reference(reference)
    x = torch.randn(1, 3, 16, 12)
    faster_layout(layout_times, "channels_last")
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(fast, x, check_trace=False)
        assert layout_times.calls == 0
        assert torch.equal(traced(x), reference(x))
        torch.jit.trace(fast, x)  # the check raises TracingCheckError where the graphs differ


def test_under_the_cpu_rule_unets_layers_do_not_ask_one_by_one(
    cache, cpu_rule, layout_times, monkeypatch
):
    """The rule is checked once a forward: each layer asking again cost about 10 us a call."""
    reference = ReferenceUNet(3, 2, 4, 2)
    fast = UNet.from_reference(reference)
    x = torch.randn(2, 3, 16, 12)
    faster_layout(layout_times, "contiguous")
    monkeypatch.setattr(_choice, "choose_path", None)  # a layer asking would fail
    assert torch.equal(fast(x), reference(x))
    assert not _choice._by_rule.get()  # only while the model runs
    with torch.no_grad():
        fast(x)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_checkpoint_recomputing_in_another_layout_gives_that_layouts_gradients(
    cache, cpu_rule, monkeypatch, reentrant
):
    """A reentrant checkpoint runs the forward without autograd and recomputes it with: two
    passes, which may measure faster in different layouts. The output is then the inference
    layout's, the gradients the training layout's, each bit for bit."""

    def by_pass(run, x, params, training):
        return {"contiguous": 2.0, "channels_last": 1.0} if training else {
            "contiguous": 1.0, "channels_last": 2.0}  # fmt: skip

    monkeypatch.setattr(_choice, "_measure_layouts", by_pass)
    torch.manual_seed(0)
    reference = ReferenceUNet(3, 2, 4, 2)
    fast = UNet.from_reference(reference)
    x = torch.randn(2, 3, 16, 12, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(fast, x, use_reentrant=reentrant)
    out.sum().backward()
    with torch.no_grad():  # the pass the checkpoint's forward ran in
        inference = reference(x)
    reference_cl = reference.to(memory_format=torch.channels_last)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    training = reference_cl(x_cl)
    training.sum().backward()
    assert torch.equal(out, inference if reentrant else training)
    assert torch.equal(x.grad, x_cl.grad)
    for (name, a), b in zip(fast.named_parameters(), reference_cl.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_selective_checkpointing_that_saves_convolutions_trains_as_reference(cache, cpu_rule):
    """A policy that saves aten's convolutions (the usual recipe) caches their outputs and
    refuses a change to them: PyTorch's path ran its ReLU in place on the conv's output."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        if op is torch.ops.aten.convolution.default:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    torch.manual_seed(0)
    reference = ReferenceUNet(3, 2, 4, 2)
    fast = UNet.from_reference(reference)
    x = torch.randn(2, 3, 16, 12)
    for model in (reference, fast):
        contexts = functools.partial(create_selective_checkpoint_contexts, policy)
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False, context_fn=contexts)
        out.square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


TUNE = ["tune", "--device", "cpu", "--batch", "2", "--size", "16", "--base-channels", "2",
        "--depth", "2", "--dtype", "fp32"]  # fmt: skip


def test_tune_fills_the_cache_so_a_new_process_measures_nothing(
    cache, measured, monkeypatch, capsys
):
    """`fastunet tune` measures each layer of the model's inference and its training step
    once, as a GPU does, and saves them: the same model in a new process reads them all."""
    measured.times = {"fastunet": 2.0, "torch": 1.0}
    assert main([*TUNE, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    # 13 layers, 11 shapes (each decoder's second conv has an encoder conv's), in 2 passes
    assert len(table) == measured.calls == 22
    assert {key.split("|")[2] for key in table} == {"forward", "forward+backward"}
    assert all(entry["path"] == "torch" for entry in table.values())
    new_process(monkeypatch)
    no_measuring(monkeypatch)
    assert tuned_keys(UNet(3, 2, 2, 2)) == set(table)


def tuned_keys(model, size=(16, 16)) -> set[str]:
    """The keys of TUNE's model's inference and training step."""
    x = torch.randn(2, 3, *size).contiguous(memory_format=torch.channels_last)
    with _choice.recording() as calls:
        with torch.no_grad():
            model(x)
        model(x).sum().backward()
    return {key for key, _ in calls}


@pytest.mark.parametrize(
    "fixtures", [["measured"], ["cpu_rule", "layout_times"]], ids=["layers", "layout"]
)
def test_tune_fills_the_cache_for_align_corners_and_a_non_square_size(
    cache, monkeypatch, capsys, request, fixtures
):
    """Both are in the keys (align_corners in the layout's and the upsampling layers', the size
    in every one), and tune took neither: such a model measured at its first call after tune.
    On a GPU the layers are measured, on the CPU the layout."""
    for fixture in fixtures:
        request.getfixturevalue(fixture)
    argv = [*TUNE, "--size", "16x12", "--upsample", "bilinear", "--align-corners", "--json"]
    assert main(argv) == 0
    table = json.loads(capsys.readouterr().out)
    new_process(monkeypatch)
    no_measuring(monkeypatch)
    monkeypatch.setattr(_choice, "_measure_layouts", None)  # measuring would fail
    model = UNet(3, 2, 2, 2, upsample="bilinear", align_corners=True)
    assert tuned_keys(model, (16, 12)) == set(table)


def test_tune_measures_the_weights_layout_the_model_runs_with(cache, measured, capsys):
    """The weights' layout is in each layer's key: tune measured NCHW weights, and a GPU model
    with channels_last weights, as README advises (and the bench and startup.py run), found
    none of its keys tuned. The default is channels_last on a GPU."""
    assert main([*TUNE, "--weights", "channels_last", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    model = UNet(3, 2, 2, 2).to(memory_format=torch.channels_last)
    assert tuned_keys(model) == set(table)
    nchw_weights = tuned_keys(UNet(3, 2, 2, 2))
    assert not {key for key in nchw_weights if "conv2d" in key} & set(table)


def test_tune_on_the_cpu_measures_the_layout_and_says_where_it_keeps_it(
    cache, cpu_rule, layout_times, capsys
):
    assert main(TUNE) == 0
    out = capsys.readouterr().out
    assert layout_times.calls == 2  # inference and the training step
    assert "22 layer shapes: 0 fastunet, 22 torch" in out
    assert str(_choice.cache_file(torch.device("cpu"))) in out


def test_tune_fails_when_it_cannot_save_what_it_measured(tmp_path, measured, monkeypatch, capsys):
    """Saving is tune's job: it said the choices were kept, and exited 0, with none saved."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(blocker / "cache"))  # under a file: no mkdir
    new_process(monkeypatch)
    with pytest.warns(RuntimeWarning, match="cannot save"):
        assert main(TUNE) == 2
    assert "the choices were made but could not be saved" in capsys.readouterr().err


def test_a_cache_file_reached_through_a_link_stays_a_link(cache, measured):
    """A cache shared through a symbolic link: each save replaced the link with a file."""
    shared = cache / "shared.jsonl"
    link = _choice.cache_file(torch.device("cpu"))
    link.symlink_to(shared)  # dangling until the first save
    layer, x = conv_layer()
    run_conv(layer, x, Spy(lambda *a: None))
    assert link.is_symlink()
    assert len(read_cache(shared)[1]) == 1


def test_a_key_another_process_saved_first_takes_its_choice(cache, measured, monkeypatch):
    """Processes started together measure a new key each: each kept its own, so they ran
    different paths (different bits) for the same layer, and the file kept the last writer's."""
    layer, x = conv_layer()
    assert _choice.cache_for(x.device).entries == {}  # read before the other process saved
    other = _choice.ChoiceCache(_choice.cache_file(x.device))
    key = _choice.layer_key("conv2d_relu", (x, layer.weight, layer.bias, 1, True))
    first = _choice.Choice("torch", "measured by the other process")
    assert other.put(key, first) == first
    measured.times = {"fastunet": 1.0, "torch": 2.0}  # this process measures the other way
    spy = Spy(lambda *a: None)
    run_conv(layer, x, spy)
    assert spy.calls == 0 and measured.calls == 1
    saved = read_cache(_choice.cache_file(x.device))[1]
    assert saved[key]["reason"] == "measured by the other process"


SAVE_IN_A_PROCESS = """
import sys, torch
from fastunet.ops import _choice
cache = _choice.cache_for(torch.device("cpu"))
cache.entries
sys.stdin.readline()  # all start saving together
for i in range(100):
    cache.put(f"{sys.argv[1]}-{i}", _choice.Choice("torch", "measured"))
"""


def test_processes_saving_at_once_keep_every_choice(cache):
    """Saves take a file lock: when each save read, merged and replaced the file, 4 processes
    saving 100 choices each, unlocked, lost 19 to 46 of them."""
    import subprocess
    import sys

    workers = [
        subprocess.Popen([sys.executable, "-c", SAVE_IN_A_PROCESS, str(w)], stdin=subprocess.PIPE)
        for w in range(4)
    ]
    for worker in workers:
        worker.stdin.write(b"go\n")
        worker.stdin.flush()
    assert [worker.wait(timeout=120) for worker in workers] == [0] * 4
    saved = read_cache(_choice.cache_file(torch.device("cpu")))[1]
    assert len(saved) == 400
