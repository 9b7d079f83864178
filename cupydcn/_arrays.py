"""Array interchange: whatever the caller passes in, CuPy or NumPy inside,
the caller's own library out.

CuPy arrays are used as they are; NumPy arrays take the CPU path (the
reference); any other array with ``__dlpack__`` (torch, JAX, TensorFlow) is
wrapped without a copy, by CuPy when it lives on a CUDA device and by NumPy
when it lives on the CPU, and results go back through the caller's
``from_dlpack``. The DLPack stream handshake orders the caller's stream with
CuPy's current stream. All arrays of one call must live on one device; GPU work
runs with that device current.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

import numpy

from cupydcn import _config, _dtypes, _validation

_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def _cupy():
    import cupy

    return cupy


def array_module(x):
    """numpy or cupy, whichever ``x`` (a NumPy or CuPy array) belongs to."""
    return _cupy() if _is_cupy(x) else numpy


def _is_cupy(x):
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "device")


def _where(x, name):
    """('cpu', None) or ('cuda', device id) for one argument."""
    if isinstance(x, numpy.ndarray):
        return "cpu", None
    if _is_cupy(x):
        return "cuda", x.device.id
    if hasattr(x, "__dlpack_device__") and hasattr(x, "__dlpack__"):
        kind, device = x.__dlpack_device__()
        kind = int(kind)
        if kind in (_DL_CPU, _DL_CUDA_HOST):
            return "cpu", None
        if kind in (_DL_CUDA, _DL_CUDA_MANAGED):
            return "cuda", int(device)
        raise _validation.ArgumentTypeError(
            f"{name} lives on DLPack device type {kind}; cupydcn runs on CUDA GPUs and on the CPU")
    raise _validation.ArgumentTypeError(f"{name} must be {_validation.ARRAY}, "
                                        f"got {_validation.type_name(x)}")


def _describe(where):
    return "the CPU" if where[0] == "cpu" else f"cuda:{where[1]}"


def _foreign_bfloat16(x):
    """``x``'s bfloat16 dtype when ``x`` is a bfloat16 array of a library other
    than NumPy/CuPy that can reinterpret its bits (``x.view(dtype)``), else None."""
    if isinstance(x, numpy.ndarray) or _is_cupy(x) or not hasattr(x, "view"):
        return None
    dtype = getattr(x, "dtype", None)
    return dtype if str(dtype).rsplit(".", 1)[-1] == "bfloat16" else None


def _library(x):
    namespace = getattr(x, "__array_namespace__", None)
    if namespace is not None:
        return namespace()
    return sys.modules[type(x).__module__.split(".")[0]]


def _returner(x):
    """A function turning a CuPy/NumPy result into an array of ``x``'s library."""
    if isinstance(x, numpy.ndarray) or _is_cupy(x):
        return lambda a: a
    namespace = getattr(x, "__array_namespace__", None)
    if namespace is not None:
        return namespace().from_dlpack
    top = type(x).__module__.split(".")[0]
    if top == "tensorflow":  # TensorFlow's from_dlpack takes a capsule
        import tensorflow as tf

        return lambda a: tf.experimental.dlpack.from_dlpack(a.__dlpack__())
    library = sys.modules.get(top)
    if library is not None and hasattr(library, "from_dlpack"):
        return library.from_dlpack
    raise _validation.ArgumentTypeError(
        f"cannot return results as {_validation.type_name(x)}: its library has no from_dlpack")


# ---- result buffers ---------------------------------------------------------
#
# A bridge may own the memory of the op results: inside ``with
# output_allocator(allocate)``, every result buffer (the op outputs and the
# returned gradients) is ``allocate(shape, dtype)``, which returns the bridge's
# own array (e.g. a torch tensor from ``torch.empty``) and its CuPy/NumPy view;
# the kernels write into the view, and ``allocated(view)`` gives the bridge its
# array back. Temporaries (columns, keys, accumulators) never use it.

_allocator = contextvars.ContextVar("cupydcn_output_allocator", default=None)


