"""Deformable convolution on channels-last memory: the ``im2col_nhwc`` implementation
(kernels/deform_conv_nhwc.cu).

The public API keeps NCHW *shapes*; channels-last is a memory format: a
(B, C, H, W) array whose strides make C the fastest axis (``x_nhwc.transpose(0,
3, 1, 2)`` in NumPy/CuPy, a torch ``channels_last`` tensor through DLPack;
``_validation.is_channels_last``, ``geo.channels_last``). This implementation
reads such an input where it lies and writes a channels-last result, with no
transpose and no copy of the activations:

* forward, per tile of output pixels (``_deform_conv.tiles``: whole images or
  rows of one image, consecutive in NHWC order): ``deform_im2col_nhwc`` writes
  the columns (pixels, kh*kw*C) in the storage type (a row per output pixel, one
  tap's channels contiguous, 16-byte vector loads where C, C/groups and
  C/offset_groups allow), then per weight group one GEMM (``_gemm``: cuBLAS on
  the GPU, NumPy on the host) ``out (pixels, Cout/groups) = columns @ W'^T``
  straight into the NHWC output, with the weight permuted to (Cout, kh, kw,
  C/groups) (a copy of the small weight; none when the weight is itself
  channels-last, as ``model.to(memory_format=torch.channels_last)`` makes it);
* backward: ``grad_columns = grad_out @ W'`` per weight group (grad_output read
  where it lies, channels-last or NCHW), then ONE pass ``deform_col2im_nhwc``
  per (pixel, offset group, tap) over the group's channels: the input gradient
  scattered into an NHWC buffer with float atomics in the accumulation type,
  the offset and mask gradients reduced over the channels (warp shuffles on
  CUDA, one lane and a plain loop on the host) and written once; the weight
  gradient ``W'grad = grad_out^T @ columns`` (columns from a second im2col
  pass), permuted back to (Cout, C/groups, kh, kw).

Memory formats: the input may be channels-last or anything else (anything
else is copied to NHWC once: the implementation named with an NCHW input runs,
converting, rather than refusing); the offset and mask are read in place when
NCHW-contiguous or channels-last (their strides go to the kernels), other
layouts are copied to NCHW; grad_output is read in place when NCHW-contiguous
or channels-last. The result has the input's memory format and each gradient
its array's (``_deform_conv`` converts where an implementation's result
differs), as torch does for ``channels_last`` tensors.

Automatic choice: priority 35, only for channels-last inputs, and only where
the automatic choice allows float atomics (the backward scatters with them):
on CUDA. On the CPU the automatic choice is deterministic (see ``_dispatch``),
so the host never takes it automatically (``algorithm="im2col_nhwc"`` runs it
there); an NCHW input never takes it automatically. The prediction for H200
(a roofline model, no GPU measurement yet) is in benchmarks/NOTES.md.
"""

from __future__ import annotations

import numpy

from cupydcn import (_arrays, _config, _deform_conv, _dispatch, _dtypes, _gemm, _kernels,
                     _validation)

_OP = "deform_conv2d"
_FILE = "deform_conv_nhwc"
# Lanes per (pixel, offset group, tap) item on CUDA: up to a warp, so a warp
# reads 32 consecutive channels of one corner (one 128-byte line in float32);
# on the host 1 (no shuffle: a plain loop). See _kernels.lanes_for.
CUDA_LANES = 32
VECTOR_BYTES = 16


def _address(xp, a):
    return a.ctypes.data if xp is numpy else a.data.ptr


