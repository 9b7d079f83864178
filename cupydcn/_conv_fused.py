"""Deformable convolution with a fused backward: the ``im2col_fused`` implementation.

Forward: today's deformable im2col + batched GEMM (``_deform_conv.forward``).

Backward, per tile of images / output rows (``_deform_conv.tiles``):

1. ``grad_columns = grad_out^T @ W`` per image and weight group, shaped
   (nb, groups, P, Kg) with P = rows*Wo pixels and Kg = (C/groups)*kh*kw: the
   GEMM reads ``grad_output`` where it lies (a strided view, no transpose and,
   for float32/float64, no ``astype``) and writes into one workspace buffer
   allocated once per call.
2. ONE kernel pass, ``deform_col2im_fused`` (kernels/deform_conv_fused.cu):
   per (pixel, tap, offset group) the sampling position, bilinear weights and
   mask are computed once; ``lanes`` threads of a warp take the group's
   channels, scatter the input gradient with float atomics (float32 for the
   half types, float64 for float64) and reduce the offset and mask gradients
   over the channels with ``__shfl_xor_sync``, written once without atomics.
   Today's path runs two kernels (``deform_col2im`` and
   ``deform_col2im_coord``), each reading the columns gradient and recomputing
   every position.
3. The weight gradient ``grad_out @ columns^T`` per image (again reading
   ``grad_output`` in place), summed over the tile's images. The columns
   (mask * bilinear sample, deform_im2col's values bit for bit) are written
   by the same fused pass, which loads the four corners anyway, in the
   (nb, groups, P, Kg) layout: no second im2col pass. When the weight
   gradient is the only one asked for, the pass writes only the columns (so
   the weight gradient is the same GEMM on the same numbers whatever ``wrt``
   holds: the jax bridge asks for it in a call of its own).

Lanes per item (a heuristic until GPU measurements replace it): on CUDA the
largest power of two <= min(8, channels per offset group), so a warp covers
32/lanes neighbouring pixels (their atomics land on nearby addresses of the
same planes, their input reads share sectors) and the channel reduction costs
log2(lanes) shuffle steps; on the host 1 (there a warp's lanes are fibers and
a shuffle is a switch; with one lane the kernel has no shuffle and runs as a
plain loop).

Automatic choice: priority 25, above ``im2col`` (20). The prediction (GPU)
is one fewer full read of the columns gradient (C*kh*kw*4 bytes per output
pixel), no transposed copy of ``grad_output`` and one launch fewer per tile,
with the same number of atomics; on this project's CPUs it is measured faster
than ``im2col`` (benchmarks/cpu_bench.py ``--algorithm``). The backward uses
float atomics, so it is not deterministic: ``deterministic=True`` calls fall
back through the dispatcher to ``im2col_deterministic``.
"""

from __future__ import annotations

from cupydcn import _arrays, _config, _deform_conv, _dispatch, _dtypes, _kernels, _validation

_FILE = "deform_conv_fused"
_KERNEL = "deform_col2im_fused"
WARP = 32
CUDA_LANES = 8