class _Allocations:
    def __init__(self, allocate):
        self.allocate = allocate
        self.owners = {}  # id(view) -> (view, owner): the view is kept alive, its id unique

    def new(self, shape, dtype):
        owner, view = self.allocate(tuple(int(s) for s in shape), numpy.dtype(dtype))
        self.owners[id(view)] = (view, owner)
        return view

    def owner(self, view):
        entry = self.owners.get(id(view))
        return None if entry is None or entry[0] is not view else entry[1]


@contextlib.contextmanager
def output_allocator(allocate):
    """Within the block, op results are allocated by ``allocate(shape,
    dtype)`` -> ``(owner, view)`` (``view`` a CuPy or NumPy array sharing
    ``owner``'s memory, of ``shape`` and the NumPy ``dtype``); yields a
    function mapping a returned view to its owner (None for any other array)."""
    allocations = _Allocations(allocate)
    token = _allocator.set(allocations)
    try:
        yield allocations.owner
    finally:
        _allocator.reset(token)


def empty_result(xp, shape, dtype):
    """An uninitialised result buffer: the bridge's allocator's when one is
    set, else ``_config.empty`` (poisoned with NaN in tests either way)."""
    allocations = _allocator.get()
    if allocations is None:
        return _config.empty(xp, shape, dtype)
    out = allocations.new(shape, dtype)
    if _config.poison:
        out.fill(-1 if out.dtype.kind in "iu" else float("nan"))
    return out


def zeros_result(xp, shape, dtype, result=True):
    """A zero-filled result buffer (see :func:`empty_result`); with ``result``
    false an ordinary zero array (an accumulator converted at the end)."""
    if not result or _allocator.get() is None:
        return xp.zeros(shape, dtype)
    out = empty_result(xp, shape, dtype)
    out.fill(0)
    return out


def result(xp, array, dtype=None):
    """``array`` as a result of ``dtype`` (default its own): the array itself
    when it already is one (or no allocator is set and no conversion is
    needed), else converted into a new result buffer."""
    dtype = array.dtype if dtype is None else numpy.dtype(dtype)
    allocations = _allocator.get()
    if allocations is None:
        return array.astype(dtype, copy=False)
    if array.dtype == dtype and allocations.owner(array) is not None:
        return array
    out = allocations.new(array.shape, dtype)
    out[...] = array
    return out


class Call:
    """The arrays of one op call, converted for the backend.

    ``Call(input=x, offset=o, ...)``: attributes of the same names hold the
    converted arrays (None stays None); ``on_gpu`` says which path runs;
    ``device()`` is the context to run GPU work in; ``wrap(result)`` converts a
    result back to the library of the first argument.
    """

    def __init__(self, **arrays):
        first_name = next(iter(arrays))
        where = None
        for name, x in arrays.items():
            if x is None:
                continue
            here = _where(x, name)
            if where is None:
                where, where_name = here, name
            elif here != where:
                raise _validation.ArgumentError(
                    f"{name} is on {_describe(here)} but {where_name} is on "
                    f"{_describe(where)}: all arrays must be on one device")
        self.on_gpu = where is not None and where[0] == "cuda"
        self.device_id = where[1] if self.on_gpu else None
        self._return = _returner(arrays[first_name])
        self._bfloat16 = _foreign_bfloat16(arrays[first_name])
        with self.device():
            for name, x in arrays.items():
                setattr(self, name, None if x is None else self._convert(x))

    def _convert(self, x):
        if isinstance(x, numpy.ndarray) or _is_cupy(x):
            return x
        from_dlpack = _cupy().from_dlpack if self.on_gpu else numpy.from_dlpack
        if _foreign_bfloat16(x) is not None:
            # NumPy's DLPack has no bfloat16: the bits cross as int16 and are
            # reinterpreted on each side, still without a copy
            return from_dlpack(x.view(_library(x).int16)).view(_dtypes.BFLOAT16)
        return from_dlpack(x)

    def device(self):
        if self.on_gpu:
            return _cupy().cuda.Device(self.device_id)
        return contextlib.nullcontext()

    def wrap(self, result):
        if result is None:
            return None
        if isinstance(result, tuple):
            return type(result)(*(self.wrap(r) for r in result))
        if self._bfloat16 is not None and result.dtype == _dtypes.BFLOAT16:
            return self._return(result.view(numpy.int16)).view(self._bfloat16)
        return self._return(result)
