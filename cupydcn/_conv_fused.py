"""Deformable convolution with a fused backward: ``im2col_fused`` and
``im2col_fused_deterministic``.

Forward: today's deformable im2col + batched GEMM (``_deform_conv.forward``).

Backward, per tile of images / output rows (``_deform_conv.tiles``):

1. ``grad_columns = grad_out^T @ W`` per image and weight group, shaped
   (nb, groups, P, Kg) with P = rows*Wo pixels and Kg = (C/groups)*kh*kw: one
   strided batched GEMM per weight group through ``_gemm`` (cuBLAS
   ``gemmStridedBatchedEx``: float16/bfloat16 operands on tensor cores with
   float32 accumulation, IEEE float32 unless ``set_tf32``) reading
   ``grad_output`` and the weight where they lie, writing float32 (the
   accumulation type) into one workspace allocated once per call.
2. ONE kernel pass, ``deform_col2im_fused`` (kernels/deform_conv_fused.cu):
   per (pixel, tap, offset group) the sampling position, bilinear weights and
   mask are computed once; ``lanes`` threads of a warp take the group's
   channels, scatter the input gradient with float atomics (float32 for the
   half types, float64 for float64) and reduce the offset and mask gradients
   over the channels with ``__shfl_xor_sync``, written once without atomics.
   The im2col path runs two kernels (``deform_col2im`` and
   ``deform_col2im_coord``), each reading the columns gradient and recomputing
   every position.
3. The weight gradient ``grad_out @ columns^T`` per image (again reading
   ``grad_output`` in place, through ``_gemm``), added in place. The columns
   (mask * bilinear sample in the storage type, deform_im2col's values bit
   for bit) are written by the same fused pass, which loads the four corners
   anyway, in the (nb, groups, P, Kg) layout: no second im2col pass. When the
   weight gradient is the only one asked for, the pass writes only the
   columns (so the weight gradient is the same GEMM on the same numbers
   whatever ``wrt`` holds: the jax bridge asks for it in a call of its own).

``im2col_fused_deterministic`` runs the same pass without the scatter, then
gathers the input gradient: the tile's samples sorted by pixel cell
(``deform_sample_keys``, as ``im2col_deterministic``), and
``deform_col2im_fused_gather``: one item per (image, offset group, input
pixel), ``lanes`` threads per item over the channels, each sample's position,
corner weight and mask computed once for a chunk of channels, every sum in a
fixed order and every input element owned by one thread: bit-identical from
run to run, with no float atomics.

Lanes per item (a heuristic until GPU measurements replace it): on CUDA the
largest power of two <= min(8, channels per offset group), so a warp covers
32/lanes neighbouring pixels (their atomics land on nearby addresses of the
same planes, their input reads share sectors) and the channel reduction costs
log2(lanes) shuffle steps; on the host 1 (there a warp's lanes are fibers and
a shuffle is a switch; with one lane the kernel has no shuffle and runs as a
plain loop; the gather has no shuffles at all).

Automatic choice: ``im2col_fused`` priority 25, above ``im2col`` (20): the
prediction (GPU) is one fewer full read of the columns gradient (C*kh*kw*4
bytes per output pixel), no transposed copy of ``grad_output`` and one launch
fewer per tile, with the same number of atomics. Its backward uses float
atomics, so it is not deterministic: ``deterministic=True`` calls, and the
CPU's automatic choice (always deterministic, see ``_dispatch.choose``), take
``im2col_fused_deterministic`` (15, above ``im2col_deterministic``, 10):
measured the fastest deterministic backward on this project's CPUs
(benchmarks/CPU.md).
"""

from __future__ import annotations

from cupydcn import _arrays, _config, _deform_conv, _dispatch, _dtypes, _gemm, _kernels

_FILE = "deform_conv_fused"
_KERNEL = "deform_col2im_fused"
# Lanes per item on CUDA (``_kernels.lanes_for``'s cap): see the module docstring.
CUDA_LANES = 8


def _launch_fused(backend, geo, bits, tile, lanes, grad_columns, input, offset, mask, grad_input,
                  grad_offset, grad_mask, columns):
    items = tile.nb * geo.offset_groups * tile.nrows * geo.Wo
    _kernels.launch_lanes(backend, _FILE, _KERNEL, geo.dtype, bits,
                          _kernels.warp_threads(items, lanes),
                          [grad_columns, input, offset, mask, grad_input, grad_offset, grad_mask,
                           columns, geo.groups, lanes, *_deform_conv._geometry_args(geo, tile)],
                          lanes)


def _gather_input(backend, geo, bits, tile, lanes, grad_columns, offset, mask, grad_input):
    """The deterministic input gradient of one tile: its samples sorted by
    pixel cell, then deform_col2im_fused_gather (no atomics)."""
    order, starts = _deform_conv.sample_order(backend, geo, bits, tile, offset)
    _kernels.launch_lanes(backend, _FILE, "deform_col2im_fused_gather", geo.dtype, bits,
                          tile.nb * geo.offset_groups * geo.H * geo.W * lanes,
                          [grad_columns, offset, mask, order, starts, grad_input, geo.groups,
                           lanes, *_deform_conv._geometry_args(geo, tile)], lanes,
                          shuffles=False)


