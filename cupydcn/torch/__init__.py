"""PyTorch bridge: cupydcn's ops as ``torch.library`` custom ops, with autograd,
and the modules of torchvision and mmcv built on them.

Ops (namespace ``cupydcn``, each backward registered as its own op, each with a
fake implementation so ``torch.compile(fullgraph=True)`` traces them):

* :func:`deform_conv2d`: a drop-in for ``torchvision.ops.deform_conv2d``;
* :func:`deform_roi_pool`, :func:`deform_psroi_pool`: mmcv's and the official
  DCN operator's deformable RoI pooling.

Modules: :class:`DeformConv2d` (torchvision), :class:`DeformConv2dPack`,
:class:`ModulatedDeformConv2dPack`, :class:`DeformRoIPool`,
:class:`DeformRoIPoolPack`, :class:`ModulatedDeformRoIPoolPack` (mmcv) and
:class:`DeformPSRoIPool` (DCNv2's ``DCNv2Pooling``). Each foreign library's own
names, signatures and argument orders: ``cupydcn.torch.mmcv``,
``cupydcn.torch.dcnv2`` (DCNv2 / CenterNet), ``cupydcn.torch.detectron2``.

This file holds DLPack and autograd only; the numbers are the core's
(docs/semantics.md). CUDA tensors run the CUDA kernels on their device, on torch's
current stream, with CuPy allocating from torch's caching allocator; CPU tensors
run the NumPy reference. Inputs cross by DLPack without copies; the op results
are tensors that torch allocates (``torch.empty`` on the input's device and
torch's current stream) and the core writes into, so ``record_stream`` and the
caching allocator treat them as any other torch tensor. Shapes are checked by
``cupydcn._validation`` (in the fake implementations too), so a mistake gets
the same message from torch as from CuPy or NumPy, as a
``cupydcn.ArgumentError`` (a ``ValueError`` and a ``RuntimeError``, what
torchvision raises) or ``cupydcn.ArgumentTypeError`` (a ``TypeError`` and a
``RuntimeError``; e.g. "offset must be a torch.Tensor, got numpy.ndarray").

Autocast (CUDA and CPU): deform_conv2d runs in the autocast dtype (float16 or
bfloat16), as torch's convolutions do; the RoI poolings run in float32 and
return the input's dtype, as torchvision's roi_align does (RoI coordinates in
bfloat16 would be off by pixels). float64 tensors are never cast.
Deterministic mode: under ``torch.use_deterministic_algorithms(True)`` every
backward runs the core's deterministic path (no floating-point atomics), so
gradients are bit-identical run after run; the CPU reference path always is.

Importing ``cupydcn`` does not import this module (nor torch): import it as
``import cupydcn.torch``.
"""

import contextlib
import math

# typing's names, not PEP 585/604 ones: torch.library infers the op schemas
# from these annotations, and torch 2.4 with Python 3.9 must read them.
from typing import List, Optional, Sequence, Tuple

import numpy
import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

import cupydcn
from cupydcn import _arrays, _validation
from cupydcn.torch import _onnx as _torch_onnx

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformPSRoIPool",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformConv2dPack",
    "ModulatedDeformRoIPoolPack",
    "deform_conv2d",
    "deform_psroi_pool",
    "deform_roi_pool",
]

_CONV_GRADIENTS = ("input", "offset", "weight", "bias", "mask")


# --------------------------------------------------------------------------
# Interchange: tensors to CuPy/NumPy views and back, torch's device and stream
# --------------------------------------------------------------------------


def _bfloat16():
    import ml_dtypes

    return numpy.dtype(ml_dtypes.bfloat16)


def _core_array(t):
    """A zero-copy CuPy (CUDA) or NumPy (CPU) view of tensor ``t``; None stays None."""
    if t is None:
        return None
    t = t.detach()  # DLPack refuses tensors that require grad; the data is the same
    if t.device.type == "cuda":
        import cupy

        convert = cupy.from_dlpack
    elif t.device.type == "cpu":
        convert = numpy.from_dlpack
    else:
        raise _validation.ArgumentTypeError(
            f"a tensor lives on {t.device}; cupydcn runs on CUDA GPUs and on the CPU")
    if t.dtype == torch.bfloat16:
        # NumPy's DLPack has no bfloat16 (nor has every CuPy's): the same bits
        # cross as int16 and are viewed as ml_dtypes.bfloat16, the core's type.
        return convert(t.view(torch.int16)).view(_bfloat16())
    return convert(t)


