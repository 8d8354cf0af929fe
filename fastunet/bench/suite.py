"""The benchmark suite behind `fastunet bench`: every op at each UNet level and the whole model.

Each row times fastunet and its baselines side by side in one run, with rotating inputs, and
reports speedups, peak memory, FLOPs and bytes (and their rates against the device's own
measured ceilings) and parity against a float64 reference.
"""

from __future__ import annotations

import copy
import datetime
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastunet import ReferenceUNet, UNet, ops
from fastunet.bench import accelerated, counts, parity
from fastunet.bench.shapes import ConvShape, PoolShape, UpsampleShape, unet_shapes
from fastunet.bench.timing import ceilings, compare_ms, peak_memory_mb
from fastunet.info import info
from fastunet.ops import _choice
from fastunet.ops._backend import choose
from fastunet.ops._eager import call

INPUT_SETS = 3
GPU_ONLY = "needs a CUDA device"
# Which model cases time torch.compile(mode="max-autotune") of the reference: its compile time
# alone is minutes, so by default only the standard case does.
COMPILE_CHOICES = ("standard", "all", "none")
STANDARD_CASE = "N16-256-bf16"
# A model step takes tens of ms: do_bench's default 100 ms would time only a few of them.
MODEL_WARMUP_MS, MODEL_REP_MS = 200, 1000


@dataclass(frozen=True)
class ModelCase:
    name: str
    batch: int
    size: int
    base_channels: int
    depth: int
    dtype: torch.dtype  # bf16 and fp16 run under autocast with fp32 weights
    compile_baseline: bool
    # "reference": UNet against ReferenceUNet; "accelerate": fastunet.accelerate of a UNet in
    # milesial's style against that model as written (fastunet.bench.accelerated)
    model: str = "reference"

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32


def model_cases(
    quick: bool, compile: str = "standard", names: list[str] | None = None
) -> list[ModelCase]:
    """The model cases to time, optionally only those named; `compile` is one of
    COMPILE_CHOICES. N=1 shows the op layer's per-call overhead, which a large batch hides."""
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {compile!r}")
    if quick:
        cases = [
            ModelCase("quick-fp32", 2, 64, 8, 3, torch.float32, False),
            ModelCase("quick-bf16", 2, 64, 8, 3, torch.bfloat16, False),
            ModelCase("quick-256-fp32", 1, 256, 16, 4, torch.float32, False),
            ModelCase("quick-accelerate-fp32", 2, 64, 8, 3, torch.float32, False, "accelerate"),
        ]
    else:
        cases = [
            ModelCase(name, batch, size, 64, 4, dtype, compile == "all" or (
                compile == "standard" and name == STANDARD_CASE))
            for name, batch, size, dtype in (
                (STANDARD_CASE, 16, 256, torch.bfloat16),
                ("N1-256-bf16", 1, 256, torch.bfloat16),
                ("N8-512-bf16", 8, 512, torch.bfloat16),
                ("N16-256-fp32", 16, 256, torch.float32),
            )
        ]  # fmt: skip
        cases.append(ModelCase("accelerate-N16-256-bf16", 16, 256, 64, 4, torch.bfloat16,
                               compile == "all", "accelerate"))  # fmt: skip
    if names:
        unknown = set(names) - {case.name for case in cases}
        if unknown:
            known = ", ".join(case.name for case in cases)
            raise ValueError(f"unknown case {', '.join(sorted(unknown))}; the cases are {known}")
        cases = [case for case in cases if case.name in names]
    return cases


def _rate(amount: float, ms: float, scale: float) -> float | None:
    return amount / ms / scale if ms > 0 else None


