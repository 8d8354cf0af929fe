"""The `fastunet` command: `fastunet info`, `parity`, `bench` and `tune`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from fastunet.ops._choice import LAYOUTS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _info(args: argparse.Namespace) -> int:
    from fastunet.info import format_info, info

    report = info(args.device and str(_device(args.device)))
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def _parity(args: argparse.Namespace) -> int:
    from fastunet.bench.parity import CPU_RULE_NOTE, compare

    if args.autocast and args.dtype == "fp32":  # torch.autocast would warn and turn itself off
        raise ValueError("--autocast needs --dtype bf16 or fp16, the dtype autocast runs in")
    device = _device(args.device)
    _check_size((args.size,), args.depth)
    result = compare(
        batch=args.batch, size=args.size, base_channels=args.base_channels, depth=args.depth,
        upsample=args.upsample, dtype=DTYPES[args.dtype], autocast=args.autocast, device=device,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("relative error against ReferenceUNet in float64, " + ", ".join(
        f"{k}={v}" for k, v in result["case"].items()
    ))  # fmt: skip
    print(f"{'':12} {'output':>10} {'grad_input':>10} {'grad_params':>11}")
    for row in ("reference", "fastunet", "ratio"):
        values = result[row]
        print(
            f"{row:12} {values['output']:10.2e} {values['grad_input']:10.2e} "
            f"{values['grad_params']:11.2e}"
        )
    layers = result["layers"]
    if layers["cpu_rule"]:
        print(CPU_RULE_NOTE)
    else:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in layers["reasons"].items())
        print(f"fastunet's layers: {layers['fastunet']} fastunet, {layers['torch']} torch "
              f"({reasons})")  # fmt: skip
    return 0


def _tune(args: argparse.Namespace) -> int:
    from fastunet import UNet
    from fastunet.ops import _choice

    device = _device(args.device)
    height, width = args.size
    _check_size(args.size, args.depth)
    dtype = DTYPES[args.dtype]
    # The weights' layout is part of each layer's key: tune the one the model will run with.
    weights = args.weights or ("channels_last" if device.type == "cuda" else "contiguous")
    model = UNet(args.in_channels, args.num_classes, args.base_channels, args.depth, args.upsample,
                 args.align_corners).to(device, memory_format=LAYOUTS[weights])  # fmt: skip
    x = torch.randn(args.batch, args.in_channels, height, width, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    with _choice.recording() as calls:
        with torch.no_grad(), torch.autocast(**autocast):
            model(x)
        with torch.autocast(**autocast):
            out = model(x.requires_grad_(args.input_grad))
        out.float().sum().backward()
    table = {key: choice for key, choice in calls}
    cache = _choice.cache_file(device)
    if _choice.cache_for(device).save_failed:
        raise OSError(f"the choices were made but could not be saved in {cache} (see the warning)")
    if args.json:
        print(json.dumps({key: vars(choice) for key, choice in table.items()}, indent=2))
        return 0
    for key, choice in table.items():
        print(f"{choice.path:8}  {key}\n          {choice.reason}")
    counts = _choice.summarize(list(table.items()))
    layers = (f"{counts['fastunet'] + counts['torch']} layer shapes: {counts['fastunet']} "
              f"fastunet, {counts['torch']} torch")  # fmt: skip
    if not _choice.runs_pytorch_by_rule(x):
        print(f"\n{layers}; measured choices are kept in {cache}")
        return 0
    # The CPU rule times no layer: only the activations' layout, for the whole model.
    layouts = [choice.path for choice in table.values() if choice.path in LAYOUTS]
    taken = ", ".join(f"{layouts.count(layout)} {layout}" for layout in LAYOUTS)
    print(f"\n{layers}, by the CPU rule: PyTorch's own path, neither measured nor saved")
    print(f"{len(layouts)} layout choices for the model's activations ({taken}): measured, and "
          f"kept in {cache}")  # fmt: skip
    return 0


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal; one line a step elsewhere."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        self.done = min(self.done + 1, self.total)
        filled = 30 * self.done // self.total
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {message}"
        if self.tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _device(name: str | None) -> torch.device:
    from fastunet.info import cuda_missing

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # PyTorch's message lists its device types, and names no option
        raise ValueError(f"--device {name!r}: fastunet runs on 'cpu' or 'cuda'") from None
    if device.type == "cuda" and (why := cuda_missing()):
        raise ValueError(f"--device {name!r}: CUDA is not available here: {why}")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {name!r}: fastunet runs on 'cpu' or 'cuda'")
    return device


def _check_size(sides: tuple[int, ...], depth: int) -> None:
    """Before the model is built: a deep model is large (base_channels * 2**depth channels)."""
    if min(sides) < 2**depth:
        given = "x".join(map(str, sides))
        raise ValueError(f"--size must be >= 2**depth = {2**depth} on each side, got {given}")


def _check_writable(option: str, path: str | None) -> None:
    """A file the run will write: its folder must exist, and it must not be a folder, so a
    mistake fails before minutes of timing rather than after."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path}: the folder {folder} is not writable")


