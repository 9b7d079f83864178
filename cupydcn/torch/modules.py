"""The torchvision- and mmcv-compatible modules, on :mod:`cupydcn.torch`'s ops.

:class:`DeformConv2d` (torchvision's), :class:`DeformConv2dPack`,
:class:`ModulatedDeformConv2dPack`, :class:`DeformRoIPool`,
:class:`DeformRoIPoolPack`, :class:`ModulatedDeformRoIPoolPack` (mmcv's) and
:class:`DeformPSRoIPool` (DCNv2's ``DCNv2Pooling``): each library's
constructor, parameters, state_dict keys and initialisation, so checkpoints
load. Each takes a keyword-only ``algorithm=None`` (the implementation, as
the ops' ``algorithm=``; :class:`DeformPSRoIPool` keeps DCNv2's constructor
and reads the ``algorithm`` attribute). :class:`DeformConv2d` and the conv
Packs script with ``torch.jit.script``; under ``torch.fx`` symbolic tracing
their op is one ``call_function`` node.
"""

import math

# typing's names: TorchScript reads these annotations
from typing import Optional, Tuple, Union

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from cupydcn import _validation
from cupydcn.torch._ops import deform_conv2d, deform_psroi_pool, deform_roi_pool


def _fx_module_leaf(module, args):
    """Under ``torch.fx`` symbolic tracing (a Proxy among ``args``) of a model
    holding ``module``, the call recorded as one ``call_module`` node, as the
    tracer records torch.nn's modules; else None. The root module being
    traced cannot be a node of its own graph: it is traced through."""
    proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    try:
        path = proxy.tracer.path_of_module(module)
    except NameError:  # not a submodule of the traced root
        return None
    if not path:
        return None
    return proxy.tracer.create_proxy("call_module", path, args, {})


def _conv_parameters(module, in_channels, out_channels, kernel_size, stride, padding, dilation,
                     groups, bias):
    """The geometry attributes, ``weight`` (out, in/groups, kh, kw) and ``bias``
    (out,) or None that torchvision's and mmcv's deformable conv modules share
    (uninitialised: each module initialises them its library's way)."""
    for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
        if channels % groups != 0:
            raise _validation.ArgumentError(
                f"{name} = {channels} must be divisible by groups = {groups}")
    module.in_channels = in_channels
    module.out_channels = out_channels
    module.kernel_size = _pair(kernel_size)
    module.stride = _pair(stride)
    module.padding = _pair(padding)
    module.dilation = _pair(dilation)
    module.groups = groups
    module.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                             *module.kernel_size))
    if bias:
        module.bias = nn.Parameter(torch.empty(out_channels))
    else:
        module.register_parameter("bias", None)


