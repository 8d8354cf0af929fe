"""fastunet's own host time per UNet step on the GPU path, on any machine, no GPU needed:

    python benchmarks/host_overhead.py [--base 8] [--depth 4] [--size 64] [--repeats 20]

At batch 1 a GPU step can take less time than the host needs to launch it, so the Python that
runs per op call (the per-layer choice, the op layer, the launchers, Triton's autotuner) counts.
Here all of it runs as on a GPU, every layer on fastunet's kernels, on CPU tensors; only
Triton's JITFunction.run (its argument binder and the launch) is stubbed out, the autotuner
"times" every tile alike, and the max-pools run `_C`'s CPU twin (real work, small at these
sizes). Prints the median milliseconds of a no_grad forward and of a training step (forward,
backward to the weights) as JSON. On a GPU, benchmarks/profile_model.py measures the real host
time per op call.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter has no autotuner
os.environ["FASTUNET_BACKEND"] = "fastunet"

import torch
from triton.runtime.jit import JITFunction

from fastunet import UNet
from fastunet.kernels import conv2d_relu as conv_kernels
from fastunet.ops import _backend


def stub_the_gpu() -> None:
    """Launches do nothing, tuning picks the first tile, and the Triton ops serve CPU tensors."""
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    for kernel in (conv_kernels._conv2d_kernel, conv_kernels._conv2d_grad_weight_kernel):
        kernel.do_bench = lambda call, quantiles=None: (call(), [1.0, 1.0, 1.0])[1]
        kernel.cache_results = False  # Triton's disk cache is keyed by a GPU target
    _backend._choose_triton = lambda device, dtype: _backend.Backend("triton", "stubbed")


def median_ms(step, repeats: int) -> float:
    for _ in range(3):  # the first calls tune and choose
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    stub_the_gpu()
    torch.manual_seed(0)
    model = UNet(3, 2, base_channels=args.base, depth=args.depth)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad():
            model(x)

    def training_step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    result = {
        "model": vars(args) | {"batch": 1},
        "torch": torch.__version__,
        "forward_ms": median_ms(forward, args.repeats),
        "training_step_ms": median_ms(training_step, args.repeats),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
