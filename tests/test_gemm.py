"""The im2col path's GEMMs (cupydcn/_gemm.py): storage-type columns, float32
accumulation of half products, results written in place, no silent TF32, the
cached workspace; and mutations of the layouts that a test must catch."""

import threading

import numpy
import pytest

import cupydcn
from cupydcn import _config, _deform_conv, _dtypes, _gemm, _kernels
from helpers import DTYPES, dtype_name, rel_err
from test_deform_conv import CASES, compare_all, make_case, reference_results, run_kernels


def _views(dtype, rng):
    """Operands as the kernel paths make them: a transposed view broadcast over
    the batch (stride 0), a matrix batch with row stride > columns, and a
    result with row stride > columns."""
    weight = rng.standard_normal((5, 7)).astype(dtype)           # (M=5, K=7) stored
    a = _gemm.strided(numpy, weight, 0, (3, 7, 5), (0, 1, 7))     # weight^T: (n, M=7, K=5)
    bbuf = rng.standard_normal((5, 40)).astype(dtype)
    b = _gemm.strided(numpy, bbuf, 2, (3, 5, 6), (11, 40, 1))     # (n, K=5, N=6), ld 40
    return a, b


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("out_acc", [False, True])
def test_host_gemm_strided_views_in_place(dtype, accumulate, out_acc):
    rng = numpy.random.default_rng(1)
    a, b = _views(dtype, rng)
    row = _dtypes.lookup(dtype)
    out_dtype = row.acc if out_acc else row.dtype
    cbuf = rng.standard_normal((3 * 7 * 9,)).astype(out_dtype)
    before = cbuf.copy()
    c = _gemm.strided(numpy, cbuf, 0, (3, 7, 6), (63, 9, 1))
    _gemm.gemm(numpy, a, b, c, accumulate=accumulate)
    expected = numpy.matmul(a.astype(numpy.float64), b.astype(numpy.float64))
    if accumulate:
        expected += _gemm.strided(numpy, before, 0, (3, 7, 6), (63, 9, 1)).astype(numpy.float64)
    assert rel_err(c, expected) <= row.tolerance / 10
    untouched = numpy.ones(cbuf.shape, bool)
    _gemm.strided(numpy, untouched, 0, (3, 7, 6), (63, 9, 1))[...] = False
    assert numpy.array_equal(cbuf[untouched], before[untouched]), "written outside the view"


@pytest.mark.parametrize("dtype", [numpy.float16, _dtypes.BFLOAT16], ids=dtype_name)
def test_half_products_accumulate_in_float32(dtype):
    """4096 ones: a float16 running sum stops at 2048 (bfloat16 at 256); float32 gives 4096."""
    a = numpy.ones((1, 1, 4096), dtype)
    b = numpy.ones((1, 4096, 1), dtype)
    c = numpy.zeros((1, 1, 1), dtype)
    _gemm.gemm(numpy, a, b, c)
    assert float(c[0, 0, 0]) == 4096.0


def _column_major_gemm(flat_a, flat_b, flat_c, args, offsets):
    """cublasGemmStridedBatchedEx over flat NumPy memory, as the documentation
    defines it (column-major, op N or T), float64."""
    transa, transb, m, n, k, lda, sa, ldb, sb, ldc, sc, batch = args
    oa, ob, oc = offsets
    for i in range(batch):
        def operand(flat, off, op, rows, cols, ld, stride):
            if op == _gemm._OP_N:   # stored (rows x cols), column-major
                r, c = numpy.meshgrid(numpy.arange(rows), numpy.arange(cols), indexing="ij")
                return flat[off + i * stride + r + c * ld].astype(numpy.float64)
            r, c = numpy.meshgrid(numpy.arange(cols), numpy.arange(rows), indexing="ij")
            return flat[off + i * stride + r + c * ld].astype(numpy.float64).T
        A = operand(flat_a, oa, transa, m, k, lda, sa)
        B = operand(flat_b, ob, transb, k, n, ldb, sb)
        r, c = numpy.meshgrid(numpy.arange(m), numpy.arange(n), indexing="ij")
        flat_c[oc + i * sc + r + c * ldc] = A @ B


