"""The test harness itself: the CPU tier refuses, in one clear line, a Triton whose interpreter
is broken by the installed numpy."""

import os
import subprocess
import sys

import pytest
from helpers import interpreter_problem

from fastunet.kernels import INTERPRET, interprets


@pytest.mark.parametrize(
    "interpret,triton,numpy,refused",
    [
        (True, "3.6.0", "2.4.0", True),
        (True, "3.7.1", "2.5.2", True),
        (True, "3.6.0", "2.3.5", False),
        (True, "3.8.0", "2.4.0", False),
        (True, "3.9.0+git1a2b3c", "2.4.6", False),
        (False, "3.6.0", "2.4.0", False),  # a GPU runs compiled kernels, not the interpreter
        (True, None, "2.4.0", False),  # no triton: the composite serves every op
    ],
)
def test_interpreter_problem(interpret, triton, numpy, refused):
    problem = interpreter_problem(interpret, triton, numpy)
    assert (problem is not None) == refused
    if refused:
        assert f"Triton {triton}" in problem and f"numpy {numpy}" in problem
        assert 'pip install "numpy<2.4"' in problem and 'pip install "triton>=3.8"' in problem


@pytest.mark.skipif(not INTERPRET, reason="the check guards the interpreter only")
def test_pytest_stops_with_one_usage_error(tmp_path):
    """With Triton 3.6 (monkeypatched in by a plugin) and this numpy made 2.4, pytest exits at
    configuration with a usage error that names both versions and the fix."""
    (tmp_path / "fake_versions.py").write_text(
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda name: {'triton': '3.6.0', 'numpy': '2.4.0'}.get(name) or real(name)\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "fake_versions", "-p", "no:cacheprovider",
         "--collect-only", "-q", __file__],
        capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "Triton 3.6.0's interpreter" in run.stderr and "numpy 2.4.0" in run.stderr


@pytest.mark.parametrize(
    "value", ["1", "true", "on", "yes", "y", "TRUE", "Yes", "0", "no", "2", " 1"]
)
def test_interpreter_variable_is_read_as_triton_reads_it(monkeypatch, value):
    """Else the kernels would run interpreted while the op layer thinks them compiled."""
    from triton._C.libtriton import getenv_bool

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interprets(value) == getenv_bool("TRITON_INTERPRET", False)
