"""NumPy reference of every cupydcn op: the test oracle and the CPU path.

Plain NumPy, written from ``docs/semantics.md`` and independently of the CUDA
kernels, so that the two can be held against each other. Read it next to that
page: §2 (deformable convolution, torchvision's numbers), §3
(deformable RoI pooling, mmcv's numbers), §4 (deformable
position-sensitive RoI pooling, the official DCN operator's numbers).

Conventions shared by every function here:

* Inputs are NumPy arrays of any float dtype (float16 and ``ml_dtypes.bfloat16``
  included) that the caller has already validated; integer parameters arrive as
  Python ints or normalised ``(h, w)`` pairs. Everything is computed in float64
  and returned as float64.
* Pixel centres sit at integer coordinates; ``I[c, y, x]`` is one image.
* Non-finite or huge coordinates (NaN, +-inf, +-1e30 in offsets, RoIs, trans,
  masks) never raise, never warn and never index out of range: a sample at a
  non-finite position counts as outside the image (value 0, no gradient), and
  every float -> int conversion is range-checked first.
"""

from typing import NamedTuple

import numpy as np

__all__ = [
    "MAX_ADAPTIVE_GRID",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_roi_pool",
    "deform_roi_pool_backward",
    "deform_psroi_pool",
    "deform_psroi_pool_backward",
]

MAX_ADAPTIVE_GRID = 64
"""Most samples per axis per bin that RoI pooling's adaptive grid
(``sampling_ratio=0``) takes: ``ceil(roi_h / ph)`` is capped here so that an
absurd RoI (say 1e30 pixels wide) costs a bounded amount of work. mmcv has no
cap; the two agree for every RoI up to 64 bins' worth of pixels per axis."""

# Where a sample at a non-finite position is moved to: outside the image for
# every bilinear rule in this file, with finite weights, so no NaN leaks into
# the arithmetic that follows.
_FAR = -2.0


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


# --------------------------------------------------------------------------
# 1. Deformable convolution (v1 and modulated v2), torchvision's numbers
# --------------------------------------------------------------------------


class _ConvGeometry(NamedTuple):
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    groups: int
    kh: int
    kw: int
    offset_groups: int
    out_h: int
    out_w: int
    stride: tuple
    padding: tuple
    dilation: tuple

    @property
    def taps(self):
        return self.kh * self.kw


def _conv_geometry(input, offset, weight, stride, padding, dilation):
    b, c, h, w = input.shape
    cout, c_per_group, kh, kw = weight.shape
    out_h = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    return _ConvGeometry(b, c, h, w, cout, c // c_per_group, kh, kw,
                         offset.shape[1] // (2 * kh * kw), out_h, out_w,
                         tuple(stride), tuple(padding), tuple(dilation))


def _conv_positions(offset_b, geo):
    """Sampling points of one image.

    ``y = oy*stride_h - pad_h + i*dil_h + dy`` (same for x), with tap
    ``k = i*kw + j`` and ``dy, dx`` read from the interleaved offset channels
    ``g*2*kh*kw + 2*k`` and ``+ 1``.

    Args:
        offset_b: (2*dg*kh*kw, Ho, Wo) offsets of one image.

    Returns:
        y, x: (dg, kh*kw*Ho*Wo) positions, non-finite ones replaced by ``_FAR``.
        finite: (dg, kh*kw*Ho*Wo) bool, False where the position was not finite.
    """
    sh, sw = geo.stride
    ph, pw = geo.padding
    dh, dw = geo.dilation
    off = offset_b.reshape(geo.offset_groups, geo.taps, 2, geo.out_h, geo.out_w)
    i, j = np.divmod(np.arange(geo.taps), geo.kw)
    base_y = (np.arange(geo.out_h) * sh - ph)[None, :, None] + (i * dh)[:, None, None]
    base_x = (np.arange(geo.out_w) * sw - pw)[None, None, :] + (j * dw)[:, None, None]
    with np.errstate(over="ignore", invalid="ignore"):
        y = base_y + off[:, :, 0]
        x = base_x + off[:, :, 1]
    y = y.reshape(geo.offset_groups, -1)
    x = x.reshape(geo.offset_groups, -1)
    finite = np.isfinite(y) & np.isfinite(x)
    return np.where(finite, y, _FAR), np.where(finite, x, _FAR), finite


class _ConvSamples(NamedTuple):
    """Bilinear samples of one image at the points of ``_conv_positions``.

    Arrays are (dg, S) for positions and (dg, Cg, S) for values, S =
    kh*kw*Ho*Wo, Cg = C/dg. Corner order: (y0, x0), (y0, x1), (y1, x0),
    (y1, x1) with ``y0 = floor(y)``, ``y1 = y0 + 1``.
    """

    value: np.ndarray      # (dg, Cg, S) forward value (open-interval rule)
    index: list            # 4 x (dg, S) flat pixel index (0 where the corner is off-image)
    scatter_w: list        # 4 x (dg, S) forward corner weight, 0 unless the corner is
                           # in the image and the sample inside the open interval
    corner: list           # 4 x (dg, Cg, S) corner value, 0 where the corner is off-image
    hy: np.ndarray
    ly: np.ndarray
    hx: np.ndarray
    lx: np.ndarray


