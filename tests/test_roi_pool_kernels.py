"""deform_roi_pool and its backward: the kernel paths against the float64
reference on the CPU (CPU tier).

The kernel source compiled for the host (``host`` fixture) runs the kernel
paths on NumPy arrays, for every dtype, over RoIs inside, partly outside,
wholly outside, degenerate, huge and non-finite, and invalid batch indices;
finite differences, the clamped band of the offset gradient, ``wrt``, 64-bit
indices, odd host grids, non-contiguous inputs, empty problems, and a wrong
kernel that must fail. Every buffer a kernel must fill starts as NaN. The
test data are described in roi_cases.py.
"""

import numpy
import pytest

import cupydcn
from cupydcn import _dtypes, _kernels, _roi_pool, reference
from helpers import DTYPES, assert_close, dtype_name, rel_err, to_numpy
from roi_cases import (
    ROI_CASES, ROI_KINDS, ROI_KINDS_PLAIN, NoLaunch, RoICase, compare, in_clamped_band,
    make_roi_case, roi_params, roi_positions, roi_reference, roi_run, typed_and_exact)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", ROI_CASES, ids=lambda c: c.name)
def test_host_roi_pool_matches_reference(host, case, dtype):
    typed, exact = typed_and_exact(make_roi_case(case), dtype)
    ref_out, ref_grads = roi_reference(exact, case)
    out, grads = roi_run(host, typed, case)
    compare(out, grads, ref_out, ref_grads, dtype, "deform_roi_pool")
    # the special rows pool to exactly 0 and scatter nothing
    special = slice(len(ROI_KINDS if case.offset else ROI_KINDS_PLAIN), None)
    assert not numpy.any(to_numpy(out)[special])
    if grads.offset is not None:
        assert not numpy.any(to_numpy(grads.offset)[special])
        assert to_numpy(grads.offset)[0, :, 0, -1].tolist() == [0.0, 0.0]   # NaN offset bin
        assert not numpy.any(to_numpy(out)[0, :, 0, -1])
    if grads.mask is not None:
        assert not numpy.any(to_numpy(grads.mask)[special])


def test_roi_cases_reach_every_region():
    """The drawn RoIs sample inside, in the clamped bands and outside."""
    for case in ROI_CASES:
        arrays = make_roi_case(case, specials=False)
        ys = numpy.concatenate([roi_positions(roi, None if arrays["offset"] is None
                                              else arrays["offset"][r], case)[1].ravel()
                                for r, roi in enumerate(arrays["rois"])])
        assert numpy.any((ys > 0) & (ys < case.H - 1)), case.name
        assert numpy.any(ys < -1) and numpy.any(ys > case.H), case.name
        assert numpy.any((ys > case.H - 1) & (ys <= case.H)), case.name
        if not case.offset:
            assert in_clamped_band(ys), case.name


