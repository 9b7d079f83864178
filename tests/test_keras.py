"""cupydcn.keras under each Keras backend it supports.

Keras fixes its backend at import (KERAS_BACKEND), so each backend runs the
cases of tests/keras_cases.py in a pytest subprocess of its own, and this file
asserts that run passed (its output is shown on failure). The ``gpu`` test
runs the GPU cases (the torch backend on CUDA) the same way.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "keras_cases.py"


def run_cases(backend, marker):
    for package in ("keras", backend):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    env = dict(os.environ, KERAS_BACKEND=backend)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", marker,
               str(CASES)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            check=False, timeout=600)
    report = f"KERAS_BACKEND={backend} {' '.join(command[1:])}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, report
    if " passed" not in result.stdout:  # every case skipped: say why, as the cases did
        reasons = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
        assert reasons, report
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
def test_keras_layers(backend):
    run_cases(backend, "not gpu")


@pytest.mark.gpu
def test_keras_layers_on_cuda_with_the_torch_backend():
    run_cases("torch", "gpu")
