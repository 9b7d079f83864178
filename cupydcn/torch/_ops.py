"""The ``torch.library`` custom ops, generated from the op specs, and the
Python entry points that call them.

For each spec of ``cupydcn._ops.SPECS``, :func:`_define` registers in the
``cupydcn`` namespace a forward op ``cupydcn::<name>`` and a backward op
``cupydcn::<name>_backward`` (the backward is its own op, so
``torch.compile`` and ``torch.export`` see it), with:

* schemas built from the spec's argument kinds, plus ``str? algorithm=None``
  (the implementation, as the core's ``algorithm=``). The forward takes the
  spec's arguments in order; the backward takes ``grad_output``, the
  forward's leading tensors, the spec's ``backward_args``, the rest of the
  forward's arguments, then ``bool[] wrt`` (one flag per gradient of the
  spec) and ``algorithm``, and returns the flagged gradients of the tensors
  given, in the spec's order;
* fake implementations: the shared validation (``spec.check``) and the
  shapes of ``spec.output_shapes``, so ``torch.compile(fullgraph=True)``
  traces the ops and a mistake gets the core's message at trace time; the
  sizes of ``spec.dynamic`` (batch, RoIs, spatial sizes) stay symbolic under
  ``torch.export(dynamic_shapes=...)`` and ``torch.compile(dynamic=True)``
  (see :func:`_traced_check`), the others are specialized;
* autograd: the backward op asked only for the gradients autograd needs
  (``ctx.needs_input_grad``), deterministic under
  ``torch.use_deterministic_algorithms(True)``;
* autocast kernels (CPU and CUDA) per ``spec.autocast``.

A spec's outputs after the first (PS RoI pooling's ``count``) are auxiliary:
the core returns them with ``return_<name>=True``, they are in the
accumulation dtype, not differentiable, and fed back to the backward as its
argument of the same name.

The entry points :func:`deform_conv2d`, :func:`deform_roi_pool` and
:func:`deform_psroi_pool` are written out, typed, because TorchScript
compiles them from their source (``torch.jit.script`` of the function or of a
module calling it): what TorchScript cannot compile (the eager checks, the
ONNX exporters' hook, torch.fx) sits under ``if not torch.jit.is_scripting()``.
Under ``torch.fx`` symbolic tracing each is recorded as one ``call_function``
node (a leaf, as ``torch.fx.wrap`` makes torchvision's ops), however it was
imported, so ``torchvision.models.feature_extraction`` works on models
holding them.
"""

import inspect

# typing's names, not PEP 585/604 ones: TorchScript reads these annotations
from typing import Optional, Tuple, Union

import torch
import torch.fx
from torch import Tensor
from torch._jit_internal import BroadcastingList2

import cupydcn
from cupydcn import _ops as _specs
from cupydcn import _validation
from cupydcn.torch import _interop
from cupydcn.torch import _onnx as _torch_onnx

NAMESPACE = "cupydcn"
ALGORITHM = "algorithm"

_SCHEMA_TYPES = {
    _specs.ARRAY: "Tensor", _specs.OPTIONAL_ARRAY: "Tensor?", _specs.PAIR: "SymInt[]",
    _specs.INT: "SymInt", _specs.OPTIONAL_INT: "SymInt?", _specs.FLOAT: "float",
    _specs.BOOL: "bool",
}
_TENSOR_KINDS = (_specs.ARRAY, _specs.OPTIONAL_ARRAY)


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
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
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
    op = getattr(getattr(torch.ops, NAMESPACE), op_name).default
    for device_type, key in _AUTOCAST_KEYS.items():
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=keyset, **kwargs):
            dtype = torch.float32 if float32 else _autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                result = op(*(_autocast_arg(a, _device_type, dtype) for a in args), **kwargs)
            if not float32:
                return result
            if isinstance(result, tuple):
                return (result[0].to(args[0].dtype),) + tuple(result[1:])
            return result.to(args[0].dtype)

        _LIBRARY.impl(op_name, kernel, key, with_keyset=True)


# --------------------------------------------------------------------------
# The ops, from the specs
# --------------------------------------------------------------------------


