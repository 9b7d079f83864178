"""TensorFlow bridge: cupydcn's ops as differentiable TensorFlow functions.

Only DLPack and autograd live here (no numerics): each op hands its tensors to
the array-in, array-out core (``cupydcn.deform_conv2d`` and friends) and wires
the core's explicit backward into ``tf.custom_gradient``. The ops are built
from their declarations in ``cupydcn._ops`` (arrays, parameters, gradients,
layouts, outputs), one generic wrapper for all; each takes the op's
arguments, then ``data_format`` and ``algorithm`` (None, or a name from
``cupydcn.algorithms(op)``, for the forward and the backward).

* GPU tensors go to CuPy without a copy through a DLPack capsule
  (``tf.experimental.dlpack.to_dlpack`` -> ``cupy.from_dlpack``) and results come
  back the same way. TensorFlow's DLPack export has no stream handshake, so the
  bridge waits for TensorFlow's pending GPU work before the kernels read its
  tensors and for CuPy's stream before TensorFlow reads the results.
* CPU tensors go to the core's CPU backend (``cupydcn.set_cpu_backend``)
  without a copy (``numpy.from_dlpack`` of the tensor); results return
  through a NumPy DLPack capsule when their memory has the 64-byte alignment
  TensorFlow's kernels need, else as a copy.
* bfloat16, which neither NumPy nor CuPy import through DLPack, travels as its
  uint16 bit pattern (``tf.bitcast``) and is viewed as ``ml_dtypes.bfloat16``.
* Inside ``tf.function`` (Keras ``model.fit``) the core runs in a
  ``tf.py_function``; such graphs cannot be XLA-compiled.

Layouts: ``data_format="channels_last"`` (the default, TensorFlow's NHWC) or
``"channels_first"`` (NCHW). The core takes NCHW *shapes*: a channels_last
tensor crosses as its NHWC memory and is handed over as a transposed view (a
channels-last array, no copy), and the results come back through the inverse
view. deform_conv2d keeps its input's memory format (on the GPU the automatic
choice runs ``im2col_nhwc``, which reads and writes NHWC memory: no transpose
anywhere); the RoI poolings' kernels are NCHW and copy to and from that layout
inside the core, as a transpose here would. Weights are always in torchvision's layout
``(Cout, C/groups, kh, kw)``, whatever the data format (``cupydcn.keras``
converts Keras's ``(kh, kw, C/groups, Cout)`` kernels). Numbers, offset
channel order and gradients are those of docs/semantics.md; validation messages are
the core's (shapes named in NCHW terms).

Example:
    >>> import tensorflow as tf, cupydcn.tensorflow as dcn
    >>> x = tf.random.normal((2, 16, 16, 8))                  # NHWC
    >>> offset = tf.zeros((2, 16, 16, 2 * 3 * 3))              # (B, Ho, Wo, 2*dg*kh*kw)
    >>> w = tf.random.normal((4, 8, 3, 3))                     # (Cout, C/groups, kh, kw)
    >>> with tf.GradientTape() as tape:
    ...     tape.watch([x, offset, w])
    ...     y = dcn.deform_conv2d(x, offset, w, padding=1)      # (2, 16, 16, 4)
    >>> gx, goff, gw = tape.gradient(y, [x, offset, w])
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import numpy
import tensorflow as tf

from cupydcn import _ops, _validation

_DL_CUDA, _DL_CUDA_MANAGED = 2, 13
_TO_NCHW = (0, 3, 1, 2)
_TO_NHWC = (0, 2, 3, 1)
# TensorFlow's kernels assume tensor memory aligned to 64 bytes (Eigen) and abort
# the process otherwise; DLPack imports do not check, so results are checked here.
_ALIGNMENT = 64


# --------------------------------------------------------------------------
# DLPack exchange
# --------------------------------------------------------------------------


def _on_gpu(t):
    return int(t.__dlpack_device__()[0]) in (_DL_CUDA, _DL_CUDA_MANAGED)


def _bfloat16():
    import ml_dtypes

    return numpy.dtype(ml_dtypes.bfloat16)


def _to_core(t):
    """An eager tensor as a CuPy (GPU) or NumPy (CPU) array sharing its memory."""
    bits = t.dtype == tf.bfloat16
    source = tf.bitcast(t, tf.uint16) if bits else t
    if _on_gpu(t):
        # A capsule, not the tensor: TensorFlow's __dlpack__ refuses the stream
        # argument that cupy.from_dlpack passes.
        array = _cupy().from_dlpack(tf.experimental.dlpack.to_dlpack(source))
    else:
        array = numpy.from_dlpack(source)
    return array.view(_bfloat16()) if bits else array


def _from_core(a):
    """A core result (CuPy or NumPy array) as an eager tensor sharing its memory."""
    if a is None:
        return None
    xp = numpy if isinstance(a, numpy.ndarray) else _cupy()
    a = xp.ascontiguousarray(a)  # TensorFlow takes only compact row-major DLPack tensors
    bits = a.dtype == _bfloat16()
    if bits:
        a = a.view(numpy.uint16)
    if xp is numpy:
        if a.ctypes.data % _ALIGNMENT:
            t = tf.convert_to_tensor(a)  # a copy, which TensorFlow aligns
        else:
            t = tf.experimental.dlpack.from_dlpack(a.__dlpack__())
    else:
        if a.data.ptr % _ALIGNMENT:
            a = a.copy()  # CuPy's memory pool hands out aligned blocks
        # TensorFlow reads the result on its own stream: let CuPy's work finish.
        xp.cuda.get_current_stream().synchronize()
        t = tf.experimental.dlpack.from_dlpack(a.__dlpack__())
    return tf.bitcast(t, tf.bfloat16) if bits else t


def _cupy():
    import cupy

    return cupy


def _core_call(function, tensors):
    """``function`` applied to ``tensors`` (eager, None allowed) as core arrays;
    its result (an array, or a tuple of arrays and None) back as tensors."""
    present = [t for t in tensors if t is not None]
    if any(_on_gpu(t) for t in present):
        # DLPack export carries no stream: wait for TensorFlow's queued GPU work.
        tf.test.experimental.sync_devices()
    result = function(*(None if t is None else _to_core(t) for t in tensors))
    if isinstance(result, tuple):
        return [_from_core(r) for r in result]
    return _from_core(result)


def _run(function, tensors, dtypes, shapes):
    """``_core_call`` eagerly, or as a ``tf.py_function`` inside a graph.

    ``tensors`` holds no None; ``dtypes`` and ``shapes`` describe the outputs
    (a list: the function returns a list of tensors).
    """
    if tf.executing_eagerly():
        return _core_call(function, tensors)
    outputs = tf.py_function(lambda *ts: _core_call(function, ts), list(tensors), list(dtypes))
    for output, shape in zip(outputs, shapes):
        output.set_shape(shape)
    return outputs


def _differentiable(forward, backward, names, tensors, out_specs, constant=()):
    """A ``tf.custom_gradient`` op over the tensors that are not None; it
    returns the forward's first result.

    ``forward(**arrays)`` returns ``(output, *saved_arrays)``; ``out_specs``
    lists the ``(dtype, shape)`` of all of them. ``backward(grad_output,
    *saved_arrays, **arrays)`` returns a mapping from the names not in
    ``constant`` to gradient arrays; the ``constant`` ones (rois) get no
    gradient (None).
    """
    names = [n for n, t in zip(names, tensors) if t is not None]
    tensors = [t for t in tensors if t is not None]

    @tf.custom_gradient
    def op(*xs):
        def run_forward(*arrays):
            return tuple(forward(**dict(zip(names, arrays))))

        out, *kept = _run(run_forward, xs, [d for d, _ in out_specs], [s for _, s in out_specs])

        def grad(dy):
            def run_backward(dy_array, *arrays):
                g = backward(dy_array, *arrays[:len(kept)], **dict(zip(names, arrays[len(kept):])))
                return tuple(g[n] for n in wanted)

            wanted = [n for n in names if n not in constant]
            results = dict(zip(wanted, _run(
                run_backward, [dy, *kept, *xs],
                [x.dtype for n, x in zip(names, xs) if n in wanted],
                [x.shape for n, x in zip(names, xs) if n in wanted])))
            return [results.get(n) for n in names]

        return out, grad

    return op(*tensors)


# The ops are plain Python around custom_gradient and py_function: autograph,
# which tf.function applies to what it calls, need not rewrite them.
_plain_python = tf.autograph.experimental.do_not_convert


# --------------------------------------------------------------------------
# Layout and validation glue
# --------------------------------------------------------------------------


def _channels_last(data_format):
    if data_format not in ("channels_last", "channels_first"):
        raise _validation.ArgumentError(f"data_format must be 'channels_last' or "
                                        f"'channels_first', got {data_format!r}")
    return data_format == "channels_last"


_TENSOR = "a tf.Tensor (or what tf.convert_to_tensor takes)"


def _tensors(required, optional=()):
    """The tensor arguments as tensors by name (None stays None for the
    optional ones); a clear error for a missing or unconvertible one."""
    _validation.check_arrays(required, optional, expected=_TENSOR)
    converted = {}
    for name, x in (*required.items(), *dict(optional).items()):
        try:
            converted[name] = None if x is None else tf.convert_to_tensor(x)
        except (TypeError, ValueError) as error:
            raise _validation.ArgumentTypeError(
                f"{name} must be {_TENSOR}, got {_validation.type_name(x)} ({error})") from None
    return converted


def _channels_last_layout(layout):
    """An NCHW layout as NHWC: ``"(B, C, H, W)"`` -> ``"(B, H, W, C)"``."""
    first, channels, *spatial = _ops._symbols(layout)
    return f"({', '.join([first, *spatial, channels])})"


def _check_nhwc_rank(x, name, layout):
    """A channels_last tensor must be 4-D (checked where the rank is known)."""
    if x is not None and x.shape.rank is not None:
        known = tuple(-1 if d is None else d for d in x.shape.as_list())  # -1: unknown
        _validation.check_rank(_Spec(known, None), name, layout)


def _as_nchw(shape):
    """An NHWC shape (a tuple, None entries allowed; None) in NCHW order."""
    return None if shape is None else tuple(shape[i] for i in _TO_NCHW)


def _as_nhwc(shape):
    return None if shape is None else tuple(shape[i] for i in _TO_NHWC)


def _fully_defined(tensors):
    return all(t is None or t.shape.is_fully_defined() for t in tensors)


class _Spec(NamedTuple):
    """A tensor's shape and NumPy dtype, what the shared validation reads, so
    its messages name dtypes as they do for NumPy and CuPy arrays."""
    shape: tuple
    dtype: numpy.dtype


def _spec(t, nhwc=False):
    """``t``'s _Spec; with ``nhwc`` in NCHW terms (the core's view of it)."""
    if t is None:
        return None
    shape = tuple(t.shape.as_list())
    return _Spec(_as_nchw(shape) if nhwc else shape, numpy.dtype(t.dtype.as_numpy_dtype))


def _static_check(spec, nhwc, tensors, params):
    """The core's validation where the shapes are known (always in eager mode),
    so that errors surface at the call; in NCHW terms for the channels_last
    tensors (the names in ``nhwc``)."""
    try:
        return spec.check_shapes(**{n: _spec(t, n in nhwc) for n, t in tensors.items()},
                                 **params)
    except (TypeError, ValueError) as error:
        if nhwc:
            raise type(error)(f"{error} (shapes in NCHW terms: the core views the "
                              "channels_last arrays as NCHW)") from error
        raise


def _shape(t, nhwc=False):
    if t is None or t.shape.rank is None:
        return None
    shape = tuple(t.shape.as_list())
    return _as_nchw(shape) if nhwc else shape


def _views(arrays, names, order):
    """``arrays`` by name with those in ``names`` transposed to ``order`` (a view)."""
    return {n: a.transpose(order) if n in names and a is not None else a
            for n, a in arrays.items()}


# --------------------------------------------------------------------------
# The ops, built from their specs (cupydcn._ops)
# --------------------------------------------------------------------------

# The bridge's own arguments, after each op's: name -> default.
_OPTIONS = {"data_format": "channels_last", "algorithm": None}


def _bind(spec, args, kwargs):
    """(the op's arguments by name, the bridge's options by name)."""
    n = len(spec.args)
    if len(args) > n + len(_OPTIONS):
        raise _validation.ArgumentTypeError(
            f"{spec.name}() takes {n + len(_OPTIONS)} arguments, got {len(args)}")
    kwargs = dict(kwargs)
    for key, value in zip(_OPTIONS, args[n:]):
        if key in kwargs:
            raise _validation.ArgumentTypeError(
                f"{spec.name}() got multiple values for argument {key!r}")
        kwargs[key] = value
    options = {key: kwargs.pop(key, default) for key, default in _OPTIONS.items()}
    return spec.bind(*args[:n], **kwargs), options


def _call(spec, args, kwargs):
    """One call of ``spec``'s op on TensorFlow tensors (see the module docstring)."""
    bound, options = _bind(spec, args, kwargs)
    channels_last = _channels_last(options["data_format"])
    algorithm = options["algorithm"]
    spec.check_algorithm(algorithm)
    by_name = {a.name: a for a in spec.args}
    params = {}
    for arg in spec.params:
        value = bound[arg.name]
        params[arg.name] = (_validation.pair(value, arg.name, arg.minimum)
                            if arg.kind == _ops.PAIR else value)
    tensors = _tensors({n: bound[n] for n in spec.arrays if by_name[n].kind == _ops.ARRAY},
                       {n: bound[n] for n in spec.arrays if by_name[n].kind != _ops.ARRAY})
    tensors = {n: tensors[n] for n in spec.arrays}  # the op's order
    # channels_last: the spatial tensors cross as their NHWC memory; the core
    # sees transposed views (channels-last arrays) and returns its results
    # through the inverse views: no transpose of the data here.
    nhwc = ({n for n in tensors if by_name[n].spatial and tensors[n] is not None}
            if channels_last else set())
    for name in nhwc:
        _check_nhwc_rank(tensors[name], name, _channels_last_layout(by_name[name].layout))
    if _fully_defined(tensors.values()):
        shapes = spec.output_shapes(_static_check(spec, nhwc, tensors, params))
    else:
        shapes = spec.static_output_shapes({n: _shape(t, n in nhwc) for n, t in tensors.items()},
                                           params)
    first = tensors[spec.arrays[0]]
    dtypes = {name: first.dtype for name in spec.outputs}
    if spec.acc_outputs:
        acc = tf.as_dtype(_validation.dtype_of(_spec(first), spec.arrays[0]).acc)
        dtypes.update({name: acc for name in spec.acc_outputs})
    every_output = {f"return_{name}": True for name in spec.outputs[1:]}
    taken = {a.name for a in spec.backward_args}  # the saved outputs the backward takes
    output = spec.outputs[0]
    if channels_last:
        shapes = dict(shapes, **{output: _as_nhwc(shapes[output])})

    def forward(**arrays):
        out = spec.forward(**_views(arrays, nhwc, _TO_NCHW), **params, **every_output,
                           algorithm=algorithm)
        out = out if isinstance(out, tuple) else (out,)
        return (out[0].transpose(_TO_NHWC) if channels_last else out[0],) + out[1:]

    def backward(grad_output, *saved, **arrays):
        saved = {n: a for n, a in zip(spec.outputs[1:], saved) if n in taken}
        if channels_last:
            grad_output = grad_output.transpose(_TO_NCHW)
        grads = spec.backward(grad_output, **_views(arrays, nhwc, _TO_NCHW), **params, **saved,
                              algorithm=algorithm)
        return _views(grads._asdict(), nhwc, _TO_NHWC)

    return _differentiable(
        forward, backward, list(tensors), list(tensors.values()),
        [(dtypes[name], tf.TensorShape(shapes[name])) for name in spec.outputs],
        constant=[n for n in spec.arrays if n not in spec.gradients])


