"""The modules and functions of the DCNv2 repository (CharlesShang/DCNv2,
``dcn_v2.py``), the deformable layers CenterNet and many detectors vendor:
change ``from .DCNv2.dcn_v2 import DCN`` to ``from cupydcn.torch.dcnv2 import DCN``.

* :class:`DCNv2` ``(in_channels, out_channels, kernel_size, stride, padding,
  dilation=1, deformable_groups=1)``, ``forward(input, offset, mask)``, and
  :class:`DCN` (same constructor), which predicts offsets and mask with
  ``conv_offset_mask``: DCNv2's argument order (the 7th is
  ``deformable_groups``), attributes, initialisation and state_dict keys
  (``weight``, ``bias``, ``conv_offset_mask.weight``, ``conv_offset_mask.bias``),
  so CenterNet checkpoints load unchanged;
* :class:`DCNv2Pooling` ``(spatial_scale, pooled_size, output_dim, no_trans,
  group_size=1, part_size=None, sample_per_part=4, trans_std=0.0)``,
  ``forward(input, rois, offset)``, and :class:`DCNPooling` (plus
  ``deform_fc_dim=1024``), which predicts trans and mask with
  ``offset_mask_fc`` (state_dict keys ``offset_mask_fc.{0,2,4}.{weight,bias}``);
* :func:`dcn_v2_conv` and :func:`dcn_v2_pooling`, the functions under them.

Same numbers as DCNv2 (docs/semantics.md §2, §4). Where cupydcn differs:

* ``DCN``'s ``conv_offset_mask`` has the layer's dilation (same weight shape);
  DCNv2 leaves it at 1, which gives offsets of the wrong size for a dilated
  layer, so DCNv2's ``DCN`` only works with ``dilation=1``, where both agree;
* position-sensitive pooling with ``group_size > 1`` works as in the official
  DCN operator (input channels ``output_dim * group_size**2``); DCNv2 requires
  ``input.shape[1] == output_dim``, which works only with ``group_size = 1``;
* a trans with more rows than RoIs is accepted, as DCNv2 does: RoI ``r``
  uses row ``r``, the rows past the RoIs are ignored (gradient 0); fewer rows
  are an error (DCNv2 reads past the end);
* a ``DCNPooling`` with trans needs ``part_size == pooled_size`` (its head
  predicts a pooled_size x pooled_size trans; DCNv2 would read it with the
  wrong stride), checked by the constructor.
"""

# typing's names: TorchScript reads these annotations
from typing import Optional

import torch
import torch.fx
from torch import Tensor, nn
from torch._jit_internal import BroadcastingList2

from cupydcn import _validation
from cupydcn.torch import DeformPSRoIPool, deform_psroi_pool
from cupydcn.torch.modules import _psroi_output
from cupydcn.torch.mmcv import ModulatedDeformConv2d, _grouped_conv

__all__ = ["DCN", "DCNPooling", "DCNv2", "DCNv2Pooling", "dcn_v2_conv", "dcn_v2_pooling"]


def dcn_v2_conv(input: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                bias: Optional[Tensor], stride: BroadcastingList2[int],
                padding: BroadcastingList2[int], dilation: BroadcastingList2[int],
                deformable_groups: int) -> Tensor:
    """DCNv2's ``dcn_v2_conv``: modulated deformable convolution, no groups.

    Args:
        input: (B, C, H, W) tensor.
        offset: (B, 2*deformable_groups*kh*kw, Ho, Wo) tensor, (dy, dx) per tap.
        mask: (B, deformable_groups*kh*kw, Ho, Wo) tensor.
        weight: (Cout, C, kh, kw) tensor.
        bias: (Cout,) tensor.
        stride, padding, dilation: int or (h, w) pair.
        deformable_groups: checked against ``offset.shape[1] / (2*kh*kw)``.

    Returns:
        (B, Cout, Ho, Wo) tensor, differentiable in all five tensors.
    """
    return _grouped_conv(input, offset, mask, weight, bias, stride, padding, dilation, 1,
                         deformable_groups, "deformable_groups")


