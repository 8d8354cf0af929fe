"""The `fastunet` command: `fastunet info`, `fastunet parity`."""

from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _info(args: argparse.Namespace) -> int:
    from fastunet.info import format_info, info

    report = info(args.device)
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def _parity(args: argparse.Namespace) -> int:
    from fastunet.bench.parity import compare

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"fastunet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