def _signature(spec):
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(a.name, kind) if a.default is _ops.REQUIRED else
                  inspect.Parameter(a.name, kind, default=a.default) for a in spec.args]
    parameters += [inspect.Parameter(key, kind, default=value) for key, value in _OPTIONS.items()]
    return inspect.Signature(parameters)


def _op(spec, doc):
    """The public TensorFlow function of ``spec``'s op."""

    def op(*args, **kwargs):
        return _call(spec, args, kwargs)

    op.__name__ = op.__qualname__ = spec.name
    op.__module__ = __name__
    op.__doc__ = doc
    op.__signature__ = _signature(spec)
    return _plain_python(op)


_ALGORITHM_DOC = """algorithm: None (the automatic choice) or the name of one of
            ``cupydcn.algorithms("{op}")``, for the forward and the backward."""

# The docstrings say what each op means on TensorFlow tensors (the layouts);
# an op without one here gets its core function's.
_DOCS = {
    "deform_conv2d": """Deformable convolution v1, or v2 with ``mask``, differentiable in
    all inputs.

    ``cupydcn.deform_conv2d``'s numbers (torchvision's, docs/semantics.md §2) on
    TensorFlow tensors, CUDA kernels on the GPU and the CPU backend on the
    CPU, without copies.

    Args:
        input: (B, H, W, C) tensor, or (B, C, H, W) with channels_first.
        offset: (B, Ho, Wo, 2*dg*kh*kw) tensor, or (B, 2*dg*kh*kw, Ho, Wo);
            channel ``2*(g*kh*kw + k)`` is dy and ``+1`` is dx of tap k of
            offset group g.
        weight: (Cout, C/groups, kh, kw) tensor, torchvision's layout for both
            data formats.
        bias: (Cout,) tensor or None.
        stride, padding, dilation: int or (h, w) pair (symmetric zero padding).
        mask: (B, Ho, Wo, dg*kh*kw) tensor, or (B, dg*kh*kw, Ho, Wo), or None (v1).
        data_format: "channels_last" (default) or "channels_first".
        {algorithm}

    Returns:
        (B, Ho, Wo, Cout) tensor, or (B, Cout, Ho, Wo) with channels_first.
    """,
    "deform_roi_pool": """Deformable RoI pooling, RoIAlign style (mmcv's), or modulated
    with ``mask``; differentiable in ``input``, ``offset`` and ``mask`` (not in ``rois``).

    ``cupydcn.deform_roi_pool``'s numbers (docs/semantics.md §3) on TensorFlow
    tensors. Without offset and mask this is RoIAlign with ``aligned=True``.

    Args:
        input: (N, H, W, C) tensor, or (N, C, H, W) with channels_first.
        rois: (R, 5) tensor of the input's dtype, rows ``[batch_index, x1, y1, x2, y2]``
            in image coordinates.
        offset: (R, ph, pw, 2) tensor, or (R, 2, ph, pw) with channels_first
            (channel 0 moves x, channel 1 moves y, in units of ``gamma*roi_size``),
            or None.
        output_size: int or (ph, pw).
        spatial_scale: float, image -> feature map coordinates.
        sampling_ratio: int, samples per bin per axis (0 = adaptive).
        gamma: float, the offset scale.
        mask: (R, ph, pw, 1) tensor, or (R, 1, ph, pw), or None: multiplies each bin.
        data_format: "channels_last" (default) or "channels_first".
        {algorithm}

    Returns:
        (R, ph, pw, C) tensor, or (R, C, ph, pw) with channels_first.
    """,
    "deform_psroi_pool": """Deformable position-sensitive RoI pooling (the official DCN operator's,
    R-FCN head); differentiable in ``input`` and ``trans`` (not in ``rois``).

    ``cupydcn.deform_psroi_pool``'s numbers (docs/semantics.md §4) on TensorFlow
    tensors. The forward's sample count is kept for the backward.

    Args:
        input: (N, H, W, output_dim*group_size**2) tensor, or
            (N, output_dim*group_size**2, H, W) with channels_first.
        rois: (R, 5) tensor of the input's dtype, ``[batch_index, x1, y1, x2, y2]``.
        trans: (R, part, part, 2*num_classes) tensor, or (R, 2*num_classes, part, part)
            with channels_first (x at channel ``2*cls``, y at ``2*cls + 1``), or None.
        spatial_scale, output_dim, group_size, pooled_size, part_size,
            sample_per_part, trans_std: as for ``cupydcn.deform_psroi_pool``.
        data_format: "channels_last" (default) or "channels_first".
        {algorithm}

    Returns:
        (R, pooled_size, pooled_size, output_dim) tensor, or
        (R, output_dim, pooled_size, pooled_size) with channels_first.
    """,
}

for _name, _spec_of_op in _ops.SPECS.items():
    _doc = _DOCS.get(_name)
    _doc = (_spec_of_op.forward.__doc__ if _doc is None else
            _doc.replace("{algorithm}", _ALGORITHM_DOC.format(op=_name)))
    globals()[_name] = _op(_spec_of_op, _doc)
del _name, _spec_of_op, _doc

__all__ = sorted(_ops.SPECS)