class _OpLayout:
    """Argument names and schemas of one spec's forward and backward ops."""

    def __init__(self, spec):
        self.spec = spec
        args = spec.args
        lead = next((i for i, a in enumerate(args) if a.kind not in _TENSOR_KINDS), len(args))
        self.forward_args = args
        self.backward_args = args[:lead] + spec.backward_args + args[lead:]
        self.forward_names = tuple(a.name for a in args) + (ALGORITHM,)
        self.backward_names = (("grad_output",) + tuple(a.name for a in self.backward_args)
                               + ("wrt", ALGORITHM))
        self.auxiliary = spec.outputs[1:]
        # what the backward takes from the forward's outputs, and keeps for it
        self.saved = spec.arrays + tuple(a.name for a in spec.backward_args)
        check_parameters = inspect.signature(spec.check).parameters
        # RoI batch indices are data: checked when the op runs, not in the fakes
        self.check_options = {"check_batch": False} if "check_batch" in check_parameters else {}

    @staticmethod
    def _schema_args(args):
        return ", ".join(f"{_SCHEMA_TYPES[a.kind]} {a.name}" for a in args)

    def forward_schema(self):
        results = ", ".join("Tensor" for _ in self.spec.outputs)
        results = results if len(self.spec.outputs) == 1 else f"({results})"
        return f"({self._schema_args(self.forward_args)}, str? {ALGORITHM}=None) -> {results}"

    def backward_schema(self):
        return (f"(Tensor grad_output, {self._schema_args(self.backward_args)}, bool[] wrt, "
                f"str? {ALGORITHM}=None) -> Tensor[]")

    def bind_forward(self, args, kwargs):
        return self._bind(self.forward_names, args, kwargs)

    def bind_backward(self, args, kwargs):
        return self._bind(self.backward_names, args, kwargs)

    @staticmethod
    def _bind(names, args, kwargs):
        # the dispatcher may leave out (or name) a trailing argument at its default
        bound = dict(zip(names, args), **kwargs)
        bound.setdefault(ALGORITHM, None)
        return bound

    def present(self, wrt, bound):
        """The gradient names flagged in ``wrt`` (one bool per gradient),
        less those of optional tensors not given."""
        return [name for name, want in zip(self.spec.gradients, wrt)
                if want and bound[name] is not None]


def _memory_format_like(t, like):
    """``t`` in ``like``'s memory format: channels-last when ``like`` is
    (``_validation.is_channels_last``; torch's own strides, which say so for a
    batch of 0 too), else as it is (the core's results are C-contiguous).
    No copy when ``t`` already is."""
    if like is not None and _validation.is_channels_last(like):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _traced_check(spec, bound, **options):
    """The shared validation of a traced call (the fakes), without
    specializing the dimensions that may stay symbolic (``spec.dynamic``:
    the batch, the RoIs, spatial sizes): ``spec.check`` runs on stand-ins
    holding those dimensions' hints (``_interop.stand_in``; the other
    dimensions are specialized, as ``int()`` does), so a wrong shape gets the
    core's message naming the argument; then ``torch._check`` ties together
    the symbolic dimensions that share a layout symbol (``offset.shape[0] ==
    input.shape[0]``) and those that others determine (``Ho`` from ``H``,
    ``spec.derived_sizes``). Returns the geometry, the stand-ins by name and
    the size of each dynamic layout symbol (int or ``torch.SymInt``)."""
    layouts = spec.array_layouts()
    stand_ins, dims = {}, {}
    for name, t in bound.items():
        if name not in layouts or not isinstance(t, Tensor):
            continue
        symbols = layouts[name] if len(layouts[name]) == t.dim() else (None,) * t.dim()
        shape = []
        for i, (size, symbol) in enumerate(zip(t.shape, symbols)):
            if symbol in spec.dynamic:
                dims.setdefault(symbol, []).append((f"{name}.shape[{i}]", size))
                shape.append(_interop.hint(size))
            else:
                shape.append(int(size))
        stand_ins[name] = _interop.stand_in(t, shape)
    geo = spec.check(**{n: stand_ins.get(n, v) for n, v in bound.items()}, **options)
    sizes = {}
    for symbol, ((first_name, first), *others) in dims.items():
        for other_name, other in others:
            torch._check(other == first, lambda: f"{other_name} must equal {first_name} "
                         f"({symbol}) = {first}, got {other}")
        sizes[symbol] = first
    if spec.derived_sizes is not None:
        for symbol, size in spec.derived_sizes(geo, dict(geo._asdict(), **sizes)).items():
            got = sizes.get(symbol, size)
            torch._check(got == size, lambda: f"{dims[symbol][0][0]} must be {symbol} = {size}, "
                         f"got {got}")
    return geo, stand_ins, sizes


def _traced_shape(spec, output, shape, sizes):
    """Output ``output``'s shape: ``shape`` (the geometry's ints) with the
    symbolic size of each dynamic layout symbol."""
    return tuple(sizes.get(symbol, n) for symbol, n in zip(spec.array_layouts()[output], shape))