def _rates(flops: int, nbytes: int, ms: float, ceiling: dict) -> dict:
    """FLOPs and bytes, and on a GPU their rates, also as fractions of the measured ceilings."""
    peak, bandwidth = ceiling.get("matmul_tflops"), ceiling.get("copy_gbps")
    measured = peak is not None
    tflops = _rate(flops, ms, 1e9) if measured else None
    gbps = _rate(nbytes, ms, 1e6) if measured and nbytes is not None else None
    return {
        "flops": flops,
        "bytes": nbytes,
        "tflops": tflops,
        "gbps": gbps,
        "tflops_fraction": tflops / peak if peak and tflops else None,
        "gbps_fraction": gbps / bandwidth if bandwidth and gbps else None,
    }


def _speedups(times: dict) -> dict:
    ours = times["fastunet"]
    return {name: t / ours for name, t in times.items() if name != "fastunet"}


# ---------------------------------------------------------------- ops at each UNet level


@dataclass
class OpBench:
    """One op at one shape: inputs (the differentiable ones first), fastunet and eager calls."""

    op: str
    shape: object
    inputs: Callable[[], list[torch.Tensor]]
    differentiable: int  # how many leading inputs get gradients
    fastunet: Callable[..., torch.Tensor]
    eager: Callable[..., torch.Tensor]
    counts: Callable[[int, bool], dict]


def _conv_bench(s: ConvShape, dtype, device) -> OpBench:
    def inputs():
        x = torch.randn(s.batch, s.in_channels, s.height, s.width, device=device, dtype=dtype)
        w = torch.randn(s.out_channels, s.in_channels, s.kernel, s.kernel, device=device)
        b = torch.randn(s.out_channels, device=device)
        scale = (s.in_channels * s.kernel**2) ** -0.5
        return [x.contiguous(memory_format=torch.channels_last), (w * scale).to(dtype), b.to(dtype)]

    def eager(x, w, b):
        out = F.conv2d(x, w, b, padding=s.padding)
        return F.relu(out) if s.relu else out

    return OpBench(
        "conv2d_relu", s, inputs, 3,
        lambda x, w, b: call(ops.conv2d_relu, x, w, b, s.padding, s.relu), eager,
        lambda size, backward: counts.conv_counts(s, size, backward),
    )  # fmt: skip


def _pool_bench(s: PoolShape, dtype, device) -> OpBench:
    def inputs():
        x = torch.randn(s.batch, s.channels, s.height, s.width, device=device, dtype=dtype)
        return [x.contiguous(memory_format=torch.channels_last)]

    return OpBench(
        "max_pool2d", s, inputs, 1, ops.max_pool2d, lambda x: F.max_pool2d(x, 2),
        lambda size, backward: counts.pool_counts(s, size, backward),
    )  # fmt: skip


def _upsample_bench(s: UpsampleShape, dtype, device, mode: str) -> OpBench:
    def inputs():
        x = torch.randn(s.batch, s.x_channels, s.x_height, s.x_width, device=device, dtype=dtype)
        skip = torch.randn(s.batch, s.skip_channels, s.height, s.width, device=device, dtype=dtype)
        cl = torch.channels_last
        return [x.contiguous(memory_format=cl), skip.contiguous(memory_format=cl)]

    def eager(x, skip):
        align = False if mode == "bilinear" else None
        return torch.cat(
            [skip, F.interpolate(x, skip.shape[-2:], mode=mode, align_corners=align)], 1
        )

    return OpBench(
        "upsample_concat", s, inputs, 2,
        lambda x, skip: call(ops.upsample_concat, x, skip, mode), eager,
        lambda size, backward: counts.upsample_counts(s, size, backward),
    )  # fmt: skip


def _op_parity(bench: OpBench, sets: list) -> dict:
    """Output and gradients against float64: fastunet's error, PyTorch's error in the same
    dtype, and the worst ratio of the two over every tensor."""
    tensors, grad_out = sets[0]
    tensors = [t.detach().requires_grad_(i < bench.differentiable) for i, t in enumerate(tensors)]
    as64 = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]

    def everything(fn, args):
        out = fn(*args)
        return [out, *torch.autograd.grad(out, args[: bench.differentiable], grad_out.to(out))]

    truth = everything(bench.eager, as64)
    ours = everything(bench.fastunet, tensors)
    theirs = everything(bench.eager, tensors)
    worst = {"ratio": -1.0}
    names = ["output", *[f"grad_{i}" for i in range(bench.differentiable)]]
    for name, a, b, t in zip(names, ours, theirs, truth, strict=True):
        error, torch_error = parity.relative_error(a, t), parity.relative_error(b, t)
        ratio = parity.error_ratio(error, torch_error)
        if ratio > worst["ratio"]:
            worst = {"ratio": ratio, "error": error, "torch_error": torch_error, "worst": name}
    return worst


