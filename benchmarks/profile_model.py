"""Where a fastunet.UNet step spends its time on a GPU, and what the op layer costs per call.

    python benchmarks/profile_model.py OUT_DIR [--batch 16 1] [--reduce-overhead]

For each batch size, in bf16 autocast with channels_last input (the bench's standard case):
- a torch.profiler trace of inference and of a training step, summarised as the GPU time of each
  kernel family (our Triton and _C kernels, cuDNN, elementwise and the rest), the share of the
  step's wall time the GPU was busy, and the host time per fastunet op call;
- with --reduce-overhead, the same forward under torch.compile(mode="reduce-overhead"), which
  replays the whole forward as one CUDA graph, so the host's per-op cost disappears.
Writes OUT_DIR/profile.json and prints a table per case.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from fastunet import ReferenceUNet, UNet

SIZE, BASE, DEPTH = 256, 64, 4
STEPS = 5

# Kernel name fragments -> family, first match wins.
FAMILIES = [
    ("_conv2d_grad_weight_kernel", "fastunet conv grad_weight"),
    ("_conv2d_kernel", "fastunet conv (fwd, grad_input)"),
    ("_relu_grad_kernel", "fastunet relu_grad + bias"),
    ("_upsample_concat_forward_kernel", "fastunet upsample_concat"),
    ("_upsample_backward_kernel", "fastunet upsample_concat"),
    # _C's kernels demangle as fastunet::(anonymous namespace)::forward_kernel<...>
    ("fastunet::", "fastunet max_pool2d (_C)"),
    ("max_pool", "PyTorch max_pool2d"),
    ("upsample", "PyTorch upsample"),
    ("triton_", "inductor-generated Triton"),
    ("cudnn", "cuDNN / cuBLAS"),
    ("sm90_xmma", "cuDNN / cuBLAS"),
    ("nchwToNhwc", "layout conversion"),
    ("nhwcToNchw", "layout conversion"),
    ("reduce_kernel", "reductions (sum, loss)"),
    ("elementwise", "elementwise (casts, copies, optimizer)"),
    ("Memset", "memset"),
    ("Memcpy", "memcpy"),
]


def family(name: str) -> str:
    for fragment, label in FAMILIES:
        if fragment in name:
            return label
    return "other"


def make_step(model, training: bool, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if training else None

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if not training:
                with torch.no_grad():
                    return model(x)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
        loss = F.cross_entropy(out.float(), target)
        loss.backward()
        optimizer.step()
        return loss

    return step


def summarise(prof, steps: int, wall_ms: float) -> dict:
    """GPU time per kernel family and host time per fastunet op, per step."""
    gpu = defaultdict(float)
    launches = defaultdict(int)
    host = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if event.is_user_annotation:  # a host range's span on the GPU, not a kernel
                continue
            gpu[family(event.name)] += event.device_time / 1e3 / steps
            launches[family(event.name)] += 1
        elif event.name.startswith("fastunet::"):
            host[event.name].append(event.cpu_time_total / 1e3)
    busy = sum(gpu.values())
    return {
        "wall_ms_per_step": wall_ms,
        "gpu_busy_ms_per_step": busy,
        "gpu_busy_fraction": busy / wall_ms if wall_ms else None,
        "gpu_ms_per_step": dict(sorted(gpu.items(), key=lambda kv: -kv[1])),
        "launches_per_step": {k: v / steps for k, v in launches.items()},
        "host_ms_per_op_call": {
            name: {"calls_per_step": len(times) / steps, "median_ms": statistics.median(times)}
            for name, times in sorted(host.items())
        },
    }


def profile_case(model, training: bool, batch: int) -> dict:
    x = torch.randn(batch, 3, SIZE, SIZE, device="cuda").contiguous(
        memory_format=torch.channels_last
    )
    target = torch.randint(0, 2, (batch, SIZE, SIZE), device="cuda")
    model.train(training)
    step = make_step(model, training, x, target)
    wall_ms = do_bench(step, warmup=200, rep=1000, return_mode="median")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    return summarise(prof, STEPS, wall_ms)


def reduce_overhead_case(reference: ReferenceUNet, batch: int) -> dict:
    """Eager vs torch.compile(mode="reduce-overhead") forward of fastunet.UNet (CUDA graphs)."""
    x = torch.randn(batch, 3, SIZE, SIZE, device="cuda").contiguous(
        memory_format=torch.channels_last
    )
    times = {}
    for name, make in (
        ("fastunet eager", lambda: UNet.from_reference(reference).eval()),
        (
            "fastunet reduce-overhead",
            lambda: torch.compile(UNet.from_reference(reference).eval(), mode="reduce-overhead"),
        ),
        (
            "reference eager bf16 cl",
            lambda: copy.deepcopy(reference).to(memory_format=torch.channels_last).eval(),
        ),
    ):
        model = make()

        def forward(model=model):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x)

        for _ in range(3):  # compile, record the graph, and warm up outside the timing
            forward()
        times[name] = do_bench(forward, warmup=200, rep=1000, return_mode="median")
    return {"batch": batch, "forward_ms": times}


def print_case(title: str, summary: dict) -> None:
    busy, fraction = summary["gpu_busy_ms_per_step"], summary["gpu_busy_fraction"]
    print(f"\n== {title}: {summary['wall_ms_per_step']:.3f} ms/step wall, "
          f"GPU busy {busy:.3f} ms ({100 * fraction:.0f}%)")  # fmt: skip
    for name, ms in summary["gpu_ms_per_step"].items():
        launches = summary["launches_per_step"][name]
        print(f"  {name:40s} {ms:8.3f} ms  {launches:6.1f} launches")
    for name, figures in summary["host_ms_per_op_call"].items():
        print(f"  host {name:35s} {figures['median_ms'] * 1e3:8.1f} us/call "
              f"x {figures['calls_per_step']:.0f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--reduce-overhead", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    reference = ReferenceUNet(3, 2, BASE, DEPTH).cuda()
    model = UNet.from_reference(reference)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    for batch in args.batch:
        for training in (False, True):
            title = f"N{batch}-{SIZE}-bf16 {'training' if training else 'inference'}"
            result["cases"][title] = summary = profile_case(model, training, batch)
            print_case(title, summary)
    if args.reduce_overhead:
        result["reduce_overhead"] = [reduce_overhead_case(reference, b) for b in args.batch]
        for row in result["reduce_overhead"]:
            print(f"\n== forward N{row['batch']}: " + ", ".join(
                f"{name} {ms:.3f} ms" for name, ms in row["forward_ms"].items()))  # fmt: skip
    (args.out / "profile.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