def backward(backend, geo, grad_output, input, offset, weight, mask, wrt, lanes=None,
             deterministic=False):
    """The fused kernel path of deform_conv2d_backward; ``wrt`` a set of
    GRADIENTS; ``lanes`` (a power of two, 1..32) overrides ``_kernels.lanes_for``;
    ``deterministic`` gathers the input gradient instead of scattering it."""
    xp = backend.xp
    dtype, acc = geo.dtype.dtype, geo.dtype.acc
    groups, taps = geo.groups, geo.kh * geo.kw
    cout_g, kg = geo.Cout // groups, geo.C // groups * taps
    lanes = _kernels.checked_lanes(backend, geo.C // geo.offset_groups, lanes, CUDA_LANES)
    grad_input = (_arrays.zeros_result(xp, input.shape, acc, result=acc == dtype)
                  if "input" in wrt else None)
    grad_offset = _arrays.empty_result(xp, offset.shape, dtype) if "offset" in wrt else None
    grad_mask = _arrays.empty_result(xp, mask.shape, dtype) if "mask" in wrt else None
    grad_weight = xp.zeros((groups, cout_g, kg), acc) if "weight" in wrt else None
    grad_output, input, offset, weight, mask = _kernels.contiguous(
        xp, grad_output, input, offset, weight, mask)
    grad_bias = (_arrays.result(xp, _deform_conv._bias_gradient(xp, geo, grad_output), dtype)
                 if "bias" in wrt else None)
    if geo.B * geo.Ho * geo.Wo and geo.Cout and wrt - {"bias"}:
        plan = _deform_conv.tiles(geo)
        if deterministic and grad_input is not None:
            plan = _deform_conv.key_safe(geo, plan)
        most = max(t.out_rows for t in plan) * geo.Wo
        bits = max(_deform_conv._index_bits(geo, plan),
                   _dtypes.index_bits(geo.offset_groups * most * lanes + _kernels.WARP,
                                      geo.B * geo.offset_groups * geo.H * geo.W * lanes))
        columns_gradient = wrt & {"input", "offset", "mask"}
        size = geo.C * taps * most
        workspace = _config.empty(xp, (size,), acc) if columns_gradient else None
        # The fused pass also writes the weight gradient's columns (it loads
        # the four corners anyway), in the storage type, alone when only the
        # weight is asked for: the weight gradient is the same GEMM, bit for
        # bit, whatever wrt is.
        fused_columns = _config.empty(xp, (size,), dtype) if grad_weight is not None else None
        plane = geo.Ho * geo.Wo
        for tile in plan:
            pixels = tile.nrows * geo.Wo
            first = tile.b0 * geo.Cout * plane + tile.oy0 * geo.Wo  # grad_output's tile
            grad_columns = columns = None
            if columns_gradient:
                # grad_columns[bi, g] = grad_out[bi, g]^T @ W[g], (pixels, kg) per
                # image and group: grad_output read where it lies.
                grad_columns = workspace[:tile.nb * groups * pixels * kg]
                for g in range(groups):
                    _gemm.gemm(xp,
                               _gemm.strided(xp, grad_output, first + g * cout_g * plane,
                                             (tile.nb, pixels, cout_g),
                                             (geo.Cout * plane, 1, plane)),
                               _gemm.strided(xp, weight, g * cout_g * kg, (tile.nb, cout_g, kg),
                                             (0, kg, 1)),
                               _gemm.strided(xp, grad_columns, g * pixels * kg,
                                             (tile.nb, pixels, kg), (groups * pixels * kg, kg, 1)))
            if grad_weight is not None:
                columns = fused_columns[:tile.nb * groups * pixels * kg]
            _launch_fused(backend, geo, bits, tile, lanes, grad_columns, input, offset, mask,
                          None if deterministic else grad_input, grad_offset, grad_mask, columns)
            if deterministic and grad_input is not None:
                _gather_input(backend, geo, bits, tile, lanes, grad_columns, offset, mask,
                              grad_input)
            if grad_weight is not None:
                for bi in range(tile.nb):  # grad_W[g] += grad_out[bi, g] @ columns[bi, g]
                    _gemm.gemm(xp,
                               _gemm.strided(xp, grad_output, first + bi * geo.Cout * plane,
                                             (groups, cout_g, pixels), (cout_g * plane, plane, 1)),
                               _gemm.strided(xp, columns, bi * groups * pixels * kg,
                                             (groups, pixels, kg), (pixels * kg, kg, 1)),
                               grad_weight, accumulate=True)
    elif grad_offset is not None or grad_mask is not None:
        for g in (grad_offset, grad_mask):
            if g is not None:
                g.fill(0)
    return _deform_conv.finish_backward(xp, dtype, weight, grad_input, grad_offset, grad_weight,
                                        grad_bias, grad_mask)


def _fused_backward(deterministic):
    def run(backend, geo, a, wrt):
        return backward(backend, geo, a.grad_output, a.input, a.offset, a.weight, a.mask, wrt,
                        deterministic=deterministic)
    return run


_dispatch.register(_dispatch.Implementation(
    "im2col_fused", _deform_conv._OP, frozenset({_dispatch.CUDA, _dispatch.HOST}),
    deterministic=False, forward=_deform_conv._kernels_forward, backward=_fused_backward(False),
    launch=_dispatch.Launch(_FILE), priority=25,
    summary="im2col + GEMM forward; backward: grad_out^T @ W in place, then one pass per "
            "(pixel, tap) for the input (float atomics), offset and mask gradients "
            "(channels reduced within a warp)"))
_dispatch.register(_dispatch.Implementation(
    "im2col_fused_deterministic", _deform_conv._OP, frozenset({_dispatch.CUDA, _dispatch.HOST}),
    deterministic=True, forward=_deform_conv._kernels_forward, backward=_fused_backward(True),
    launch=_dispatch.Launch(_FILE), priority=15,
    summary="im2col + GEMM forward; backward: the fused pass for the offset and mask "
            "gradients and the weight's columns, the input gradient gathered per input "
            "pixel from samples sorted by cell (no float atomics)"))
