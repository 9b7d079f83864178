"""Comparison helpers shared by the tests (docs/semantics.md §5.3)."""

import numpy

from cupydcn import _dispatch, _dtypes

# Relative-norm tolerances against the float64 reference (the dtype table's).
TOLERANCE = {row.name: row.tolerance for row in _dtypes.DTYPES.values()}
DTYPES = [row.dtype.type for row in _dtypes.DTYPES.values()]


def forward_tolerance(op, algorithm, dtype):
    """The tolerance of the forward of ``op``'s implementation ``algorithm``
    (None: the automatic choice) in ``dtype``: the dtype's own, or looser where
    the implementation is held to another dtype's (TF32: float16's), as
    ``cupydcn check`` holds it; gradients keep the dtype's own."""
    row = _dtypes.lookup(dtype)
    if algorithm is None:
        return row.tolerance
    return _dispatch.implementation(op, algorithm).forward_tolerance(row)


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


def assert_close(got, ref, dtype, what="", tol=None):
    """``got`` within ``dtype``'s tolerance (or ``tol``) of ``ref``, by relative norm."""
    err = rel_err(got, ref)
    tol = TOLERANCE[dtype_name(dtype)] if tol is None else tol
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} ({dtype_name(dtype)})"
    return err


def rounded(x, dtype):
    """``x`` rounded to ``dtype`` and back to float64: the exact inputs a
    reduced-precision kernel sees, so the reference is fed the same numbers."""
    return numpy.asarray(x).astype(dtype).astype(numpy.float64)


def spy_choices(monkeypatch):
    """The ``algorithm`` of every dispatcher choice from now on (a list that
    fills as calls are dispatched)."""
    seen = []
    choose = _dispatch.choose

    def spy(op, on_gpu, geo, algorithm=None, *args, **kwargs):
        seen.append(algorithm)
        return choose(op, on_gpu, geo, algorithm, *args, **kwargs)

    monkeypatch.setattr(_dispatch, "choose", spy)
    return seen