def vector_width(xp, geo, input_nhwc, columns):
    """Channels per im2col thread: 16 bytes' worth when every vector stays
    inside one weight group and one offset group and both buffers are 16-byte
    aligned, else 1."""
    width = max(1, VECTOR_BYTES // geo.dtype.dtype.itemsize)
    if (width > 1 and (geo.C // geo.groups) % width == 0
            and (geo.C // geo.offset_groups) % width == 0
            and _address(xp, input_nhwc) % VECTOR_BYTES == 0
            and _address(xp, columns) % VECTOR_BYTES == 0):
        return width
    return 1


def pixel_strides(xp, array):
    """(array to pass, (image, channel, pixel) element strides) of a
    (B, Ch, Ho, Wo) offset, mask or grad_output: read in place when
    channels-last or NCHW-contiguous, else an NCHW copy."""
    B, Ch, Ho, Wo = array.shape
    if _validation.is_channels_last(array):
        return array.transpose(0, 2, 3, 1), (Ho * Wo * Ch, 1, Ch)
    return xp.ascontiguousarray(array), (Ch * Ho * Wo, Ho * Wo, 1)


def _like(xp, array, dtype):
    """An uninitialised result shaped like (B, Ch, H, W) ``array``, in its
    memory format (channels-last or NCHW), and its kernel view and strides."""
    B, Ch, H, W = array.shape
    if _validation.is_channels_last(array):
        buffer = _arrays.empty_result(xp, (B, H, W, Ch), dtype)
        return buffer.transpose(0, 3, 1, 2), buffer, (H * W * Ch, 1, Ch)
    buffer = _arrays.empty_result(xp, (B, Ch, H, W), dtype)
    return buffer, buffer, (Ch * H * W, H * W, 1)


def _index_bits(geo, plan, lanes):
    taps = geo.kh * geo.kw
    most = max(t.out_rows for t in plan) * geo.Wo
    return _dtypes.index_bits(
        geo.B * geo.C * geo.H * geo.W,
        geo.B * geo.offset_groups * 2 * taps * geo.Ho * geo.Wo,
        geo.B * geo.Cout * geo.Ho * geo.Wo,
        most * taps * geo.C,
        most * geo.offset_groups * taps * lanes + _kernels.WARP,
    )


def _geometry_args(geo, tile):
    pix0 = (tile.b0 * geo.Ho + tile.oy0) * geo.Wo
    return [geo.C, geo.H, geo.W, geo.kh, geo.kw, *geo.stride, *geo.padding, *geo.dilation,
            geo.Ho, geo.Wo, geo.offset_groups, geo.groups, pix0, tile.out_rows * geo.Wo]


def _runs(geo, tile, strides):
    """(first output pixel, pixels) of the tile's runs of pixels that are
    equally spaced in an array of (image, channel, pixel) ``strides``: the
    whole tile when consecutive images continue the spacing (NHWC), else one
    run per image."""
    pixels = geo.Ho * geo.Wo
    first = (tile.b0 * geo.Ho + tile.oy0) * geo.Wo
    per_image = tile.nrows * geo.Wo
    if tile.nb == 1 or strides[0] == pixels * strides[2]:
        return [(first, tile.nb * per_image)]
    return [(first + bi * pixels, per_image) for bi in range(tile.nb)]


def _pixel_matrix(xp, geo, array, strides, q, n, g, transpose=False):
    """Output pixels [q, q + n) x channels of weight group g of a (B, Cout,
    Ho, Wo) array with element ``strides`` ((n, Cout/groups), or transposed),
    as a 1-batch GEMM operand viewing ``array`` (C-contiguous) in place."""
    cg = geo.Cout // geo.groups
    pixels = geo.Ho * geo.Wo
    b, p = divmod(q, pixels)
    start = b * strides[0] + p * strides[2] + g * cg * strides[1]
    if transpose:
        return _gemm.strided(xp, array, start, (1, cg, n), (0, strides[1], strides[2]))
    return _gemm.strided(xp, array, start, (1, n, cg), (0, strides[2], strides[1]))


def _columns_matrix(xp, geo, columns, row, n, g):
    kg = geo.C // geo.groups * geo.kh * geo.kw
    return _gemm.strided(xp, columns, row * geo.groups * kg + g * kg, (1, n, kg),
                         (0, geo.groups * kg, 1))


def _weight_matrix(xp, geo, weight_k, g, transpose=False):
    """Weight group g of the (Cout, kh*kw*C/groups) permuted weight: (cg, Kg),
    or (Kg, cg) transposed."""
    cg, kg = geo.Cout // geo.groups, geo.C // geo.groups * geo.kh * geo.kw
    if transpose:
        return _gemm.strided(xp, weight_k, g * cg * kg, (1, kg, cg), (0, 1, kg))
    return _gemm.strided(xp, weight_k, g * cg * kg, (1, cg, kg), (0, kg, 1))


def _im2col(backend, geo, bits, tile, input_nhwc, offset, offset_strides, mask, mask_strides,
            vector=None):
    """The tile's columns (pixels, kh*kw*C) in the storage type, in the workspace."""
    xp = backend.xp
    npix = tile.out_rows * geo.Wo
    columns = _config.workspace(xp, (npix, geo.kh * geo.kw * geo.C), geo.dtype.dtype)
    vec = vector_width(xp, geo, input_nhwc, columns) if vector is None else vector
    backend.launch(_FILE, "deform_im2col_nhwc", geo.dtype, bits,
                   npix * geo.kh * geo.kw * geo.C // vec,
                   [input_nhwc, offset, mask, columns, vec, *offset_strides,
                    *(mask_strides or (0, 0, 0)), *_geometry_args(geo, tile)])
    return columns


def _operands(xp, geo, input, offset, weight, mask):
    """The NHWC input (a view when channels-last, else one copy), the offset
    and mask with their strides, and the permuted weight (Cout, kh*kw*C/groups)."""
    input_nhwc = xp.ascontiguousarray(input.transpose(0, 2, 3, 1))
    offset, offset_strides = pixel_strides(xp, offset)
    mask, mask_strides = (None, None) if mask is None else pixel_strides(xp, mask)
    weight_k = xp.ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(geo.Cout, -1)
    return input_nhwc, offset, offset_strides, mask, mask_strides, weight_k


def forward(backend, geo, input, offset, weight, bias=None, mask=None, vector=None):
    """out (B, Cout, Ho, Wo), channels-last, of deform_conv2d on ``backend``
    (validated arguments); ``vector`` overrides :func:`vector_width`."""
    xp = backend.xp
    if geo.B * geo.Cout * geo.Ho * geo.Wo == 0 and not geo.channels_last:
        return _arrays.empty_result(xp, (geo.B, geo.Cout, geo.Ho, geo.Wo), geo.dtype.dtype)
    out_nhwc = _arrays.empty_result(xp, (geo.B, geo.Ho, geo.Wo, geo.Cout), geo.dtype.dtype)
    out = out_nhwc.transpose(0, 3, 1, 2)
    if out.size == 0:
        return out
    input_nhwc, offset, offset_strides, mask, mask_strides, weight_k = _operands(
        xp, geo, input, offset, weight, mask)
    if bias is not None:
        out_nhwc[...] = bias
    plan = _deform_conv.tiles(geo, geo.dtype.dtype.itemsize)
    bits = _index_bits(geo, plan, 1)
    out_strides = (geo.Ho * geo.Wo * geo.Cout, 1, geo.Cout)
    for tile in plan:
        columns = _im2col(backend, geo, bits, tile, input_nhwc, offset, offset_strides, mask,
                          mask_strides, vector)
        n = tile.out_rows * geo.Wo
        first = (tile.b0 * geo.Ho + tile.oy0) * geo.Wo
        for g in range(geo.groups):
            _gemm.gemm(xp, _columns_matrix(xp, geo, columns, 0, n, g),
                       _weight_matrix(xp, geo, weight_k, g, transpose=True),
                       _pixel_matrix(xp, geo, out_nhwc, out_strides, first, n, g),
                       accumulate=bias is not None)
    return out


def backward(backend, geo, grad_output, input, offset, weight, mask, wrt, lanes=None,
             vector=None):
    """The kernel path of deform_conv2d_backward on channels-last memory;
    ``wrt`` a set of GRADIENTS; ``lanes`` (a power of two, 1..32) overrides
    ``_kernels.lanes_for`` (capped at CUDA_LANES), ``vector``
    :func:`vector_width`. The input gradient is
    channels-last, the offset and mask gradients have their arrays' formats,
    the weight gradient is (Cout, C/groups, kh, kw)."""
    xp = backend.xp
    dtype, acc = geo.dtype.dtype, geo.dtype.acc
    lanes = _kernels.checked_lanes(backend, geo.C // geo.offset_groups, lanes, CUDA_LANES)
    taps = geo.kh * geo.kw
    cg, kg = geo.Cout // geo.groups, geo.C // geo.groups * taps
    grad_input_nhwc = grad_input = None
    if "input" in wrt and geo.B == 0 and not geo.channels_last:  # no work: an NCHW result
        grad_input = _arrays.zeros_result(xp, input.shape, dtype)
    elif "input" in wrt:
        grad_input_nhwc = _arrays.zeros_result(xp, (geo.B, geo.H, geo.W, geo.C), acc,
                                               result=acc == dtype)
    grad_offset = grad_mask = None
    grad_offset_view = grad_mask_view = None
    grad_offset_strides = grad_mask_strides = (0, 0, 0)
    if "offset" in wrt:
        grad_offset, grad_offset_view, grad_offset_strides = _like(xp, offset, dtype)
    if "mask" in wrt:
        grad_mask, grad_mask_view, grad_mask_strides = _like(xp, mask, dtype)
    grad_weight_k = xp.zeros((geo.Cout, taps * geo.C // geo.groups), acc) \
        if "weight" in wrt else None
    grad_bias = None
    if "bias" in wrt:
        grad_bias = _arrays.result(xp, grad_output.astype(acc).sum(axis=(0, 2, 3)), dtype)
    if geo.B * geo.Ho * geo.Wo and geo.Cout and wrt - {"bias"}:
        input_nhwc, offset, offset_strides, mask, mask_strides, weight_k = _operands(
            xp, geo, input, offset, weight, mask)
        grad_out, grad_strides = pixel_strides(xp, grad_output)
        plan = _deform_conv.tiles(geo)
        bits = _index_bits(geo, plan, lanes)
        for tile in plan:
            n_tile = tile.out_rows * geo.Wo
            first = (tile.b0 * geo.Ho + tile.oy0) * geo.Wo
            runs = _runs(geo, tile, grad_strides)
            if wrt & {"input", "offset", "mask"}:
                grad_columns = _config.workspace(xp, (n_tile, taps * geo.C), acc)
                for q, n in runs:
                    for g in range(geo.groups):
                        _gemm.gemm(xp, _pixel_matrix(xp, geo, grad_out, grad_strides, q, n, g),
                                   _weight_matrix(xp, geo, weight_k, g),
                                   _columns_matrix(xp, geo, grad_columns, q - first, n, g))
                items = n_tile * geo.offset_groups * taps
                _kernels.launch_lanes(
                    backend, _FILE, "deform_col2im_nhwc", geo.dtype, bits,
                    _kernels.warp_threads(items, lanes),
                    [grad_columns, input_nhwc, offset, mask, grad_input_nhwc, grad_offset_view,
                     grad_mask_view, lanes, *offset_strides, *(mask_strides or (0, 0, 0)),
                     *grad_offset_strides, *grad_mask_strides, *_geometry_args(geo, tile)],
                    lanes)
            if grad_weight_k is not None:
                columns = _im2col(backend, geo, bits, tile, input_nhwc, offset, offset_strides,
                                  mask, mask_strides, vector)
                for q, n in runs:
                    for g in range(geo.groups):
                        _gemm.gemm(xp, _pixel_matrix(xp, geo, grad_out, grad_strides, q, n, g,
                                                     transpose=True),
                                   _columns_matrix(xp, geo, columns, q - first, n, g),
                                   grad_weight_k[g * cg:(g + 1) * cg].reshape(1, cg, kg),
                                   accumulate=True)
    elif grad_offset is not None or grad_mask is not None:
        for g in (grad_offset, grad_mask):
            if g is not None:
                g.fill(0)
    if grad_input_nhwc is not None:
        grad_input = _arrays.result(xp, grad_input_nhwc, dtype).transpose(0, 3, 1, 2)
    grad_weight = None
    if grad_weight_k is not None:
        grad_weight = grad_weight_k.reshape(geo.Cout, geo.kh, geo.kw, -1).transpose(0, 3, 1, 2)
        grad_weight = _arrays.result(xp, grad_weight, dtype)
    return _deform_conv.DeformConv2dGrads(grad_input, grad_offset, grad_weight, grad_bias,
                                          grad_mask)



def _forward(backend, geo, a):
    return forward(backend, geo, a.input, a.offset, a.weight, a.bias, a.mask)


def _backward(backend, geo, a, wrt):
    return backward(backend, geo, a.grad_output, a.input, a.offset, a.weight, a.mask, wrt)


_dispatch.register(_dispatch.Implementation(
    "im2col_nhwc", _OP, frozenset({_dispatch.CUDA, _dispatch.HOST}), deterministic=False,
    forward=_forward, backward=_backward, launch=_dispatch.Launch(_FILE), priority=35,
    automatic=lambda where, geo: geo.channels_last,
    summary="channels-last (NHWC) memory: im2col into (pixels, kh*kw*C) columns + GEMM "
            "writing the NHWC output in place; backward: one pass per (pixel, tap) for the "
            "input (float atomics), offset and mask gradients; automatic for channels-last "
            "inputs on CUDA"))
