"""Each op declared once: its arguments, gradients, results, validation,
output shapes and reference.

The bridges (torch custom ops and their fakes, TensorFlow, Keras), ``cupydcn
check`` and ``cupydcn bench`` read these specs instead of spelling each op
out again. The numbers stay in the op modules (``_deform_conv``,
``_roi_pool``) and their registered implementations (``_dispatch``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

from cupydcn import _deform_conv, _roi_pool, _validation, reference

REQUIRED = object()

# Argument kinds: an array, an optional array, an int or (h, w) pair, an int,
# an optional int, a float, a bool.
ARRAY, OPTIONAL_ARRAY, PAIR, INT, OPTIONAL_INT, FLOAT, BOOL = (
    "array", "array?", "pair", "int", "int?", "float", "bool")


class Arg(NamedTuple):
    name: str
    kind: str
    default: object = REQUIRED
    minimum: Optional[int] = None   # for PAIR and INT arguments


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
    or ``"float32"`` (run in float32, return the input's dtype).
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


def _conv_shapes(geo):
    return {"output": (geo.B, geo.Cout, geo.Ho, geo.Wo)}


def _roi_shapes(geo):
    return {"output": (geo.R, geo.C, geo.ph, geo.pw)}


def _psroi_shapes(geo):
    shape = (geo.R, geo.output_dim, geo.pooled_size, geo.pooled_size)
    return {"output": shape, "count": shape}


DEFORM_CONV2D = OpSpec(
    name="deform_conv2d",
    args=(Arg("input", ARRAY), Arg("offset", ARRAY), Arg("weight", ARRAY),
          Arg("bias", OPTIONAL_ARRAY, None), Arg("stride", PAIR, 1, 1),
          Arg("padding", PAIR, 0, 0), Arg("dilation", PAIR, 1, 1),
          Arg("mask", OPTIONAL_ARRAY, None)),
    gradients=_deform_conv.GRADIENTS,
    grads_type=_deform_conv.DeformConv2dGrads,
    outputs=("output",),
    forward=_deform_conv.deform_conv2d,
    backward=_deform_conv.deform_conv2d_backward,
    check=_validation.check_deform_conv2d,
    output_shapes=_conv_shapes,
    reference_forward=reference.deform_conv2d,
    reference_backward=reference.deform_conv2d_backward,
)

DEFORM_ROI_POOL = OpSpec(
    name="deform_roi_pool",
    args=(Arg("input", ARRAY), Arg("rois", ARRAY), Arg("offset", OPTIONAL_ARRAY, None),
          Arg("output_size", PAIR, 7, 1), Arg("spatial_scale", FLOAT, 1.0),
          Arg("sampling_ratio", INT, 0, 0), Arg("gamma", FLOAT, 0.1),
          Arg("mask", OPTIONAL_ARRAY, None)),
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
)

DEFORM_PSROI_POOL = OpSpec(
    name="deform_psroi_pool",
    args=(Arg("input", ARRAY), Arg("rois", ARRAY), Arg("trans", OPTIONAL_ARRAY, None),
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
)

SPECS = {spec.name: spec for spec in (DEFORM_CONV2D, DEFORM_ROI_POOL, DEFORM_PSROI_POOL)}
