"""The one loader and the one launch helper.

Source text is assembled here (``kernels/common.cuh`` + the op's ``.cu`` file),
so CuPy's compile cache sees every byte that went in. Every kernel is a
template ``name<T, I>`` over the storage type ``T`` (from the dtype table) and
the index type ``I``; a file is compiled once per device, dtype and index width,
never per shape, with all its kernels as NVRTC name expressions.

Launch ABI, owned by :func:`pack`: a Python ``int`` becomes the index type
``I``, a Python ``float`` the accumulation type of ``T``, an array a pointer to
its data (it must be C-contiguous) and ``None`` a null pointer. Kernels are
grid-stride loops over ``n`` work items, so any grid is correct.

Two backends run the same source: :class:`CupyBackend` (NVRTC through
``cupy.RawModule``, on the current device and stream) and :class:`HostBackend`
(the source compiled as C++ with ``kernels/host_shim.h``, run serially on NumPy
arrays), which lets the CPU test tier execute the kernels themselves.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import numpy

from cupydcn import _dtypes

# The kernels each source file defines, all templates <T, I>.
KERNELS = {
    "deform_conv": ("deform_im2col", "deform_col2im", "deform_col2im_coord",
                    "deform_sample_keys", "deform_col2im_gather"),
    "deform_roi_pool": ("deform_roi_pool_forward", "deform_roi_pool_backward_input",
                        "deform_roi_pool_backward_offset", "deform_roi_pool_sample_count",
                        "deform_roi_pool_sample_keys", "deform_roi_pool_backward_input_gather"),
    "deform_psroi_pool": ("deform_psroi_pool_forward", "deform_psroi_pool_backward_input",
                          "deform_psroi_pool_backward_trans", "deform_psroi_pool_sample_keys",
                          "deform_psroi_pool_backward_input_gather",
                          "deform_psroi_pool_backward_trans_gather"),
}

BLOCK = 256
MAX_GRID = 65535 * 8


def kernel_dir():
    """The folder holding the .cu sources: inside the installed package, or the
    checkout's top-level ``kernels/`` when running from source."""
    here = pathlib.Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "common.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"cupydcn kernel sources not found in {here / 'kernels'} or {here.parent / 'kernels'}"
    )


def source(file):
    """The full source text of ``file`` (a key of KERNELS) as it is compiled."""
    if file not in KERNELS:
        raise KeyError(f"unknown kernel file {file!r}; known: {sorted(KERNELS)}")
    folder = kernel_dir()
    common = (folder / "common.cuh").read_text()
    body = (folder / f"{file}.cu").read_text()
    return f"{common}\n// ---- {file}.cu ----\n{body}"


def template_name(kernel, dtype, bits):
    return f"{kernel}<{dtype.ctype}, {_dtypes.INDEX_CTYPES[bits]}>"


def name_expressions(file, dtype, bits):
    return [template_name(k, dtype, bits) for k in KERNELS[file]]


def instantiations():
    """Every (file, dtype row, index bits) the library can compile."""
    return [(f, d, b) for f in KERNELS for d in _dtypes.DTYPES.values() for b in (32, 64)]


def pack(args, dtype, bits, pointer):
    """Convert launch arguments to exactly typed scalars (see module docstring).

    ``pointer(array)`` gives the backend's pointer representation of an array.
    """
    index_type = _dtypes.INDEX_DTYPES[bits].type
    acc_type = dtype.acc.type
    packed = []
    for position, arg in enumerate(args):
        if arg is None:
            packed.append(None)
        elif isinstance(arg, bool):
            raise TypeError(f"kernel argument {position}: pass booleans as int")
        elif isinstance(arg, (int, numpy.integer)):
            packed.append(index_type(arg))
        elif isinstance(arg, (float, numpy.floating)):
            packed.append(acc_type(arg))
        else:
            if not arg.flags.c_contiguous:
                raise ValueError(f"kernel argument {position} must be C-contiguous")
            packed.append(pointer(arg))
    return packed


