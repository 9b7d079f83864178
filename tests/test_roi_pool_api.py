"""deform_roi_pool and its backward through the public API on NumPy arrays:
dtypes kept, ``wrt``, ``output_size`` forms, and every validation error.
"""

import numpy
import pytest

import cupydcn
from helpers import DTYPES, assert_close, dtype_name
from roi_cases import ROI_CASES, make_roi_case, roi_params, roi_reference, typed_and_exact


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_roi_numpy_inputs_run_the_reference_and_keep_dtype(dtype):
    case = ROI_CASES[5]
    typed, exact = typed_and_exact(make_roi_case(case, specials=False), dtype)
    ref_out, ref_grads = roi_reference(exact, case)
    out = cupydcn.deform_roi_pool(typed["input"], typed["rois"], typed["offset"],
                                  mask=typed["mask"], **roi_params(case))
    assert isinstance(out, numpy.ndarray) and out.dtype == numpy.dtype(dtype)
    assert_close(out, ref_out, dtype)
    grads = cupydcn.deform_roi_pool_backward(typed["grad_output"], typed["input"], typed["rois"],
                                             typed["offset"], mask=typed["mask"],
                                             wrt=("input", "mask"), **roi_params(case))
    assert isinstance(grads, cupydcn.DeformRoIPoolGrads)
    assert grads.offset is None
    assert grads.input.dtype == numpy.dtype(dtype) and grads.mask.dtype == numpy.dtype(dtype)
    assert_close(grads.input, ref_grads.input, dtype)
    assert_close(grads.mask, ref_grads.mask, dtype)
    plain = cupydcn.deform_roi_pool_backward(typed["grad_output"], typed["input"], typed["rois"],
                                             **roi_params(case))
    assert plain.offset is None and plain.mask is None and plain.input.dtype == numpy.dtype(dtype)


def test_roi_int_and_pair_output_size_agree():
    case = ROI_CASES[0]
    arrays = make_roi_case(case, specials=False)
    a = cupydcn.deform_roi_pool(arrays["input"], arrays["rois"], output_size=7)
    b = cupydcn.deform_roi_pool(arrays["input"], arrays["rois"], output_size=(7, 7))
    numpy.testing.assert_array_equal(a, b)

# ---------------------------------------------------------------- validation

def _roi_args():
    case = ROI_CASES[4]
    arrays = make_roi_case(case, specials=False)
    typed, _ = typed_and_exact(arrays, numpy.float32)
    return dict(input=typed["input"], rois=typed["rois"], offset=typed["offset"],
                mask=typed["mask"], output_size=(3, 2))


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(rois=a["rois"][:, :4]), ValueError,
     r"rois.shape must be \(R, 5\), got \(6, 4\)"),
    (lambda a: a.update(rois=a["rois"][0]), ValueError, r"rois.shape must be \(R, 5\), got \(5,\)"),
    (lambda a: a.update(rois=a["rois"].astype(numpy.float64)), TypeError,
     r"rois.dtype must match input.dtype = float32, got float64"),
    (lambda a: a.update(offset=a["offset"].astype(numpy.float16)), TypeError,
     r"offset.dtype must match input.dtype = float32, got float16"),
    (lambda a: a.update(offset=a["offset"][:, :, :2]), ValueError,
     r"offset.shape must be \(R, 2, ph, pw\) = \(6, 2, 3, 2\), got \(6, 2, 2, 2\)"),
    (lambda a: a.update(output_size=7), ValueError,
     r"offset.shape must be \(R, 2, ph, pw\) = \(6, 2, 7, 7\), got \(6, 2, 3, 2\)"),
    (lambda a: a.update(mask=a["mask"][:3]), ValueError,
     r"mask.shape must be \(R, 1, ph, pw\) = \(6, 1, 3, 2\), got \(3, 1, 3, 2\)"),
    (lambda a: a.update(input=a["input"][0]), ValueError,
     r"input must be 4-D \(N, C, H, W\), got shape \(3, 9, 8\)"),
    (lambda a: a.update(input=a["input"].astype(numpy.int32)), TypeError,
     r"input.dtype must be one of .*, got int32"),
    (lambda a: a["rois"].__setitem__((2, 0), 5), ValueError,
     r"rois\[:, 0\] must hold batch indices in \[0, N\) = \[0, 2\), got 5.0"),
    (lambda a: a["rois"].__setitem__((1, 0), 0.5), ValueError,
     r"rois\[:, 0\] must hold batch indices in \[0, N\) = \[0, 2\), got 0.5"),
    (lambda a: a["rois"].__setitem__((0, 0), numpy.nan), ValueError,
     r"rois\[:, 0\] must hold batch indices in \[0, N\) = \[0, 2\), got nan"),
    (lambda a: a.update(spatial_scale=0.0), ValueError, r"spatial_scale must be a finite number > 0, got 0.0"),
    (lambda a: a.update(spatial_scale=float("inf")), ValueError, r"spatial_scale must be a finite number > 0, got inf"),
    (lambda a: a.update(spatial_scale="1"), TypeError, r"spatial_scale must be a real number, got '1'"),
    (lambda a: a.update(sampling_ratio=-1), ValueError, r"sampling_ratio must be >= 0, got -1"),
    (lambda a: a.update(sampling_ratio=1.5), TypeError, r"sampling_ratio must be an int, got 1.5"),
    (lambda a: a.update(gamma=float("nan")), ValueError, r"gamma must be a finite number, got nan"),
    (lambda a: a.update(output_size=(3, 0)), ValueError, r"output_size must be >= 1, got \(3, 0\)"),
    (lambda a: a.update(output_size=2.5), TypeError, r"output_size must be an int or a pair of ints"),
])
def test_roi_validation_errors(change, error, message):
    args = _roi_args()
    change(args)
    with pytest.raises(error, match=message):
        cupydcn.deform_roi_pool(**args)


def test_roi_validation_backward():
    args = _roi_args()
    grad = numpy.ones((6, 3, 3, 2), numpy.float32)
    with pytest.raises(ValueError, match=r"grad_output.shape must be \(R, C, ph, pw\) = "
                                         r"\(6, 3, 3, 2\), got \(6, 3, 2, 2\)"):
        cupydcn.deform_roi_pool_backward(grad[:, :, :2], **args)
    with pytest.raises(TypeError, match=r"grad_output.dtype must match input.dtype = float32"):
        cupydcn.deform_roi_pool_backward(grad.astype(numpy.float64), **args)
    with pytest.raises(ValueError, match=r"wrt must name gradients among \('input', 'offset', "
                                         r"'mask'\), got \['rois'\]"):
        cupydcn.deform_roi_pool_backward(grad, wrt=("input", "rois"), **args)

def test_validation_error_then_valid_call_works():
    args = _roi_args()
    with pytest.raises(ValueError):
        cupydcn.deform_roi_pool(**dict(args, offset=args["offset"][:1]))
    assert numpy.all(numpy.isfinite(cupydcn.deform_roi_pool(**args)))