def _core_args(bound, args):
    return [_interop.core_array(bound[a.name]) if a.kind in _TENSOR_KINDS else bound[a.name]
            for a in args]


def _define(spec):
    """Register ``cupydcn::<name>`` and ``cupydcn::<name>_backward`` for
    ``spec`` (see the module docstring)."""
    layout = _OpLayout(spec)
    name, first = spec.name, spec.args[0].name
    backward_name = f"{name}_backward"

    def forward(*args, **kwargs):
        bound = layout.bind_forward(args, kwargs)
        # the public entry point, looked up at call time (so it can be wrapped)
        core = getattr(cupydcn, spec.forward.__name__)
        with _interop.core_scope(bound[first]) as owner:
            result = core(*_core_args(bound, layout.forward_args), algorithm=bound[ALGORITHM],
                          **{f"return_{out}": True for out in layout.auxiliary})
            if not layout.auxiliary:
                out = _interop.tensor(result, owner)
                return _memory_format_like(out, bound[first]) if spec.keeps_memory_format else out
            return tuple(_interop.tensor(r, owner) for r in result)

    def forward_fake(*args, **kwargs):
        bound = layout.bind_forward(args, kwargs)
        _torch_onnx.check_fake(name)
        geo, stand_ins, sizes = _traced_check(
            spec, {a.name: bound[a.name] for a in spec.args}, **layout.check_options)
        shapes = {out: _traced_shape(spec, out, shape, sizes)
                  for out, shape in spec.output_shapes(geo).items()}
        like = bound[first]
        outs = [like.new_empty(shapes[spec.outputs[0]])]
        if spec.keeps_memory_format:  # the real op's strides (see _memory_format_like)
            outs[0] = _memory_format_like(outs[0], stand_ins[first])
        outs += [like.new_empty(shapes[out], dtype=getattr(torch, geo.dtype.acc.name))
                 for out in layout.auxiliary]
        return outs[0] if not layout.auxiliary else tuple(outs)

    def backward(*args, **kwargs):
        bound = layout.bind_backward(args, kwargs)
        names = layout.present(bound["wrt"], bound)
        if not names:
            return []
        core = getattr(cupydcn, spec.backward.__name__)
        with _interop.core_scope(bound[first]) as owner:
            grads = core(_interop.core_array(bound["grad_output"]),
                         *_core_args(bound, layout.backward_args), wrt=names,
                         deterministic=_deterministic(), algorithm=bound[ALGORITHM])
            tensors = [_interop.tensor(getattr(grads, n), owner) for n in names]
            if spec.keeps_memory_format:
                tensors = [_memory_format_like(t, bound[n]) for t, n in zip(tensors, names)]
            return tensors

    def backward_fake(*args, **kwargs):
        bound = layout.bind_backward(args, kwargs)
        names = ("grad_output",) + tuple(a.name for a in spec.args + spec.backward_args)
        _, stand_ins, _ = _traced_check(spec, {n: bound[n] for n in names},
                                        **layout.check_options)
        grads = [(n, bound[n].new_empty(bound[n].shape))
                 for n in layout.present(bound["wrt"], bound)]
        if spec.keeps_memory_format:  # the real op's strides
            return [_memory_format_like(g, stand_ins[n]) for n, g in grads]
        return [g for _, g in grads]

    forward_op = torch.library.custom_op(f"{NAMESPACE}::{name}", forward, mutates_args=(),
                                         schema=layout.forward_schema())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"{NAMESPACE}::{backward_name}", backward,
                                          mutates_args=(), schema=layout.backward_schema())
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        bound = layout.bind_forward(inputs, {})
        outputs = output if layout.auxiliary else (output,)
        auxiliary = dict(zip(layout.auxiliary, outputs[1:]))
        for t in auxiliary.values():
            ctx.mark_non_differentiable(t)
        bound.update(auxiliary)
        ctx.save_for_backward(*(bound.get(n) for n in layout.saved))
        ctx.params = {n: v for n, v in bound.items() if n not in layout.saved}

    def autograd_backward(ctx, grad_output, *_auxiliary_grads):
        bound = dict(zip(layout.saved, ctx.saved_tensors), **ctx.params)
        needs = ctx.needs_input_grad
        wrt = [needs[layout.forward_names.index(n)] and bound[n] is not None
               for n in spec.gradients]
        grads = iter(backward_op(grad_output, *(bound[a.name] for a in layout.backward_args),
                                 wrt, bound[ALGORITHM]) if any(wrt) else ())
        got = {n: next(grads) if w else None for n, w in zip(spec.gradients, wrt)}
        return tuple(got.get(n) for n in layout.forward_names)

    forward_op.register_autograd(autograd_backward, setup_context=setup_context)
    _register_autocast(name, float32=spec.autocast == "float32")
    return forward_op, backward_op


