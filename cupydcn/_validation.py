"""The one validation module, used by every entry point and every bridge.

Checks work on anything with ``.shape`` and ``.dtype`` (NumPy, CuPy, torch,
TensorFlow), so the same mistake gets the same message everywhere. Messages name
the argument, the value received and the value expected.

Errors: bad values and shapes raise :class:`ArgumentError`, bad types and dtypes
:class:`ArgumentTypeError`. Each is both the Python-style class (``ValueError``,
``TypeError``) and ``RuntimeError`` (what torchvision raises for the same
mistakes), so ``except ValueError`` and ``except RuntimeError`` both catch them,
whichever entry point (core, torch, TensorFlow, Keras) raised them.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy

from cupydcn import _dtypes


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape. Catch it as ``ValueError`` (Python's
    habit) or ``RuntimeError`` (what torchvision raises for a bad size)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A bad argument type or dtype (an array that is None or a list, a
    float16 offset for a float32 input). Catch it as ``TypeError`` or
    ``RuntimeError``."""


ARRAY = "a NumPy, CuPy or DLPack-capable array"


def type_name(x):
    """``x``'s type as a user reads it: "None", "list", "numpy.ndarray"."""
    if x is None:
        return "None"
    kind = type(x)
    module = kind.__module__.split(".")[0]
    return kind.__name__ if module == "builtins" else f"{module}.{kind.__name__}"


def check_arrays(required, optional=(), expected=ARRAY, accepts=None):
    """Every array argument present and of an accepted type.

    ``required`` and ``optional`` map names to values; a required value may
    not be None, an optional one may. ``accepts(x)`` says whether a value is of
    the right kind (default: any; the core's interchange checks the kinds);
    ``expected`` names that kind in the message, e.g. "offset must be a NumPy,
    CuPy or DLPack-capable array, got None".
    """
    accepts = accepts or (lambda x: True)
    for arrays, may_be_none in ((required, False), (dict(optional), True)):
        for name, x in arrays.items():
            if x is None and may_be_none:
                continue
            if x is None or not accepts(x):
                or_none = " or None" if may_be_none else ""
                raise ArgumentTypeError(f"{name} must be {expected}{or_none}, got {type_name(x)}")


def shape_of(x):
    return tuple(int(s) for s in x.shape)


def dtype_of(x, name):
    """The dtype table row of ``x``'s dtype, whatever library ``x`` is from."""
    dtype = x.dtype
    try:
        dtype = numpy.dtype(dtype)
    except TypeError:
        # torch.float32 / tf.float32 and the like: look up by their name, and
        # name them plainly ("int32", not "<dtype: 'int32'>") when unsupported
        dtype = str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1]
        for row in _dtypes.DTYPES.values():
            if row.name == dtype:
                return row
    try:
        return _dtypes.lookup(dtype, name)
    except TypeError as error:  # the dtype table's message, as this module's error
        raise ArgumentTypeError(str(error)) from None


