"""The `fastunet` command and fastunet.info()."""

import json

import pytest

import fastunet
from fastunet.cli import main


def test_info_reports_every_op_with_a_reason():
    report = fastunet.info("cpu")
    assert report["fastunet"] == fastunet.__version__
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


def test_parity_command_reports_small_errors(capsys):
    assert main(["parity", "--size", "16", "--depth", "2", "--base-channels", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fastunet"]["output"] <= 1e-5
    assert result["fastunet"]["grad_params"] <= 1e-5


@pytest.mark.parametrize("argv", [["parity", "--size", "0"], ["parity", "--dtype", "fp8"], []])
def test_bad_arguments_exit_non_zero(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