def _tensor(a, owner=None):
    """The tensor of the core's CuPy or NumPy result ``a``: the one torch
    allocated for it (``owner``, from :func:`_core_scope`), else one sharing
    its memory through DLPack."""
    t = None if owner is None else owner(a)
    if t is not None:
        return t
    if a.dtype == _bfloat16():
        return torch.from_dlpack(a.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


_torch_allocator = None


def _cupy_allocator():
    """A CuPy allocator drawing from torch's caching allocator on torch's
    current stream, so that the core's buffers and results live in torch's
    pool instead of a second cache beside it."""
    global _torch_allocator
    if _torch_allocator is None:
        import cupy

        def malloc(size, device_id):
            if size == 0:
                return 0
            return torch.cuda.caching_allocator_alloc(size, device_id,
                                                      torch.cuda.current_stream(device_id))

        def free(ptr, device_id):
            if ptr:
                torch.cuda.caching_allocator_delete(ptr)

        _torch_allocator = cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc
    return _torch_allocator


@contextlib.contextmanager
def _device_scope(t):
    """Run the core on ``t``'s device: for CUDA, that device current, torch's
    current stream as CuPy's current stream and torch's allocator."""
    if t.device.type != "cuda":
        yield
        return
    import cupy

    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index), _cupy_stream(torch.cuda.current_stream(index).cuda_stream), \
            cupy.cuda.using_allocator(_cupy_allocator()):
        yield


def _torch_dtype(dtype):
    return torch.bfloat16 if dtype == _bfloat16() else getattr(torch, dtype.name)


@contextlib.contextmanager
def _core_scope(t):
    """:func:`_device_scope` of ``t``, with the op results allocated by torch
    (``torch.empty`` on ``t``'s device, on torch's current stream) and written
    by the core in place: the results are ordinary torch tensors, which
    ``record_stream`` and torch's caching allocator handle as their own.
    Yields the function that maps a core result to its tensor."""
    def allocate(shape, dtype):
        owner = torch.empty(shape, dtype=_torch_dtype(dtype), device=t.device)
        return owner, _core_array(owner)

    with _device_scope(t), _arrays.output_allocator(allocate) as owner:
        yield owner


def _check_tensors(required, optional=()):
    """Every tensor argument a torch.Tensor (the optional ones or None)."""
    _validation.check_arrays(required, optional, expected="a torch.Tensor",
                             accepts=lambda x: isinstance(x, Tensor))


class _StreamHandle:
    """A CUDA stream handle under the CUDA stream protocol (torch's streams
    implement it only in recent versions)."""

    def __init__(self, ptr):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _cupy_stream(ptr):
    """CuPy's view of the CUDA stream ``ptr`` (a context manager making it current)."""
    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:  # CuPy >= 14, where ExternalStream is deprecated
        return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr)


def _ints(value, name, minimum):
    """An int or (h, w) pair as the op schema's int list, by the shared check."""
    return list(_validation.pair(value, name, minimum))


def _check_eagerly(check, input, *args, **kwargs):
    """Run a shared check on the caller's own arguments before they are
    converted for the op schema. Compiled code is checked by the fake
    implementations instead (dynamo need not trace the checks), autocast code
    by the core once the autocast kernel has cast the tensors (mixed dtypes
    are legal there), ``torch.jit.trace`` (and the TorchScript ONNX exporter)
    by the core (the checks' int() of traced sizes would warn), and every run
    again by the core."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    if isinstance(input, Tensor) and _autocast_enabled(input.device.type):
        return
    check(input, *args, **kwargs)


# --------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------


def _deterministic():
    """Whether the backward must be deterministic: under
    ``torch.use_deterministic_algorithms(True)`` the core's backward runs
    without floating-point atomics (bit-identical gradients run after run)."""
    return torch.are_deterministic_algorithms_enabled()


# --------------------------------------------------------------------------
# Autocast
# --------------------------------------------------------------------------

# deform_conv2d runs in the autocast dtype, whichever the user chose (float16
# or bfloat16), as torch's own convolutions do; torch.library.register_autocast
# (torch >= 2.5) casts to one fixed dtype per device, so the kernel here reads
# the dtype at call time. The RoI poolings run in float32 and return the
# input's dtype, torchvision's rule for roi_align: their RoI coordinates must
# share the input's dtype (the shared validation), and bfloat16 would round a
# coordinate of 300 pixels to a multiple of 2.
_LIBRARY = torch.library.Library("cupydcn", "FRAGMENT")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _autocast_dtype(device_type):
    get = getattr(torch, "get_autocast_dtype", None)
    if get is not None:
        return get(device_type)
    if device_type == "cuda":  # torch < 2.4
        return torch.get_autocast_gpu_dtype()
    return torch.get_autocast_cpu_dtype()


def _autocast_enabled(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return (torch.is_autocast_enabled() if device_type == "cuda"
                else device_type == "cpu" and torch.is_autocast_cpu_enabled())


def _autocast_arg(x, device_type, dtype):
    # Autocast's eligibility rule: floating tensors on the device, float64 excluded.
    if (isinstance(x, Tensor) and x.is_floating_point() and x.device.type == device_type
            and x.dtype != torch.float64):
        return x.to(dtype)
    return x


def _register_autocast(op_name, float32=False):
    """Autocast kernels (CPU and CUDA) for op ``op_name``: inputs cast to the
    autocast dtype, or with ``float32`` to float32 and the first output cast
    back to the input's dtype."""
    op = getattr(torch.ops.cupydcn, op_name).default
    for device_type, key in _AUTOCAST_KEYS.items():
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=keyset):
            dtype = torch.float32 if float32 else _autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                result = op(*(_autocast_arg(a, _device_type, dtype) for a in args))
            if not float32:
                return result
            if isinstance(result, tuple):
                return (result[0].to(args[0].dtype),) + tuple(result[1:])
            return result.to(args[0].dtype)

        _LIBRARY.impl(op_name, kernel, key, with_keyset=True)


