"""deform_roi_pool and deform_psroi_pool on the GPU (tests marked ``gpu``,
skipped with CuPy's reason where it sees no GPU).

The kernel paths on CuPy arrays against the float64 reference, three
deterministic runs bit for bit, the public API on the GPU (the batch index
check included) and the torchvision RoIAlign cross-check. Measured errors go
to ``record_error`` (tests/run_gpu_tier.py). Every buffer a kernel must fill
starts as NaN.
"""

import numpy
import pytest

import cupydcn
from helpers import DTYPES, assert_close, dtype_name, rel_err, to_numpy
from roi_cases import (
    PS_CASES, ROI_CASES, PSCase, RoICase, assert_bit_identical, compare, draw_ps_roi, draw_roi,
    draw_unit, make_ps_case, make_roi_case, near, ps_params, ps_positions, ps_reference, ps_run,
    roi_acceptable, roi_params, roi_reference, roi_run, typed_and_exact)



def _to_gpu(arrays):
    import cupy

    return {k: None if v is None else cupy.asarray(v) for k, v in arrays.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", ROI_CASES, ids=lambda c: c.name)
def test_gpu_roi_pool_matches_reference(gpu, case, dtype, record_error):
    import cupy

    typed, exact = typed_and_exact(make_roi_case(case, seed=1), dtype)
    ref_out, ref_grads = roi_reference(exact, case)
    out, grads = roi_run(gpu, _to_gpu(typed), case)
    assert isinstance(out, cupy.ndarray)
    compare(out, grads, ref_out, ref_grads, dtype, "deform_roi_pool", record=record_error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", PS_CASES, ids=lambda c: c.name)
def test_gpu_psroi_pool_matches_reference(gpu, case, dtype, record_error):
    typed, exact = typed_and_exact(make_ps_case(case, seed=1), dtype)
    ref_out, ref_count, ref_grads = ps_reference(exact, case)
    out, count, grads = ps_run(gpu, _to_gpu(typed), case)
    numpy.testing.assert_array_equal(to_numpy(count), ref_count)
    compare(out, grads, ref_out, ref_grads, dtype, "deform_psroi_pool", record=record_error)
    _, _, recomputed = ps_run(gpu, _to_gpu(typed), case, pass_count=False)
    record_error(dtype_name(dtype), "deform_psroi_pool grad_input (count recomputed)",
                 assert_close(recomputed.input, ref_grads.input, dtype, "grad_input"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_gpu_public_api(gpu, dtype, record_error):
    import cupy

    case = ROI_CASES[5]
    typed, exact = typed_and_exact(make_roi_case(case, seed=2, specials=False), dtype)
    ref_out, ref_grads = roi_reference(exact, case)
    g = _to_gpu(typed)
    out = cupydcn.deform_roi_pool(g["input"], g["rois"], g["offset"], mask=g["mask"],
                                  **roi_params(case))
    grads = cupydcn.deform_roi_pool_backward(g["grad_output"], g["input"], g["rois"], g["offset"],
                                             mask=g["mask"], **roi_params(case))
    assert isinstance(out, cupy.ndarray) and out.dtype == numpy.dtype(dtype)
    compare(out, grads, ref_out, ref_grads, dtype, "deform_roi_pool public", record=record_error)
    with pytest.raises(ValueError, match=r"rois\[:, 0\] must hold batch indices in \[0, N\) = "
                                         r"\[0, 2\), got 2.0"):
        bad = g["rois"].copy()
        bad[1, 0] = 2
        cupydcn.deform_roi_pool(g["input"], bad, g["offset"], mask=g["mask"], **roi_params(case))

    ps = PS_CASES[3]
    typed, exact = typed_and_exact(make_ps_case(ps, seed=2, specials=False), dtype)
    ref_out, ref_count, ref_grads = ps_reference(exact, ps)
    g = _to_gpu(typed)
    out, count = cupydcn.deform_psroi_pool(g["input"], g["rois"], g["trans"], return_count=True,
                                           **ps_params(ps))
    grads = cupydcn.deform_psroi_pool_backward(g["grad_output"], g["input"], g["rois"],
                                               g["trans"], count, **ps_params(ps))
    compare(out, grads, ref_out, ref_grads, dtype, "deform_psroi_pool public",
            record=record_error)


@pytest.mark.gpu
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_gpu_roi_pool_without_offset_is_torchvision_roi_align(gpu, sampling_ratio, record_error):
    """docs/semantics.md §3.7: no offset = torchvision.ops.roi_align(aligned=True)."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the torchvision "
                                "RoIAlign cross-check needs it")
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed: "
                                      "the RoIAlign cross-check needs it")
    case = ROI_CASES[0]._replace(sampling_ratio=sampling_ratio)
    arrays = make_roi_case(case, seed=4, specials=False)
    g = _to_gpu({k: v.astype(numpy.float32) for k, v in arrays.items() if v is not None})
    out = cupydcn.deform_roi_pool(g["input"], g["rois"], **roi_params(case))
    expected = torchvision.ops.roi_align(
        torch.from_dlpack(g["input"]), torch.from_dlpack(g["rois"]), case.output_size,
        spatial_scale=case.spatial_scale, sampling_ratio=sampling_ratio, aligned=True)
    err = rel_err(out, expected.cpu().numpy())
    record_error("float32", "deform_roi_pool vs torchvision roi_align", err)
    assert err < 1e-5


def _overlapping_roi_case(seed):
    """Many RoIs over the same pixels (an atomic scatter would reorder their
    sums from run to run), adaptive grid, offsets and masks."""
    case = RoICase("overlapping", 2, 8, 16, 16, (7, 7), 1.0, 0, True, True)
    rng = numpy.random.default_rng(seed)
    rois, offsets = [], []
    while len(rois) < 48:
        roi = draw_roi(rng, "inside", case, len(rois) % case.N)
        offset_r = draw_unit(rng, (2, 7, 7))
        if roi_acceptable(roi, offset_r, case):
            rois.append(roi)
            offsets.append(offset_r)
    R = len(rois)
    arrays = {"input": rng.standard_normal((case.N, case.C, case.H, case.W)),
              "rois": numpy.array(rois), "offset": numpy.array(offsets),
              "mask": draw_unit(rng, (R, 1, 7, 7), positive=True),
              "grad_output": rng.standard_normal((R, case.C, 7, 7))}
    return case, arrays


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", ROI_CASES, ids=lambda c: c.name)
def test_gpu_roi_pool_deterministic_is_bit_identical(gpu, case, dtype, record_error):
    typed, exact = typed_and_exact(make_roi_case(case, seed=1), dtype)
    ref_out, ref_grads = roi_reference(exact, case)
    on_gpu = _to_gpu(typed)
    runs = [roi_run(gpu, on_gpu, case, deterministic=True) for _ in range(3)]
    assert_bit_identical(runs, case.name)
    compare(*runs[0], ref_out, ref_grads, dtype, "deform_roi_pool deterministic",
            record=record_error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", PS_CASES, ids=lambda c: c.name)
def test_gpu_psroi_pool_deterministic_is_bit_identical(gpu, case, dtype, record_error):
    typed, exact = typed_and_exact(make_ps_case(case, seed=1), dtype)
    ref_out, ref_count, ref_grads = ps_reference(exact, case)
    on_gpu = _to_gpu(typed)
    runs = [ps_run(gpu, on_gpu, case, deterministic=True) for _ in range(3)]
    assert_bit_identical(runs, case.name)
    out, count, grads = runs[0]
    numpy.testing.assert_array_equal(to_numpy(count), ref_count)
    compare(out, grads, ref_out, ref_grads, dtype, "deform_psroi_pool deterministic",
            record=record_error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_gpu_deterministic_public_api_overlapping_rois(gpu, dtype, record_error):
    """The public keyword on CuPy arrays, where the scatter's atomics collide
    most: 48 overlapping RoIs, and 40 position-sensitive RoIs over 2 classes
    with part_size < pooled_size."""
    import cupy

    case, arrays = _overlapping_roi_case(seed=5)
    typed, exact = typed_and_exact(arrays, dtype)
    _, ref_grads = roi_reference(exact, case)
    g = _to_gpu(typed)
    runs = [cupydcn.deform_roi_pool_backward(g["grad_output"], g["input"], g["rois"],
                                             g["offset"], mask=g["mask"], deterministic=True,
                                             **roi_params(case))
            for _ in range(3)]
    assert isinstance(runs[0].input, cupy.ndarray)
    assert_bit_identical(runs, "deform_roi_pool_backward")
    for name, got in runs[0]._asdict().items():
        record_error(dtype_name(dtype), f"deform_roi_pool deterministic public grad_{name}",
                     assert_close(got, getattr(ref_grads, name), dtype, name))

    ps = PSCase("overlapping", 2, 16, 16, 4, 3, 6, 3, 4, 2, 1.0)
    rng = numpy.random.default_rng(6)
    rois, trans = [], []
    while len(rois) < 40:
        roi = draw_ps_roi(rng, "inside", ps, len(rois) % ps.N)
        trans_r = draw_unit(rng, (4, 3, 3))
        ws, hs = ps_positions(roi, trans_r, ps)
        if not (near(ws, 0.5) or near(hs, 0.5)):
            rois.append(roi)
            trans.append(trans_r)
    arrays = {"input": rng.standard_normal((ps.N, ps.C, ps.H, ps.W)), "rois": numpy.array(rois),
              "trans": numpy.array(trans),
              "grad_output": rng.standard_normal((len(rois), 4, 6, 6))}
    typed, exact = typed_and_exact(arrays, dtype)
    _, _, ref_grads = ps_reference(exact, ps)
    g = _to_gpu(typed)
    runs = [cupydcn.deform_psroi_pool_backward(g["grad_output"], g["input"], g["rois"],
                                               g["trans"], deterministic=True, **ps_params(ps))
            for _ in range(3)]
    assert_bit_identical(runs, "deform_psroi_pool_backward")
    for name, got in runs[0]._asdict().items():
        record_error(dtype_name(dtype), f"deform_psroi_pool deterministic public grad_{name}",
                     assert_close(got, getattr(ref_grads, name), dtype, name))
