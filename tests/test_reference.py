"""Tests of the NumPy reference (``cupydcn.reference``) against docs/semantics.md.

Known-answer identities (zero offsets = conv2d, integer offsets = shifted
conv2d, zero mask = bias), hand-derived numbers, mmcv's golden values, small
plain-loop transcriptions of the rules, and central finite differences for
every gradient. All in float64 with seeded generators; no GPU needed.
"""

import warnings

import ml_dtypes
import numpy as np
import pytest

from cupydcn import reference as ref

EPS = 1e-6


def rel_err(actual, expected):
    return np.linalg.norm(np.ravel(actual - expected)) / np.linalg.norm(np.ravel(expected))


def numeric_grad(f, arr, eps=EPS):
    """Central differences of the scalar ``f()`` with respect to every element of
    ``arr`` (modified in place and restored)."""
    grad = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for n in range(flat.size):
        keep = flat[n]
        flat[n] = keep + eps
        up = f()
        flat[n] = keep - eps
        down = f()
        flat[n] = keep
        gflat[n] = (up - down) / (2 * eps)
    return grad


def fractional(rng, shape, low, high):
    """Random integers in [low, high) plus a fraction in [0.1, 0.9]: away from
    pixel boundaries, so bilinear sampling is smooth there."""
    return rng.integers(low, high, size=shape) + rng.uniform(0.1, 0.9, size=shape)


# --------------------------------------------------------------------------
# Deformable convolution
# --------------------------------------------------------------------------


