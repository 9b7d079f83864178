"""Every registered implementation of every op against the float64 reference,
through the public API with ``algorithm=name``.

The tests are parametrized from the dispatcher's table
(``cupydcn._dispatch._registry``) when they are collected, so an
implementation registered later is tested without a change here. CPU tier:
each implementation that runs on the CPU (its kernels built for the host, or
NumPy) runs on NumPy arrays; GPU tier (marker ``gpu``): each one that runs on
CUDA runs on CuPy arrays. Every dtype, the forward and every gradient
(optional arrays given, so every gradient applies), odd sizes, batch 0, 1 and
33 (for the RoI ops: that many RoIs over at most 3 images, the batch of 33
with non-finite RoI coordinates among them), every buffer a kernel must fill
poisoned with NaN (conftest). The deterministic flag of each implementation
is checked too: the dispatcher refuses the others under
``deterministic=True``, and a deterministic one gives the same bits on every
host grid.
"""

import functools
from typing import NamedTuple

import numpy
import pytest

import cupydcn
from cupydcn import _dispatch, _dtypes, _kernels, _ops
from helpers import (DTYPES, assert_close, forward_tolerance, dtype_name, rounded,
                     to_numpy)
from roi_cases import (
    GRIDS, PS_KINDS, ROI_KINDS, PSCase, RoICase, assert_bit_identical, draw_ps_roi, draw_roi,
    draw_unit, near, ps_params, ps_positions, roi_acceptable, roi_params, typed_and_exact)
from test_deform_conv import make_case

BATCHES = (0, 1, 33)
CPU_PLACES = {_dispatch.HOST, _dispatch.NUMPY}
BY_NAME = {dtype_name(dtype): dtype for dtype in DTYPES}


def implementations(places):
    """(op, implementation name) of every registered implementation that runs
    on one of ``places``, read from the registry at collection time."""
    return [pytest.param(op, implementation.name, id=f"{op}-{implementation.name}")
            for op, table in _dispatch._registry.items()
            for implementation in table if implementation.runs_on & places]


implementation = _dispatch.implementation


# ---------------------------------------------------------------- problems

class Problem(NamedTuple):
    """One call of an op: its arrays by argument name (``grad_output``
    included) and its parameters, typed (for the op) and exact (the same
    values in float64, for the reference)."""
    typed: dict
    exact: dict
    params: dict


# deform_conv2d: groups 2, offset groups 2, a 3x2 kernel, stride (2, 1),
# padding (1, 0), dilation (1, 2), mask and bias; 7x5 input, 4x3 output.
CONV = (4, 7, 5, 6, 3, 2, 2, 2, (2, 1), (1, 0), (1, 2), True, True)
# deform_roi_pool: offset and mask, adaptive sampling grid, scale 0.5, 3x2 bins.
ROI = RoICase("batch", 3, 3, 9, 7, (3, 2), 0.5, 0, True, True)
# deform_psroi_pool: 2 classes of trans, group_size 2, part_size < pooled_size.
PS = PSCase("batch", 3, 9, 7, 4, 2, 3, 2, 2, 2, 0.5)
# Rows with a valid batch index that the kernels must turn into zeros.
SPECIAL_ROIS = ([0, numpy.nan, 1, 3, 4], [1, 1, 2, numpy.inf, 5], [0, 3, 1, 1e30, 4])


def _draw_rois(rng, batch, images, kinds, draw, acceptable):
    """``batch`` RoIs over ``images`` images, ``kinds`` in turn, each redrawn
    until ``acceptable``, with what ``draw`` draws beside each (its offset or
    trans); the last rows of a large batch are SPECIAL_ROIS."""
    rows, extras = [], []
    specials = len(SPECIAL_ROIS) if batch > len(SPECIAL_ROIS) else 0
    for r in range(batch - specials):
        for _ in range(5000):
            roi, extra = draw(rng, kinds[r % len(kinds)], r % images)
            if acceptable(roi, extra):
                break
        else:
            raise AssertionError(f"no acceptable RoI of kind {kinds[r % len(kinds)]}")
        rows.append(roi)
        extras.append(extra)
    for row in SPECIAL_ROIS[:specials]:
        rows.append(numpy.array(row, numpy.float64))
        extras.append(draw(rng, "inside", 0)[1])
    return numpy.array(rows).reshape(batch, 5), extras


def _conv_problem(batch, dtype):
    typed, exact, params = make_case((batch, *CONV), dtype, seed=batch)
    return Problem(typed, exact, params)


def _roi_problem(batch, dtype):
    case = ROI._replace(N=min(batch, 3))
    ph, pw = case.output_size
    rng = numpy.random.default_rng(batch)

    def draw(rng, kind, image):
        return draw_roi(rng, kind, case, image), draw_unit(rng, (2, ph, pw))

    rois, offsets = _draw_rois(rng, batch, max(case.N, 1), ROI_KINDS, draw,
                               lambda roi, offset: roi_acceptable(roi, offset, case))
    arrays = {"input": rng.standard_normal((case.N, case.C, case.H, case.W)), "rois": rois,
              "offset": numpy.array(offsets).reshape(batch, 2, ph, pw),
              "mask": draw_unit(rng, (batch, 1, ph, pw), positive=True),
              "grad_output": rng.standard_normal((batch, case.C, ph, pw))}
    typed, exact = typed_and_exact(arrays, dtype)
    return Problem(typed, exact, roi_params(case))