def pair(value, name, minimum):
    """``value`` as a pair of ints, each at least ``minimum``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        result = (int(value), int(value))
    else:
        try:
            items = tuple(value)
        except TypeError:
            items = None
        if (items is None or len(items) != 2
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                           for v in items)):
            raise ArgumentTypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        result = (int(items[0]), int(items[1]))
    if min(result) < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value!r}")
    return result


def check_wrt(wrt, names, **optional):
    """``wrt`` (a tuple, list or set of gradient names among ``names``) as a
    frozenset. ``optional`` maps the optional arrays' names to their values:
    naming one that is None is an error (``wrt=("mask",)`` without a mask),
    except when ``wrt`` names every gradient (the default, meaning every one
    that applies), which drops the arrays not given."""
    if isinstance(wrt, (str, bytes)):  # one name, not a collection of names
        raise ArgumentError(f"wrt must name gradients among {tuple(names)} as a tuple, list "
                            f"or set of names, got the string {wrt!r}")
    if not isinstance(wrt, (tuple, list, set, frozenset)):
        raise ArgumentTypeError(f"wrt must name gradients among {tuple(names)} as a tuple, list "
                                f"or set of names, got {wrt!r}")
    if not all(isinstance(name, str) for name in wrt):
        raise ArgumentTypeError(f"wrt must name gradients among {tuple(names)}, got {wrt!r}")
    wrt = frozenset(wrt)
    unknown = wrt - set(names)
    if unknown:
        raise ArgumentError(f"wrt must name gradients among {tuple(names)}, got {sorted(unknown)}")
    absent = {name for name, array in optional.items() if array is None}
    if wrt != set(names) and wrt & absent:
        missing = sorted(wrt & absent)
        raise ArgumentError(f"wrt names {', '.join(map(repr, missing))} but "
                            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                            f"None: pass {' and '.join(missing)} or leave "
                            f"{'it' if len(missing) == 1 else 'them'} out of wrt")
    return wrt - absent


def check_rank(x, name, layout):
    shape = shape_of(x)
    rank = len(layout.split(","))
    if len(shape) != rank:
        raise ArgumentError(f"{name} must be {rank}-D {layout}, got shape {shape}")
    return shape


def check_dtype_matches(reference, name, x, x_name):
    """All floating arrays of an op share one dtype; returns the table row."""
    row = dtype_of(reference, name)
    other = dtype_of(x, x_name)
    if other.name != row.name:
        raise ArgumentTypeError(
            f"{x_name}.dtype must match {name}.dtype = {row.name}, got {other.name}")
    return row


def element_strides(x):
    """``x``'s strides in elements (NumPy/CuPy ``.strides`` are in bytes,
    torch's ``.stride()`` in elements), or None for an array without strides
    (a TensorFlow tensor: always dense, row-major)."""
    stride = getattr(x, "stride", None)
    if callable(stride):  # torch (fake tensors included)
        return tuple(int(s) for s in stride())
    strides = getattr(x, "strides", None)
    if strides is None:
        return None
    itemsize = numpy.dtype(x.dtype).itemsize
    return tuple(int(s) // itemsize for s in strides)


def _dense_strides(shape, order):
    """Element strides of a dense array of ``shape`` laid out with its axes
    in ``order`` (slowest first)."""
    strides, step = [0] * len(shape), 1
    for axis in reversed(order):
        strides[axis] = step
        step *= max(shape[axis], 1)
    return tuple(strides)


def _strides_match(shape, strides, expected):
    return all(n <= 1 or s == e for n, s, e in zip(shape, strides, expected))


def is_channels_last(x):
    """True when 4-D ``x`` (B, C, H, W) is channels-last and not also
    NCHW-contiguous: dense with C the fastest axis, what
    ``x_nhwc.transpose(0, 3, 1, 2)`` is in NumPy/CuPy and a torch
    ``channels_last`` tensor is (strides of axes of size 1 do not count, so an
    array that is both, e.g. with C = 1, counts as NCHW)."""
    shape = shape_of(x)
    strides = element_strides(x)
    if len(shape) != 4 or strides is None:
        return False
    return (_strides_match(shape, strides, _dense_strides(shape, (0, 2, 3, 1)))
            and not _strides_match(shape, strides, _dense_strides(shape, (0, 1, 2, 3))))


class ConvGeometry(NamedTuple):
    B: int
    C: int
    H: int
    W: int
    Cout: int
    kh: int
    kw: int
    groups: int
    offset_groups: int
    Ho: int
    Wo: int
    stride: tuple
    padding: tuple
    dilation: tuple
    dtype: _dtypes.DType
    # The input's memory format: channels-last (see is_channels_last) or not.
    # The result of deform_conv2d has the input's memory format, each
    # gradient its own array's (cupydcn._deform_conv.memory_formats).
    channels_last: bool = False


def conv_output_size(size, kernel, stride, padding, dilation):
    """A convolution's output size along one axis, ``(size + 2*padding -
    dilation*(kernel - 1) - 1) // stride + 1`` (docs/semantics.md §2.1), in
    whatever integers ``size`` is: an int, or a symbolic size of torch's
    tracing (``torch.SymInt``), which it keeps symbolic."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1,
                        mask=None, grad_output=None):
    """Validate a deform_conv2d call (docs/semantics.md §2); return its geometry."""
    stride = pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    B, C, H, W = check_rank(input, "input", "(B, C, H, W)")
    Cout, Cg, kh, kw = check_rank(weight, "weight", "(Cout, C/groups, kh, kw)")
    if kh < 1 or kw < 1:
        raise ArgumentError(f"weight.shape[2:] (kh, kw) must be >= 1, got {(kh, kw)}")
    if Cg < 1:
        raise ArgumentError(f"weight.shape[1] (C/groups) must be >= 1, got {Cg}")
    if C % Cg or C == 0:
        raise ArgumentError(f"input.shape[1] (C = {C}) must be a positive number divisible by "
                            f"weight.shape[1] (C/groups = {Cg})")
    groups = C // Cg
    if Cout % groups:
        raise ArgumentError(
            f"weight.shape[0] (Cout = {Cout}) must be divisible by groups = {groups} "
            f"(input.shape[1] / weight.shape[1])")
    span_h = dilation[0] * (kh - 1) + 1
    span_w = dilation[1] * (kw - 1) + 1
    if H + 2 * padding[0] < span_h or W + 2 * padding[1] < span_w:
        raise ArgumentError(
            f"the dilated kernel ({span_h}, {span_w}) is larger than the padded input "
            f"({H + 2 * padding[0]}, {W + 2 * padding[1]})")
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])

    offset_shape = check_rank(offset, "offset", "(B, 2*offset_groups*kh*kw, Ho, Wo)")
    taps = kh * kw
    if offset_shape[0] != B:
        raise ArgumentError(f"offset.shape[0] must be B = {B}, got {offset_shape[0]}")
    if offset_shape[1] < 2 * taps or offset_shape[1] % (2 * taps):
        raise ArgumentError(f"offset.shape[1] must be a positive multiple of 2*kh*kw = {2 * taps}, "
                            f"got {offset_shape[1]} (the shape of the offset does not match "
                            f"the kernel)")
    offset_groups = offset_shape[1] // (2 * taps)
    if C % offset_groups:
        raise ArgumentError(f"input.shape[1] (C = {C}) must be divisible by offset_groups = "
                            f"{offset_groups} (offset.shape[1] / (2*kh*kw))")
    if offset_shape[2:] != (Ho, Wo):
        raise ArgumentError(
            f"offset.shape[2:] must be (Ho, Wo) = {(Ho, Wo)}, got {offset_shape[2:]}")
    if mask is not None:
        expected = (B, offset_groups * taps, Ho, Wo)
        mask_shape = check_rank(mask, "mask", "(B, offset_groups*kh*kw, Ho, Wo)")
        if mask_shape != expected:
            channels = ("" if mask_shape[1] == expected[1] else
                        f" (mask.shape[1] is not valid: offset_groups*kh*kw = {expected[1]})")
            raise ArgumentError(
                f"mask.shape must be (B, offset_groups*kh*kw, Ho, Wo) = {expected}, "
                f"got {mask_shape}{channels}")
    if bias is not None and shape_of(bias) != (Cout,):
        raise ArgumentError(f"bias.shape must be (Cout,) = {(Cout,)}, got {shape_of(bias)}")
    if grad_output is not None and shape_of(grad_output) != (B, Cout, Ho, Wo):
        raise ArgumentError(f"grad_output.shape must be (B, Cout, Ho, Wo) = {(B, Cout, Ho, Wo)}, "
                            f"got {shape_of(grad_output)}")
    # dtypes after shapes, as torchvision checks them (its test_wrong_sizes passes
    # float64 inputs to a float32 layer and expects the shape error)
    dtype = dtype_of(input, "input")
    for other, other_name in ((offset, "offset"), (weight, "weight"), (bias, "bias"),
                              (mask, "mask"), (grad_output, "grad_output")):
        if other is not None:
            check_dtype_matches(input, "input", other, other_name)
    return ConvGeometry(B, C, H, W, Cout, kh, kw, groups, offset_groups, Ho, Wo, stride, padding,
                        dilation, dtype, is_channels_last(input))


