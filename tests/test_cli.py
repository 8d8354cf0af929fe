"""The `fastunet` command and fastunet.info()."""

import json
import subprocess
import sys

import pytest
import torch

import fastunet
from fastunet.bench import report
from fastunet.bench.parity import CPU_RULE_NOTE
from fastunet.bench.suite import model_cases
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
    for line, row in zip(lines[2:5], ("reference", "fastunet", "ratio"), strict=True):
        name, *values = line.split()
        assert name == row and len(values) == 3
        assert all(float(value) >= 0 for value in values)
    assert lines[5].startswith("fastunet's layers")  # which path they ran, and why


def test_parity_on_the_cpu_says_it_compares_the_same_aten_calls(monkeypatch, capsys):
    """Under the CPU rule fastunet's layers run the reference's own calls: a ratio of 1 said
    nothing about fastunet's kernels, and the output did not say so."""
    monkeypatch.setattr(_choice, "INTERPRET", False)  # the CPU rule, as outside this suite
    assert main(["parity", "--size", "16", "--depth", "2", "--base-channels", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == CPU_RULE_NOTE


def test_parity_rejects_autocast_in_fp32(capsys):
    """torch.autocast to fp32 warns and turns itself off, while the header said autocast=True."""
    argv = ["parity", "--autocast", "--size", "8", "--depth", "1", "--base-channels", "2"]
    assert main(argv) == 2
    assert "--autocast needs --dtype bf16 or fp16" in capsys.readouterr().err


def test_the_bench_report_says_cpu_parity_compares_the_same_aten_calls():
    meta = {"device_name": "a CPU", "device": "cpu", "date": "today", "fastunet": "0", "torch": "2",
            "triton": None, "cuda": None, "driver": None,
            "ceilings": {"matmul_tflops": None, "reason": "no CUDA"}}  # fmt: skip
    row = {"case": "quick-fp32", "mode": "inference", "time_ms": {"fastunet": 1.0},
           "speedup": {}, "peak_memory_mb": {}, "tflops": None, "notes": {},
           "parity": {"ratio": {"output": 1.0, "grad_params": 1.0}},
           "layers": {"fastunet": 0, "torch": 18, "reasons": {"CPU": 18}, "cpu_rule": True,
                      "layout": "contiguous"}}  # fmt: skip
    assert CPU_RULE_NOTE in report.text_report({"meta": meta, "ops": [], "model": [row]})


def test_tune_on_the_cpu_says_only_the_layout_was_measured(tmp_path, monkeypatch, capsys):
    """On the CPU the layers follow a rule, neither measured nor saved, while tune said "22
    layer shapes ... measured choices are kept in FILE": only the model's layout is measured."""
    monkeypatch.setenv("FASTUNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_choice, "_caches", {})
    monkeypatch.setattr(_choice, "_decided", {})
    monkeypatch.setattr(_choice, "INTERPRET", False)  # the CPU rule, as outside this suite
    monkeypatch.setattr(_choice, "_measure_layouts", lambda run, x, module, training: {
        "contiguous": 2.0, "channels_last": 1.0})  # fmt: skip
    argv = ["tune", "--device", "cpu", "--batch", "1", "--size", "8", "--base-channels", "2",
            "--depth", "1", "--dtype", "fp32"]  # fmt: skip
    assert main(argv) == 0
    *_, layers, layouts = capsys.readouterr().out.splitlines()
    assert layers.endswith("by the CPU rule: PyTorch's own path, neither measured nor saved")
    cache = _choice.cache_file(torch.device("cpu"))
    assert layouts == (
        "2 layout choices for the model's activations (0 contiguous, 2 channels_last): measured, "
        f"and kept in {cache}"
    )
    saved = [json.loads(line) for line in cache.read_text().splitlines()[1:]]  # after the stamp
    assert len(saved) == 2 and all("|unet-layout|" in entry["key"] for entry in saved)


def test_bench_help_names_the_cases_of_both_suites(capsys):
    """The help named only full-suite cases, which a CPU machine (it runs --quick) refuses."""
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse may wrap a name at a hyphen
    for quick in (False, True):
        for case in model_cases(quick):
            assert case.name in help_text


def test_info_on_cuda_without_cuda_says_why(monkeypatch):
    """It raised PyTorch's bare "AssertionError: Torch not compiled with CUDA enabled"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"fastunet.info\('cuda'\): .*(without CUDA|no CUDA)"):
        fastunet.info("cuda")


def test_info_on_meta_names_no_cpu():
    """It named the CPU's model as the meta device's."""
    assert fastunet.info("meta")["device_name"] == "meta device"


@pytest.mark.parametrize(
    "device,message",
    [("foo", "--device 'foo': fastunet runs on 'cpu' or 'cuda'"),
     ("cuda", "--device 'cuda': CUDA is not available here: ")],
)  # fmt: skip
def test_info_device_errors_name_the_option(device, message, monkeypatch, capsys):
    """`--device foo` printed PyTorch's list of device types, naming no option."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["info", "--device", device]) == 2
    assert capsys.readouterr().err.startswith(f"fastunet info: error: {message}")


def test_info_into_a_closed_pipe_is_quiet():
    """`fastunet info --json | head -1` ended with "error: [Errno 32] Broken pipe"."""
    command = [sys.executable, "-m", "fastunet.cli", "info", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader leaves before the first line (importing torch takes long)
    error = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=120) == 1
    assert error == b""


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
