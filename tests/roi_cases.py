"""Test cases of deform_roi_pool and deform_psroi_pool shared by the RoI test
files (test_roi_pool_*.py, test_psroi_pool_*.py, test_implementations.py):
drawn RoIs, the kernel paths on a backend, the float64 reference, comparisons.

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

from cupydcn import _kernels, _roi_pool, _validation, reference
from helpers import assert_close, dtype_name, rounded, to_numpy

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


def roi_run(backend, typed, case, wrt=_roi_pool.ROI_GRADIENTS, deterministic=False,
            lanes=None):
    geo = _validation.check_deform_roi_pool(typed["input"], typed["rois"], typed["offset"],
                                            mask=typed["mask"], grad_output=typed["grad_output"],
                                            check_batch=False, **roi_params(case))
    out = _roi_pool.roi_pool_forward(backend, geo, typed["input"], typed["rois"],
                                     typed["offset"], typed["mask"])
    wrt = _validation.check_wrt(wrt, _roi_pool.ROI_GRADIENTS, offset=typed["offset"],
                               mask=typed["mask"])
    grads = _roi_pool.roi_pool_backward(backend, geo, typed["grad_output"], typed["input"],
                                        typed["rois"], typed["offset"], typed["mask"], wrt,
                                        deterministic, lanes)
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

class NoLaunch(_kernels.HostBackend):
    """A host backend on which any launch is a failure (empty problems)."""

    def launch(self, *args):
        raise AssertionError("an empty problem launched a kernel")

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
           deterministic=False, lanes=None):
    geo = _validation.check_deform_psroi_pool(typed["input"], typed["rois"], typed["trans"],
                                              grad_output=typed["grad_output"],
                                              check_batch=False, **ps_params(case))
    out, count = _roi_pool.psroi_pool_forward(backend, geo, typed["input"], typed["rois"],
                                              typed["trans"])
    wrt = _validation.check_wrt(wrt, _roi_pool.PSROI_GRADIENTS, trans=typed["trans"])
    grads = _roi_pool.psroi_pool_backward(backend, geo, typed["grad_output"], typed["input"],
                                          typed["rois"], typed["trans"],
                                          count if pass_count else None, wrt, deterministic,
                                          lanes)
    return out, count, grads

# ======================================================================
# bit-for-bit comparisons (the deterministic backwards)
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