class DeformConv2d(nn.Module):
    """Mirrors ``torchvision.ops.DeformConv2d``: same constructor, parameters
    (``weight`` (out, in/groups, kh, kw), ``bias`` (out,) or None), state_dict
    keys and initialisation (kaiming-uniform with a=sqrt(5), bias uniform in
    +-1/sqrt(fan_in)). Offsets (and the optional DCNv2 mask) are inputs of
    ``forward(input, offset, mask=None)``; offset groups come from their shape.
    ``algorithm``: None (the automatic choice) or an implementation from
    ``cupydcn.algorithms("deform_conv2d")``. Scripts with ``torch.jit.script``.

    Under ``torch.fx`` symbolic tracing of a model holding it, the layer is
    one ``call_module`` node without extra tracer arguments, as torchvision's
    ``DeformConv2d`` is in ``torchvision.models.feature_extraction`` (which
    makes torchvision's ops leaves); traced as the root, its op is one
    ``call_function`` node.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, *, algorithm=None):
        super().__init__()
        _conv_parameters(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)
        self.algorithm = algorithm
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """input (B, C, H, W), offset (B, 2*dg*kh*kw, Ho, Wo), mask
        (B, dg*kh*kw, Ho, Wo) or None -> (B, out_channels, Ho, Wo)."""
        if not torch.jit.is_scripting():
            leaf = _fx_module_leaf(self, (input, offset) if mask is None else (input, offset, mask))
            if leaf is not None:
                return leaf
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, mask=mask,
                             algorithm=self.algorithm)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        s += f", algorithm={self.algorithm!r}" if self.algorithm is not None else ""
        return s


class _MMCVDeformConv2d(nn.Module):
    """The part mmcv's DeformConv2d and ModulatedDeformConv2d share."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                 groups, deform_groups, bias, deformable_groups=None):
        super().__init__()
        _conv_parameters(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)
        if deformable_groups is not None:  # mmcv's older name, accepted where mmcv accepts it
            if deform_groups not in (1, deformable_groups):
                raise _validation.ArgumentError(
                    f"deformable_groups is mmcv's older name for deform_groups: give one, got "
                    f"deform_groups={deform_groups!r} and deformable_groups={deformable_groups!r}")
            deform_groups = deformable_groups
        self.deform_groups = deform_groups
        # nn.Conv2d compatibility, as mmcv
        self.transposed = False
        self.output_padding = (0,)

    def _conv_offset(self, per_tap):
        kh, kw = self.kernel_size
        conv = nn.Conv2d(self.in_channels, self.deform_groups * per_tap * kh * kw,
                         kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                         dilation=self.dilation, bias=True)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, deform_groups={self.deform_groups}, "
                f"bias={self.bias is not None}")


class DeformConv2dPack(_MMCVDeformConv2d):
    """Mirrors ``mmcv.ops.DeformConv2dPack`` (registered in mmcv as ``DCN``):
    a DCNv1 layer that predicts its own offsets with ``conv_offset``, an
    ``nn.Conv2d(in_channels, deform_groups*2*kh*kw)`` of the layer's geometry,
    zero-initialised, so the layer starts as a plain convolution.

    Constructor and state_dict keys are mmcv's (``weight``,
    ``conv_offset.weight``, ``conv_offset.bias``; with ``bias=True``, which
    mmcv refuses and cupydcn supports, also ``bias``); ``weight`` is
    initialised as mmcv 2.x does (kaiming-uniform, relu gain). ``im2col_step``
    is accepted and ignored: cupydcn chunks by ``cupydcn.set_workspace_limit``;
    ``deformable_groups=``, mmcv's older name for ``deform_groups``, is accepted;
    ``algorithm=`` (keyword only) as :class:`DeformConv2d`'s.
    ``forward(x)``: (B, C, H, W) -> (B, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=False, im2col_step=32, *,
                 deformable_groups=None, algorithm=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deform_groups, bias, deformable_groups=deformable_groups)
        self.algorithm = algorithm
        self.im2col_step = im2col_step
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.conv_offset = self._conv_offset(2)

    def forward(self, x: Tensor) -> Tensor:
        offset = self.conv_offset(x)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, algorithm=self.algorithm)


class ModulatedDeformConv2dPack(_MMCVDeformConv2d):
    """Mirrors ``mmcv.ops.ModulatedDeformConv2dPack`` (mmcv's ``DCNv2``): a
    DCNv2 layer whose ``conv_offset``, an ``nn.Conv2d(in_channels,
    deform_groups*3*kh*kw)`` of the layer's geometry, zero-initialised,
    predicts offsets and a mask: its output is split in three along channels,
    the first two thirds are the offsets, the last goes through a sigmoid.

    Constructor and state_dict keys are mmcv's (``weight``, ``bias``,
    ``conv_offset.weight``, ``conv_offset.bias``), as is the initialisation
    (weight uniform in +-1/sqrt(in_channels*kh*kw), bias 0). At init the mask
    is 0.5 everywhere and the offsets 0. ``deformable_groups=``, mmcv's older
    name for ``deform_groups``, is accepted; ``algorithm=`` (keyword only) as
    :class:`DeformConv2d`'s. ``forward(x)``: (B, C, H, W) ->
    (B, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=True, *, deformable_groups=None,
                 algorithm=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deform_groups, bias, deformable_groups=deformable_groups)
        self.algorithm = algorithm
        stdv = 1.0 / math.sqrt(in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.conv_offset = self._conv_offset(3)

    def forward(self, x: Tensor) -> Tensor:
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask=torch.sigmoid(mask), algorithm=self.algorithm)