# --------------------------------------------------------------------------
# deform_conv2d
# --------------------------------------------------------------------------


def _present(names, wrt, **optional):
    """The gradient names flagged in ``wrt`` (one bool per name), less those
    of optional tensors not given: what a backward op computes and returns."""
    return [name for name, want in zip(names, wrt)
            if want and optional.get(name, True) is not None]


@torch.library.custom_op("cupydcn::deform_conv2d", mutates_args=())
def _deform_conv2d_op(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                      mask: Optional[Tensor]) -> Tensor:
    with _core_scope(input) as owner:
        out = cupydcn.deform_conv2d(_core_array(input), _core_array(offset), _core_array(weight),
                                    _core_array(bias), stride, padding, dilation,
                                    _core_array(mask))
        return _tensor(out, owner)


@_deform_conv2d_op.register_fake
def _deform_conv2d_fake(input, offset, weight, bias, stride, padding, dilation, mask):
    _torch_onnx.check_opset()
    geo = _validation.check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation,
                                          mask)
    return input.new_empty((geo.B, geo.Cout, geo.Ho, geo.Wo))


@torch.library.custom_op("cupydcn::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(grad_output: Tensor, input: Tensor, offset: Tensor,
                               weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                               padding: Sequence[int], dilation: Sequence[int],
                               mask: Optional[Tensor], wrt: Sequence[bool]) -> List[Tensor]:
    """The gradients named by ``wrt`` (flags for input, offset, weight, bias,
    mask), in that order; bias and mask only when given."""
    names = _present(_CONV_GRADIENTS, wrt, bias=bias, mask=mask)
    if not names:
        return []
    with _core_scope(input) as owner:
        grads = cupydcn.deform_conv2d_backward(
            _core_array(grad_output), _core_array(input), _core_array(offset),
            _core_array(weight), _core_array(bias), stride, padding, dilation,
            _core_array(mask), wrt=names, deterministic=_deterministic())
        return [_tensor(getattr(grads, name), owner) for name in names]


@_deform_conv2d_backward_op.register_fake
def _deform_conv2d_backward_fake(grad_output, input, offset, weight, bias, stride, padding,
                                 dilation, mask, wrt):
    _validation.check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask,
                                    grad_output=grad_output)
    like = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    return [like[name].new_empty(like[name].shape)
            for name in _present(_CONV_GRADIENTS, wrt, bias=bias, mask=mask)]


def _deform_conv2d_setup_context(ctx, inputs, output):
    input, offset, weight, bias, stride, padding, dilation, mask = inputs
    ctx.save_for_backward(input, offset, weight, bias, mask)
    ctx.geometry = (stride, padding, dilation)


def _deform_conv2d_backward(ctx, grad_output):
    input, offset, weight, bias, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    wrt = [needs[0], needs[1], needs[2], needs[3] and bias is not None,
           needs[7] and mask is not None]
    grads = iter(torch.ops.cupydcn.deform_conv2d_backward(
        grad_output, input, offset, weight, bias, *ctx.geometry, mask, wrt) if any(wrt) else ())
    g_input, g_offset, g_weight, g_bias, g_mask = (next(grads) if w else None for w in wrt)
    return g_input, g_offset, g_weight, g_bias, None, None, None, g_mask


torch.library.register_autograd("cupydcn::deform_conv2d", _deform_conv2d_backward,
                                setup_context=_deform_conv2d_setup_context)