def out_size(size, k, s, p, d):
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def shift(img, dy, dx):
    """``S[..., y, x] = img[..., y + dy, x + dx]``, 0 outside the image."""
    h, w = img.shape[-2:]
    out = np.zeros_like(img)
    out[..., max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)] = \
        img[..., max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
    return out


def direct_conv2d(x, weight, bias, stride, padding, dilation, shifts=None):
    """Ordinary grouped conv2d, one slice per kernel tap. ``shifts`` (dg, kh*kw, 2)
    ints, if given, shift the input of each (offset group, tap) by (dy, dx)."""
    b, c, h, w = x.shape
    cout, cw, kh, kw = weight.shape
    groups, cog = c // cw, cout // (c // cw)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    # A margin m around the zero padding, so that a shift reads pixels that the
    # padding alone would have left out of the window.
    m = 0 if shifts is None else int(np.abs(shifts).max())
    xp = np.pad(x, ((0, 0), (0, 0), (ph + m, ph + m), (pw + m, pw + m)))
    out = np.zeros((b, cout, ho, wo))
    for i in range(kh):
        for j in range(kw):
            src = xp
            if shifts is not None:
                dg = shifts.shape[0]
                src = np.concatenate([shift(part, *shifts[g, i * kw + j])
                                      for g, part in enumerate(np.split(xp, dg, axis=1))], axis=1)
            y0, x0 = m + i * dh, m + j * dw
            patch = src[:, :, y0:y0 + sh * (ho - 1) + 1:sh, x0:x0 + sw * (wo - 1) + 1:sw]
            for g in range(groups):
                out[:, g * cog:(g + 1) * cog] += np.einsum(
                    "oc,bchw->bohw", weight[g * cog:(g + 1) * cog, :, i, j],
                    patch[:, g * cw:(g + 1) * cw])
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def loop_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask):
    """torchvision's forward written one output element at a time (tiny sizes only)."""
    b, c, h, w = x.shape
    cout, cw, kh, kw = weight.shape
    cog = cout // (c // cw)
    dg = offset.shape[1] // (2 * kh * kw)
    ho, wo = offset.shape[2:]

    def sample(img, y, xx):
        if y <= -1 or y >= h or xx <= -1 or xx >= w:
            return 0.0
        y0, x0 = int(np.floor(y)), int(np.floor(xx))
        ly, lx = y - y0, xx - x0
        total = 0.0
        for yy, xc, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                           (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
            if 0 <= yy < h and 0 <= xc < w:
                total += wt * img[yy, xc]
        return total

    out = np.zeros((b, cout, ho, wo))
    for n in range(b):
        for o in range(cout):
            grp = o // cog
            for oy in range(ho):
                for ox in range(wo):
                    acc = 0.0 if bias is None else bias[o]
                    for cc in range(cw):
                        ch = grp * cw + cc
                        g = ch // (c // dg)
                        for i in range(kh):
                            for j in range(kw):
                                k = i * kw + j
                                dy = offset[n, g * 2 * kh * kw + 2 * k, oy, ox]
                                dx = offset[n, g * 2 * kh * kw + 2 * k + 1, oy, ox]
                                m = 1.0 if mask is None else mask[n, g * kh * kw + k, oy, ox]
                                y = oy * stride[0] - padding[0] + i * dilation[0] + dy
                                xx = ox * stride[1] - padding[1] + j * dilation[1] + dx
                                acc += weight[o, cc, i, j] * m * sample(x[n, ch], y, xx)
                    out[n, o, oy, ox] = acc
    return out


# (B, C, H, W, Cout, groups, dg, (kh, kw), stride, padding, dilation)
CONV_CASES = [
    (1, 4, 7, 9, 6, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 4, 9, 11, 4, 2, 1, (3, 2), (2, 1), (1, 0), (1, 2)),
    (3, 8, 9, 11, 6, 2, 2, (3, 3), (2, 2), (2, 1), (2, 2)),
    (1, 6, 5, 8, 3, 3, 2, (1, 3), (1, 2), (0, 2), (1, 1)),
    (2, 4, 6, 5, 4, 4, 4, (2, 2), (1, 1), (0, 0), (1, 1)),
    (3, 4, 8, 7, 2, 2, 2, (2, 3), (3, 2), (2, 3), (2, 1)),
]


def conv_inputs(rng, case, offset_fn=None, mask_fn=None):
    b, c, h, w, cout, groups, dg, (kh, kw), stride, padding, dilation = case
    ho, wo = out_size(h, kh, stride[0], padding[0], dilation[0]), \
        out_size(w, kw, stride[1], padding[1], dilation[1])
    x = rng.standard_normal((b, c, h, w))
    weight = rng.standard_normal((cout, c // groups, kh, kw))
    bias = rng.standard_normal(cout)
    oshape = (b, 2 * dg * kh * kw, ho, wo)
    offset = np.zeros(oshape) if offset_fn is None else offset_fn(oshape)
    mshape = (b, dg * kh * kw, ho, wo)
    mask = np.ones(mshape) if mask_fn is None else mask_fn(mshape)
    return x, offset, weight, bias, mask, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("case", CONV_CASES)
def test_zero_offset_is_conv2d(case):
    rng = np.random.default_rng(1)
    x, offset, weight, bias, mask, geo = conv_inputs(rng, case)
    expected = direct_conv2d(x, weight, bias, **geo)
    np.testing.assert_allclose(ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo),
                               expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.deform_conv2d(x, offset, weight, None, **geo),
                               expected - bias[None, :, None, None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_integer_offsets_are_shifted_conv2d(case):
    rng = np.random.default_rng(2)
    x, offset, weight, bias, mask, geo = conv_inputs(rng, case)
    dg, taps = offset.shape[1] // 2 // (weight.shape[2] * weight.shape[3]), \
        weight.shape[2] * weight.shape[3]
    shifts = rng.integers(-3, 4, size=(dg, taps, 2))
    offset = np.broadcast_to(shifts.reshape(1, -1, 1, 1), offset.shape).astype(np.float64)
    expected = direct_conv2d(x, weight, bias, shifts=shifts, **geo)
    np.testing.assert_allclose(ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo),
                               expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_fractional_offsets_match_loop_transcription(case):
    rng = np.random.default_rng(3)
    case = (1,) + case[1:]
    x, offset, weight, bias, mask, geo = conv_inputs(
        rng, case, lambda s: rng.uniform(-3.0, 3.0, s), lambda s: rng.uniform(0, 1, s))
    expected = loop_deform_conv2d(x, offset, weight, bias, mask=mask, **geo)
    np.testing.assert_allclose(ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo),
                               expected, rtol=1e-12, atol=1e-12)


def test_zero_mask_gives_bias():
    rng = np.random.default_rng(4)
    x, offset, weight, bias, mask, geo = conv_inputs(
        rng, CONV_CASES[2], lambda s: rng.uniform(-2.0, 2.0, s), np.zeros)
    out = ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo)
    np.testing.assert_array_equal(out, np.broadcast_to(bias[None, :, None, None], out.shape))
    np.testing.assert_array_equal(ref.deform_conv2d(x, offset, weight, None, mask=mask, **geo), 0.0)


def test_v1_equals_v2_with_unit_mask():
    rng = np.random.default_rng(5)
    x, offset, weight, bias, mask, geo = conv_inputs(
        rng, CONV_CASES[2], lambda s: fractional(rng, s, -2, 2))
    grad = rng.standard_normal(ref.deform_conv2d(x, offset, weight, bias, **geo).shape)
    np.testing.assert_array_equal(ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo),
                                  ref.deform_conv2d(x, offset, weight, bias, **geo))
    g1 = ref.deform_conv2d_backward(grad, x, offset, weight, bias, **geo)
    g2 = ref.deform_conv2d_backward(grad, x, offset, weight, bias, mask=mask, **geo)
    assert g1[4] is None and g2[4].shape == mask.shape
    for a, b in zip(g1[:4], g2[:4]):
        np.testing.assert_array_equal(a, b)
    assert ref.deform_conv2d_backward(grad, x, offset, weight, None, **geo)[3] is None


@pytest.mark.parametrize("case, modulated", [
    # samples mostly inside the image
    ((2, 4, 6, 7, 4, 2, 2, (3, 2), (1, 2), (0, 0), (1, 1)), True),
    # padding and large offsets: samples near and over every border
    ((2, 4, 5, 6, 2, 2, 1, (2, 3), (1, 1), (2, 1), (2, 1)), True),
    ((1, 4, 5, 6, 4, 1, 2, (2, 2), (2, 1), (1, 1), (1, 2)), False),
])
def test_conv_gradients_by_finite_differences(case, modulated):
    rng = np.random.default_rng(6)
    x, offset, weight, bias, mask, geo = conv_inputs(
        rng, case, lambda s: fractional(rng, s, -3, 3), lambda s: rng.uniform(0.2, 1.0, s))
    mask = mask if modulated else None
    grad = rng.standard_normal(ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo).shape)

    def f():
        return np.sum(ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo) * grad)

    analytic = ref.deform_conv2d_backward(grad, x, offset, weight, bias, mask=mask, **geo)
    for name, arr, g in zip(("input", "offset", "weight", "bias", "mask"),
                            (x, offset, weight, bias, mask), analytic):
        if arr is None:
            assert g is None
            continue
        assert g.shape == arr.shape, name
        assert rel_err(g, numeric_grad(f, arr)) < 1e-6, name


