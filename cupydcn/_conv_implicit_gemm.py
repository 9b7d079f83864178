"""The implicit-GEMM forward and backward of deform_conv2d (kernels/deform_conv_igemm.cu).

No columns buffer, in either direction. Every kernel is one 64 x 64 output tile
per block of 128 threads (the weight gradient's: 128 x 64, 256 threads),
multiplied in steps of 16 along its reduction:
float16/bfloat16 on tensor cores (mma.sync m16n8k16, f32 accumulation),
float32 and float64 with SIMT FMAs in their own type on the same tiling.

Forward: per weight group, tiles of 64 output pixels x 64 output channels, K =
kh*kw*(C/groups) in steps of 16 channels of one tap. The A operand (mask *
bilinear sample) is computed straight into shared memory (each thread's
sampling position and bilinear weights once per (pixel, tap), reused over the
channels), the B operand (the weight, permuted to (Cout, kh, kw, C/groups), a
copy of the small weight) staged with cp.async; bias in the epilogue, NCHW
output written in place. Its workspace is the permuted weight only,
independent of the batch.

Backward (docs/semantics.md section 2.6), two kernels and no columns or columns'
gradient buffer; K padded per tap to a multiple of 16 channels (CHUNK):

- ``deform_conv_igemm_grad_weight``: grad_W = grad_out @ S over the B*Ho*Wo
  pixels, S the forward's A values (mask * bilinear sample, built per step of
  16 pixels in shared memory by the forward's own device functions). Tiles of
  128 output channels x 64 k (S is re-made per tile of output channels: the
  taller tile halves that work); the pixels split across blocks (:func:`splits_for`:
  about CUDA_BLOCKS blocks on CUDA, one per worker on the host), each block's
  tile added to a (Cout, kh, kw, C/groups) accumulation-type buffer with
  atomics: memory independent of the batch.
- ``deform_conv_igemm_grad_data``: per tile of 64 pixels x 64 k, grad_S =
  grad_out^T @ W reduced over Cout/groups in the block (the weight permuted to
  (groups, kh, kw, C/groups, Cout/groups), staged with cp.async), never written
  out: the epilogue, per (pixel, 16-channel chunk of one tap), computes the
  sampling position and bilinear weights once per offset group, scatters
  grad * mask * corner weight into the input gradient (float atomics in the
  accumulation type, as ``im2col_fused``) and sums the offset and mask
  gradients over the chunk's channels, added with atomics to accumulation-type
  buffers converted to the dtype at the end.

The bias gradient is ``_deform_conv``'s (a GEMM with a ones vector). Floating-
point atomics make the backward non-deterministic (``deterministic=False``:
under ``deterministic=True`` the dispatcher refuses it by name and chooses a
deterministic implementation automatically). ``implicit_gemm_tf32``
shares this backward in exact float32 (SIMT): TF32 is only its forward's opt-in.

Two implementations: ``implicit_gemm`` (every dtype, exact float32) and
``implicit_gemm_tf32`` (float32 forward on tensor cores through TF32, m16n8k8:
inputs rounded to 10-bit mantissas; an explicit opt-in, never chosen
automatically).

The automatic choice (a heuristic from a roofline prediction, until GPU
measurements replace it): ``implicit_gemm`` for float16 and bfloat16 on CUDA,
``im2col`` elsewhere.
- float16/bfloat16 on CUDA: im2col writes and reads a columns buffer of
  B*Ho*Wo*C*kh*kw floats (B8 C256 64x64: 302 MB, ~125 us of HBM traffic on
  an H200 at 4.8 TB/s, before its GEMM) where this kernel moves ~40 MB (input,
  offsets, mask, weight, output); its GEMM runs on tensor cores. The sample
  build (4 gathers and ~10 FMAs per A element, repeated once per 64-channel
  tile of N) is the predicted bound, ~1-2x the mma time for this simple
  single-buffered 64x64 tile: forward predicted 2-4x cuDNN's dense bf16
  convolution, 5-10x faster than torchvision's forward. The backward is
  predicted about as fast as the im2col backward (0.9x for the half types,
  1.2x for float32, benchmarks/NOTES.md section 5: the weight gradient
  re-samples per 128-channel Cout tile, the data gradient's atomics are not
  aggregated); its gain is memory (no columns buffers).
- float32/float64: the SIMT GEMM of this kernel (~60 TFLOP/s peak f32, reached
  at perhaps a third by a 64x64 tile without register blocking beyond 4x8)
  is predicted no faster than cuBLAS on the columns buffer for large C, so
  im2col stays the choice; TF32 only when asked by name.
- the host CPU: the tiled kernel runs its threads as fibers with barriers,
  slower than im2col's plain loops and NumPy's BLAS: im2col stays the choice.

Resources (nvcc 13 --resource-usage, sm_80 / sm_90, 32-bit / 64-bit indices, no
spills anywhere; benchmarks/NOTES.md has blocks per SM):
forward float16/bfloat16 92-95 / 128 registers, 6 KiB static shared memory;
float32 166-168, 12 KiB; float64 170-212, 24 KiB. grad_weight (256 threads)
float16/bfloat16 95-106 / 128-130, 9 KiB; float32 128 / 168, 18 KiB; float64
158-168 / 182-192, 36 KiB. grad_data float16/bfloat16 92-96 / 124-126, 14.25 KiB;
float32 128 / 164, 20.25 KiB; float64 148-158 / 168-180, 40.5 KiB.
"""

