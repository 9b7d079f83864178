"""The one GEMM of the kernel paths: batched products of strided matrices,
written in place, in the storage type with float32 accumulation.

``gemm(xp, a, b, c, accumulate)`` computes ``c[i] = a[i] @ b[i]`` (plus
``c[i]`` when ``accumulate``) for 3-D views ``a`` (n, M, K), ``b`` (n, K, N)
and ``c`` (n, M, N) of C-contiguous buffers, with any element strides a BLAS
can express: each matrix has unit stride along its rows or along its columns
(a transposed view), any batch stride (0 broadcasts one matrix over the batch).
So the deformable convolution multiplies its weight and columns straight into
the (B, Cout, Ho, Wo) output, reads ``grad_output`` where it lies and adds the
weight gradient in place: no ``astype``, transpose or copy pass.

Types (docs/semantics.md §5): ``a`` and ``b`` share the storage type; ``c``
is the storage type or the accumulation type (float32 for float16/bfloat16).
Products of float16/bfloat16 accumulate in float32 (cuBLAS
``CUBLAS_COMPUTE_32F``: tensor cores), float32 in IEEE float32
(``CUBLAS_COMPUTE_32F_PEDANTIC``, which no math mode or ``CUPY_TF32`` turns into
TF32) unless :func:`cupydcn.set_tf32` opted in (``CUBLAS_COMPUTE_32F_FAST_TF32``),
float64 in float64. The result, with the ``c`` it adds, is rounded once to
``c``'s type.

On CuPy arrays the product is one ``cublasGemmStridedBatchedEx`` on the
current stream (CuPy's own ``matmul`` has no bfloat16 and follows CuPy's
process-wide TF32 setting). On NumPy arrays (the host backend) it is emulated:
the operands upcast to the accumulation type (TF32 rounding applied when opted
in), ``numpy.matmul``, one rounding to ``c``'s type: the hardware's result up
to the order of the sums.
"""

from __future__ import annotations

import numpy

from cupydcn import _config, _dtypes, _validation

# cudaDataType_t and cublasComputeType_t (library_types.h, cublas_api.h).
_CUDA_R_32F, _CUDA_R_64F, _CUDA_R_16F, _CUDA_R_16BF = 0, 1, 2, 14
COMPUTE_32F, COMPUTE_32F_PEDANTIC, COMPUTE_64F, COMPUTE_32F_FAST_TF32 = 68, 69, 70, 77
_OP_N, _OP_T = 0, 1
_POINTER_MODE_HOST = 0
_GEMM_DEFAULT = -1


def _cuda_type(dtype):
    dtype = numpy.dtype(dtype)
    if dtype == numpy.float16:
        return _CUDA_R_16F
    if dtype == _dtypes.BFLOAT16:
        return _CUDA_R_16BF
    if dtype == numpy.float32:
        return _CUDA_R_32F
    if dtype == numpy.float64:
        return _CUDA_R_64F
    raise _validation.ArgumentTypeError(f"gemm: no cuBLAS type for {dtype}")


def compute_type(dtype, tf32=None):
    """The cuBLAS compute type for operands of ``dtype``: float32 accumulation
    for the half types, IEEE float32 for float32 unless ``tf32`` (default: the
    :func:`cupydcn.set_tf32` setting), float64 for float64."""
    dtype = numpy.dtype(dtype)
    if tf32 is None:
        tf32 = _config.get_tf32()
    if dtype == numpy.float64:
        return COMPUTE_64F
    if dtype == numpy.float32:
        return COMPUTE_32F_FAST_TF32 if tf32 else COMPUTE_32F_PEDANTIC
    return COMPUTE_32F


def strided(xp, array, offset, shape, strides):
    """A view of C-contiguous ``array`` from element ``offset`` with ``shape``
    and element ``strides`` (never a copy: the GEMM writes through it)."""
    assert array.flags.c_contiguous
    flat = array.reshape(-1)
    itemsize = array.dtype.itemsize
    return xp.lib.stride_tricks.as_strided(flat[offset:], shape,
                                           tuple(s * itemsize for s in strides))


