"""Smoke test of an installed fastunet (a wheel or an sdist), run outside the source tree.

    python scripts/smoke_test.py --cuda-archs "sm_75 ... compute_90"   # a CUDA build
    python scripts/smoke_test.py --no-cuda                              # a CPU-only build

Checks: the import comes from site-packages; info() reports the extension as expected;
max-pool runs through _C on the CPU, equal to PyTorch; UNet forward and backward on the CPU
equal ReferenceUNet's.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> int:
    parser = argparse.ArgumentParser()
    expect = parser.add_mutually_exclusive_group(required=True)
    expect.add_argument("--cuda-archs", help="the archs _C must report, space-separated")
    expect.add_argument("--no-cuda", action="store_true", help="_C must be CPU-only")
    args = parser.parse_args()

    import fastunet
    from fastunet import ReferenceUNet, UNet, ops
    from fastunet.bench.parity import relative_error

    location = Path(fastunet.__file__).resolve()
    assert "site-packages" in location.parts, f"fastunet imported from {location}"
    report = fastunet.info("cpu")
    ext = report["native_extension"]
    assert ext["built"], ext
    if args.no_cuda:
        assert not ext["cuda"] and ext["reason"], ext
    else:
        assert ext["cuda"] and ext["archs"] == args.cuda_archs.split(), ext
    assert report["ops"]["max_pool2d"]["name"] == "_C.cpu", report["ops"]

    x = torch.randn(2, 8, 9, 10, requires_grad=True)
    grad = torch.randn(2, 8, 4, 5)
    (ours,) = torch.autograd.grad(ops.max_pool2d(x), x, grad)
    (theirs,) = torch.autograd.grad(F.max_pool2d(x, 2), x, grad)
    assert torch.equal(ops.max_pool2d(x), F.max_pool2d(x, 2)) and torch.equal(ours, theirs)

    reference = ReferenceUNet(3, 2, 4, 2)
    fast = UNet.from_reference(reference)
    image = torch.randn(2, 3, 16, 20)
    out_ref, out = reference(image), fast(image)
    grad_out = torch.randn_like(out)
    out_ref.backward(grad_out)
    out.backward(grad_out)
    assert relative_error(out, out_ref) <= 1e-5
    for (name, p), p_ref in zip(fast.named_parameters(), reference.parameters(), strict=True):
        assert relative_error(p.grad, p_ref.grad) <= 1e-5, name

    print(f"fastunet {fastunet.__version__} from {location.parent}: smoke test passed")
    print(f"  _C: {'CUDA ' + ' '.join(ext['archs']) if ext['cuda'] else ext['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