def test_offset_gradient_at_minus_one_is_one_sided():
    # 1x1 kernel, padding 1, zero offsets, 2x2 image I = [[1, 2], [3, 4]], weight 2,
    # grad_out all ones: output (4, 4), output pixel (oy, ox) samples y = oy - 1,
    # x = ox - 1. Row oy = 0 samples y == -1: the forward reads 0 there (open
    # interval), but torchvision's offset gradient uses the in-image corners only:
    # y0 = -1 (off image), y1 = 0, lx = 0, so d/d(dy) = w * (I[0, x] - 0) = 2*I[0, x]
    # for x in {0, 1}, i.e. [0, 2, 4, 0] along ox; d/d(dx) = hy*(I[-1, x+1] - I[-1, x]) = 0.
    # Column ox = 0 samples x == -1 the same way: d/d(dx) = 2*I[y, 0] = [0, 2, 6, 0] along oy.
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    weight = np.full((1, 1, 1, 1), 2.0)
    offset = np.zeros((1, 2, 4, 4))
    geo = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    out = ref.deform_conv2d(x, offset, weight, **geo)
    np.testing.assert_array_equal(out[0, 0, 0], 0.0)
    np.testing.assert_array_equal(out[0, 0, 1:3, 1:3], 2 * x[0, 0])
    _, g_off, _, _, _ = ref.deform_conv2d_backward(np.ones((1, 1, 4, 4)), x, offset, weight, **geo)
    np.testing.assert_array_equal(g_off[0, 0, 0], [0.0, 2.0, 4.0, 0.0])
    np.testing.assert_array_equal(g_off[0, 1, 0], 0.0)
    np.testing.assert_array_equal(g_off[0, 1, :, 0], [0.0, 2.0, 6.0, 0.0])
    # y == H (bottom row, oy = 3): no in-image corner, so 0 (the rule is one-sided).
    np.testing.assert_array_equal(g_off[0, 0, 3], 0.0)
    # It is the derivative from the inside: (f(t) - f(0)) / t for small t > 0.
    t = 1e-7
    up = offset.copy()
    up[0, 0, 0, 1] = t
    fd = (ref.deform_conv2d(x, up, weight, **geo) - out).sum() / t
    assert abs(fd - 2.0) < 1e-6


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_conv_low_precision_inputs_compute_in_float64(dtype):
    rng = np.random.default_rng(7)
    x, offset, weight, bias, mask, geo = conv_inputs(
        rng, CONV_CASES[1], lambda s: rng.uniform(-2, 2, s), lambda s: rng.uniform(0, 1, s))
    low = [a.astype(dtype) for a in (x, offset, weight, bias, mask)]
    up = [a.astype(np.float64) for a in low]
    out = ref.deform_conv2d(*low[:4], mask=low[4], **geo)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, ref.deform_conv2d(*up[:4], mask=up[4], **geo))
    grads = ref.deform_conv2d_backward(np.ones(out.shape, dtype), *low[:4], mask=low[4], **geo)
    assert all(g.dtype == np.float64 for g in grads)


def test_conv_non_finite_offsets_are_outside():
    rng = np.random.default_rng(8)
    x, offset, weight, bias, mask, geo = conv_inputs(
        rng, CONV_CASES[2], lambda s: rng.uniform(-2, 2, s), lambda s: rng.uniform(0, 1, s))
    bad = rng.random(offset.shape) < 0.2
    offset[bad] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30, 1e308], size=bad.sum())
    far = np.where(bad, -1e6, offset)   # a finite position outside the image
    grad = rng.standard_normal(ref.deform_conv2d(x, far, weight, bias, mask=mask, **geo).shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo)
        grads = ref.deform_conv2d_backward(grad, x, offset, weight, bias, mask=mask, **geo)
    np.testing.assert_array_equal(out, ref.deform_conv2d(x, far, weight, bias, mask=mask, **geo))
    expected = ref.deform_conv2d_backward(grad, x, far, weight, bias, mask=mask, **geo)
    for g, e in zip(grads, expected):
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g, e)
    # The (dy, dx) pair of a non-finite position gets no gradient.
    pair_bad = bad.reshape(bad.shape[0], -1, 2, *bad.shape[2:]).any(axis=2)
    pair_bad = np.repeat(pair_bad, 2, axis=1)
    np.testing.assert_array_equal(grads[1][pair_bad], 0.0)


def test_conv_non_finite_mask_does_not_warn():
    rng = np.random.default_rng(9)
    x, offset, weight, bias, mask, geo = conv_inputs(
        rng, CONV_CASES[0], lambda s: rng.uniform(-3, 3, s), lambda s: rng.uniform(0, 1, s))
    mask.reshape(-1)[:20] = [np.nan, np.inf, -np.inf, 1e30] * 5
    offset.reshape(-1)[::7] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo)
        ref.deform_conv2d_backward(np.ones(out.shape), x, offset, weight, bias, mask=mask, **geo)


def test_conv_empty_batch():
    rng = np.random.default_rng(10)
    x, offset, weight, bias, mask, geo = conv_inputs(rng, (0,) + CONV_CASES[1][1:])
    out = ref.deform_conv2d(x, offset, weight, bias, mask=mask, **geo)
    assert out.shape == (0, 4, 5, 9)
    grads = ref.deform_conv2d_backward(out, x, offset, weight, bias, mask=mask, **geo)
    assert [g.shape for g in grads] == [x.shape, offset.shape, weight.shape, bias.shape, mask.shape]
    np.testing.assert_array_equal(grads[2], 0.0)


# --------------------------------------------------------------------------
# Deformable RoI pooling (mmcv)
# --------------------------------------------------------------------------


