"""The whole UNet under torch.compile(fullgraph=True), forward and backward."""

import pytest
import torch
from helpers import KERNEL_DEVICE

from fastunet import ReferenceUNet, UNet
from fastunet.bench.parity import relative_error


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_unet_compiles_fullgraph_forward_and_backward(compiler, kernels_backend):
    torch._dynamo.reset()
    reference = ReferenceUNet(3, 2, 4, 2, upsample="bilinear").to(KERNEL_DEVICE)
    eager = UNet.from_reference(reference)
    compiled_model = UNet.from_reference(reference)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    x = torch.randn(2, 3, 12, 10, device=KERNEL_DEVICE)
    out_eager, out = eager(x), compiled(x)
    assert relative_error(out, out_eager) <= 1e-5
    grad = torch.randn_like(out)
    out_eager.backward(grad)
    out.backward(grad)
    for (name, p), p_eager in zip(
        compiled_model.named_parameters(), eager.parameters(), strict=True
    ):
        assert relative_error(p.grad, p_eager.grad) <= 1e-5, name