_register_autocast("deform_conv2d")


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Deformable convolution (DCNv1), or modulated (DCNv2) with ``mask``: a
    drop-in for ``torchvision.ops.deform_conv2d`` (same arguments, same numbers,
    docs/semantics.md §2), differentiable in all five tensors.

    ``out[b, o] = bias[o] + sum_{c, i, j} weight[o, c, i, j] * mask[b, g, k]
    * bilinear(input[b, c], p + (i, j) * dilation + offset[b, g, k])``.

    Args:
        input: (B, C, H, W) tensor.
        offset: (B, 2*offset_groups*kh*kw, Ho, Wo) tensor, (dy, dx) interleaved per tap.
        weight: (Cout, C/groups, kh, kw) tensor.
        bias: (Cout,) tensor or None.
        stride, padding, dilation: int or (h, w) pair.
        mask: (B, offset_groups*kh*kw, Ho, Wo) tensor or None (DCNv1).

    Returns:
        (B, Cout, Ho, Wo) tensor on the input's device, of its dtype.

    Example:
        >>> out = cupydcn.torch.deform_conv2d(x, offset, w, padding=1, mask=m)
    """
    _check_tensors(dict(input=input, offset=offset, weight=weight), dict(bias=bias, mask=mask))
    _check_eagerly(_validation.check_deform_conv2d, input, offset, weight, bias, stride,
                   padding, dilation, mask)
    if not torch.jit.is_scripting():  # the ONNX exporters' hook (cupydcn/torch/_onnx.py)
        if _torch_onnx.exporting():
            return _torch_onnx.deform_conv2d(input, offset, weight, bias, stride, padding,
                                             dilation, mask)
    return torch.ops.cupydcn.deform_conv2d(
        input, offset, weight, bias, _ints(stride, "stride", 1), _ints(padding, "padding", 0),
        _ints(dilation, "dilation", 1), mask)


# --------------------------------------------------------------------------
# deform_roi_pool
# --------------------------------------------------------------------------

_ROI_GRADIENTS = ("input", "offset", "mask")


@torch.library.custom_op("cupydcn::deform_roi_pool", mutates_args=())
def _deform_roi_pool_op(input: Tensor, rois: Tensor, offset: Optional[Tensor],
                        output_size: Sequence[int], spatial_scale: float, sampling_ratio: int,
                        gamma: float, mask: Optional[Tensor]) -> Tensor:
    with _core_scope(input) as owner:
        out = cupydcn.deform_roi_pool(_core_array(input), _core_array(rois), _core_array(offset),
                                      output_size, spatial_scale, sampling_ratio, gamma,
                                      _core_array(mask))
        return _tensor(out, owner)


@_deform_roi_pool_op.register_fake
def _deform_roi_pool_fake(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                          mask):
    # rois[:, 0] (the batch indices) is data: checked when the op runs
    geo = _validation.check_deform_roi_pool(input, rois, offset, output_size, spatial_scale,
                                            sampling_ratio, gamma, mask, check_batch=False)
    return input.new_empty((geo.R, geo.C, geo.ph, geo.pw))


@torch.library.custom_op("cupydcn::deform_roi_pool_backward", mutates_args=())
def _deform_roi_pool_backward_op(grad_output: Tensor, input: Tensor, rois: Tensor,
                                 offset: Optional[Tensor], output_size: Sequence[int],
                                 spatial_scale: float, sampling_ratio: int, gamma: float,
                                 mask: Optional[Tensor], wrt: Sequence[bool]) -> List[Tensor]:
    """The gradients named by ``wrt`` (flags for input, offset, mask), in that
    order; offset and mask only when given."""
    names = _present(_ROI_GRADIENTS, wrt, offset=offset, mask=mask)
    if not names:
        return []
    with _core_scope(input) as owner:
        grads = cupydcn.deform_roi_pool_backward(
            _core_array(grad_output), _core_array(input), _core_array(rois), _core_array(offset),
            output_size, spatial_scale, sampling_ratio, gamma, _core_array(mask), wrt=names,
            deterministic=_deterministic())
        return [_tensor(getattr(grads, name), owner) for name in names]


@_deform_roi_pool_backward_op.register_fake
def _deform_roi_pool_backward_fake(grad_output, input, rois, offset, output_size, spatial_scale,
                                   sampling_ratio, gamma, mask, wrt):
    _validation.check_deform_roi_pool(input, rois, offset, output_size, spatial_scale,
                                      sampling_ratio, gamma, mask, grad_output=grad_output,
                                      check_batch=False)
    like = {"input": input, "offset": offset, "mask": mask}
    return [like[name].new_empty(like[name].shape)
            for name in _present(_ROI_GRADIENTS, wrt, offset=offset, mask=mask)]


def _deform_roi_pool_setup_context(ctx, inputs, output):
    input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask = inputs
    ctx.save_for_backward(input, rois, offset, mask)
    ctx.params = (output_size, spatial_scale, sampling_ratio, gamma)


def _deform_roi_pool_backward(ctx, grad_output):
    input, rois, offset, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    wrt = [needs[0], needs[2] and offset is not None, needs[7] and mask is not None]
    output_size, spatial_scale, sampling_ratio, gamma = ctx.params
    grads = iter(torch.ops.cupydcn.deform_roi_pool_backward(
        grad_output, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
        mask, wrt) if any(wrt) else ())
    g_input, g_offset, g_mask = (next(grads) if w else None for w in wrt)
    return g_input, None, g_offset, None, None, None, None, g_mask


torch.library.register_autograd("cupydcn::deform_roi_pool", _deform_roi_pool_backward,
                                setup_context=_deform_roi_pool_setup_context)
_register_autocast("deform_roi_pool", float32=True)


def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0,
                    gamma=0.1, mask=None):
    """Deformable RoI pooling, RoIAlign style (mmcv's ``deform_roi_pool``, same
    positional arguments), modulated when ``mask`` is given; differentiable in
    input, offset and mask (not in rois). docs/semantics.md §3.

    Args:
        input: (N, C, H, W) tensor.
        rois: (R, 5) tensor of the input's dtype, rows ``[batch_index, x1, y1, x2, y2]``.
        offset: (R, 2, ph, pw) tensor (channel 0 moves x, channel 1 moves y) or None.
        output_size: int or (ph, pw).
        spatial_scale: image -> feature map scale.
        sampling_ratio: samples per bin per axis, 0 = adaptive.
        gamma: the offset scale.
        mask: (R, 1, ph, pw) tensor multiplying the output, or None.

    Returns:
        (R, C, ph, pw) tensor. Without offset and mask this equals
        ``torchvision.ops.roi_align(..., aligned=True)``.
    """
    _check_tensors(dict(input=input, rois=rois), dict(offset=offset, mask=mask))
    _check_eagerly(_validation.check_deform_roi_pool, input, rois, offset, output_size,
                   spatial_scale, sampling_ratio, gamma, mask, check_batch=False)
    if not torch.jit.is_scripting():  # the ONNX exporters' hook (cupydcn/torch/_onnx.py)
        if _torch_onnx.exporting():
            return _torch_onnx.deform_roi_pool(input, rois, offset, output_size, spatial_scale,
                                               sampling_ratio, gamma, mask)
    return torch.ops.cupydcn.deform_roi_pool(
        input, rois, offset, _ints(output_size, "output_size", 1), float(spatial_scale),
        int(sampling_ratio), float(gamma), mask)


# --------------------------------------------------------------------------
# deform_psroi_pool
# --------------------------------------------------------------------------

_PSROI_GRADIENTS = ("input", "trans")


@torch.library.custom_op("cupydcn::deform_psroi_pool", mutates_args=())
def _deform_psroi_pool_op(input: Tensor, rois: Tensor, trans: Optional[Tensor],
                          spatial_scale: float, output_dim: Optional[int], group_size: int,
                          pooled_size: int, part_size: int, sample_per_part: int,
                          trans_std: float) -> Tuple[Tensor, Tensor]:
    """(output, count); count (the samples counted per output element, in the
    accumulation dtype) is what the backward takes."""
    with _core_scope(input) as owner:
        out, count = cupydcn.deform_psroi_pool(
            _core_array(input), _core_array(rois), _core_array(trans), spatial_scale,
            output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
            return_count=True)
        return _tensor(out, owner), _tensor(count, owner)


@_deform_psroi_pool_op.register_fake
def _deform_psroi_pool_fake(input, rois, trans, spatial_scale, output_dim, group_size,
                            pooled_size, part_size, sample_per_part, trans_std):
    geo = _validation.check_deform_psroi_pool(input, rois, trans, spatial_scale, output_dim,
                                              group_size, pooled_size, part_size,
                                              sample_per_part, trans_std, check_batch=False)
    shape = (geo.R, geo.output_dim, geo.pooled_size, geo.pooled_size)
    return input.new_empty(shape), input.new_empty(shape, dtype=getattr(torch, geo.dtype.acc.name))


@torch.library.custom_op("cupydcn::deform_psroi_pool_backward", mutates_args=())
def _deform_psroi_pool_backward_op(grad_output: Tensor, input: Tensor, rois: Tensor,
                                   trans: Optional[Tensor], count: Tensor, spatial_scale: float,
                                   output_dim: Optional[int], group_size: int, pooled_size: int,
                                   part_size: int, sample_per_part: int, trans_std: float,
                                   wrt: Sequence[bool]) -> List[Tensor]:
    """The gradients named by ``wrt`` (flags for input, trans), in that order;
    trans only when given."""
    names = _present(_PSROI_GRADIENTS, wrt, trans=trans)
    if not names:
        return []
    with _core_scope(input) as owner:
        grads = cupydcn.deform_psroi_pool_backward(
            _core_array(grad_output), _core_array(input), _core_array(rois), _core_array(trans),
            _core_array(count), spatial_scale, output_dim, group_size, pooled_size, part_size,
            sample_per_part, trans_std, wrt=names, deterministic=_deterministic())
        return [_tensor(getattr(grads, name), owner) for name in names]


@_deform_psroi_pool_backward_op.register_fake
def _deform_psroi_pool_backward_fake(grad_output, input, rois, trans, count, spatial_scale,
                                     output_dim, group_size, pooled_size, part_size,
                                     sample_per_part, trans_std, wrt):
    _validation.check_deform_psroi_pool(input, rois, trans, spatial_scale, output_dim,
                                        group_size, pooled_size, part_size, sample_per_part,
                                        trans_std, grad_output=grad_output, count=count,
                                        check_batch=False)
    like = {"input": input, "trans": trans}
    return [like[name].new_empty(like[name].shape)
            for name in _present(_PSROI_GRADIENTS, wrt, trans=trans)]


def _deform_psroi_pool_setup_context(ctx, inputs, output):
    input, rois, trans, *params = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(input, rois, trans, output[1])
    ctx.params = params


def _deform_psroi_pool_backward(ctx, grad_output, _grad_count):
    input, rois, trans, count = ctx.saved_tensors
    needs = ctx.needs_input_grad
    wrt = [needs[0], needs[2] and trans is not None]
    grads = iter(torch.ops.cupydcn.deform_psroi_pool_backward(
        grad_output, input, rois, trans, count, *ctx.params, wrt) if any(wrt) else ())
    g_input, g_trans = (next(grads) if w else None for w in wrt)
    return (g_input, None, g_trans) + (None,) * len(ctx.params)


torch.library.register_autograd("cupydcn::deform_psroi_pool", _deform_psroi_pool_backward,
                                setup_context=_deform_psroi_pool_setup_context)
_register_autocast("deform_psroi_pool", float32=True)


def deform_psroi_pool(input, rois, trans=None, spatial_scale=1.0, output_dim=None, group_size=1,
                      pooled_size=7, part_size=0, sample_per_part=4, trans_std=0.0,
                      return_count=False):
    """Deformable position-sensitive RoI pooling, the official DCN operator
    (``DeformablePSROIPooling``; DCNv2's ``dcn_v2_pooling``), differentiable in
    input and trans (not in rois). docs/semantics.md §4.

    Args:
        input: (N, output_dim*group_size**2, H, W) tensor.
        rois: (R, 5) tensor of the input's dtype, ``[batch_index, x1, y1, x2, y2]``.
        trans: (R, 2*num_classes, part, part) tensor (x at channel ``2*cls``, y
            at ``2*cls + 1``) or None (no_trans).
        spatial_scale, output_dim (None: ``C // group_size**2``), group_size,
        pooled_size, part_size (0: pooled_size), sample_per_part, trans_std:
            the operator's parameters.
        return_count: also return the samples counted per output element.

    Returns:
        (R, output_dim, pooled_size, pooled_size) tensor, and with
        ``return_count`` a pair (output, count), count of that shape in the
        accumulation dtype (float32 for float16/bfloat16), not differentiable.
    """
    _check_tensors(dict(input=input, rois=rois), dict(trans=trans))
    _check_eagerly(_validation.check_deform_psroi_pool, input, rois, trans, spatial_scale,
                   output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
                   check_batch=False)
    if not torch.jit.is_scripting():  # the ONNX exporters' hook (cupydcn/torch/_onnx.py)
        if _torch_onnx.exporting():
            return _torch_onnx.deform_psroi_pool(input, rois, trans, spatial_scale,
                                                 output_dim, group_size, pooled_size, part_size,
                                                 sample_per_part, trans_std, return_count)
    out, count = torch.ops.cupydcn.deform_psroi_pool(
        input, rois, trans, float(spatial_scale), None if output_dim is None else int(output_dim),
        int(group_size), int(pooled_size), int(part_size), int(sample_per_part),
        float(trans_std))
    return (out, count) if return_count else out


# --------------------------------------------------------------------------
# Modules: deformable convolution
# --------------------------------------------------------------------------


def _conv_parameters(module, in_channels, out_channels, kernel_size, stride, padding, dilation,
                     groups, bias):
    """The geometry attributes, ``weight`` (out, in/groups, kh, kw) and ``bias``
    (out,) or None that torchvision's and mmcv's deformable conv modules share
    (uninitialised: each module initialises them its library's way)."""
    for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
        if channels % groups != 0:
            raise _validation.ArgumentError(
                f"{name} = {channels} must be divisible by groups = {groups}")
    module.in_channels = in_channels
    module.out_channels = out_channels
    module.kernel_size = _pair(kernel_size)
    module.stride = _pair(stride)
    module.padding = _pair(padding)
    module.dilation = _pair(dilation)
    module.groups = groups
    module.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                             *module.kernel_size))
    if bias:
        module.bias = nn.Parameter(torch.empty(out_channels))
    else:
        module.register_parameter("bias", None)


class DeformConv2d(nn.Module):
    """Mirrors ``torchvision.ops.DeformConv2d``: same constructor, parameters
    (``weight`` (out, in/groups, kh, kw), ``bias`` (out,) or None), state_dict
    keys and initialisation (kaiming-uniform with a=sqrt(5), bias uniform in
    +-1/sqrt(fan_in)). Offsets (and the optional DCNv2 mask) are inputs of
    ``forward(input, offset, mask=None)``; offset groups come from their shape.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__()
        _conv_parameters(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input, offset, mask=None):
        """input (B, C, H, W), offset (B, 2*dg*kh*kw, Ho, Wo), mask
        (B, dg*kh*kw, Ho, Wo) or None -> (B, out_channels, Ho, Wo)."""
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, mask=mask)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s


class _MMCVDeformConv2d(nn.Module):
    """The part mmcv's DeformConv2d and ModulatedDeformConv2d share."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                 groups, deform_groups, bias, deformable_groups=None):
        super().__init__()
        _conv_parameters(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)
        if deformable_groups is not None:  # mmcv's older name, accepted where mmcv accepts it
            if deform_groups not in (1, deformable_groups):
                raise _validation.ArgumentError(
                    f"deformable_groups is mmcv's older name for deform_groups: give one, got "
                    f"deform_groups={deform_groups!r} and deformable_groups={deformable_groups!r}")
            deform_groups = deformable_groups
        self.deform_groups = deform_groups
        # nn.Conv2d compatibility, as mmcv
        self.transposed = False
        self.output_padding = (0,)

    def _conv_offset(self, per_tap):
        kh, kw = self.kernel_size
        conv = nn.Conv2d(self.in_channels, self.deform_groups * per_tap * kh * kw,
                         kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                         dilation=self.dilation, bias=True)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, deform_groups={self.deform_groups}, "
                f"bias={self.bias is not None}")


