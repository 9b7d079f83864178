"""Deformable RoI pooling: array in, array out, forward and backward.

Two ops: :func:`deform_roi_pool` (RoIAlign style, plain and modulated, mmcv's
numbers; kernels/deform_roi_pool.cu) and :func:`deform_psroi_pool`
(position-sensitive, the official DCN operator's numbers;
kernels/deform_psroi_pool.cu). The kernel paths (``roi_pool_forward``,
``roi_pool_backward``, ``psroi_pool_forward``, ``psroi_pool_backward``) run on
either backend: CuPy on the GPU, or the host build of the same source in the
CPU test tier. NumPy inputs take the reference (``cupydcn.reference``). Both
backwards have a ``deterministic`` mode without floating-point atomics (sorted
samples gathered per input element; see the kernel files' opening paragraphs).
The offset and mask gradients of deform_roi_pool and the trans gradient of
deform_psroi_pool reduce over the channels with ``lanes`` threads of a warp per
bin (``_kernels.lanes_for``: 1 on the host, a plain loop).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy

from cupydcn import _arrays, _config, _dispatch, _dtypes, _kernels, _validation, reference

_ROI = "deform_roi_pool"
_PSROI = "deform_psroi_pool"
_ROI_OP, _PSROI_OP = "deform_roi_pool", "deform_psroi_pool"  # the ops (_dispatch)
ROI_GRADIENTS = ("input", "offset", "mask")
PSROI_GRADIENTS = ("input", "trans")


class DeformRoIPoolGrads(NamedTuple):
    """Gradients of deform_roi_pool; None where not asked for or not given."""
    input: object
    offset: object
    mask: object


class DeformPSRoIPoolGrads(NamedTuple):
    """Gradients of deform_psroi_pool; None where not asked for or not given."""
    input: object
    trans: object


def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0,
                    sampling_ratio=0, gamma=0.1, mask=None, algorithm=None):
    """Deformable RoI pooling, RoIAlign style (mmcv's ``deform_roi_pool``), or
    modulated deformable RoI pooling when ``mask`` is given.

    ``out[r, c, py, px] = mask[r, 0, py, px] * mean_{iy, ix} bilinear(input[b, c],
    bin start + gamma*roi_size*offset[r, :, py, px] + (i + 0.5)*bin/grid)``, with
    ``b = rois[r, 0]``, RoIAlign's bilinear rule and the bin move of channel 0
    in x and channel 1 in y (docs/semantics.md §3; Dai et al., "Deformable
    Convolutional Networks", 2017; Zhu et al., "Deformable ConvNets v2", 2019
    for the modulated op).

    Args:
        input: (N, C, H, W) array.
        rois: (R, 5) array of the input's dtype, rows ``[batch_index, x1, y1, x2, y2]``
            in image coordinates; batch indices must be integers in [0, N).
        offset: (R, 2, ph, pw) array (channel 0 moves x, channel 1 moves y) or None.
        output_size: int or (ph, pw) pair.
        spatial_scale: float > 0, image -> feature map coordinates.
        sampling_ratio: int >= 0, samples per bin per axis; 0 = adaptive,
            ``ceil(roi_size / pooled)`` capped at 64.
        gamma: float, the offset scale.
        mask: (R, 1, ph, pw) array (the modulated pack's sigmoid mask) or None.
        algorithm: None (the automatic choice) or the name of an
            implementation from ``cupydcn.algorithms("deform_roi_pool")``.

    Returns:
        (R, C, ph, pw) array of the input's library, dtype and device.

    Raises:
        ArgumentError: a bad shape or value, e.g. a batch index outside
            [0, N) (a ``ValueError`` and a ``RuntimeError``).
        ArgumentTypeError: a missing array, a non-array or an unsupported or
            mismatched dtype (a ``TypeError`` and a ``RuntimeError``).

    With no offset and no mask this is ``torchvision.ops.roi_align(...,
    aligned=True)``. A RoI with a non-finite coordinate, and a bin with a
    non-finite offset or mask, pools to 0.

    Example:
        >>> x = numpy.array([[[[1., 2.], [3., 4.]]]])
        >>> cupydcn.deform_roi_pool(x, numpy.array([[0., 0, 0, 1, 1]]), output_size=2,
        ...                         sampling_ratio=2)[0, 0]
        array([[1.  , 1.25],
               [1.5 , 1.75]])
    """
    _validation.check_arrays(dict(input=input, rois=rois), dict(offset=offset, mask=mask))
    call = _arrays.Call(input=input, rois=rois, offset=offset, mask=mask)
    geo = _validation.check_deform_roi_pool(call.input, call.rois, call.offset, output_size,
                                            spatial_scale, sampling_ratio, gamma, call.mask)
    with call.device():
        implementation, backend = _dispatch.choose(_ROI_OP, call.on_gpu, geo, algorithm,
                                                   empty=not geo.R * geo.C)
        out = implementation.forward(backend, geo, call)
    return call.wrap(out)


def deform_roi_pool_backward(grad_output, input, rois, offset=None, output_size=7,
                             spatial_scale=1.0, sampling_ratio=0, gamma=0.1, mask=None,
                             wrt=ROI_GRADIENTS, deterministic=False, algorithm=None):
    """Gradients of :func:`deform_roi_pool` (none for ``rois``).

    grad input: each sample scatters ``grad * mask / count * corner weight``.
    grad offset: the exact derivative of the forward, per sample after its
    clamps (0 along an axis where the sample was clamped from below 0 or onto
    the last row/column), times ``gamma*roi_w`` (channel 0) or ``gamma*roi_h``
    (channel 1); mmcv evaluates it at the unclamped position instead, which
    differs only in those clamped bands. grad mask: ``sum_c grad * pooled``.

    Args:
        grad_output: (R, C, ph, pw) array, the gradient of the output.
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
            mask: as for :func:`deform_roi_pool`.
        wrt: the gradients to compute, a tuple, list or set of names among
            ``("input", "offset", "mask")``; the default (all three) means
            every one that applies (offset and mask only when given), naming
            offset or mask without the array is an error.
        deterministic: compute the input gradient without floating-point
            atomics (the samples sorted by the pixel cell they read, then one
            gathering thread per input element), so every gradient is
            bit-identical from run to run (the offset and mask gradients
            always are); slower than the default scatter. It needs about 32
            bytes per sample (``grid_h*grid_w`` per bin), in chunks of bins
            bounded by the workspace limit (:func:`cupydcn.set_workspace_limit`;
            the same limit gives the same bits), plus 16 bytes per bin and
            16 per image pixel (N*H*W). NumPy inputs (the reference) are
            always deterministic.
        algorithm: None (the automatic choice) or the name of an
            implementation from ``cupydcn.algorithms("deform_roi_pool")``.

    Returns:
        DeformRoIPoolGrads(input (N, C, H, W), offset (R, 2, ph, pw),
        mask (R, 1, ph, pw)), each None where not computed.

    Example:
        >>> grads = cupydcn.deform_roi_pool_backward(g, x, rois, offset, output_size=7)
    """
    _validation.check_arrays(dict(grad_output=grad_output, input=input, rois=rois),
                             dict(offset=offset, mask=mask))
    wrt = _validation.check_wrt(wrt, ROI_GRADIENTS, offset=offset, mask=mask)
    call = _arrays.Call(input=input, grad_output=grad_output, rois=rois, offset=offset,
                        mask=mask)
    geo = _validation.check_deform_roi_pool(call.input, call.rois, call.offset, output_size,
                                            spatial_scale, sampling_ratio, gamma, call.mask,
                                            grad_output=call.grad_output)
    with call.device():
        implementation, backend = _dispatch.choose(_ROI_OP, call.on_gpu, geo, algorithm,
                                                   deterministic, empty=not geo.R * geo.C)
        grads = implementation.backward(backend, geo, call, wrt)
    return call.wrap(grads)


def deform_psroi_pool(input, rois, trans=None, spatial_scale=1.0, output_dim=None,
                      group_size=1, pooled_size=7, part_size=0, sample_per_part=4,
                      trans_std=0.0, return_count=False, algorithm=None):
    """Deformable position-sensitive RoI pooling (the official DCN operator,
    ``DeformablePSROIPooling``, R-FCN head).

    ``out[r, c, py, px] = mean over the counted samples of bilinear(input[b,
    (c*G + gy)*G + gx], bin start + trans_std*trans[r, cls(c), part(py, px)]*roi_size
    + i*sub_bin)`` (docs/semantics.md §4; Dai et al., "Deformable Convolutional
    Networks", 2017). RoI bounds are rounded (C's round), samples outside
    ``[-0.5, W-0.5] x [-0.5, H-0.5]`` are not counted, 0 when none is.

    Args:
        input: (N, output_dim*group_size**2, H, W) array.
        rois: (R, 5) array of the input's dtype, ``[batch_index, x1, y1, x2, y2]``.
        trans: (R, 2*num_classes, part, part) array (x at channel ``2*cls``, y at
            ``2*cls + 1``; num_classes must divide output_dim) or None (no_trans).
        spatial_scale: float > 0.
        output_dim: int, or None for ``input.shape[1] // group_size**2``.
        group_size: int >= 1, the position-sensitive grid G.
        pooled_size: int >= 1, the output is pooled_size x pooled_size.
        part_size: int >= 0, the trans grid (0 means pooled_size).
        sample_per_part: int >= 1, samples per bin per axis.
        trans_std: float, the trans scale.
        return_count: also return the samples counted per output element.
        algorithm: None (the automatic choice) or the name of an
            implementation from ``cupydcn.algorithms("deform_psroi_pool")``.

    Returns:
        (R, output_dim, pooled_size, pooled_size) array, and with
        ``return_count`` a pair (output, count), count of that shape in the
        accumulation dtype (float32 for float16/bfloat16 inputs, else the
        input's): what :func:`deform_psroi_pool_backward` takes.

    Raises:
        ArgumentError, ArgumentTypeError: as :func:`deform_roi_pool`.

    Example:
        >>> out = cupydcn.deform_psroi_pool(x, rois, trans, spatial_scale=1/16,
        ...                                 group_size=7, pooled_size=7, trans_std=0.1)
    """
    _validation.check_arrays(dict(input=input, rois=rois), dict(trans=trans))
    call = _arrays.Call(input=input, rois=rois, trans=trans)
    geo = _validation.check_deform_psroi_pool(call.input, call.rois, call.trans, spatial_scale,
                                              output_dim, group_size, pooled_size, part_size,
                                              sample_per_part, trans_std)
    with call.device():
        implementation, backend = _dispatch.choose(_PSROI_OP, call.on_gpu, geo, algorithm,
                                                   empty=not geo.R * geo.output_dim)
        out, count = implementation.forward(backend, geo, call)
    if return_count:
        return call.wrap(out), call.wrap(count)
    return call.wrap(out)


def deform_psroi_pool_backward(grad_output, input, rois, trans=None, count=None,
                               spatial_scale=1.0, output_dim=None, group_size=1,
                               pooled_size=7, part_size=0, sample_per_part=4, trans_std=0.0,
                               wrt=PSROI_GRADIENTS, deterministic=False, algorithm=None):
    """Gradients of :func:`deform_psroi_pool` (the official backward; none for rois).

    grad input: each counted sample scatters ``grad / count * corner weight``.
    grad trans: at the clamped sample position with the floor/ceil corners,
    ``d/dx = (1-dist_y)*(U[y0,x1] - U[y0,x0]) + dist_y*(U[y1,x1] - U[y1,x0])``
    (likewise y), times ``trans_std*roi_w`` (``roi_h``) times ``grad / count``,
    summed into the bin's class and part cell.

    Args:
        grad_output: (R, output_dim, pooled_size, pooled_size) array.
        input, rois, trans and the keywords: as for :func:`deform_psroi_pool`.
        count: the forward's count (``return_count=True``), or None to
            recompute it (the NumPy path always recomputes it).
        wrt: a tuple, list or set of names among ``("input", "trans")``; the
            default (both) means every one that applies (trans only when
            given), naming trans without it is an error.
        deterministic: compute both gradients without floating-point atomics
            (input: the samples sorted by (image, class, position-sensitive
            group, pixel cell), then one gathering thread per input element;
            trans: one thread per trans cell summing its bins in a fixed
            order), so they are bit-identical from run to run; slower than the
            default scatter. The input gradient needs about 32 bytes per
            sample (``sample_per_part**2`` per bin and class), in chunks of
            bins bounded by the workspace limit
            (:func:`cupydcn.set_workspace_limit`; the same limit gives the
            same bits), plus 16 bytes per (image, class, group, pixel). NumPy
            inputs (the reference) are always deterministic.
        algorithm: None (the automatic choice) or the name of an
            implementation from ``cupydcn.algorithms("deform_psroi_pool")``.

    Returns:
        DeformPSRoIPoolGrads(input (N, C, H, W), trans (R, 2*num_classes, part, part)),
        each None where not computed.

    Example:
        >>> out, count = cupydcn.deform_psroi_pool(x, rois, trans, return_count=True)
        >>> grads = cupydcn.deform_psroi_pool_backward(g, x, rois, trans, count)
    """
    _validation.check_arrays(dict(grad_output=grad_output, input=input, rois=rois),
                             dict(trans=trans, count=count))
    wrt = _validation.check_wrt(wrt, PSROI_GRADIENTS, trans=trans)
    call = _arrays.Call(input=input, grad_output=grad_output, rois=rois, trans=trans,
                        count=count)
    geo = _validation.check_deform_psroi_pool(call.input, call.rois, call.trans, spatial_scale,
                                              output_dim, group_size, pooled_size, part_size,
                                              sample_per_part, trans_std,
                                              grad_output=call.grad_output, count=call.count)
    with call.device():
        implementation, backend = _dispatch.choose(_PSROI_OP, call.on_gpu, geo, algorithm,
                                                   deterministic, empty=not geo.R * geo.output_dim)
        grads = implementation.backward(backend, geo, call, wrt)
    return call.wrap(grads)


def _psroi_keywords(geo):
    return dict(spatial_scale=geo.spatial_scale, output_dim=geo.output_dim,
                group_size=geo.group_size, pooled_size=geo.pooled_size,
                part_size=geo.part_size, sample_per_part=geo.sample_per_part,
                trans_std=geo.trans_std)


# ---- deterministic input gradients: sample chunks --------------------------

# Peak bytes per sample of a chunk: keys, sorted keys, key // S and the order
# (int64 each); the chunks are sized by it.
SAMPLE_BYTES = 32
_KEY_LIMIT = 2**63 - 1


def _chunk_cap(cells):
    """The most samples a chunk may hold: its peak bytes within the workspace
    limit, and its keys ``cell*samples + s`` (cell <= ``cells``) within int64."""
    return max(1, min(_config.get_workspace_limit() // SAMPLE_BYTES, _KEY_LIMIT // (cells + 1)))


def _checked(chunks, cells):
    for _, _, samples in chunks:  # only a single bin can pass the cap
        if samples > _KEY_LIMIT // (cells + 1):
            raise _validation.ArgumentError(
                f"deterministic backward: {samples} samples of one bin on "
                f"{cells} pixel cells overflow the int64 sort keys")
    return chunks


def _counted_chunks(first, cells):
    """Ranges (k0, k1, samples) of consecutive bins, in order, each within
    :func:`_chunk_cap` samples or a single bin; ``first`` (NumPy or CuPy,
    int64, length bins + 1) holds each bin's first sample. Chunks with no
    sample are left out."""
    nbins = first.shape[0] - 1
    total = int(first[-1])
    cap = _chunk_cap(cells)
    if total <= cap:
        return _checked([(0, nbins, total)] if total else [], cells)
    host = first.get() if hasattr(first, "get") else numpy.asarray(first)
    chunks, k0 = [], 0
    while k0 < nbins:
        k1 = int(numpy.searchsorted(host, host[k0] + cap, side="right")) - 1
        k1 = min(max(k1, k0 + 1), nbins)
        if host[k1] > host[k0]:
            chunks.append((k0, k1, int(host[k1] - host[k0])))
        k0 = k1
    return _checked(chunks, cells)


def _fixed_chunks(nbins, per_bin, cells):
    """As :func:`_counted_chunks`, for ``per_bin`` samples in every bin."""
    if nbins * per_bin == 0:
        return []
    step = max(1, _chunk_cap(cells) // per_bin)
    return _checked([(k0, min(k0 + step, nbins), (min(k0 + step, nbins) - k0) * per_bin)
                     for k0 in range(0, nbins, step)], cells)


def _sorted_samples(xp, keys, samples, cells):
    """(order, starts) of a chunk's keys: the samples in key order and the
    first entry of each cell in ``[0, cells]``."""
    keys = xp.sort(keys)  # unique keys: any correct sort gives this order
    order = keys % samples
    starts = xp.searchsorted(keys // samples, xp.arange(cells + 1, dtype=numpy.int64))
    return order, xp.ascontiguousarray(starts.astype(numpy.int64, copy=False))


# ---- launches --------------------------------------------------------------

# Lanes per bin on CUDA (``_kernels.lanes_for``'s cap): 8, so a warp still
# covers 4 neighbouring bins whose corner reads share sectors of the same
# planes (32 lanes would read 32 planes per load); benchmarks/NOTES.md.
CUDA_LANES = 8


def _launch(backend, file, kernel, geo, bits, n, args, lanes=1):
    """One RoI kernel launch over ``n`` work items: ``_kernels.launch_lanes``
    (the RoI files hold warp shuffles; only a launch with lanes > 1 runs one,
    so the others are plain loops on the host). The RoI offset gradient
    declares ``__launch_bounds__(256)``: BLOCK, the block of every launch."""
    _kernels.launch_lanes(backend, file, kernel, geo.dtype, bits, n, args, lanes)


# ---- deform_roi_pool kernel paths ----------------------------------------


def _roi_bits(geo):
    return _dtypes.index_bits(geo.N * geo.C * geo.H * geo.W, geo.R * geo.C * geo.ph * geo.pw,
                              geo.R * 5, geo.R * 2 * geo.ph * geo.pw, geo.sampling_ratio)


def _roi_args(geo):
    return [geo.N, geo.C, geo.H, geo.W, geo.R, geo.ph, geo.pw, geo.sampling_ratio,
            float(geo.spatial_scale), float(geo.gamma)]


def roi_pool_forward(backend, geo, input, rois, offset=None, mask=None):
    """The kernel path of deform_roi_pool on ``backend`` (validated arguments)."""
    xp = backend.xp
    out = _arrays.empty_result(xp, (geo.R, geo.C, geo.ph, geo.pw), geo.dtype.dtype)
    if out.size == 0:
        return out
    input, rois, offset, mask = _kernels.contiguous(xp, input, rois, offset, mask)
    _launch(backend, _ROI, "deform_roi_pool_forward", geo, _roi_bits(geo), out.size,
            [input, rois, offset, mask, out, *_roi_args(geo)])
    return out


def _roi_input_gather(backend, geo, bits, args, grad_output, rois, offset, mask, grad_input):
    """The deterministic input gradient (kernels/deform_roi_pool.cu, opening
    paragraph): counts per bin, their cumsum, then per chunk of bins keys,
    sort and gather into ``grad_input``."""
    xp = backend.xp
    nbins = geo.R * geo.ph * geo.pw
    counts = _config.empty(xp, (nbins,), numpy.int64)
    _launch(backend, _ROI, "deform_roi_pool_sample_count", geo, bits, nbins,
            [rois, offset, mask, counts, *args])
    first = xp.concatenate([xp.zeros(1, numpy.int64), xp.cumsum(counts)])
    cells = geo.N * geo.H * geo.W
    for k0, k1, samples in _counted_chunks(first, cells):
        keys = _config.empty(xp, (samples,), numpy.int64)
        _launch(backend, _ROI, "deform_roi_pool_sample_keys", geo, bits, k1 - k0,
                [rois, offset, mask, first, keys, *args, k0, k1])
        order, starts = _sorted_samples(xp, keys, samples, cells)
        del keys
        _launch(backend, _ROI, "deform_roi_pool_backward_input_gather", geo, bits,
                grad_input.size, [grad_output, rois, offset, mask, first, order, starts,
                                  grad_input, *args, k0, k1])


def roi_pool_backward(backend, geo, grad_output, input, rois, offset=None, mask=None,
                      wrt=ROI_GRADIENTS, deterministic=False, lanes=None):
    """The kernel path of deform_roi_pool_backward; ``wrt`` names ROI_GRADIENTS
    (offset and mask are computed only when given). ``deterministic`` takes the
    atomic-free input gradient. ``lanes`` (a power of two, 1..32: threads of a
    warp per bin of the offset and mask gradients) overrides ``_kernels.lanes_for``."""
    lanes = _kernels.checked_lanes(backend, geo.C, lanes, CUDA_LANES)
    xp = backend.xp
    dtype, acc = geo.dtype.dtype, geo.dtype.acc
    grad_input = (_arrays.zeros_result(xp, input.shape, acc, result=acc == dtype)
                  if "input" in wrt else None)
    grad_offset = (_arrays.empty_result(xp, offset.shape, dtype)
                   if "offset" in wrt and offset is not None else None)
    grad_mask = (_arrays.empty_result(xp, mask.shape, dtype)
                 if "mask" in wrt and mask is not None else None)
    if geo.R * geo.C * geo.ph * geo.pw:
        grad_output, input, rois, offset, mask = _kernels.contiguous(xp, grad_output, input, rois,
                                                             offset, mask)
        bits, args = _roi_bits(geo), _roi_args(geo)
        if grad_input is not None and deterministic:
            _roi_input_gather(backend, geo, bits, args, grad_output, rois, offset, mask,
                              grad_input)
        elif grad_input is not None:
            _launch(backend, _ROI, "deform_roi_pool_backward_input", geo, bits,
                    grad_output.size, [grad_output, rois, offset, mask, grad_input, *args])
        if grad_offset is not None or grad_mask is not None:
            threads = _kernels.warp_threads(geo.R * geo.ph * geo.pw, lanes)
            _launch(backend, _ROI, "deform_roi_pool_backward_offset", geo,
                    max(bits, _dtypes.index_bits(threads + _kernels.WARP)), threads,
                    [grad_output, input, rois, offset, mask, grad_offset, grad_mask, lanes,
                     *args], lanes)
    else:  # no RoI or no channel: nothing to pool, every gradient is 0
        for g in (grad_offset, grad_mask):
            if g is not None:
                g.fill(0)
    if grad_input is not None:
        grad_input = _arrays.result(xp, grad_input, dtype)
    return DeformRoIPoolGrads(grad_input, grad_offset, grad_mask)


# ---- deform_psroi_pool kernel paths --------------------------------------


def _psroi_bits(geo):
    P = geo.pooled_size
    return _dtypes.index_bits(geo.N * geo.C * geo.H * geo.W, geo.R * geo.output_dim * P * P,
                              geo.R * 5, geo.R * 2 * geo.num_classes * geo.part_size**2,
                              geo.sample_per_part, P * max(geo.part_size, geo.group_size))


def _psroi_args(geo):
    return [geo.N, geo.C, geo.H, geo.W, geo.R, geo.output_dim, geo.group_size, geo.pooled_size,
            geo.part_size, geo.sample_per_part, geo.num_classes, float(geo.spatial_scale),
            float(geo.trans_std)]


def psroi_pool_forward(backend, geo, input, rois, trans=None):
    """The kernel path of deform_psroi_pool: (output, count), count in the
    accumulation dtype."""
    xp = backend.xp
    shape = (geo.R, geo.output_dim, geo.pooled_size, geo.pooled_size)
    out = _arrays.empty_result(xp, shape, geo.dtype.dtype)
    count = _arrays.empty_result(xp, shape, geo.dtype.acc)
    if out.size == 0:
        return out, count
    input, rois, trans = _kernels.contiguous(xp, input, rois, trans)
    _launch(backend, _PSROI, "deform_psroi_pool_forward", geo, _psroi_bits(geo), out.size,
            [input, rois, trans, out, count, *_psroi_args(geo)])
    return out, count


def _psroi_input_gather(backend, geo, bits, args, grad_output, rois, trans, count,
                        grad_input):
    """The deterministic input gradient (kernels/deform_psroi_pool.cu, opening
    paragraph): per chunk of bins keys, sort and gather into ``grad_input``."""
    xp = backend.xp
    spp2 = geo.sample_per_part**2
    nbins = geo.R * geo.num_classes * geo.pooled_size**2
    cells = geo.N * geo.num_classes * geo.group_size**2 * geo.H * geo.W
    for k0, k1, samples in _fixed_chunks(nbins, spp2, cells):
        chunk_bits = max(bits, _dtypes.index_bits(samples))
        keys = _config.empty(xp, (samples,), numpy.int64)
        _launch(backend, _PSROI, "deform_psroi_pool_sample_keys", geo, chunk_bits, samples,
                [rois, trans, keys, *args, k0, k1])
        order, starts = _sorted_samples(xp, keys, samples, cells)
        del keys
        _launch(backend, _PSROI, "deform_psroi_pool_backward_input_gather", geo, chunk_bits,
                grad_input.size, [grad_output, rois, trans, count, order, starts,
                                  grad_input, *args, k0, k1])


def psroi_pool_backward(backend, geo, grad_output, input, rois, trans=None, count=None,
                        wrt=PSROI_GRADIENTS, deterministic=False, lanes=None):
    """The kernel path of deform_psroi_pool_backward; ``count`` None recomputes
    it with the forward kernel. ``deterministic`` takes the atomic-free
    gradients. ``lanes`` (a power of two, 1..32: threads of a warp per item of
    the trans gradient) overrides ``_kernels.lanes_for``."""
    lanes = _kernels.checked_lanes(backend, geo.output_dim // max(geo.num_classes, 1), lanes,
                                   CUDA_LANES)
    xp = backend.xp
    dtype, acc = geo.dtype.dtype, geo.dtype.acc
    grad_input = (_arrays.zeros_result(xp, input.shape, acc, result=acc == dtype)
                  if "input" in wrt else None)
    n = geo.R * geo.output_dim * geo.pooled_size**2
    grad_trans = None
    if "trans" in wrt and trans is not None:  # the trans gather writes every element
        grad_trans = (_config.empty(xp, trans.shape, acc) if deterministic and n
                      else xp.zeros(trans.shape, acc))  # converted to a result at the end
    if n and (grad_input is not None or grad_trans is not None):
        if count is None:
            count = psroi_pool_forward(backend, geo, input, rois, trans)[1]
        grad_output, input, rois, trans = _kernels.contiguous(xp, grad_output, input, rois, trans)
        count = xp.ascontiguousarray(count.astype(acc, copy=False))
        bits, args = _psroi_bits(geo), _psroi_args(geo)
        if grad_input is not None and deterministic:
            _psroi_input_gather(backend, geo, bits, args, grad_output, rois, trans, count,
                                grad_input)
        elif grad_input is not None:
            _launch(backend, _PSROI, "deform_psroi_pool_backward_input", geo, bits, n,
                    [grad_output, rois, trans, count, grad_input, *args])
        if grad_trans is not None:
            kernel, items = (
                ("deform_psroi_pool_backward_trans_gather", geo.part_size**2) if deterministic
                else ("deform_psroi_pool_backward_trans", geo.pooled_size**2))
            threads = _kernels.warp_threads(geo.R * geo.num_classes * items, lanes)
            _launch(backend, _PSROI, kernel, geo,
                    max(bits, _dtypes.index_bits(threads + _kernels.WARP)), threads,
                    [grad_output, input, rois, trans, count, grad_trans, lanes, *args], lanes)
    if grad_input is not None:
        grad_input = _arrays.result(xp, grad_input, dtype)
    if grad_trans is not None:
        grad_trans = _arrays.result(xp, grad_trans, dtype)
    return DeformPSRoIPoolGrads(grad_input, grad_trans)


# --------------------------------------------------------------------------
# The implementations (see _dispatch): ``a`` is the call's converted arrays
# --------------------------------------------------------------------------

def _roi_kernels_forward(backend, geo, a):
    return roi_pool_forward(backend, geo, a.input, a.rois, a.offset, a.mask)


def _roi_kernels_backward(deterministic):
    def run(backend, geo, a, wrt):
        return roi_pool_backward(backend, geo, a.grad_output, a.input, a.rois, a.offset, a.mask,
                                 wrt, deterministic)
    return run


def _roi_reference_forward(backend, geo, a):
    out = reference.deform_roi_pool(a.input, a.rois, a.offset, (geo.ph, geo.pw),
                                    geo.spatial_scale, geo.sampling_ratio, geo.gamma, a.mask)
    return _arrays.result(numpy, out, geo.dtype.dtype)


def _roi_reference_backward(backend, geo, a, wrt):
    full = reference.deform_roi_pool_backward(a.grad_output, a.input, a.rois, a.offset,
                                              (geo.ph, geo.pw), geo.spatial_scale,
                                              geo.sampling_ratio, geo.gamma, a.mask)
    return DeformRoIPoolGrads(*(
        _arrays.result(numpy, g, geo.dtype.dtype) if name in wrt and g is not None else None
        for name, g in zip(ROI_GRADIENTS, full)))


def _psroi_kernels_forward(backend, geo, a):
    return psroi_pool_forward(backend, geo, a.input, a.rois, a.trans)


def _psroi_kernels_backward(deterministic):
    def run(backend, geo, a, wrt):
        return psroi_pool_backward(backend, geo, a.grad_output, a.input, a.rois, a.trans,
                                   a.count, wrt, deterministic)
    return run


def _psroi_reference_forward(backend, geo, a):
    out, count = reference.deform_psroi_pool(a.input, a.rois, a.trans, **_psroi_keywords(geo))
    return (_arrays.result(numpy, out, geo.dtype.dtype),
            _arrays.result(numpy, count, geo.dtype.acc))


def _psroi_reference_backward(backend, geo, a, wrt):
    full = reference.deform_psroi_pool_backward(a.grad_output, a.input, a.rois, a.trans,
                                                **_psroi_keywords(geo))
    return DeformPSRoIPoolGrads(*(
        _arrays.result(numpy, g, geo.dtype.dtype) if name in wrt and g is not None else None
        for name, g in zip(PSROI_GRADIENTS, full)))


def _register(op, file, forward, backward, reference_forward, reference_backward):
    kernels = frozenset({_dispatch.CUDA, _dispatch.HOST})
    _dispatch.register(_dispatch.Implementation(
        "bins", op, kernels, deterministic=False, forward=forward, backward=backward(False),
        launch=_dispatch.Launch(file), priority=20,
        summary="one thread per output element; input gradient scattered with float atomics; "
                "offset, mask and trans gradients a warp per bin (channels reduced in the warp)"))
    _dispatch.register(_dispatch.Implementation(
        "bins_deterministic", op, kernels, deterministic=True, forward=forward,
        backward=backward(True), launch=_dispatch.Launch(file), priority=10,
        summary="the same forward; input gradient gathered per input element from samples "
                "sorted by pixel cell (no float atomics)"))
    _dispatch.register(_dispatch.Implementation(
        "reference", op, frozenset({_dispatch.NUMPY}), deterministic=True,
        forward=reference_forward, backward=reference_backward, priority=0,
        summary="the NumPy float64 reference (cupydcn.reference), rounded to the dtype"))


_register(_ROI_OP, _ROI, _roi_kernels_forward, _roi_kernels_backward, _roi_reference_forward,
          _roi_reference_backward)
_register(_PSROI_OP, _PSROI, _psroi_kernels_forward, _psroi_kernels_backward,
          _psroi_reference_forward, _psroi_reference_backward)
