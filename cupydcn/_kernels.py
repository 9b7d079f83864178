"""The one loader and the one launch helper.

Source text is assembled here (``kernels/common.cuh`` + the op's ``.cu`` file),
so CuPy's compile cache sees every byte that went in. Every kernel is a
template ``name<T, I>`` over the storage type ``T`` (from the dtype table) and
the index type ``I``; a file is compiled once per device, dtype and index width,
never per shape, with all its kernels as NVRTC name expressions.

Launch ABI, owned by :func:`pack`: a Python ``int`` becomes the index type
``I``, a Python ``float`` the accumulation type of ``T``, an array a pointer to
its data (it must be C-contiguous) and ``None`` a null pointer. The op kernels
are grid-stride loops over ``n`` work items, so any grid is correct; a launch
may instead give its configuration (``grid`` and ``block`` as dim3 tuples,
``shared`` dynamic shared-memory bytes) and extra template arguments
(``template``: ``kernel<T, I, *template>``).

Two backends run the same source: :class:`CupyBackend` (NVRTC through
``cupy.RawModule``, on the current device and stream) and :class:`HostBackend`
(the source compiled as C++ with ``kernels/host_runtime.h``, which runs CUDA's
execution model on the CPU, with checks), which lets the CPU test tier execute
the kernels themselves. Besides the files of :data:`KERNELS`, both build any
:class:`KernelFile` (the tests' own kernels).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import re
import threading
import typing

import numpy

from cupydcn import _dtypes

# The kernels each source file defines, all templates <T, I>.
KERNELS = {
    "deform_conv": ("deform_im2col", "deform_col2im", "deform_col2im_coord",
                    "deform_sample_keys", "deform_col2im_gather"),
    "deform_conv_fused": ("deform_col2im_fused", "deform_col2im_fused_gather"),
    "deform_conv_nhwc": ("deform_im2col_nhwc", "deform_col2im_nhwc"),
    "deform_roi_pool": ("deform_roi_pool_forward", "deform_roi_pool_backward_input",
                        "deform_roi_pool_backward_offset", "deform_roi_pool_sample_count",
                        "deform_roi_pool_sample_keys", "deform_roi_pool_backward_input_gather"),
    "deform_psroi_pool": ("deform_psroi_pool_forward", "deform_psroi_pool_backward_input",
                          "deform_psroi_pool_backward_trans", "deform_psroi_pool_sample_keys",
                          "deform_psroi_pool_backward_input_gather",
                          "deform_psroi_pool_backward_trans_gather"),
    "deform_conv_igemm": ("deform_conv_igemm", "deform_conv_igemm_grad_weight",
                          "deform_conv_igemm_grad_data"),
}

BLOCK = 256
MAX_GRID = 65535 * 8

# What makes a kernel file block-cooperative: the host build runs its threads
# as fibers (see host_runtime.h) instead of a plain loop.
COOPERATIVE = re.compile(r"__syncthreads|__syncwarp|__shfl|__ballot_sync|__any_sync|__all_sync|"
                         r"DCN_SHARED|dcn_ldmatrix|dcn_mma_|dcn_cp_async")


class KernelFile(typing.NamedTuple):
    """A kernel source outside :data:`KERNELS` (the tests' kernels): ``path``
    to the ``.cu`` file (compiled after ``common.cuh``, as the op files are)
    and the template instantiations to build, e.g.
    ``("gemm<dcn_half, int, 64>",)``."""

    path: pathlib.Path
    expressions: tuple

    @property
    def name(self):
        return pathlib.Path(self.path).stem


def _file_name(file):
    return file.name if isinstance(file, KernelFile) else file


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
    """The full source text of ``file`` (a key of KERNELS or a KernelFile) as
    it is compiled. ``#line`` marks make compiler messages and the host
    checks' reports name the real file and line."""
    folder = kernel_dir()
    if isinstance(file, KernelFile):
        name, body = pathlib.Path(file.path).name, pathlib.Path(file.path).read_text()
    elif file in KERNELS:
        name, body = f"{file}.cu", (folder / f"{file}.cu").read_text()
    else:
        raise KeyError(f"unknown kernel file {file!r}; known: {sorted(KERNELS)} or a KernelFile")
    common = (folder / "common.cuh").read_text()
    return f'#line 1 "common.cuh"\n{common}\n// ---- {name} ----\n#line 1 "{name}"\n{body}'


def _format_template_argument(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def template_name(kernel, dtype, bits, template=()):
    """``kernel<T, I, *template>``: the instantiation a launch runs."""
    extra = "".join(f", {_format_template_argument(v)}" for v in template)
    return f"{kernel}<{dtype.ctype}, {_dtypes.INDEX_CTYPES[bits]}{extra}>"


def name_expressions(file, dtype, bits):
    return [template_name(k, dtype, bits) for k in KERNELS[file]]


def all_expressions(file):
    """Every instantiation a build of ``file`` holds."""
    if isinstance(file, KernelFile):
        return list(file.expressions)
    return [e for dtype in _dtypes.DTYPES.values() for bits in (32, 64)
            for e in name_expressions(file, dtype, bits)]


def _body(file, text):
    """The kernel file's own text inside a full source ``text`` (after common.cuh)."""
    name = pathlib.Path(file.path).name if isinstance(file, KernelFile) else f"{file}.cu"
    mark = text.rfind(f'#line 1 "{name}"')
    return text if mark < 0 else text[mark:]


def cooperative(file, text=None):
    """True if ``file`` (its source ``text``) uses block cooperation."""
    return bool(COOPERATIVE.search(_body(file, source(file) if text is None else text)))


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


def _dim3(value, what):
    """A grid or block as an (x, y, z) tuple of positive ints."""
    dims = (value,) if isinstance(value, (int, numpy.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(
            isinstance(d, (int, numpy.integer)) and not isinstance(d, bool) and d >= 1
            for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive ints (x, y, z), got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


def launch_config(n, grid=None, block=None, shared=0, default_block=BLOCK, max_grid=MAX_GRID):
    """The (grid, block, shared) of a launch: the given configuration, or a
    1-D grid-stride launch of ``default_block`` threads over ``n`` items."""
    if block is None:
        block = default_block
    block = _dim3(block, "block")
    threads = block[0] * block[1] * block[2]
    if threads > 1024:
        raise ValueError(f"block must have at most 1024 threads, got {block} = {threads}")
    grid = _dim3(grid_for(n, threads, max_grid) if grid is None else grid, "grid")
    if not isinstance(shared, (int, numpy.integer)) or shared < 0:
        raise ValueError(f"shared must be a non-negative number of bytes, got {shared!r}")
    return grid, block, int(shared)


# ---- warp-per-item kernels: `lanes` threads of a warp share one work item,
# split its channels and reduce over them with shuffles (the fused and
# channels-last conv backwards, the RoI offset and trans gradients)

WARP = 32
LANES = (1, 2, 4, 8, 16, WARP)


def lanes_for(backend, channels, cap):
    """Threads of a warp per work item: on CUDA the largest power of two <=
    min(``cap``, ``channels``), a heuristic until GPU measurements replace it
    (benchmarks/NOTES.md); elsewhere 1 (on the host a lane is a fiber and a
    shuffle a context switch; with one lane no shuffle runs)."""
    if getattr(backend, "name", None) != "cupy" or channels < 2:
        return 1
    return 1 << (min(cap, channels).bit_length() - 1)


def checked_lanes(backend, channels, lanes, cap):
    """``lanes`` (None: :func:`lanes_for`), a power of two from 1 to 32."""
    lanes = lanes_for(backend, channels, cap) if lanes is None else lanes
    if lanes not in LANES:
        from cupydcn import _validation

        raise _validation.ArgumentError(
            f"lanes must be a power of two from 1 to 32, got {lanes!r}")
    return lanes


def warp_threads(items, lanes):
    """The threads of a warp-per-item launch: items*lanes rounded up to whole warps."""
    return -(-items * lanes // WARP) * WARP


def launch_lanes(backend, file, kernel, dtype, bits, n, args, lanes, shuffles=True):
    """``backend.launch`` of a warp-per-item kernel over ``n`` threads
    (:func:`warp_threads`). With lanes > 1 and ``shuffles`` (False for a kernel
    whose lanes never exchange values): blocks of BLOCK threads, a multiple of
    the warp, so every warp runs whole and reaches its shuffles with the full
    mask, and on the host the threads are fibers; otherwise, on the host, a
    plain loop (no shuffle runs, though the file holds some)."""
    options = {}
    cooperating = lanes > 1 and shuffles
    if cooperating:
        grid = min(-(-n // BLOCK), getattr(backend, "grid", None) or MAX_GRID)
        options.update(grid=(grid,), block=(BLOCK,))
    if getattr(backend, "name", None) == "host":
        options["cooperative"] = cooperating
    backend.launch(file, kernel, dtype, bits, n, args, **options)


class CupyBackend:
    """Runs kernels with CuPy on the current device and the current stream."""

    name = "cupy"
    OPTIONS = ("-std=c++17",)

    def __init__(self):
        import cupy

        self.xp = cupy
        self._modules = {}
        self._functions = {}
        self._lock = threading.Lock()

    def module(self, file, dtype, bits):
        cupy = self.xp
        key = (cupy.cuda.Device().id, file, dtype.name, bits)
        module = self._modules.get(key)
        if module is None:
            with self._lock:
                module = self._modules.get(key)
                if module is None:
                    expressions = (list(file.expressions) if isinstance(file, KernelFile)
                                   else name_expressions(file, dtype, bits))
                    module = cupy.RawModule(code=source(file), options=self.OPTIONS,
                                            name_expressions=expressions)
                    module.compile()
                    self._modules[key] = module
        return module

    def function(self, file, kernel, dtype, bits, template=()):
        """The cached function object of ``kernel<T, I, *template>`` on the
        current device (one dictionary lookup per launch)."""
        key = (self.xp.cuda.Device().id, _file_name(file), kernel, dtype.name, bits,
               tuple(template))
        function = self._functions.get(key)
        if function is None:
            function = self.module(file, dtype, bits).get_function(
                template_name(kernel, dtype, bits, template))
            self._functions[key] = function
        return function

    def launch(self, file, kernel, dtype, bits, n, args, *, grid=None, block=None, shared=0,
               template=()):
        """Run ``kernel<T, I, *template>`` of ``file`` over ``n`` work items
        (none: no launch), on ``grid`` x ``block`` if given (see launch_config)."""
        if n == 0:
            return
        grid, block, shared = launch_config(n, grid, block, shared)
        function = self.function(file, kernel, dtype, bits, template)
        packed = pack(args, dtype, bits, lambda a: a)
        packed = [numpy.uint64(0) if a is None else a for a in packed]
        function(grid, block, tuple(packed), shared_mem=shared)


class _HostConfig(ctypes.Structure):
    """dcn_host_config of host_runtime.h."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_bytes", ctypes.c_ulonglong), ("seed", ctypes.c_ulonglong),
                ("workers", ctypes.c_int), ("checks", ctypes.c_int), ("vary", ctypes.c_int),
                ("cooperative", ctypes.c_int)]


def _cpu_description():
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    import platform

    return platform.machine() + "".join(lines)


def _env_flag(name):
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"${name} must be 0 or 1, got {value!r}")
    return value == "1"


# The host backend of the users' CPU path: checks off (a fixed order, no
# recording), blocks on every core, grid-stride launches of BLOCK threads.
HOST_USER_OPTIONS = {"checks": False}


class HostBackend:
    """Runs the same kernel source on the CPU, on NumPy arrays, with CUDA's
    execution model (``kernels/host_runtime.h``).

    The source is compiled as C++ by ``$CXX`` (or ``c++``); the shared library
    is cached under ``$CUPYDCN_CACHE_DIR`` (default ``~/.cache/cupydcn``) by a
    hash of everything that went in. Blocks run in parallel on ``workers`` OS
    threads (default: the CPU cores). A kernel file with no block cooperation
    runs each block's threads as a plain loop; a cooperative one (see
    :data:`COOPERATIVE`) runs each thread as a fiber, with shared memory,
    barriers and warp operations.

    ``checks`` (default ``$CUPYDCN_HOST_CHECKS`` = 1, else off) is the one
    setting of the test tier: shared-memory race detection, bounds and mask
    checks, and scheduling of blocks and threads in an order drawn from
    ``seed`` (default ``$CUPYDCN_HOST_SEED``, else 0; an error names it). The
    same launch with the same seed runs in the same order, so that a result
    can be reproduced; with more than one worker, real atomics still add in
    the order the cores reach them. Off, the same kernels run in a fixed order
    without recording accesses: the fast CPU path.

    ``grid`` and ``block`` are the default 1-D launch of a grid-stride kernel
    over n items: ``block`` threads, and ``grid`` blocks at most (None: as many
    as the items need). The tests use a small grid and an odd block to
    exercise the grid-stride loops. ``sources`` maps a file to replacement
    source text (the tests use it to show that a wrong kernel fails them);
    ``flags`` are added to the compiler's (e.g. ``-fsanitize=address``).
    """

    name = "host"
    xp = numpy
    # -march=native: the library is built on, and cached for, the machine that
    # runs it (the cache key holds the CPU's description). GCC contracts a*b + c
    # into FMAs there, as nvcc does on the GPU by default (--fmad=true): a
    # machine without FMA may round differently, within the tolerances.
    FLAGS = ("-std=c++17", "-O3", "-march=native", "-shared", "-fPIC", "-fno-strict-aliasing",
             "-pthread")

    def __init__(self, grid=None, block=BLOCK, compiler=None, sources=None, flags=(), checks=None,
                 workers=None, seed=None):
        self.grid, self.block = grid, block
        self.flags = (*self.FLAGS, *flags)
        self.sources = dict(sources or {})
        self.compiler = compiler or os.environ.get("CXX") or "c++"
        self.checks = _env_flag("CUPYDCN_HOST_CHECKS") if checks is None else bool(checks)
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.workers = workers
        if seed is None:
            seed = os.environ.get("CUPYDCN_HOST_SEED") or 0
        try:
            self.seed = int(seed)
        except ValueError:
            raise ValueError(f"seed ($CUPYDCN_HOST_SEED) must be an int, got {seed!r}") from None
        self._libraries = {}
        self._functions = {}
        self._cooperative = {}
        self._lock = threading.Lock()

    def _text(self, file):
        return self.sources.get(_file_name(file)) or source(file)

    def _symbols(self, file):
        return {e: f"dcn_host_k{i}" for i, e in enumerate(all_expressions(file))}

    def build_source(self, file):
        folder = kernel_dir()
        runtime = (folder / "host_runtime.h").read_text()
        shim = (folder / "host_shim.h").read_text()
        wrappers = [
            f'extern "C" int {symbol}(const dcn_host_config* config, void** args) '
            f'{{ return dcn_host_launch("{expression}", &{expression}, args, config); }}'
            for expression, symbol in self._symbols(file).items()
        ]
        return "\n".join(['#line 1 "host_runtime.h"', runtime, '#line 1 "host_shim.h"', shim,
                          self._text(file), "// ---- host launch wrappers ----", *wrappers, ""])

    def library(self, file):
        key = _file_name(file)
        library = self._libraries.get(key)
        if library is not None:
            return library
        with self._lock:
            library = self._libraries.get(key)
            if library is None:
                library = ctypes.CDLL(str(self._compile(self.build_source(file), key)))
                library.dcn_host_error.restype = ctypes.c_char_p
                self._libraries[key] = library
        return library

    def _compile(self, text, file):
        if shutil.which(self.compiler) is None:
            raise RuntimeError(f"the host build needs a C++ compiler; {self.compiler!r} not found")
        key = text + repr((self.compiler, self.flags, _cpu_description()))
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

    def launch(self, file, kernel, dtype, bits, n, args, *, grid=None, block=None, shared=0,
               template=(), cooperative=None):
        """Run ``kernel<T, I, *template>`` of ``file`` over ``n`` work items
        (none: no launch), on ``grid`` x ``block`` if given (see launch_config).
        ``cooperative`` (default: what the file's source shows) runs the
        threads as fibers. An error the checks find raises RuntimeError."""
        if n == 0:
            return
        if grid is None and block is None:
            grid, block, shared = launch_config(n, None, self.block, shared,
                                                max_grid=self.grid or MAX_GRID)
        else:
            grid, block, shared = launch_config(n, grid, block, shared)
        function, expression = self.function(file, kernel, dtype, bits, template)
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
        seed = self.seed
        if cooperative is None:
            cooperative = self.cooperative(file)
        config = _HostConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared, seed,
                             self.workers, int(self.checks), int(self.checks), int(cooperative))
        if function(ctypes.byref(config), argv) != 0:
            report = self.library(file).dcn_host_error().decode(errors="replace")
            raise RuntimeError(f"{report} [host launch of {expression}, grid {grid}, block "
                               f"{block}, shared {shared} bytes, seed {seed}]")

    def function(self, file, kernel, dtype, bits, template=()):
        """(The cached ctypes function, its expression) of ``kernel<T, I,
        *template>``; KeyError when the build lacks it."""
        key = (_file_name(file), kernel, dtype.name, bits, tuple(template))
        found = self._functions.get(key)
        if found is None:
            library = self.library(file)
            expression = template_name(kernel, dtype, bits, template)
            symbols = self._symbols(file)
            if expression not in symbols:
                raise KeyError(f"{expression} is not built for {_file_name(file)}; built: "
                               f"{sorted(symbols)}")
            found = self._functions[key] = (getattr(library, symbols[expression]), expression)
        return found

    def cooperative(self, file):
        """True if the host build runs ``file``'s threads as fibers."""
        key = _file_name(file)
        found = self._cooperative.get(key)
        if found is None:
            found = self._cooperative[key] = cooperative(file, self._text(file))
        return found


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