def test_host_roi_pool_mmcv_golden_values(host):
    """docs/semantics.md §3.7: mmcv's numbers on a 2x2 image."""
    x = numpy.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    rois = numpy.array([[0.0, 0, 0, 1, 1]])
    case = RoICase("golden", 1, 1, 2, 2, (2, 2), 1.0, 2, False, False)
    typed = {"input": x, "rois": rois, "offset": None, "mask": None,
             "grad_output": numpy.ones((1, 1, 2, 2))}
    out, grads = roi_run(host, typed, case)
    numpy.testing.assert_allclose(out[0, 0], [[1.0, 1.25], [1.5, 1.75]], rtol=1e-15)
    numpy.testing.assert_allclose(grads.input[0, 0], [[3.0625, 0.4375], [0.4375, 0.0625]],
                                  rtol=1e-15)
    public = cupydcn.deform_roi_pool(x, rois, output_size=2, sampling_ratio=2)
    numpy.testing.assert_allclose(public[0, 0], [[1.0, 1.25], [1.5, 1.75]], rtol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_host_roi_pool_closed_box_edges(host, dtype):
    """RoIAlign's box is closed: a sample exactly at y = -1 or x = W (H, -1)
    reads the clamped corner pixel; 1/8 further out it is 0."""
    case = RoICase("edges", 1, 1, 3, 4, (1, 1), 1.0, 1, False, False)
    x = numpy.arange(12.0).reshape(1, 1, 3, 4) + 1
    rois = numpy.array([[0, 4, -1, 5, 0],              # sample (y, x) = (-1, 4)
                        [0, -1, 3, 0, 4],              # (3, -1)
                        [0, 4.125, 1, 5, 2]])          # (1, 4.0625): outside
    typed, exact = typed_and_exact({"input": x, "rois": rois, "offset": None, "mask": None,
                                    "grad_output": numpy.ones((3, 1, 1, 1))}, dtype)
    out, grads = roi_run(host, typed, case)
    assert to_numpy(out).ravel().tolist() == [4.0, 9.0, 0.0]
    expected_grad = numpy.zeros((3, 4))
    expected_grad[0, 3] = expected_grad[2, 0] = 1.0
    numpy.testing.assert_array_equal(to_numpy(grads.input)[0, 0], expected_grad)
    ref_out, ref_grads = roi_reference(exact, case)
    numpy.testing.assert_array_equal(ref_out.ravel(), [4.0, 9.0, 0.0])
    numpy.testing.assert_array_equal(ref_grads.input[0, 0], expected_grad)


def _roi_objective(host, typed, case, offset, mask):
    arrays = dict(typed, offset=offset, mask=mask)
    out, _ = roi_run(host, arrays, case, wrt=())
    return float(numpy.sum(out * typed["grad_output"]))


@pytest.mark.parametrize("case", [ROI_CASES[3], ROI_CASES[4]], ids=lambda c: c.name)
def test_host_roi_offset_and_mask_grads_are_finite_differences(host, case):
    """The offset and mask gradients are the derivatives of the forward
    (docs/semantics.md §3.6 asks for this check where the forward is smooth)."""
    arrays = make_roi_case(case, seed=3, specials=False)
    _, grads = roi_run(host, arrays, case)
    eps = 1e-6
    for name in ("offset", "mask"):
        if arrays[name] is None:
            continue
        numeric = numpy.zeros_like(arrays[name])
        for index in numpy.ndindex(arrays[name].shape):
            values = {}
            for sign in (1, -1):
                moved = {k: arrays[k].copy() if arrays[k] is not None else None
                         for k in ("offset", "mask")}
                moved[name][index] += sign * eps
                values[sign] = _roi_objective(host, arrays, case, moved["offset"], moved["mask"])
            numeric[index] = (values[1] - values[-1]) / (2 * eps)
        assert numpy.any(numeric), name
        assert rel_err(getattr(grads, name), numeric) < 1e-6, name


def _band_case():
    """Two RoIs with one sample per bin: the first has y and x in [-1, 0),
    the second y in [-1, 0) and x inside the image."""
    case = RoICase("band", 1, 2, 5, 6, (1, 2), 1.0, 1, True, False)
    rng = numpy.random.default_rng(11)
    rois = numpy.array([[0, -0.75, -1.0, 0.375, 0.25],      # samples y -0.875, x -0.97/-0.41
                        [0, 1.25, -0.875, 4.5, 0.125]])     # y -0.875, x 1.56/3.19
    offset = numpy.array([[[[0.125, -0.25]], [[0.25, 0.125]]],
                          [[[0.25, -0.125]], [[-0.25, 0.125]]]])
    arrays = {"input": rng.standard_normal((1, 2, 5, 6)), "rois": rois, "offset": offset,
              "mask": None, "grad_output": rng.standard_normal((2, 2, 1, 2))}
    for r in range(2):
        _, ys, xs = roi_positions(rois[r], offset[r], case)
        assert numpy.all((ys >= -1) & (ys < 0)), ys
    return case, arrays


def test_roi_offset_grad_clamped_band_finite_differences(host):
    """FOR THE LEAD: in -1 <= y < 0 the forward clamps y to 0, so it is flat in
    y and the exact derivative (the kernels' rule) is 0; finite differences of
    the forward agree. d/dx stays the derivative at the clamped y."""
    case, arrays = _band_case()
    _, grads = roi_run(host, arrays, case)
    eps = 1e-6
    numeric = numpy.zeros_like(arrays["offset"])
    for index in numpy.ndindex(arrays["offset"].shape):
        plus, minus = arrays["offset"].copy(), arrays["offset"].copy()
        plus[index] += eps
        minus[index] -= eps
        numeric[index] = (_roi_objective(host, arrays, case, plus, None)
                          - _roi_objective(host, arrays, case, minus, None)) / (2 * eps)
    assert not numpy.any(grads.offset[:, 1])          # d/dy: 0 in the band
    assert not numpy.any(grads.offset[0, 0])          # first RoI: x in the band too
    assert numpy.all(grads.offset[1, 0] != 0)         # second RoI: x inside
    numpy.testing.assert_allclose(grads.offset, numeric, atol=1e-8)


def test_roi_offset_grad_clamped_band_matches_reference(host):
    """FOR THE LEAD: the region -1 <= y < 0 where mmcv's rule (the unclamped
    position) and the exact derivative differ; the reference and the kernels
    both give the exact derivative (0 along a clamped axis)."""
    case, arrays = _band_case()
    _, grads = roi_run(host, arrays, case)
    ref = reference.deform_roi_pool_backward(arrays["grad_output"], arrays["input"],
                                             arrays["rois"], arrays["offset"],
                                             **roi_params(case))
    numpy.testing.assert_allclose(grads.offset, ref[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wrt", [("input",), ("offset",), ("mask",), ("offset", "mask"), ()])
def test_host_roi_backward_computes_only_what_is_asked(host, wrt):
    case = ROI_CASES[4]
    typed, exact = typed_and_exact(make_roi_case(case), numpy.float64)
    _, ref_grads = roi_reference(exact, case)
    _, grads = roi_run(host, typed, case, wrt=wrt)
    for name in _roi_pool.ROI_GRADIENTS:
        if name in wrt:
            assert_close(getattr(grads, name), getattr(ref_grads, name), numpy.float64, name)
        else:
            assert getattr(grads, name) is None, name


def test_host_roi_64bit_indices_and_odd_grids(host, monkeypatch):
    case = ROI_CASES[5]
    typed, exact = typed_and_exact(make_roi_case(case), numpy.float32)
    ref_out, ref_grads = roi_reference(exact, case)
    for backend in (_kernels.HostBackend(grid=1, block=1), _kernels.HostBackend(grid=7, block=64)):
        out, grads = roi_run(backend, typed, case)
        compare(out, grads, ref_out, ref_grads, numpy.float32, "deform_roi_pool")
    monkeypatch.setattr(_dtypes, "INT32_LIMIT", 0)
    out, grads = roi_run(host, typed, case)
    compare(out, grads, ref_out, ref_grads, numpy.float32, "deform_roi_pool")


def test_host_roi_non_contiguous(host):
    case = ROI_CASES[4]
    typed, exact = typed_and_exact(make_roi_case(case), numpy.float64)
    ref_out, ref_grads = roi_reference(exact, case)
    strided = {k: None if v is None else numpy.asfortranarray(v) for k, v in typed.items()}
    assert not strided["input"].flags.c_contiguous
    out, grads = roi_run(host, strided, case)
    compare(out, grads, ref_out, ref_grads, numpy.float64, "deform_roi_pool")


def test_host_roi_wrong_kernel_fails(host):
    """The CPU tier catches a kernel bug: one bilinear weight swapped."""
    text = _kernels.source("deform_roi_pool")
    wrong = text.replace("s.hy * s.lx * dcn_load(plane[s.i01])", "s.hy * s.hx * dcn_load(plane[s.i01])", 1)
    assert wrong != text
    case = ROI_CASES[0]
    typed, exact = typed_and_exact(make_roi_case(case), numpy.float64)
    ref_out, _ = roi_reference(exact, case)
    out, _ = roi_run(_kernels.HostBackend(sources={"deform_roi_pool": wrong}), typed, case)
    assert rel_err(out, ref_out) > 1e-3

@pytest.mark.parametrize("deterministic", [False, True], ids=["scatter", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("empty", ["R", "C"])
def test_host_roi_empty_problems_launch_nothing(empty, dtype, deterministic):
    case = ROI_CASES[4]._replace(C=0 if empty == "C" else 3)
    arrays = make_roi_case(case, specials=False)
    if empty == "R":
        for k in ("rois", "offset", "mask", "grad_output"):
            arrays[k] = arrays[k][:0]
    typed, _ = typed_and_exact(arrays, dtype)
    out, grads = roi_run(NoLaunch(), typed, case, deterministic=deterministic)
    R = typed["rois"].shape[0]
    assert out.shape == (R, case.C, 3, 2) and out.dtype == numpy.dtype(dtype)
    assert grads.input.shape == typed["input"].shape and not numpy.any(to_numpy(grads.input))
    assert grads.offset.shape == (R, 2, 3, 2) and not numpy.any(to_numpy(grads.offset))
    assert grads.mask.shape == (R, 1, 3, 2) and not numpy.any(to_numpy(grads.mask))
    public = cupydcn.deform_roi_pool(typed["input"], typed["rois"], typed["offset"], (3, 2),
                                     mask=typed["mask"])
    assert public.shape == (R, case.C, 3, 2) and public.dtype == numpy.dtype(dtype)


def test_host_roi_empty_image_pools_to_zero(host):
    case = RoICase("empty-image", 1, 2, 0, 5, (2, 2), 1.0, 2, True, True)
    typed = {"input": numpy.zeros((1, 2, 0, 5)), "rois": numpy.array([[0.0, -1, -1, 3, 3]]),
             "offset": numpy.full((1, 2, 2, 2), 0.25), "mask": numpy.full((1, 1, 2, 2), 0.5),
             "grad_output": numpy.ones((1, 2, 2, 2))}
    out, grads = roi_run(host, typed, case)
    assert out.shape == (1, 2, 2, 2) and not numpy.any(out)
    assert not numpy.any(grads.offset) and not numpy.any(grads.mask)