def _conv_sample(img, y, x, height, width):
    """Sample ``img`` (dg, Cg, H*W) at (y, x) (each (dg, S), finite).

    Forward rule (docs/semantics.md §2.4): 0 when ``y <= -1 or y >= H or x <= -1 or
    x >= W``; otherwise ``hy*hx*I00 + hy*lx*I01 + ly*hx*I10 + ly*lx*I11`` with
    off-image corners read as 0. The corner values themselves are kept with
    only the in-image rule, which is what the offset gradient uses.
    """
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y0 = np.floor(y)
    x0 = np.floor(x)
    ly = y - y0
    lx = x - x0
    hy = 1.0 - ly
    hx = 1.0 - lx
    value = np.zeros(img.shape[:2] + y.shape[1:])
    index, scatter_w, corner = [], [], []
    for cy, cx, w in ((y0, x0, hy * hx), (y0, x0 + 1, hy * lx),
                      (y0 + 1, x0, ly * hx), (y0 + 1, x0 + 1, ly * lx)):
        on_image = (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
        # Range checked above: only in-image corners are converted to int.
        flat = (np.where(on_image, cy, 0).astype(np.intp) * width
                + np.where(on_image, cx, 0).astype(np.intp))
        v = np.where(on_image[:, None], np.take_along_axis(img, flat[:, None, :], axis=-1), 0.0)
        w_fwd = np.where(on_image & inside, w, 0.0)
        value += w_fwd[:, None] * v
        index.append(flat)
        scatter_w.append(w_fwd)
        corner.append(v)
    return _ConvSamples(value, index, scatter_w, corner, hy, ly, hx, lx)


def _conv_columns(samples, mask_b, finite):
    """``mask * value`` per sample, (dg, Cg, S); exactly 0 at non-finite positions."""
    if mask_b is None:
        return np.where(finite[:, None, :], samples.value, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):   # an inf mask times a 0 sample
        return np.where(finite[:, None, :], samples.value * mask_b[:, None, :], 0.0)


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None):
    """Deformable convolution v1 (``mask=None``) and modulated v2 (torchvision's).

    ``out[b, o, oy, ox] = bias[o] + sum_{c in group(o), i, j}
    weight[o, c', i, j] * mask[b, g(c)*kh*kw + k, oy, ox] * I_b[c](y, x)``
    with ``y = oy*sh - ph + i*dh + dy``, ``x = ox*sw - pw + j*dw + dx`` and the
    bilinear rule of docs/semantics.md §2.4 (0 unless ``-1 < y < H`` and
    ``-1 < x < W``; off-image corners read as 0). Dai et al., "Deformable
    Convolutional Networks" (2017); Zhu et al., "Deformable ConvNets v2" (2019).

    Args:
        input: (B, C, H, W) array.
        offset: (B, 2*dg*kh*kw, Ho, Wo) array; channel ``g*2*kh*kw + 2*k`` is
            dy and ``+ 1`` is dx of tap ``k = i*kw + j`` in offset group g,
            which covers input channels ``[g*C/dg, (g+1)*C/dg)``.
        weight: (Cout, C/groups, kh, kw) array; ``groups = C // weight.shape[1]``.
        bias: (Cout,) array or None.
        stride, padding, dilation: (h, w) pairs of ints.
        mask: (B, dg*kh*kw, Ho, Wo) array or None (v1, a mask of ones).
            Channel ``g*kh*kw + k``. Used as given (a NaN mask gives NaN).

    Returns:
        (B, Cout, Ho, Wo) float64 array, ``Ho = (H + 2*ph - (dh*(kh-1)+1)) // sh + 1``.

    A sample at a non-finite position contributes exactly 0 whatever its mask.

    Example:
        >>> out = deform_conv2d(x, np.zeros((1, 18, 5, 5)), w, padding=(1, 1))
    """
    input, offset, weight, bias, mask = map(_f64, (input, offset, weight, bias, mask))
    geo = _conv_geometry(input, offset, weight, stride, padding, dilation)
    out = np.zeros((geo.batch, geo.out_channels, geo.out_h, geo.out_w))
    w_groups = weight.reshape(geo.groups, geo.out_channels // geo.groups,
                              int(np.prod(weight.shape[1:])))
    for b in range(geo.batch):
        cols = _conv_columns(*_conv_image(input, offset, mask, b, geo))
        # (C, kh*kw, Ho*Wo) -> (groups, C/groups*kh*kw, Ho*Wo), rows ordered as weight's.
        cols = cols.reshape(geo.groups, -1, geo.out_h * geo.out_w)
        with np.errstate(invalid="ignore", over="ignore"):   # non-finite masks: IEEE results
            out[b] = (w_groups @ cols).reshape(geo.out_channels, geo.out_h, geo.out_w)
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def _conv_image(input, offset, mask, b, geo):
    """Samples, mask and finiteness of image ``b`` (the arguments of ``_conv_columns``)."""
    y, x, finite = _conv_positions(offset[b], geo)
    img = input[b].reshape(geo.offset_groups, -1, geo.height * geo.width)
    samples = _conv_sample(img, y, x, geo.height, geo.width)
    mask_b = None if mask is None else mask[b].reshape(geo.offset_groups, -1)
    return samples, mask_b, finite


