"""The one dtype table: NumPy dtype -> C storage type and accumulation dtype.

It drives the kernel template names, the NVRTC compile list, the host build and
the "unsupported dtype" message. float16 and bfloat16 are stored in their own
type and accumulate in float32 (docs/semantics.md §5.2), which also gives the
tolerance each dtype is held to against the float64 reference; bfloat16 is NumPy's
extension type from ``ml_dtypes`` (what CuPy and JAX use).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy

try:
    import ml_dtypes
except ImportError:  # bfloat16 is then unavailable, everything else works
    ml_dtypes = None


class DType(NamedTuple):
    name: str            # "float32", used in messages and wrapper names
    ctype: str           # the C storage type in kernels/*.cu
    dtype: numpy.dtype   # the array dtype
    acc: numpy.dtype     # the accumulation dtype (columns, atomics, GEMMs)
    tolerance: float     # relative-norm error allowed against the float64 reference


def _table():
    f32, f64 = numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)
    rows = [
        DType("float32", "float", f32, f32, 1e-5),
        DType("float64", "double", f64, f64, 1e-12),
        DType("float16", "dcn_half", numpy.dtype(numpy.float16), f32, 1e-2),
    ]
    if ml_dtypes is not None:
        # docs/semantics.md §5.3: bfloat16's 8-bit mantissa needs 2e-2 on long sums
        rows.append(DType("bfloat16", "dcn_bfloat16", numpy.dtype(ml_dtypes.bfloat16), f32, 2e-2))
    return {row.dtype: row for row in rows}


DTYPES = _table()
BFLOAT16 = None if ml_dtypes is None else numpy.dtype(ml_dtypes.bfloat16)
SUPPORTED = ", ".join(row.name for row in DTYPES.values())

# Index types: the kernels are instantiated for 32- and 64-bit indices; the
# 64-bit ones are used only when an element count can pass 2**31 - 1.
INDEX_CTYPES = {32: "int", 64: "long long"}
INDEX_DTYPES = {32: numpy.dtype(numpy.int32), 64: numpy.dtype(numpy.int64)}
INT32_LIMIT = 2**31 - 1


def lookup(dtype, name="input"):
    """The table row of ``dtype``; TypeError naming ``name`` when unsupported."""
    try:
        row = DTYPES.get(numpy.dtype(dtype))
    except TypeError:
        row = None
    if row is None:
        hint = "" if ml_dtypes is not None else " (bfloat16 needs the ml_dtypes package)"
        raise TypeError(f"{name}.dtype must be one of {SUPPORTED}{hint}, got {dtype}")
    return row


def index_bits(*sizes):
    """32 when every element count fits a signed 32-bit index, else 64."""
    return 64 if max(sizes, default=0) > INT32_LIMIT else 32