def op_input_sets(bench: OpBench, count: int = INPUT_SETS) -> list:
    """`count` sets of (inputs, grad_output) to rotate over."""
    sets = []
    for _ in range(count):
        tensors = bench.inputs()
        with torch.no_grad():
            out = bench.eager(*tensors)
        sets.append((tensors, torch.randn_like(out)))
    return sets


def op_step(bench: OpBench, fn, sets: list, backward: bool) -> Callable[[int], object]:
    """step(i): fn on input set i, forward only (no autograd) or forward + backward."""

    def step(i):
        tensors, grad_out = sets[i]
        if not backward:
            with torch.no_grad():
                return fn(*tensors)
        leaves = [
            t.detach().requires_grad_(j < bench.differentiable) for j, t in enumerate(tensors)
        ]
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves[: bench.differentiable], grad_out)

    return step


def run_op_bench(bench: OpBench, name: str, dtype, device, ceiling) -> list[dict]:
    sets = op_input_sets(bench)
    backend = choose(bench.op, device, dtype)
    rows = []
    for backward in (False, True):
        steps = {
            candidate: op_step(bench, fn, sets, backward)
            for candidate, fn in (("fastunet", bench.fastunet), ("eager", bench.eager))
        }
        times = compare_ms(steps, INPUT_SETS, device)
        amounts = bench.counts(torch.empty((), dtype=dtype).element_size(), backward)
        rows.append({
            "op": bench.op,
            "level": name,
            "shape": vars(bench.shape),
            "dtype": parity.dtype_name(dtype),
            "pass": "forward+backward" if backward else "forward",
            "backend": backend.name,
            "time_ms": times,
            "speedup": _speedups(times),
            **_rates(amounts["flops"], amounts["bytes"], times["fastunet"], ceiling),
        })  # fmt: skip
    parity_row = _op_parity(bench, sets)
    for row in rows:
        row["parity"] = parity_row
    return rows


def op_benches(quick: bool, device) -> tuple[torch.dtype, list[tuple[str, OpBench]]]:
    """bf16 channels_last at each level of N=16, 256x256, base 64, depth 4 (small in --quick)."""
    dtype = torch.float32 if quick else torch.bfloat16
    shapes = unet_shapes(1, 32, 8, 2) if quick else unet_shapes()
    benches = [(s.name, _conv_bench(s, dtype, device)) for s in shapes["conv"]]
    benches += [(s.name, _pool_bench(s, dtype, device)) for s in shapes["pool"]]
    for mode in ("nearest", "bilinear"):
        benches += [
            (f"{s.name}.{mode}", _upsample_bench(s, dtype, device, mode))
            for s in shapes["upsample"]
        ]
    return dtype, benches


# ---------------------------------------------------------------- the whole model


def _times_bf16_eager(case: ModelCase, device) -> bool:
    """bf16 eager is many times slower than fp32 on the CPU: there it is timed for bf16 cases
    only."""
    return torch.device(device).type == "cuda" or case.autocast


def case_models(case: ModelCase, device) -> tuple[nn.Module, nn.Module]:
    """(the model the baselines run, fastunet's model of it) for a case."""
    if case.model == "accelerate":
        return accelerated.build(case.base_channels, case.depth, device)
    reference = ReferenceUNet(3, 2, case.base_channels, case.depth).to(device)
    return reference, UNet.from_reference(reference)


