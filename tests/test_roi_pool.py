"""deform_roi_pool, deform_psroi_pool and their backwards: the kernels against
the float64 reference.

CPU tier: the kernel source compiled for the host (``host`` fixture) runs the
kernel paths of both ops on NumPy arrays, for every dtype, over RoIs inside,
partly outside, wholly outside, degenerate, huge and non-finite, and invalid
batch indices. The deterministic backwards (no floating-point atomics) are
held to the same reference and must give the same bits on every host grid and
index width (the workspace limit, which fixes the chunks, held). GPU tier (marker ``gpu``): the same
comparisons on CuPy arrays, three deterministic runs bit for bit, the public
API on the GPU and the torchvision RoIAlign cross-check. Every buffer a kernel
must fill starts as NaN.

Test data: RoI coordinates, offsets, masks and trans are multiples of 1/8 or
1/64, exact in every dtype, so all dtypes see the same geometry. RoIs are
redrawn (seeded) until no sample lies within 1e-4 of a point where the op is
discontinuous or kinked (integers for RoIAlign's rule, multiples of 0.5 for
the position-sensitive op, integral adaptive grid ratios): there float32 and
float64 positions could take different branches. For offset gradients no
sample lies in [-1, 0), where mmcv's rule and the exact derivative differ;
that band has its own tests (test_roi_offset_grad_clamped_band_*).
"""

from typing import NamedTuple

import numpy
import pytest

import cupydcn
from cupydcn import _config, _dtypes, _kernels, _roi_pool, _validation, reference
from helpers import DTYPES, assert_close, dtype_name, rel_err, rounded, to_numpy

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

GUARD = 1e-4   # how close to a discontinuity a sample may not come


def exact_everywhere(x):
    """Values exact in every dtype: rounded to the coarsest (bfloat16)."""
    x = numpy.asarray(x, numpy.float64)
    if ml_dtypes is not None:
        x = rounded(x, ml_dtypes.bfloat16)
    return x


def near(values, step):
    """True when some finite value lies within GUARD of a multiple of ``step``."""
    v = numpy.asarray(values, numpy.float64) / step
    v = v[numpy.isfinite(v)]
    return bool(numpy.any(numpy.abs(v - numpy.round(v)) * step < GUARD))


def typed_and_exact(arrays, dtype):
    """(arrays cast to dtype, the same values in float64) for the kernels and
    the reference; 1e30 becomes inf in float16 in both."""
    with numpy.errstate(over="ignore"):
        typed = {k: None if v is None else v.astype(dtype) for k, v in arrays.items()}
        exact = {k: None if v is None else rounded(v, dtype) for k, v in arrays.items()}
    return typed, exact


# ======================================================================
# deform_roi_pool
# ======================================================================


class RoICase(NamedTuple):
    name: str
    N: int
    C: int
    H: int
    W: int
    output_size: tuple
    spatial_scale: float
    sampling_ratio: int
    offset: bool
    mask: bool
    gamma: float = 0.1


ROI_CASES = [
    RoICase("plain-sr0-s1-7x7", 2, 3, 9, 11, (7, 7), 1.0, 0, False, False),
    RoICase("plain-sr2-s0.5-3x2", 2, 4, 8, 10, (3, 2), 0.5, 2, False, False),
    RoICase("offset-sr0-s0.5-3x2", 2, 3, 10, 9, (3, 2), 0.5, 0, True, False),
    RoICase("offset-sr2-s1-7x7", 2, 2, 7, 12, (7, 7), 1.0, 2, True, False),
    RoICase("offset+mask-sr0-s1-3x2", 2, 3, 9, 8, (3, 2), 1.0, 0, True, True),
    RoICase("offset+mask-sr2-s0.5-7x7", 2, 2, 8, 11, (7, 7), 0.5, 2, True, True, 0.2),
    RoICase("mask-sr2-s1-3x2", 1, 3, 6, 7, (3, 2), 1.0, 2, False, True),
]

# Partly outside over the left/top edge (samples in [-1, 0) are unavoidable
# with an adaptive grid) and the RoI covering everything: plain cases only.
ROI_KINDS = ("inside", "inside", "right-bottom", "outside-right", "outside-left", "degenerate")
ROI_KINDS_PLAIN = ROI_KINDS + ("left-top", "big")


