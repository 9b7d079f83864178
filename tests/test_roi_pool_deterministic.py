"""The deterministic backwards of deform_roi_pool and deform_psroi_pool
(``deterministic=True``: no floating-point atomics) on the CPU.

They are held to the float64 reference and must give the same bits on every
host grid and index width (the workspace limit, which fixes the chunks,
held); the scatter's bits do depend on the grid (the check has teeth), the
chunks cover every bin, bad values stay finite, and wrong gathers fail.
"""

import numpy
import pytest

import cupydcn
from cupydcn import _config, _dtypes, _kernels, _roi_pool
from helpers import DTYPES, dtype_name, rel_err
from roi_cases import (
    GRIDS, PS_CASES, ROI_CASES, PSCase, RoICase, assert_all_finite, assert_bit_identical,
    compare, make_ps_case, make_roi_case, ps_params, ps_reference, ps_run, roi_params,
    roi_reference, roi_run, typed_and_exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", ROI_CASES, ids=lambda c: c.name)
def test_host_roi_deterministic_matches_reference_on_every_grid(case, dtype):
    """Every RoI kind (inside, partly and wholly outside, degenerate), adaptive
    and fixed grids, offsets, masks, and the bad rows (NaN/inf/1e30
    coordinates, invalid batch indices, a NaN offset, an inf mask): the
    deterministic gradients equal the reference and are the same bits on
    every grid."""
    typed, exact = typed_and_exact(make_roi_case(case), dtype)
    ref_out, ref_grads = roi_reference(exact, case)
    runs = [roi_run(_kernels.HostBackend(grid=g, block=b), typed, case, deterministic=True)
            for g, b in GRIDS]
    assert_bit_identical(runs, case.name)
    out, grads = runs[0]
    compare(out, grads, ref_out, ref_grads, dtype, "deform_roi_pool deterministic")
    assert_all_finite(grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", PS_CASES, ids=lambda c: c.name)
def test_host_psroi_deterministic_matches_reference_on_every_grid(case, dtype):
    """No trans and 1 or 2 classes, part_size < pooled_size, group_size 1-3,
    skipped and clamped samples, rounded and tiny RoIs, the bad rows: both
    deterministic gradients equal the reference and are the same bits on every
    grid, with the count passed or recomputed."""
    typed, exact = typed_and_exact(make_ps_case(case), dtype)
    ref_out, ref_count, ref_grads = ps_reference(exact, case)
    runs = [ps_run(_kernels.HostBackend(grid=g, block=b), typed, case, deterministic=True)
            for g, b in GRIDS]
    assert_bit_identical(runs, case.name)
    out, count, grads = runs[0]
    numpy.testing.assert_array_equal(count, ref_count)
    compare(out, grads, ref_out, ref_grads, dtype, "deform_psroi_pool deterministic")
    assert_all_finite(grads)
    _, _, recomputed = ps_run(_kernels.HostBackend(grid=2, block=7), typed, case,
                              pass_count=False, deterministic=True)
    assert_bit_identical([grads, recomputed], f"{case.name} (count recomputed)")


def test_host_scatter_bits_depend_on_the_grid():
    """The check above has teeth: the atomic scatter's float32 sums do change
    with the host grid (its order of additions does)."""
    case = ROI_CASES[0]
    typed, _ = typed_and_exact(make_roi_case(case), numpy.float32)
    runs = [roi_run(_kernels.HostBackend(grid=g, block=b), typed, case, wrt=("input",))[1].input
            for g, b in GRIDS]
    assert not numpy.array_equal(runs[0], runs[1])
    ps = PS_CASES[2]
    typed, _ = typed_and_exact(make_ps_case(ps), numpy.float32)
    runs = [ps_run(_kernels.HostBackend(grid=g, block=b), typed, ps)[2] for g, b in GRIDS]
    assert not numpy.array_equal(runs[0].input, runs[1].input)
    assert not numpy.array_equal(runs[0].trans, runs[1].trans)


@pytest.mark.parametrize("op", ["roi", "psroi"])
def test_host_deterministic_64bit_indices_same_bits(host, op, monkeypatch):
    """The 64-bit instantiation sums in the same order: the same bits."""
    case = ROI_CASES[5] if op == "roi" else PS_CASES[4]
    make, runner = (make_roi_case, roi_run) if op == "roi" else (make_ps_case, ps_run)
    typed, _ = typed_and_exact(make(case), numpy.float32)

    def run():
        return runner(host, typed, case, deterministic=True)

    narrow = run()
    monkeypatch.setattr(_dtypes, "INT32_LIMIT", 0)
    assert_bit_identical([narrow, run()], op)


@pytest.mark.parametrize("limit", [1, 7 * _roi_pool.SAMPLE_BYTES, 100 * _roi_pool.SAMPLE_BYTES])
def test_host_deterministic_chunks_bounded_by_workspace(host, limit, monkeypatch):
    """Small workspace limits split the samples into chunks of bins (one bin
    each at limit 1); the result still matches the reference and does not
    depend on the grid."""
    chunks = {}
    for name in ("_counted_chunks", "_fixed_chunks"):
        original = getattr(_roi_pool, name)

        def spy(*args, _original=original, _name=name):
            result = _original(*args)
            chunks.setdefault(_name, []).append(result)
            return result

        monkeypatch.setattr(_roi_pool, name, spy)
    previous = cupydcn.set_workspace_limit(limit)
    try:
        case = ROI_CASES[4]
        typed, exact = typed_and_exact(make_roi_case(case), numpy.float64)
        ref_out, ref_grads = roi_reference(exact, case)
        runs = [roi_run(_kernels.HostBackend(grid=g, block=b), typed, case, deterministic=True)
                for g, b in GRIDS[:2]]
        assert_bit_identical(runs, "roi")
        compare(*runs[0], ref_out, ref_grads, numpy.float64, "deform_roi_pool chunked")
        ps = PS_CASES[3]
        typed, exact = typed_and_exact(make_ps_case(ps), numpy.float64)
        ref_out, _, ref_grads = ps_reference(exact, ps)
        runs = [ps_run(_kernels.HostBackend(grid=g, block=b), typed, ps, deterministic=True)
                for g, b in GRIDS[:2]]
        assert_bit_identical(runs, "psroi")
        out, _, grads = runs[0]
        compare(out, grads, ref_out, ref_grads, numpy.float64, "deform_psroi_pool chunked")
    finally:
        cupydcn.set_workspace_limit(previous)
    cap = max(1, limit // _roi_pool.SAMPLE_BYTES)
    for name, calls in chunks.items():
        for chunk_list in calls:
            assert len(chunk_list) > 1, name
            for k0, k1, samples in chunk_list:
                assert samples <= cap or k1 - k0 == 1, (name, k0, k1, samples)


def test_sample_chunks_cover_every_bin_in_order(monkeypatch):
    counts = numpy.array([0, 3, 0, 0, 5, 1, 1, 1, 0, 9, 2, 0])
    first = numpy.concatenate([[0], numpy.cumsum(counts)]).astype(numpy.int64)
    monkeypatch.setattr(_config, "_workspace_limit", 4 * _roi_pool.SAMPLE_BYTES)
    chunks = _roi_pool._counted_chunks(first, 10)
    assert chunks == [(0, 4, 3), (4, 5, 5), (5, 9, 3), (9, 10, 9), (10, 12, 2)]
    assert _roi_pool._fixed_chunks(5, 3, 10) == [(0, 1, 3), (1, 2, 3), (2, 3, 3), (3, 4, 3),
                                                 (4, 5, 3)]
    monkeypatch.setattr(_config, "_workspace_limit", 2**40)
    assert _roi_pool._counted_chunks(first, 10) == [(0, 12, 22)]
    assert _roi_pool._counted_chunks(numpy.zeros(4, numpy.int64), 10) == []
    assert _roi_pool._fixed_chunks(5, 3, 10) == [(0, 5, 15)]
    assert _roi_pool._fixed_chunks(0, 3, 10) == []
    # keys cell*samples + s must fit an int64: the cap shrinks, and a single
    # bin too large for it is refused instead of wrapping around
    cells = 2**62
    assert _roi_pool._counted_chunks(numpy.array([0, 1, 2], numpy.int64), cells) == [
        (0, 1, 1), (1, 2, 1)]
    with pytest.raises(ValueError, match="overflow the int64 sort keys"):
        _roi_pool._counted_chunks(numpy.array([0, 2], numpy.int64), cells)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=dtype_name)
def test_host_deterministic_bad_values_stay_finite(host, dtype):
    """NaN, +-inf and huge values in RoIs, offsets, masks and trans, invalid
    batch indices: the deterministic gradients are finite and agree with the
    scatter's."""
    rng = numpy.random.default_rng(7)
    bad = (numpy.nan, numpy.inf, -numpy.inf, 1e30, -1e30, 3e9, -3e9)

    def spoil(array, fraction):
        flat = array.reshape(-1)
        where = rng.random(flat.size) < fraction
        flat[where] = rng.choice(bad, int(where.sum()))
        return array

    rois = rng.uniform(-5, 15, (12, 5))
    rois[:, 0] = [0, 1, 2, -1, numpy.nan, numpy.inf, 1e30, 0, 1, 0, 1, 0]
    spoil(rois[:, 1:], 0.2)
    arrays = {"input": rng.standard_normal((2, 3, 9, 11)), "rois": rois,
              "offset": spoil(rng.uniform(-1, 1, (12, 2, 3, 3)), 0.2),
              "mask": spoil(rng.uniform(0, 1, (12, 1, 3, 3)), 0.1),
              "grad_output": rng.standard_normal((12, 3, 3, 3))}
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == numpy.float32 else dict(rtol=1e-12, atol=1e-13)
    for sampling_ratio in (0, 2):
        case = RoICase("bad", 2, 3, 9, 11, (3, 3), 0.5, sampling_ratio, True, True)
        with numpy.errstate(over="ignore"):
            typed = {k: v.astype(dtype) for k, v in arrays.items()}
        _, grads = roi_run(host, typed, case, deterministic=True)
        _, scatter = roi_run(host, typed, case)
        assert_all_finite(grads)
        for name in _roi_pool.ROI_GRADIENTS:
            numpy.testing.assert_allclose(getattr(grads, name), getattr(scatter, name), **tol)
    ps_arrays = {"input": rng.standard_normal((2, 8, 9, 11)), "rois": rois,
                 "trans": spoil(rng.uniform(-1, 1, (12, 4, 2, 2)), 0.2),
                 "grad_output": rng.standard_normal((12, 2, 3, 3))}
    case = PSCase("bad", 2, 9, 11, 2, 2, 3, 2, 2, 2, 0.5)
    with numpy.errstate(over="ignore"):
        typed = {k: v.astype(dtype) for k, v in ps_arrays.items()}
    _, _, grads = ps_run(host, typed, case, deterministic=True)
    _, _, scatter = ps_run(host, typed, case)
    assert_all_finite(grads)
    for name in _roi_pool.PSROI_GRADIENTS:
        numpy.testing.assert_allclose(getattr(grads, name), getattr(scatter, name), **tol)


@pytest.mark.parametrize("file, old, new", [
    ("deform_roi_pool", "if (q.i01 == p) sum += q.hy * q.lx * grad;",
     "if (q.i01 == p) sum += q.hy * q.hx * grad;"),
    ("deform_roi_pool", "for (I y0 = yy - 1; y0 <= yy; ++y0) {", "for (I y0 = yy; y0 <= yy; ++y0) {"),
    ("deform_psroi_pool", "if (q.i10 == p) sum += ((A)1 - dx) * dy * diff;",
     "if (q.i10 == p) sum += ((A)1 - dy) * dy * diff;"),
    ("deform_psroi_pool", "if (px * part_size / pooled != part_x) continue;",
     "if (px * part_size / pooled != part_y) continue;"),
])
def test_host_deterministic_wrong_kernel_fails(file, old, new):
    """The deterministic tests catch a bug in the gathers (a weight, a missed
    cell, the wrong bins of a part cell)."""
    text = _kernels.source(file)
    wrong = text.replace(old, new, 1)
    assert wrong != text
    backend = _kernels.HostBackend(sources={file: wrong})
    if file == "deform_roi_pool":
        case = ROI_CASES[0]
        typed, exact = typed_and_exact(make_roi_case(case), numpy.float64)
        _, ref_grads = roi_reference(exact, case)
        _, grads = roi_run(backend, typed, case, deterministic=True)
        errors = [rel_err(grads.input, ref_grads.input)]
    else:
        case = PS_CASES[4]
        typed, exact = typed_and_exact(make_ps_case(case), numpy.float64)
        _, _, ref_grads = ps_reference(exact, case)
        _, _, grads = ps_run(backend, typed, case, deterministic=True)
        errors = [rel_err(grads.input, ref_grads.input), rel_err(grads.trans, ref_grads.trans)]
    assert max(errors) > 1e-3


@pytest.fixture
def reference_cpu_backend():
    """NumPy arrays run the NumPy reference for the test (restored after)."""
    previous = cupydcn.set_cpu_backend("reference")
    yield
    cupydcn.set_cpu_backend(previous)


def test_deterministic_public_api_numpy_and_wrt(host, reference_cpu_backend):
    """The keyword on the public API: NumPy inputs run the (deterministic)
    reference when it is the CPU backend; ``wrt`` still selects what is
    computed. (On the host backend the two calls run different
    implementations: test_implementations.py holds those to the reference.)"""
    case = ROI_CASES[5]
    typed, _ = typed_and_exact(make_roi_case(case, specials=False), numpy.float64)
    kwargs = dict(mask=typed["mask"], **roi_params(case))
    args = (typed["grad_output"], typed["input"], typed["rois"], typed["offset"])
    plain = cupydcn.deform_roi_pool_backward(*args, **kwargs)
    det = cupydcn.deform_roi_pool_backward(*args, deterministic=True, **kwargs)
    assert_bit_identical([plain, det], "numpy deform_roi_pool_backward")
    only = cupydcn.deform_roi_pool_backward(*args, wrt=("input",), deterministic=True, **kwargs)
    assert only.offset is None and only.mask is None
    ps = PS_CASES[3]
    typed, _ = typed_and_exact(make_ps_case(ps, specials=False), numpy.float64)
    args = (typed["grad_output"], typed["input"], typed["rois"], typed["trans"])
    plain = cupydcn.deform_psroi_pool_backward(*args, **ps_params(ps))
    det = cupydcn.deform_psroi_pool_backward(*args, deterministic=True, **ps_params(ps))
    assert_bit_identical([plain, det], "numpy deform_psroi_pool_backward")
    for wrt in (("input",), ("trans",)):
        _, _, grads = ps_run(host, typed, ps, wrt=wrt, deterministic=True)
        assert (grads.input is None) == ("input" not in wrt)
        assert (grads.trans is None) == ("trans" not in wrt)