def deform_conv2d_backward(grad_output, input, offset, weight, bias=None, stride=(1, 1),
                           padding=(0, 0), dilation=(1, 1), mask=None):
    """Gradients of :func:`deform_conv2d`, exactly those torchvision returns.

    With ``grad_col = weight_g^T x grad_out_g`` (per weight group) and m the
    mask (1 for v1):

    * grad input: each sample scatters ``grad_col * m * corner_weight`` to its
      in-image corners, only when the sample is inside the forward's open
      interval ``-1 < y < H``, ``-1 < x < W``.
    * grad offset: ``dy: sum_c grad_col * m * (hx*(I10 - I00) + lx*(I11 - I01))``,
      ``dx: sum_c grad_col * m * (hy*(I01 - I00) + ly*(I11 - I10))`` with only
      the in-image corner rule (no open-interval check, as torchvision): at
      exactly ``y == -1`` this is the one-sided derivative from row 0.
      Nonzero only for ``-1 <= y < H`` and ``-1 <= x < W``.
    * grad mask: ``sum_c grad_col * value`` (forward rule).
    * grad weight: ``grad_out_g x columns_g^T`` summed over the batch;
      grad bias: ``grad_out`` summed over B, Ho, Wo.

    Samples at non-finite positions give exactly 0 to every gradient.

    Args:
        grad_output: (B, Cout, Ho, Wo) array.
        input, offset, weight, bias, stride, padding, dilation, mask: as for
            :func:`deform_conv2d`.

    Returns:
        (grad_input (B, C, H, W), grad_offset (B, 2*dg*kh*kw, Ho, Wo),
        grad_weight (Cout, C/groups, kh, kw), grad_bias (Cout,) or None,
        grad_mask (B, dg*kh*kw, Ho, Wo) or None), float64.
    """
    grad_output, input, offset, weight, bias, mask = map(
        _f64, (grad_output, input, offset, weight, bias, mask))
    geo = _conv_geometry(input, offset, weight, stride, padding, dilation)
    dg, hw = geo.offset_groups, geo.height * geo.width
    w_groups = weight.reshape(geo.groups, geo.out_channels // geo.groups,
                              int(np.prod(weight.shape[1:])))
    grad_input = np.zeros(input.shape)
    grad_offset = np.zeros((geo.batch, dg, geo.taps, 2, geo.out_h, geo.out_w))
    grad_weight = np.zeros(w_groups.shape)
    grad_mask = None if mask is None else np.zeros(mask.shape)
    # Flat (offset group, channel in group) index of every input channel, for the scatter.
    channel = np.arange(geo.channels).reshape(dg, -1, 1)
    for b in range(geo.batch):
        samples, mask_b, finite = _conv_image(input, offset, mask, b, geo)
        cols = _conv_columns(samples, mask_b, finite)
        go = grad_output[b].reshape(geo.groups, -1, geo.out_h * geo.out_w)
        grad_col = (w_groups.transpose(0, 2, 1) @ go).reshape(cols.shape)

        if mask is not None:
            gm = np.where(finite, (grad_col * samples.value).sum(axis=1), 0.0)
            grad_mask[b] = gm.reshape(mask.shape[1:])

        # A non-finite mask gives NaN/inf where its samples count (IEEE, as torchvision);
        # np.where, not a product with 0, keeps it out of everything else.
        with np.errstate(invalid="ignore", over="ignore"):
            grad_weight += go @ cols.reshape(geo.groups, -1, geo.out_h * geo.out_w).transpose(
                0, 2, 1)
            gcm = grad_col if mask_b is None else grad_col * mask_b[:, None, :]
            flat_in = np.zeros(geo.channels * hw)
            for index, w in zip(samples.index, samples.scatter_w):
                contrib = np.where(w[:, None] != 0, gcm * w[:, None], 0.0)
                flat_in += np.bincount((channel * hw + index[:, None, :]).ravel(),
                                       weights=contrib.ravel(), minlength=flat_in.size)
            grad_input[b] = flat_in.reshape(input.shape[1:])

            i00, i01, i10, i11 = samples.corner
            d_dy = samples.hx[:, None] * (i10 - i00) + samples.lx[:, None] * (i11 - i01)
            d_dx = samples.hy[:, None] * (i01 - i00) + samples.ly[:, None] * (i11 - i10)
            shape = (dg, geo.taps, geo.out_h, geo.out_w)
            grad_offset[b, :, :, 0] = np.where(finite, (gcm * d_dy).sum(axis=1), 0.0).reshape(shape)
            grad_offset[b, :, :, 1] = np.where(finite, (gcm * d_dx).sum(axis=1), 0.0).reshape(shape)

    grad_bias = None if bias is None else grad_output.sum(axis=(0, 2, 3))
    return (grad_input, grad_offset.reshape(offset.shape), grad_weight.reshape(weight.shape),
            grad_bias, grad_mask)


# --------------------------------------------------------------------------
# 2. Deformable RoI pooling (RoIAlign style), mmcv's numbers
# --------------------------------------------------------------------------


def _batch_index(value, n):
    """``int(value)`` when it is a valid image index in [0, n), else None."""
    value = float(value)
    if np.isfinite(value) and 0 <= value < n and value == np.floor(value):
        return int(value)
    return None