def draw_interval(rng, kind, size):
    """(f1, f2) in feature-map coordinates along one axis of ``size`` pixels."""
    u = rng.uniform
    if kind == "inside":
        f1 = u(0.3, 0.5 * size)
        return f1, u(f1 + 1.5, size - 1.3)
    if kind == "right-bottom":
        return u(0.5 * size, size - 1.5), u(size + 0.5, size + 4)
    if kind == "left-top":
        return u(-4, -0.5), u(1, 0.6 * size)
    if kind == "outside-right":
        f1 = u(size + 1.5, size + 3)
        return f1, f1 + u(1, 3)
    if kind == "outside-left":
        return u(-9, -7), u(-5, -3)
    if kind == "big":
        return u(-3, -1.2), u(size + 1, size + 3)
    raise ValueError(kind)


def draw_roi(rng, kind, case, batch):
    """[b, x1, y1, x2, y2] in image coordinates (start = x1*scale - 0.5)."""
    x_kind = "inside" if kind == "degenerate" else kind
    fx1, fx2 = draw_interval(rng, x_kind, case.W)
    fy1, fy2 = draw_interval(rng, kind if kind != "degenerate" else "inside", case.H)
    if kind == "degenerate":  # x2 < x1
        fx1, fx2 = fx2, fx2 - rng.uniform(0.5, 2)
    coords = (numpy.array([fx1, fy1, fx2, fy2]) + 0.5) / case.spatial_scale
    return exact_everywhere(numpy.concatenate([[batch], numpy.round(coords * 8) / 8]))


def draw_unit(rng, shape, positive=False):
    """Nonzero multiples of 1/64 in [-1, 1] (in (0, 1] when ``positive``)."""
    magnitude = rng.integers(1, 65, shape) / 64
    if positive:
        return magnitude
    return magnitude * rng.choice([-1.0, 1.0], shape)


def roi_positions(roi, offset_r, case):
    """(adaptive ratios, sample ys, sample xs) of one RoI in float64."""
    ph, pw = case.output_size
    scale = case.spatial_scale
    sx, sy = roi[1] * scale - 0.5, roi[2] * scale - 0.5
    rw, rh = roi[3] * scale - 0.5 - sx, roi[4] * scale - 0.5 - sy
    grid = [case.sampling_ratio or int(min(max(numpy.ceil(extent / pooled), 0), 64))
            for extent, pooled in ((rh, ph), (rw, pw))]
    py, px = numpy.meshgrid(numpy.arange(ph), numpy.arange(pw), indexing="ij")
    by, bx = sy + py * rh / ph, sx + px * rw / pw
    if offset_r is not None:
        bx = bx + case.gamma * rw * offset_r[0]
        by = by + case.gamma * rh * offset_r[1]
    ys = by[..., None] + (numpy.arange(grid[0]) + 0.5) * (rh / ph) / max(grid[0], 1)
    xs = bx[..., None] + (numpy.arange(grid[1]) + 0.5) * (rw / pw) / max(grid[1], 1)
    return (rh / ph, rw / pw), ys, xs


def in_clamped_band(values):
    values = numpy.asarray(values)
    return bool(numpy.any((values >= -1) & (values < 0)))


def roi_acceptable(roi, offset_r, case):
    ratios, ys, xs = roi_positions(roi, offset_r, case)
    if case.sampling_ratio == 0 and near(ratios, 1.0):
        return False
    if near(ys, 1.0) or near(xs, 1.0):
        return False
    return not (case.offset and (in_clamped_band(ys) or in_clamped_band(xs)))


def special_rois(N):
    """Rows the kernels must turn into zeros: non-finite or absurd
    coordinates, invalid batch indices."""
    nan, inf = float("nan"), float("inf")
    return numpy.array([
        [0, nan, 1, 3, 4],
        [1, 1, 2, inf, 5],
        [0, 1, 1, 1e30, 4],
        [N, 1, 1, 4, 4],       # batch index out of range
        [-1, 1, 1, 4, 4],
        [0.5, 1, 1, 4, 4],     # not an integer
        [nan, 1, 1, 4, 4],
    ])


