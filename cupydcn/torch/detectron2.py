"""detectron2's deformable convolution layers (``detectron2.layers.DeformConv``
and ``ModulatedDeformConv``) under their names, constructors, attributes,
``forward`` arguments and state_dict keys: change
``from detectron2.layers import DeformConv`` to
``from cupydcn.torch.detectron2 import DeformConv``.

Both take ``(in_channels, out_channels, kernel_size, stride=1, padding=0,
dilation=1, groups=1, deformable_groups=1, bias, norm=None, activation=None)``
(``bias=False`` for ``DeformConv``, ``True`` for ``ModulatedDeformConv``), hold
``weight`` (out, in/groups, kh, kw), ``bias`` when asked for, and ``norm`` (a
module, whose keys appear under ``norm.``) applied before ``activation``, as
detectron2. On an empty input the (empty) result skips norm and activation,
as detectron2's does. Same numbers as detectron2 (docs/semantics.md §2).

Where cupydcn differs: the CPU runs (detectron2's DCNv2 does not),
``DeformConv(bias=True)`` works (detectron2 refuses it), ``ModulatedDeformConv``
takes ``(h, w)`` pairs for stride, padding and dilation as well as ints, and
the offset-group count is read from the offset's shape and checked against
``deformable_groups``.
"""

# typing's names: TorchScript reads these annotations
from typing import Optional

import torch
import torch.fx
from torch import Tensor, nn

from cupydcn.torch import _conv_parameters
from cupydcn.torch.mmcv import _grouped_conv

__all__ = ["DeformConv", "ModulatedDeformConv"]


def _empty(x: Tensor) -> bool:
    """Whether ``x`` has no elements; never under ``torch.fx`` symbolic
    tracing, whose graph cannot branch on data: there the norm and the
    activation are recorded, and run on an empty batch too (torch's norms
    and activations return it empty)."""
    if not torch.jit.is_scripting():
        if isinstance(x, torch.fx.Proxy):
            return False
    return x.numel() == 0


class _Detectron2DeformConv(nn.Module):
    """What detectron2's two layers share."""

    __constants__ = ["_activated"]

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                 deformable_groups, bias, norm, activation):
        super().__init__()
        _conv_parameters(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)
        self.deformable_groups = deformable_groups
        self.norm = norm
        self.activation = activation
        self._activated = activation is not None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _conv(self, x: Tensor, offset: Tensor, mask: Optional[Tensor]) -> Tensor:
        out = _grouped_conv(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                            self.dilation, self.groups, self.deformable_groups,
                            "deformable_groups")
        if _empty(x):
            return out
        if self.norm is not None:
            out = self.norm(out)
        if torch.jit.is_scripting():
            # TorchScript cannot compare a function with None: the constructor's
            # answer, a constant, decides
            if self._activated:
                out = self.activation(out)
        elif self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, "
                f"deformable_groups={self.deformable_groups}, bias={self.bias is not None}")


class DeformConv(_Detectron2DeformConv):
    """Mirrors ``detectron2.layers.DeformConv`` (DCNv1): weight kaiming-uniform
    (relu gain), no bias by default. ``forward(x, offset)``: x (B, C, H, W),
    offset (B, 2*deformable_groups*kh*kw, Ho, Wo) -> (B, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deformable_groups=1, bias=False, norm=None, activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deformable_groups, bias, norm, activation)

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        return self._conv(x, offset, None)


class ModulatedDeformConv(_Detectron2DeformConv):
    """Mirrors ``detectron2.layers.ModulatedDeformConv`` (DCNv2): weight
    kaiming-uniform (relu gain), bias 0; ``stride``, ``padding`` and
    ``dilation`` kept as given (detectron2 keeps its ints), ``with_bias``.
    ``forward(x, offset, mask)``: x (B, C, H, W), offset
    (B, 2*deformable_groups*kh*kw, Ho, Wo), mask (B, deformable_groups*kh*kw,
    Ho, Wo) -> (B, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deformable_groups=1, bias=True, norm=None, activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deformable_groups, bias, norm, activation)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.with_bias = bias

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return self._conv(x, offset, mask)