class DeformRoIPool(nn.Module):
    """Mirrors ``mmcv.ops.DeformRoIPool``: same constructor
    ``(output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1)``, no
    parameters; ``forward(input, rois, offset=None)``: input (N, C, H, W), rois
    (R, 5), offset (R, 2, ph, pw) -> (R, C, ph, pw). ``algorithm`` (keyword
    only): None (the automatic choice) or an implementation from
    ``cupydcn.algorithms("deform_roi_pool")``."""

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1, *,
                 algorithm=None):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.algorithm = algorithm

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma, algorithm=self.algorithm)

    def extra_repr(self):
        s = (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
             f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")
        return s + (f", algorithm={self.algorithm!r}" if self.algorithm is not None else "")


def _mmcv_fc(in_features, hidden, out_features, layers):
    """mmcv's offset_fc (3 Linear layers) / mask_fc (2 Linear layers and a
    Sigmoid): Linear and in-place ReLU alternating, the last Linear zeroed."""
    modules = [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
    if layers == 3:
        modules += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
    modules.append(nn.Linear(hidden, out_features))
    nn.init.zeros_(modules[-1].weight)
    nn.init.zeros_(modules[-1].bias)
    return modules


class DeformRoIPoolPack(DeformRoIPool):
    """Mirrors ``mmcv.ops.DeformRoIPoolPack``: pools once without offsets,
    predicts per-bin offsets from that with ``offset_fc`` (Linear(ph*pw*C,
    fc) - ReLU - Linear(fc, fc) - ReLU - Linear(fc, ph*pw*2), the last layer
    zero-initialised), then pools again with them. Same constructor
    ``(output_size, output_channels, deform_fc_channels=1024,
    spatial_scale=1.0, sampling_ratio=0, gamma=0.1)`` and state_dict keys
    (``offset_fc.{0,2,4}.{weight,bias}``). ``forward(input, rois)``:
    input (N, output_channels, H, W), rois (R, 5) -> (R, output_channels, ph, pw).
    """

    def __init__(self, output_size, output_channels, deform_fc_channels=1024, spatial_scale=1.0,
                 sampling_ratio=0, gamma=0.1, *, algorithm=None):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma, algorithm=algorithm)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        ph, pw = self.output_size
        self.offset_fc = nn.Sequential(
            *_mmcv_fc(ph * pw * output_channels, deform_fc_channels, ph * pw * 2, layers=3))

    def _check_channels(self, input: Tensor):
        if not torch.jit.is_scripting():
            if isinstance(input, torch.fx.Proxy):  # torch.fx symbolic tracing: no shape yet
                return
        if input.shape[1] != self.output_channels:
            raise _validation.ArgumentError(f"input.shape[1] must be output_channels = "
                                            f"{self.output_channels}, got {input.shape[1]}")

    def _pool_and_offset(self, input, rois):
        self._check_channels(input)
        x = deform_roi_pool(input, rois, None, self.output_size, self.spatial_scale,
                            self.sampling_ratio, self.gamma, algorithm=self.algorithm)
        x = x.reshape(rois.shape[0], -1)
        offset = self.offset_fc(x).reshape(rois.shape[0], 2, *self.output_size)
        return x, offset

    def forward(self, input, rois):
        _, offset = self._pool_and_offset(input, rois)
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma, algorithm=self.algorithm)


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """Mirrors ``mmcv.ops.ModulatedDeformRoIPoolPack``: as
    :class:`DeformRoIPoolPack`, plus ``mask_fc`` (Linear(ph*pw*C, fc) - ReLU -
    Linear(fc, ph*pw) - Sigmoid, the last Linear zero-initialised, so the mask
    starts at 0.5) whose (R, 1, ph, pw) output multiplies the pooled result.
    Same constructor and state_dict keys as mmcv (``offset_fc.{0,2,4}.*``,
    ``mask_fc.{0,2}.*``).
    """

    def __init__(self, output_size, output_channels, deform_fc_channels=1024, spatial_scale=1.0,
                 sampling_ratio=0, gamma=0.1, *, algorithm=None):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale,
                         sampling_ratio, gamma, algorithm=algorithm)
        ph, pw = self.output_size
        self.mask_fc = nn.Sequential(
            *_mmcv_fc(ph * pw * output_channels, deform_fc_channels, ph * pw, layers=2),
            nn.Sigmoid())

    def forward(self, input, rois):
        x, offset = self._pool_and_offset(input, rois)
        mask = self.mask_fc(x).reshape(rois.shape[0], 1, *self.output_size)
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma, mask=mask,
                               algorithm=self.algorithm)