def make_roi_case(case, seed=0, specials=True):
    """Random arrays (float64, exact in every dtype) for one case."""
    rng = numpy.random.default_rng(seed)
    ph, pw = case.output_size
    kinds = ROI_KINDS if case.offset else ROI_KINDS_PLAIN
    rois, offsets = [], []
    for r, kind in enumerate(kinds):
        for _ in range(5000):
            roi = draw_roi(rng, kind, case, r % case.N)
            offset_r = draw_unit(rng, (2, ph, pw)) if case.offset else None
            if roi_acceptable(roi, offset_r, case):
                break
        else:
            raise AssertionError(f"{case.name}: no acceptable RoI of kind {kind}")
        rois.append(roi)
        offsets.append(offset_r)
    if specials:
        extra = special_rois(case.N)
        rois.extend(extra)
        offsets.extend(draw_unit(rng, (len(extra), 2, ph, pw)) if case.offset else [None] * len(extra))
    R = len(rois)
    arrays = {
        "input": rng.standard_normal((case.N, case.C, case.H, case.W)),
        "rois": numpy.array(rois),
        "offset": numpy.array(offsets) if case.offset else None,
        "mask": draw_unit(rng, (R, 1, ph, pw), positive=True) if case.mask else None,
        "grad_output": rng.standard_normal((R, case.C, ph, pw)),
    }
    if specials and case.offset:
        arrays["offset"][0, 0, 0, pw - 1] = float("nan")   # that bin pools to 0
    if specials and case.mask:
        arrays["mask"][1, 0, ph - 1, 0] = float("inf")
    return arrays


def roi_params(case):
    return dict(output_size=case.output_size, spatial_scale=case.spatial_scale,
                sampling_ratio=case.sampling_ratio, gamma=case.gamma)


def roi_reference(exact, case):
    params = roi_params(case)
    out = reference.deform_roi_pool(exact["input"], exact["rois"], exact["offset"],
                                    mask=exact["mask"], **params)
    grads = reference.deform_roi_pool_backward(exact["grad_output"], exact["input"],
                                               exact["rois"], exact["offset"],
                                               mask=exact["mask"], **params)
    return out, _roi_pool.DeformRoIPoolGrads(*grads)


def roi_run(backend, typed, case, wrt=_roi_pool.ROI_GRADIENTS, deterministic=False):
    geo = _validation.check_deform_roi_pool(typed["input"], typed["rois"], typed["offset"],
                                            mask=typed["mask"], grad_output=typed["grad_output"],
                                            check_batch=False, **roi_params(case))
    out = _roi_pool.roi_pool_forward(backend, geo, typed["input"], typed["rois"],
                                     typed["offset"], typed["mask"])
    wrt = _validation.check_wrt(wrt, _roi_pool.ROI_GRADIENTS, offset=typed["offset"],
                               mask=typed["mask"])
    grads = _roi_pool.roi_pool_backward(backend, geo, typed["grad_output"], typed["input"],
                                        typed["rois"], typed["offset"], typed["mask"], wrt,
                                        deterministic)
    return out, grads


def compare(out, grads, ref_out, ref_grads, dtype, op, record=None):
    assert to_numpy(out).shape == ref_out.shape
    assert out.dtype == numpy.dtype(dtype)
    errors = {"forward": assert_close(out, ref_out, dtype, f"{op} forward")}
    for name, expected in ref_grads._asdict().items():
        got = getattr(grads, name)
        if expected is None:
            assert got is None, name
            continue
        assert got.dtype == numpy.dtype(dtype), name
        errors[f"grad_{name}"] = assert_close(got, expected, dtype, f"{op} grad_{name}")
    if record is not None:
        for what, err in errors.items():
            record(dtype_name(dtype), f"{op} {what}", err)
    return errors


# ---------------------------------------------------------------- CPU tier

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


class _NoLaunch(_kernels.HostBackend):
    def launch(self, *args):
        raise AssertionError("an empty problem launched a kernel")


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
    out, grads = roi_run(_NoLaunch(), typed, case, deterministic=deterministic)
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


# ---------------------------------------------------------------- public API (CPU)

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


# ======================================================================
# deform_psroi_pool
# ======================================================================


class PSCase(NamedTuple):
    name: str
    N: int
    H: int
    W: int
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int          # as passed: 0 means pooled_size
    sample_per_part: int
    num_classes: int        # 0: no trans
    spatial_scale: float
    trans_std: float = 0.1

    @property
    def part(self):
        return self.part_size or self.pooled_size

    @property
    def C(self):
        return self.output_dim * self.group_size**2


