"""What a new process pays before fastunet runs at speed: issue 12's start-up targets.

    python benchmarks/startup.py OUT_DIR [--device cuda] [--batch 16] [--size 256]

Two fresh processes share one pair of empty cache directories (TRITON_CACHE_DIR and
FASTUNET_CACHE_DIR), in bf16 autocast with channels_last input on a GPU (the bench's standard
case), fp32 on the CPU:
- "cold": the first training step with both caches empty, which autotunes every conv shape and
  measures each layer's path (target: under 60 s), then a steady training step, then a forward
  (so the caches hold the forward's choices too, as `fastunet tune` leaves them);
- "warm": a new process on the caches the cold one filled: its first forward against a steady
  forward (target: within 2x), and its first training step;
- "reference": ReferenceUNet's first and steady forward in a process of its own, for scale:
  PyTorch's own first call pays for its lazy set-up (cuDNN, oneDNN) too. Then the time of
  Triton's `triton_key()`, which hashes Triton's own library (hundreds of MB) once in every
  process, at its first kernel launch or cache lookup: 0.4-1.1 s on the 2-core CI machine.
Times are wall-clock, synchronised, after the model and input are on the device. The first
step of "cold" and "warm" is also split ("first_step_parts"): seconds in Triton's compiler
(a cache hit too: loading the kernel, and once a process hashing Triton's library; the tiles
that compile in parallel before the autotuner times them count by wall time), in the
autotuner's timing of tiles, in the per-layer choice's timing of both paths, and the rest, each
counted once (a compile inside a timing run counts as compile). Writes OUT_DIR/startup.json and
prints one line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

COLD_STEP_TARGET_S = 60.0
WARM_FORWARD_TARGET_RATIO = 2.0
STEADY_REPEATS = 5
PHASES = ("cold", "warm", "reference")


class Parts:
    """Exclusive seconds and calls of the start-up's parts, counted while `on`: a part's time
    excludes the parts nested in it."""

    KINDS = ("triton_compile", "autotune_timing", "choice_timing")

    def __init__(self):
        self.seconds = dict.fromkeys(self.KINDS, 0.0)
        self.calls = dict.fromkeys(self.KINDS, 0)
        self.on = False
        self.clock = time.perf_counter
        self._nested: list[float] = []

    def wrap(self, kind_of, fn):
        """fn, timed as the part `kind_of(caller's function name)` names (None: not a part)."""

        def timed(*args, **kwargs):
            kind = kind_of(sys._getframe(1).f_code.co_name) if self.on else None
            if kind is None or threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)
            start = self.clock()
            self._nested.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed, nested = self.clock() - start, self._nested.pop()
                self.seconds[kind] += elapsed - nested
                self.calls[kind] += 1
                if self._nested:
                    self._nested[-1] += elapsed

        return timed

    def install(self) -> None:
        """Times Triton's compile (JIT functions take it from triton.compiler when they first
        launch; in the main thread: the autotuned tiles compile in threads, inside
        `TileCompiles.fire`, whose wall time counts as compile) and triton.testing.do_bench as
        the autotuner (fastunet's `_tuning_bench`) and the per-layer choice (`_do_bench_ms`)
        call it."""
        import triton.compiler
        import triton.testing

        from fastunet.kernels import conv2d_relu
        from fastunet.ops import _timing

        compiling = lambda caller: "triton_compile"  # noqa: E731
        triton.compiler.compile = self.wrap(compiling, triton.compiler.compile)
        tiles = conv2d_relu.TileCompiles
        tiles.fire = self.wrap(compiling, tiles.fire)
        callers = {conv2d_relu._tuning_bench.__name__: "autotune_timing",
                   _timing._do_bench_ms.__name__: "choice_timing"}  # fmt: skip
        triton.testing.do_bench = self.wrap(callers.get, triton.testing.do_bench)

    def of(self, total_s: float) -> dict:
        parts = {f"{kind}_s": self.seconds[kind] for kind in self.KINDS}
        parts |= {f"{kind}_calls": self.calls[kind] for kind in self.KINDS}
        parts["other_s"] = total_s - sum(self.seconds.values())
        return parts


def child(phase: str, args: argparse.Namespace) -> dict:
    """Runs in the fresh process: the figures of one phase."""
    import torch
    import torch.nn.functional as F

    from fastunet import ReferenceUNet, UNet

    device = torch.device(args.device)
    autocast = device.type == "cuda"  # bf16 autocast on a GPU; the CPU runs fp32

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    make = ReferenceUNet if phase == "reference" else UNet
    model = make(3, 2, args.base, args.depth).to(device, memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 2, (args.batch, args.size, args.size), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def forward():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            return model(x)

    def train_step():
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            out = model(x)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(out.float(), target).backward()
        optimizer.step()

    def seconds(step) -> float:
        sync()
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    def steady(step) -> float:
        return statistics.median(seconds(step) for _ in range(STEADY_REPEATS))

    parts = Parts()
    if phase != "reference":
        parts.install()

    def first_step(step) -> tuple[float, dict]:
        parts.on = True
        total = seconds(step)
        parts.on = False
        return total, parts.of(total)

    if phase == "cold":
        first, split = first_step(train_step)
        figures = {"first_training_step_s": first, "first_step_parts": split,
                   "steady_training_step_s": steady(train_step)}  # fmt: skip
        figures["first_forward_s"] = seconds(forward)  # its choices go into the caches too
        return figures
    if phase == "warm":
        first, split = first_step(forward)
        figures = {"first_forward_s": first, "first_step_parts": split}
    else:
        figures = {"first_forward_s": seconds(forward)}
    figures["steady_forward_s"] = steady(forward)
    if phase == "warm":
        figures["first_training_step_s"] = seconds(train_step)
    else:  # what any process's first Triton launch pays to key Triton's cache (not run here)
        from triton.runtime.cache import triton_key

        start = time.perf_counter()
        triton_key()
        figures["triton_key_s"] = time.perf_counter() - start
    return figures


def run_phase(phase: str, argv: list[str], caches: Path) -> dict:
    env = dict(os.environ)
    env["TRITON_CACHE_DIR"] = str(caches / "triton")
    env["FASTUNET_CACHE_DIR"] = str(caches / "fastunet")
    command = [sys.executable, __file__, "--phase", phase, *argv]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {phase} process failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - start  # imports and model build included
    return figures


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.phase:
        print(json.dumps(child(args.phase, args)))
        return 0
    if args.out is None:
        raise SystemExit("usage: startup.py OUT_DIR [options]")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "phase")}
    child_argv = [item for k, v in settings.items() for item in (f"--{k}", str(v))]
    with tempfile.TemporaryDirectory(prefix="fastunet-startup-") as caches:
        phases = {phase: run_phase(phase, child_argv, Path(caches)) for phase in PHASES}
    cold, warm, reference = (phases[phase] for phase in PHASES)
    ratio = warm["first_forward_s"] / warm["steady_forward_s"]
    reference_ratio = reference["first_forward_s"] / reference["steady_forward_s"]
    result = {
        "settings": settings,
        **phases,
        "cold_first_step_under_60_s": cold["first_training_step_s"] < COLD_STEP_TARGET_S,
        "warm_first_forward_ratio": ratio,
        "warm_first_forward_within_2x": ratio <= WARM_FORWARD_TARGET_RATIO,
        "reference_first_forward_ratio": reference_ratio,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(result, indent=2))
    print(
        f"cold: first training step {cold['first_training_step_s']:.2f} s "
        f"(target < {COLD_STEP_TARGET_S:.0f} s), steady {cold['steady_training_step_s']:.4f} s"
    )
    for phase in ("cold", "warm"):
        split = phases[phase]["first_step_parts"]
        print(f"{phase} first step: " + ", ".join(
            f"{kind} {split[f'{kind}_s']:.2f} s ({split[f'{kind}_calls']} calls)"
            for kind in Parts.KINDS
        ) + f", other {split['other_s']:.2f} s")  # fmt: skip
    print(f"warm: first forward {warm['first_forward_s']:.4f} s, steady "
          f"{warm['steady_forward_s']:.4f} s: {ratio:.2f}x (target <= "
          f"{WARM_FORWARD_TARGET_RATIO:g}x); first training step "
          f"{warm['first_training_step_s']:.2f} s")  # fmt: skip
    print(f"reference: first forward {reference['first_forward_s']:.4f} s, steady "
          f"{reference['steady_forward_s']:.4f} s: {reference_ratio:.2f}x; Triton's "
          f"triton_key() {reference['triton_key_s']:.2f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