def lanes_for(backend, geo):
    """Threads of a warp per (pixel, offset group) item (see module docstring)."""
    if getattr(backend, "name", None) == "host":
        return 1
    cap = min(CUDA_LANES, geo.C // geo.offset_groups)
    lanes = 1
    while lanes * 2 <= cap:
        lanes *= 2
    return lanes


def _launch_fused(backend, geo, bits, tile, lanes, grad_columns, input, offset, mask, grad_input,
                  grad_offset, grad_mask, columns):
    items = tile.nb * geo.offset_groups * tile.nrows * geo.Wo
    threads = -(-items * lanes // WARP) * WARP
    block = _kernels.BLOCK  # a multiple of the warp: every warp runs whole
    grid = min(-(-threads // block), getattr(backend, "grid", None) or _kernels.MAX_GRID)
    options = {}
    if getattr(backend, "name", None) == "host" and lanes == 1:
        options["cooperative"] = False  # no shuffle runs: a plain loop, no fibers
    backend.launch(_FILE, _KERNEL, geo.dtype, bits, threads,
                   [grad_columns, input, offset, mask, grad_input, grad_offset, grad_mask, columns,
                    geo.groups, lanes, *_deform_conv._geometry_args(geo, tile)],
                   grid=(grid,), block=(block,), **options)


def backward(backend, geo, grad_output, input, offset, weight, mask, wrt, lanes=None):
    """The fused kernel path of deform_conv2d_backward; ``wrt`` a set of
    GRADIENTS; ``lanes`` (a power of two, 1..32) overrides :func:`lanes_for`."""
    xp = backend.xp
    dtype, acc = geo.dtype.dtype, geo.dtype.acc
    groups, taps = geo.groups, geo.kh * geo.kw
    cout_g, kg = geo.Cout // groups, geo.C // groups * taps
    lanes = lanes_for(backend, geo) if lanes is None else lanes
    if lanes not in (1, 2, 4, 8, 16, WARP):
        raise _validation.ArgumentError(
            f"lanes must be a power of two from 1 to 32, got {lanes!r}")
    grad_input = (_arrays.zeros_result(xp, input.shape, acc, result=acc == dtype)
                  if "input" in wrt else None)
    grad_offset = _arrays.empty_result(xp, offset.shape, dtype) if "offset" in wrt else None
    grad_mask = _arrays.empty_result(xp, mask.shape, dtype) if "mask" in wrt else None
    grad_weight = xp.zeros((groups, cout_g, kg), acc) if "weight" in wrt else None
    grad_bias = None
    work = geo.B * geo.Ho * geo.Wo and geo.Cout and wrt - {"bias"}
    if work or "bias" in wrt:
        grad_output = _kernels.contiguous(xp, grad_output)[0]
        # float32/float64: read in place; the half types are converted once
        # (the GEMMs run in float32).
        grad_output = grad_output if grad_output.dtype == acc else grad_output.astype(acc)
    if "bias" in wrt:
        grad_bias = _arrays.result(xp, grad_output.sum(axis=(0, 2, 3)), dtype)
    if work:
        input, offset, mask = _kernels.contiguous(xp, input, offset, mask)
        weight_g = weight.astype(acc, copy=False).reshape(groups, cout_g, kg)
        plan = _deform_conv.tiles(geo)
        most = max(t.out_rows for t in plan) * geo.Wo
        bits = max(_deform_conv._index_bits(geo, plan),
                   _dtypes.index_bits(geo.offset_groups * most * lanes + WARP))
        columns_gradient = wrt & {"input", "offset", "mask"}
        size = geo.C * taps * most
        workspace = _config.empty(xp, (size,), acc) if columns_gradient else None
        # The fused pass also writes the weight gradient's columns (it loads
        # the four corners anyway), alone when only the weight is asked for:
        # the weight gradient is the same GEMM, bit for bit, whatever wrt is.
        fused_columns = _config.empty(xp, (size,), acc) if grad_weight is not None else None
        for tile in plan:
            pixels = tile.nrows * geo.Wo
            grad_out = grad_output[tile.b0:tile.b0 + tile.nb, :, tile.oy0:tile.oy0 + tile.nrows]
            grad_out = grad_out.reshape(tile.nb, groups, cout_g, pixels)  # a view
            shape = (tile.nb, groups, pixels, kg)
            grad_columns = columns = None
            if columns_gradient:
                grad_columns = workspace[:tile.nb * groups * pixels * kg].reshape(shape)
                xp.matmul(grad_out.transpose(0, 1, 3, 2), weight_g, out=grad_columns)
            if grad_weight is not None:
                columns = fused_columns[:tile.nb * groups * pixels * kg].reshape(shape)
            _launch_fused(backend, geo, bits, tile, lanes, grad_columns, input, offset, mask,
                          grad_input, grad_offset, grad_mask, columns)
            if grad_weight is not None:
                grad_weight += xp.matmul(grad_out, columns).sum(axis=0)
    elif grad_offset is not None or grad_mask is not None:
        for g in (grad_offset, grad_mask):
            if g is not None:
                g.fill(0)
    return _deform_conv.finish_backward(xp, dtype, weight, grad_input, grad_offset, grad_weight,
                                        grad_bias, grad_mask)


def _fused_backward(backend, geo, a, wrt):
    return backward(backend, geo, a.grad_output, a.input, a.offset, a.weight, a.mask, wrt)


_dispatch.register(_dispatch.Implementation(
    "im2col_fused", _deform_conv._OP, frozenset({_dispatch.CUDA, _dispatch.HOST}),
    deterministic=False, forward=_deform_conv._kernels_forward, backward=_fused_backward,
    launch=_dispatch.Launch(_FILE), priority=25,
    summary="im2col + GEMM forward; backward: grad_out^T @ W in place, then one pass per "
            "(pixel, tap) for the input (float atomics), offset and mask gradients "
            "(channels reduced within a warp)"))