class DCNv2(ModulatedDeformConv2d):
    """Mirrors DCNv2's ``DCNv2``: modulated deformable convolution with
    external offsets and mask; ``weight`` (out, in, kh, kw) uniform in
    +-1/sqrt(in_channels*kh*kw), ``bias`` (out,) zero (mmcv's
    ModulatedDeformConv2d with ``groups = 1``, which it subclasses).
    ``forward(input, offset, mask)``: input (B, C, H, W), offset
    (B, 2*deformable_groups*kh*kw, Ho, Wo), mask (B, deformable_groups*kh*kw,
    Ho, Wo) -> (B, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1,
                 deformable_groups=1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups=1, deform_groups=deformable_groups, bias=True)

    def reset_parameters(self):
        """DCNv2's name for :meth:`init_weights`."""
        self.init_weights()

    @property
    def deformable_groups(self):
        """DCNv2's name for ``deform_groups``."""
        return self.deform_groups

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return dcn_v2_conv(input, offset, mask, self.weight, self.bias, self.stride,
                           self.padding, self.dilation, self.deformable_groups)


class DCN(DCNv2):
    """Mirrors DCNv2's ``DCN`` (CenterNet's deformable layer): :class:`DCNv2`
    whose offsets and mask come from ``conv_offset_mask``, an
    ``nn.Conv2d(in_channels, deformable_groups*3*kh*kw)`` of the layer's
    geometry, zero-initialised: its output splits in three along channels,
    the first two thirds are the offsets, the last goes through a sigmoid.
    ``forward(input)``: (B, C, H, W) -> (B, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1,
                 deformable_groups=1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         deformable_groups)
        self.conv_offset_mask = self._conv_offset(3)

    def init_offset(self):
        self.conv_offset_mask.weight.data.zero_()
        self.conv_offset_mask.bias.data.zero_()

    def forward(self, input: Tensor) -> Tensor:
        o1, o2, mask = torch.chunk(self.conv_offset_mask(input), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return dcn_v2_conv(input, offset, torch.sigmoid(mask), self.weight, self.bias,
                           self.stride, self.padding, self.dilation, self.deformable_groups)


def dcn_v2_pooling(input: Tensor, rois: Tensor, offset: Optional[Tensor], spatial_scale: float,
                   pooled_size: int, output_dim: int, no_trans: bool, group_size: int = 1,
                   part_size: Optional[int] = None, sample_per_part: int = 4,
                   trans_std: float = 0.0) -> Tensor:
    """DCNv2's ``dcn_v2_pooling``: deformable position-sensitive RoI pooling
    (:func:`cupydcn.torch.deform_psroi_pool`, DCNv2's argument order).

    Args:
        input: (N, output_dim*group_size**2, H, W) tensor.
        rois: (R, 5) tensor, ``[batch_index, x1, y1, x2, y2]``.
        offset: the trans, (R', 2*num_classes, part_size, part_size) with
            R' >= R (RoI r uses row r), ignored when ``no_trans``.
        part_size: None means pooled_size.

    Returns:
        (R, output_dim, pooled_size, pooled_size) tensor.
    """
    trans: Optional[Tensor] = None
    if not no_trans:
        trans = offset
        if trans is not None:
            trans = _first_rows(trans, rois)
    return _psroi_output(deform_psroi_pool(input, rois, trans, spatial_scale, output_dim,
                                           group_size, pooled_size,
                                           pooled_size if part_size is None else part_size,
                                           sample_per_part, trans_std))


def _first_rows(trans: Tensor, rois: Tensor) -> Tensor:
    """The rows of ``trans`` the RoIs use: DCNv2 takes more rows than RoIs
    (RoI r uses row r, the others are unused); fewer are left to the op's
    check, which names them. Under ``torch.fx`` symbolic tracing the slice
    is recorded (a no-op when the counts match); what is not a tensor is
    left to the op, which says what it expected."""
    if not torch.jit.is_scripting():
        if isinstance(trans, torch.fx.Proxy) or isinstance(rois, torch.fx.Proxy):
            return trans[:rois.shape[0]]
        if not isinstance(trans, Tensor) or not isinstance(rois, Tensor):
            return trans
    if trans.dim() > 0 and rois.dim() > 0 and trans.shape[0] > rois.shape[0]:
        return trans[:rois.shape[0]]
    return trans


class DCNv2Pooling(DeformPSRoIPool):
    """Mirrors DCNv2's ``DCNv2Pooling`` (:class:`cupydcn.torch.DeformPSRoIPool`,
    same constructor), accepting, as DCNv2 does, a trans with more rows than
    RoIs. ``forward(input, rois, offset)``: input (N, output_dim*group_size**2,
    H, W), rois (R, 5), offset (the trans, (R' >= R, 2*num_classes, part_size,
    part_size), ignored when ``no_trans``) -> (R, output_dim, pooled_size, pooled_size).
    """

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        if not self.no_trans and offset is None:
            raise _validation.ArgumentError(
                "offset (the trans) is required when no_trans is False")
        return dcn_v2_pooling(input, rois, offset, self.spatial_scale, self.pooled_size,
                              self.output_dim, self.no_trans, self.group_size, self.part_size,
                              self.sample_per_part, self.trans_std)


class DCNPooling(DCNv2Pooling):
    """Mirrors DCNv2's ``DCNPooling``: with ``no_trans`` a plain
    position-sensitive RoI pooling; otherwise it pools once without trans,
    predicts trans and mask from that with ``offset_mask_fc`` (Linear(ps*ps*
    output_dim, deform_fc_dim) - ReLU - Linear(deform_fc_dim, deform_fc_dim) -
    ReLU - Linear(deform_fc_dim, ps*ps*3), the last zero-initialised; channels
    0-1 are the trans, channel 2 the mask after a sigmoid), pools again with
    the trans and multiplies by the mask. Same constructor (``deform_fc_dim``
    last) and state_dict keys as DCNv2. ``forward(input, rois)``:
    input (N, output_dim*group_size**2, H, W), rois (R, 5) ->
    (R, output_dim, pooled_size, pooled_size).
    """

    def __init__(self, spatial_scale, pooled_size, output_dim, no_trans, group_size=1,
                 part_size=None, sample_per_part=4, trans_std=0.0, deform_fc_dim=1024):
        super().__init__(spatial_scale, pooled_size, output_dim, no_trans, group_size, part_size,
                         sample_per_part, trans_std)
        self.deform_fc_dim = deform_fc_dim
        if not no_trans:
            if self.part_size != pooled_size:
                raise _validation.ArgumentError(
                    f"part_size must be pooled_size = {pooled_size} when no_trans is False "
                    f"(offset_mask_fc predicts a pooled_size x pooled_size trans), "
                    f"got {part_size!r}")
            self.offset_mask_fc = nn.Sequential(
                nn.Linear(pooled_size * pooled_size * output_dim, deform_fc_dim),
                nn.ReLU(inplace=True),
                nn.Linear(deform_fc_dim, deform_fc_dim),
                nn.ReLU(inplace=True),
                nn.Linear(deform_fc_dim, pooled_size * pooled_size * 3))
            nn.init.zeros_(self.offset_mask_fc[4].weight)
            nn.init.zeros_(self.offset_mask_fc[4].bias)

    def _pool(self, input: Tensor, rois: Tensor, trans: Optional[Tensor], no_trans: bool) -> Tensor:
        return dcn_v2_pooling(input, rois, trans, self.spatial_scale, self.pooled_size,
                              self.output_dim, no_trans, self.group_size, self.part_size,
                              self.sample_per_part, self.trans_std)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        if self.no_trans or not hasattr(self, "offset_mask_fc"):
            return self._pool(input, rois, None, True)
        n = rois.shape[0]
        pooled = self._pool(input, rois, None, True)
        offset_mask = self.offset_mask_fc(pooled.reshape(n, -1))
        o1, o2, mask = torch.chunk(offset_mask.reshape(n, 3, self.pooled_size, self.pooled_size),
                                   3, dim=1)
        return self._pool(input, rois, torch.cat((o1, o2), dim=1), False) * torch.sigmoid(mask)