def model_candidates(
    case: ModelCase, reference: nn.Module, fast: nn.Module, device, quick: bool
) -> dict:
    """name -> (module, input memory format, autocast dtype or None, cudnn.benchmark)."""
    cl, nchw = torch.channels_last, torch.contiguous_format
    autocast = case.dtype if case.autocast else None
    # On the CPU fastunet gets the input its same-dtype baseline gets; inside, it runs whichever
    # layout measured faster for the shape and pass (`_choice.choose_layout`).
    on_cpu_nchw = torch.device(device).type == "cpu" and not case.autocast
    if not on_cpu_nchw:  # channels_last weights as well, as eager_bf16_cl: no per-call reorder
        fast = fast.to(memory_format=cl)
    candidates = {
        "fastunet": (fast, nchw if on_cpu_nchw else cl, autocast, True),
        "eager_fp32_nchw": (copy.deepcopy(reference), nchw, None, False),
    }
    if _times_bf16_eager(case, device):
        module = copy.deepcopy(reference).to(memory_format=cl)
        candidates["eager_bf16_cl"] = (module, cl, torch.bfloat16, True)
    if case.compile_baseline and not quick:
        module = copy.deepcopy(reference).to(memory_format=cl)
        compiled = torch.compile(module, mode="max-autotune")
        candidates["compile"] = (compiled, cl, autocast, True)
    return candidates


def model_step(module, training: bool, autocast, device):
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9) if training else None

    def run(x, target):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            if not training:
                with torch.no_grad():
                    return module(x)
            optimizer.zero_grad(set_to_none=True)
            out = module(x)
        loss = F.cross_entropy(out.float(), target)
        loss.backward()
        optimizer.step()
        return loss

    return run


def _model_timing_step(candidate: tuple, training: bool, inputs, device):
    """step(i): one inference or training step of a candidate on input set i, with its own
    cudnn.benchmark setting (the candidates take turns on the CPU)."""
    module, layout, autocast, benchmark = candidate
    module.train(training)
    run = model_step(module, training, autocast, device)
    sets = [(x.contiguous(memory_format=layout), t) for x, t in inputs]

    def step(i):
        torch.backends.cudnn.benchmark = benchmark
        return run(*sets[i])

    return step


def run_model_case(
    case: ModelCase, device, ceiling, quick: bool, progress, rep_ms: float = MODEL_REP_MS
) -> list[dict]:
    torch.manual_seed(0)
    reference, fast = case_models(case, device)
    inputs = [
        (
            torch.randn(case.batch, 3, case.size, case.size, device=device),
            torch.randint(0, 2, (case.batch, case.size, case.size), device=device),
        )
        for _ in range(INPUT_SETS)
    ]
    candidates = model_candidates(case, reference, fast, device, quick)
    notes = {} if "compile" in candidates else {"compile": _compile_skip_reason(case, quick)}
    if "eager_bf16_cl" not in candidates:
        notes["eager_bf16_cl"] = "not timed: bf16 on the CPU, for an fp32 case, says little"
    rows = []
    for training in (False, True):
        progress(f"model {case.name} {'training' if training else 'inference'}")
        steps = {
            name: _model_timing_step(candidate, training, inputs, device)
            for name, candidate in candidates.items()
        }
        times = compare_ms(steps, INPUT_SETS, device, warmup_ms=MODEL_WARMUP_MS, rep_ms=rep_ms)
        memory = {name: peak_memory_mb(step, device) for name, step in steps.items()}
        with _choice.recording() as calls:
            steps["fastunet"](0)
        layers = parity.layer_paths(calls)
        size = torch.empty((), dtype=case.dtype).element_size()
        amounts = counts.model_counts(
            case.batch, case.size, case.base_channels, case.depth, element_size=size,
            backward=training,
        ) if case.model == "reference" else {
            "flops": accelerated.flops(reference, case.batch, case.size, training), "bytes": None
        }  # fmt: skip
        rows.append({
            "case": case.name,
            "mode": "training" if training else "inference",
            "batch": case.batch,
            "size": case.size,
            "base_channels": case.base_channels,
            "depth": case.depth,
            "dtype": parity.dtype_name(case.dtype) + ("-autocast" if case.autocast else ""),
            "time_ms": times,
            "speedup": _speedups(times),
            "peak_memory_mb": memory,
            "layers": layers,
            **_rates(amounts["flops"], amounts["bytes"], times["fastunet"], ceiling),
            "notes": notes,
        })  # fmt: skip
    progress(f"model {case.name} parity")
    check = (parity.compare if case.model == "reference" else accelerated.compare)(
        batch=2, size=case.size, base_channels=case.base_channels, depth=case.depth,
        dtype=case.dtype, autocast=case.autocast, device=device,
    )  # fmt: skip
    for row in rows:
        row["parity"] = {"batch": 2, **{k: check[k] for k in ("reference", "fastunet", "ratio")}}
    return rows


