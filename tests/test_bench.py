"""`fastunet bench` on a CPU-only machine, and the FLOP and byte counts behind its rates."""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fastunet import ReferenceUNet, UNet
from fastunet.bench.counts import model_counts
from fastunet.bench.timing import ceilings
from fastunet.cli import main
from fastunet.ops import _choice, _timing

OP_FIELDS = {"op", "level", "shape", "dtype", "pass", "backend", "time_ms", "speedup", "flops",
             "bytes", "tflops", "gbps", "tflops_fraction", "gbps_fraction", "parity"}  # fmt: skip
MODEL_FIELDS = {"case", "mode", "batch", "size", "dtype", "time_ms", "speedup", "peak_memory_mb",
                "flops", "bytes", "tflops", "gbps", "tflops_fraction", "gbps_fraction",
                "parity", "notes", "layers"}  # fmt: skip
GPU_FIELDS = {"peak_memory_mb", "tflops", "gbps", "tflops_fraction", "gbps_fraction"}


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    """`fastunet bench --quick` as a user runs it: a fresh process, no Triton interpreter."""
    path = tmp_path_factory.mktemp("bench") / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTUNET_CACHE_DIR"] = str(path.parent)  # the CPU's layout choices land here
    command = [sys.executable, "-m", "fastunet.cli", "bench", "--quick", "--no-progress",
               "--device", "cpu", "--output", str(path)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "GPU speed figures need CUDA" in done.stdout
    return json.loads(path.read_text())


def test_quick_bench_writes_every_field(quick_result):
    meta = quick_result["meta"]
    for field in ("date", "device", "device_name", "driver", "torch", "triton", "cuda",
                  "fastunet", "backends", "ceilings"):  # fmt: skip
        assert field in meta
    assert meta["ceilings"]["matmul_tflops"] is None and meta["ceilings"]["reason"]
    assert set(meta["null_fields"]) == GPU_FIELDS
    ops = {row["op"] for row in quick_result["ops"]}
    assert ops == {"conv2d_relu", "upsample_concat", "max_pool2d"}
    for row in quick_result["ops"]:
        assert set(row) >= OP_FIELDS
        assert row["time_ms"]["fastunet"] > 0 and row["time_ms"]["eager"] > 0
        assert row["parity"]["ratio"] <= 2, row
        assert row["bytes"] > 0
    assert {row["mode"] for row in quick_result["model"]} == {"inference", "training"}
    for row in quick_result["model"]:
        assert set(row) >= MODEL_FIELDS
        baselines = {"fastunet", "eager_fp32_nchw"} | (
            {"eager_bf16_cl"} if row["dtype"] != "float32" else set()
        )
        assert set(row["time_ms"]) == baselines
        assert row["notes"]["compile"]  # why torch.compile was not timed
        assert all(value is None for value in row["peak_memory_mb"].values())
        assert row["tflops"] is None and row["flops"] > 0
        if row["dtype"] == "float32":  # the fp32 rule; the ratio of two ~1e-7 errors is noise
            assert row["parity"]["fastunet"]["output"] <= 1e-5, row
        else:
            assert row["parity"]["ratio"]["output"] <= 2, row
        assert row["layers"]["fastunet"] + row["layers"]["torch"] > 0
        # UNet measures its layout on the CPU; accelerate keeps the model's own.
        accelerated = row["case"].endswith("accelerate-fp32")
        assert (row["layers"]["layout"] is None) if accelerated else (
            row["layers"]["layout"] in _choice.LAYOUTS)  # fmt: skip


class CountBytes(TorchDispatchMode):
    """Bytes read and written by every fastunet op call."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "fastunet":
            outs = out if isinstance(out, tuple) else (out,)
            tensors = [a for a in args if isinstance(a, torch.Tensor)] + list(outs)
            self.total += sum(t.numel() * t.element_size() for t in tensors)
        return out


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("size,depth", [((16, 16), 2), ((17, 24), 3)])
def test_counts_match_the_model(torch_backend, size, depth, backward):
    x = torch.randn(2, 3, *size)
    reference = ReferenceUNet(3, 2, 4, depth)
    with FlopCounterMode(display=False) as flops:
        out = reference(x)
        if backward:
            out.backward(torch.randn_like(out))
    fast = UNet.from_reference(reference)
    with CountBytes() as nbytes:
        out = fast(x)
        if backward:
            out.backward(torch.randn_like(out))
    expected = model_counts(2, size, 4, depth, element_size=4, backward=backward)
    assert expected == {"flops": flops.get_total_flops(), "bytes": nbytes.total}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--device", "cuda:0"], "CUDA is not available"),
        (["bench", "--device", "mps"], "fastunet runs on 'cpu' or 'cuda'"),
        (["info", "--device", "cuda"], "CUDA is not available"),
        (["bench", "--only", "ops", "--case", "N1-256-bf16"], "which --only ops leaves out"),
        (["bench", "--output", "no/such/folder/out.json"], "the folder no/such/folder does not"),
        (["bench", "--markdown", "no/such/folder/out.md"], "the folder no/such/folder does not"),
        (["bench", "--output", "."], "--output . is a directory"),
        (["parity", "--size", "64", "--depth", "14"], "--size must be >= 2**depth = 16384"),
        (["tune", "--size", "64", "--depth", "14"], "--size must be >= 2**depth = 16384"),
    ],
)
def test_bench_argument_errors(argv, message, capsys, monkeypatch):
    """Clear errors before any timing or model building (a depth-14 model filled the memory
    before its size was checked; a missing output folder failed after the whole run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert main(["bench", "--quick", "--plot", "out.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["bench", "--only", "everything"], ["bench", "--bogus"], ["bench", "--model-seconds", "0"],
     ["bench", "--model-seconds", "inf"]],
)  # fmt: skip
def test_bench_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_bench_without_a_gpu_runs_the_quick_suite(torch_backend, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    output = tmp_path / "result.json"
    argv = ["bench", "--only", "model", "--no-progress", "--model-seconds", "0.1"]
    assert main([*argv, "--output", str(output)]) == 0
    assert "no CUDA device, so the --quick suite" in capsys.readouterr().err
    meta = json.loads(output.read_text())["meta"]
    assert meta["quick"] is True and meta["model_rep_ms"] == 100
    assert meta["complete"] is True  # a checkpoint of a run cut short says False


def test_a_checkpoint_that_fails_keeps_the_last_one(tmp_path, monkeypatch):
    """The JSON is replaced whole: a write that fails (a full disk) left a truncated file."""
    from fastunet.ops._common import write_atomically

    output = tmp_path / "result.json"
    write_atomically(output, '{"rows": 1}')

    def full_disk(self, text):
        Path.write_bytes(self, text[:5].encode())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(output, '{"rows": 2}')
    assert json.loads(output.read_text()) == {"rows": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left


def test_cpu_timing_takes_turns_and_gives_each_step_its_median(monkeypatch):
    """On the CPU the candidates alternate, one call each per round (the order flipping each
    round), after a warm-up call per input set; each gets the median of its own calls."""
    clock, calls = [0.0], []

    def step(name, ms):
        def run(i):
            calls.append((name, i))
            clock[0] += ms(i) / 1e3

        return run

    monkeypatch.setattr(_timing.time, "perf_counter", lambda: clock[0])
    steps = {"a": step("a", lambda i: 1 + i), "b": step("b", lambda i: 3.0)}
    times = _timing.compare_ms(steps, 2, torch.device("cpu"), rep_ms=0)
    assert calls[:4] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    rounds = [("a", 0), ("b", 0)], [("b", 1), ("a", 1)]
    assert calls[4:] == [*rounds[0], *rounds[1], *rounds[0], *rounds[1], *rounds[0]]
    assert times == pytest.approx({"a": 1.0, "b": 3.0})  # a: 1, 2, 1, 2, 1 ms


def test_cpu_timing_takes_the_time_asked_for(monkeypatch):
    """Steps of 1 ms asked to be timed 1 s each take about 1000 calls each: the rounds were
    capped at 200, so `fastunet bench --model-seconds 10` timed a 9 ms step for 1.8 s."""
    clock, calls = [0.0], {"a": 0, "b": 0}

    def step(name):
        def run(i):
            calls[name] += 1
            clock[0] += 1e-3

        return run

    monkeypatch.setattr(_timing.time, "perf_counter", lambda: clock[0])
    _timing.compare_ms({"a": step("a"), "b": step("b")}, 1, torch.device("cpu"), rep_ms=1000)
    assert calls["a"] == calls["b"] == pytest.approx(1000, abs=2)


@pytest.fixture
def cuda_device_entered(monkeypatch):
    """torch.cuda.device recorded instead of entered, and triton's do_bench a stub that notes
    the device current at each call: a list of them."""
    import triton.testing

    current, seen = [None], []

    @contextlib.contextmanager
    def device(d):
        current.append(torch.device(d))
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: seen.append(current[-1]) or 1.0)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.empty(0))  # ceilings' operands
    return seen


def test_cuda_timing_makes_the_steps_device_current(cuda_device_entered):
    """do_bench records its events and flushes L2 on the current device: steps on cuda:1 are
    timed there, not on cuda:0 (the op layer's choices, fastunet bench --device cuda:1)."""
    second = torch.device("cuda", 1)
    assert _timing.compare_ms({"a": print, "b": print}, 1, second) == {"a": 1.0, "b": 1.0}
    ceilings(second)
    assert cuda_device_entered == [second] * 4


def test_startup_script_times_cold_warm_and_reference_processes(tmp_path):
    """benchmarks/startup.py (issue 12's start-up targets), at a tiny size on the CPU."""
    script = Path(__file__).parents[1] / "benchmarks" / "startup.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(script), str(tmp_path), "--device", "cpu", "--batch", "1",
               "--size", "16", "--base", "2", "--depth", "1"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "startup.json").read_text())
    assert result["settings"] == {"device": "cpu", "batch": 1, "size": 16, "base": 2, "depth": 1}
    figures = {
        "cold": {"first_training_step_s", "steady_training_step_s", "first_forward_s"},
        "warm": {"first_forward_s", "steady_forward_s", "first_training_step_s"},
        "reference": {"first_forward_s", "steady_forward_s", "triton_key_s"},
    }
    for phase, names in figures.items():
        parts = {"first_step_parts"} if phase != "reference" else set()
        assert set(result[phase]) == names | parts | {"process_s"}, phase
        assert all(result[phase][name] > 0 for name in names), phase
    for phase, first in (("cold", "first_training_step_s"), ("warm", "first_forward_s")):
        parts = result[phase]["first_step_parts"]
        # On the CPU every layer takes aten's path by rule: nothing compiles, tunes or is timed.
        assert parts["triton_compile_calls"] == parts["autotune_timing_calls"] == 0
        assert parts["choice_timing_calls"] == 0
        assert parts["other_s"] == result[phase][first]
    warm = result["warm"]
    assert result["warm_first_forward_ratio"] == warm["first_forward_s"] / warm["steady_forward_s"]
    assert "cold: first training step" in done.stdout