class DeformConv2dPack(_MMCVDeformConv2d):
    """Mirrors ``mmcv.ops.DeformConv2dPack`` (registered in mmcv as ``DCN``):
    a DCNv1 layer that predicts its own offsets with ``conv_offset``, an
    ``nn.Conv2d(in_channels, deform_groups*2*kh*kw)`` of the layer's geometry,
    zero-initialised, so the layer starts as a plain convolution.

    Constructor and state_dict keys are mmcv's (``weight``,
    ``conv_offset.weight``, ``conv_offset.bias``; with ``bias=True``, which
    mmcv refuses and cupydcn supports, also ``bias``); ``weight`` is
    initialised as mmcv 2.x does (kaiming-uniform, relu gain). ``im2col_step``
    is accepted and ignored: cupydcn chunks by ``cupydcn.set_workspace_limit``;
    ``deformable_groups=``, mmcv's older name for ``deform_groups``, is accepted.
    ``forward(x)``: (B, C, H, W) -> (B, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=False, im2col_step=32, *,
                 deformable_groups=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deform_groups, bias, deformable_groups=deformable_groups)
        self.im2col_step = im2col_step
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.conv_offset = self._conv_offset(2)

    def forward(self, x):
        offset = self.conv_offset(x)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation)


class ModulatedDeformConv2dPack(_MMCVDeformConv2d):
    """Mirrors ``mmcv.ops.ModulatedDeformConv2dPack`` (mmcv's ``DCNv2``): a
    DCNv2 layer whose ``conv_offset``, an ``nn.Conv2d(in_channels,
    deform_groups*3*kh*kw)`` of the layer's geometry, zero-initialised,
    predicts offsets and a mask: its output is split in three along channels,
    the first two thirds are the offsets, the last goes through a sigmoid.

    Constructor and state_dict keys are mmcv's (``weight``, ``bias``,
    ``conv_offset.weight``, ``conv_offset.bias``), as is the initialisation
    (weight uniform in +-1/sqrt(in_channels*kh*kw), bias 0). At init the mask
    is 0.5 everywhere and the offsets 0. ``deformable_groups=``, mmcv's older
    name for ``deform_groups``, is accepted. ``forward(x)``: (B, C, H, W) ->
    (B, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=True, *, deformable_groups=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deform_groups, bias, deformable_groups=deformable_groups)
        stdv = 1.0 / math.sqrt(in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.conv_offset = self._conv_offset(3)

    def forward(self, x):
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask=torch.sigmoid(mask))