def grid_for(n, block=BLOCK, max_grid=MAX_GRID):
    return max(1, min((n + block - 1) // block, max_grid))


class CupyBackend:
    """Runs kernels with CuPy on the current device and the current stream."""

    name = "cupy"
    OPTIONS = ("-std=c++17",)

    def __init__(self):
        import cupy

        self.xp = cupy
        self._modules = {}
        self._lock = threading.Lock()

    def module(self, file, dtype, bits):
        cupy = self.xp
        key = (cupy.cuda.Device().id, file, dtype.name, bits)
        module = self._modules.get(key)
        if module is None:
            with self._lock:
                module = self._modules.get(key)
                if module is None:
                    module = cupy.RawModule(
                        code=source(file),
                        options=self.OPTIONS,
                        name_expressions=name_expressions(file, dtype, bits),
                    )
                    module.compile()
                    self._modules[key] = module
        return module

    def launch(self, file, kernel, dtype, bits, n, args):
        if n == 0:
            return
        function = self.module(file, dtype, bits).get_function(template_name(kernel, dtype, bits))
        packed = pack(args, dtype, bits, lambda a: a)
        packed = [numpy.uint64(0) if a is None else a for a in packed]
        function((grid_for(n),), (BLOCK,), tuple(packed))


class HostBackend:
    """Runs the same kernel source on the CPU, serially, on NumPy arrays.

    The source is compiled as C++ with ``kernels/host_shim.h`` by ``$CXX`` (or
    ``c++``); the shared library is cached under ``$CUPYDCN_CACHE_DIR`` (default
    ``~/.cache/cupydcn``) by a hash of everything that went in. A small grid
    and block (``grid`` x ``block`` serial "threads") exercise the grid-stride
    loops the way a GPU does. ``sources`` maps a file to replacement source
    text (the tests use it to show that a wrong kernel fails them); ``flags``
    are added to the compiler's (e.g. ``-fsanitize=address``).
    """

    name = "host"
    xp = numpy
    FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-fno-strict-aliasing")

    def __init__(self, grid=3, block=5, compiler=None, sources=None, flags=()):
        self.grid, self.block = grid, block
        self.flags = (*self.FLAGS, *flags)
        self.sources = dict(sources or {})
        self.compiler = compiler or os.environ.get("CXX") or "c++"
        self._libraries = {}
        self._lock = threading.Lock()

    @staticmethod
    def symbol(kernel, dtype, bits):
        return f"dcn_host_{kernel}_{dtype.name}_i{bits}"

    def build_source(self, file):
        shim = (kernel_dir() / "host_shim.h").read_text()
        wrappers = []
        for dtype in _dtypes.DTYPES.values():
            for bits in (32, 64):
                for kernel in KERNELS[file]:
                    wrappers.append(
                        f'extern "C" void {self.symbol(kernel, dtype, bits)}'
                        "(unsigned int grid, unsigned int block, void** args) "
                        f"{{ dcn_host_launch(&{template_name(kernel, dtype, bits)}, "
                        "grid, block, args); }"
                    )
        text = self.sources.get(file) or source(file)
        return "\n".join([shim, text, "// ---- host launch wrappers ----", *wrappers, ""])

    def library(self, file):
        library = self._libraries.get(file)
        if library is not None:
            return library
        with self._lock:
            library = self._libraries.get(file)
            if library is None:
                library = ctypes.CDLL(str(self._compile(self.build_source(file), file)))
                self._libraries[file] = library
        return library

    def _compile(self, text, file):
        if shutil.which(self.compiler) is None:
            raise RuntimeError(f"the host build needs a C++ compiler; {self.compiler!r} not found")
        key = text + repr((self.compiler, self.flags))
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        default = pathlib.Path.home() / ".cache" / "cupydcn"
        cache = pathlib.Path(os.environ.get("CUPYDCN_CACHE_DIR") or default)
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / f"host_{file}_{digest}.so"
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = pathlib.Path(tmp) / f"{file}.cpp"
            src.write_text(text)
            out = pathlib.Path(tmp) / "lib.so"
            result = subprocess.run(
                [self.compiler, *self.flags, str(src), "-o", str(out)],
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"host build of {file}.cu failed:\n{result.stderr}")
            os.replace(out, target)  # atomic: concurrent builders agree
        return target

    def launch(self, file, kernel, dtype, bits, n, args):
        if n == 0:
            return
        function = getattr(self.library(file), self.symbol(kernel, dtype, bits))
        index_ctype = ctypes.c_int32 if bits == 32 else ctypes.c_int64
        acc_ctype = ctypes.c_float if dtype.acc == numpy.float32 else ctypes.c_double
        values = []
        for arg in pack(args, dtype, bits, lambda a: ctypes.c_void_p(a.ctypes.data)):
            if arg is None:
                values.append(ctypes.c_void_p(None))
            elif isinstance(arg, ctypes.c_void_p):
                values.append(arg)
            elif isinstance(arg, numpy.integer):
                values.append(index_ctype(int(arg)))
            else:
                values.append(acc_ctype(float(arg)))
        pointers = [ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        argv = (ctypes.c_void_p * len(values))(*pointers)
        grid = max(1, min(self.grid, (n + self.block - 1) // self.block))
        function(ctypes.c_uint(grid), ctypes.c_uint(self.block), argv)


class NoWorkBackend:
    """The backend of a CPU call with no work (an empty batch, no output
    channel, no RoI): the kernel paths only allocate their empty or zero
    results, and a launch with work is a bug."""

    name = "no-work"
    xp = numpy

    @staticmethod
    def launch(file, kernel, dtype, bits, n, args):
        if n:
            raise AssertionError(f"{kernel}: {n} work items on the no-work backend")


def contiguous(xp, *arrays):
    """C-contiguous versions of ``arrays`` (None stays None), as launches need."""
    return [None if a is None else xp.ascontiguousarray(a) for a in arrays]


_cupy_backend = None
_backend_lock = threading.Lock()


def cupy_backend():
    """The process-wide CuPy backend (its module cache is shared by all ops)."""
    global _cupy_backend
    if _cupy_backend is None:
        with _backend_lock:
            if _cupy_backend is None:
                _cupy_backend = CupyBackend()
    return _cupy_backend


def backend_for(call):
    """The backend of an op call: CuPy on the GPU; on the CPU the kernel path
    runs only for empty work (the NumPy reference computes everything else)."""
    return cupy_backend() if call.on_gpu else NoWorkBackend