PS_CASES = [
    PSCase("notrans-g1-p3-spp1", 2, 8, 9, 3, 1, 3, 0, 1, 0, 0.3),
    PSCase("notrans-g2-p4-spp3", 2, 9, 10, 2, 2, 4, 0, 3, 0, 0.7),
    PSCase("trans-g2-p4-part2-spp3", 2, 9, 10, 2, 2, 4, 2, 3, 1, 0.5),
    PSCase("trans2cls-g3-p3-spp3", 2, 8, 8, 4, 3, 3, 3, 3, 2, 1.0, 0.2),
    PSCase("trans2cls-g1-p5-part3-spp1", 1, 7, 11, 2, 1, 5, 3, 1, 2, 0.75),
]

# "clamp-left": left-top, redrawn until a sample lies in the clamped band [-0.5, 0)
PS_KINDS = ("inside", "inside", "right-bottom", "left-top", "clamp-left", "outside-right",
            "outside-left", "big", "small", "halves")


def draw_ps_roi(rng, kind, case, batch):
    if kind == "small":   # round(x2) + 1 <= round(x1): roi_w clamped to 0.1
        fx1, fy1 = rng.uniform(1, case.W - 2), rng.uniform(1, case.H - 2)
        coords = numpy.array([fx1, fy1, fx1 - rng.uniform(1, 2), fy1 - rng.uniform(1, 2)])
        coords = coords / case.spatial_scale
    else:
        interval = {"halves": "inside", "clamp-left": "left-top"}.get(kind, kind)
        fx1, fx2 = draw_interval(rng, interval, case.W)
        fy1, fy2 = draw_interval(rng, interval, case.H)
        coords = (numpy.array([fx1, fy1, fx2, fy2]) + 0.5) / case.spatial_scale
    step = 2 if kind == "halves" else 8   # .5 coordinates: C's round goes away from zero
    coords = numpy.round(coords * step) / step
    if kind == "halves":
        coords = numpy.floor(coords) + 0.5
    return exact_everywhere(numpy.concatenate([[batch], coords]))


def ps_positions(roi, trans_r, case):
    """Sample (ws, hs) of one RoI for every class in float64."""
    P, spp, s = case.pooled_size, case.sample_per_part, case.spatial_scale
    cround = reference._c_round
    start_w, start_h = cround(roi[1]) * s - 0.5, cround(roi[2]) * s - 0.5
    roi_w = max((cround(roi[3]) + 1) * s - 0.5 - start_w, 0.1)
    roi_h = max((cround(roi[4]) + 1) * s - 0.5 - start_h, 0.1)
    bins = numpy.arange(P)
    part = bins * case.part // P
    ws, hs = [], []
    for cls in range(max(case.num_classes, 1)):
        tx = ty = numpy.zeros((P, P))
        if trans_r is not None:
            tx = trans_r[2 * cls][part[:, None], part[None, :]]
            ty = trans_r[2 * cls + 1][part[:, None], part[None, :]]
        wstart = bins[None, :] * roi_w / P + start_w + tx * case.trans_std * roi_w
        hstart = bins[:, None] * roi_h / P + start_h + ty * case.trans_std * roi_h
        ws.append(wstart[..., None] + numpy.arange(spp) * roi_w / P / spp)
        hs.append(hstart[..., None] + numpy.arange(spp) * roi_h / P / spp)
    return numpy.array(ws), numpy.array(hs)


