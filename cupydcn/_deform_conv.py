"""Deformable convolution v1/v2: array in, array out, forward and backward.

The kernel path is deformable im2col (kernels/deform_conv.cu) into a cached
workspace, columns in the storage type, + per weight group one strided batched
GEMM (``_gemm``: cuBLAS ``gemmStridedBatchedEx`` on the GPU, float32
accumulation for float16/bfloat16 on tensor cores, TF32 only after
``set_tf32``) that writes straight into the output, in tiles of images or
output rows bounded by the workspace limit; it runs on CuPy and on the host
build of the same kernels (``_kernels.HostBackend``). Its implementations, and
the NumPy reference's, are registered with the dispatcher (``_dispatch``),
which picks one per call.

Automatic choice (a heuristic until GPU measurements replace it, see
benchmarks/NOTES.md): ``im2col`` (priority 20) for every shape and dtype: with
half columns its GEMM runs on tensor cores (predicted 2-3x faster than
torchvision's float16 forward+backward on the suite's shapes), its cost is one
columns write and read per pass; ``im2col_deterministic`` (10) below the
fused deterministic backward (``_conv_fused``, 15), which deterministic calls
and the CPU take; ``reference`` (0) on the CPU without a compiler. The faster
implementations register from their own modules (end of this file).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy

from cupydcn import (_arrays, _config, _dispatch, _dtypes, _gemm, _kernels, _validation,
                     reference)

_OP = "deform_conv2d"
_FILE = "deform_conv"
GRADIENTS = ("input", "offset", "weight", "bias", "mask")


class DeformConv2dGrads(NamedTuple):
    """Gradients of deform_conv2d; None where not asked for or not applicable."""
    input: object
    offset: object
    weight: object
    bias: object
    mask: object


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None,
                  algorithm=None):
    """Deformable convolution (DCNv1), or modulated deformable convolution
    (DCNv2) when ``mask`` is given; ``torchvision.ops.deform_conv2d``'s meaning.

    ``out[b, o] = bias[o] + sum_{c, i, j} weight[o, c, i, j] * mask[b, g, k]
    * bilinear(input[b, c], p + (i, j) * dilation + offset[b, g, k])`` with tap
    ``k = i*kw + j`` and offset group ``g`` of channel ``c`` (docs/semantics.md §2.5;
    Dai et al. 2017, Zhu et al. 2019).

    Args:
        input: (B, C, H, W) array.
        offset: (B, 2*offset_groups*kh*kw, Ho, Wo) array, (dy, dx) interleaved per tap.
        weight: (Cout, C/groups, kh, kw) array.
        bias: (Cout,) array or None.
        stride, padding, dilation: int or (h, w) pair.
        mask: (B, offset_groups*kh*kw, Ho, Wo) array in [0, 1] or None (DCNv1).
        algorithm: None (the automatic choice) or the name of an
            implementation from ``cupydcn.algorithms("deform_conv2d")``.

    Returns:
        (B, Cout, Ho, Wo) array of the input's library, dtype and device.

    CuPy arrays (and CUDA DLPack arrays) run the CUDA kernels on their device
    and the current CuPy stream; NumPy (and CPU DLPack) arrays run on the CPU
    backend (:func:`cupydcn.set_cpu_backend`: the kernels compiled for the
    CPU, or the NumPy reference). Groups and offset groups are inferred from
    the shapes.

    Raises:
        ArgumentError: a bad shape or value (a ``ValueError`` and a
            ``RuntimeError``), naming the argument, the value and the
            expectation, e.g. ``offset.shape[1] must be a positive multiple of
            2*kh*kw = 18, got 16``.
        ArgumentTypeError: a missing array (None), a non-array or an
            unsupported dtype (a ``TypeError`` and a ``RuntimeError``).

    Example:
        >>> out = cupydcn.deform_conv2d(x, offset, w, padding=1, mask=m)
    """
    _validation.check_arrays(dict(input=input, offset=offset, weight=weight),
                             dict(bias=bias, mask=mask))
    call = _arrays.Call(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    geo = _validation.check_deform_conv2d(call.input, call.offset, call.weight, call.bias,
                                          stride, padding, dilation, call.mask)
    with call.device():
        implementation, backend = _dispatch.choose(_OP, call.on_gpu, geo, algorithm,
                                                   empty=_is_empty(geo))
        out = memory_format(implementation.forward(backend, geo, call), geo.channels_last)
    return call.wrap(out)


def deform_conv2d_backward(grad_output, input, offset, weight, bias=None, stride=1, padding=0,
                           dilation=1, mask=None, wrt=GRADIENTS, deterministic=False,
                           algorithm=None):
    """Gradients of :func:`deform_conv2d` (torchvision's, docs/semantics.md §2.6).

    Args:
        grad_output: (B, Cout, Ho, Wo) array, the gradient of the output.
        input, offset, weight, bias, stride, padding, dilation, mask: as for
            :func:`deform_conv2d`.
        wrt: the names of the gradients to compute, a tuple, list or set of
            names among ``("input", "offset", "weight", "bias", "mask")`` (a
            bare string is an error); only those are computed. The default,
            all five, means every gradient that applies (bias and mask only
            when given); naming "bias" or "mask" explicitly without the array
            is an error.
        deterministic: compute the input gradient without floating-point
            atomics (samples sorted by the pixel cell they touch, then one
            gathering thread per input element), so every gradient is
            bit-identical from run to run; slower than the default scatter.
            A filter on the implementations the dispatcher may choose.
        algorithm: None (the automatic choice) or the name of an
            implementation from ``cupydcn.algorithms("deform_conv2d")``.

    Returns:
        DeformConv2dGrads(input, offset, weight, bias, mask), each an array
        shaped like its argument, or None.

    Raises:
        ArgumentError, ArgumentTypeError: as :func:`deform_conv2d`, and for a
            bad ``wrt``.
    """
    _validation.check_arrays(dict(grad_output=grad_output, input=input, offset=offset,
                                  weight=weight), dict(bias=bias, mask=mask))
    wrt = _validation.check_wrt(wrt, GRADIENTS, bias=bias, mask=mask)
    call = _arrays.Call(input=input, grad_output=grad_output, offset=offset, weight=weight,
                        bias=bias, mask=mask)
    geo = _validation.check_deform_conv2d(call.input, call.offset, call.weight, call.bias,
                                          stride, padding, dilation, call.mask,
                                          grad_output=call.grad_output)
    with call.device():
        implementation, backend = _dispatch.choose(_OP, call.on_gpu, geo, algorithm,
                                                   deterministic, empty=_is_empty(geo))
        grads = implementation.backward(backend, geo, call, wrt)
        grads = DeformConv2dGrads(*(
            None if g is None else memory_format(g, _validation.is_channels_last(getattr(call, n)))
            for n, g in zip(GRADIENTS, grads)))
    return call.wrap(grads)


def memory_format(array, channels_last):
    """``array`` (a result) in the memory format asked for: channels-last
    (``_validation.is_channels_last``) or C-contiguous, converted into a new
    result buffer only when it is not already. deform_conv2d's result has its
    input's memory format and each gradient its own array's, whichever
    implementation ran (torch's rule for ``channels_last`` tensors)."""
    if array.ndim != 4 or array.size == 0:
        return array
    if channels_last:
        if _validation.is_channels_last(array):
            return array
        xp = _arrays.array_module(array)
        B, C, H, W = array.shape
        out = _arrays.empty_result(xp, (B, H, W, C), array.dtype)
        out[...] = array.transpose(0, 2, 3, 1)
        return out.transpose(0, 3, 1, 2)
    if array.flags.c_contiguous:
        return array
    out = _arrays.empty_result(_arrays.array_module(array), array.shape, array.dtype)
    out[...] = array
    return out


def _is_empty(geo):
    return geo.B * geo.Cout * geo.Ho * geo.Wo == 0


class _Tile(NamedTuple):
    b0: int
    nb: int
    oy0: int
    nrows: int

    @property
    def out_rows(self):
        return self.nb * self.nrows


def tiles(geo, itemsize=None):
    """Chunks of (images, output rows) whose columns of ``itemsize`` bytes
    (default the accumulation type's: the backward's columns gradient) fit the
    workspace limit."""
    itemsize = geo.dtype.acc.itemsize if itemsize is None else itemsize
    row_bytes = geo.C * geo.kh * geo.kw * geo.Wo * itemsize
    limit = _config.get_workspace_limit()
    image_bytes = row_bytes * geo.Ho
    if image_bytes <= limit:
        step = max(1, min(geo.B, limit // max(image_bytes, 1)))
        return [_Tile(b0, min(step, geo.B - b0), 0, geo.Ho) for b0 in range(0, geo.B, step)]
    rows = max(1, limit // row_bytes)
    return [_Tile(b, 1, oy0, min(rows, geo.Ho - oy0))
            for b in range(geo.B) for oy0 in range(0, geo.Ho, rows)]


# The deterministic input gradient's sort keys, ((bi*offset_groups + g)*cells
# + cell)*n + s for the n samples of a tile (kernels/deform_conv.cu,
# deform_sample_keys), are int64: below nb*offset_groups*cells*n.
_KEY_LIMIT = 2**63 - 1


def _key_bound(geo, nb, nrows):
    cells = (geo.H + 1) * (geo.W + 1) + 1
    n = nb * geo.offset_groups * geo.kh * geo.kw * nrows * geo.Wo
    return nb * geo.offset_groups * cells * n


def key_safe(geo, plan):
    """``plan`` with every tile small enough for int64 sort keys: tiles of
    images split into fewer images, then one image's rows into fewer rows;
    ArgumentError when one output row of one image is still too large."""
    safe = []
    for tile in plan:
        nb = tile.nb
        while nb > 1 and _key_bound(geo, nb, tile.nrows) > _KEY_LIMIT:
            nb = (nb + 1) // 2
        if _key_bound(geo, nb, tile.nrows) <= _KEY_LIMIT:
            safe.extend(_Tile(b0, min(nb, tile.b0 + tile.nb - b0), tile.oy0, tile.nrows)
                        for b0 in range(tile.b0, tile.b0 + tile.nb, nb))
            continue
        rows = tile.nrows
        while rows > 1 and _key_bound(geo, 1, rows) > _KEY_LIMIT:
            rows = (rows + 1) // 2
        if _key_bound(geo, 1, rows) > _KEY_LIMIT:
            cells = (geo.H + 1) * (geo.W + 1) + 1
            raise _validation.ArgumentError(
                f"deterministic backward: the sort keys of one output row of one image "
                f"({geo.offset_groups * geo.kh * geo.kw * geo.Wo} samples on {cells} pixel cells "
                f"per offset group) overflow int64; use deterministic=False")
        safe.extend(_Tile(b, 1, oy0, min(rows, tile.oy0 + tile.nrows - oy0))
                    for b in range(tile.b0, tile.b0 + tile.nb)
                    for oy0 in range(tile.oy0, tile.oy0 + tile.nrows, rows))
    return safe


def _index_bits(geo, plan):
    taps = geo.kh * geo.kw
    columns = geo.C * taps * max(t.out_rows for t in plan) * geo.Wo
    return _dtypes.index_bits(
        geo.B * geo.C * geo.H * geo.W,
        geo.B * geo.offset_groups * 2 * taps * geo.Ho * geo.Wo,
        geo.B * geo.Cout * geo.Ho * geo.Wo,
        columns,
    )


def _geometry_args(geo, tile):
    return [geo.C, geo.H, geo.W, geo.kh, geo.kw, *geo.stride, *geo.padding, *geo.dilation,
            geo.Ho, geo.Wo, geo.offset_groups, tile.b0, tile.nb, tile.oy0, tile.nrows]


def _im2col(backend, geo, bits, tile, input, offset, mask):
    """The tile's columns (C*kh*kw, nb*nrows*Wo) in the storage type, in the
    cached workspace."""
    columns = _config.workspace(backend.xp, (geo.C * geo.kh * geo.kw, tile.out_rows * geo.Wo),
                                geo.dtype.dtype)
    per_thread = im2col_channels_per_thread(backend, geo)
    chunks = -(-(geo.C // geo.offset_groups) // per_thread)
    backend.launch(_FILE, "deform_im2col", geo.dtype, bits,
                   geo.offset_groups * chunks * tile.out_rows * geo.Wo,
                   [input, offset, mask, columns, per_thread, *_geometry_args(geo, tile)])
    return columns


def im2col_channels_per_thread(backend, geo):
    """Channels per deform_im2col thread: on the host a whole offset group (each
    tap's position and footprint computed once per pixel; the cores are few),
    on CUDA 1 (as many threads as column elements per tap; a heuristic until
    GPU measurements say whether sharing the position across a few channels
    pays, benchmarks/NOTES.md)."""
    return geo.C // geo.offset_groups if getattr(backend, "name", None) == "host" else 1


# The GEMM operands, strided views of the buffers where they lie (_gemm):
# weight group g (Cout/groups, K) with K = C/groups*kh*kw, broadcast over the
# tile's images; the columns of group g per image (K, nrows*Wo); and an
# (B, Cout, Ho, Wo) array's group g and tile rows per image (Cout/groups,
# nrows*Wo), with row stride Ho*Wo: the output, or grad_output, in place.

def _group_sizes(geo):
    return geo.Cout // geo.groups, geo.C // geo.groups * geo.kh * geo.kw


def _weight_matrices(xp, geo, weight, g, n, transpose=False):
    cg, k = _group_sizes(geo)
    if transpose:
        return _gemm.strided(xp, weight, g * cg * k, (n, k, cg), (0, 1, k))
    return _gemm.strided(xp, weight, g * cg * k, (n, cg, k), (0, k, 1))


def _column_matrices(xp, geo, columns, g, tile):
    _, k = _group_sizes(geo)
    pixels, ncols = tile.nrows * geo.Wo, tile.out_rows * geo.Wo
    return _gemm.strided(xp, columns, g * k * ncols, (tile.nb, k, pixels), (pixels, ncols, 1))


def _image_matrices(xp, geo, array, g, tile):
    cg, _ = _group_sizes(geo)
    plane = geo.Ho * geo.Wo
    return _gemm.strided(xp, array, (tile.b0 * geo.Cout + g * cg) * plane + tile.oy0 * geo.Wo,
                         (tile.nb, cg, tile.nrows * geo.Wo), (geo.Cout * plane, plane, 1))


def forward(backend, geo, input, offset, weight, bias=None, mask=None):
    """The kernel path of deform_conv2d on ``backend`` (validated arguments).

    Per tile: im2col into the cached workspace, then per weight group one
    batched GEMM over the tile's images that writes ``weight @ columns``
    straight into ``out`` (after the bias, which the GEMM adds with beta = 1:
    one rounding to the storage type)."""
    xp = backend.xp
    out = _arrays.empty_result(xp, (geo.B, geo.Cout, geo.Ho, geo.Wo), geo.dtype.dtype)
    if out.size == 0:
        return out
    input, offset, weight, mask = _kernels.contiguous(xp, input, offset, weight, mask)
    plan = tiles(geo, geo.dtype.dtype.itemsize)
    bits = _index_bits(geo, plan)
    if bias is not None:
        out[...] = bias.reshape(1, geo.Cout, 1, 1)
    for tile in plan:
        columns = _im2col(backend, geo, bits, tile, input, offset, mask)
        for g in range(geo.groups):
            _gemm.gemm(xp, _weight_matrices(xp, geo, weight, g, tile.nb),
                       _column_matrices(xp, geo, columns, g, tile),
                       _image_matrices(xp, geo, out, g, tile), accumulate=bias is not None)
    return out


def sample_order(backend, geo, bits, tile, offset):
    """The tile's samples sorted by pixel cell, for the gathering input
    gradients: (``order``, ``starts``) with ``order`` the sample indices in key
    order and ``starts[(bi*offset_groups + g)*cells + cell]`` the first entry
    of each cell (see deform_sample_keys)."""
    xp = backend.xp
    n = tile.nb * geo.offset_groups * geo.kh * geo.kw * tile.nrows * geo.Wo
    keys = _config.empty(xp, (n,), numpy.int64)
    backend.launch(_FILE, "deform_sample_keys", geo.dtype, bits, n,
                   [offset, keys, *_geometry_args(geo, tile)])
    keys = xp.sort(keys)  # unique keys: any correct sort gives this order
    cells = (geo.H + 1) * (geo.W + 1) + 1
    starts = xp.searchsorted(keys // n, xp.arange(tile.nb * geo.offset_groups * cells + 1,
                                                  dtype=numpy.int64))
    return keys % n, xp.ascontiguousarray(starts)


def _col2im_gather(backend, geo, bits, tile, grad_columns, offset, mask, grad_input):
    """The deterministic input gradient of one tile (see deform_sample_keys)."""
    order, starts = sample_order(backend, geo, bits, tile, offset)
    backend.launch(_FILE, "deform_col2im_gather", geo.dtype, bits,
                   tile.nb * geo.C * geo.H * geo.W,
                   [grad_columns, offset, mask, order, starts, grad_input,
                    *_geometry_args(geo, tile)])


def _bias_gradient(xp, geo, grad_output):
    """sum over (b, y, x) of grad_output in the accumulation type: one GEMM of
    the (B*Cout, Ho*Wo) rows with a ones vector (no converted copy), then the
    sum over the batch of the (B, Cout) partial sums."""
    acc = geo.dtype.acc
    pixels = geo.Ho * geo.Wo
    if geo.B * geo.Cout * pixels == 0:
        return xp.zeros(geo.Cout, acc)
    rows = geo.B * geo.Cout
    sums = xp.empty((1, rows, 1), acc)
    _gemm.gemm(xp, _gemm.strided(xp, grad_output, 0, (1, rows, pixels), (0, pixels, 1)),
               xp.ones((1, pixels, 1), grad_output.dtype), sums)
    return sums.reshape(geo.B, geo.Cout).sum(axis=0)


def backward(backend, geo, grad_output, input, offset, weight, mask, wrt, deterministic=False):
    """The kernel path of deform_conv2d_backward; ``wrt`` a set of GRADIENTS.

    Per tile: the columns' gradient ``weight^T @ grad_output`` (a GEMM reading
    grad_output and the weight where they lie, writing float32 for the half
    types) into the cached workspace, the offset/mask and input gradient
    kernels, then im2col into the same workspace and the weight gradient
    ``grad_output @ columns^T`` added in place per image."""
    xp = backend.xp
    dtype, acc = geo.dtype.dtype, geo.dtype.acc
    groups = geo.groups
    grad_input = (_arrays.zeros_result(xp, input.shape, acc, result=acc == dtype)
                  if "input" in wrt else None)
    grad_offset = _arrays.empty_result(xp, offset.shape, dtype) if "offset" in wrt else None
    grad_mask = _arrays.empty_result(xp, mask.shape, dtype) if "mask" in wrt else None
    grad_weight = (xp.zeros((groups, geo.Cout // groups, geo.C // groups * geo.kh * geo.kw), acc)
                   if "weight" in wrt else None)
    grad_output, input, offset, weight, mask = _kernels.contiguous(
        xp, grad_output, input, offset, weight, mask)
    grad_bias = (_arrays.result(xp, _bias_gradient(xp, geo, grad_output), dtype)
                 if "bias" in wrt else None)
    if geo.B * geo.Ho * geo.Wo and geo.Cout and wrt - {"bias"}:
        plan = tiles(geo)
        if deterministic and grad_input is not None:
            plan = key_safe(geo, plan)
        bits = _index_bits(geo, plan)
        cg, k = _group_sizes(geo)
        plane = geo.Ho * geo.Wo
        for tile in plan:
            n_columns = tile.out_rows * geo.Wo
            if wrt & {"input", "offset", "mask"}:
                grad_columns = _config.workspace(xp, (geo.C * geo.kh * geo.kw, n_columns), acc)
                for g in range(groups):
                    _gemm.gemm(xp, _weight_matrices(xp, geo, weight, g, tile.nb, transpose=True),
                               _image_matrices(xp, geo, grad_output, g, tile),
                               _column_matrices(xp, geo, grad_columns, g, tile))
                args = _geometry_args(geo, tile)
                if grad_offset is not None or grad_mask is not None:
                    backend.launch(_FILE, "deform_col2im_coord", geo.dtype, bits,
                                   geo.offset_groups * geo.kh * geo.kw * n_columns,
                                   [grad_columns, input, offset, mask, grad_offset, grad_mask,
                                    *args])
                if grad_input is not None and deterministic:
                    _col2im_gather(backend, geo, bits, tile, grad_columns, offset, mask,
                                   grad_input)
                elif grad_input is not None:
                    backend.launch(_FILE, "deform_col2im", geo.dtype, bits, grad_columns.size,
                                   [grad_columns, offset, mask, grad_input, *args])
            if grad_weight is not None:
                columns = _im2col(backend, geo, bits, tile, input, offset, mask)
                pixels = tile.nrows * geo.Wo
                for bi in range(tile.nb):
                    b = tile.b0 + bi
                    grad_out = _gemm.strided(xp, grad_output,
                                             b * geo.Cout * plane + tile.oy0 * geo.Wo,
                                             (groups, cg, pixels), (cg * plane, plane, 1))
                    columns_t = _gemm.strided(xp, columns, bi * pixels, (groups, pixels, k),
                                              (k * n_columns, 1, n_columns))
                    _gemm.gemm(xp, grad_out, columns_t, grad_weight, accumulate=True)
    elif grad_offset is not None or grad_mask is not None:
        for g in (grad_offset, grad_mask):
            if g is not None:
                g.fill(0)
    return finish_backward(xp, dtype, weight, grad_input, grad_offset, grad_weight, grad_bias,
                           grad_mask)


def finish_backward(xp, dtype, weight, grad_input, grad_offset, grad_weight, grad_bias,
                    grad_mask):
    """The gradients of a kernel backward as results of ``dtype`` (the input
    and weight gradients accumulate in the accumulation type)."""
    if grad_input is not None:
        grad_input = _arrays.result(xp, grad_input, dtype)
    if grad_weight is not None:
        grad_weight = _arrays.result(xp, grad_weight.reshape(weight.shape), dtype)
    return DeformConv2dGrads(grad_input, grad_offset, grad_weight, grad_bias, grad_mask)


# --------------------------------------------------------------------------
# The implementations (see _dispatch): ``a`` is the call's converted arrays
# --------------------------------------------------------------------------

def _kernels_forward(backend, geo, a):
    return forward(backend, geo, a.input, a.offset, a.weight, a.bias, a.mask)


def _kernels_backward(deterministic):
    def run(backend, geo, a, wrt):
        return backward(backend, geo, a.grad_output, a.input, a.offset, a.weight, a.mask, wrt,
                        deterministic)
    return run


def _reference_forward(backend, geo, a):
    out = reference.deform_conv2d(a.input, a.offset, a.weight, a.bias, geo.stride, geo.padding,
                                  geo.dilation, a.mask)
    return _arrays.result(numpy, out, geo.dtype.dtype)


def _reference_backward(backend, geo, a, wrt):
    full = reference.deform_conv2d_backward(a.grad_output, a.input, a.offset, a.weight, a.bias,
                                            geo.stride, geo.padding, geo.dilation, a.mask)
    return DeformConv2dGrads(*(
        _arrays.result(numpy, g, geo.dtype.dtype) if name in wrt and g is not None else None
        for name, g in zip(GRADIENTS, full)))


_KERNELS = frozenset({_dispatch.CUDA, _dispatch.HOST})
_dispatch.register(_dispatch.Implementation(
    "im2col", _OP, _KERNELS, deterministic=False, forward=_kernels_forward,
    backward=_kernels_backward(False), launch=_dispatch.Launch(_FILE), priority=20,
    summary="deformable im2col + batched GEMM; input gradient scattered by col2im "
            "with float atomics"))
_dispatch.register(_dispatch.Implementation(
    "im2col_deterministic", _OP, _KERNELS, deterministic=True, forward=_kernels_forward,
    backward=_kernels_backward(True), launch=_dispatch.Launch(_FILE), priority=10,
    summary="im2col + GEMM; input gradient gathered per input element from samples "
            "sorted by pixel cell (no float atomics)"))
_dispatch.register(_dispatch.Implementation(
    "reference", _OP, frozenset({_dispatch.NUMPY}), deterministic=True,
    forward=_reference_forward, backward=_reference_backward, priority=0,
    summary="the NumPy float64 reference (cupydcn.reference), rounded to the dtype"))

# Further implementations register themselves (one module each).
from cupydcn import _conv_implicit_gemm  # noqa: E402,F401  (registers "implicit_gemm")
from cupydcn import _conv_fused  # noqa: E402,F401  (registers "im2col_fused")
from cupydcn import _conv_nhwc  # noqa: E402,F401  (registers "im2col_nhwc")
