"""The whole UNet under torch.compile(fullgraph=True), forward and backward."""

import pytest
import torch

from fastunet import ReferenceUNet, UNet
from fastunet.bench.parity import relative_error


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_unet_compiles_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    reference = ReferenceUNet(3, 2, 4, 2, upsample="bilinear")
    eager = UNet.from_reference(reference)
    compiled_model = UNet.from_reference(reference)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 12, 10)
    out_eager, out = eager(x), compiled(x)
    assert relative_error(out, out_eager) <= 1e-5
    grad = torch.randn_like(out)
    out_eager.backward(grad)
    out.backward(grad)
    for (name, p), p_eager in zip(
        compiled_model.named_parameters(), eager.parameters(), strict=True
    ):
        assert relative_error(p.grad, p_eager.grad) <= 1e-5, name
