"""Shared fixtures: the host-built kernels, buffer poisoning, the GPU marker.

Tests marked ``gpu`` run only where CuPy sees a CUDA device; elsewhere they are
skipped with the reason CuPy gave. Relative errors measured by the GPU tier are
collected into ``$CUPYDCN_ERROR_LOG`` (JSON lines) for tests/run_gpu_tier.py.
"""

import json
import os

import pytest

from cupydcn import _config, _kernels


def _gpu_skip_reason():
    from cupydcn import _gpu

    return _gpu.no_gpu_reason()


GPU_SKIP_REASON = _gpu_skip_reason()


def pytest_collection_modifyitems(config, items):
    if GPU_SKIP_REASON is None:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def host():
    """The kernels compiled for the CPU (kernels/host_runtime.h) with the checks
    on: threads and blocks in an order drawn from the seed ($CUPYDCN_HOST_SEED,
    default 12). One worker, so that two identical launches add in the same
    order (tests compare them bit for bit); tests/test_host_runtime.py runs
    blocks in parallel. A small grid and an odd block exercise the grid-stride
    loops."""
    seed = int(os.environ.get("CUPYDCN_HOST_SEED") or 12)
    return _kernels.HostBackend(grid=3, block=5, checks=True, workers=1, seed=seed)


@pytest.fixture(scope="session")
def gpu():
    """The CuPy backend; only requested by tests marked gpu."""
    return _kernels.cupy_backend()


@pytest.fixture(autouse=True)
def poison():
    """Every buffer a kernel must fill starts as NaN."""
    previous, _config.poison = _config.poison, True
    yield
    _config.poison = previous


@pytest.fixture
def record_error():
    """record_error(dtype, op, err): log a measured relative error (GPU tier)."""
    path = os.environ.get("CUPYDCN_ERROR_LOG")

    def record(dtype, op, err):
        if path:
            with open(path, "a") as log:
                log.write(json.dumps({"dtype": str(dtype), "op": op, "err": float(err)}) + "\n")

    return record