def _adaptive_grid(sampling_ratio, size, pooled):
    """Samples per bin along one axis: ``sampling_ratio``, or ``ceil(size/pooled)``
    clipped to [0, MAX_ADAPTIVE_GRID] when ``sampling_ratio`` is 0."""
    if sampling_ratio > 0:
        return int(sampling_ratio)
    return int(min(max(np.ceil(size / pooled), 0.0), MAX_ADAPTIVE_GRID))


class _RoIPlan(NamedTuple):
    """One RoI's pooling as linear maps from the image to its bins.

    ``pooled[c, p] = (img[c, pixels] @ weight.T)[p] / count``; ``d_dx`` and
    ``d_dy`` are the same maps with the derivative of the bilinear weights
    with respect to the sample's x and y (see :func:`deform_roi_pool_backward`).
    """

    batch: int
    pixels: np.ndarray     # (U,) distinct flat pixel indices touched
    weight: np.ndarray     # (P, U)
    d_dx: np.ndarray       # (P, U)
    d_dy: np.ndarray       # (P, U)
    count: int
    roi_w: float
    roi_h: float
    bin_ok: np.ndarray     # (P,) bool, False where offset or mask is non-finite


def _roi_plan(roi, offset_r, mask_r, height, width, n_images, output_size,
              spatial_scale, sampling_ratio, gamma):
    """The :class:`_RoIPlan` of one RoI, or None when the whole RoI is void
    (non-finite coordinates, an invalid batch index, or no samples)."""
    ph, pw = output_size
    b = _batch_index(roi[0], n_images)
    if b is None:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        start_x = roi[1] * spatial_scale - 0.5
        start_y = roi[2] * spatial_scale - 0.5
        roi_w = (roi[3] * spatial_scale - 0.5) - start_x
        roi_h = (roi[4] * spatial_scale - 0.5) - start_y
        bin_w = roi_w / pw
        bin_h = roi_h / ph
    if not np.all(np.isfinite([start_x, start_y, roi_w, roi_h, bin_w, bin_h])):
        return None
    grid_h = _adaptive_grid(sampling_ratio, roi_h, ph)
    grid_w = _adaptive_grid(sampling_ratio, roi_w, pw)
    count = max(grid_h * grid_w, 1)
    if grid_h == 0 or grid_w == 0:
        return None

    with np.errstate(over="ignore", invalid="ignore"):
        bin_y = start_y + np.arange(ph)[:, None] * bin_h + np.zeros((1, pw))   # (ph, pw)
        bin_x = start_x + np.arange(pw)[None, :] * bin_w + np.zeros((ph, 1))
        bin_ok = np.ones((ph, pw), dtype=bool)
        if offset_r is not None:
            # Channel 0 moves x, channel 1 moves y (the reverse of the conv's order).
            bin_x = bin_x + gamma * roi_w * offset_r[0]
            bin_y = bin_y + gamma * roi_h * offset_r[1]
            bin_ok &= np.isfinite(offset_r[0]) & np.isfinite(offset_r[1])
        if mask_r is not None:
            bin_ok &= np.isfinite(mask_r[0])
        bin_ok &= np.isfinite(bin_x) & np.isfinite(bin_y)
        # Samples (P, grid_h, grid_w): y = bin start + (iy + 0.5) * bin_h / grid_h.
        y = (bin_y.reshape(-1, 1, 1)
             + ((np.arange(grid_h) + 0.5) * bin_h / grid_h)[None, :, None] + np.zeros((1, 1, grid_w)))
        x = (bin_x.reshape(-1, 1, 1)
             + ((np.arange(grid_w) + 0.5) * bin_w / grid_w)[None, None, :] + np.zeros((1, grid_h, 1)))
    y = y.reshape(ph * pw, -1)
    x = x.reshape(ph * pw, -1)

    # RoIAlign's bilinear rule (docs/semantics.md §3.4); comparisons are False for NaN.
    ok = (bin_ok.reshape(-1, 1) & np.isfinite(y) & np.isfinite(x)
          & (y >= -1) & (y <= height) & (x >= -1) & (x <= width))
    # Below 0 the max() clamp holds the sample: the forward does not move with
    # that coordinate, so its derivative is 0 (the last-row clamp gives 0 by
    # itself, since there y0 == y1).
    moves_y = ok & (np.where(ok, y, 0.0) >= 0)
    moves_x = ok & (np.where(ok, x, 0.0) >= 0)
    y = np.where(ok, np.maximum(y, 0.0), 0.0)
    x = np.where(ok, np.maximum(x, 0.0), 0.0)
    y0 = np.floor(y)
    x0 = np.floor(x)
    top_y = y0 >= height - 1
    top_x = x0 >= width - 1
    y0 = np.where(top_y, height - 1, y0)
    x0 = np.where(top_x, width - 1, x0)
    y = np.where(top_y, y0, y)
    x = np.where(top_x, x0, x)
    y1 = np.where(top_y, y0, y0 + 1)
    x1 = np.where(top_x, x0, x0 + 1)
    ly = y - y0
    lx = x - x0
    hy = 1.0 - ly
    hx = 1.0 - lx

    # (row, col, weight, d weight/dx, d weight/dy) of the four corners; 0 <= row, col
    # hold for every ok sample, so the int conversion is in range.
    fx, fy = moves_x.astype(float), moves_y.astype(float)
    corners = ((y0, x0, hy * hx, -hy * fx, -hx * fy), (y0, x1, hy * lx, hy * fx, -lx * fy),
               (y1, x0, ly * hx, -ly * fx, hx * fy), (y1, x1, ly * lx, ly * fx, lx * fy))
    bins = np.broadcast_to(np.arange(ph * pw)[:, None], ok.shape)[ok]
    rows = np.concatenate([bins] * 4)
    pix = np.concatenate([cy[ok].astype(np.intp) * width + cx[ok].astype(np.intp)
                          for cy, cx, *_ in corners])
    pixels, col = np.unique(pix, return_inverse=True)
    col = col.reshape(-1)
    n = ph * pw * pixels.size

    def as_map(k):
        vals = np.concatenate([c[k][ok] for c in corners])
        return np.bincount(rows * pixels.size + col, weights=vals, minlength=n).reshape(
            ph * pw, pixels.size)

    return _RoIPlan(b, pixels, as_map(2), as_map(3), as_map(4), count, float(roi_w),
                    float(roi_h), bin_ok.reshape(-1))


