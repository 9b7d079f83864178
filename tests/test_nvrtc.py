"""Every kernel instantiation compiles with NVRTC, the compiler CuPy uses.

NVRTC needs no driver and no GPU: the ``nvidia-cuda-nvrtc-cu12`` (CUDA 12,
which still targets sm_70) and ``nvidia-cuda-nvrtc`` (CUDA 13) wheels from the
test extras are loaded through ctypes. Each kernel file is compiled, with every
dtype and index width as name expressions and the loader's own options, to a
cubin for each architecture; any error or warning fails, and so does a
register spill (ptxas's report, ``--ptxas-options=-v``, for every kernel
entry: 0 bytes of spill stores and loads).
"""

import ctypes
import glob
import os
import re

import pytest

from cupydcn import _kernels

ARCHS = {12: ("sm_70", "sm_80", "sm_90"), 13: ("sm_80", "sm_90")}
# NVRTC 12 warns that targets before sm_75 are deprecated; that is expected.
EXPECTED_WARNINGS = ("Architectures prior to",)


def _find_nvrtc(major):
    import nvidia  # namespace package of the NVIDIA wheels

    for root in nvidia.__path__:
        hits = sorted(glob.glob(os.path.join(root, "**", f"libnvrtc.so.{major}*"), recursive=True))
        hits = [h for h in hits if ".alt." not in h]
        if hits:
            return hits[0]
    raise FileNotFoundError(f"libnvrtc.so.{major} not found: install the test extras "
                            "(pip install '.[test]')")


class NVRTC:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)

    def _check(self, status, log=""):
        if status != 0:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{self.lib.nvrtcGetErrorString(status).decode()}\n{log}")

    def compile(self, text, name, options, expressions):
        lib = self.lib
        program = ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(ctypes.byref(program), text.encode(), name.encode(),
                                           0, None, None))
        try:
            for expression in expressions:
                self._check(lib.nvrtcAddNameExpression(program, expression.encode()))
            argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            status = lib.nvrtcCompileProgram(program, len(options), argv)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(program, buffer)
            log = buffer.value.decode()
            self._check(status, log)
            lowered = {}
            for expression in expressions:
                out = ctypes.c_char_p()
                self._check(lib.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(out)))
                lowered[expression] = out.value.decode()
            lib.nvrtcGetCUBINSize(program, ctypes.byref(size))
            return log, lowered, size.value
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(program))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def nvrtc(request):
    return NVRTC(_find_nvrtc(request.param))


@pytest.mark.parametrize("file", sorted(_kernels.KERNELS))
def test_every_instantiation_compiles(nvrtc, file):
    major = nvrtc.version[0]
    text = _kernels.source(file)
    expressions = [e for f, dtype, bits in _kernels.instantiations() if f == file
                   for e in _kernels.name_expressions(f, dtype, bits)]
    assert len(expressions) == len(_kernels.KERNELS[file]) * 2 * len(_kernels._dtypes.DTYPES)
    for arch in ARCHS[major]:
        options = [*_kernels.CupyBackend.OPTIONS, f"--gpu-architecture={arch}",
                   "--ptxas-options=-v"]
        log, lowered, cubin = nvrtc.compile(text, f"{file}.cu", options, expressions)
        unexpected = [line for line in log.splitlines()
                      if line.strip() and not line.startswith("ptxas")
                      and not any(w in line for w in EXPECTED_WARNINGS)]
        assert not unexpected, f"NVRTC {nvrtc.version} {arch}:\n{log}"
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert len(spills) == len(expressions), f"NVRTC {nvrtc.version} {arch}:\n{log}"
        assert all(s == ("0", "0") for s in spills), f"spills, NVRTC {nvrtc.version} {arch}:\n{log}"
        assert set(lowered) == set(expressions)
        assert all(name.startswith("_Z") for name in lowered.values())
        assert cubin > 0


def test_a_broken_kernel_fails_to_compile():
    """The harness itself can fail: a syntax error is reported, not ignored."""
    nvrtc = NVRTC(_find_nvrtc(13))
    with pytest.raises(RuntimeError, match="error"):
        nvrtc.compile("__global__ void k(float* x) { x[0] = ; }", "broken.cu",
                      ["--gpu-architecture=sm_90"], [])


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_block_cooperation_wrappers_compile(nvrtc, arch):
    """common.cuh's shared-memory macros and its mma / ldmatrix / cp.async
    wrappers compile to device code: the host executor's test kernels
    (tests/kernels/host_primitives.cu, the cooperative GEMM among them) for the
    architectures that have those instructions."""
    import test_host_runtime

    file = test_host_runtime.PRIMITIVES
    options = [*_kernels.CupyBackend.OPTIONS, f"--gpu-architecture={arch}"]
    log, lowered, cubin = nvrtc.compile(_kernels.source(file), "host_primitives.cu", options,
                                        list(file.expressions))
    assert not [line for line in log.splitlines() if line.strip()], log
    assert set(lowered) == set(file.expressions) and cubin > 0
