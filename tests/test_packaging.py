"""The installed package (not only the checkout) finds its kernels."""

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from cupydcn import _kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (test extras)")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True)
    (path,) = out.glob("cupydcn-*.whl")
    return path


def test_wheel_carries_every_kernel_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"cupydcn/kernels/{f}.cu" for f in _kernels.KERNELS}
    expected |= {"cupydcn/kernels/common.cuh", "cupydcn/kernels/host_shim.h"}
    assert expected <= names, expected - names


def test_installed_package_loads_its_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    script = (
        "import cupydcn, pathlib; from cupydcn import _kernels;"
        "folder = _kernels.kernel_dir();"
        "assert pathlib.Path(cupydcn.__file__).parent / 'kernels' == folder, folder;"
        "print(sum(len(_kernels.source(f)) for f in _kernels.KERNELS))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 1000


def test_import_needs_no_gpu_and_no_framework():
    script = ("import sys, cupydcn; bad = [m for m in ('cupy', 'torch', 'tensorflow', 'keras', 'jax',"
              " 'onnx', 'onnxruntime')"
              " if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
