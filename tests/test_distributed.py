"""UNet under DistributedDataParallel: 2 CPU processes (gloo), one training step each."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fastunet import ReferenceUNet, UNet
from fastunet.ops import _choice

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_step(model, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()


def _worker(rank, port, initial_state, results, cpu_rule):
    if cpu_rule:  # the interpreter off: layers run aten's, in the layout UNet measures faster
        _choice.INTERPRET = False
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        x = torch.randn(2, 3, 12, 12, generator=generator)
        target = torch.randint(0, 2, (2, 12, 12), generator=generator)
        for cls in (ReferenceUNet, UNet):
            model = cls(3, 2, 4, 2)
            model.load_state_dict(initial_state)
            _train_step(DistributedDataParallel(model), x, target)
            results[(cls.__name__, rank)] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("cpu_rule", [False, True], ids=["interpreter", "cpu-rule"])
def test_ddp_training_step_matches_reference(cpu_rule, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path))
    initial_state = ReferenceUNet(3, 2, 4, 2).state_dict()
    with mp.Manager() as manager:
        results = manager.dict()
        args = (_free_port(), initial_state, results, cpu_rule)
        mp.spawn(_worker, args=args, nprocs=WORLD_SIZE)
        results = dict(results)
    for rank in range(WORLD_SIZE):
        expected, got = results[("ReferenceUNet", rank)], results[("UNet", rank)]
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
            assert not torch.equal(value, initial_state[name]), f"{name} was not trained"
    if cpu_rule:  # the layout was measured inside DDP's forward, and saved
        (saved,) = tmp_path.glob("choices-*.jsonl")
        assert "unet-layout|forward+backward" in saved.read_text()
    # DDP keeps the replicas identical.
    for name, value in results[("UNet", 0)].items():
        assert torch.equal(value, results[("UNet", 1)][name])