# --------------------------------------------------------------------------
# Modules: deformable RoI pooling
# --------------------------------------------------------------------------


class DeformRoIPool(nn.Module):
    """Mirrors ``mmcv.ops.DeformRoIPool``: same constructor
    ``(output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1)``, no
    parameters; ``forward(input, rois, offset=None)``: input (N, C, H, W), rois
    (R, 5), offset (R, 2, ph, pw) -> (R, C, ph, pw)."""

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(self, input, rois, offset=None):
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma)

    def extra_repr(self):
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")


def _mmcv_fc(in_features, hidden, out_features, layers):
    """mmcv's offset_fc (3 Linear layers) / mask_fc (2 Linear layers and a
    Sigmoid): Linear and in-place ReLU alternating, the last Linear zeroed."""
    modules = [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
    if layers == 3:
        modules += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
    modules.append(nn.Linear(hidden, out_features))
    nn.init.zeros_(modules[-1].weight)
    nn.init.zeros_(modules[-1].bias)
    return modules


class DeformRoIPoolPack(DeformRoIPool):
    """Mirrors ``mmcv.ops.DeformRoIPoolPack``: pools once without offsets,
    predicts per-bin offsets from that with ``offset_fc`` (Linear(ph*pw*C,
    fc) - ReLU - Linear(fc, fc) - ReLU - Linear(fc, ph*pw*2), the last layer
    zero-initialised), then pools again with them. Same constructor
    ``(output_size, output_channels, deform_fc_channels=1024,
    spatial_scale=1.0, sampling_ratio=0, gamma=0.1)`` and state_dict keys
    (``offset_fc.{0,2,4}.{weight,bias}``). ``forward(input, rois)``:
    input (N, output_channels, H, W), rois (R, 5) -> (R, output_channels, ph, pw).
    """

    def __init__(self, output_size, output_channels, deform_fc_channels=1024, spatial_scale=1.0,
                 sampling_ratio=0, gamma=0.1):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        ph, pw = self.output_size
        self.offset_fc = nn.Sequential(
            *_mmcv_fc(ph * pw * output_channels, deform_fc_channels, ph * pw * 2, layers=3))

    def _check_channels(self, input):
        if input.shape[1] != self.output_channels:
            raise _validation.ArgumentError(f"input.shape[1] must be output_channels = "
                                            f"{self.output_channels}, got {input.shape[1]}")

    def _pool_and_offset(self, input, rois):
        self._check_channels(input)
        x = deform_roi_pool(input, rois, None, self.output_size, self.spatial_scale,
                            self.sampling_ratio, self.gamma)
        x = x.reshape(rois.shape[0], -1)
        offset = self.offset_fc(x).reshape(rois.shape[0], 2, *self.output_size)
        return x, offset

    def forward(self, input, rois):
        _, offset = self._pool_and_offset(input, rois)
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma)


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """Mirrors ``mmcv.ops.ModulatedDeformRoIPoolPack``: as
    :class:`DeformRoIPoolPack`, plus ``mask_fc`` (Linear(ph*pw*C, fc) - ReLU -
    Linear(fc, ph*pw) - Sigmoid, the last Linear zero-initialised, so the mask
    starts at 0.5) whose (R, 1, ph, pw) output multiplies the pooled result.
    Same constructor and state_dict keys as mmcv (``offset_fc.{0,2,4}.*``,
    ``mask_fc.{0,2}.*``).
    """

    def __init__(self, output_size, output_channels, deform_fc_channels=1024, spatial_scale=1.0,
                 sampling_ratio=0, gamma=0.1):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale,
                         sampling_ratio, gamma)
        ph, pw = self.output_size
        self.mask_fc = nn.Sequential(
            *_mmcv_fc(ph * pw * output_channels, deform_fc_channels, ph * pw, layers=2),
            nn.Sigmoid())

    def forward(self, input, rois):
        x, offset = self._pool_and_offset(input, rois)
        mask = self.mask_fc(x).reshape(rois.shape[0], 1, *self.output_size)
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma, mask=mask)


