"""deform_psroi_pool and its backward: the kernel paths against the float64
reference on the CPU (CPU tier).

The kernel source compiled for the host (``host`` fixture) runs the kernel
paths on NumPy arrays, for every dtype, with and without trans, over skipped,
clamped and rounded samples, tiny RoIs, non-finite coordinates and invalid
batch indices; the count passed or recomputed, ``wrt``, finite differences of
the trans gradient, 64-bit indices, odd host grids and empty problems. Every
buffer a kernel must fill starts as NaN. The test data are described in
roi_cases.py.
"""

import numpy
import pytest

from cupydcn import _dtypes, _kernels, _roi_pool, reference
from helpers import DTYPES, assert_close, dtype_name, rel_err, to_numpy
from roi_cases import (
    PS_CASES, PS_KINDS, NoLaunch, PSCase, compare, make_ps_case, ps_positions, ps_reference,
    ps_run, typed_and_exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", PS_CASES, ids=lambda c: c.name)
def test_host_psroi_pool_matches_reference(host, case, dtype):
    typed, exact = typed_and_exact(make_ps_case(case), dtype)
    ref_out, ref_count, ref_grads = ps_reference(exact, case)
    out, count, grads = ps_run(host, typed, case)
    compare(out, grads, ref_out, ref_grads, dtype, "deform_psroi_pool")
    assert count.dtype == _dtypes.lookup(dtype).acc
    numpy.testing.assert_array_equal(count, ref_count)
    # special rows: NaN and inf coordinates, invalid batch indices count nothing;
    # the 1e30 row keeps its first sample column without trans, none with trans
    rows = len(PS_KINDS)
    void = [rows, rows + 1, *range(rows + 3, rows + 7)]
    assert not numpy.any(count[void]) and not numpy.any(to_numpy(out)[void])
    if grads.trans is not None:
        assert not numpy.any(count[rows + 2])
        assert not numpy.any(to_numpy(grads.trans)[rows:])
        assert count[0, -1, 0, 0] == 0 and to_numpy(out)[0, -1, 0, 0] == 0   # NaN trans bin


def test_ps_cases_reach_every_region():
    """Samples skipped, clamped ([-0.5, 0) and (W-1, W-0.5]) and inside;
    the part grid shared by several bins; C's rounding of .5."""
    for case in PS_CASES:
        arrays = make_ps_case(case, specials=False)
        ws = numpy.concatenate([ps_positions(roi, None if arrays["trans"] is None
                                             else arrays["trans"][r], case)[0].ravel()
                                for r, roi in enumerate(arrays["rois"])])
        assert numpy.any(ws < -0.5) and numpy.any(ws > case.W - 0.5), case.name
        assert numpy.any((ws >= -0.5) & (ws < 0)), case.name
        assert numpy.any((ws > case.W - 1) & (ws <= case.W - 0.5)), case.name
        assert numpy.any((ws > 0) & (ws < case.W - 1)), case.name
    assert reference._c_round(numpy.array([2.5, -2.5]))[0] == 3.0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_host_psroi_backward_recomputes_count(host, dtype):
    case = PS_CASES[3]
    typed, exact = typed_and_exact(make_ps_case(case), dtype)
    _, _, ref_grads = ps_reference(exact, case)
    _, _, grads = ps_run(host, typed, case, pass_count=False)
    assert_close(grads.input, ref_grads.input, dtype, "grad_input")
    assert_close(grads.trans, ref_grads.trans, dtype, "grad_trans")


@pytest.mark.parametrize("wrt", [("input",), ("trans",), ()])
def test_host_psroi_backward_computes_only_what_is_asked(host, wrt):
    case = PS_CASES[2]
    typed, exact = typed_and_exact(make_ps_case(case), numpy.float64)
    _, _, ref_grads = ps_reference(exact, case)
    _, _, grads = ps_run(host, typed, case, wrt=wrt)
    for name in _roi_pool.PSROI_GRADIENTS:
        if name in wrt:
            assert_close(getattr(grads, name), getattr(ref_grads, name), numpy.float64, name)
        else:
            assert getattr(grads, name) is None, name


def test_host_psroi_trans_grad_is_finite_differences(host):
    """Away from integral and clamped positions the official trans gradient is
    the derivative of the forward."""
    case = PS_CASES[2]
    arrays = make_ps_case(case, seed=5, specials=False)
    _, _, grads = ps_run(host, arrays, case)
    eps = 1e-7
    numeric = numpy.zeros_like(arrays["trans"])
    for index in numpy.ndindex(arrays["trans"].shape):
        values = []
        for sign in (1, -1):
            moved = dict(arrays, trans=arrays["trans"].copy())
            moved["trans"][index] += sign * eps
            out, _, _ = ps_run(host, moved, case, wrt=())
            values.append(float(numpy.sum(out * arrays["grad_output"])))
        numeric[index] = (values[0] - values[1]) / (2 * eps)
    assert numpy.any(numeric)
    assert rel_err(grads.trans, numeric) < 1e-6


def test_host_psroi_64bit_indices_and_odd_grids(host, monkeypatch):
    case = PS_CASES[3]
    typed, exact = typed_and_exact(make_ps_case(case), numpy.float32)
    ref_out, _, ref_grads = ps_reference(exact, case)
    for backend in (_kernels.HostBackend(grid=1, block=1), _kernels.HostBackend(grid=7, block=64)):
        out, _, grads = ps_run(backend, typed, case)
        compare(out, grads, ref_out, ref_grads, numpy.float32, "deform_psroi_pool")
    monkeypatch.setattr(_dtypes, "INT32_LIMIT", 0)
    out, _, grads = ps_run(host, typed, case)
    compare(out, grads, ref_out, ref_grads, numpy.float32, "deform_psroi_pool")


@pytest.mark.parametrize("deterministic", [False, True], ids=["scatter", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("empty", ["R", "C"])
def test_host_psroi_empty_problems_launch_nothing(empty, dtype, deterministic):
    case = PS_CASES[3]._replace(output_dim=0 if empty == "C" else 4)
    arrays = make_ps_case(case, specials=False)
    if empty == "R":
        for k in ("rois", "trans", "grad_output"):
            arrays[k] = arrays[k][:0]
    typed, _ = typed_and_exact(arrays, dtype)
    out, count, grads = ps_run(NoLaunch(), typed, case, deterministic=deterministic)
    R = typed["rois"].shape[0]
    assert out.shape == count.shape == (R, case.output_dim, 3, 3)
    assert grads.input.shape == typed["input"].shape and not numpy.any(to_numpy(grads.input))
    assert grads.trans.shape == typed["trans"].shape and not numpy.any(to_numpy(grads.trans))


def test_host_psroi_empty_image_pools_to_zero(host):
    case = PSCase("empty-image", 1, 0, 4, 1, 1, 2, 0, 2, 1, 1.0)
    typed = {"input": numpy.zeros((1, 1, 0, 4)), "rois": numpy.array([[0.0, 0, 0, 3, 3]]),
             "trans": numpy.full((1, 2, 2, 2), 0.25), "grad_output": numpy.ones((1, 1, 2, 2))}
    out, count, grads = ps_run(host, typed, case)
    assert not numpy.any(out) and not numpy.any(count) and not numpy.any(grads.trans)