OPS = {name: _define(spec) for name, spec in _specs.SPECS.items()}


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def _fx_leaf(function, *args):
    """Under ``torch.fx`` symbolic tracing (a Proxy among ``args``), the call
    of ``function`` recorded as one ``call_function`` node, as
    ``torch.fx.wrap`` records it; else None."""
    for a in args:
        if isinstance(a, torch.fx.Proxy):
            proxy = a.tracer.create_proxy("call_function", function, args, {})
            proxy.node.meta["is_wrapped"] = True
            return proxy
    return None


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


def _ints(value, name, minimum):
    """An int or (h, w) pair as the op schema's int list, by the shared check."""
    return list(_validation.pair(value, name, minimum))


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  stride: BroadcastingList2[int] = 1, padding: BroadcastingList2[int] = 0,
                  dilation: BroadcastingList2[int] = 1, mask: Optional[Tensor] = None,
                  algorithm: Optional[str] = None) -> Tensor:
    """Deformable convolution (DCNv1), or modulated (DCNv2) with ``mask``: a
    drop-in for ``torchvision.ops.deform_conv2d`` (same arguments, same numbers,
    docs/semantics.md §2), differentiable in all five tensors. Scripts with
    ``torch.jit.script``; a leaf of ``torch.fx`` symbolic tracing.

    ``out[b, o] = bias[o] + sum_{c, i, j} weight[o, c, i, j] * mask[b, g, k]
    * bilinear(input[b, c], p + (i, j) * dilation + offset[b, g, k])``.

    Args:
        input: (B, C, H, W) tensor.
        offset: (B, 2*offset_groups*kh*kw, Ho, Wo) tensor, (dy, dx) interleaved per tap.
        weight: (Cout, C/groups, kh, kw) tensor.
        bias: (Cout,) tensor or None.
        stride, padding, dilation: int or (h, w) pair.
        mask: (B, offset_groups*kh*kw, Ho, Wo) tensor or None (DCNv1).
        algorithm: None (the automatic choice) or an implementation from
            ``cupydcn.algorithms("deform_conv2d")``, forward and backward.

    Returns:
        (B, Cout, Ho, Wo) tensor on the input's device, of its dtype.

    Example:
        >>> out = cupydcn.torch.deform_conv2d(x, offset, w, padding=1, mask=m)
    """
    if not torch.jit.is_scripting():
        leaf = _fx_leaf(deform_conv2d, input, offset, weight, bias, stride, padding, dilation,
                        mask, algorithm)
        if leaf is not None:
            return leaf
        _interop.check_tensors(dict(input=input, offset=offset, weight=weight),
                               dict(bias=bias, mask=mask))
        _check_eagerly(_validation.check_deform_conv2d, input, offset, weight, bias, stride,
                       padding, dilation, mask)
        if _torch_onnx.exporting():  # the ONNX exporters' hook (cupydcn/torch/_onnx.py)
            return _torch_onnx.deform_conv2d(input, offset, weight, bias, stride, padding,
                                             dilation, mask)
        stride, padding = _ints(stride, "stride", 1), _ints(padding, "padding", 0)
        dilation = _ints(dilation, "dilation", 1)
    return torch.ops.cupydcn.deform_conv2d(input, offset, weight, bias, stride, padding, dilation,
                                           mask, algorithm)