def _roi_pool_args(input, rois, offset, mask):
    return map(_f64, (input, rois, offset, mask))


def deform_roi_pool(input, rois, offset=None, output_size=(7, 7), spatial_scale=1.0,
                    sampling_ratio=0, gamma=0.1, mask=None):
    """Deformable RoI pooling, RoIAlign style, plain and modulated (mmcv's).

    Per RoI ``[b, x1, y1, x2, y2]``: ``start_x = x1*scale - 0.5``,
    ``roi_w = (x2 - x1)*scale``, ``bin_w = roi_w / pw`` (same for y). Each
    bin (py, px) is moved as a whole by ``gamma*roi_w*offset[r, 0, py, px]``
    in x and ``gamma*roi_h*offset[r, 1, py, px]`` in y, then averages
    ``grid_h*grid_w`` RoIAlign samples at
    ``y = start_y + py*bin_h + (iy + 0.5)*bin_h/grid_h`` (same for x), with
    RoIAlign's bilinear rule (0 outside ``[-1, H] x [-1, W]``, then
    ``y = max(y, 0)`` and the last row/column clamp). Modulated: the pooled
    value is multiplied by ``mask[r, 0, py, px]``. Zhu et al., "Deformable
    ConvNets v2" (2019).

    ``grid = sampling_ratio`` if > 0, else ``ceil(roi_size / pooled)`` when that
    is > 0 (capped at ``MAX_ADAPTIVE_GRID`` = 64 per axis, which protects against
    absurd RoIs; mmcv has no cap), else 0 samples. The divisor is
    ``max(grid_h*grid_w, 1)``, so an RoI of zero or negative size with
    ``sampling_ratio=0`` pools to 0. A non-finite RoI coordinate gives 0 for
    the whole RoI; a non-finite offset or mask value gives 0 for that bin.

    Args:
        input: (N, C, H, W) array.
        rois: (R, 5) array of ``[batch_index, x1, y1, x2, y2]`` in image coordinates.
        offset: (R, 2, ph, pw) array (channel 0 is x, channel 1 is y) or None.
        output_size: (ph, pw).
        spatial_scale: float, image -> feature map coordinates.
        sampling_ratio: int, samples per bin per axis (0 = adaptive).
        gamma: float, offset scale.
        mask: (R, 1, ph, pw) array or None (the modulated pack's sigmoid mask).

    Returns:
        (R, C, ph, pw) float64 array.

    Example:
        >>> deform_roi_pool(np.array([[[[1., 2.], [3., 4.]]]]), np.array([[0., 0, 0, 1, 1]]),
        ...                 output_size=(2, 2), sampling_ratio=2)[0, 0]
        array([[1.  , 1.25],
               [1.5 , 1.75]])
    """
    input, rois, offset, mask = _roi_pool_args(input, rois, offset, mask)
    n, c, h, w = input.shape
    ph, pw = output_size
    out = np.zeros((rois.shape[0], c, ph * pw))
    for r in range(rois.shape[0]):
        plan = _roi_plan(rois[r], None if offset is None else offset[r],
                         None if mask is None else mask[r], h, w, n, output_size,
                         spatial_scale, sampling_ratio, gamma)
        if plan is None:
            continue
        pooled = input[plan.batch].reshape(c, h * w)[:, plan.pixels] @ plan.weight.T / plan.count
        if mask is not None:
            pooled = pooled * np.where(plan.bin_ok, mask[r, 0].reshape(-1), 0.0)
        out[r] = np.where(plan.bin_ok, pooled, 0.0)
    return out.reshape(rois.shape[0], c, ph, pw)


