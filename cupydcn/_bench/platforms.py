"""Where the arrays live (the GPU, or the CPU with a fake clock), which
comparison libraries are usable there, and the TF32 switch.

:class:`GpuPlatform`: CuPy arrays on the current CUDA device, torch tensors on
``cuda``, timed by :class:`~cupydcn._bench.clock.CudaClock`.
:class:`CpuPlatform`: NumPy arrays (cupydcn's CPU backend) and torch CPU
tensors, timed by an injected clock: the CPU test tier's way through the
whole pipeline, ``main(argv, platform=CpuPlatform(FakeClock()))``.

TF32 (``--tf32``): cupydcn's float32 GEMMs call cuBLAS themselves and use
TF32 only after :func:`cupydcn.set_tf32` (never from ``CUPY_TF32``); the bench
sets it, and CuPy's own per-dtype setting
``cupy._core._routines_linalg.set_compute_type(numpy.float32, COMPUTE_TYPE_TF32)``
(CuPy 13/14; effective for the next matmul, compute capability 8.0 and up).
The environment variable ``CUPY_TF32=1`` only seeds that setting, at the first
float32 matmul of the process, so the bench sets it directly, both ways. torch:
``torch.backends.cuda.matmul.fp32_precision`` and
``torch.backends.cudnn.conv.fp32_precision`` ("tf32" or "ieee"), or the older
``allow_tf32`` flags where torch predates those. Without ``--tf32`` every
library computes float32 in IEEE float32 (torch's cuDNN default, TF32, is
turned off too).
"""

from __future__ import annotations

import contextlib
import gc
import platform as _platform
from typing import NamedTuple

import numpy

from cupydcn import _config

from cupydcn._bench.clock import CudaClock


class GpuPlatform:
    """CuPy arrays on the current CUDA device, torch tensors on ``cuda``."""

    name = "GPU"
    torch_device = "cuda"
    on_gpu = True

    def __init__(self, cupy):
        self.cupy = cupy
        self.xp = cupy
        self.clock = None    # made once torch is known: CudaClock(torch)
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.props = props
        self.l2_bytes = int(props.get("l2CacheSize", 0) or 0)

    def make_clock(self, torch):
        if self.clock is None:
            self.clock = CudaClock(torch)
        return self.clock

    def to_device(self, host):
        return self.cupy.asarray(host)

    def free_memory(self):
        gc.collect()
        self.cupy.get_default_memory_pool().free_all_blocks()

    def torch_usable(self, torch):
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA device (a CPU build?)"
        return None

    def set_tf32(self, enabled):
        """Set CuPy's float32 GEMM compute type; return (previous, effective name)."""
        from cupy._core import _routines_linalg as linalg

        previous = linalg.get_compute_type(numpy.float32)
        wanted = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(numpy.float32, wanted)
        effective = linalg.get_compute_type(numpy.float32)
        previous_cupydcn = _config.set_tf32(bool(enabled))
        return (previous, previous_cupydcn), (
            f"{linalg.compute_type_to_str(effective)} (cupydcn's own GEMMs: "
            f"{'TF32' if _config.get_tf32() else 'IEEE float32'})")

    def restore_tf32(self, previous):
        from cupy._core import _routines_linalg as linalg

        linalg.set_compute_type(numpy.float32, previous[0])
        _config.set_tf32(previous[1])

    def device_info(self):
        cupy, props = self.cupy, self.props
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        driver = cupy.cuda.runtime.driverGetVersion()
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        try:
            nvrtc = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
        except Exception:  # NVRTC missing: reported, not fatal here
            nvrtc = None
        return {
            "device": f"{name} (sm_{props['major']}{props['minor']})",
            "gpu": name,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "gpu_memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "l2_cache_mib": round(self.l2_bytes / 2**20, 1),
            "sm_count": props.get("multiProcessorCount"),
            "driver": f"{driver // 1000}.{driver % 1000 // 10}",
            "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
            "nvrtc": nvrtc,
            "cupy": cupy.__version__,
        }