def gemm(xp, a, b, c, accumulate=False):
    """``c[i] (+)= a[i] @ b[i]`` over the batch (see the module docstring)."""
    n, m, k = a.shape
    assert b.shape == (n, k, c.shape[2]) and c.shape == (n, m, c.shape[2]), (a.shape, b.shape,
                                                                             c.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    if c.size == 0:
        return
    if xp is numpy:
        _host_gemm(a, b, c, accumulate)
    else:
        _cublas_gemm(xp, a, b, c, accumulate)


def to_tf32(x):
    """float32 ``x`` rounded to TF32 (10 mantissa bits, to nearest, ties away
    from zero: ``cvt.rna.tf32.f32``); inf and NaN kept."""
    bits = numpy.ascontiguousarray(x, numpy.float32).view(numpy.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = numpy.where(finite, (bits + numpy.uint32(0x1000)) & numpy.uint32(0xFFFFE000), bits)
    return rounded.astype(numpy.uint32).view(numpy.float32)


def _host_gemm(a, b, c, accumulate):
    acc = numpy.float64 if a.dtype == numpy.float64 else numpy.float32
    if acc == numpy.float32 and a.dtype == numpy.float32 and _config.get_tf32():
        a, b = to_tf32(a), to_tf32(b)
    a, b = a.astype(acc, copy=False), b.astype(acc, copy=False)  # the half types upcast
    if c.dtype == acc and not accumulate:
        numpy.matmul(a, b, out=c)
        return
    result = numpy.matmul(a, b)
    if accumulate:
        result += c
    c[...] = result


def _layout(x):
    """(op, ld) of matrix batch ``x`` (n, rows, cols) as cuBLAS's column-major
    operand ``x^T``: op N for unit column stride (row-major), T for unit row
    stride (a transposed view); None when neither (the caller copies)."""
    _, rows, cols = x.shape
    item = x.dtype.itemsize
    s_rows, s_cols = x.strides[1] // item, x.strides[2] // item
    if s_cols == 1 or cols == 1:
        ld = s_rows if rows > 1 else max(1, cols)
        if ld >= max(1, cols):
            return _OP_N, ld
    if s_rows == 1 or rows == 1:
        ld = s_cols if cols > 1 else max(1, rows)
        if ld >= max(1, rows):
            return _OP_T, ld
    return None


def cublas_arguments(a, b, c):
    """The row-major product as column-major cuBLAS arguments:
    ``c^T = b^T a^T``. Returns (transa, transb, m, n, k, lda, stride_a, ldb,
    stride_b, ldc, stride_c, batch) for the call with A = ``b``'s data and
    B = ``a``'s data (element strides); None where an operand needs a copy."""
    batch, m_rows, k = a.shape
    n_cols = c.shape[2]
    la, lb = _layout(a), _layout(b)
    lc = _layout(c)
    if la is None or lb is None or lc is None or lc[0] != _OP_N:
        return None
    stride = lambda x: x.strides[0] // x.dtype.itemsize if x.shape[0] > 1 else 0  # noqa: E731
    return (lb[0], la[0], n_cols, m_rows, k, lb[1], stride(b), la[1], stride(a), lc[1],
            stride(c), batch)


def _cublas_gemm(xp, a, b, c, accumulate):
    from cupy_backends.cuda.libs import cublas

    args = cublas_arguments(a, b, c)
    if args is None:  # not reached by the kernel paths: every operand is expressible
        if _layout(a) is None:
            a = xp.ascontiguousarray(a)
        if _layout(b) is None:
            b = xp.ascontiguousarray(b)
        if _layout(c) is None or _layout(c)[0] != _OP_N:
            raise _validation.ArgumentError(
                f"gemm: c must have unit column stride, got strides {c.strides}")
        args = cublas_arguments(a, b, c)
    transa, transb, m, n, k, lda, stride_a, ldb, stride_b, ldc, stride_c, batch = args
    if max(m, n, k, lda, ldb, ldc, batch) > _dtypes.INT32_LIMIT:
        raise _validation.ArgumentError(
            f"gemm: a dimension passes cuBLAS's int range (m={m}, n={n}, k={k}, lda={lda}, "
            f"ldb={ldb}, ldc={ldc}, batch={batch}); lower the workspace limit")
    compute = compute_type(a.dtype)
    scale = numpy.float64 if compute == COMPUTE_64F else numpy.float32
    alpha = numpy.ones((), scale)
    beta = numpy.array(1 if accumulate else 0, scale)
    handle = xp.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, _POINTER_MODE_HOST)  # alpha, beta: host scalars
    cublas.gemmStridedBatchedEx(
        handle, transa, transb, m, n, k, alpha.ctypes.data,
        b.data.ptr, _cuda_type(b.dtype), lda, stride_a,
        a.data.ptr, _cuda_type(a.dtype), ldb, stride_b,
        beta.ctypes.data, c.data.ptr, _cuda_type(c.dtype), ldc, stride_c,
        batch, compute, _GEMM_DEFAULT)
