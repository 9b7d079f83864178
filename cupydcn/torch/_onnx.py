"""ONNX export of cupydcn's torch ops, for both ``torch.onnx.export`` exporters.

``torch.onnx.export(model, args)`` of a model using :mod:`cupydcn.torch`, with
``dynamo=True`` (the default) or ``dynamo=False``, needs no extra argument:

* deformable convolution (``deform_conv2d``, ``DeformConv2d``,
  ``DeformConv2dPack``, ``ModulatedDeformConv2dPack``) becomes the standard
  ONNX ``DeformConv`` (opset_version >= 19; the default, 20, is fine):
  inputs ``X, W, offset[, B][, mask]`` (an absent bias before a mask is the
  empty input name), attributes ``kernel_shape``, ``strides``, ``pads`` =
  ``[ph, pw, ph, pw]`` (cupydcn's padding is symmetric per axis; pad
  asymmetrically with ``F.pad`` before the layer, which exports as ``Pad``),
  ``dilations``, ``group``, ``offset_group``. ONNX's offset and mask layouts
  are torchvision's, which are cupydcn's (docs/semantics.md §2). bfloat16 is a
  DeformConv type from opset 22: with ``opset_version=22`` (dynamo exporter)
  the node is bfloat16; below, and always with the TorchScript exporter
  (which stops at opset 20), it runs in float32 between two Casts, exact for
  the inputs and rounding the output once, as cupydcn's bfloat16 kernel
  (float32 accumulation) does. An opset below 19 is refused by name.
* the RoI poolings have no standard ONNX operator: they export to the custom
  domain ``cupydcn`` (version 1), one node each, same dtype as their input,
  with cupydcn's own arguments as attributes (docs/semantics.md §3 and §4):

  - ``cupydcn::DeformRoIPool(X, rois[, offset][, mask]) -> Y``: attributes
    ``output_size`` (ints ``[ph, pw]``), ``spatial_scale`` (float),
    ``sampling_ratio`` (int, 0 = adaptive), ``gamma`` (float); shapes as
    :func:`cupydcn.torch.deform_roi_pool` (absent offset before a mask: "").
  - ``cupydcn::DeformPSRoIPool(X, rois[, trans]) -> Y[, count]``:
    attributes ``spatial_scale`` (float), ``output_dim``, ``group_size``,
    ``pooled_size``, ``part_size`` (resolved, never 0), ``sample_per_part``
    (ints), ``trans_std`` (float). ``count`` (the samples per output element,
    float32, float64 for float64 input) is a second output with
    ``return_count=True`` (dynamo exporter), and always, unused, with the
    TorchScript exporter (the op's second output).

  A runtime needs kernels for these (onnxruntime: a custom-op library).

How: the dynamo exporter traces the Python wrappers of :mod:`cupydcn.torch`,
which, while :func:`exporting`, call :func:`deform_conv2d`,
:func:`deform_roi_pool` and :func:`deform_psroi_pool` here instead of the
``torch.ops.cupydcn`` ops; these emit the ONNX nodes through
``torch.onnx.ops.symbolic``. An ExportedProgram made beforehand by
``torch.export`` holds the ``torch.ops.cupydcn`` ops themselves: for it,
:func:`register_dynamo_translations` adds the translation of
``torch.ops.cupydcn.deform_conv2d`` (the same ``DeformConv`` node) to the
running export's registry when the exporter retraces the graph (the op's
fake implementation calls it), so ``torch.onnx.export(exported_program)``
needs no ``custom_translation_table`` either; the RoI poolings of such a
graph are not translated (export the model for them). The TorchScript exporter
records the ``torch.ops.cupydcn`` ops and translates them with the symbolic functions that
:func:`register_torchscript_symbolics` registers when :mod:`cupydcn.torch` is
imported. Dynamic sizes (``dynamic_shapes`` / ``dynamic_axes``) work both when
the model is exported and in an ExportedProgram made beforehand with
``dynamic_shapes`` (the ops' fake implementations keep the batch, the spatial
sizes and the number of RoIs symbolic); channels and kernel sizes must be
static.
"""

import sys

import torch

from cupydcn import _validation
from cupydcn.torch import _interop

DOMAIN = "cupydcn"
DOMAIN_VERSION = 1
DEFORM_CONV_OPSET = 19
DEFORM_CONV_BFLOAT16_OPSET = 22


def exporting():
    """Whether the dynamo ONNX exporter is tracing the caller (the
    TorchScript exporter traces with ``torch.jit.trace`` and translates the
    ``torch.ops.cupydcn`` ops afterwards, so it is excluded)."""
    return torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing()


# --------------------------------------------------------------------------
# Dynamo exporter: ONNX nodes emitted by the wrappers
# --------------------------------------------------------------------------


def deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask):
    """The ONNX ``DeformConv`` node computing ``cupydcn.torch.deform_conv2d``,
    as a traced value of the output's shape and dtype. bfloat16 is native
    from opset 22; below, the node runs in float32 between Casts (exact for
    the inputs; the output is rounded once, as cupydcn's bfloat16 kernel,
    which accumulates in float32, rounds it)."""
    geo = _validation.check_deform_conv2d(*_hinted(input, offset, weight, bias), stride, padding,
                                          dilation, _hinted(mask)[0])
    opset = check_opset()
    tensors = (input, weight, offset, bias, mask)
    cast = input.dtype == torch.bfloat16 and (opset is None or opset < DEFORM_CONV_BFLOAT16_OPSET)
    if cast:
        tensors = tuple(None if t is None else t.to(torch.float32) for t in tensors)
    out = torch.onnx.ops.symbolic(
        "DeformConv", tensors, _deform_conv_attributes(geo), dtype=tensors[0].dtype,
        shape=(input.shape[0], geo.Cout, offset.shape[2], offset.shape[3]),
        version=DEFORM_CONV_BFLOAT16_OPSET if input.dtype == torch.bfloat16 and not cast
        else DEFORM_CONV_OPSET)
    return out.to(torch.bfloat16) if cast else out


def check_opset():
    """Under ``torch.onnx.export(..., dynamo=True)``, the opset_version it
    targets (None where unknown), refused below DeformConv's opset. The fake
    implementation of ``torch.ops.cupydcn.deform_conv2d`` calls it too, so
    that the exporter's fallback capture (``strict=True``, where the wrapper
    cannot see the export) fails with the same message."""
    if not torch.onnx.is_in_onnx_export():
        return None
    opset = _target_opset()
    if opset is not None and opset < DEFORM_CONV_OPSET:
        raise _validation.ArgumentError(_opset_message(opset))
    return opset


def check_fake(op_name):
    """What the fake implementation of ``torch.ops.cupydcn.<op_name>`` does
    for the exporters: deform_conv2d's opset (see :func:`check_opset`), and
    its translation for the dynamo exporter's registry (see
    :func:`register_dynamo_translations`)."""
    if op_name == "deform_conv2d":
        check_opset()
        register_dynamo_translations()


def _opset_message(opset):
    return (f"ONNX export of cupydcn's deform_conv2d: DeformConv needs opset_version >= "
            f"{DEFORM_CONV_OPSET}, got {opset}")


def _target_opset():
    """The opset_version of the running ``torch.onnx.export(..., dynamo=True)``,
    None where it cannot be found."""
    opset = _exporter_local("opset_version")
    return opset if isinstance(opset, int) else None


def _exporter_local(name):
    """Local variable ``name`` of the running ``torch.onnx.export(...,
    dynamo=True)``, None where it cannot be found: torch.onnx has no public
    way to ask for its opset_version or its registry, so this reads them from
    the exporter's frame (torch 2.6 to 2.13 at least)."""
    try:
        from torch.onnx._internal.exporter import _compat

        code = _compat.export_compat.__code__
    except (ImportError, AttributeError):
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return frame.f_locals.get(name)
        frame = frame.f_back
    return None


def _hinted(*tensors):
    """Stand-ins for the shared checks with the sizes of the example inputs:
    int() of a symbolic size (``dynamic_shapes``) would specialize it."""
    return [_interop.stand_in(t) for t in tensors]


def _deform_conv_attributes(geo):
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    return {"dilations": [dh, dw], "group": geo.groups, "kernel_shape": [geo.kh, geo.kw],
            "offset_group": geo.offset_groups, "pads": [ph, pw, ph, pw], "strides": [sh, sw]}


