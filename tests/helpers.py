"""Comparison helpers shared by the tests (docs/semantics.md §5.3)."""

import numpy

from cupydcn import _check, _dtypes

# Relative-norm tolerances against the float64 reference (the dtype table's).
TOLERANCE = {row.name: row.tolerance for row in _dtypes.DTYPES.values()}
# Implementations held to another dtype's tolerance in the forward (TF32: float16's),
# as `cupydcn check` holds them; their gradients keep the dtype's own.
FORWARD_TOLERANCE_AS = {name: numpy.dtype(other)
                        for name, other in _check.FORWARD_TOLERANCE_AS.items()}
DTYPES = [row.dtype.type for row in _dtypes.DTYPES.values()]


def dtype_name(dtype):
    return numpy.dtype(dtype).name


def to_numpy(x):
    """A float64 NumPy copy of a NumPy or CuPy array."""
    if hasattr(x, "get"):
        x = x.get()
    return numpy.asarray(x).astype(numpy.float64)


def rel_err(got, ref):
    """||got - ref|| / ||ref||; NaN anywhere in ``got`` gives inf."""
    got, ref = to_numpy(got), to_numpy(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if not numpy.all(numpy.isfinite(got)):
        return float("inf")
    scale = numpy.linalg.norm(ref)
    diff = numpy.linalg.norm(got - ref)
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(got, ref, dtype, what=""):
    err = rel_err(got, ref)
    tol = TOLERANCE[dtype_name(dtype)]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} ({dtype_name(dtype)})"
    return err


def rounded(x, dtype):
    """``x`` rounded to ``dtype`` and back to float64: the exact inputs a
    reduced-precision kernel sees, so the reference is fed the same numbers."""
    return numpy.asarray(x).astype(dtype).astype(numpy.float64)
