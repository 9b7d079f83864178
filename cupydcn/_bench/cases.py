"""The cases: one class per op kind (conv, roi, psroi), their command-line
syntax and the built-in suites.

A case is one layer shape. It knows the op it runs (a key of
``cupydcn._ops.SPECS``: the arrays, parameters, gradients and reference come
from the spec), how to draw its inputs, which arrays the correctness gate
slices, its parameters by the spec's argument names, its comparison libraries
(:class:`Comparison`: torchvision, dense cuDNN, or none) and the float64
reference each result is held to.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Callable, NamedTuple, Tuple

import numpy

from cupydcn import _dtypes
from cupydcn._bench.libraries import TorchRunner, spec_reference
from cupydcn._ops import SPECS

MAX_SETS = 8
ROI_CHECK = 64   # RoIs the NumPy reference checks (it loops over RoIs in Python)
PSROI_CHECK_SAMPLES = 2**20   # PS RoI: fewer RoIs when each has many samples (memory, time)


class Comparison(NamedTuple):
    """A comparison library of a case: the column it fills, what the table
    calls it, what it needs (``"torch"`` or ``"torchvision"``), the inputs
    that get gradients (in the order of its gradients), the other inputs it
    reads, the key of the float64 reference it is held to, and its forward
    ``forward(torch, torchvision_ops, case, tensors)``."""
    column: str
    label: str
    needs: str
    leaves: Tuple[str, ...]
    others: Tuple[str, ...]
    reference: str
    forward: Callable


def _pair_text(p):
    return str(p[0]) if p[0] == p[1] else f"{p[0]}x{p[1]}"


def _draw(rng, shape, kind):
    if kind == "normal":
        return rng.standard_normal(shape, dtype=numpy.float32)
    low, high = kind
    return (rng.random(shape, dtype=numpy.float32) * (high - low) + low).astype(numpy.float32)


def _boxes(rng, R, N, H, W, spatial_scale):
    """R boxes ``[image, x1, y1, x2, y2]`` in image coordinates on N feature maps of
    H x W at ``spatial_scale``: sizes log-uniform from 16 px to half the image."""
    img_h, img_w = H / spatial_scale, W / spatial_scale
    smallest = min(16.0, img_h, img_w)
    size_h = numpy.exp(rng.uniform(math.log(smallest), math.log(max(img_h / 2, smallest)), R))
    size_w = numpy.exp(rng.uniform(math.log(smallest), math.log(max(img_w / 2, smallest)), R))
    y1 = rng.uniform(0, img_h - size_h)
    x1 = rng.uniform(0, img_w - size_w)
    return numpy.stack([rng.integers(0, N, R).astype(numpy.float64),
                        x1, y1, x1 + size_w, y1 + size_h], axis=1).astype(numpy.float32)


class _Case:
    """What every case kind shares; the subclasses say the rest (class attributes
    ``kind``, ``op`` (a key of ``SPECS``), ``reference_key`` (the float64
    reference cupydcn is held to), ``option`` and ``syntax`` (the command
    line), ``per_item``)."""

    per_item = frozenset()   # arrays the gate slices along axis 0

    @property
    def spec_of_op(self):
        """The op's declaration (``cupydcn._ops.SPECS``)."""
        return SPECS[self.op]

    @property
    def check_items(self):
        """How many items (images or RoIs) the NumPy reference checks."""
        return ROI_CHECK

    def sliced(self, baselines):
        """Whether the gate checks a slice (the NumPy reference is slow) or all of set 0."""
        return True

    def check_slice(self, host, sliced):
        """The inputs the correctness gate runs on: all of set 0, or its first
        :attr:`check_items` items along the arrays of :attr:`per_item`."""
        if not sliced:
            return host
        n = self.check_items
        return {k: v[:n] if v is not None and k in self.per_item else v for k, v in host.items()}

    def forward_options(self):
        """Keywords of the cupydcn forward besides the spec's arguments."""
        return {}

    def comparisons(self):
        """The comparison libraries (:class:`Comparison`), in column order."""
        return ()

    def reference_name(self, key, baselines):
        """What the reference of ``key`` is, for the gate's line and the JSON."""
        return f"NumPy reference, first {min(self.R, self.check_items)} RoIs"

    def reference(self, key, host64, baselines, platform):
        """The float64 results (``out``, ``grad_<name>``, ...) held against
        the results of the libraries whose reference key is ``key``."""
        return spec_reference(self.spec_of_op, host64, self.params())

    def gemm_flop(self):
        return None