def _bench(args: argparse.Namespace) -> int:
    from fastunet.bench import report, suite
    from fastunet.ops._common import write_atomically

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'fastunet[plot]'") from None
    if args.only == "ops" and args.case:
        raise ValueError("--case names model cases, which --only ops leaves out")
    for option, path in (("--output", args.output), ("--markdown", args.markdown),
                         ("--plot", args.plot)):  # fmt: skip
        _check_writable(option, path)
    device = _device(args.device)
    if device.type == "cpu" and not args.quick:
        print("fastunet bench: no CUDA device, so the --quick suite (the full one needs a GPU)",
              file=sys.stderr)  # fmt: skip
        args.quick = True
    cases = [] if args.only == "ops" else suite.model_cases(args.quick, args.compile, args.case)
    include_ops = args.only != "model" and not args.case
    progress = ProgressBar(
        suite.step_count(args.quick, cases, include_ops, device), enabled=not args.no_progress
    )

    def checkpoint(result: dict) -> None:  # a run cut short still leaves what it measured
        write_atomically(Path(args.output), json.dumps(result, indent=2))

    try:
        result = suite.run(
            device, args.quick, cases, include_ops, progress, checkpoint, args.model_seconds * 1e3
        )
    finally:
        progress.close()
    if args.markdown:
        write_atomically(Path(args.markdown), report.markdown_report(result))
    if args.plot:
        report.plot(result, args.plot)
    print(report.text_report(result))
    print(f"\nwrote {args.output}" + "".join(f", {p}" for p in (args.markdown, args.plot) if p))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _image_size(text: str) -> tuple[int, int]:
    """(height, width) from "256" (square) or "256x320" (height x width)."""
    sides = [_positive_int(side) for side in text.split("x")]
    if len(sides) > 2:
        raise argparse.ArgumentTypeError(f"must be N or HxW, got {text}")
    return sides[0], sides[-1]


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from fastunet.bench.suite import COMPILE_CHOICES, MODEL_REP_MS, model_cases

    parser = argparse.ArgumentParser(prog="fastunet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, device and each op's backend")
    info.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)

    parity = commands.add_parser(
        "parity", help="UNet vs ReferenceUNet, forward and backward, against float64"
    )
    parity.add_argument("--device", default=None)
    parity.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parity.add_argument("--autocast", action="store_true", help="fp32 weights under autocast")
    parity.add_argument("--batch", type=_positive_int, default=2)
    parity.add_argument("--size", type=_positive_int, default=64)
    parity.add_argument("--base-channels", type=_positive_int, default=8)
    parity.add_argument("--depth", type=_positive_int, default=3)
    parity.add_argument("--upsample", choices=["nearest", "bilinear"], default="nearest")
    parity.add_argument("--json", action="store_true")
    parity.set_defaults(run=_parity)

    bench = commands.add_parser(
        "bench", help="speed, memory and parity against the reference module (the main job)"
    )
    bench.add_argument("--quick", action="store_true", help="small sizes; for a CPU-only machine")
    bench.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if any)")
    bench.add_argument("--only", choices=["ops", "model"], default=None, help="one part only")
    bench.add_argument(
        "--compile", choices=COMPILE_CHOICES, default="standard",
        help="which model cases also time torch.compile(mode='max-autotune') of the reference "
        "(minutes of compile each): the standard case (default), all, or none",
    )  # fmt: skip
    full, quick = (", ".join(case.name for case in model_cases(q, "none")) for q in (False, True))
    bench.add_argument(
        "--case", action="append", default=None,
        help=f"time only this model case (repeatable; no op rows): {full}; with --quick, and "
        f"on the CPU (which runs --quick): {quick}",
    )  # fmt: skip
    bench.add_argument(
        "--model-seconds", type=_positive_float, default=MODEL_REP_MS / 1e3,
        help="about how long each model candidate is timed per row (default %(default)s; on a "
        "noisy CPU, more gives steadier medians)",
    )  # fmt: skip
    bench.add_argument("--output", default="fastunet-bench.json", help="the JSON result")
    bench.add_argument("--markdown", default=None, help="also write the tables as markdown")
    bench.add_argument("--plot", default=None, help="also draw a PNG of the speedups")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    tune = commands.add_parser(
        "tune", help="choose (by measuring) and cache each layer's path for a UNet's shapes"
    )
    tune.add_argument("--device", default=None)
    tune.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                      help="bf16 and fp16 run under autocast with fp32 weights")  # fmt: skip
    tune.add_argument("--batch", type=_positive_int, default=16)
    tune.add_argument("--size", type=_image_size, default=(256, 256),
                      help="the input's size: N (square) or HxW, e.g. 256 or 256x320")  # fmt: skip
    tune.add_argument("--in-channels", type=_positive_int, default=3)
    tune.add_argument("--num-classes", type=_positive_int, default=2)
    tune.add_argument("--base-channels", type=_positive_int, default=64)
    tune.add_argument("--depth", type=_positive_int, default=4)
    tune.add_argument("--upsample", choices=["nearest", "bilinear"], default="nearest")
    tune.add_argument("--align-corners", action="store_true",
                      help="the model's align_corners=True, part of the keys")  # fmt: skip
    tune.add_argument("--input-grad", action="store_true",
                      help="the training step also needs the input's gradient")  # fmt: skip
    tune.add_argument("--weights", choices=sorted(LAYOUTS), default=None,
                      help="the weights' layout, part of each layer's key (default: channels_last "
                           "on a GPU, as README advises, contiguous on the CPU)")  # fmt: skip
    tune.add_argument("--json", action="store_true")
    tune.set_defaults(run=_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a reader that left (`| head`) shows here, not at exit
        return code
    except BrokenPipeError:
        # Quiet, as Unix tools are; stdout goes to devnull, so that Python's own flush at exit
        # does not fail again (Python's docs, signal: "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        print(f"fastunet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