def _psroi_problem(batch, dtype):
    case = PS._replace(N=min(batch, 3))
    P, part = case.pooled_size, case.part
    rng = numpy.random.default_rng(batch)

    def draw(rng, kind, image):
        return draw_ps_roi(rng, kind, case, image), draw_unit(rng, (2 * case.num_classes, part,
                                                                     part))

    def acceptable(roi, trans):
        ws, hs = ps_positions(roi, trans, case)
        return not (near(ws, 0.5) or near(hs, 0.5))

    rois, trans = _draw_rois(rng, batch, max(case.N, 1), PS_KINDS, draw, acceptable)
    arrays = {"input": rng.standard_normal((case.N, case.C, case.H, case.W)), "rois": rois,
              "trans": numpy.array(trans).reshape(batch, 2 * case.num_classes, part, part),
              "grad_output": rng.standard_normal((batch, case.output_dim, P, P))}
    typed, exact = typed_and_exact(arrays, dtype)
    return Problem(typed, exact, ps_params(case))


PROBLEMS = {"deform_conv2d": _conv_problem, "deform_roi_pool": _roi_problem,
            "deform_psroi_pool": _psroi_problem}


@functools.lru_cache(maxsize=None)
def problem(op, batch, dtype):
    """The Problem of ``op`` at ``batch`` in the dtype named ``dtype``."""
    return PROBLEMS[op](batch, BY_NAME[dtype])


@functools.lru_cache(maxsize=None)
def reference_results(op, batch, dtype):
    """(outputs by name, gradients) of the float64 reference."""
    spec, p = _ops.SPECS[op], problem(op, batch, dtype)
    arrays = {name: p.exact[name] for name in spec.arrays}
    out = spec.reference_forward(**arrays, **p.params)
    outputs = dict(zip(spec.outputs, out if len(spec.outputs) > 1 else (out,)))
    grads = spec.grads_type(*spec.reference_backward(p.exact["grad_output"], **arrays,
                                                     **p.params))
    return outputs, grads


def run_public(op, name, arrays, params, **backward_options):
    """(outputs by name, gradients) of the public API with ``algorithm=name``;
    the backward gets what the forward returned for its extra arguments
    (PS RoI pooling's count)."""
    spec = _ops.SPECS[op]
    forward_arrays = {k: arrays[k] for k in spec.arrays}
    extra = {"return_count": True} if len(spec.outputs) > 1 else {}
    out = spec.forward(**forward_arrays, **params, **extra, algorithm=name)
    outputs = dict(zip(spec.outputs, out if len(spec.outputs) > 1 else (out,)))
    passed = {a.name: outputs[a.name] for a in spec.backward_args if a.name in outputs}
    grads = spec.backward(arrays["grad_output"], **forward_arrays, **params, **passed,
                          algorithm=name, **backward_options)
    return outputs, grads


def skip_unless_applies(op, name, p, places):
    """Skip, saying why, where ``name`` cannot run this problem here."""
    impl = implementation(op, name)
    if name not in cupydcn.algorithms(op):
        pytest.skip(f"{op} implementation {name!r} (runs on {', '.join(sorted(impl.runs_on))}) "
                    f"is not available in this installation")
    if places == CPU_PLACES and _dispatch.HOST in impl.runs_on and _dispatch._compiler() is None:
        pytest.skip(f"{op} implementation {name!r} runs on the CPU as host-built kernels, "
                    f"and no C++ compiler was found")
    dtype = p.typed["input"].dtype
    if impl.dtypes is not None and dtype.name not in impl.dtypes:
        pytest.skip(f"{op} implementation {name!r} does not support {dtype.name}")
    if impl.supports is not None:
        spec = _ops.SPECS[op]
        geo = spec.check(**{k: p.typed[k] for k in spec.arrays}, **p.params)
        reason = impl.supports(geo)
        if reason is not None:
            pytest.skip(f"{op} implementation {name!r} does not apply: {reason}")
    assert impl.runs_on & places