# --------------------------------------------------------------------------
# Deformable RoI pooling (docs/semantics.md §3 and §4)
# --------------------------------------------------------------------------


def _real(value, name, positive=False):
    """``value`` as a finite float (> 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r}")
    result = float(value)
    if not numpy.isfinite(result) or (positive and result <= 0):
        raise ArgumentError(f"{name} must be a finite number{' > 0' if positive else ''}, "
                            f"got {value!r}")
    return result


def _int(value, name, minimum):
    """``value`` as an int of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_roi_batch_indices(rois, N):
    """``rois[:, 0]`` must hold integers in [0, N). Works on NumPy and CuPy
    arrays; on CuPy it costs one small device -> host read (the kernels also
    guard: a RoI with an invalid index pools to 0)."""
    if shape_of(rois)[0] == 0:
        return
    column = rois[:, 0].astype("float64")
    bad = ~((column >= 0) & (column < N) & (column == column.round()))  # NaN fails all
    if bool(bad.any()):
        got = float(column[bad][0])
        raise ArgumentError(f"rois[:, 0] must hold batch indices in [0, N) = [0, {N}), got {got}")


def _check_rois(input, rois):
    shape = shape_of(rois)
    if len(shape) != 2 or shape[1] != 5:
        raise ArgumentError(f"rois.shape must be (R, 5), got {shape}")
    check_dtype_matches(input, "input", rois, "rois")
    return shape[0]


def _check_shape(x, name, layout, expected):
    got = shape_of(x)
    if got != expected:
        raise ArgumentError(f"{name}.shape must be {layout} = {expected}, got {got}")


