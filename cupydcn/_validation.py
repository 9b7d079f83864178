"""The one validation module, used by every entry point and every bridge.

Checks work on anything with ``.shape`` and ``.dtype`` (NumPy, CuPy, torch,
TensorFlow), so the same mistake gets the same message everywhere. Messages name
the argument, the value received and the value expected. Shape errors raise
ValueError, dtype and type errors TypeError.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy

from cupydcn import _dtypes


def shape_of(x):
    return tuple(int(s) for s in x.shape)


def dtype_of(x, name):
    """The dtype table row of ``x``'s dtype, whatever library ``x`` is from."""
    dtype = x.dtype
    try:
        dtype = numpy.dtype(dtype)
    except TypeError:
        # torch.float32 / tf.float32 and the like: look up by their name
        text = str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1]
        for row in _dtypes.DTYPES.values():
            if row.name == text:
                return row
    return _dtypes.lookup(dtype, name)


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
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items)):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        result = (int(items[0]), int(items[1]))
    if min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return result


def check_rank(x, name, layout):
    shape = shape_of(x)
    rank = len(layout.split(","))
    if len(shape) != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {shape}")
    return shape


def check_dtype_matches(reference, name, x, x_name):
    """All floating arrays of an op share one dtype; returns the table row."""
    row = dtype_of(reference, name)
    other = dtype_of(x, x_name)
    if other.name != row.name:
        raise TypeError(f"{x_name}.dtype must match {name}.dtype = {row.name}, got {other.name}")
    return row


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


def check_deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1,
                        mask=None, grad_output=None):
    """Validate a deform_conv2d call (SEMANTICS.md section 1); return its geometry."""
    stride = pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    B, C, H, W = check_rank(input, "input", "(B, C, H, W)")
    Cout, Cg, kh, kw = check_rank(weight, "weight", "(Cout, C/groups, kh, kw)")
    dtype = dtype_of(input, "input")
    for other, other_name in ((offset, "offset"), (weight, "weight"), (bias, "bias"),
                              (mask, "mask"), (grad_output, "grad_output")):
        if other is not None:
            check_dtype_matches(input, "input", other, other_name)
    if kh < 1 or kw < 1:
        raise ValueError(f"weight.shape[2:] (kh, kw) must be >= 1, got {(kh, kw)}")
    if Cg < 1:
        raise ValueError(f"weight.shape[1] (C/groups) must be >= 1, got {Cg}")
    if C % Cg:
        raise ValueError(f"input.shape[1] (C = {C}) must be divisible by weight.shape[1] "
                         f"(C/groups = {Cg})")
    groups = C // Cg
    if Cout % groups:
        raise ValueError(f"weight.shape[0] (Cout = {Cout}) must be divisible by groups = {groups} "
                         f"(input.shape[1] / weight.shape[1])")
    span_h = dilation[0] * (kh - 1) + 1
    span_w = dilation[1] * (kw - 1) + 1
    if H + 2 * padding[0] < span_h or W + 2 * padding[1] < span_w:
        raise ValueError(f"the dilated kernel ({span_h}, {span_w}) is larger than the padded input "
                         f"({H + 2 * padding[0]}, {W + 2 * padding[1]})")
    Ho = (H + 2 * padding[0] - span_h) // stride[0] + 1
    Wo = (W + 2 * padding[1] - span_w) // stride[1] + 1

    offset_shape = check_rank(offset, "offset", "(B, 2*offset_groups*kh*kw, Ho, Wo)")
    taps = kh * kw
    if offset_shape[0] != B:
        raise ValueError(f"offset.shape[0] must be B = {B}, got {offset_shape[0]}")
    if offset_shape[1] < 2 * taps or offset_shape[1] % (2 * taps):
        raise ValueError(f"offset.shape[1] must be a positive multiple of 2*kh*kw = {2 * taps}, "
                         f"got {offset_shape[1]}")
    offset_groups = offset_shape[1] // (2 * taps)
    if C % offset_groups:
        raise ValueError(f"input.shape[1] (C = {C}) must be divisible by offset_groups = "
                         f"{offset_groups} (offset.shape[1] / (2*kh*kw))")
    if offset_shape[2:] != (Ho, Wo):
        raise ValueError(f"offset.shape[2:] must be (Ho, Wo) = {(Ho, Wo)}, got {offset_shape[2:]}")
    if mask is not None:
        expected = (B, offset_groups * taps, Ho, Wo)
        mask_shape = check_rank(mask, "mask", "(B, offset_groups*kh*kw, Ho, Wo)")
        if mask_shape != expected:
            raise ValueError(f"mask.shape must be (B, offset_groups*kh*kw, Ho, Wo) = {expected}, "
                             f"got {mask_shape}")
    if bias is not None and shape_of(bias) != (Cout,):
        raise ValueError(f"bias.shape must be (Cout,) = {(Cout,)}, got {shape_of(bias)}")
    if grad_output is not None and shape_of(grad_output) != (B, Cout, Ho, Wo):
        raise ValueError(f"grad_output.shape must be (B, Cout, Ho, Wo) = {(B, Cout, Ho, Wo)}, "
                         f"got {shape_of(grad_output)}")
    return ConvGeometry(B, C, H, W, Cout, kh, kw, groups, offset_groups, Ho, Wo, stride, padding,
                        dilation, dtype)
