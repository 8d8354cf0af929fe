"""Run the conv launchers' autotuned launches without a GPU and report, as JSON lines, what each
launch ran: through Triton's autotuner (which times every tile it keeps), or the tile it picked
launched directly (`fastunet.kernels.conv2d_relu._launch`).

No kernel runs: JITFunction.run only notes the call it was given (each argument, the grid it
evaluates to, warmup, every keyword), and a tile's "time" is a fixed function of its sizes, so
the autotuner's pick is known. Run it without
TRITON_INTERPRET (tests/test_conv2d_relu.py does): the interpreter has no autotuner.
"""

import json
import os
import sys
import threading
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from fastunet.kernels import conv2d_relu as kernels

TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
runs: list[dict] = []
slow_runs = threading.Event()  # each run sleeps, as a launch that releases the GIL
autotuner_calls = 0
_autotuner_run = Autotuner.run


def _describe(value):
    if isinstance(value, torch.Tensor):
        return [str(value.dtype), list(value.shape), list(value.stride())]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def _note_run(self, *args, grid, warmup, **kwargs):
    runs.append({
        "kernel": self.__name__,
        "tile": [kwargs.get(name) for name in TILE],
        "args": [_describe(a) for a in args],
        "grid": list(grid(kwargs) if callable(grid) else grid),
        "warmup": warmup,
        "kwargs": {name: _describe(value) for name, value in sorted(kwargs.items())},
    })  # fmt: skip
    if slow_runs.is_set():
        time.sleep(0.01)


def _count_autotuner_run(self, *args, **kwargs):
    global autotuner_calls
    autotuner_calls += 1
    return _autotuner_run(self, *args, **kwargs)


def _fake_time(kernel_call, quantiles=None):
    """A tile's time: larger BLOCK_N, then BLOCK_M, then fewer stages win."""
    kernel_call()
    block_m, block_n, _, _, stages = runs[-1]["tile"]
    ms = 1.0 / block_n + 0.01 / block_m + 1e-4 * stages
    return [ms, ms, ms]


def launch(name: str, fn) -> None:
    """One launch: what it ran, printed as a JSON line."""
    global autotuner_calls
    runs.clear()
    autotuner_calls = 0
    fn()
    print(json.dumps({"launch": name, "autotuner_calls": autotuner_calls, "runs": runs}))


def first_launches_in_two_threads(x) -> None:
    """Two threads make the first launch of two keys at once, after Triton has picked both
    tiles (as in a new process whose tunings Triton's disk cache holds): each key must keep its
    own pick, though the autotuner reports its pick in one attribute."""
    picks = {}
    for c_out in (256, 16):
        weight = torch.zeros(c_out, x.shape[1], 3, 3, dtype=x.dtype)
        picks[c_out] = lambda weight=weight: kernels.forward(x, weight, None, 1, True)

    def tiles() -> dict:
        found = {}
        for c_out, launch in picks.items():
            runs.clear()
            launch()
            found[c_out] = runs[-1]["tile"]
        return found

    alone = tiles()
    kernels._picked.clear()
    slow_runs.set()
    barrier = threading.Barrier(len(picks))

    def first(launch):
        barrier.wait()
        launch()

    threads = [threading.Thread(target=first, args=(launch,)) for launch in picks.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    slow_runs.clear()
    print(json.dumps({"alone": alone, "after_threads": tiles()}))


def main() -> int:
    JITFunction.run, Autotuner.run = _note_run, _count_autotuner_run
    for kernel in (kernels._conv2d_kernel, kernels._conv2d_grad_weight_kernel):
        kernel.do_bench = _fake_time
        kernel.cache_results = False  # Triton's disk cache is keyed by a GPU target
    cl = torch.channels_last
    x16 = torch.zeros(2, 64, 16, 16, dtype=torch.float16).contiguous(memory_format=cl)
    w16 = torch.zeros(64, 64, 3, 3, dtype=torch.float16)
    x32, w32 = x16.float().contiguous(memory_format=cl), w16.float()
    for attempt in ("first", "again"):
        launch(f"forward fp16 {attempt}", lambda: kernels.forward(x16, w16, None, 1, True))
    launch("forward fp16 with bias", lambda: kernels.forward(x16, w16, w16[0, 0, 0], 1, True))
    launch("forward fp32", lambda: kernels.forward(x32, w32, None, 1, True))
    launch("forward fp16, other width", lambda: kernels.forward(x16[..., :15], w16, None, 1, True))
    for attempt in ("first", "again"):
        launch(f"grad_weight fp16 {attempt}", lambda: kernels.grad_weight(x16, x16, 3, 3, 1))
    conv = kernels._conv2d_kernel
    configs = conv.configs
    conv.configs = configs[-1:]  # a test forcing one tile
    launch("forward fp16, one tile", lambda: kernels.forward(x16, w16, None, 1, True))
    conv.configs = list(configs)  # another list: picked again
    launch("forward fp16, new list", lambda: kernels.forward(x16, w16, None, 1, True))
    print(json.dumps({"last_tile": [configs[-1].all_kwargs().get(name) for name in TILE]}))
    first_launches_in_two_threads(x16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