def compare_with_reference(op, name, outputs, grads, batch, dtype, record=None):
    spec = _ops.SPECS[op]
    ref_outputs, ref_grads = reference_results(op, batch, dtype_name(dtype))
    what = f"{op} {name} batch {batch}"
    output = outputs["output"]
    assert output.shape == ref_outputs["output"].shape, what
    assert output.dtype == numpy.dtype(dtype), what
    errors = {"forward": assert_close(output, ref_outputs["output"], dtype, f"{what} forward",
                                      forward_tolerance(op, name, dtype))}
    if "count" in ref_outputs:
        count = outputs["count"]
        assert count.dtype == _dtypes.lookup(dtype).acc, what
        numpy.testing.assert_array_equal(to_numpy(count), ref_outputs["count"], err_msg=what)
    assert isinstance(grads, spec.grads_type), what
    for field in spec.gradients:
        expected, got = getattr(ref_grads, field), getattr(grads, field)
        assert expected is not None, f"{what}: the problem leaves grad_{field} out"
        assert got is not None, f"{what}: grad_{field} not computed"
        assert got.shape == expected.shape and got.dtype == numpy.dtype(dtype), \
            f"{what} grad_{field}"
        errors[f"grad_{field}"] = assert_close(got, expected, dtype, f"{what} grad_{field}")
    if record is not None:
        for part, err in errors.items():
            record(dtype_name(dtype), f"{op} {name} {part}", err)


def test_problems_are_what_they_claim():
    """Batch 0, 1 and 33 in every op (RoIs over at most 3 images), non-finite
    RoI coordinates in the large batches, PS RoI samples in the clamped band
    [-0.5, 0) and past the right edge, the reference fed the rounded values."""
    for op in PROBLEMS:
        for batch in BATCHES:
            p = problem(op, batch, "float64")
            leading = p.typed["grad_output"].shape[0]
            assert leading == batch, (op, batch)
            if op != "deform_conv2d":
                assert p.typed["rois"].shape == (batch, 5), (op, batch)
                assert p.typed["input"].shape[0] == min(batch, 3), (op, batch)
                if batch == 33:
                    assert not numpy.all(numpy.isfinite(p.typed["rois"])), op
    ps = problem("deform_psroi_pool", 33, "float64")
    ws = numpy.concatenate([ps_positions(roi, ps.typed["trans"][r], PS)[0].ravel()
                            for r, roi in enumerate(ps.typed["rois"][:-3])])
    assert numpy.any((ws >= -0.5) & (ws < 0)) and numpy.any(ws > PS.W - 0.5)
    conv = problem("deform_conv2d", 1, "float16")
    numpy.testing.assert_array_equal(conv.exact["offset"], rounded(conv.typed["offset"],
                                                                   numpy.float16))


def test_registry_has_cpu_implementations_of_every_op():
    """The parametrization below is not empty: every op has a kernel
    implementation that runs on the host, and the reference."""
    for op, table in _dispatch._registry.items():
        names = {i.name for i in table if i.runs_on & CPU_PLACES}
        assert "reference" in names, op
        assert any(i.launch is not None and _dispatch.HOST in i.runs_on for i in table), op


# ---------------------------------------------------------------- CPU tier

@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("op, name", implementations(CPU_PLACES))
def test_cpu_implementation_matches_reference(op, name, dtype, batch):
    p = problem(op, batch, dtype_name(dtype))
    skip_unless_applies(op, name, p, CPU_PLACES)
    outputs, grads = run_public(op, name, p.typed, p.params)
    assert isinstance(outputs["output"], numpy.ndarray)
    compare_with_reference(op, name, outputs, grads, batch, dtype)


@pytest.mark.parametrize("op, name", implementations(CPU_PLACES))
def test_cpu_implementation_deterministic_flag(op, name, monkeypatch):
    """``deterministic=True`` is refused by an implementation that is not;
    one that is gives the same bits on every host grid (the host scatter's
    order of additions follows the grid), twice over."""
    dtype = numpy.float32
    p = problem(op, 33, dtype_name(dtype))
    skip_unless_applies(op, name, p, CPU_PLACES)
    impl = implementation(op, name)
    if not impl.deterministic:
        with pytest.raises(cupydcn.ArgumentError, match=f"algorithm '{name}' cannot run this "
                                                        f"{op} call: its backward is not "
                                                        f"deterministic"):
            run_public(op, name, p.typed, p.params, deterministic=True)
    else:
        grids = GRIDS if _dispatch.HOST in impl.runs_on else GRIDS[:1]
        runs = []
        for grid, block in grids:
            monkeypatch.setattr(_dispatch, "_host", _kernels.HostBackend(grid=grid, block=block))
            runs.append(run_public(op, name, p.typed, p.params, deterministic=True)[1])
        runs.append(run_public(op, name, p.typed, p.params, deterministic=True)[1])
        assert_bit_identical(runs, f"{op} {name}")
        compare_with_reference(op, name, run_public(op, name, p.typed, p.params)[0], runs[0],
                               33, dtype)


# ---------------------------------------------------------------- GPU tier

def _to_gpu(arrays):
    import cupy

    return {k: None if v is None else cupy.asarray(v) for k, v in arrays.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("op, name", implementations({_dispatch.CUDA}))
def test_gpu_implementation_matches_reference(gpu, op, name, dtype, batch, record_error):
    import cupy

    p = problem(op, batch, dtype_name(dtype))
    skip_unless_applies(op, name, p, {_dispatch.CUDA})
    outputs, grads = run_public(op, name, _to_gpu(p.typed), p.params)
    assert isinstance(outputs["output"], cupy.ndarray)
    compare_with_reference(op, name, outputs, grads, batch, dtype, record=record_error)
