"""Each op declared once: its arguments, gradients, results, validation,
output shapes and reference.

The bridges (torch custom ops and their fakes, TensorFlow, Keras), ``cupydcn
check`` and ``cupydcn bench`` read these specs instead of spelling each op
out again. The numbers stay in the op modules (``_deform_conv``,
``_roi_pool``) and their registered implementations (``_dispatch``).
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Optional, Tuple

from cupydcn import _deform_conv, _dispatch, _roi_pool, _validation, reference

REQUIRED = object()

# Argument kinds: an array, an optional array, an int or (h, w) pair, an int,
# an optional int, a float, a bool.
ARRAY, OPTIONAL_ARRAY, PAIR, INT, OPTIONAL_INT, FLOAT, BOOL = (
    "array", "array?", "pair", "int", "int?", "float", "bool")


class Arg(NamedTuple):
    """One argument. ``layout``: an array's dimensions in NCHW terms, e.g.
    ``"(B, C, H, W)"`` (a PAIR argument's two components, e.g. ``"(ph, pw)"``);
    a dimension named like another array's or an int argument is the same
    size. ``spatial``: an image-like array (batch or RoI, channels, then two
    spatial axes) that a channels_last bridge holds as NHWC."""
    name: str
    kind: str
    default: object = REQUIRED
    minimum: Optional[int] = None   # for PAIR and INT arguments
    layout: Optional[str] = None
    spatial: bool = False


class OpSpec(NamedTuple):
    """One op, forward and backward (see the module docstring).

    ``args``: the forward's arguments in order (the public signature);
    ``gradients``: the backward's gradient names in order, each an array
    argument; ``grads_type``: the backward's result type; ``outputs``: the
    forward's results (``"output"``, and ``"count"`` for PS RoI pooling);
    ``backward_args``: arrays the backward takes besides ``grad_output`` and
    the forward's arguments; ``check(**arrays_and_params)``: the one
    validation, returning the geometry; ``output_shapes(geo)``: the results'
    shapes by name; ``autocast``: ``"autocast"`` (run in the autocast dtype)
    or ``"float32"`` (run in float32, return the input's dtype);
    ``output_layouts``: each output's dimensions in the symbols of the
    arguments' layouts (see :meth:`static_output_shapes`); ``acc_outputs``:
    the outputs in the accumulation dtype (the others are in the input's);
    the forward returns its outputs after the first when called with
    ``return_<name>=True`` (``return_count``); ``reads_values``: ``check``
    reads array values (``rois[:, 0]``), which ``check_batch=False`` skips;
    ``keeps_memory_format``: the output has the first array's memory format
    (channels-last or NCHW, ``_validation.is_channels_last``) and each
    gradient its array's (else every result is C-contiguous);
    ``dynamic``: the layout symbols whose sizes a traced call (``torch.export``
    with ``dynamic_shapes``, ``torch.compile(dynamic=True)``) may leave
    symbolic, the others being specialized (see :meth:`array_layouts`);
    ``derived_sizes(geo, sizes)``: the sizes of layout symbols that other
    symbols' sizes determine (``Ho`` from ``H``), by name, computed from
    ``sizes`` (symbol -> int or symbolic size) in whatever integers those are.
    """
    name: str
    args: Tuple[Arg, ...]
    gradients: Tuple[str, ...]
    grads_type: type
    outputs: Tuple[str, ...]
    forward: Callable
    backward: Callable
    check: Callable
    output_shapes: Callable
    reference_forward: Callable
    reference_backward: Callable
    backward_args: Tuple[Arg, ...] = ()
    autocast: str = "autocast"
    output_layouts: Tuple[str, ...] = ()
    acc_outputs: Tuple[str, ...] = ()
    reads_values: bool = False
    keeps_memory_format: bool = False
    dynamic: Tuple[str, ...] = ()
    derived_sizes: Optional[Callable] = None

    @property
    def arrays(self):
        """The names of the forward's array arguments."""
        return tuple(a.name for a in self.args if a.kind in (ARRAY, OPTIONAL_ARRAY))

    @property
    def params(self):
        """The forward's non-array arguments."""
        return tuple(a for a in self.args if a.kind not in (ARRAY, OPTIONAL_ARRAY))

    def bind(self, *args, **kwargs):
        """The forward's arguments by name, defaults filled in (a TypeError
        like Python's for a missing or unknown argument)."""
        names = [a.name for a in self.args]
        error = _validation.ArgumentTypeError
        if len(args) > len(names):
            raise error(f"{self.name}() takes {len(names)} arguments, got {len(args)}")
        bound = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names:
                raise error(f"{self.name}() got an unexpected argument {key!r}")
            if key in bound:
                raise error(f"{self.name}() got multiple values for argument {key!r}")
            bound[key] = value
        for arg in self.args:
            if arg.name not in bound:
                if arg.default is REQUIRED:
                    raise error(f"{self.name}() missing required argument {arg.name!r}")
                bound[arg.name] = arg.default
        return bound

    def check_shapes(self, **arrays_and_params):
        """``check`` without the checks that read array values: what a bridge
        can check when it traces a call (the core checks the values when it
        runs). The arrays need only ``.shape`` and ``.dtype``."""
        extra = {"check_batch": False} if self.reads_values else {}
        return self.check(**arrays_and_params, **extra)

    def check_algorithm(self, algorithm):
        """A bad ``algorithm=`` (not None and not the name of one of this op's
        implementations) raises the dispatcher's error naming those that
        exist, at the call; whether a named implementation can run a given
        call is decided where the call runs."""
        _dispatch.check_algorithm(self.name, algorithm)

    def array_layouts(self):
        """Each array's dimensions as layout symbols, by name: the forward's
        and backward's array arguments, ``grad_output`` (the output's layout)
        and the outputs (a symbol only where the layout names one plainly:
        ``2*offset_groups*kh*kw`` is left as that expression)."""
        layouts = dict(zip(self.outputs, self.output_layouts))
        layouts["grad_output"] = self.output_layouts[0]
        for arg in self.args + self.backward_args:
            layout = arg.layout or layouts.get(arg.name)
            if arg.kind in (ARRAY, OPTIONAL_ARRAY) and layout is not None:
                layouts[arg.name] = layout
        return {name: tuple(_symbols(layout)) for name, layout in layouts.items()}

    def static_output_shapes(self, shapes, params):
        """The outputs' shapes by name from what is known when a call is
        traced: ``shapes`` maps array names to shapes whose sizes may be None
        (unknown), ``params`` holds the other arguments. Each output dimension
        is the size of the same symbol in an argument's layout (an int
        argument, a PAIR argument's component, an array dimension, or solved
        from a product such as ``output_dim*group_size**2``), else None."""
        known = {}
        for arg in self.args:
            value = params.get(arg.name)
            if arg.kind in (INT, OPTIONAL_INT) and _is_int(value):
                known[arg.name] = int(value)
            elif arg.kind == PAIR and arg.layout is not None:
                if _is_int(value):
                    value = (value, value)
                if isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_int,
                                                                                    value)):
                    known.update(zip(_symbols(arg.layout), map(int, value)))
        sized = []   # (expression, size) of every known array dimension
        for arg in self.args:
            shape = shapes.get(arg.name)
            if arg.layout is None or shape is None or len(shape) != len(_symbols(arg.layout)):
                continue
            sized += [(e, int(s)) for e, s in zip(_symbols(arg.layout), shape) if s is not None]
        for _ in range(len(sized) + 1):   # each pass may name a symbol the next one needs
            learned = False
            for expression, size in sized:
                name, value = _solve(expression, size, known)
                if name is not None and name not in known:
                    known[name] = value
                    learned = True
            if not learned:
                break
        return {name: tuple(known.get(s) for s in _symbols(layout))
                for name, layout in zip(self.outputs, self.output_layouts)}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _symbols(layout):
    """``"(B, C, H, W)"`` -> ``["B", "C", "H", "W"]``."""
    return [s.strip() for s in layout.strip("()").split(",") if s.strip()]


def _solve(expression, size, known):
    """(symbol, value) when ``expression`` (a symbol, or a product of
    integers, symbols and ``symbol**k``) has exactly one unknown symbol, of
    power 1, that ``size`` determines; else (None, None)."""
    unknown, product = [], 1
    for factor in re.split(r"(?<!\*)\*(?!\*)", expression):
        base, _, power = factor.partition("**")
        if not base.isidentifier():
            if not base.isdigit():
                return None, None   # C/groups and the like: not solved
            product *= int(base)
        elif base in known:
            product *= known[base] ** int(power or 1)
        else:
            unknown.append((base, power))
    if len(unknown) != 1 or unknown[0][1] or not product or size % product:
        return None, None
    return unknown[0][0], size // product


def _conv_shapes(geo):
    return {"output": (geo.B, geo.Cout, geo.Ho, geo.Wo)}


def _conv_derived_sizes(geo, sizes):
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    return {"Ho": _validation.conv_output_size(sizes["H"], geo.kh, sh, ph, dh),
            "Wo": _validation.conv_output_size(sizes["W"], geo.kw, sw, pw, dw)}


def _roi_shapes(geo):
    return {"output": (geo.R, geo.C, geo.ph, geo.pw)}


def _psroi_shapes(geo):
    shape = (geo.R, geo.output_dim, geo.pooled_size, geo.pooled_size)
    return {"output": shape, "count": shape}


DEFORM_CONV2D = OpSpec(
    name="deform_conv2d",
    args=(Arg("input", ARRAY, layout="(B, C, H, W)", spatial=True),
          Arg("offset", ARRAY, layout="(B, 2*offset_groups*kh*kw, Ho, Wo)", spatial=True),
          Arg("weight", ARRAY, layout="(Cout, C/groups, kh, kw)"),
          Arg("bias", OPTIONAL_ARRAY, None, layout="(Cout,)"), Arg("stride", PAIR, 1, 1),
          Arg("padding", PAIR, 0, 0), Arg("dilation", PAIR, 1, 1),
          Arg("mask", OPTIONAL_ARRAY, None, layout="(B, offset_groups*kh*kw, Ho, Wo)",
              spatial=True)),
    gradients=_deform_conv.GRADIENTS,
    grads_type=_deform_conv.DeformConv2dGrads,
    outputs=("output",),
    forward=_deform_conv.deform_conv2d,
    backward=_deform_conv.deform_conv2d_backward,
    check=_validation.check_deform_conv2d,
    output_shapes=_conv_shapes,
    reference_forward=reference.deform_conv2d,
    reference_backward=reference.deform_conv2d_backward,
    output_layouts=("(B, Cout, Ho, Wo)",),
    keeps_memory_format=True,
    dynamic=("B", "H", "W", "Ho", "Wo"),
    derived_sizes=_conv_derived_sizes,
)

DEFORM_ROI_POOL = OpSpec(
    name="deform_roi_pool",
    args=(Arg("input", ARRAY, layout="(N, C, H, W)", spatial=True),
          Arg("rois", ARRAY, layout="(R, 5)"),
          Arg("offset", OPTIONAL_ARRAY, None, layout="(R, 2, ph, pw)", spatial=True),
          Arg("output_size", PAIR, 7, 1, layout="(ph, pw)"), Arg("spatial_scale", FLOAT, 1.0),
          Arg("sampling_ratio", INT, 0, 0), Arg("gamma", FLOAT, 0.1),
          Arg("mask", OPTIONAL_ARRAY, None, layout="(R, 1, ph, pw)", spatial=True)),
    gradients=_roi_pool.ROI_GRADIENTS,
    grads_type=_roi_pool.DeformRoIPoolGrads,
    outputs=("output",),
    forward=_roi_pool.deform_roi_pool,
    backward=_roi_pool.deform_roi_pool_backward,
    check=_validation.check_deform_roi_pool,
    output_shapes=_roi_shapes,
    reference_forward=reference.deform_roi_pool,
    reference_backward=reference.deform_roi_pool_backward,
    autocast="float32",
    output_layouts=("(R, C, ph, pw)",),
    reads_values=True,
    dynamic=("N", "R", "H", "W"),
)

DEFORM_PSROI_POOL = OpSpec(
    name="deform_psroi_pool",
    args=(Arg("input", ARRAY, layout="(N, output_dim*group_size**2, H, W)", spatial=True),
          Arg("rois", ARRAY, layout="(R, 5)"),
          Arg("trans", OPTIONAL_ARRAY, None, layout="(R, 2*num_classes, part_size, part_size)",
              spatial=True),
          Arg("spatial_scale", FLOAT, 1.0), Arg("output_dim", OPTIONAL_INT, None, 0),
          Arg("group_size", INT, 1, 1), Arg("pooled_size", INT, 7, 1),
          Arg("part_size", INT, 0, 0), Arg("sample_per_part", INT, 4, 1),
          Arg("trans_std", FLOAT, 0.0)),
    gradients=_roi_pool.PSROI_GRADIENTS,
    grads_type=_roi_pool.DeformPSRoIPoolGrads,
    outputs=("output", "count"),
    forward=_roi_pool.deform_psroi_pool,
    backward=_roi_pool.deform_psroi_pool_backward,
    check=_validation.check_deform_psroi_pool,
    output_shapes=_psroi_shapes,
    reference_forward=reference.deform_psroi_pool,
    reference_backward=reference.deform_psroi_pool_backward,
    backward_args=(Arg("count", OPTIONAL_ARRAY, None),),
    autocast="float32",
    output_layouts=("(R, output_dim, pooled_size, pooled_size)",) * 2,
    acc_outputs=("count",),
    reads_values=True,
    dynamic=("N", "R", "H", "W"),
)

SPECS = {spec.name: spec for spec in (DEFORM_CONV2D, DEFORM_ROI_POOL, DEFORM_PSROI_POOL)}
