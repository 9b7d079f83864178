"""mmcv's deformable ops under mmcv's own names, signatures and argument
orders, for mmcv / mmdetection code: change ``from mmcv.ops import X`` to
``from cupydcn.torch.mmcv import X``.

* :func:`deform_conv2d` ``(input, offset, weight, stride=1, padding=0,
  dilation=1, groups=1, deform_groups=1, bias=False, im2col_step=32)`` and
  :func:`modulated_deform_conv2d` ``(input, offset, mask, weight, bias=None,
  stride=1, padding=0, dilation=1, groups=1, deform_groups=1)``: mmcv's
  argument orders (not torchvision's, which :func:`cupydcn.torch.deform_conv2d`
  keeps);
* :class:`DeformConv2d`, :class:`DeformConv2dPack`,
  :class:`ModulatedDeformConv2d`, :class:`ModulatedDeformConv2dPack`: mmcv's
  constructors, attributes, initialisation, ``forward`` arguments and
  state_dict keys; the Packs are ``_version = 2`` and rename the offset conv
  of mmcv's version-1 checkpoints (``<layer>_offset.*`` ->
  ``<layer>.conv_offset.*``) on load, as mmcv does;
* :func:`deform_roi_pool`, :class:`DeformRoIPool`, :class:`DeformRoIPoolPack`,
  :class:`ModulatedDeformRoIPoolPack`: cupydcn.torch's, which already are mmcv's.

Same numbers as mmcv (docs/semantics.md §2, §3). Where cupydcn differs:

* ``groups`` and ``deform_groups`` are read from the tensors' shapes (as
  torchvision does); the values given are checked against them, and a
  mismatch is an error naming both, where mmcv's kernels would read the
  tensors with the wrong layout;
* ``im2col_step`` is accepted and ignored: cupydcn bounds its memory by bytes
  (``cupydcn.set_workspace_limit``), so the batch need not be divisible by it;
* ``DeformConv2d(bias=True)`` works (mmcv refuses it); ``deform_conv2d``'s
  ``bias`` stays a flag that must be False, as in mmcv;
* no padding workaround for inputs smaller than the kernel: cupydcn computes
  them directly (same result);
* ``deformable_groups=``, mmcv's older name for ``deform_groups``, is accepted
  by the four conv modules, without mmcv's deprecation warning.

Version-1 checkpoints: the Packs' ``_load_from_state_dict`` renames the old
keys as mmcv's does, which works under loaders that hand every module the
whole state dict (mmcv 1.x's ``load_checkpoint``). Today's
``torch.nn.Module.load_state_dict`` and mmengine's ``load_state_dict`` hand a
module only the keys under its own prefix, where ``<layer>_offset.*`` never
is, so there (with mmcv as with cupydcn) the old keys come out missing and
unexpected: pass the checkpoint through :func:`upgrade_state_dict` first,
``model.load_state_dict(upgrade_state_dict(model, checkpoint))``.
"""

import collections
import math

# typing's names: TorchScript reads these annotations
from typing import Optional

import torch
from torch import Tensor, nn
from torch._jit_internal import BroadcastingList2

from cupydcn import _validation
from cupydcn.torch import (
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
    _MMCVDeformConv2d,
    deform_roi_pool,
)
from cupydcn.torch import DeformConv2dPack as _DeformConv2dPack
from cupydcn.torch import ModulatedDeformConv2dPack as _ModulatedDeformConv2dPack
from cupydcn.torch import deform_conv2d as _deform_conv2d

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "ModulatedDeformRoIPoolPack",
    "deform_conv2d",
    "deform_roi_pool",
    "modulated_deform_conv2d",
    "upgrade_state_dict",
]


# --------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------


def _check_groups(input: Tensor, offset: Tensor, weight: Tensor, groups: int,
                  deform_groups: int, deform_name: str):
    """Check the ``groups`` and offset-group count an API passes explicitly
    (mmcv, DCNv2, detectron2) against what the shapes say, which is what
    cupydcn computes with. Malformed shapes are left to the op's validation,
    which names them. Scripts with ``torch.jit.script``."""
    if input.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        return
    C, Cg = input.shape[1], weight.shape[1]
    if Cg > 0 and C % Cg == 0 and C // Cg != groups:
        raise _validation.ArgumentError(f"groups must be input.shape[1] / weight.shape[1] = "
                                        f"{C} / {Cg} = {C // Cg}, got {groups}")
    per_group = 2 * weight.shape[2] * weight.shape[3]
    channels = offset.shape[1]
    if per_group > 0 and channels % per_group == 0 and channels // per_group != deform_groups:
        raise _validation.ArgumentError(f"{deform_name} must be offset.shape[1] / (2*kh*kw) = "
                                        f"{channels} / {per_group} = {channels // per_group}, "
                                        f"got {deform_groups}")