def make_ps_case(case, seed=0, specials=True):
    rng = numpy.random.default_rng(seed)
    P, part = case.pooled_size, case.part
    rois, trans = [], []
    for r, kind in enumerate(PS_KINDS):
        for _ in range(5000):
            roi = draw_ps_roi(rng, kind, case, r % case.N)
            trans_r = draw_unit(rng, (2 * case.num_classes, part, part)) if case.num_classes else None
            ws, hs = ps_positions(roi, trans_r, case)
            clamped = numpy.any((ws >= -0.5) & (ws < 0))
            if kind == "clamp-left" and not clamped:
                continue
            if not (near(ws, 0.5) or near(hs, 0.5)):   # skip bounds, clamps, floor/ceil
                break
        else:
            raise AssertionError(f"{case.name}: no acceptable RoI of kind {kind}")
        rois.append(roi)
        trans.append(trans_r)
    if specials:
        extra = special_rois(case.N)
        extra[2] = [0, 3, 1, 1e30, 4]
        rois.extend(extra)
        if case.num_classes:
            trans.extend(draw_unit(rng, (len(extra), 2 * case.num_classes, part, part)))
    R = len(rois)
    arrays = {
        "input": rng.standard_normal((case.N, case.C, case.H, case.W)),
        "rois": numpy.array(rois),
        "trans": numpy.array(trans) if case.num_classes else None,
        "grad_output": rng.standard_normal((R, case.output_dim, P, P)),
    }
    if specials and case.num_classes:
        arrays["trans"][0, 2 * case.num_classes - 1, 0, 0] = float("nan")
    return arrays


def ps_params(case):
    return dict(spatial_scale=case.spatial_scale, output_dim=case.output_dim,
                group_size=case.group_size, pooled_size=case.pooled_size,
                part_size=case.part_size, sample_per_part=case.sample_per_part,
                trans_std=case.trans_std)


def ps_reference(exact, case):
    out, count = reference.deform_psroi_pool(exact["input"], exact["rois"], exact["trans"],
                                             **ps_params(case))
    grads = reference.deform_psroi_pool_backward(exact["grad_output"], exact["input"],
                                                 exact["rois"], exact["trans"], **ps_params(case))
    return out, count, _roi_pool.DeformPSRoIPoolGrads(*grads)


def ps_run(backend, typed, case, wrt=_roi_pool.PSROI_GRADIENTS, pass_count=True,
           deterministic=False):
    geo = _validation.check_deform_psroi_pool(typed["input"], typed["rois"], typed["trans"],
                                              grad_output=typed["grad_output"],
                                              check_batch=False, **ps_params(case))
    out, count = _roi_pool.psroi_pool_forward(backend, geo, typed["input"], typed["rois"],
                                              typed["trans"])
    wrt = _validation.check_wrt(wrt, _roi_pool.PSROI_GRADIENTS, trans=typed["trans"])
    grads = _roi_pool.psroi_pool_backward(backend, geo, typed["grad_output"], typed["input"],
                                          typed["rois"], typed["trans"],
                                          count if pass_count else None, wrt, deterministic)
    return out, count, grads


# ---------------------------------------------------------------- CPU tier

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
    out, count, grads = ps_run(_NoLaunch(), typed, case, deterministic=deterministic)
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


# ---------------------------------------------------------------- public API (CPU)

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


# ======================================================================
# deterministic backward (deterministic=True: no floating-point atomics)
# ======================================================================

# Host "launch configurations": the atomic scatter runs serially on the host,
# but its order of additions follows the grid-stride loop, so these change the
# scatter's bits (test_host_scatter_bits_depend_on_the_grid) and must not
# change the deterministic gradients.
GRIDS = ((1, 1), (3, 5), (16, 32))


def _bits(result):
    """Every array of a result (arrays, named tuples, None) as raw bytes."""
    if result is None:
        return [None]
    if isinstance(result, tuple):
        return [b for item in result for b in _bits(item)]
    array = to_numpy(result) if hasattr(result, "get") else numpy.asarray(result)
    return [(array.dtype.str, array.shape, array.tobytes())]


def assert_bit_identical(results, what):
    first = _bits(results[0])
    for other in results[1:]:
        assert _bits(other) == first, f"{what}: results differ bit for bit"


def assert_all_finite(grads):
    for name, g in grads._asdict().items():
        if g is not None:
            assert numpy.all(numpy.isfinite(to_numpy(g))), name


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


def test_deterministic_public_api_numpy_and_wrt(host):
    """The keyword on the public API: NumPy inputs run the (deterministic)
    reference; ``wrt`` still selects what is computed."""
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


# ======================================================================
# validation
# ======================================================================


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


def test_validation_error_then_valid_call_works():
    args = _roi_args()
    with pytest.raises(ValueError):
        cupydcn.deform_roi_pool(**dict(args, offset=args["offset"][:1]))
    assert numpy.all(numpy.isfinite(cupydcn.deform_roi_pool(**args)))


# ======================================================================
# GPU tier
# ======================================================================


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