def _compile_skip_reason(case: ModelCase, quick: bool) -> str:
    if quick:
        return "--quick skips torch.compile (its compile time alone is minutes)"
    return (
        f"torch.compile(max-autotune) was not asked for this case (--compile: standard times "
        f"{STANDARD_CASE} only, all times every case, none none)"
    )


# ---------------------------------------------------------------- the run


def step_count(quick: bool, cases: list[ModelCase], include_ops: bool, device) -> int:
    """How many progress messages `run` will send (for a progress bar)."""
    steps = 1  # the ceilings
    if include_ops:
        shapes = unet_shapes(1, 32, 8, 2) if quick else unet_shapes()
        steps += len(shapes["conv"]) + len(shapes["pool"]) + 2 * len(shapes["upsample"])
    for case in cases:
        candidates = 2 + _times_bf16_eager(case, device) + (case.compile_baseline and not quick)
        steps += 2 * candidates + 1  # inference and training for each, then parity
    return steps


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def run(
    device: torch.device,
    quick: bool = False,
    cases: list[ModelCase] | None = None,
    include_ops: bool = True,
    progress: Callable[[str], None] = lambda message: None,
    checkpoint: Callable[[dict], None] = lambda result: None,
    model_rep_ms: float = MODEL_REP_MS,
) -> dict:
    """Run the suite; the result is what `fastunet bench` writes as JSON. `cases` defaults to
    model_cases(quick); checkpoint(result) is called after each op and model case, so a run cut
    short still leaves what it measured."""
    cases = model_cases(quick) if cases is None else cases
    environment = info(device)
    progress("measuring the device's matmul peak and copy bandwidth")
    ceiling = ceilings(device)
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "complete": False,  # until every row is in: a checkpoint of a run cut short says so
            "quick": quick,
            "model_rep_ms": model_rep_ms,
            "device": environment["device"],
            "device_name": environment["device_name"],
            "driver": _driver_version() if device.type == "cuda" else None,
            "platform": platform.platform(),
            **{k: environment[k] for k in ("fastunet", "python", "torch", "triton")},
            "cuda": environment["cuda_runtime"],
            "backends": {op: b["name"] for op, b in environment["ops"].items()},
            "ceilings": ceiling,
            "null_fields": {} if device.type == "cuda" else {
                field: GPU_ONLY for field in
                ("peak_memory_mb", "tflops", "gbps", "tflops_fraction", "gbps_fraction")
            },
        },
        "ops": [],
        "model": [],
    }  # fmt: skip
    if include_ops:
        # The eager baseline is cuDNN at its best: each shape picks its fastest algorithm.
        torch.backends.cudnn.benchmark = True
        dtype, benches = op_benches(quick, device)
        for name, bench in benches:
            progress(f"{bench.op} {name}")
            result["ops"] += run_op_bench(bench, name, dtype, device, ceiling)
            checkpoint(result)
    for case in cases:
        result["model"] += run_model_case(case, device, ceiling, quick, progress, model_rep_ms)
        checkpoint(result)
    result["meta"]["complete"] = True
    checkpoint(result)
    return result