def deform_roi_pool_backward(grad_output, input, rois, offset=None, output_size=(7, 7),
                             spatial_scale=1.0, sampling_ratio=0, gamma=0.1, mask=None):
    """Gradients of :func:`deform_roi_pool` (no gradient for ``rois``).

    With ``g = grad_out * mask`` (``grad_out`` when unmodulated) and ``count``
    the divisor of the forward:

    * grad input: every sample scatters ``g / count * corner_weight`` to its four
      corners (the forward's corners, after its clamps).
    * grad offset: the exact derivative of the forward with respect to the
      sample's x (resp. y), wherever the forward is differentiable: at the
      position after the forward's clamps (``y = max(y, 0)`` and, when
      ``int(y) >= H-1``, ``y = y0 = y1 = H-1``),
      ``d/dx = hy*(I(y0,x1) - I(y0,x0)) + ly*(I(y1,x1) - I(y1,x0))`` and
      ``d/dy = hx*(I(y1,x0) - I(y0,x0)) + lx*(I(y1,x1) - I(y0,x1))``, and 0 along
      an axis where a clamp holds the sample (``-1 <= y < 0`` or the last row:
      the forward does not move with y there). Summed over channels and
      samples times ``g / count``, times ``gamma*roi_w`` for channel 0 (x) and
      ``gamma*roi_h`` for channel 1 (y). For samples with ``0 <= y < H-1`` and
      ``0 <= x < W-1`` this is exactly mmcv's value; mmcv instead uses the
      unclamped y in the factors ``(y_high - y)``, ``(y - y_low)`` (and likewise
      x), which differs in the clamped bands: it gives 0 for d/dx when
      ``y >= H-1`` and extrapolates for ``y < 0``.
    * grad mask: ``sum_c grad_out * pooled`` (the value before the mask).

    Bins that pooled to 0 because of a non-finite RoI, offset or mask value get
    0 in every gradient.

    Args:
        grad_output: (R, C, ph, pw) array.
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
            mask: as for :func:`deform_roi_pool`.

    Returns:
        (grad_input (N, C, H, W), grad_offset (R, 2, ph, pw) or None,
        grad_mask (R, 1, ph, pw) or None), float64.
    """
    input, rois, offset, mask = _roi_pool_args(input, rois, offset, mask)
    grad_output = _f64(grad_output)
    n, c, h, w = input.shape
    ph, pw = output_size
    grad_input = np.zeros((n, c, h * w))
    grad_offset = None if offset is None else np.zeros((rois.shape[0], 2, ph * pw))
    grad_mask = None if mask is None else np.zeros((rois.shape[0], 1, ph * pw))
    for r in range(rois.shape[0]):
        plan = _roi_plan(rois[r], None if offset is None else offset[r],
                         None if mask is None else mask[r], h, w, n, output_size,
                         spatial_scale, sampling_ratio, gamma)
        if plan is None:
            continue
        go = np.where(plan.bin_ok, grad_output[r].reshape(c, ph * pw), 0.0)
        img = input[plan.batch].reshape(c, h * w)[:, plan.pixels]
        if mask is not None:
            m = np.where(plan.bin_ok, mask[r, 0].reshape(-1), 0.0)
            pooled = img @ plan.weight.T / plan.count
            grad_mask[r, 0] = np.where(plan.bin_ok, (go * pooled).sum(axis=0), 0.0)
            go = go * m
        g = go / plan.count
        grad_input[plan.batch][:, plan.pixels] += g @ plan.weight
        if offset is not None:
            grad_offset[r, 0] = gamma * plan.roi_w * (g * (img @ plan.d_dx.T)).sum(axis=0)
            grad_offset[r, 1] = gamma * plan.roi_h * (g * (img @ plan.d_dy.T)).sum(axis=0)
    r_count = rois.shape[0]
    return (grad_input.reshape(input.shape),
            None if offset is None else grad_offset.reshape(r_count, 2, ph, pw),
            None if mask is None else grad_mask.reshape(r_count, 1, ph, pw))


# --------------------------------------------------------------------------
# 3. Deformable position-sensitive RoI pooling, the official DCN operator
# --------------------------------------------------------------------------


def _c_round(v):
    """C's ``round``: half away from zero (NumPy's ``round`` is half to even)."""
    with np.errstate(invalid="ignore"):
        t = np.trunc(v)
        return t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0.0)


class _PSPlan(NamedTuple):
    """Every sample of every (RoI, output channel, bin), vectorised.

    Sample arrays are (R, output_dim, P, P, S) with S = sample_per_part**2.
    """

    valid: np.ndarray      # bool: inside [-0.5, W-0.5] x [-0.5, H-0.5] and finite
    count: np.ndarray      # (R, output_dim, P, P) float, samples used
    index: list            # 4 x flat index into input.ravel() (0 where not valid)
    weight: list           # 4 x bilinear weight (0 where not valid)
    dist_x: np.ndarray
    dist_y: np.ndarray
    roi_w: np.ndarray      # (R,)
    roi_h: np.ndarray      # (R,)
    trans_index: np.ndarray  # (R, output_dim, P, P) flat index of the x trans channel