class CpuPlatform:
    """NumPy arrays and torch CPU tensors, timed by an injected clock: the CPU
    test tier's way through the whole pipeline (cupydcn runs on its CPU
    backend: the host-built kernels or the NumPy reference)."""

    name = "CPU"
    torch_device = "cpu"
    on_gpu = False
    xp = numpy
    l2_bytes = 0

    def __init__(self, clock):
        self.clock = clock

    def make_clock(self, torch):
        return self.clock

    def to_device(self, host):
        return numpy.array(host)

    def free_memory(self):
        gc.collect()

    def torch_usable(self, torch):
        return None

    def set_tf32(self, enabled):
        return None, "n/a (CPU)"

    def restore_tf32(self, previous):
        pass

    def device_info(self):
        try:
            import cupy
            cupy_version = cupy.__version__
        except ImportError:
            cupy_version = None
        return {"device": f"CPU ({_platform.machine()}), NumPy arrays: not a GPU timing",
                "gpu": None, "compute_capability": None, "gpu_memory_gib": None,
                "l2_cache_mib": None, "sm_count": None, "driver": None, "cuda_runtime": None,
                "nvrtc": None, "cupy": cupy_version}


def detect_gpu():
    """(GpuPlatform, None), or (None, one line saying why there is none)."""
    try:
        import cupy
    except ImportError as error:
        return None, f"CuPy is not installed ({error}); the benchmarks need a CUDA GPU"
    from cupydcn import _gpu

    why = _gpu.no_gpu_reason()
    if why is not None:
        return None, f"{why}; the benchmarks need one"
    return GpuPlatform(cupy), None


class Baselines(NamedTuple):
    torch: object          # the module or None
    ops: object            # torchvision.ops or None
    notes: tuple           # why a baseline is missing, for the table
    versions: dict


def load_baselines(platform, wanted=True):
    """torch and torchvision.ops where installed and usable on ``platform``."""
    versions = {"torch": None, "torch_cuda": None, "cudnn": None, "torchvision": None}
    if not wanted:
        return Baselines(None, None, ("torch not used (--no-torch)",), versions)
    try:
        import torch
    except ImportError:
        return Baselines(None, None, ("torch not installed: cupydcn is timed alone",), versions)
    versions["torch"] = torch.__version__
    why = platform.torch_usable(torch)
    if why:
        return Baselines(None, None, (f"{why}: cupydcn is timed alone",), versions)
    versions["torch_cuda"] = torch.version.cuda
    try:
        versions["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        versions["cudnn"] = None
    try:
        import torchvision
        import torchvision.ops as ops
    except ImportError:
        return Baselines(torch, None, ("torchvision not installed: no deform_conv2d or "
                                       "roi_align column",), versions)
    except Exception as error:  # a torchvision built for another torch fails this way
        first = (str(error).strip().splitlines() or [""])[0]
        return Baselines(torch, None, (f"torchvision unusable ({type(error).__name__}: "
                                       f"{first}): no torchvision column",), versions)
    versions["torchvision"] = getattr(torchvision, "__version__", "unknown")
    return Baselines(torch, ops, (), versions)


@contextlib.contextmanager
def tf32_mode(platform, torch, enabled):
    """Apply the TF32 choice to CuPy and torch alike; yield what was set."""
    previous, cupy_mode = platform.set_tf32(enabled)
    state = {"enabled": bool(enabled), "cupy_float32_compute_type": cupy_mode}
    restore = []
    if torch is not None:
        mode = "tf32" if enabled else "ieee"
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
            saved = (matmul.fp32_precision, cudnn.conv.fp32_precision)
            matmul.fp32_precision = mode
            cudnn.conv.fp32_precision = mode
            restore.append(lambda: (setattr(matmul, "fp32_precision", saved[0]),
                                    setattr(cudnn.conv, "fp32_precision", saved[1])))
            state["torch"] = f"matmul.fp32_precision={mode}, cudnn.conv.fp32_precision={mode}"
        else:
            saved = (matmul.allow_tf32, cudnn.allow_tf32)
            matmul.allow_tf32 = cudnn.allow_tf32 = bool(enabled)
            restore.append(lambda: (setattr(matmul, "allow_tf32", saved[0]),
                                    setattr(cudnn, "allow_tf32", saved[1])))
            state["torch"] = f"matmul.allow_tf32={bool(enabled)}, cudnn.allow_tf32={bool(enabled)}"
        # the floor is cuDNN's best algorithm for the shape, found during the warm-up
        saved_benchmark = cudnn.benchmark
        cudnn.benchmark = True
        restore.append(lambda: setattr(cudnn, "benchmark", saved_benchmark))
    try:
        yield state
    finally:
        for undo in reversed(restore):
            undo()
        platform.restore_tf32(previous)
