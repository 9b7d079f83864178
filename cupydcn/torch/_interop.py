"""Tensors to the core's arrays and back: DLPack views, bfloat16, torch's
device, stream and caching allocator, and op results that torch allocates.

CUDA tensors cross to CuPy and CPU tensors to NumPy by DLPack, without copies.
On a CUDA tensor the core runs on the tensor's device, on torch's current
stream, with CuPy allocating from torch's caching allocator
(:func:`core_scope`); the op results are tensors from ``torch.empty`` that the
core writes into (``cupydcn._arrays.output_allocator``), so ``record_stream``
and the caching allocator treat them as any other torch tensor.
"""

import contextlib

import numpy
import torch
from torch import Tensor

from cupydcn import _arrays, _validation


def _bfloat16():
    import ml_dtypes

    return numpy.dtype(ml_dtypes.bfloat16)


def core_array(t):
    """A zero-copy CuPy (CUDA) or NumPy (CPU) view of tensor ``t``; None stays None."""
    if t is None:
        return None
    t = t.detach()  # DLPack refuses tensors that require grad; the data is the same
    if t.device.type == "cuda":
        import cupy

        convert = cupy.from_dlpack
    elif t.device.type == "cpu":
        convert = numpy.from_dlpack
    else:
        raise _validation.ArgumentTypeError(
            f"a tensor lives on {t.device}; cupydcn runs on CUDA GPUs and on the CPU")
    if t.dtype == torch.bfloat16:
        # NumPy's DLPack has no bfloat16 (nor has every CuPy's): the same bits
        # cross as int16 and are viewed as ml_dtypes.bfloat16, the core's type.
        return convert(t.view(torch.int16)).view(_bfloat16())
    return convert(t)


def tensor(a, owner=None):
    """The tensor of the core's CuPy or NumPy result ``a``: the one torch
    allocated for it (``owner``, from :func:`core_scope`), else one sharing
    its memory through DLPack."""
    t = None if owner is None else owner(a)
    if t is not None:
        return t
    if a.dtype == _bfloat16():
        return torch.from_dlpack(a.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def torch_dtype(dtype):
    """The torch dtype of a NumPy dtype (ml_dtypes.bfloat16 included)."""
    return torch.bfloat16 if dtype == _bfloat16() else getattr(torch, numpy.dtype(dtype).name)


_torch_allocator = None


def _cupy_allocator():
    """A CuPy allocator drawing from torch's caching allocator on torch's
    current stream, so that the core's buffers and results live in torch's
    pool instead of a second cache beside it."""
    global _torch_allocator
    if _torch_allocator is None:
        import cupy

        def malloc(size, device_id):
            if size == 0:
                return 0
            return torch.cuda.caching_allocator_alloc(size, device_id,
                                                      torch.cuda.current_stream(device_id))

        def free(ptr, device_id):
            if ptr:
                torch.cuda.caching_allocator_delete(ptr)

        _torch_allocator = cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc
    return _torch_allocator


class _StreamHandle:
    """A CUDA stream handle under the CUDA stream protocol (torch's streams
    implement it only in recent versions)."""

    def __init__(self, ptr):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _cupy_stream(ptr):
    """CuPy's view of the CUDA stream ``ptr`` (a context manager making it current)."""
    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:  # CuPy >= 14, where ExternalStream is deprecated
        return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr)


@contextlib.contextmanager
def device_scope(t):
    """Run the core on ``t``'s device: for CUDA, that device current, torch's
    current stream as CuPy's current stream and torch's allocator."""
    if t.device.type != "cuda":
        yield
        return
    import cupy

    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index), _cupy_stream(torch.cuda.current_stream(index).cuda_stream), \
            cupy.cuda.using_allocator(_cupy_allocator()):
        yield


@contextlib.contextmanager
def core_scope(t):
    """:func:`device_scope` of ``t``, with the op results allocated by torch
    (``torch.empty`` on ``t``'s device, on torch's current stream) and written
    by the core in place: the results are ordinary torch tensors, which
    ``record_stream`` and torch's caching allocator handle as their own.
    Yields the function that maps a core result to its tensor."""
    def allocate(shape, dtype):
        owner = torch.empty(shape, dtype=torch_dtype(dtype), device=t.device)
        return owner, core_array(owner)

    with device_scope(t), _arrays.output_allocator(allocate) as owner:
        yield owner


def check_tensors(required, optional=()):
    """Every tensor argument a torch.Tensor (the optional ones or None), by
    the shared check: "offset must be a torch.Tensor, got numpy.ndarray"."""
    _validation.check_arrays(required, optional, expected="a torch.Tensor",
                             accepts=lambda x: isinstance(x, Tensor))


class StandIn:
    """What the shared checks read of a traced tensor: its shape, dtype and
    strides (``stride()``, as a tensor's), in plain ints."""

    def __init__(self, shape, dtype, strides):
        self.shape, self.dtype, self._strides = tuple(shape), dtype, tuple(strides)

    def stride(self):
        return self._strides


def stand_in(t, shape=None):
    """A :class:`StandIn` of tensor ``t`` (None stays None) with ``shape``, by
    default ``t``'s sizes as their hints (:func:`hint`), and its strides' hints."""
    if t is None:
        return None
    shape = [hint(s) for s in t.shape] if shape is None else shape
    return StandIn(shape, t.dtype, [hint(s) for s in t.stride()])


def hint(size):
    """``size`` as an int without specializing it: a symbolic size's hint
    (its example value under ``torch.export``, the current one under
    ``torch.compile``), where ``int()`` would add a guard (and make
    ``torch.export`` report a dynamic dimension as specialized)."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    from torch.fx.experimental import symbolic_shapes

    optimization_hint = getattr(symbolic_shapes, "optimization_hint", None)  # torch >= 2.13
    if optimization_hint is not None:
        return optimization_hint(size)
    return symbolic_shapes.hint_int(size)