from __future__ import annotations

from cupydcn import _arrays, _deform_conv, _dispatch, _dtypes, _kernels, _validation

_OP = "deform_conv2d"
_FILE = "deform_conv_igemm"
_KERNEL = "deform_conv_igemm"
_GRAD_WEIGHT = "deform_conv_igemm_grad_weight"
_GRAD_DATA = "deform_conv_igemm_grad_data"
BLOCK = (128, 1, 1)
TILE_M = TILE_N = 64
GRAD_WEIGHT_BLOCK = (256, 1, 1)  # its tile: 128 output channels x 64 k
GRAD_WEIGHT_ROWS = 128
CHUNK = 16  # channels of one tap per K step; K padded per tap to a multiple
_MAX_GRID_YZ = 65535
_MAX_GRID_X = 2**31 - 1
_HALF = frozenset({"float16", "bfloat16"})
# Blocks the weight gradient's split reduction aims for: on CUDA two per SM of an
# H200 (132 SMs), enough to fill it whatever the tile count; on the host one per
# worker (fewer splits, fewer atomics).
CUDA_BLOCKS = 264


def _grid(geo):
    M = geo.B * geo.Ho * geo.Wo
    return (-(-M // TILE_M), -(-(geo.Cout // geo.groups) // TILE_N), geo.groups)


def _padded_channels(geo):
    """Cgp: channels per tap of the backward's K tiles (C/groups rounded up to CHUNK)."""
    return -(-(geo.C // geo.groups) // CHUNK) * CHUNK


def _k_tiles(geo):
    return -(-(geo.kh * geo.kw * _padded_channels(geo)) // TILE_N)


def _grad_data_grid(geo):
    return (_grid(geo)[0] * _k_tiles(geo), 1, geo.groups)


def _grad_weight_rows(geo):
    return -(-(geo.Cout // geo.groups) // GRAD_WEIGHT_ROWS)


def _supports(geo):
    x, y, z = _grid(geo)
    if y > _MAX_GRID_YZ or z > _MAX_GRID_YZ or x > _MAX_GRID_X:
        return (f"its grid ({x}, {y}, {z}) of 64x64 output tiles exceeds CUDA's limits "
                f"({_MAX_GRID_X}, {_MAX_GRID_YZ}, {_MAX_GRID_YZ})")
    x = _grad_data_grid(geo)[0]
    if x > _MAX_GRID_X:
        return (f"its backward's grid of {x} 64x64 tiles (pixels x K) exceeds CUDA's limit "
                f"{_MAX_GRID_X}")
    return None


def _index_bits(geo):
    taps = geo.kh * geo.kw
    return _dtypes.index_bits(
        geo.B * geo.C * geo.H * geo.W,
        geo.B * geo.offset_groups * 2 * taps * geo.Ho * geo.Wo,
        geo.B * geo.Cout * geo.Ho * geo.Wo,
        geo.Cout * geo.C // geo.groups * taps,
        # the kernels' tile origins and row indices: below the padded extents
        (_grid(geo)[0] + 1) * TILE_M, (_grid(geo)[1] + 1) * TILE_N * geo.groups,
        (_k_tiles(geo) + 1) * TILE_N * geo.groups, _grad_data_grid(geo)[0] + 1,
        (_grad_weight_rows(geo) + 1) * GRAD_WEIGHT_ROWS * geo.groups,
        (geo.Cout // geo.groups + CHUNK) * (geo.C // geo.groups * taps + TILE_N) * geo.groups,
    )


def _geometry_args(geo):
    return [geo.B, geo.C, geo.H, geo.W, geo.Cout, geo.groups, geo.kh, geo.kw, *geo.stride,
            *geo.padding, *geo.dilation, geo.Ho, geo.Wo, geo.offset_groups]


def forward(backend, geo, input, offset, weight, bias=None, mask=None, tf32=False):
    """out (B, Cout, Ho, Wo) of deform_conv2d by the implicit-GEMM kernel on
    ``backend`` (validated arguments); ``tf32``: float32 on tensor cores."""
    xp = backend.xp
    out = _arrays.empty_result(xp, (geo.B, geo.Cout, geo.Ho, geo.Wo), geo.dtype.dtype)
    if out.size == 0:
        return out
    input, offset, mask, bias = _kernels.contiguous(xp, input, offset, mask, bias)
    # K tap-major: (Cout, kh, kw, C/groups), so a K tile is contiguous channels of one tap.
    weight_k = xp.ascontiguousarray(weight.transpose(0, 2, 3, 1))
    backend.launch(_FILE, _KERNEL, geo.dtype, _index_bits(geo), out.size,
                   [input, offset, mask, weight_k, bias, out, *_geometry_args(geo), int(tf32)],
                   grid=_grid(geo), block=BLOCK)
    return out


def splits_for(backend, geo):
    """Pixels per block of the weight gradient's reduction (a multiple of CHUNK):
    enough splits of the B*Ho*Wo pixels for CUDA_BLOCKS blocks on CUDA (the
    workers on the host), at least one step of CHUNK pixels each."""
    steps = -(-(geo.B * geo.Ho * geo.Wo) // CHUNK)
    tiles = _k_tiles(geo) * _grad_weight_rows(geo) * geo.groups
    wanted = getattr(backend, "workers", None) if getattr(backend, "name", None) == "host" \
        else CUDA_BLOCKS
    splits = max(1, min(steps, -(-(wanted or 1) // tiles)))
    return -(-steps // splits) * CHUNK


def backward(backend, geo, grad_output, input, offset, weight, mask, wrt, per_split=None):
    """The implicit-GEMM kernel path of deform_conv2d_backward; ``wrt`` a set
    of GRADIENTS (see the module docstring); ``per_split`` (pixels per block of
    the weight gradient, a positive int) overrides :func:`splits_for`."""
    if per_split is not None and (not isinstance(per_split, int) or isinstance(per_split, bool)
                                  or per_split < 1):
        raise _validation.ArgumentError(f"per_split must be a positive int, got {per_split!r}")
    xp = backend.xp
    dtype, acc = geo.dtype.dtype, geo.dtype.acc
    cg = geo.C // geo.groups
    grad_input = (_arrays.zeros_result(xp, input.shape, acc, result=acc == dtype)
                  if "input" in wrt else None)
    # offset, mask and weight: accumulated (atomics) in the accumulation type
    grad_offset = xp.zeros(offset.shape, acc) if "offset" in wrt else None
    grad_mask = xp.zeros(mask.shape, acc) if "mask" in wrt else None
    grad_weight = xp.zeros((geo.Cout, geo.kh, geo.kw, cg), acc) if "weight" in wrt else None
    grad_output, input, offset, mask = _kernels.contiguous(xp, grad_output, input, offset, mask)
    grad_bias = (_arrays.result(xp, _deform_conv._bias_gradient(xp, geo, grad_output), dtype)
                 if "bias" in wrt else None)
    work = geo.B * geo.Ho * geo.Wo * geo.Cout
    if work and grad_weight is not None:
        per_split = splits_for(backend, geo) if per_split is None else per_split
        splits = -(-(geo.B * geo.Ho * geo.Wo) // per_split)
        backend.launch(_FILE, _GRAD_WEIGHT, geo.dtype, _index_bits(geo), work,
                       [grad_output, input, offset, mask, grad_weight, *_geometry_args(geo),
                        _padded_channels(geo), per_split],
                       grid=(_k_tiles(geo) * splits, _grad_weight_rows(geo), geo.groups),
                       block=GRAD_WEIGHT_BLOCK)
    if work and wrt & {"input", "offset", "mask"}:
        # (groups, kh, kw, C/groups, Cout/groups): a K row holds its output channels.
        weight_t = xp.ascontiguousarray(weight.reshape(
            geo.groups, geo.Cout // geo.groups, cg, geo.kh, geo.kw).transpose(0, 3, 4, 2, 1))
        backend.launch(_FILE, _GRAD_DATA, geo.dtype, _index_bits(geo), work,
                       [grad_output, input, offset, mask, weight_t, grad_input, grad_offset,
                        grad_mask, *_geometry_args(geo), _padded_channels(geo)],
                       grid=_grad_data_grid(geo), block=BLOCK)
    grad_offset, grad_mask = (None if g is None else _arrays.result(xp, g, dtype)
                              for g in (grad_offset, grad_mask))
    if grad_weight is not None:
        grad_weight = xp.ascontiguousarray(grad_weight.transpose(0, 3, 1, 2))
    return _deform_conv.finish_backward(xp, dtype, weight, grad_input, grad_offset, grad_weight,
                                        grad_bias, grad_mask)


def _forward(tf32):
    def run(backend, geo, a):
        return forward(backend, geo, a.input, a.offset, a.weight, a.bias, a.mask, tf32)
    return run


def _backward(backend, geo, a, wrt):
    return backward(backend, geo, a.grad_output, a.input, a.offset, a.weight, a.mask, wrt)


def _automatic(where, geo):
    """The heuristic of the module docstring: tensor cores on CUDA win for the half types."""
    return where == _dispatch.CUDA and geo.dtype.name in _HALF


_KERNELS = frozenset({_dispatch.CUDA, _dispatch.HOST})
_dispatch.register(_dispatch.Implementation(
    "implicit_gemm", _OP, _KERNELS, deterministic=False, forward=_forward(False),
    backward=_backward, launch=_dispatch.Launch(_FILE, block=BLOCK), supports=_supports,
    priority=30, automatic=_automatic,
    summary="implicit GEMMs, no columns buffer (samples built in shared memory; "
            "float16/bfloat16 on tensor cores, float32/float64 SIMT): forward; backward: "
            "weight gradient (pixels split across blocks, float atomics) and the data "
            "gradient fused with its scatter to the input, offset and mask gradients"))
_dispatch.register(_dispatch.Implementation(
    "implicit_gemm_tf32", _OP, _KERNELS, deterministic=False, forward=_forward(True),
    forward_tolerance_as="float16",
    backward=_backward, launch=_dispatch.Launch(_FILE, block=BLOCK),
    dtypes=frozenset({"float32"}), supports=_supports, priority=-10,
    automatic=lambda where, geo: False,
    summary="implicit GEMM forward, float32 on tensor cores through TF32 (explicit "
            "opt-in: inputs rounded to 10-bit mantissas); backward: implicit_gemm's "
            "(exact float32)"))