@dataclasses.dataclass(frozen=True)
class ConvCase(_Case):
    """One deformable convolution layer: ``--case B,C,H,W[,Cout,k,stride,pad,dil,groups,dg]``."""
    B: int
    C: int
    H: int
    W: int
    Cout: int
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (1, 1)
    dilation: tuple = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    mask: bool = True    # DCNv2 (modulated); False: DCNv1
    bias: bool = True

    kind = "conv"
    op = "deform_conv2d"
    reference_key = "deform"   # shared with torchvision's deform_conv2d
    option = "--case"
    syntax = "B,C,H,W[,Cout,k,stride,pad,dil,groups,dg][,v1][,nobias]"
    per_item = frozenset({"input", "offset", "mask", "grad_output"})

    @property
    def Ho(self):
        return (self.H + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) \
            // self.stride[0] + 1

    @property
    def Wo(self):
        return (self.W + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) \
            // self.stride[1] + 1

    @property
    def name(self):
        parts = [f"conv {self.B}x{self.C}x{self.H}x{self.W} k{_pair_text(self.kernel)}"]
        if self.Cout != self.C:
            parts.append(f"o{self.Cout}")
        if self.stride != (1, 1):
            parts.append(f"s{_pair_text(self.stride)}")
        same = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel))
        if self.padding != same:
            parts.append(f"p{_pair_text(self.padding)}")
        if self.dilation != (1, 1):
            parts.append(f"d{_pair_text(self.dilation)}")
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        if self.offset_groups != 1:
            parts.append(f"dg{self.offset_groups}")
        if not self.mask:
            parts.append("v1")
        if not self.bias:
            parts.append("nobias")
        return " ".join(parts)

    def spec(self):
        return {"kind": "conv", "op": self.op, "B": self.B, "C": self.C, "H": self.H,
                "W": self.W, "Cout": self.Cout, "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups,
                "offset_groups": self.offset_groups, "mask": self.mask, "bias": self.bias,
                "Ho": self.Ho, "Wo": self.Wo}

    def gemm_flop(self):
        """Multiply-adds x 2 of the forward's GEMM (backward: twice that)."""
        kh, kw = self.kernel
        return 2 * self.B * self.Cout * self.Ho * self.Wo * (self.C // self.groups) * kh * kw

    def params(self):
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def draw(self, rng):
        kh, kw = self.kernel
        taps = self.offset_groups * kh * kw
        fan_in = self.C // self.groups * kh * kw
        return {
            "input": _draw(rng, (self.B, self.C, self.H, self.W), "normal"),
            "offset": _draw(rng, (self.B, 2 * taps, self.Ho, self.Wo), (-2.0, 2.0)),
            "weight": _draw(rng, (self.Cout, self.C // self.groups, kh, kw), "normal")
            / numpy.float32(math.sqrt(fan_in)),
            "bias": _draw(rng, (self.Cout,), "normal") if self.bias else None,
            "mask": _draw(rng, (self.B, taps, self.Ho, self.Wo), (0.0, 1.0)) if self.mask
            else None,
            "grad_output": _draw(rng, (self.B, self.Cout, self.Ho, self.Wo), "normal"),
        }

    @property
    def check_items(self):
        return 1   # image 0

    def sliced(self, baselines):
        return baselines.ops is None   # torchvision in float64 checks the whole batch

    def comparisons(self):
        return (
            Comparison("torchvision", "torchvision.ops.deform_conv2d", "torchvision",
                       self.spec_of_op.gradients, (), "deform", _torchvision_deform_conv2d),
            Comparison("dense", "torch conv2d (cuDNN)", "torch", ("input", "weight", "bias"), (),
                       "dense", _dense_conv2d),
        )

    def reference_name(self, key, baselines):
        if key == "deform" and baselines.ops is not None:
            return "torchvision float64"
        if key == "dense":
            return "torch conv2d float64"
        return "NumPy reference, image 0"

    def reference(self, key, host64, baselines, platform):
        float64 = _dtypes.lookup(numpy.float64)
        by_key = {c.reference: c for c in self.comparisons()}
        if key == "dense" or (key == "deform" and baselines.ops is not None):
            return TorchRunner(platform, self, float64, by_key[key], baselines.torch,
                               baselines.ops).results(host64)
        return super().reference(key, host64, baselines, platform)


def _torchvision_deform_conv2d(torch, ops, case, d):
    return ops.deform_conv2d(d["input"], d["offset"], d["weight"], d.get("bias"),
                             stride=case.stride, padding=case.padding, dilation=case.dilation,
                             mask=d.get("mask"))


def _dense_conv2d(torch, ops, case, d):
    return torch.nn.functional.conv2d(d["input"], d["weight"], d.get("bias"), case.stride,
                                      case.padding, case.dilation, case.groups)


@dataclasses.dataclass(frozen=True)
class RoICase(_Case):
    """Deformable RoI pooling: ``--roi R,C,H,W[,bins[,images[,sampling]]]``.

    RoIs are boxes in image coordinates on ``images`` feature maps of stride
    16 (``spatial_scale = 1/16``); bins move by ``gamma*roi_size*offset``."""
    R: int
    C: int
    H: int
    W: int
    bins: tuple = (7, 7)
    N: int = 2
    sampling_ratio: int = 0
    mask: bool = True    # modulated (DCNv2's pack); False: offset only
    spatial_scale: float = 1.0 / 16
    gamma: float = 0.1

    kind = "roi"
    op = "deform_roi_pool"
    reference_key = "roi"
    option = "--roi"
    syntax = "R,C,H,W[,bins[,images[,sampling]]][,v1]"
    per_item = frozenset({"rois", "offset", "mask", "grad_output"})

    @property
    def name(self):
        text = (f"roi {self.R}x{self.C}x{self.H}x{self.W} bins{_pair_text(self.bins)}"
                f" n{self.N}")
        if self.sampling_ratio:
            text += f" sr{self.sampling_ratio}"
        return text + ("" if self.mask else " v1")

    def spec(self):
        return {"kind": "roi", "op": self.op, "R": self.R, "C": self.C, "H": self.H,
                "W": self.W, "bins": list(self.bins), "N": self.N,
                "sampling_ratio": self.sampling_ratio, "mask": self.mask,
                "spatial_scale": self.spatial_scale, "gamma": self.gamma}

    def params(self):
        return {"output_size": self.bins, "spatial_scale": self.spatial_scale,
                "sampling_ratio": self.sampling_ratio, "gamma": self.gamma}

    def draw(self, rng):
        ph, pw = self.bins
        rois = _boxes(rng, self.R, self.N, self.H, self.W, self.spatial_scale)
        return {
            "input": _draw(rng, (self.N, self.C, self.H, self.W), "normal"),
            "rois": rois,
            "offset": _draw(rng, (self.R, 2, ph, pw), (-1.0, 1.0)),
            "mask": _draw(rng, (self.R, 1, ph, pw), (0.0, 1.0)) if self.mask else None,
            "grad_output": _draw(rng, (self.R, self.C, ph, pw), "normal"),
        }

    def comparisons(self):
        return (Comparison("torchvision", "torchvision.ops.roi_align", "torchvision",
                           ("input",), ("rois",), "roi_align", _torchvision_roi_align),)

    def reference(self, key, host64, baselines, platform):
        if key == "roi_align":   # the undeformed op: no offset, no mask
            host64 = dict(host64, offset=None, mask=None)
        return spec_reference(self.spec_of_op, host64, self.params())


def _torchvision_roi_align(torch, ops, case, d):
    return ops.roi_align(d["input"], d["rois"], output_size=case.bins,
                         spatial_scale=case.spatial_scale, sampling_ratio=case.sampling_ratio,
                         aligned=True)


@dataclasses.dataclass(frozen=True)
class PSRoICase(_Case):
    """Deformable position-sensitive RoI pooling (the DCN operator):
    ``--psroi R,C,H,W[,bins[,group[,images[,samples]]]][,notrans]``.

    ``C = output_dim * group**2`` channels on ``images`` maps of stride 16;
    ``bins`` x ``bins`` outputs per RoI, ``samples``**2 samples per bin, a
    class-agnostic trans (R, 2, bins, bins) scaled by ``trans_std``."""
    R: int
    C: int
    H: int
    W: int
    pooled_size: int = 7
    group_size: int = 1
    N: int = 2
    sample_per_part: int = 4
    trans: bool = True   # deformable; False: no_trans
    spatial_scale: float = 1.0 / 16
    trans_std: float = 0.1

    kind = "psroi"
    op = "deform_psroi_pool"
    reference_key = "psroi"
    option = "--psroi"
    syntax = "R,C,H,W[,bins[,group[,images[,samples]]]][,notrans]"
    per_item = frozenset({"rois", "trans", "grad_output"})

    @property
    def output_dim(self):
        return self.C // self.group_size**2

    @property
    def name(self):
        text = (f"psroi {self.R}x{self.C}x{self.H}x{self.W} bins{self.pooled_size}"
                + (f" g{self.group_size}" if self.group_size != 1 else "") + f" n{self.N}")
        if self.sample_per_part != 4:
            text += f" sp{self.sample_per_part}"
        return text + ("" if self.trans else " notrans")

    def spec(self):
        return {"kind": "psroi", "op": self.op, "R": self.R, "C": self.C, "H": self.H,
                "W": self.W, "pooled_size": self.pooled_size, "group_size": self.group_size,
                "output_dim": self.output_dim, "N": self.N,
                "sample_per_part": self.sample_per_part, "trans": self.trans,
                "spatial_scale": self.spatial_scale, "trans_std": self.trans_std}

    def params(self):
        return {"spatial_scale": self.spatial_scale, "output_dim": self.output_dim,
                "group_size": self.group_size, "pooled_size": self.pooled_size,
                "part_size": self.pooled_size, "sample_per_part": self.sample_per_part,
                "trans_std": self.trans_std}

    @property
    def check_items(self):
        """The NumPy reference holds every sample of a RoI (output_dim x bins
        x samples): up to ROI_CHECK RoIs, fewer when that passes
        PSROI_CHECK_SAMPLES samples."""
        per_roi = self.output_dim * self.pooled_size**2 * self.sample_per_part**2
        return max(1, min(ROI_CHECK, PSROI_CHECK_SAMPLES // per_roi))

    def forward_options(self):
        return {"return_count": True}   # as the bridges do: the backward takes the count

    def draw(self, rng):
        p = self.pooled_size
        rois = _boxes(rng, self.R, self.N, self.H, self.W, self.spatial_scale)
        return {
            "input": _draw(rng, (self.N, self.C, self.H, self.W), "normal"),
            "rois": rois,
            "trans": _draw(rng, (self.R, 2, p, p), (-1.0, 1.0)) if self.trans else None,
            "grad_output": _draw(rng, (self.R, self.output_dim, p, p), "normal"),
        }


def _conv(B, C, H, W):
    return ConvCase(B, C, H, W, C)


# ResNet-50 detection stages at 800x1216, batch 2 (strides 8, 16, 32), then two
# square feature maps; on the stride-16 map: a deformable R-FCN head (PS RoI
# pooling, 7x7 groups, 21 classes: C = 21*7*7), mmdetection's deformable RoI
# pooling head (PS RoI pooling with one group, 256 channels) and a Faster R-CNN
# head (RoI pooling).
SUITE = (
    _conv(2, 128, 100, 152),
    _conv(2, 256, 50, 76),
    _conv(2, 512, 25, 38),
    _conv(16, 64, 128, 128),
    _conv(8, 256, 64, 64),
    PSRoICase(512, 21 * 49, 50, 76, 7, 7),
    PSRoICase(512, 256, 50, 76),
    RoICase(512, 256, 50, 76),
)
QUICK_SUITE = (
    _conv(2, 256, 50, 76),
    _conv(2, 64, 64, 64),
    PSRoICase(128, 21 * 49, 50, 76, 7, 7),
    RoICase(128, 256, 50, 76),
)


def make_inputs(case, dtype, seed):
    """One input set of ``case``: host arrays already in ``dtype`` (random, never zeros)."""
    host = case.draw(numpy.random.default_rng(seed))
    return {k: None if v is None else v.astype(dtype.dtype) for k, v in host.items()}


def _set_bytes(host):
    return sum(v.nbytes for v in host.values() if v is not None)


def choose_sets(host, l2_bytes, override=None):
    """Input sets to rotate: enough that they cover twice the L2 cache."""
    if override:
        return override
    need = math.ceil(2 * l2_bytes / max(_set_bytes(host), 1)) if l2_bytes else 2
    return max(2, min(MAX_SETS, need))


# ---------------------------------------------------------------------------
# Command-line syntax
# ---------------------------------------------------------------------------

_CONV_FIELDS = ("B", "C", "H", "W", "Cout", "k", "stride", "pad", "dil", "groups", "dg")
_ROI_FIELDS = ("R", "C", "H", "W", "bins", "images", "sampling")
_PSROI_FIELDS = ("R", "C", "H", "W", "bins", "group", "images", "samples")
_PAIR_FIELDS = {"k", "stride", "pad", "dil", "bins"}


def _parse_fields(text, fields, flags, syntax, what, pairs=_PAIR_FIELDS):
    """(values by field name, set of flags) of a comma-separated spec."""
    tokens = [t.strip() for t in str(text).split(",")]
    seen_flags = {t.lower() for t in tokens if t.lower() in flags}
    numbers = [t for t in tokens if t.lower() not in flags]
    if len(numbers) < 4 or len(numbers) > len(fields):
        raise argparse.ArgumentTypeError(
            f"{what} {text!r}: expected {syntax} (4 to {len(fields)} numbers), "
            f"got {len(numbers)}")
    values = {}
    for index, (field, token) in enumerate(zip(fields, numbers), start=1):
        minimum = 0 if field in ("pad", "sampling") else 1
        parts = token.lower().split("x") if field in pairs else [token]
        try:
            ints = [int(p) for p in parts]
        except ValueError:
            ints = None
        if ints is None or len(ints) > 2 or any(v < minimum for v in ints):
            kind = "an integer" if minimum == 0 else "a positive integer"
            pair = " or a pair AxB" if field in pairs else ""
            bound = " >= 0" if minimum == 0 else ""
            raise argparse.ArgumentTypeError(
                f"{what} {text!r}: field {index} ({field}) must be {kind}{bound}{pair}, "
                f"got {token!r}")
        values[field] = (ints[0], ints[-1]) if field in pairs else ints[0]
    return values, seen_flags


def parse_case(text):
    """A :class:`ConvCase` from ``B,C,H,W[,Cout,k,stride,pad,dil,groups,dg][,v1][,nobias]``.

    Defaults: Cout = C, a 3x3 kernel, stride 1, "same" padding
    (``dil*(k-1)//2``, 1 for 3x3), dilation 1, one group, one offset group,
    DCNv2 (mask) with bias; ``v1`` drops the mask, ``nobias`` the bias. The
    pair fields take ``3`` or ``3x1``."""
    v, flags = _parse_fields(text, _CONV_FIELDS, {"v1", "nobias"}, ConvCase.syntax,
                             ConvCase.option)
    kernel = v.get("k", (3, 3))
    dilation = v.get("dil", (1, 1))
    padding = v.get("pad", tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel)))
    case = ConvCase(v["B"], v["C"], v["H"], v["W"], v.get("Cout", v["C"]), kernel,
                    v.get("stride", (1, 1)), padding, dilation, v.get("groups", 1),
                    v.get("dg", 1), mask="v1" not in flags, bias="nobias" not in flags)
    problems = []
    if case.C % case.groups or case.Cout % case.groups:
        problems.append(f"groups={case.groups} must divide C={case.C} and Cout={case.Cout}")
    if case.C % case.offset_groups:
        problems.append(f"dg={case.offset_groups} must divide C={case.C}")
    if case.Ho < 1 or case.Wo < 1:
        problems.append(f"the output would be {case.Ho}x{case.Wo}")
    if problems:
        raise argparse.ArgumentTypeError(f"--case {text!r}: {'; '.join(problems)}")
    return case


def parse_roi(text):
    """A :class:`RoICase` from ``R,C,H,W[,bins[,images[,sampling]]][,v1]``
    (defaults: 7x7 bins, 2 images, adaptive sampling (0), modulated)."""
    v, flags = _parse_fields(text, _ROI_FIELDS, {"v1"}, RoICase.syntax, RoICase.option)
    return RoICase(v["R"], v["C"], v["H"], v["W"], v.get("bins", (7, 7)), v.get("images", 2),
                   v.get("sampling", 0), mask="v1" not in flags)


def parse_psroi(text):
    """A :class:`PSRoICase` from ``R,C,H,W[,bins[,group[,images[,samples]]]][,notrans]``
    (defaults: 7x7 bins, group 1, 2 images, 4x4 samples per bin, with trans);
    C must be a multiple of group**2 (``output_dim = C / group**2``)."""
    v, flags = _parse_fields(text, _PSROI_FIELDS, {"notrans"}, PSRoICase.syntax,
                             PSRoICase.option,
                             pairs=())
    case = PSRoICase(v["R"], v["C"], v["H"], v["W"], v.get("bins", 7), v.get("group", 1),
                     v.get("images", 2), v.get("samples", 4), trans="notrans" not in flags)
    if case.C % case.group_size**2:
        raise argparse.ArgumentTypeError(
            f"--psroi {text!r}: C={case.C} must be a multiple of group**2 = "
            f"{case.group_size**2} (C = output_dim*group**2)")
    return case