def benchmark_script(name: str):
    """A script of benchmarks/ as a module."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_profile_tells_fastunets_kernels_from_pytorchs():
    """_C's kernels demangle without "max_pool" (they fell in "other"), and PyTorch's max-pool and
    upsample kernels, where a layer takes PyTorch's path, were counted as fastunet's."""
    family = benchmark_script("profile_model").family
    names = {
        "void fastunet::(anonymous namespace)::forward_kernel<fastunet::BFloat16, 8>(...)":
            "fastunet max_pool2d (_C)",
        "void at::native::(anonymous namespace)::max_pool_forward_nhwc<c10::BFloat16>(...)":
            "PyTorch max_pool2d",
        "_upsample_concat_forward_kernel": "fastunet upsample_concat",
        "_upsample_backward_kernel": "fastunet upsample_concat",
        "void at::native::(anonymous namespace)::upsample_nearest2d_nhwc_out_frame<float>(...)":
            "PyTorch upsample",
    }  # fmt: skip
    assert {name: family(name) for name in names} == names


def test_startup_parts_count_each_second_once():
    """startup.py's split of a first step: a part's time leaves out the parts nested in it, a
    call is a part by its caller's name, nothing counts in another thread (the tiles compiling
    in parallel, whose wall time their waiting caller counts), nor while the split is off."""
    startup = benchmark_script("startup")
    parts, now = startup.Parts(), [0.0]
    parts.clock = lambda: now[0]

    def advance(seconds):
        now[0] += seconds

    compile_ = parts.wrap(lambda caller: "triton_compile", lambda: advance(2))
    do_bench = parts.wrap(
        {"_tuning_bench": "autotune_timing"}.get, lambda: compile_() or advance(3)
    )

    def _tuning_bench():
        return do_bench()

    def elsewhere():
        return do_bench()

    parts.on = True
    _tuning_bench()
    elsewhere()  # not a part: its 3 s are the rest's, its compile is a compile
    worker = threading.Thread(target=compile_)
    worker.start()
    worker.join()  # its 2 s are the rest's
    parts.on = False
    _tuning_bench()
    assert now[0] == 17
    split = parts.of(total_s=12)  # the first 12 s ran while the split was on
    assert split["triton_compile_s"] == 4 and split["triton_compile_calls"] == 2
    assert split["autotune_timing_s"] == 3 and split["autotune_timing_calls"] == 1
    assert split["choice_timing_s"] == 0 and split["other_s"] == 5


def test_the_profile_counts_kernels_not_the_ops_ranges_on_the_gpu():
    """A layer's op call is a profiler range named fastunet::<op> (fastunet.ops._eager), which
    the profiler also shows on the GPU as a user annotation spanning the op's kernels: counted,
    it doubled the GPU time and fell in the _C max-pool's family."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, device_type, annotation, ms):
        return SimpleNamespace(name=name, device_type=device_type, is_user_annotation=annotation,
                               device_time=1e3 * ms, cpu_time_total=1e3 * ms)  # fmt: skip

    events = [
        event("fastunet::conv2d_relu", cpu, True, 0.05),
        event("fastunet::conv2d_relu", cuda, True, 2.0),
        event("_conv2d_kernel", cuda, False, 1.5),
    ]
    summary = benchmark_script("profile_model").summarise(
        SimpleNamespace(events=lambda: events), steps=1, wall_ms=4.0
    )
    assert summary["gpu_ms_per_step"] == {"fastunet conv (fwd, grad_input)": 1.5}
    assert summary["launches_per_step"] == {"fastunet conv (fwd, grad_input)": 1}
    host = summary["host_ms_per_op_call"]["fastunet::conv2d_relu"]
    assert host == {"calls_per_step": 1, "median_ms": 0.05}


def test_host_overhead_runs_the_gpu_path_without_a_gpu():
    """benchmarks/host_overhead.py: every layer on fastunet's kernels, only Triton's launch
    stubbed out (its patches of Triton and of the backend choice still apply)."""
    script = Path(__file__).parents[1] / "benchmarks" / "host_overhead.py"
    arguments = ["--base", "4", "--depth", "2", "--size", "16", "--repeats", "2"]
    done = subprocess.run([sys.executable, str(script), *arguments], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["forward_ms"] > 0 and result["training_step_ms"] > result["forward_ms"]