class RoIPoolGeometry(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    R: int
    ph: int
    pw: int
    spatial_scale: float
    sampling_ratio: int
    gamma: float
    dtype: _dtypes.DType


def check_deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0,
                          sampling_ratio=0, gamma=0.1, mask=None, grad_output=None,
                          check_batch=True):
    """Validate a deform_roi_pool call (docs/semantics.md §3); return its
    geometry. ``check_batch`` reads ``rois[:, 0]`` (a device sync on the GPU)."""
    ph, pw = pair(output_size, "output_size", 1)
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    sampling_ratio = _int(sampling_ratio, "sampling_ratio", 0)
    gamma = _real(gamma, "gamma")
    N, C, H, W = check_rank(input, "input", "(N, C, H, W)")
    dtype = dtype_of(input, "input")
    for other, other_name in ((offset, "offset"), (mask, "mask"), (grad_output, "grad_output")):
        if other is not None:
            check_dtype_matches(input, "input", other, other_name)
    R = _check_rois(input, rois)
    if offset is not None:
        _check_shape(offset, "offset", "(R, 2, ph, pw)", (R, 2, ph, pw))
    if mask is not None:
        _check_shape(mask, "mask", "(R, 1, ph, pw)", (R, 1, ph, pw))
    if grad_output is not None:
        _check_shape(grad_output, "grad_output", "(R, C, ph, pw)", (R, C, ph, pw))
    if check_batch:
        check_roi_batch_indices(rois, N)
    return RoIPoolGeometry(N, C, H, W, R, ph, pw, spatial_scale, sampling_ratio, gamma, dtype)


class PSRoIPoolGeometry(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    R: int
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int        # the effective part grid: pooled_size when 0 was given
    sample_per_part: int
    num_classes: int      # 1 without trans
    spatial_scale: float
    trans_std: float
    dtype: _dtypes.DType


def check_deform_psroi_pool(input, rois, trans=None, spatial_scale=1.0, output_dim=None,
                            group_size=1, pooled_size=7, part_size=0, sample_per_part=4,
                            trans_std=0.0, grad_output=None, count=None, check_batch=True):
    """Validate a deform_psroi_pool call (docs/semantics.md §4); return its
    geometry. ``count`` may be of the accumulation dtype (what the forward
    returns) or of the input's dtype."""
    spatial_scale = _real(spatial_scale, "spatial_scale", positive=True)
    trans_std = _real(trans_std, "trans_std")
    group_size = _int(group_size, "group_size", 1)
    pooled_size = _int(pooled_size, "pooled_size", 1)
    part_size = _int(part_size, "part_size", 0)
    sample_per_part = _int(sample_per_part, "sample_per_part", 1)
    N, C, H, W = check_rank(input, "input", "(N, output_dim*group_size**2, H, W)")
    dtype = dtype_of(input, "input")
    for other, other_name in ((trans, "trans"), (grad_output, "grad_output")):
        if other is not None:
            check_dtype_matches(input, "input", other, other_name)
    if output_dim is None:
        output_dim = C // group_size**2
    output_dim = _int(output_dim, "output_dim", 0)
    if output_dim * group_size**2 != C:
        raise ArgumentError(f"output_dim*group_size**2 = {output_dim}*{group_size}**2 = "
                            f"{output_dim * group_size**2} must equal input.shape[1] = {C}")
    R = _check_rois(input, rois)
    part = part_size or pooled_size
    num_classes = 1
    if trans is not None:
        shape = check_rank(trans, "trans", "(R, 2*num_classes, part_size, part_size)")
        if shape[0] != R:
            raise ArgumentError(f"trans.shape[0] must be R = {R}, got {shape[0]}")
        if shape[1] < 2 or shape[1] % 2 or output_dim % (shape[1] // 2):
            raise ArgumentError(f"trans.shape[1] must be 2*num_classes with num_classes dividing "
                                f"output_dim = {output_dim}, got {shape[1]}")
        num_classes = shape[1] // 2
        if shape[2:] != (part, part):
            raise ArgumentError(f"trans.shape[2:] must be (part_size, part_size) = {(part, part)}, "
                                f"got {shape[2:]}")
    out_shape = (R, output_dim, pooled_size, pooled_size)
    if grad_output is not None:
        _check_shape(grad_output, "grad_output", "(R, output_dim, pooled_size, pooled_size)",
                     out_shape)
    if count is not None:
        got = dtype_of(count, "count")
        if got.dtype not in (dtype.acc, dtype.dtype):
            allowed = (dtype.name if dtype.acc == dtype.dtype else
                       f"{dtype.acc.name} (the accumulation dtype of {dtype.name}) or {dtype.name}")
            raise ArgumentTypeError(f"count.dtype must be {allowed}, got {got.name}")
        _check_shape(count, "count", "(R, output_dim, pooled_size, pooled_size)", out_shape)
    if check_batch:
        check_roi_batch_indices(rois, N)
    return PSRoIPoolGeometry(N, C, H, W, R, output_dim, group_size, pooled_size, part,
                             sample_per_part, num_classes, spatial_scale, trans_std, dtype)