def _ps_plan(input_shape, rois, trans, spatial_scale, output_dim, group_size, pooled_size,
             part_size, sample_per_part, trans_std):
    n, channels, height, width = input_shape
    r_count = rois.shape[0]
    p = pooled_size
    part = part_size if part_size > 0 else pooled_size
    spp = sample_per_part
    num_classes = 1 if trans is None else trans.shape[1] // 2
    per_class = output_dim // num_classes

    with np.errstate(over="ignore", invalid="ignore"):
        start_w = _c_round(rois[:, 1]) * spatial_scale - 0.5
        start_h = _c_round(rois[:, 2]) * spatial_scale - 0.5
        end_w = (_c_round(rois[:, 3]) + 1.0) * spatial_scale - 0.5
        end_h = (_c_round(rois[:, 4]) + 1.0) * spatial_scale - 0.5
        roi_w = np.maximum(end_w - start_w, 0.1)   # too small RoIs count as 0.1 wide
        roi_h = np.maximum(end_h - start_h, 0.1)
        bin_w = roi_w / p
        bin_h = roi_h / p
        sub_w = bin_w / spp
        sub_h = bin_h / spp

    bins = np.arange(p)
    # Part cell floor(py / P * part): exact integer arithmetic (the official
    # operator's float expression can land one cell low, e.g. P = part = 22).
    part_of = bins * part // p
    group_of = np.clip(bins * group_size // p, 0, group_size - 1)
    ctop = np.arange(output_dim)
    cls = ctop // per_class
    # Position-sensitive input channel (ctop*G + gy)*G + gx: (output_dim, P, P).
    chan = (ctop[:, None, None] * group_size + group_of[None, :, None]) * group_size \
        + group_of[None, None, :]

    sh = (r_count, output_dim, p, p, spp, spp)
    with np.errstate(over="ignore", invalid="ignore"):
        if trans is None:
            tx = np.zeros((r_count, output_dim, p, p))
            ty = tx
        else:
            tx = trans[:, 2 * cls][:, :, part_of[:, None], part_of[None, :]] * trans_std
            ty = trans[:, 2 * cls + 1][:, :, part_of[:, None], part_of[None, :]] * trans_std
        r4 = (slice(None),) + (None,) * 3
        wstart = bins[None, None, None, :] * bin_w[r4] + start_w[r4] + tx * roi_w[r4]
        hstart = bins[None, None, :, None] * bin_h[r4] + start_h[r4] + ty * roi_h[r4]
        r6 = (slice(None),) + (None,) * 5
        # Left-aligned samples: start + i*sub_bin, i in [0, sample_per_part).
        w = wstart[..., None, None] + np.arange(spp)[None, :] * sub_w[r6] + np.zeros(sh)
        h = hstart[..., None, None] + np.arange(spp)[:, None] * sub_h[r6] + np.zeros(sh)
    w = w.reshape(sh[:4] + (spp * spp,))
    h = h.reshape(sh[:4] + (spp * spp,))

    batch = np.full(r_count, -1, dtype=np.intp)   # -1: invalid index, every sample skipped
    for r in range(r_count):
        b = _batch_index(rois[r, 0], n)
        if b is not None:
            batch[r] = b
    valid = ((batch >= 0)[:, None, None, None, None] & np.isfinite(w) & np.isfinite(h)
             & (w >= -0.5) & (w <= width - 0.5) & (h >= -0.5) & (h <= height - 0.5))
    w = np.where(valid, np.clip(w, 0.0, width - 1.0), 0.0)
    h = np.where(valid, np.clip(h, 0.0, height - 1.0), 0.0)
    # The official operator's corners: floor and ceil, the same pixel when integral.
    x1 = np.floor(w)
    x2 = np.ceil(w)
    y1 = np.floor(h)
    y2 = np.ceil(h)
    dist_x = w - x1
    dist_y = h - y1
    plane = ((np.maximum(batch, 0)[:, None, None, None] * channels + chan[None])
             * height)[..., None]
    index, weight = [], []
    for cy, cx, q in ((y1, x1, (1 - dist_x) * (1 - dist_y)), (y2, x1, (1 - dist_x) * dist_y),
                      (y1, x2, dist_x * (1 - dist_y)), (y2, x2, dist_x * dist_y)):
        index.append(np.where(valid, (plane + cy.astype(np.intp)) * width + cx.astype(np.intp), 0))
        weight.append(np.where(valid, q, 0.0))
    count = valid.sum(axis=-1).astype(np.float64)
    trans_index = (((np.arange(r_count)[:, None, None, None] * num_classes + cls[None, :, None, None])
                    * 2 * part + part_of[None, None, :, None]) * part + part_of[None, None, None, :])
    return _PSPlan(valid, count, index, weight, dist_x, dist_y, roi_w, roi_h,
                   np.broadcast_to(trans_index, count.shape))


def deform_psroi_pool(input, rois, trans=None, *, spatial_scale, output_dim, group_size,
                      pooled_size, part_size=0, sample_per_part=1, trans_std=0.0):
    """Deformable position-sensitive RoI pooling (the official DCN operator's).

    Per RoI ``[b, x1, y1, x2, y2]``: ``start = round(x1)*scale - 0.5``,
    ``end = (round(x2) + 1)*scale - 0.5`` (C's round, half away from zero),
    ``roi_w = max(end - start, 0.1)``, ``bin = roi_w / pooled``,
    ``sub_bin = bin / sample_per_part``. Bin (py, px) of output channel c starts
    at ``px*bin_w + start_x + trans_std*trans[r, 2*cls, party, partx]*roi_w``
    (y: channel ``2*cls + 1``), with ``cls = c // (output_dim/num_classes)``
    and part cell ``floor(py*part/pooled)``, and reads input channel
    ``(c*G + gy)*G + gx``, ``gy = clamp(floor(py*G/pooled), 0, G-1)``. Samples
    at ``start + i*sub_bin``, ``i < sample_per_part``; one outside
    ``[-0.5, W-0.5] x [-0.5, H-0.5]`` (or non-finite) is skipped and not
    counted, the others are clamped into ``[0, W-1] x [0, H-1]`` and read
    bilinearly from corners ``floor`` and ``ceil`` (one pixel when integral).
    Output = sum / count, 0 when count is 0. Dai et al., "Deformable
    Convolutional Networks" (2017), R-FCN head.

    Args:
        input: (N, output_dim*group_size**2, H, W) array.
        rois: (R, 5) array of ``[batch_index, x1, y1, x2, y2]``.
        trans: (R, 2*num_classes, part, part) array (x at ``2*cls``, y at
            ``2*cls + 1``), or None for ``no_trans``.
        spatial_scale: float.
        output_dim, group_size, pooled_size: ints.
        part_size: int, 0 means ``pooled_size``.
        sample_per_part: int, samples per bin per axis.
        trans_std: float, trans scale.

    Returns:
        output: (R, output_dim, P, P) float64 array.
        count: (R, output_dim, P, P) float64 array, samples used per bin.
    """
    input, rois, trans = map(_f64, (input, rois, trans))
    plan = _ps_plan(input.shape, rois, trans, spatial_scale, output_dim, group_size,
                    pooled_size, part_size, sample_per_part, trans_std)
    flat = input.reshape(-1)
    total = sum((q * flat[i]).sum(axis=-1) for i, q in zip(plan.index, plan.weight))
    out = np.where(plan.count > 0, total / np.maximum(plan.count, 1.0), 0.0)
    return out, plan.count


def deform_psroi_pool_backward(grad_output, input, rois, trans=None, *, spatial_scale,
                               output_dim, group_size, pooled_size, part_size=0,
                               sample_per_part=1, trans_std=0.0):
    """Gradients of :func:`deform_psroi_pool` (the official backward; none for rois).

    With ``diff = grad_out / count`` (0 where count is 0):

    * grad input: each counted sample scatters ``q * diff`` to its floor/ceil
      corners, q the bilinear weight at the clamped position.
    * grad trans: for each counted sample, at the *clamped* position with the
      floor/ceil corners (U00 = (y1, x1), U01 = (y2, x1), U10 = (y1, x2),
      U11 = (y2, x2)): x channel ``+= ((1-dist_y)*(U10 - U00) + dist_y*(U11 - U01))
      * trans_std * roi_w * diff``, y channel ``+= ((1-dist_x)*(U01 - U00) +
      dist_x*(U11 - U10)) * trans_std * roi_h * diff``, summed into the part
      cell and class of the bin. So a sample clamped onto the border, or at an
      integral position (floor == ceil), gives 0 along that axis.

    Args:
        grad_output: (R, output_dim, P, P) array.
        input, rois, trans and the keyword parameters: as for
            :func:`deform_psroi_pool`.

    Returns:
        (grad_input (N, C, H, W), grad_trans (R, 2*num_classes, part, part) or
        None), float64.
    """
    grad_output, input, rois, trans = map(_f64, (grad_output, input, rois, trans))
    plan = _ps_plan(input.shape, rois, trans, spatial_scale, output_dim, group_size,
                    pooled_size, part_size, sample_per_part, trans_std)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = np.where(plan.count > 0, grad_output / np.maximum(plan.count, 1.0), 0.0)
    diff = diff[..., None]
    grad_input = np.zeros(input.size)
    for i, q in zip(plan.index, plan.weight):
        grad_input += np.bincount(i.ravel(), weights=np.where(plan.valid, q * diff, 0.0).ravel(),
                                  minlength=input.size)
    grad_input = grad_input.reshape(input.shape)
    if trans is None:
        return grad_input, None

    flat = input.reshape(-1)
    u00, u01, u10, u11 = (np.where(plan.valid, flat[i], 0.0) for i in plan.index)
    dx, dy = plan.dist_x, plan.dist_y
    d_x = np.where(plan.valid, ((1 - dy) * (u10 - u00) + dy * (u11 - u01)) * diff, 0.0).sum(-1)
    d_y = np.where(plan.valid, ((1 - dx) * (u01 - u00) + dx * (u11 - u10)) * diff, 0.0).sum(-1)
    r4 = (slice(None),) + (None,) * 3
    used = plan.count > 0   # implies a finite roi_w, roi_h: no 0 * inf below
    with np.errstate(invalid="ignore", over="ignore"):
        g_x = np.where(used, d_x * trans_std * plan.roi_w[r4], 0.0)
        g_y = np.where(used, d_y * trans_std * plan.roi_h[r4], 0.0)
    part2 = trans.shape[2] * trans.shape[3]
    grad_trans = (np.bincount(plan.trans_index.ravel(), weights=g_x.ravel(), minlength=trans.size)
                  + np.bincount((plan.trans_index + part2).ravel(), weights=g_y.ravel(),
                                minlength=trans.size))
    return grad_input, grad_trans.reshape(trans.shape)