def loop_roi_pool(x, rois, offset, mask, output_size, scale, sampling_ratio, gamma):
    """mmcv's forward and the documented backward rule (the exact derivative,
    0 along an axis held by a clamp), one sample at a time.

    Returns (output, grad_input, grad_offset, grad_mask) for grad_out = ones."""
    n, c, h, w = x.shape
    ph, pw = output_size
    r_count = rois.shape[0]
    out = np.zeros((r_count, c, ph, pw))
    g_in = np.zeros(x.shape)
    g_off = np.zeros((r_count, 2, ph, pw))
    g_mask = np.zeros((r_count, 1, ph, pw))
    for r in range(r_count):
        b = int(rois[r, 0])
        sx, sy = rois[r, 1] * scale - 0.5, rois[r, 2] * scale - 0.5
        rw, rh = rois[r, 3] * scale - 0.5 - sx, rois[r, 4] * scale - 0.5 - sy
        gh = sampling_ratio or max(int(np.ceil(rh / ph)), 0)
        gw = sampling_ratio or max(int(np.ceil(rw / pw)), 0)
        count = max(gh * gw, 1)
        for py in range(ph):
            for px in range(pw):
                m = 1.0 if mask is None else mask[r, 0, py, px]
                y_start = sy + (0 if offset is None else gamma * rh * offset[r, 1, py, px])
                x_start = sx + (0 if offset is None else gamma * rw * offset[r, 0, py, px])
                for cc in range(c):
                    acc = 0.0
                    for iy in range(gh):
                        y = y_start + py * rh / ph + (iy + 0.5) * (rh / ph) / gh
                        for ix in range(gw):
                            xx = x_start + px * rw / pw + (ix + 0.5) * (rw / pw) / gw
                            if y < -1 or y > h or xx < -1 or xx > w:
                                continue
                            # the max() clamp holds the sample: no derivative there
                            fy, fx = float(y >= 0), float(xx >= 0)
                            yc, xc = max(y, 0.0), max(xx, 0.0)
                            y0, x0 = int(yc), int(xc)
                            if y0 >= h - 1:
                                y0 = y1 = h - 1
                                yc = float(y0)
                            else:
                                y1 = y0 + 1
                            if x0 >= w - 1:
                                x0 = x1 = w - 1
                                xc = float(x0)
                            else:
                                x1 = x0 + 1
                            ly, lx = yc - y0, xc - x0
                            hy, hx = 1 - ly, 1 - lx
                            im = x[b, cc]
                            acc += (hy * hx * im[y0, x0] + hy * lx * im[y0, x1]
                                    + ly * hx * im[y1, x0] + ly * lx * im[y1, x1])
                            for yy, xq, wt in ((y0, x0, hy * hx), (y0, x1, hy * lx),
                                               (y1, x0, ly * hx), (y1, x1, ly * lx)):
                                g_in[b, cc, yy, xq] += m * wt / count
                            ddx = hy * (im[y0, x1] - im[y0, x0]) + ly * (im[y1, x1] - im[y1, x0])
                            ddy = hx * (im[y1, x0] - im[y0, x0]) + lx * (im[y1, x1] - im[y0, x1])
                            g_off[r, 0, py, px] += gamma * rw * m * fx * ddx / count
                            g_off[r, 1, py, px] += gamma * rh * m * fy * ddy / count
                    out[r, cc, py, px] = acc / count * m
                    g_mask[r, 0, py, px] += acc / count
    return out, g_in, g_off, g_mask


def test_roi_pool_mmcv_golden_values():
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    rois = np.array([[0.0, 0.0, 0.0, 1.0, 1.0]])
    kw = dict(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2)
    np.testing.assert_array_equal(ref.deform_roi_pool(x, rois, **kw)[0, 0],
                                  [[1.0, 1.25], [1.5, 1.75]])
    g_in, g_off, g_mask = ref.deform_roi_pool_backward(np.ones((1, 1, 2, 2)), x, rois, **kw)
    np.testing.assert_array_equal(g_in[0, 0], [[3.0625, 0.4375], [0.4375, 0.0625]])
    assert g_off is None and g_mask is None
    # The same numbers through the offset and mask paths.
    zero, ones = np.zeros((1, 2, 2, 2)), np.ones((1, 1, 2, 2))
    np.testing.assert_array_equal(ref.deform_roi_pool(x, rois, zero, mask=ones, **kw)[0, 0],
                                  [[1.0, 1.25], [1.5, 1.75]])
    g_in, g_off, g_mask = ref.deform_roi_pool_backward(ones, x, rois, zero, mask=ones, **kw)
    np.testing.assert_array_equal(g_in[0, 0], [[3.0625, 0.4375], [0.4375, 0.0625]])
    np.testing.assert_array_equal(g_mask[0, 0], [[1.0, 1.25], [1.5, 1.75]])


def roi_inputs(rng, n=2, c=3, h=10, w=12, r=4, ph=3, pw=2, lo=2.0, hi=8.0, off=0.3):
    x = rng.standard_normal((n, c, h, w))
    corners = rng.uniform(lo, hi, size=(r, 2, 2))
    corners.sort(axis=1)   # x1 < x2, y1 < y2
    rois = np.column_stack([rng.integers(0, n, r), corners[:, 0, 0], corners[:, 0, 1],
                            corners[:, 1, 0], corners[:, 1, 1]]).astype(np.float64)
    offset = rng.uniform(-off, off, size=(r, 2, ph, pw))
    mask = rng.uniform(0.1, 1.0, size=(r, 1, ph, pw))
    return x, rois, offset, mask