def _psroi_output(result: Union[Tensor, Tuple[Tensor, Tensor]]) -> Tensor:
    """The pooled output of :func:`cupydcn.torch.deform_psroi_pool` called
    without ``return_count`` (a Union to TorchScript, which this refines)."""
    if isinstance(result, tuple):
        return result[0]
    return result


class DeformPSRoIPool(nn.Module):
    """Mirrors ``DCNv2Pooling`` of the DCNv2 repository (the PyTorch port of
    the official DCN ``DeformablePSROIPooling``): same constructor
    ``(spatial_scale, pooled_size, output_dim, no_trans, group_size=1,
    part_size=None, sample_per_part=4, trans_std=0.0)``, no parameters.
    ``forward(input, rois, offset=None)``: input (N, output_dim*group_size**2,
    H, W), rois (R, 5), offset (the trans, (R, 2*num_classes, part, part),
    ignored when ``no_trans``) -> (R, output_dim, pooled_size, pooled_size).
    The constructor stays DCNv2's: set the ``algorithm`` attribute (None, the
    automatic choice, or a name from ``cupydcn.algorithms("deform_psroi_pool")``)
    to pick an implementation. Scripts with ``torch.jit.script`` (the
    ``spatial_scale`` and ``trans_std`` attributes are floats, as the op's).
    """

    def __init__(self, spatial_scale, pooled_size, output_dim, no_trans, group_size=1,
                 part_size=None, sample_per_part=4, trans_std=0.0):
        super().__init__()
        self.spatial_scale = _validation._real(spatial_scale, "spatial_scale")
        self.pooled_size = pooled_size
        self.output_dim = output_dim
        self.no_trans = no_trans
        self.group_size = group_size
        self.part_size = pooled_size if part_size is None else part_size
        self.sample_per_part = sample_per_part
        self.trans_std = _validation._real(trans_std, "trans_std")
        self.algorithm = None

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        trans = None if self.no_trans else offset
        if trans is None and not self.no_trans:
            raise _validation.ArgumentError(
                "offset (the trans) is required when no_trans is False")
        return _psroi_output(deform_psroi_pool(
            input, rois, trans, self.spatial_scale, self.output_dim, self.group_size,
            self.pooled_size, self.part_size, self.sample_per_part, self.trans_std,
            algorithm=self.algorithm))

    def extra_repr(self):
        return (f"spatial_scale={self.spatial_scale}, pooled_size={self.pooled_size}, "
                f"output_dim={self.output_dim}, no_trans={self.no_trans}, "
                f"group_size={self.group_size}, part_size={self.part_size}, "
                f"sample_per_part={self.sample_per_part}, trans_std={self.trans_std}")
