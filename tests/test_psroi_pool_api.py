"""deform_psroi_pool and its backward through the public API on NumPy arrays:
dtypes kept, the count, ``wrt``, the inferred ``output_dim``, and every
validation error.
"""

import numpy
import pytest

import cupydcn
from cupydcn import _dtypes
from helpers import DTYPES, assert_close, dtype_name
from roi_cases import PS_CASES, PS_KINDS, make_ps_case, ps_params, ps_reference, typed_and_exact


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_psroi_numpy_inputs_run_the_reference_and_keep_dtype(dtype):
    case = PS_CASES[3]
    typed, exact = typed_and_exact(make_ps_case(case, specials=False), dtype)
    ref_out, ref_count, ref_grads = ps_reference(exact, case)
    out, count = cupydcn.deform_psroi_pool(typed["input"], typed["rois"], typed["trans"],
                                           return_count=True, **ps_params(case))
    assert isinstance(out, numpy.ndarray) and out.dtype == numpy.dtype(dtype)
    assert count.dtype == _dtypes.lookup(dtype).acc
    assert_close(out, ref_out, dtype)
    numpy.testing.assert_array_equal(count, ref_count)
    grads = cupydcn.deform_psroi_pool_backward(typed["grad_output"], typed["input"],
                                               typed["rois"], typed["trans"], count,
                                               **ps_params(case))
    assert isinstance(grads, cupydcn.DeformPSRoIPoolGrads)
    assert grads.input.dtype == numpy.dtype(dtype) and grads.trans.dtype == numpy.dtype(dtype)
    assert_close(grads.input, ref_grads.input, dtype)
    assert_close(grads.trans, ref_grads.trans, dtype)
    only = cupydcn.deform_psroi_pool_backward(typed["grad_output"], typed["input"],
                                              typed["rois"], typed["trans"], wrt=("input",),
                                              **ps_params(case))
    assert only.trans is None


def test_psroi_default_output_dim_and_keywords():
    case = PS_CASES[3]
    arrays = make_ps_case(case, specials=False)
    params = ps_params(case)
    explicit = cupydcn.deform_psroi_pool(arrays["input"], arrays["rois"], arrays["trans"], **params)
    params.pop("output_dim")
    inferred = cupydcn.deform_psroi_pool(arrays["input"], arrays["rois"], arrays["trans"], **params)
    numpy.testing.assert_array_equal(explicit, inferred)
    assert explicit.shape == (len(PS_KINDS), 4, 3, 3)

# ---------------------------------------------------------------- validation

def _ps_args():
    case = PS_CASES[3]
    typed, _ = typed_and_exact(make_ps_case(case, specials=False), numpy.float32)
    return dict(input=typed["input"], rois=typed["rois"], trans=typed["trans"],
                group_size=3, pooled_size=3, part_size=3, sample_per_part=3, trans_std=0.2)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(output_dim=3), ValueError,
     r"output_dim\*group_size\*\*2 = 3\*3\*\*2 = 27 must equal input.shape\[1\] = 36"),
    (lambda a: a.update(group_size=4), ValueError,
     r"output_dim\*group_size\*\*2 = 2\*4\*\*2 = 32 must equal input.shape\[1\] = 36"),
    (lambda a: a.update(trans=a["trans"][:, :3]), ValueError,
     r"trans.shape\[1\] must be 2\*num_classes with num_classes dividing output_dim = 4, got 3"),
    (lambda a: a.update(trans=numpy.concatenate([a["trans"], a["trans"][:, :2]], axis=1)),
     ValueError, r"trans.shape\[1\] must be 2\*num_classes with num_classes dividing "
                 r"output_dim = 4, got 6"),
    (lambda a: a.update(trans=a["trans"][:4]), ValueError, r"trans.shape\[0\] must be R = 10, got 4"),
    (lambda a: a.update(part_size=2), ValueError,
     r"trans.shape\[2:\] must be \(part_size, part_size\) = \(2, 2\), got \(3, 3\)"),
    (lambda a: a.update(part_size=0, pooled_size=4), ValueError,
     r"trans.shape\[2:\] must be \(part_size, part_size\) = \(4, 4\), got \(3, 3\)"),
    (lambda a: a.update(trans=a["trans"].astype(numpy.float64)), TypeError,
     r"trans.dtype must match input.dtype = float32, got float64"),
    (lambda a: a.update(rois=a["rois"][:, 1:]), ValueError, r"rois.shape must be \(R, 5\), got \(10, 4\)"),
    (lambda a: a["rois"].__setitem__((3, 0), 2), ValueError,
     r"rois\[:, 0\] must hold batch indices in \[0, N\) = \[0, 2\), got 2.0"),
    (lambda a: a.update(spatial_scale=-0.5), ValueError, r"spatial_scale must be a finite number > 0, got -0.5"),
    (lambda a: a.update(sample_per_part=0), ValueError, r"sample_per_part must be >= 1, got 0"),
    (lambda a: a.update(part_size=-1), ValueError, r"part_size must be >= 0, got -1"),
    (lambda a: a.update(group_size=0), ValueError, r"group_size must be >= 1, got 0"),
    (lambda a: a.update(pooled_size=0), ValueError, r"pooled_size must be >= 1, got 0"),
    (lambda a: a.update(trans_std=float("inf")), ValueError, r"trans_std must be a finite number, got inf"),
    (lambda a: a.update(group_size=True), TypeError, r"group_size must be an int, got True"),
])
def test_psroi_validation_errors(change, error, message):
    args = _ps_args()
    change(args)
    with pytest.raises(error, match=message):
        cupydcn.deform_psroi_pool(**args)


def test_psroi_validation_backward():
    args = _ps_args()
    grad = numpy.ones((10, 4, 3, 3), numpy.float32)
    with pytest.raises(ValueError, match=r"grad_output.shape must be \(R, output_dim, pooled_size, "
                                         r"pooled_size\) = \(10, 4, 3, 3\), got \(10, 2, 3, 3\)"):
        cupydcn.deform_psroi_pool_backward(grad[:, :2], **args)
    with pytest.raises(ValueError, match=r"count.shape must be \(R, output_dim, pooled_size, "
                                         r"pooled_size\) = \(10, 4, 3, 3\), got \(10, 4, 3, 2\)"):
        cupydcn.deform_psroi_pool_backward(grad, count=grad[..., :2], **args)
    with pytest.raises(TypeError, match=r"count.dtype must be float32, got float64"):
        cupydcn.deform_psroi_pool_backward(grad, count=grad.astype(numpy.float64), **args)
    half = {k: v.astype(numpy.float16) for k, v in args.items() if isinstance(v, numpy.ndarray)}
    with pytest.raises(TypeError, match=r"count.dtype must be float32 \(the accumulation dtype "
                                        r"of float16\) or float16, got float64"):
        cupydcn.deform_psroi_pool_backward(grad.astype(numpy.float16),
                                           count=grad.astype(numpy.float64), **dict(args, **half))
    with pytest.raises(ValueError, match=r"wrt must name gradients among \('input', 'trans'\)"):
        cupydcn.deform_psroi_pool_backward(grad, wrt="offset", **args)