@pytest.mark.parametrize("sampling_ratio, scale", [(2, 1.0), (0, 1.0), (3, 0.5), (0, 2.0)])
def test_roi_pool_matches_loop_transcription(sampling_ratio, scale):
    rng = np.random.default_rng(11)
    # RoIs reaching over every border, so the clamps and the [-1, H] rule are exercised.
    x, rois, offset, mask = roi_inputs(rng, h=6, w=7, r=5, lo=-3.0, hi=9.0, off=1.0)
    rois[:, 1:] /= scale
    kw = dict(output_size=(3, 2), spatial_scale=scale, sampling_ratio=sampling_ratio, gamma=0.1)
    out, g_in, g_off, g_mask = loop_roi_pool(x, rois, offset, mask, (3, 2), scale,
                                             sampling_ratio, 0.1)
    np.testing.assert_allclose(ref.deform_roi_pool(x, rois, offset, mask=mask, **kw), out,
                               rtol=1e-12, atol=1e-12)
    grads = ref.deform_roi_pool_backward(np.ones(out.shape), x, rois, offset, mask=mask, **kw)
    for got, want in zip(grads, (g_in, g_off, g_mask)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_roi_pool_none_offset_is_zero_offset():
    rng = np.random.default_rng(12)
    x, rois, offset, _ = roi_inputs(rng)
    kw = dict(output_size=(3, 2), spatial_scale=1.0, sampling_ratio=0)
    zero = np.zeros_like(offset)
    np.testing.assert_array_equal(ref.deform_roi_pool(x, rois, **kw),
                                  ref.deform_roi_pool(x, rois, zero, **kw))
    grad = rng.standard_normal((rois.shape[0], x.shape[1], 3, 2))
    np.testing.assert_array_equal(ref.deform_roi_pool_backward(grad, x, rois, **kw)[0],
                                  ref.deform_roi_pool_backward(grad, x, rois, zero, **kw)[0])


@pytest.mark.parametrize("sampling_ratio, scale", [(2, 1.0), (0, 0.5)])
def test_roi_pool_gradients_by_finite_differences(sampling_ratio, scale):
    rng = np.random.default_rng(13)
    # RoIs well inside the image and small offsets: every sample stays in the
    # smooth region 0 < y < H-1, 0 < x < W-1.
    x, rois, offset, mask = roi_inputs(rng)
    rois[:, 1:] /= scale
    kw = dict(output_size=(3, 2), spatial_scale=scale, sampling_ratio=sampling_ratio, gamma=0.1)
    grad = rng.standard_normal((rois.shape[0], x.shape[1], 3, 2))

    def f():
        return np.sum(ref.deform_roi_pool(x, rois, offset, mask=mask, **kw) * grad)

    g_in, g_off, g_mask = ref.deform_roi_pool_backward(grad, x, rois, offset, mask=mask, **kw)
    assert rel_err(g_in, numeric_grad(f, x)) < 1e-6
    assert rel_err(g_off, numeric_grad(f, offset)) < 1e-6
    assert rel_err(g_mask, numeric_grad(f, mask)) < 1e-6


def test_roi_pool_offset_gradient_rule_in_clamped_bands():
    # Image I = [[1, 2, 4], [8, 16, 32]] (H = 2, W = 3); one bin, one sample at the
    # bin centre, gamma 0.1.
    x = np.array([[[[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]]])
    kw = dict(output_size=(1, 1), spatial_scale=1.0, sampling_ratio=1, gamma=0.1)
    g1 = np.ones((1, 1, 1, 1))
    off = np.zeros((1, 2, 1, 1))
    # (a) roi [0, 0, -1, 2, 1]: start (-0.5, -1.5), roi_w = roi_h = 2, sample at
    # y = -0.5, x = 0.5. Forward clamps y to 0: value = (1 + 2)/2 = 1.5.
    # d/dx at the clamped y: hy = 1 -> I[0,1] - I[0,0] = 1, times gamma*roi_w = 0.2 -> 0.2.
    # d/dy: the max() clamp holds y, the forward does not move with it -> 0.
    # (mmcv: -0.5 for x, from the unclamped y = -0.5; 2.1 for y.)
    roi = np.array([[0.0, 0.0, -1.0, 2.0, 1.0]])
    np.testing.assert_allclose(ref.deform_roi_pool(x, roi, off, **kw)[0, 0, 0, 0], 1.5)
    _, g_off, _ = ref.deform_roi_pool_backward(g1, x, roi, off, **kw)
    np.testing.assert_allclose(g_off[0, :, 0, 0], [0.2, 0.0], rtol=1e-14)
    # (b) roi [0, 0, 1, 2, 3]: sample at y = 1.5, x = 0.5; int(y) = 1 >= H-1, so
    # y = y0 = y1 = 1: value = (8 + 16)/2 = 12; d/dx = 16 - 8 = 8 -> 1.6; d/dy = 0.
    # (mmcv: 0 for x.)
    roi = np.array([[0.0, 0.0, 1.0, 2.0, 3.0]])
    np.testing.assert_allclose(ref.deform_roi_pool(x, roi, off, **kw)[0, 0, 0, 0], 12.0)
    _, g_off, _ = ref.deform_roi_pool_backward(g1, x, roi, off, **kw)
    np.testing.assert_allclose(g_off[0, :, 0, 0], [1.6, 0.0], rtol=1e-14, atol=1e-15)


def test_roi_pool_modulated_is_plain_times_mask():
    rng = np.random.default_rng(14)
    x, rois, offset, mask = roi_inputs(rng)
    kw = dict(output_size=(3, 2), spatial_scale=1.0, sampling_ratio=2)
    plain = ref.deform_roi_pool(x, rois, offset, **kw)
    np.testing.assert_allclose(ref.deform_roi_pool(x, rois, offset, mask=mask, **kw),
                               plain * mask, rtol=1e-14)
    grad = rng.standard_normal(plain.shape)
    g_mod = ref.deform_roi_pool_backward(grad, x, rois, offset, mask=mask, **kw)
    g_plain = ref.deform_roi_pool_backward(grad * mask, x, rois, offset, **kw)
    np.testing.assert_allclose(g_mod[0], g_plain[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_mod[1], g_plain[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_mod[2], (grad * plain).sum(axis=1, keepdims=True), rtol=1e-12)


def test_roi_pool_degenerate_and_outside_rois_give_zero():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((1, 2, 8, 8))
    rois = np.array([[0, 5.0, 2.0, 3.0, 6.0],      # x2 < x1
                     [0, 2.0, 6.0, 6.0, 1.0],      # y2 < y1
                     [0, 4.0, 4.0, 4.0, 4.0],      # zero size
                     [0, 20.0, 20.0, 30.0, 30.0],  # wholly outside
                     [0, -30.0, -9.0, -12.0, -3.0]])
    offset = rng.uniform(-1, 1, size=(5, 2, 2, 2))
    kw = dict(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=0)
    np.testing.assert_array_equal(ref.deform_roi_pool(x, rois, offset, **kw), 0.0)
    grads = ref.deform_roi_pool_backward(np.ones((5, 2, 2, 2)), x, rois, offset, **kw)
    for g in grads[:2]:
        np.testing.assert_array_equal(g, 0.0)
    # With a fixed sampling ratio an RoI wholly outside is still 0.
    np.testing.assert_array_equal(
        ref.deform_roi_pool(x, rois[3:], offset[3:], output_size=(2, 2), sampling_ratio=2), 0.0)


def test_roi_pool_adaptive_grid_is_capped():
    # A huge RoI with sampling_ratio 0 takes MAX_ADAPTIVE_GRID samples per axis per
    # bin; on a constant image the average of the in-image samples is the constant
    # times their fraction, which must equal a direct sampling with that ratio.
    x = np.ones((1, 1, 5, 5))
    rois = np.array([[0, -1e30, -1e30, 1e30, 1e30], [0, -400.0, -400.0, 400.0, 400.0]])
    kw = dict(output_size=(2, 2), spatial_scale=1.0)
    np.testing.assert_array_equal(
        ref.deform_roi_pool(x, rois, sampling_ratio=0, **kw),
        ref.deform_roi_pool(x, rois, sampling_ratio=ref.MAX_ADAPTIVE_GRID, **kw))
    assert ref.MAX_ADAPTIVE_GRID == 64


def test_roi_pool_non_finite_values_are_safe():
    rng = np.random.default_rng(16)
    x, rois, offset, mask = roi_inputs(rng, r=6)
    kw = dict(output_size=(3, 2), spatial_scale=1.0, sampling_ratio=0)
    clean = ref.deform_roi_pool(x, rois, offset, mask=mask, **kw)
    grad = rng.standard_normal(clean.shape)
    clean_g = ref.deform_roi_pool_backward(grad, x, rois, offset, mask=mask, **kw)
    bad_rois, bad_off, bad_mask = rois.copy(), offset.copy(), mask.copy()
    bad_rois[0, 1] = np.nan
    bad_rois[1, 3] = np.inf
    bad_rois[2, 1:] = [-1e30, -1e30, 1e30, 1e30]
    bad_rois[3, 2] = -np.inf
    bad_off[4, 0, 1, 1] = np.nan
    bad_off[4, 1, 0, 0] = np.inf
    bad_off[4, 0, 2, 0] = 1e30
    bad_mask[5, 0, 1, 0] = np.nan
    bad_mask[5, 0, 2, 1] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ref.deform_roi_pool(x, bad_rois, bad_off, mask=bad_mask, **kw)
        grads = ref.deform_roi_pool_backward(grad, x, bad_rois, bad_off, mask=bad_mask, **kw)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(out[[0, 1, 3]], 0.0)
    # Bins with a non-finite offset or mask are 0, and so are their gradients;
    # the other bins of those RoIs are untouched (1e30 only moves its bin outside).
    for r, (py, px) in [(4, (1, 1)), (4, (0, 0)), (4, (2, 0)), (5, (1, 0)), (5, (2, 1))]:
        np.testing.assert_array_equal(out[r, :, py, px], 0.0)
        np.testing.assert_array_equal(grads[1][r, :, py, px], 0.0)
        np.testing.assert_array_equal(grads[2][r, :, py, px], 0.0)
    keep = np.ones((6, 3, 2), dtype=bool)
    keep[4, 1, 1] = keep[4, 0, 0] = keep[4, 2, 0] = keep[5, 1, 0] = keep[5, 2, 1] = False
    np.testing.assert_array_equal(out[4:].transpose(0, 2, 3, 1)[keep[4:]],
                                  clean[4:].transpose(0, 2, 3, 1)[keep[4:]])
    np.testing.assert_array_equal(grads[2][4:, 0][keep[4:]], clean_g[2][4:, 0][keep[4:]])


def test_roi_pool_no_rois():
    x = np.random.default_rng(17).standard_normal((2, 3, 5, 6))
    kw = dict(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=0)
    rois, offset, mask = np.zeros((0, 5)), np.zeros((0, 2, 3, 2)), np.zeros((0, 1, 3, 2))
    assert ref.deform_roi_pool(x, rois, **kw).shape == (0, 3, 3, 2)
    assert ref.deform_roi_pool(x, rois, offset, mask=mask, **kw).shape == (0, 3, 3, 2)
    g_in, g_off, g_mask = ref.deform_roi_pool_backward(np.zeros((0, 3, 3, 2)), x, rois, offset,
                                                       mask=mask, **kw)
    np.testing.assert_array_equal(g_in, np.zeros(x.shape))
    assert g_off.shape == offset.shape and g_mask.shape == mask.shape


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_roi_pool_low_precision_inputs(dtype):
    rng = np.random.default_rng(18)
    x, rois, offset, mask = roi_inputs(rng)
    low = [a.astype(dtype) for a in (x, rois, offset, mask)]
    up = [a.astype(np.float64) for a in low]
    kw = dict(output_size=(3, 2), spatial_scale=1.0, sampling_ratio=2)
    out = ref.deform_roi_pool(low[0], low[1], low[2], mask=low[3], **kw)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, ref.deform_roi_pool(up[0], up[1], up[2], mask=up[3], **kw))


# --------------------------------------------------------------------------
# Deformable position-sensitive RoI pooling (official DCN)
# --------------------------------------------------------------------------


def loop_psroi_pool(x, rois, trans, scale, output_dim, group_size, pooled, part_size, spp,
                    trans_std):
    """The official forward, one output element at a time."""
    n, ch, h, w = x.shape
    part = part_size or pooled
    ncls = 1 if trans is None else trans.shape[1] // 2
    out = np.zeros((rois.shape[0], output_dim, pooled, pooled))
    cnt = np.zeros_like(out)

    def c_round(v):
        return float(np.sign(v) * np.floor(abs(v) + 0.5))

    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        sx = c_round(rois[r, 1]) * scale - 0.5
        sy = c_round(rois[r, 2]) * scale - 0.5
        rw = max((c_round(rois[r, 3]) + 1) * scale - 0.5 - sx, 0.1)
        rh = max((c_round(rois[r, 4]) + 1) * scale - 0.5 - sy, 0.1)
        bw, bh = rw / pooled, rh / pooled
        for ct in range(output_dim):
            cls = ct // (output_dim // ncls)
            for py in range(pooled):
                for px in range(pooled):
                    pty, ptx = py * part // pooled, px * part // pooled
                    tx = 0.0 if trans is None else trans[r, 2 * cls, pty, ptx] * trans_std
                    ty = 0.0 if trans is None else trans[r, 2 * cls + 1, pty, ptx] * trans_std
                    ws = px * bw + sx + tx * rw
                    hs = py * bh + sy + ty * rh
                    gx = min(max(px * group_size // pooled, 0), group_size - 1)
                    gy = min(max(py * group_size // pooled, 0), group_size - 1)
                    im = x[b, (ct * group_size + gy) * group_size + gx]
                    total, count = 0.0, 0
                    for ih in range(spp):
                        for iw in range(spp):
                            xx, yy = ws + iw * bw / spp, hs + ih * bh / spp
                            if xx < -0.5 or xx > w - 0.5 or yy < -0.5 or yy > h - 0.5:
                                continue
                            xx, yy = min(max(xx, 0.0), w - 1.0), min(max(yy, 0.0), h - 1.0)
                            x1, x2 = int(np.floor(xx)), int(np.ceil(xx))
                            y1, y2 = int(np.floor(yy)), int(np.ceil(yy))
                            dx, dy = xx - x1, yy - y1
                            total += ((1 - dx) * (1 - dy) * im[y1, x1] + (1 - dx) * dy * im[y2, x1]
                                      + dx * (1 - dy) * im[y1, x2] + dx * dy * im[y2, x2])
                            count += 1
                    out[r, ct, py, px] = total / count if count else 0.0
                    cnt[r, ct, py, px] = count
    return out, cnt


def ps_kw(**kw):
    base = dict(spatial_scale=1.0, output_dim=1, group_size=2, pooled_size=2, part_size=0,
                sample_per_part=1, trans_std=0.0)
    base.update(kw)
    return base


def test_psroi_hand_computed():
    # Input (1, 4, 4, 4) with I[c, y, x] = 100c + 10y + x; roi [0, 0, 0, 3, 3]:
    # start = 0 - 0.5 = -0.5, end = (3 + 1) - 0.5 = 3.5, roi = 4, bin = 2, one sample
    # per bin at its start. Bin (py, px) reads channel (0*2 + py)*2 + px.
    #   (0, 0): (y, x) = (-0.5, -0.5) -> clamped (0, 0):            I[0,0,0] = 0
    #   (0, 1): (-0.5, 1.5) -> (0, 1.5): (I[1,0,1] + I[1,0,2]) / 2 = (101 + 102)/2 = 101.5
    #   (1, 0): (1.5, -0.5) -> (1.5, 0): (I[2,1,0] + I[2,2,0]) / 2 = (210 + 220)/2 = 215
    #   (1, 1): (1.5, 1.5): (311 + 312 + 321 + 322) / 4 = 316.5
    c, y, x = np.meshgrid(np.arange(4), np.arange(4), np.arange(4), indexing="ij")
    inp = (100.0 * c + 10 * y + x)[None]
    rois = np.array([[0.0, 0.0, 0.0, 3.0, 3.0]])
    out, count = ref.deform_psroi_pool(inp, rois, **ps_kw())
    np.testing.assert_array_equal(out[0, 0], [[0.0, 101.5], [215.0, 316.5]])
    np.testing.assert_array_equal(count, np.ones((1, 1, 2, 2)))
    # grad input for grad_out = 1 per bin: each bin's weights, in its own channel.
    g_in, g_trans = ref.deform_psroi_pool_backward(np.ones((1, 1, 2, 2)), inp, rois, **ps_kw())
    assert g_trans is None
    expected = np.zeros((1, 4, 4, 4))
    expected[0, 0, 0, 0] = 1.0
    expected[0, 1, 0, 1:3] = 0.5
    expected[0, 2, 1:3, 0] = 0.5
    expected[0, 3, 1:3, 1:3] = 0.25
    np.testing.assert_array_equal(g_in, expected)


def test_psroi_c_rounding_and_skipped_samples():
    # I[y, x] = 10y + x on 4x4, one channel (output_dim 1, group 1, pooled 1).
    img = (10.0 * np.arange(4)[:, None] + np.arange(4))[None, None]
    kw = ps_kw(group_size=1, pooled_size=1, sample_per_part=2)
    # roi [0, 0.5, 0.5, 1.5, 1.5]: C round -> 1 and 2 (banker's would give 0 and 2):
    # start = 0.5, end = 2.5, roi = 2, sub-bin 1, samples at 0.5 and 1.5 per axis:
    # values 5.5, 6.5, 15.5, 16.5 -> mean 11, count 4.
    out, count = ref.deform_psroi_pool(img, np.array([[0, 0.5, 0.5, 1.5, 1.5]]), **kw)
    assert out[0, 0, 0, 0] == 11.0 and count[0, 0, 0, 0] == 4.0
    # roi [0, 0, 0, 3, 3] with trans x = -0.25, trans_std 1: start_x = -0.5 - 0.25*4 =
    # -1.5, samples x = -1.5 (skipped, < -0.5) and 0.5; y = -0.5 (clamped to 0) and 1.5.
    # Used: (0, 0.5) -> 0.5 and (1.5, 0.5) -> 15.5: mean 8, count 2.
    trans = np.array([[[[-0.25]], [[0.0]]]])
    out, count = ref.deform_psroi_pool(img, np.array([[0, 0, 0, 3, 3.0]]), trans,
                                       **dict(kw, trans_std=1.0))
    assert out[0, 0, 0, 0] == 8.0 and count[0, 0, 0, 0] == 2.0
    # Every sample skipped: output 0, count 0, no gradient.
    trans = np.array([[[[-5.0]], [[0.0]]]])
    out, count = ref.deform_psroi_pool(img, np.array([[0, 0, 0, 3, 3.0]]), trans,
                                       **dict(kw, trans_std=1.0))
    assert out[0, 0, 0, 0] == 0.0 and count[0, 0, 0, 0] == 0.0
    grads = ref.deform_psroi_pool_backward(np.ones((1, 1, 1, 1)), img,
                                           np.array([[0, 0, 0, 3, 3.0]]), trans,
                                           **dict(kw, trans_std=1.0))
    np.testing.assert_array_equal(grads[0], 0.0)
    np.testing.assert_array_equal(grads[1], 0.0)


def psroi_inputs(rng, n=2, output_dim=4, group=2, pooled=3, part=2, ncls=2, h=12, w=14, r=4,
                 lo=3.0, hi=8.0):
    x = rng.standard_normal((n, output_dim * group * group, h, w))
    corners = rng.uniform(lo, hi, size=(r, 2, 2))
    corners.sort(axis=1)
    rois = np.column_stack([rng.integers(0, n, r), corners[:, 0, 0], corners[:, 0, 1],
                            corners[:, 1, 0], corners[:, 1, 1]]).astype(np.float64)
    trans = rng.uniform(-0.5, 0.5, size=(r, 2 * ncls, part, part))
    return x, rois, trans


@pytest.mark.parametrize("no_trans", [False, True])
def test_psroi_matches_loop_transcription(no_trans):
    rng = np.random.default_rng(19)
    # RoIs and trans reaching over the borders: clamped and skipped samples.
    x, rois, trans = psroi_inputs(rng, h=6, w=7, r=5, lo=-4.0, hi=9.0, pooled=3, part=2)
    trans = None if no_trans else trans * 4
    kw = dict(spatial_scale=0.75, output_dim=4, group_size=2, pooled_size=3, part_size=2,
              sample_per_part=3, trans_std=0.1)
    want, want_count = loop_psroi_pool(x, rois, trans, 0.75, 4, 2, 3, 2, 3, 0.1)
    out, count = ref.deform_psroi_pool(x, rois, trans, **kw)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(count, want_count)
    assert count.max() == 9 and (count < 9).any()   # some samples were skipped


def test_psroi_gradients_by_finite_differences():
    rng = np.random.default_rng(20)
    # RoIs inside the image and small trans: samples away from the border clamps.
    x, rois, trans = psroi_inputs(rng)
    kw = dict(spatial_scale=1.0, output_dim=4, group_size=2, pooled_size=3, part_size=2,
              sample_per_part=2, trans_std=0.1)
    out, count = ref.deform_psroi_pool(x, rois, trans, **kw)
    np.testing.assert_array_equal(count, 4.0)
    grad = rng.standard_normal(out.shape)

    def f():
        return np.sum(ref.deform_psroi_pool(x, rois, trans, **kw)[0] * grad)

    g_in, g_trans = ref.deform_psroi_pool_backward(grad, x, rois, trans, **kw)
    assert rel_err(g_in, numeric_grad(f, x)) < 1e-6
    assert rel_err(g_trans, numeric_grad(f, trans)) < 1e-6


def test_psroi_non_finite_values_are_safe():
    rng = np.random.default_rng(21)
    x, rois, trans = psroi_inputs(rng, r=5)
    kw = dict(spatial_scale=1.0, output_dim=4, group_size=2, pooled_size=3, part_size=2,
              sample_per_part=2, trans_std=0.1)
    clean, _ = ref.deform_psroi_pool(x, rois, trans, **kw)
    rois[0, 1] = np.nan
    rois[1, 3:] = [np.inf, -np.inf]
    rois[2, 1:] = [-1e30, -1e30, 1e30, 1e30]
    trans[3, 0, 0, 0] = np.nan       # class 0 x, part cell (0, 0)
    trans[3, 3, 1, 1] = np.inf       # class 1 y, part cell (1, 1)
    trans[4, 1, 0, 1] = 1e30         # class 0 y, part cell (0, 1)
    grad = rng.standard_normal(clean.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, count = ref.deform_psroi_pool(x, rois, trans, **kw)
        g_in, g_trans = ref.deform_psroi_pool_backward(grad, x, rois, trans, **kw)
        ref.deform_psroi_pool(x, rois, trans, **dict(kw, trans_std=0.0))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g_in)) and np.all(np.isfinite(g_trans))
    np.testing.assert_array_equal(out[:2], 0.0)
    np.testing.assert_array_equal(count[:2], 0.0)
    # part cell (0, 0) of 3x3 bins with part 2 is bin (0, 0) only (bins map to 0, 0, 1).
    np.testing.assert_array_equal(count[3, :2, 0, 0], 0.0)   # class 0 = channels 0, 1
    np.testing.assert_array_equal(out[3, 2:, 0, 0], clean[3, 2:, 0, 0])
    np.testing.assert_array_equal(count[3, 2:, 2, 2], 0.0)   # class 1, part (1, 1)
    np.testing.assert_array_equal(count[4, :2, 0, 2], 0.0)   # pushed far outside
    np.testing.assert_array_equal(g_trans[3, 0, 0, 0], 0.0)


def test_psroi_no_rois_and_low_precision():
    rng = np.random.default_rng(22)
    x, rois, trans = psroi_inputs(rng)
    kw = dict(spatial_scale=1.0, output_dim=4, group_size=2, pooled_size=3, part_size=2,
              sample_per_part=2, trans_std=0.1)
    out, count = ref.deform_psroi_pool(x, rois[:0], trans[:0], **kw)
    assert out.shape == count.shape == (0, 4, 3, 3)
    g_in, g_trans = ref.deform_psroi_pool_backward(out, x, rois[:0], trans[:0], **kw)
    np.testing.assert_array_equal(g_in, np.zeros(x.shape))
    assert g_trans.shape == (0, 4, 2, 2)
    low = [a.astype(ml_dtypes.bfloat16) for a in (x, rois, trans)]
    out, _ = ref.deform_psroi_pool(*low, **kw)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, ref.deform_psroi_pool(
        *[a.astype(np.float64) for a in low], **kw)[0])


def test_empty_channel_counts():
    """Cout = 0 and C = 0 give empty or zero results, not errors."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((2, 4, 5, 5))
    offset = rng.standard_normal((2, 18, 5, 5))
    weight = np.zeros((0, 4, 3, 3))
    assert ref.deform_conv2d(x, offset, weight, padding=(1, 1)).shape == (2, 0, 5, 5)
    g_in, g_off, g_w, _, _ = ref.deform_conv2d_backward(np.zeros((2, 0, 5, 5)), x, offset, weight,
                                                         padding=(1, 1))
    assert g_in.shape == x.shape and g_off.shape == offset.shape and g_w.shape == weight.shape
    assert not g_in.any() and not g_off.any()
    feat, rois = np.zeros((1, 0, 4, 4)), np.array([[0.0, 0.0, 0.0, 2.0, 2.0]])
    assert ref.deform_roi_pool(feat, rois, output_size=(2, 2)).shape == (1, 0, 2, 2)
    g_in, _, _ = ref.deform_roi_pool_backward(np.zeros((1, 0, 2, 2)), feat, rois, output_size=(2, 2))
    assert g_in.shape == feat.shape