class DeformPSRoIPool(nn.Module):
    """Mirrors ``DCNv2Pooling`` of the DCNv2 repository (the PyTorch port of
    the official DCN ``DeformablePSROIPooling``): same constructor
    ``(spatial_scale, pooled_size, output_dim, no_trans, group_size=1,
    part_size=None, sample_per_part=4, trans_std=0.0)``, no parameters.
    ``forward(input, rois, offset=None)``: input (N, output_dim*group_size**2,
    H, W), rois (R, 5), offset (the trans, (R, 2*num_classes, part, part),
    ignored when ``no_trans``) -> (R, output_dim, pooled_size, pooled_size).
    """

    def __init__(self, spatial_scale, pooled_size, output_dim, no_trans, group_size=1,
                 part_size=None, sample_per_part=4, trans_std=0.0):
        super().__init__()
        self.spatial_scale = spatial_scale
        self.pooled_size = pooled_size
        self.output_dim = output_dim
        self.no_trans = no_trans
        self.group_size = group_size
        self.part_size = pooled_size if part_size is None else part_size
        self.sample_per_part = sample_per_part
        self.trans_std = trans_std

    def forward(self, input, rois, offset=None):
        trans = None if self.no_trans else offset
        if trans is None and not self.no_trans:
            raise _validation.ArgumentError(
                "offset (the trans) is required when no_trans is False")
        return deform_psroi_pool(input, rois, trans, self.spatial_scale, self.output_dim,
                                 self.group_size, self.pooled_size, self.part_size,
                                 self.sample_per_part, self.trans_std)

    def extra_repr(self):
        return (f"spatial_scale={self.spatial_scale}, pooled_size={self.pooled_size}, "
                f"output_dim={self.output_dim}, no_trans={self.no_trans}, "
                f"group_size={self.group_size}, part_size={self.part_size}, "
                f"sample_per_part={self.sample_per_part}, trans_std={self.trans_std}")