def _grouped_conv(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                  bias: Optional[Tensor], stride: BroadcastingList2[int],
                  padding: BroadcastingList2[int], dilation: BroadcastingList2[int], groups: int,
                  deform_groups: int, deform_name: str = "deform_groups") -> Tensor:
    """:func:`cupydcn.torch.deform_conv2d` for an API that names the groups.
    Scripts with ``torch.jit.script``; under ``torch.fx`` symbolic tracing
    the op is one ``call_function`` node (the groups, read from shapes, are
    not checked there)."""
    if not torch.jit.is_scripting():
        # the geometry first: a tensor passed where torchvision's order has bias
        # lands in stride, and that is the message that says so
        _validation.pair(stride, "stride", 1)
        _validation.pair(padding, "padding", 0)
        _validation.pair(dilation, "dilation", 1)
        groups = _validation._int(groups, "groups", 1)
        deform_groups = _validation._int(deform_groups, deform_name, 1)
        if not all(isinstance(t, Tensor) for t in (input, offset, weight)):
            # torch.fx Proxies (no shapes yet), or not tensors (the op says so)
            return _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    _check_groups(input, offset, weight, groups, deform_groups, deform_name)
    return _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


def _check_flags(bias, im2col_step):
    """:func:`deform_conv2d`'s ``bias`` (a flag that must be False) and
    ``im2col_step``, as Python sees them (their types included)."""
    if bias is not False:
        raise _validation.ArgumentError(f"bias must be False (mmcv's deform_conv2d takes no "
                                        f"bias; cupydcn.torch.deform_conv2d does), got {bias!r}")
    _check_im2col_step(im2col_step)


def _check_im2col_step(im2col_step):
    # ignored (cupydcn chunks by bytes), but it must still be what mmcv takes
    _validation._int(im2col_step, "im2col_step", 1)


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor,
                  stride: BroadcastingList2[int] = 1, padding: BroadcastingList2[int] = 0,
                  dilation: BroadcastingList2[int] = 1, groups: int = 1, deform_groups: int = 1,
                  bias: bool = False, im2col_step: int = 32) -> Tensor:
    """mmcv's ``deform_conv2d`` (DCNv1), mmcv's argument order. Scripts with
    ``torch.jit.script``.

    Args:
        input: (B, C, H, W) tensor.
        offset: (B, 2*deform_groups*kh*kw, Ho, Wo) tensor, (dy, dx) per tap.
        weight: (Cout, C/groups, kh, kw) tensor.
        stride, padding, dilation: int or (h, w) pair.
        groups, deform_groups: checked against ``C / weight.shape[1]`` and
            ``offset.shape[1] / (2*kh*kw)``.
        bias: must be False (mmcv's flag; mmcv has no bias here either).
        im2col_step: accepted and ignored (cupydcn bounds memory by bytes).

    Returns:
        (B, Cout, Ho, Wo) tensor, differentiable in input, offset and weight.
    """
    if not torch.jit.is_scripting():
        _check_flags(bias, im2col_step)
    elif bias:
        raise _validation.ArgumentError("bias must be False (mmcv's deform_conv2d takes no "
                                        "bias; cupydcn.torch.deform_conv2d does), got True")
    return _grouped_conv(input, offset, None, weight, None, stride, padding, dilation, groups,
                         deform_groups)


def modulated_deform_conv2d(input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                            bias: Optional[Tensor] = None, stride: BroadcastingList2[int] = 1,
                            padding: BroadcastingList2[int] = 0,
                            dilation: BroadcastingList2[int] = 1, groups: int = 1,
                            deform_groups: int = 1) -> Tensor:
    """mmcv's ``modulated_deform_conv2d`` (DCNv2), mmcv's argument order.
    Scripts with ``torch.jit.script``.

    Args:
        input: (B, C, H, W) tensor.
        offset: (B, 2*deform_groups*kh*kw, Ho, Wo) tensor, (dy, dx) per tap.
        mask: (B, deform_groups*kh*kw, Ho, Wo) tensor.
        weight: (Cout, C/groups, kh, kw) tensor.
        bias: (Cout,) tensor or None.
        stride, padding, dilation: int or (h, w) pair.
        groups, deform_groups: checked against the shapes, as in :func:`deform_conv2d`.

    Returns:
        (B, Cout, Ho, Wo) tensor, differentiable in all five tensors.
    """
    return _grouped_conv(input, offset, mask, weight, bias, stride, padding, dilation, groups,
                         deform_groups)


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