def deform_roi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor] = None,
                    output_size: BroadcastingList2[int] = 7, spatial_scale: float = 1.0,
                    sampling_ratio: int = 0, gamma: float = 0.1, mask: Optional[Tensor] = None,
                    algorithm: Optional[str] = None) -> Tensor:
    """Deformable RoI pooling, RoIAlign style (mmcv's ``deform_roi_pool``, same
    positional arguments), modulated when ``mask`` is given; differentiable in
    input, offset and mask (not in rois). docs/semantics.md §3. Scripts with
    ``torch.jit.script``; a leaf of ``torch.fx`` symbolic tracing.

    Args:
        input: (N, C, H, W) tensor.
        rois: (R, 5) tensor of the input's dtype, rows ``[batch_index, x1, y1, x2, y2]``.
        offset: (R, 2, ph, pw) tensor (channel 0 moves x, channel 1 moves y) or None.
        output_size: int or (ph, pw).
        spatial_scale: image -> feature map scale.
        sampling_ratio: samples per bin per axis, 0 = adaptive.
        gamma: the offset scale.
        mask: (R, 1, ph, pw) tensor multiplying the output, or None.
        algorithm: None (the automatic choice) or an implementation from
            ``cupydcn.algorithms("deform_roi_pool")``, forward and backward.

    Returns:
        (R, C, ph, pw) tensor. Without offset and mask this equals
        ``torchvision.ops.roi_align(..., aligned=True)``.
    """
    if not torch.jit.is_scripting():
        leaf = _fx_leaf(deform_roi_pool, input, rois, offset, output_size, spatial_scale,
                        sampling_ratio, gamma, mask, algorithm)
        if leaf is not None:
            return leaf
        _interop.check_tensors(dict(input=input, rois=rois), dict(offset=offset, mask=mask))
        _check_eagerly(_validation.check_deform_roi_pool, input, rois, offset, output_size,
                       spatial_scale, sampling_ratio, gamma, mask, check_batch=False)
        if _torch_onnx.exporting():  # the ONNX exporters' hook (cupydcn/torch/_onnx.py)
            return _torch_onnx.deform_roi_pool(input, rois, offset, output_size, spatial_scale,
                                               sampling_ratio, gamma, mask)
        output_size = _ints(output_size, "output_size", 1)
        spatial_scale, sampling_ratio = float(spatial_scale), int(sampling_ratio)
        gamma = float(gamma)
    return torch.ops.cupydcn.deform_roi_pool(input, rois, offset, output_size, spatial_scale,
                                             sampling_ratio, gamma, mask, algorithm)


def deform_psroi_pool(input: Tensor, rois: Tensor, trans: Optional[Tensor] = None,
                      spatial_scale: float = 1.0, output_dim: Optional[int] = None,
                      group_size: int = 1, pooled_size: int = 7, part_size: int = 0,
                      sample_per_part: int = 4, trans_std: float = 0.0,
                      return_count: bool = False, algorithm: Optional[str] = None
                      ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Deformable position-sensitive RoI pooling, the official DCN operator
    (``DeformablePSROIPooling``; DCNv2's ``dcn_v2_pooling``), differentiable in
    input and trans (not in rois). docs/semantics.md §4. A leaf of
    ``torch.fx`` symbolic tracing.

    Args:
        input: (N, output_dim*group_size**2, H, W) tensor.
        rois: (R, 5) tensor of the input's dtype, ``[batch_index, x1, y1, x2, y2]``.
        trans: (R, 2*num_classes, part, part) tensor (x at channel ``2*cls``, y
            at ``2*cls + 1``) or None (no_trans).
        spatial_scale, output_dim (None: ``C // group_size**2``), group_size,
        pooled_size, part_size (0: pooled_size), sample_per_part, trans_std:
            the operator's parameters.
        return_count: also return the samples counted per output element.
        algorithm: None (the automatic choice) or an implementation from
            ``cupydcn.algorithms("deform_psroi_pool")``, forward and backward.

    Returns:
        (R, output_dim, pooled_size, pooled_size) tensor, and with
        ``return_count`` a pair (output, count), count of that shape in the
        accumulation dtype (float32 for float16/bfloat16), not differentiable.
    """
    if not torch.jit.is_scripting():
        leaf = _fx_leaf(deform_psroi_pool, input, rois, trans, spatial_scale, output_dim,
                        group_size, pooled_size, part_size, sample_per_part, trans_std,
                        return_count, algorithm)
        if leaf is not None:
            return leaf
        _interop.check_tensors(dict(input=input, rois=rois), dict(trans=trans))
        _check_eagerly(_validation.check_deform_psroi_pool, input, rois, trans, spatial_scale,
                       output_dim, group_size, pooled_size, part_size, sample_per_part,
                       trans_std, check_batch=False)
        if _torch_onnx.exporting():  # the ONNX exporters' hook (cupydcn/torch/_onnx.py)
            return _torch_onnx.deform_psroi_pool(input, rois, trans, spatial_scale,
                                                 output_dim, group_size, pooled_size, part_size,
                                                 sample_per_part, trans_std, return_count)
        spatial_scale = float(spatial_scale)
        output_dim = None if output_dim is None else int(output_dim)
        group_size, pooled_size, part_size = int(group_size), int(pooled_size), int(part_size)
        sample_per_part, trans_std = int(sample_per_part), float(trans_std)
    out, count = torch.ops.cupydcn.deform_psroi_pool(input, rois, trans, spatial_scale,
                                                     output_dim, group_size, pooled_size,
                                                     part_size, sample_per_part, trans_std,
                                                     algorithm)
    if return_count:
        return out, count
    return out