def _offset(view, base):
    return (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) \
        // base.itemsize


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:])
@pytest.mark.parametrize("limit", [None, 1])
def test_cublas_arguments_give_the_kernel_paths_products(case, limit):
    """The arguments the CuPy path passes to cuBLAS, run by a column-major
    emulation, give every product of forward and backward (several images per
    tile, and rows of one image): the layouts are checked without a GPU."""
    typed, _, params = make_case(case, numpy.float64)
    from cupydcn import _validation
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    previous = cupydcn.set_workspace_limit(limit or 2**30)
    try:
        plan = _deform_conv.tiles(geo)
    finally:
        cupydcn.set_workspace_limit(previous)
    rng = numpy.random.default_rng(0)
    weight = numpy.ascontiguousarray(typed["weight"])
    grad_output = typed["grad_output"]
    for tile in plan:
        ncols = tile.out_rows * geo.Wo
        columns = rng.standard_normal((geo.C * geo.kh * geo.kw, ncols))
        for g in range(geo.groups):
            for name, (a, a_base), (b, b_base) in (
                    ("forward", (_deform_conv._weight_matrices(numpy, geo, weight, g, tile.nb),
                                 weight),
                     (_deform_conv._column_matrices(numpy, geo, columns, g, tile), columns)),
                    ("grad_columns",
                     (_deform_conv._weight_matrices(numpy, geo, weight, g, tile.nb, True),
                      weight),
                     (_deform_conv._image_matrices(numpy, geo, grad_output, g, tile),
                      grad_output))):
                if name == "forward":
                    c_base = numpy.zeros(grad_output.shape)
                    c = _deform_conv._image_matrices(numpy, geo, c_base, g, tile)
                else:
                    c_base = numpy.zeros(columns.shape)
                    c = _deform_conv._column_matrices(numpy, geo, c_base, g, tile)
                args = _gemm.cublas_arguments(a, b, c)
                assert args is not None, name
                got = numpy.zeros(c_base.size)
                _column_major_gemm(b_base.reshape(-1), a_base.reshape(-1), got, args,
                                   (_offset(b, b_base), _offset(a, a_base), _offset(c, c_base)))
                _gemm.gemm(numpy, a, b, c)
                assert numpy.allclose(got, c_base.reshape(-1), rtol=1e-12, atol=1e-12), name


