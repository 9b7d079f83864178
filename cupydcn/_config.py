"""Process-wide settings: the workspace limit (and the cached workspace it
bounds), the TF32 opt-in, and buffer poisoning for tests."""

from __future__ import annotations

import collections
import os
import threading

import numpy

from cupydcn import _validation

_DEFAULT_WORKSPACE = 256 * 2**20
_workspace_limit = int(os.environ.get("CUPYDCN_WORKSPACE_BYTES", _DEFAULT_WORKSPACE))

# When true, every buffer a kernel is meant to fill completely starts as NaN,
# so an element a kernel forgot to write shows up in the tests.
poison = False


def set_workspace_limit(nbytes):
    """Bound the columns buffer of deform_conv2d to ``nbytes`` (default 256 MiB,
    or ``$CUPYDCN_WORKSPACE_BYTES``). The batch, and if one image does not fit,
    its output rows, are processed in chunks that fit; one row of one image is
    the smallest chunk. Returns the previous limit."""
    global _workspace_limit
    nbytes = int(nbytes)
    if nbytes < 1:
        raise _validation.ArgumentError(f"workspace limit must be >= 1 byte, got {nbytes}")
    previous, _workspace_limit = _workspace_limit, nbytes
    return previous


def get_workspace_limit():
    """The current workspace limit in bytes."""
    return _workspace_limit


def empty(xp, shape, dtype):
    """An uninitialised buffer (NaN-filled, -1 for integers, when ``poison`` is set)."""
    out = xp.empty(shape, dtype)
    if poison:
        out.fill(-1 if out.dtype.kind in "iu" else float("nan"))
    return out


_tf32 = False


def set_tf32(enabled):
    """Let the float32 GEMMs of deform_conv2d's ``im2col`` path use TF32 tensor
    cores (10-bit mantissa products, float32 accumulation; about 1e-3 relative
    error instead of 1e-5) when ``enabled`` is True. Off by default, and only
    this call turns it on: cupydcn's GEMMs ignore CuPy's ``CUPY_TF32`` and
    cuBLAS math modes. Float16, bfloat16 and float64 are unaffected. On the
    CPU the host backend emulates it (operands rounded to TF32). Returns the
    previous setting."""
    global _tf32
    if not isinstance(enabled, (bool, numpy.bool_)):
        raise _validation.ArgumentTypeError(f"set_tf32: enabled must be a bool, got {enabled!r}")
    previous, _tf32 = _tf32, bool(enabled)
    return previous


def get_tf32():
    """True if :func:`set_tf32` opted float32 GEMMs into TF32."""
    return _tf32


# The cached workspace: one buffer per (thread, library, device, stream), so a
# call reuses the columns buffer of the previous one instead of allocating.
# Uses within one call are ordered by the stream (columns, then their
# gradient, then columns again); other threads and streams get their own
# buffer. A buffer grows to the largest request (at most the workspace limit,
# or one output row of one image when that is larger), shrinks when the
# limit drops, and each thread keeps at most _WORKSPACES of them.
_WORKSPACES = 4
_local = threading.local()


def _workspace_key(xp):
    if xp.__name__ == "numpy":
        return ("numpy",)
    return (xp.__name__, xp.cuda.Device().id, xp.cuda.get_current_stream().ptr)


def workspace(xp, shape, dtype):
    """A ``shape`` x ``dtype`` view of the calling thread's cached workspace
    for the current device and stream (see above); NaN-poisoned like
    :func:`empty` when ``poison`` is set. Valid until the next call."""
    dtype = numpy.dtype(dtype)
    count = 1
    for n in shape:
        count *= int(n)
    nbytes = count * dtype.itemsize
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = collections.OrderedDict()
    key = _workspace_key(xp)
    buffer = cache.pop(key, None)
    if buffer is None or buffer.size < nbytes or (
            buffer.size > max(nbytes, _workspace_limit)):
        buffer = None  # release the old one before allocating
        buffer = xp.empty(max(nbytes, 1), numpy.uint8)
    cache[key] = buffer
    while len(cache) > _WORKSPACES:
        cache.popitem(last=False)
    out = buffer[:nbytes].view(dtype).reshape(shape)
    if poison:
        out.fill(-1 if out.dtype.kind in "iu" else float("nan"))
    return out


def clear_workspace():
    """Release the calling thread's cached workspaces."""
    _local.buffers = collections.OrderedDict()
