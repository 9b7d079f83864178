"""JAX bridge: cupydcn's ops as JAX functions with ``jax.custom_vjp``.

:func:`deform_conv2d`, :func:`deform_roi_pool` and :func:`deform_psroi_pool`
take and return ``jax.Array`` (NCHW, the core's signatures and meanings) and
work under ``jax.jit``, ``jax.grad`` (reverse mode; ``jax.jvp`` is not
defined) and ``jax.vmap``. Only buffer exchange and autograd live here: each
op runs the array-in, array-out core (``cupydcn.deform_conv2d`` and friends)
inside a ``jax.experimental.buffer_callback``, which hands the callback XLA's
own buffers:

* on a GPU, the buffers become CuPy arrays on the same device memory (no copy)
  and the core runs its CUDA kernels on XLA's stream (the one the callback is
  given), so the op is ordered with the rest of the jitted program, and
  writes its results straight into the output buffers XLA allocated
  (``cupydcn._arrays.output_allocator``: no copy). The core's temporaries
  come from CuPy's memory pool, next to XLA's: give CuPy room
  (``XLA_PYTHON_CLIENT_PREALLOCATE=false``, or a
  ``XLA_PYTHON_CLIENT_MEM_FRACTION`` below the default 0.75);
* on the CPU, the buffers become NumPy arrays (no copy) and the core runs
  its CPU backend (``cupydcn.set_cpu_backend``), writing into XLA's output
  buffers the same way.

Every op takes ``algorithm=None`` (the automatic choice) or the name of one
of ``cupydcn.algorithms(op)``, used by the forward and the backward; a name
that does not exist raises ``cupydcn.ArgumentError`` at the call.

Shapes and dtypes are checked by ``cupydcn._validation`` when the function
is traced (they are static under ``jit``), so a mistake raises the core's
ValueError or TypeError at the call. What depends on values (a RoI batch
index outside ``[0, N)``) is checked by the core when the program runs and
surfaces as a ``jax.errors.JaxRuntimeError`` carrying the core's message.

``jax.vmap``: the deformable convolution folds a vmapped axis into the batch
(one core call for the vmapped batch) when the weight and bias are not
vmapped and ``input``, ``offset`` and ``mask`` all are, for the forward and
the input, offset and mask gradients; otherwise (a vmapped weight, an
unbatched offset, the per-example weight and bias gradients) and for the RoI
ops, it runs the core once per vmapped element inside one callback. Every
argument may be vmapped, nested ``vmap`` included.

Dtypes: float32, float16, bfloat16 (``jnp.bfloat16``), and float64 when JAX
runs with ``jax_enable_x64``. Gradients of rois are zero.

Example:
    >>> import jax, jax.numpy as jnp, cupydcn.jax as dcn
    >>> x = jnp.ones((2, 8, 16, 16)); offset = jnp.zeros((2, 18, 16, 16))
    >>> w = jnp.ones((4, 8, 3, 3)) * 0.1
    >>> y = jax.jit(lambda x, o, w: dcn.deform_conv2d(x, o, w, padding=1))(x, offset, w)
    >>> gx, gw = jax.grad(lambda x, w: dcn.deform_conv2d(x, offset, w, padding=1).sum(),
    ...                   argnums=(0, 1))(x, w)
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy

from cupydcn import _arrays, _deform_conv, _ops, _roi_pool, _validation

try:
    from jax.experimental.buffer_callback import buffer_callback
except ImportError as error:  # pragma: no cover - depends on the installed JAX
    raise ImportError(f"cupydcn.jax needs jax.experimental.buffer_callback (JAX >= 0.7; "
                      f"this is JAX {jax.__version__})") from error

__all__ = ["deform_conv2d", "deform_psroi_pool", "deform_roi_pool"]

_DL_CPU = 1


# --------------------------------------------------------------------------
# XLA buffers as core arrays, on XLA's device and stream
# --------------------------------------------------------------------------


def _cupy():
    import cupy

    return cupy


def _core_array(buffer):
    """A NumPy (CPU) or CuPy (CUDA) array on an XLA buffer's memory, no copy.

    On the GPU the array is built from the buffer's pointer, shape and dtype
    (the CUDA array interface's pointer only), so every dtype crosses as it is,
    bfloat16 included."""
    if buffer is None:
        return None
    if int(buffer.__dlpack_device__()[0]) == _DL_CPU:
        return numpy.asarray(buffer)
    cupy = _cupy()
    shape, dtype = tuple(buffer.shape), numpy.dtype(buffer.dtype)
    if not math.prod(shape):
        return cupy.empty(shape, dtype)  # nothing to share (XLA may give it no address)
    pointer = buffer.__cuda_array_interface__["data"][0]
    memory = cupy.cuda.UnownedMemory(pointer, math.prod(shape) * dtype.itemsize, buffer,
                                     int(buffer.__dlpack_device__()[1]))
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))


def _store(out, result):
    """Copy the core's ``result`` into ``out``, a view of an output buffer, on
    the current stream; a byte copy, so every dtype is copied as it is (only
    for a result the core did not write into its buffer, see
    :meth:`_Callback._write`)."""
    if result.shape != out.shape or result.dtype != out.dtype:  # a bridge bug, never the user's
        raise AssertionError(f"core result {result.dtype}{result.shape} does not fit the output "
                             f"buffer {out.dtype}{out.shape}")
    if isinstance(out, numpy.ndarray):
        numpy.copyto(out, result)
    elif out.size:
        result = _cupy().ascontiguousarray(result)
        out.data.copy_from_device_async(result.data, out.nbytes)


class _StreamHandle:
    """A CUDA stream pointer under the CUDA stream protocol."""

    def __init__(self, ptr):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


@contextlib.contextmanager
def _scope(ctx, buffer):
    """The core's device and stream for a callback: for a CUDA buffer, its
    device current and XLA's stream as CuPy's current stream."""
    if int(buffer.__dlpack_device__()[0]) == _DL_CPU:
        yield
        return
    cupy = _cupy()
    with cupy.cuda.Device(int(buffer.__dlpack_device__()[1])):
        # made with the device current: a CuPy stream belongs to the current device
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        stream = (from_external(_StreamHandle(ctx.stream)) if from_external is not None
                  else cupy.cuda.ExternalStream(ctx.stream))  # CuPy < 14
        with stream:
            yield


class _Callback:
    """A core function as a JAX primitive, run on XLA's buffers.

    ``function(*arrays)`` (NumPy or CuPy arrays, None allowed) returns a tuple
    of arrays, one per result. ``ranks`` gives each argument's rank. Under
    ``vmap`` the buffers gain leading axes (``vmap_method="expand_dims"``:
    size 1 for an argument that is not vmapped); the arguments at
    ``per_sample`` carry the batch on their first axis, and when all of them
    are vmapped and the others are not, the leading axes are folded into the
    batch (one call); otherwise the function runs once per vmapped element.
    """

    def __init__(self, function, ranks, per_sample=None):
        self.function = function
        self.ranks = ranks
        self.per_sample = per_sample

    def __call__(self, results, *args):
        return buffer_callback(self._run, tuple(results), vmap_method="expand_dims")(*args)

    def _run(self, ctx, outs, *buffers):
        position, first = next((i, b) for i, b in enumerate(buffers) if b is not None)
        with _scope(ctx, first):
            arrays = [_core_array(b) for b in buffers]
            outs = [_core_array(b) for b in outs]
            lead = outs[0].shape[:first.ndim - self.ranks[position]]
            if not lead:
                self._write(outs, arrays)
            elif self._foldable(arrays, lead):
                self._folded(arrays, outs, lead)
            else:
                for index in numpy.ndindex(*lead):
                    self._write([o[index] for o in outs], [_element(a, index) for a in arrays])

    def _write(self, outs, arrays):
        """``function(*arrays)`` with its results in ``outs`` (views of XLA's
        output buffers): the core allocates each result as the next unused
        buffer of its shape and dtype, so it writes there itself. A result
        that ends up elsewhere (the core allocated its results in another
        order than ``outs``, or converted one) is copied into place."""
        pending = list(range(len(outs)))

        def allocate(shape, dtype):
            for i in pending:
                if outs[i].shape == shape and outs[i].dtype == dtype:
                    pending.remove(i)
                    return i, outs[i]
            xp = numpy if isinstance(outs[0], numpy.ndarray) else _cupy()
            return "temporary", xp.empty(shape, dtype)

        with _arrays.output_allocator(allocate) as owner:
            results = self.function(*arrays)
            if len(outs) != len(results):  # a bridge bug, never the user's
                raise AssertionError(f"{len(results)} core results for {len(outs)} outputs")
            places = [owner(r) for r in results]
        # a result in another output's buffer moves out before any copy overwrites it
        results = [r.copy() if isinstance(p, int) and p != i else r
                   for i, (r, p) in enumerate(zip(results, places))]
        for i, (out, result, place) in enumerate(zip(outs, results, places)):
            if place != i:
                _store(out, result)

    def _foldable(self, arrays, lead):
        if self.per_sample is None:
            return False
        for i, a in enumerate(arrays):
            if a is not None:
                expected = lead if i in self.per_sample else (1,) * len(lead)
                if a.shape[:len(lead)] != expected:
                    return False
        return True

    def _folded(self, arrays, outs, lead):
        n = len(lead)
        folded = [None if a is None else
                  a.reshape(-1, *a.shape[n + 1:]) if i in self.per_sample else
                  a.reshape(a.shape[n:])
                  for i, a in enumerate(arrays)]
        self._write([o.reshape(-1, *o.shape[n + 1:]) for o in outs], folded)


def _element(array, index):
    """``array`` at the vmapped ``index`` (axes of size 1 are not vmapped)."""
    if array is None:
        return None
    return array[tuple(i if size > 1 else 0 for i, size in zip(index, array.shape))]


def _array(x):
    return None if x is None else jnp.asarray(x)


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), numpy.dtype(dtype))


# --------------------------------------------------------------------------
# Deformable convolution
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _conv_op(stride, padding, dilation, algorithm):
    """The custom_vjp function of deform_conv2d for one geometry (cached, so
    that eager calls reuse their compiled callbacks)."""
    params = dict(stride=stride, padding=padding, dilation=dilation)

    def forward(input, offset, weight, bias, mask):
        return (_deform_conv.deform_conv2d(input, offset, weight, bias, mask=mask,
                                           algorithm=algorithm, **params),)

    def data_grads(grad_output, input, offset, weight, mask):
        grads = _deform_conv.deform_conv2d_backward(
            grad_output, input, offset, weight, None, mask=mask,
            wrt=("input", "offset") + (() if mask is None else ("mask",)), algorithm=algorithm,
            **params)
        return tuple(g for g in (grads.input, grads.offset, grads.mask) if g is not None)

    def parameter_grads(grad_output, input, offset, weight, bias, mask):
        grads = _deform_conv.deform_conv2d_backward(
            grad_output, input, offset, weight, bias, mask=mask,
            wrt=("weight",) + (() if bias is None else ("bias",)), algorithm=algorithm, **params)
        return tuple(g for g in (grads.weight, grads.bias) if g is not None)

    forward_call = _Callback(forward, (4, 4, 4, 1, 4), per_sample=(0, 1, 4))
    # the two halves of the backward are separate callbacks, so that XLA drops
    # the one whose gradients are not used (frozen weights, or a fixed input)
    data_call = _Callback(data_grads, (4, 4, 4, 4, 4), per_sample=(0, 1, 2, 4))
    parameter_call = _Callback(parameter_grads, (4, 4, 4, 4, 1, 4))

    def primal(input, offset, weight, bias, mask):
        geo = _validation.check_deform_conv2d(input, offset, weight, bias, mask=mask, **params)
        shape = (geo.B, geo.Cout, geo.Ho, geo.Wo)
        return forward_call([_spec(shape, input.dtype)], input, offset, weight, bias, mask)[0]

    def op_forward(input, offset, weight, bias, mask):
        return primal(input, offset, weight, bias, mask), (input, offset, weight, bias, mask)

    def op_backward(saved, grad_output):
        input, offset, weight, bias, mask = saved
        data = data_call([_spec(a.shape, a.dtype) for a in (input, offset, mask) if a is not None],
                         grad_output, input, offset, weight, mask)
        parameters = parameter_call([_spec(a.shape, a.dtype) for a in (weight, bias)
                                     if a is not None],
                                    grad_output, input, offset, weight, bias, mask)
        grad_input, grad_offset, *grad_mask = data
        grad_weight, *grad_bias = parameters
        return (grad_input, grad_offset, grad_weight, grad_bias[0] if grad_bias else None,
                grad_mask[0] if grad_mask else None)

    # the forward rule calls primal, not op: a custom_vjp function calling
    # itself there fails under jit(grad(vmap)) with NumPy arguments (JAX 0.10)
    op = jax.custom_vjp(primal)
    op.defvjp(op_forward, op_backward)
    return op


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None,
                  algorithm=None):
    """Deformable convolution (DCNv1), or modulated (DCNv2) with ``mask``:
    ``torchvision.ops.deform_conv2d``'s arguments and numbers (docs/semantics.md
    §2) on JAX arrays, differentiable in all five arrays.

    ``out[b, o] = bias[o] + sum_{c, i, j} weight[o, c, i, j] * mask[b, g, k]
    * bilinear(input[b, c], p + (i, j) * dilation + offset[b, g, k])``.

    Args:
        input: (B, C, H, W) array.
        offset: (B, 2*offset_groups*kh*kw, Ho, Wo) array, (dy, dx) interleaved per tap.
        weight: (Cout, C/groups, kh, kw) array.
        bias: (Cout,) array or None.
        stride, padding, dilation: int or (h, w) pair.
        mask: (B, offset_groups*kh*kw, Ho, Wo) array or None (DCNv1).
        algorithm: None (the automatic choice) or the name of one of
            ``cupydcn.algorithms("deform_conv2d")``, forward and backward.

    Returns:
        (B, Cout, Ho, Wo) ``jax.Array`` of the input's dtype and device.

    Example:
        >>> y = jax.jit(cupydcn.jax.deform_conv2d, static_argnames="padding")(
        ...     x, offset, w, padding=1)
    """
    stride = _validation.pair(stride, "stride", 1)
    padding = _validation.pair(padding, "padding", 0)
    dilation = _validation.pair(dilation, "dilation", 1)
    _ops.SPECS["deform_conv2d"].check_algorithm(algorithm)
    input, offset, weight, bias, mask = map(_array, (input, offset, weight, bias, mask))
    return _conv_op(stride, padding, dilation, algorithm)(input, offset, weight, bias, mask)


# --------------------------------------------------------------------------
# Deformable RoI pooling
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _roi_op(output_size, spatial_scale, sampling_ratio, gamma, algorithm):
    params = dict(output_size=output_size, spatial_scale=spatial_scale,
                  sampling_ratio=sampling_ratio, gamma=gamma)

    def forward(input, rois, offset, mask):
        return (_roi_pool.deform_roi_pool(input, rois, offset, mask=mask, algorithm=algorithm,
                                          **params),)

    def backward(grad_output, input, rois, offset, mask):
        grads = _roi_pool.deform_roi_pool_backward(grad_output, input, rois, offset, mask=mask,
                                                   algorithm=algorithm, **params)
        return tuple(g for g in grads if g is not None)

    forward_call = _Callback(forward, (4, 2, 4, 4))
    backward_call = _Callback(backward, (4, 4, 2, 4, 4))

    def primal(input, rois, offset, mask):
        geo = _validation.check_deform_roi_pool(input, rois, offset, mask=mask, check_batch=False,
                                                **params)
        shape = (geo.R, geo.C, geo.ph, geo.pw)
        return forward_call([_spec(shape, input.dtype)], input, rois, offset, mask)[0]

    def op_forward(input, rois, offset, mask):
        return primal(input, rois, offset, mask), (input, rois, offset, mask)

    def op_backward(saved, grad_output):
        input, rois, offset, mask = saved
        grads = iter(backward_call([_spec(a.shape, a.dtype) for a in (input, offset, mask)
                                    if a is not None], grad_output, input, rois, offset, mask))
        return (next(grads), None, None if offset is None else next(grads),
                None if mask is None else next(grads))

    # the forward rule calls primal, not op: a custom_vjp function calling
    # itself there fails under jit(grad(vmap)) with NumPy arguments (JAX 0.10)
    op = jax.custom_vjp(primal)
    op.defvjp(op_forward, op_backward)
    return op


def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0,
                    gamma=0.1, mask=None, algorithm=None):
    """Deformable RoI pooling, RoIAlign style (mmcv's ``deform_roi_pool``),
    modulated when ``mask`` is given; differentiable in input, offset and mask
    (the gradient of rois is zero). docs/semantics.md §3.

    Args:
        input: (N, C, H, W) array.
        rois: (R, 5) array of the input's dtype, rows ``[batch_index, x1, y1, x2, y2]``.
        offset: (R, 2, ph, pw) array (channel 0 moves x, channel 1 moves y) or None.
        output_size: int or (ph, pw).
        spatial_scale: image -> feature map scale.
        sampling_ratio: samples per bin per axis, 0 = adaptive.
        gamma: the offset scale.
        mask: (R, 1, ph, pw) array multiplying the output, or None.
        algorithm: None (the automatic choice) or the name of one of
            ``cupydcn.algorithms("deform_roi_pool")``, forward and backward.

    Returns:
        (R, C, ph, pw) ``jax.Array``. Without offset and mask this equals
        ``torchvision.ops.roi_align(..., aligned=True)``.
    """
    input, rois, offset, mask = map(_array, (input, rois, offset, mask))
    geo = _validation.check_deform_roi_pool(input, rois, offset, output_size, spatial_scale,
                                            sampling_ratio, gamma, mask, check_batch=False)
    _ops.SPECS["deform_roi_pool"].check_algorithm(algorithm)
    op = _roi_op((geo.ph, geo.pw), geo.spatial_scale, geo.sampling_ratio, geo.gamma, algorithm)
    return op(input, rois, offset, mask)


@functools.lru_cache(maxsize=None)
def _psroi_op(spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part,
              trans_std, algorithm):
    params = dict(spatial_scale=spatial_scale, output_dim=output_dim, group_size=group_size,
                  pooled_size=pooled_size, part_size=part_size, sample_per_part=sample_per_part,
                  trans_std=trans_std)

    def forward(input, rois, trans):
        return _roi_pool.deform_psroi_pool(input, rois, trans, return_count=True,
                                           algorithm=algorithm, **params)

    def backward(grad_output, count, input, rois, trans):
        grads = _roi_pool.deform_psroi_pool_backward(grad_output, input, rois, trans, count,
                                                     algorithm=algorithm, **params)
        return tuple(g for g in grads if g is not None)

    forward_call = _Callback(forward, (4, 2, 4))
    backward_call = _Callback(backward, (4, 4, 4, 2, 4))

    def primal(input, rois, trans):
        geo = _validation.check_deform_psroi_pool(input, rois, trans, check_batch=False,
                                                  **params)
        shape = (geo.R, geo.output_dim, geo.pooled_size, geo.pooled_size)
        return tuple(forward_call([_spec(shape, input.dtype), _spec(shape, geo.dtype.acc)],
                                  input, rois, trans))

    def op_forward(input, rois, trans):
        out, count = primal(input, rois, trans)
        return (out, count), (input, rois, trans, count)

    def op_backward(saved, cotangents):
        input, rois, trans, count = saved
        grads = iter(backward_call([_spec(a.shape, a.dtype) for a in (input, trans)
                                    if a is not None], cotangents[0], count, input, rois, trans))
        return (next(grads), None, None if trans is None else next(grads))

    # the forward rule calls primal, not op: a custom_vjp function calling
    # itself there fails under jit(grad(vmap)) with NumPy arguments (JAX 0.10)
    op = jax.custom_vjp(primal)
    op.defvjp(op_forward, op_backward)
    return op


def deform_psroi_pool(input, rois, trans=None, spatial_scale=1.0, output_dim=None, group_size=1,
                      pooled_size=7, part_size=0, sample_per_part=4, trans_std=0.0,
                      return_count=False, algorithm=None):
    """Deformable position-sensitive RoI pooling, the official DCN operator
    (``DeformablePSROIPooling``; DCNv2's ``dcn_v2_pooling``), differentiable in
    input and trans (the gradient of rois is zero). docs/semantics.md §4.

    Args:
        input: (N, output_dim*group_size**2, H, W) array.
        rois: (R, 5) array of the input's dtype, ``[batch_index, x1, y1, x2, y2]``.
        trans: (R, 2*num_classes, part, part) array (x at channel ``2*cls``, y
            at ``2*cls + 1``) or None (no_trans).
        spatial_scale, output_dim (None: ``C // group_size**2``), group_size,
        pooled_size, part_size (0: pooled_size), sample_per_part, trans_std:
            the operator's parameters.
        return_count: also return the samples counted per output element.
        algorithm: None (the automatic choice) or the name of one of
            ``cupydcn.algorithms("deform_psroi_pool")``, forward and backward.

    Returns:
        (R, output_dim, pooled_size, pooled_size) ``jax.Array``, and with
        ``return_count`` a pair (output, count), count of that shape in the
        accumulation dtype (float32 for float16/bfloat16), not differentiated.
    """
    input, rois, trans = map(_array, (input, rois, trans))
    geo = _validation.check_deform_psroi_pool(input, rois, trans, spatial_scale, output_dim,
                                              group_size, pooled_size, part_size,
                                              sample_per_part, trans_std, check_batch=False)
    _ops.SPECS["deform_psroi_pool"].check_algorithm(algorithm)
    op = _psroi_op(geo.spatial_scale, geo.output_dim, geo.group_size, geo.pooled_size,
                   geo.part_size, geo.sample_per_part, geo.trans_std, algorithm)
    out, count = op(input, rois, trans)
    return (out, count) if return_count else out

