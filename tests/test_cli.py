"""The `fastunet` command and fastunet.info()."""

import json

import pytest
import torch

import fastunet
from fastunet.cli import main
from fastunet.ops import _choice


def test_info_reports_every_op_with_a_reason():
    report = fastunet.info("cpu")
    assert report["fastunet"] == fastunet.__version__
    assert report["device_name"].endswith(("cores", "bf16"))  # a CPU: its model, cores, bf16 units
    assert set(report["ops"]) == {
        "conv2d_relu", "upsample_concat", "max_pool2d", "upsample_concat_conv2d_relu"
    }  # fmt: skip
    for backend in report["ops"].values():
        assert backend["name"] and backend["reason"]


def test_info_command(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    assert "conv2d_relu" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["torch"]


def test_info_counts_the_cached_choices_by_path(tmp_path, monkeypatch, capsys):
    """README: `fastunet info` says how many layers took each path; it gave one number, the
    layouts' choices counted in."""
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_choice, "_caches", {})
    cache = _choice.cache_for(torch.device("cpu"))
    # Keys as `_choice` writes them name the op, or "<model>-layout", second.
    taken = {"cpu|conv2d_relu|1": "fastunet", "cpu|conv2d_relu|2": "torch",
             "cpu|max_pool2d|1": "torch", "cpu|unet-layout|1": "channels_last"}  # fmt: skip
    for key, path in taken.items():
        cache.put(key, _choice.Choice(path, "measured"))
    monkeypatch.setattr(_choice, "_caches", {})  # read from the file, as a new process
    assert main(["info", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layer_choice"]["cached"] == {
        "layers": {"fastunet": 1, "torch": 2}, "layouts": {"contiguous": 0, "channels_last": 1}
    }  # fmt: skip
    assert main(["info", "--device", "cpu"]) == 0
    counts = "(layers: 1 fastunet, 2 torch; layouts: 0 contiguous, 1 channels_last)"
    assert counts in capsys.readouterr().out


def test_parity_command_reports_small_errors(capsys):
    assert main(["parity", "--size", "16", "--depth", "2", "--base-channels", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fastunet"]["output"] <= 1e-5
    assert result["fastunet"]["grad_params"] <= 1e-5


def test_parity_command_prints_a_table(capsys):
    assert main(["parity", "--size", "16", "--depth", "2", "--base-channels", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("relative error against ReferenceUNet in float64, ")
    assert lines[1].split() == ["output", "grad_input", "grad_params"]
    for line, row in zip(lines[2:], ("reference", "fastunet", "ratio"), strict=True):
        name, *values = line.split()
        assert name == row and len(values) == 3
        assert all(float(value) >= 0 for value in values)


@pytest.mark.parametrize(
    "argv",
    [
        ["parity", "--size", "0"],
        ["parity", "--dtype", "fp8"],
        ["tune", "--size", "16x"],
        ["tune", "--size", "16x12x8"],
        [],
    ],
)
def test_bad_arguments_exit_non_zero(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
