"""Is there a CUDA GPU? One answer, in one wording, for ``cupydcn check``,
``cupydcn bench`` and the test suite's skip reasons."""

from __future__ import annotations


def no_gpu_reason():
    """None when CuPy sees a CUDA GPU, else one line saying there is none,
    with CuPy's own words as the detail: "no CUDA GPU found (CuPy:
    cudaErrorInsufficientDriver: ...)" (on a machine without a GPU CuPy
    reports a missing or old driver)."""
    try:
        import cupy
    except ImportError as error:
        return f"no CUDA GPU found (CuPy is not installed: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, no device: CuPy says which
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"no CUDA GPU found (CuPy: {detail})"
    if count == 0:
        return "no CUDA GPU found (CuPy: 0 CUDA devices)"
    return None