class DeformConv2d(_MMCVDeformConv2d):
    """Mirrors ``mmcv.ops.DeformConv2d``: constructor ``(in_channels,
    out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
    deform_groups=1, bias=False, im2col_step=32)``, state_dict key ``weight``
    (and ``bias`` with ``bias=True``, which mmcv refuses), weight initialised
    kaiming-uniform (relu gain) as mmcv. ``forward(x, offset)``: x (B, C, H, W),
    offset (B, 2*deform_groups*kh*kw, Ho, Wo) -> (B, out_channels, Ho, Wo).
    ``im2col_step`` is accepted and ignored.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=False, im2col_step=32, *,
                 deformable_groups=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deform_groups, bias, deformable_groups=deformable_groups)
        _check_im2col_step(im2col_step)
        self.im2col_step = im2col_step
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, offset):
        return _grouped_conv(x, offset, None, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, self.groups, self.deform_groups)


class ModulatedDeformConv2d(_MMCVDeformConv2d):
    """Mirrors ``mmcv.ops.ModulatedDeformConv2d``: constructor ``(in_channels,
    out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
    deform_groups=1, bias=True)``, state_dict keys ``weight`` and ``bias``,
    initialised as mmcv (weight uniform in +-1/sqrt(in_channels*kh*kw), bias 0).
    ``forward(x, offset, mask)``: x (B, C, H, W), offset
    (B, 2*deform_groups*kh*kw, Ho, Wo), mask (B, deform_groups*kh*kw, Ho, Wo)
    -> (B, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=True, *, deformable_groups=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deform_groups, bias, deformable_groups=deformable_groups)
        self.init_weights()

    def init_weights(self):
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, offset, mask):
        return _grouped_conv(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, self.groups, self.deform_groups)


def _upgrade_offset_keys(state_dict, prefix, version):
    """mmcv's version-1 checkpoints (mmdetection 1.x) hold a layer's offset
    conv beside it, as ``<layer>_offset.{weight,bias}``; version 2 holds it
    inside, as ``<layer>.conv_offset.{weight,bias}``. Rename in place."""
    if version is not None and version >= 2:
        return
    for name in ("weight", "bias"):
        old, new = f"{prefix[:-1]}_offset.{name}", f"{prefix}conv_offset.{name}"
        if new not in state_dict and old in state_dict:
            state_dict[new] = state_dict.pop(old)


class _LoadsVersion1:
    """mmcv's ``_version = 2`` and its ``_load_from_state_dict`` hook that
    upgrades version-1 offset keys."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        _upgrade_offset_keys(state_dict, prefix, local_metadata.get("version"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


class DeformConv2dPack(_LoadsVersion1, _DeformConv2dPack, DeformConv2d):
    """Mirrors ``mmcv.ops.DeformConv2dPack`` (mmcv's ``DCN``), a subclass of
    :class:`DeformConv2d` as in mmcv: :class:`cupydcn.torch.DeformConv2dPack`
    (same constructor, ``conv_offset`` and state_dict keys) plus mmcv's
    ``_version = 2`` and loading of version-1 checkpoints (``<layer>_offset.*``).
    ``forward(x)``: (B, C, H, W) -> (B, out_channels, Ho, Wo).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_im2col_step(self.im2col_step)

    def init_offset(self):
        self.conv_offset.weight.data.zero_()
        self.conv_offset.bias.data.zero_()


class ModulatedDeformConv2dPack(_LoadsVersion1, _ModulatedDeformConv2dPack,
                                ModulatedDeformConv2d):
    """Mirrors ``mmcv.ops.ModulatedDeformConv2dPack`` (mmcv's ``DCNv2``), a
    subclass of :class:`ModulatedDeformConv2d` as in mmcv:
    :class:`cupydcn.torch.ModulatedDeformConv2dPack` (same constructor,
    ``conv_offset`` and state_dict keys) plus mmcv's ``_version = 2`` and
    loading of version-1 checkpoints (``<layer>_offset.*``).
    ``forward(x)``: (B, C, H, W) -> (B, out_channels, Ho, Wo).
    """

    def init_weights(self):
        super().init_weights()
        if hasattr(self, "conv_offset"):  # not yet while the base constructor runs
            self.conv_offset.weight.data.zero_()
            self.conv_offset.bias.data.zero_()


def upgrade_state_dict(model, state_dict):
    """``state_dict`` with mmcv's version-1 offset keys renamed for ``model``:
    for every mmcv deformable conv Pack in ``model`` (this module's or
    cupydcn.torch's) at ``<layer>``, ``<layer>_offset.{weight,bias}`` becomes
    ``<layer>.conv_offset.{weight,bias}`` unless the checkpoint says the layer
    is version 2 or already has the new key (mmcv's rule). Returns a new dict
    (``_metadata`` kept); ``state_dict`` is not modified.

    Example:
        >>> model.load_state_dict(upgrade_state_dict(model, torch.load(path)["state_dict"]))
    """
    metadata = getattr(state_dict, "_metadata", None)
    upgraded = collections.OrderedDict(state_dict)
    if metadata is not None:
        upgraded._metadata = metadata
    for name, module in model.named_modules():
        if name and isinstance(module, (_DeformConv2dPack, _ModulatedDeformConv2dPack)):
            version = None if metadata is None else metadata.get(name, {}).get("version")
            _upgrade_offset_keys(upgraded, name + ".", version)
    return upgraded