def _conv_node_attributes(C, Cg, kh, kw, offset_channels, stride, padding, dilation):
    """DeformConv's attributes from the sizes a translation sees (channels,
    kernel) and the op's int-pair arguments."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    return {"dilations": [dh, dw], "group": C // Cg, "kernel_shape": [kh, kw],
            "offset_group": offset_channels // (2 * kh * kw), "pads": [ph, pw, ph, pw],
            "strides": [sh, sw]}


def register_dynamo_translations():
    """Under ``torch.onnx.export(..., dynamo=True)``, add the translation of
    ``torch.ops.cupydcn.deform_conv2d`` to the running export's registry, for
    graphs that hold the op itself (an ExportedProgram made beforehand; the
    model's own export goes through the wrappers). Called by the op's fake
    implementation, which runs when the exporter retraces the graph, before
    it translates it; the registry is the exporter's local (no public way to
    reach it, and torch.onnx has no global registration that does not import
    onnxscript, seconds, with cupydcn.torch)."""
    if not exporting():
        return
    registry = _exporter_local("registry")
    target = torch.ops.cupydcn.deform_conv2d.default
    if registry is None or not hasattr(registry, "register_op") \
            or registry.is_registered(target):
        return
    registry.register_op(target, _translate_deform_conv2d)


def _translate_deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                             dilation=(1, 1), mask=None, algorithm=None):
    """The dynamo exporter's translation of ``torch.ops.cupydcn.deform_conv2d``
    (trace-only ONNX Script: the arguments are the graph's values and the
    op's ints; ``algorithm`` does not change the numbers): the ``DeformConv``
    node :func:`deform_conv2d` emits, bfloat16 as there."""
    from onnxscript import opset19, opset22

    opset = check_opset()
    bfloat16 = int(input.dtype) == _ONNX_BFLOAT16
    native = not bfloat16 or (opset is not None and opset >= DEFORM_CONV_BFLOAT16_OPSET)
    tensors = (input, weight, offset, bias, mask)
    if not native:
        tensors = tuple(None if t is None else opset19.Cast(t, to=_ONNX_FLOAT) for t in tensors)
    attributes = _conv_node_attributes(input.shape[1], weight.shape[1], weight.shape[2],
                                       weight.shape[3], offset.shape[1], stride, padding,
                                       dilation)
    op = opset22 if bfloat16 and native else opset19
    out = op.DeformConv(*tensors, **attributes)
    return out if native else opset19.Cast(out, to=_ONNX_BFLOAT16)


def deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                    mask):
    """The ``cupydcn::DeformRoIPool`` node computing ``cupydcn.torch.deform_roi_pool``."""
    geo = _validation.check_deform_roi_pool(*_hinted(input, rois, offset), output_size,
                                            spatial_scale, sampling_ratio, gamma,
                                            _hinted(mask)[0], check_batch=False)
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::DeformRoIPool", (input, rois, offset, mask), _roi_pool_attributes(geo),
        dtype=input.dtype, shape=(rois.shape[0], geo.C, geo.ph, geo.pw), version=DOMAIN_VERSION)


def _roi_pool_attributes(geo):
    return {"output_size": [geo.ph, geo.pw], "spatial_scale": float(geo.spatial_scale),
            "sampling_ratio": geo.sampling_ratio, "gamma": float(geo.gamma)}


def deform_psroi_pool(input, rois, trans, spatial_scale, output_dim, group_size, pooled_size,
                      part_size, sample_per_part, trans_std, return_count):
    """The ``cupydcn::DeformPSRoIPool`` node computing
    ``cupydcn.torch.deform_psroi_pool``: its output, or (output, count)."""
    geo = _validation.check_deform_psroi_pool(*_hinted(input, rois, trans), spatial_scale,
                                              output_dim, group_size, pooled_size, part_size,
                                              sample_per_part, trans_std, check_batch=False)
    shape = (rois.shape[0], geo.output_dim, geo.pooled_size, geo.pooled_size)
    attributes = _psroi_pool_attributes(geo)
    if not return_count:
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::DeformPSRoIPool", (input, rois, trans), attributes, dtype=input.dtype,
            shape=shape, version=DOMAIN_VERSION)
    out, count = torch.onnx.ops.symbolic_multi_out(
        f"{DOMAIN}::DeformPSRoIPool", (input, rois, trans), attributes,
        dtypes=(input.dtype, getattr(torch, geo.dtype.acc.name)), shapes=(shape, shape),
        version=DOMAIN_VERSION)
    return out, count


def _psroi_pool_attributes(geo):
    return {"spatial_scale": float(geo.spatial_scale), "output_dim": geo.output_dim,
            "group_size": geo.group_size, "pooled_size": geo.pooled_size,
            "part_size": geo.part_size, "sample_per_part": geo.sample_per_part,
            "trans_std": float(geo.trans_std)}


# --------------------------------------------------------------------------
# TorchScript exporter: symbolic functions of the torch.ops.cupydcn ops
# --------------------------------------------------------------------------


def _is_none(value):
    return value is None or value.node().mustBeNone()


def _absent(g):
    """An absent optional input (exported as the empty input name)."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


def _inputs(g, *values):
    """Node inputs with absent optional ones in the middle as empty names and
    trailing absent ones dropped."""
    values = list(values)
    while values and _is_none(values[-1]):
        values.pop()
    return [_absent(g) if _is_none(v) else v for v in values]


def _sizes(g, value, index, name, op):
    """The shape of input ``index`` of the op (traced value ``value``): from
    ONNX shape inference, else as traced (the original node's input), whose
    dimensions but the first the attributes are computed from."""
    sizes = _known_sizes(value)
    if sizes is None or any(s is None for s in sizes[1:]):
        sizes = _known_sizes(g.original_node.inputsAt(index))
    if sizes is None or any(s is None for s in sizes[1:]):
        raise _validation.ArgumentError(f"ONNX export of {op}: {name} needs a static shape "
                                        f"(its dimensions but the first), got {sizes}")
    return sizes


def _known_sizes(value):
    kind = value.type()
    return kind.varyingSizes() if isinstance(kind, torch._C.TensorType) else None


def _rois(rois):
    """R, the number of RoIs (None when dynamic)."""
    sizes = _known_sizes(rois)
    return sizes[0] if sizes else None


def _dtype(value):
    return value.type().dtype()


def _symbolic_deform_conv2d(g, input, offset, weight, bias, stride, padding, dilation, mask,
                            _algorithm=None):
    op = "cupydcn::deform_conv2d"
    if g.opset < DEFORM_CONV_OPSET:
        raise _validation.ArgumentError(_opset_message(g.opset))
    C = _sizes(g, input, 0, "input", op)[1]
    Cout, Cg, kh, kw = _sizes(g, weight, 2, "weight", op)
    offset_channels = _sizes(g, offset, 1, "offset", op)[1]
    tensors = (input, weight, offset, bias, mask)
    # bfloat16 DeformConv needs opset 22, beyond this exporter: float32 between Casts
    cast = _dtype(input) == torch.bfloat16 and g.opset < DEFORM_CONV_BFLOAT16_OPSET
    if cast:
        tensors = [t if _is_none(t) else g.op("Cast", t, to_i=_ONNX_FLOAT) for t in tensors]
    attributes = _conv_node_attributes(C, Cg, kh, kw, offset_channels, stride, padding, dilation)
    out = g.op("DeformConv", *_inputs(g, *tensors),
               **{f"{name}_i": value for name, value in attributes.items()})
    return g.op("Cast", out, to_i=_ONNX_BFLOAT16) if cast else out


def _symbolic_deform_roi_pool(g, input, rois, offset, output_size, spatial_scale, sampling_ratio,
                              gamma, mask, _algorithm=None):
    ph, pw = output_size
    out = g.op(f"{DOMAIN}::DeformRoIPool", *_inputs(g, input, rois, offset, mask),
               output_size_i=[ph, pw], spatial_scale_f=spatial_scale,
               sampling_ratio_i=sampling_ratio, gamma_f=gamma)
    C = _sizes(g, input, 0, "input", "cupydcn::deform_roi_pool")[1]
    out.setType(input.type().with_sizes([_rois(rois), C, ph, pw]))
    return out


def _symbolic_deform_psroi_pool(g, input, rois, trans, spatial_scale, output_dim, group_size,
                                pooled_size, part_size, sample_per_part, trans_std,
                                _algorithm=None):
    from torch.onnx import symbolic_helper

    op = "cupydcn::deform_psroi_pool"
    if _is_none(output_dim):
        output_dim = _sizes(g, input, 0, "input", op)[1] // group_size**2
    else:
        output_dim = symbolic_helper._get_const(output_dim, "i", "output_dim")
    out, count = g.op(f"{DOMAIN}::DeformPSRoIPool", *_inputs(g, input, rois, trans),
                      spatial_scale_f=spatial_scale, output_dim_i=output_dim,
                      group_size_i=group_size, pooled_size_i=pooled_size,
                      part_size_i=part_size or pooled_size, sample_per_part_i=sample_per_part,
                      trans_std_f=trans_std, outputs=2)
    shape = [_rois(rois), output_dim, pooled_size, pooled_size]
    out.setType(input.type().with_sizes(shape))
    acc = torch.float64 if _dtype(input) == torch.float64 else torch.float32
    count.setType(input.type().with_dtype(acc).with_sizes(shape))
    return out, count


def register_torchscript_symbolics():
    """Register the TorchScript exporter's translations of the
    ``torch.ops.cupydcn`` forward ops (for every opset it exports; the
    DeformConv one refuses opsets below 19 by name)."""
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    parse = symbolic_helper.parse_args
    # the last argument of each op, algorithm=, does not change the numbers: ignored
    symbolics = {
        "deform_conv2d": parse("v", "v", "v", "v", "is", "is", "is", "v", "v")(
            _symbolic_deform_conv2d),
        "deform_roi_pool": parse("v", "v", "v", "is", "f", "i", "f", "v", "v")(
            _symbolic_deform_roi_pool),
        "deform_psroi_pool": parse("v", "v", "v", "f", "v", "i", "i", "i", "i", "f", "v")(
            _symbolic_deform_psroi_pool),
    }
    for name, symbolic in symbolics.items():
        register_custom_op_symbolic(f"cupydcn::{name}", symbolic, _TORCHSCRIPT_MIN_OPSET)


_TORCHSCRIPT_MIN_OPSET = 7  # torch.onnx's ONNX_MIN_OPSET
_ONNX_FLOAT, _ONNX_BFLOAT16 = 1, 16  # onnx.TensorProto.FLOAT, .BFLOAT16


register_torchscript_symbolics()