def test_compute_types_never_tf32_by_default(monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")  # CuPy's switch: cupydcn's GEMMs ignore it
    assert not cupydcn.get_tf32()
    assert _gemm.compute_type(numpy.float32) == _gemm.COMPUTE_32F_PEDANTIC
    assert _gemm.compute_type(numpy.float16) == _gemm.COMPUTE_32F
    assert _gemm.compute_type(_dtypes.BFLOAT16) == _gemm.COMPUTE_32F
    assert _gemm.compute_type(numpy.float64) == _gemm.COMPUTE_64F
    previous = cupydcn.set_tf32(True)
    try:
        assert _gemm.compute_type(numpy.float32) == _gemm.COMPUTE_32F_FAST_TF32
        assert _gemm.compute_type(numpy.float16) == _gemm.COMPUTE_32F
        assert _gemm.compute_type(numpy.float64) == _gemm.COMPUTE_64F
    finally:
        assert cupydcn.set_tf32(previous) is True
    assert not cupydcn.get_tf32()


def test_set_tf32_rejects_non_bools():
    with pytest.raises(cupydcn.ArgumentTypeError, match="enabled must be a bool, got 1"):
        cupydcn.set_tf32(1)


def test_to_tf32_rounds_to_ten_mantissa_bits():
    x = numpy.array([1 + 2**-11, 1 + 2**-12, 1 + 3 * 2**-11, -(1 + 2**-11), numpy.inf,
                     numpy.nan], numpy.float32)
    got = _gemm.to_tf32(x)
    assert list(got[:4]) == [1 + 2**-10, 1.0, 1 + 2**-9, -(1 + 2**-10)]
    assert got[4] == numpy.inf and numpy.isnan(got[5])


def test_tf32_only_when_opted_in(host):
    """float32 meets 1e-5 by default; the same call with set_tf32(True) does not
    (TF32's 10-bit products), but stays within 1e-3: the switch is real and off."""
    typed, exact, params = make_case((2, 16, 9, 9, 8, 3, 3, 1, 1, (1, 1), (1, 1), (1, 1),
                                      True, True), numpy.float32, seed=3)
    ref_out, _ = reference_results(exact, params)
    out, _ = run_kernels(host, typed, params, wrt=())
    assert rel_err(out, ref_out) <= 1e-5
    previous = cupydcn.set_tf32(True)
    try:
        tf32_out, _ = run_kernels(host, typed, params, wrt=())
    finally:
        cupydcn.set_tf32(previous)
    assert 1e-5 < rel_err(tf32_out, ref_out) <= 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_columns_and_gemms_in_the_storage_type(host, monkeypatch, dtype):
    """Forward: columns and weight of the storage type multiplied into the
    output of the storage type; backward: the columns' gradient and the weight
    gradient in the accumulation type, from storage-type operands."""
    calls = []
    real = _gemm.gemm

    def record(xp, a, b, c, accumulate=False):
        calls.append((a.dtype, b.dtype, c.dtype))
        return real(xp, a, b, c, accumulate)

    monkeypatch.setattr(_gemm, "gemm", record)
    row = _dtypes.lookup(dtype)
    typed, exact, params = make_case(CASES[0], dtype)
    ref_out, ref_grads = reference_results(exact, params)
    out, grads = run_kernels(host, typed, params)
    compare_all(out, grads, ref_out, ref_grads, dtype)
    storage, acc = row.dtype, row.acc
    assert calls[0] == (storage, storage, storage)                 # forward
    assert (storage, storage, acc) in calls[1:]                     # columns' gradient
    assert all(c[:2] == (storage, storage) for c in calls)


def test_workspace_is_reused_bounded_and_per_thread(monkeypatch):
    _config.clear_workspace()
    monkeypatch.setattr(_config, "_workspace_limit", 4096)
    first = _config.workspace(numpy, (10, 20), numpy.float32)
    again = _config.workspace(numpy, (5, 4), numpy.float16)
    assert again.base is not None and numpy.shares_memory(first, again)
    bigger = _config.workspace(numpy, (100, 20), numpy.float32)    # 8000 B > the limit
    assert bigger.shape == (100, 20) and not numpy.shares_memory(first, bigger)
    small = _config.workspace(numpy, (4,), numpy.float64)           # shrinks to the limit
    assert not numpy.shares_memory(bigger, small)
    assert _config._local.buffers[("numpy",)].size <= 4096
    seen = []
    thread = threading.Thread(target=lambda: seen.append(
        _config.workspace(numpy, (4,), numpy.float64)))
    thread.start()
    thread.join()
    assert not numpy.shares_memory(seen[0], _config.workspace(numpy, (4,), numpy.float64))
    _config.clear_workspace()


def test_workspace_is_poisoned_in_tests(monkeypatch):
    monkeypatch.setattr(_config, "poison", True)
    assert numpy.isnan(_config.workspace(numpy, (3, 3), numpy.float32)).all()


def test_repeated_calls_reuse_the_workspace_and_agree(host):
    typed, exact, params = make_case(CASES[1], numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    for _ in range(2):
        out, grads = run_kernels(host, typed, params)
        compare_all(out, grads, ref_out, ref_grads, numpy.float64)


# ------------------------------------------------------------------ mutations

def _wrong_image_matrices(xp, geo, array, g, tile):
    """A plausible layout bug: the row stride of the tile (nrows*Wo) instead of
    the image's (Ho*Wo)."""
    cg, _ = _deform_conv._group_sizes(geo)
    plane = geo.Ho * geo.Wo
    return _gemm.strided(xp, array, (tile.b0 * geo.Cout + g * cg) * plane + tile.oy0 * geo.Wo,
                         (tile.nb, cg, tile.nrows * geo.Wo),
                         (geo.Cout * plane, tile.nrows * geo.Wo, 1))


def _wrong_column_matrices(xp, geo, columns, g, tile):
    """A plausible layout bug: images of a tile one after another in the
    columns' rows (a batch stride of a whole group's block)."""
    _, k = _deform_conv._group_sizes(geo)
    pixels, ncols = tile.nrows * geo.Wo, tile.out_rows * geo.Wo
    return _gemm.strided(xp, columns, g * k * ncols, (tile.nb, k, pixels), (0, ncols, 1))


@pytest.mark.parametrize("mutation, limit", [
    (("_image_matrices", _wrong_image_matrices), 300),     # row tiles: Ho*Wo matters
    (("_column_matrices", _wrong_column_matrices), None),  # several images per tile
])
def test_a_wrong_gemm_layout_fails(host, monkeypatch, mutation, limit):
    typed, exact, params = make_case(CASES[1], numpy.float64)
    ref_out, _ = reference_results(exact, params)
    if limit:
        monkeypatch.setattr(_config, "_workspace_limit", limit)
    out, _ = run_kernels(host, typed, params, wrt=())
    assert rel_err(out, ref_out) < 1e-12
    monkeypatch.setattr(_deform_conv, *mutation)
    out, _ = run_kernels(host, typed, params, wrt=())
    assert rel_err(out, ref_out) > 1e-3


def test_a_wrong_column_index_in_im2col_fails(host):
    """The columns' layout in the kernel: image-major within a tile."""
    text = _kernels.source("deform_conv")
    wrong = text.replace("const I col = (bi * nrows + r) * Wo + ox;",
                         "const I col = (r * nb + bi) * Wo + ox;", 1)
    assert wrong != text
    typed, exact, params = make_case(CASES[1], numpy.float64)
    ref_out, _ = reference_results(exact, params)
    broken = _kernels.HostBackend(grid=3, block=5, checks=True, workers=1,
                                  sources={"deform_conv": wrong})
    out, _ = run_kernels(broken, typed, params, wrt=())
    assert rel_err(out, ref_out) > 1e-3


# ------------------------------------------------------------------ GPU tier

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("accumulate", [False, True])
def test_cublas_gemm_matches_the_host_emulation(gpu, dtype, accumulate):
    """The same strided views on CuPy arrays: cuBLAS gives the host's numbers
    within the dtype's tolerance, and writes only inside the view."""
    import cupy

    rng = numpy.random.default_rng(2)
    row = _dtypes.lookup(dtype)
    weight = rng.standard_normal((5, 7)).astype(dtype)
    bbuf = rng.standard_normal((5, 40)).astype(dtype)
    for out_dtype in (row.dtype, row.acc):
        cbuf = rng.standard_normal((3 * 7 * 9,)).astype(out_dtype)
        results = []
        for xp, cast in ((numpy, numpy.array), (cupy, cupy.asarray)):
            w, b, c = cast(weight), cast(bbuf), cast(cbuf)
            _gemm.gemm(xp, _gemm.strided(xp, w, 0, (3, 7, 5), (0, 1, 7)),
                       _gemm.strided(xp, b, 2, (3, 5, 6), (11, 40, 1)),
                       _gemm.strided(xp, c, 0, (3, 7, 6), (63, 9, 1)), accumulate=accumulate)
            results.append(c.get() if xp is cupy else c)
        assert rel_err(results[1], results[0]) <= row.tolerance / 10


@pytest.mark.gpu
def test_cublas_float32_ignores_cupy_tf32(gpu):
    """With CuPy's TF32 switched on, cupydcn's float32 GEMM stays IEEE float32
    (1e-5 on a long sum where TF32 is off by ~4e-4); set_tf32 changes it."""
    import cupy
    from cupy._core import _routines_linalg as linalg

    rng = numpy.random.default_rng(3)
    a = rng.standard_normal((1, 64, 4096)).astype(numpy.float32)
    b = rng.standard_normal((1, 4096, 64)).astype(numpy.float32)
    exact = numpy.matmul(a.astype(numpy.float64), b.astype(numpy.float64))
    previous = linalg.get_compute_type(numpy.float32)
    linalg.set_compute_type(numpy.float32, linalg.COMPUTE_TYPE_TF32)
    try:
        errors = []
        for tf32 in (False, True):
            before = cupydcn.set_tf32(tf32)
            try:
                c = cupy.empty((1, 64, 64), numpy.float32)
                _gemm.gemm(cupy, cupy.asarray(a), cupy.asarray(b), c)
            finally:
                cupydcn.set_tf32(before)
            errors.append(rel_err(c, exact))
    finally:
        linalg.set_compute_type(numpy.float32, previous)
    assert errors[0] <= 1e-5, errors
    assert errors[1] > 1e-4, errors
