"""``cupydcn bench``: time cupydcn against torchvision and cuDNN on the GPU.

A program, not a test (STYLE.md habit 8). For every case and dtype it

1. draws several distinct input sets (random, never zeros) and rotates among
   them from one repetition to the next, so that the L2 cache does not flatter;
2. runs every op once, forward and backward, and compares each output and
   gradient with a float64 reference (torchvision on float64 inputs, or the
   NumPy reference ``cupydcn.reference`` on a slice of the batch or the RoIs):
   ``||got - ref|| / ||ref||``, the largest over the op's results. A cupydcn
   result above the dtype's tolerance (``_dtypes.DTYPES[...].tolerance``) is
   refused: it is not timed, the table says so and the exit status is 1.
   Baselines above it are timed and flagged;
3. times forward, backward and forward+backward through a :class:`CudaClock`
   (CUDA events around each call after a warm-up; median and p10-p90) and
   measures the peak extra memory of one call with each library's own
   allocator (a CuPy memory-pool hook; ``torch.cuda.max_memory_allocated``);

then prints a table (a progress bar on stderr) and writes JSON, CSV and a PNG
chart on request. Every result records the GPU, driver, CUDA, CuPy, torch and
torchvision versions.

The baselines are ``torchvision.ops.deform_conv2d``, the dense cuDNN
``torch.nn.functional.conv2d`` of the same shape (the floor: what the layer
costs without the deformable sampling) and ``torchvision.ops.roi_align`` beside
RoI pooling. Without torch the run times cupydcn alone.

Timing and memory go through a clock, so the CPU test tier runs the whole
pipeline (parsing, cases, gate, table, JSON, CSV, plot) on NumPy arrays and
torch CPU tensors with a fake one: ``main(argv, platform=CpuPlatform(clock))``.

TF32 (``--tf32``): cupydcn's float32 GEMMs call cuBLAS themselves and use
TF32 only after :func:`cupydcn.set_tf32` (never from ``CUPY_TF32``); the bench
sets it, and CuPy's own per-dtype setting
``cupy._core._routines_linalg.set_compute_type(numpy.float32, COMPUTE_TYPE_TF32)``
for any CuPy matmul, both ways. torch:
``torch.backends.cuda.matmul.fp32_precision`` and
``torch.backends.cudnn.conv.fp32_precision`` ("tf32" or "ieee"), or the older
``allow_tf32`` flags where torch predates those. Without ``--tf32`` every
library computes float32 in IEEE float32 (torch's cuDNN default, TF32, is
turned off too).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import json
import math
import os
import pathlib
import platform as _platform
import sys
from typing import NamedTuple

import numpy

from cupydcn import _config, _dtypes

PASSES = ("fwd", "bwd", "fwd+bwd")
LIBRARIES = ("cupydcn", "torchvision", "dense")
DEFAULT_REPS, DEFAULT_WARMUP = 100, 10
QUICK_REPS, QUICK_WARMUP = 20, 3
MAX_SETS = 8
ROI_CHECK = 64          # RoIs the NumPy reference checks (it loops over RoIs in Python)
TF32_TOLERANCE = 1e-3   # float32 with TF32 GEMMs: a 10-bit mantissa in the products
_MIB = 2.0**20


class UsageError(Exception):
    """A bad command line: one line for the user, exit status 2."""


# ---------------------------------------------------------------------------
# Cases and their command-line syntax
# ---------------------------------------------------------------------------


def _pair_text(p):
    return str(p[0]) if p[0] == p[1] else f"{p[0]}x{p[1]}"


@dataclasses.dataclass(frozen=True)
class ConvCase:
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
        return {"kind": "conv", "B": self.B, "C": self.C, "H": self.H, "W": self.W,
                "Cout": self.Cout, "kernel": list(self.kernel), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "offset_groups": self.offset_groups,
                "mask": self.mask, "bias": self.bias, "Ho": self.Ho, "Wo": self.Wo}

    def gemm_flop(self):
        """Multiply-adds x 2 of the forward's GEMM (backward: twice that)."""
        kh, kw = self.kernel
        return 2 * self.B * self.Cout * self.Ho * self.Wo * (self.C // self.groups) * kh * kw


@dataclasses.dataclass(frozen=True)
class RoICase:
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

    @property
    def name(self):
        text = (f"roi {self.R}x{self.C}x{self.H}x{self.W} bins{_pair_text(self.bins)}"
                f" n{self.N}")
        if self.sampling_ratio:
            text += f" sr{self.sampling_ratio}"
        return text + ("" if self.mask else " v1")

    def spec(self):
        return {"kind": "roi", "R": self.R, "C": self.C, "H": self.H, "W": self.W,
                "bins": list(self.bins), "N": self.N, "sampling_ratio": self.sampling_ratio,
                "mask": self.mask, "spatial_scale": self.spatial_scale, "gamma": self.gamma}

    def gemm_flop(self):
        return None


def _conv(B, C, H, W):
    return ConvCase(B, C, H, W, C)


# ResNet-50 detection stages at 800x1216, batch 2 (strides 8, 16, 32), then two
# square feature maps; RoI pooling as a Faster R-CNN head on the stride-16 map.
SUITE = (
    _conv(2, 128, 100, 152),
    _conv(2, 256, 50, 76),
    _conv(2, 512, 25, 38),
    _conv(16, 64, 128, 128),
    _conv(8, 256, 64, 64),
    RoICase(512, 256, 50, 76),
)
QUICK_SUITE = (
    _conv(2, 256, 50, 76),
    _conv(2, 64, 64, 64),
    RoICase(128, 256, 50, 76),
)

_CONV_FIELDS = ("B", "C", "H", "W", "Cout", "k", "stride", "pad", "dil", "groups", "dg")
_CONV_SYNTAX = "B,C,H,W[,Cout,k,stride,pad,dil,groups,dg][,v1][,nobias]"
_ROI_FIELDS = ("R", "C", "H", "W", "bins", "images", "sampling")
_ROI_SYNTAX = "R,C,H,W[,bins[,images[,sampling]]][,v1]"
_PAIR_FIELDS = {"k", "stride", "pad", "dil", "bins"}


def _parse_fields(text, fields, flags, syntax, what):
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
        parts = token.lower().split("x") if field in _PAIR_FIELDS else [token]
        try:
            ints = [int(p) for p in parts]
        except ValueError:
            ints = None
        if ints is None or len(ints) > 2 or any(v < minimum for v in ints):
            kind = "an integer" if minimum == 0 else "a positive integer"
            pair = " or a pair AxB" if field in _PAIR_FIELDS else ""
            bound = " >= 0" if minimum == 0 else ""
            raise argparse.ArgumentTypeError(
                f"{what} {text!r}: field {index} ({field}) must be {kind}{bound}{pair}, "
                f"got {token!r}")
        values[field] = (ints[0], ints[-1]) if field in _PAIR_FIELDS else ints[0]
    return values, seen_flags


def parse_case(text):
    """A :class:`ConvCase` from ``B,C,H,W[,Cout,k,stride,pad,dil,groups,dg][,v1][,nobias]``.

    Defaults: Cout = C, a 3x3 kernel, stride 1, "same" padding
    (``dil*(k-1)//2``, 1 for 3x3), dilation 1, one group, one offset group,
    DCNv2 (mask) with bias; ``v1`` drops the mask, ``nobias`` the bias. The
    pair fields take ``3`` or ``3x1``."""
    v, flags = _parse_fields(text, _CONV_FIELDS, {"v1", "nobias"}, _CONV_SYNTAX, "--case")
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
    v, flags = _parse_fields(text, _ROI_FIELDS, {"v1"}, _ROI_SYNTAX, "--roi")
    return RoICase(v["R"], v["C"], v["H"], v["W"], v.get("bins", (7, 7)), v.get("images", 2),
                   v.get("sampling", 0), mask="v1" not in flags)


_DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16",
                  "half": "float16", "bf16": "bfloat16", "f64": "float64", "fp64": "float64"}


def parse_dtype(text):
    """The dtype table row named ``text`` (float32, float16, bfloat16, float64, or f32, bf16...)."""
    name = _DTYPE_ALIASES.get(str(text).lower(), str(text).lower())
    rows = {row.name: row for row in _dtypes.DTYPES.values()}
    if name not in rows:
        hint = "" if _dtypes.ml_dtypes is not None else " (bfloat16 needs ml_dtypes)"
        raise argparse.ArgumentTypeError(
            f"--dtype {text!r}: expected one of {', '.join(rows)}{hint}")
    return rows[name]


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="cupydcn bench",
        description="Time cupydcn's deformable convolution and RoI pooling (forward, backward, "
                    "forward+backward) on the GPU, beside torchvision.ops.deform_conv2d, the "
                    "dense cuDNN conv2d of the same shape and torchvision.ops.roi_align, after "
                    "checking every op against a float64 reference.",
        epilog=f"--case {_CONV_SYNTAX}: defaults Cout=C, k=3, stride=1, same padding, dil=1, "
               "groups=1, dg=1, DCNv2 with bias; pairs as 3x1. "
               f"--roi {_ROI_SYNTAX}: defaults 7x7 bins, 2 images, sampling 0 (adaptive), "
               "modulated, spatial scale 1/16. Given cases replace the built-in suite "
               "(--suite keeps it). Exit status: 0 all good, 1 no GPU or a cupydcn result "
               "refused by the correctness gate, 2 bad arguments.")
    parser.add_argument("--case", action="append", type=parse_case, default=[],
                        metavar=_CONV_SYNTAX, help="a deformable convolution case (repeatable)")
    parser.add_argument("--roi", action="append", type=parse_roi, default=[],
                        metavar=_ROI_SYNTAX, help="a RoI pooling case (repeatable)")
    parser.add_argument("--suite", action="store_true",
                        help="run the built-in suite as well as the given cases")
    parser.add_argument("--dtype", action="append", type=parse_dtype, default=[],
                        help="float32, float16, bfloat16 or float64 (repeatable; default "
                             "float32, float16 and bfloat16, float32 alone with --quick)")
    parser.add_argument("--tf32", action="store_true",
                        help="let float32 GEMMs and convolutions use TF32, in cupydcn (CuPy's "
                             "cuBLAS compute type) and in torch alike (float32 tolerance 1e-3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: a smaller suite, {QUICK_REPS} reps, "
                             f"{QUICK_WARMUP} warm-up calls")
    parser.add_argument("--reps", type=_positive,
                        help=f"timed calls per op and pass (default {DEFAULT_REPS})")
    parser.add_argument("--warmup", type=_non_negative,
                        help=f"untimed calls first (default {DEFAULT_WARMUP})")
    parser.add_argument("--sets", type=_positive,
                        help="distinct input sets rotated between calls (default: enough to "
                             f"cover twice the L2 cache, 2 to {MAX_SETS})")
    parser.add_argument("--deterministic", action="store_true",
                        help="time cupydcn's deterministic conv backward (no floating-point "
                             "atomics) instead of the default one: its cost")
    parser.add_argument("--no-torch", action="store_true",
                        help="time cupydcn alone even where torch is installed")
    parser.add_argument("--json", metavar="PATH", help="write every result as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write every result as CSV")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG chart of the speed-ups (needs matplotlib)")
    parser.add_argument("--list", action="store_true",
                        help="print the cases that would run and exit")
    return parser


class Options(NamedTuple):
    cases: tuple
    dtypes: tuple
    tf32: bool
    reps: int
    warmup: int
    sets: object
    torch: bool
    json: object
    csv: object
    plot: object
    list: bool
    quick: bool
    deterministic: bool = False


def parse_args(argv):
    """:class:`Options` from the command line; argparse's SystemExit on errors."""
    ns = build_parser().parse_args(argv)
    given = [*ns.case, *ns.roi]
    suite = QUICK_SUITE if ns.quick else SUITE
    cases = tuple(dict.fromkeys([*given, *(suite if ns.suite or not given else ())]))
    if ns.dtype:
        dtypes = tuple(dict.fromkeys(ns.dtype))
    else:
        names = ("float32",) if ns.quick else ("float32", "float16", "bfloat16")
        rows = {row.name: row for row in _dtypes.DTYPES.values()}
        dtypes = tuple(rows[n] for n in names if n in rows)
    reps = ns.reps or (QUICK_REPS if ns.quick else DEFAULT_REPS)
    warmup = ns.warmup if ns.warmup is not None else (QUICK_WARMUP if ns.quick else DEFAULT_WARMUP)
    return Options(cases, dtypes, ns.tf32, reps, warmup, ns.sets, not ns.no_torch, ns.json,
                   ns.csv, ns.plot, ns.list, ns.quick, ns.deterministic)


# ---------------------------------------------------------------------------
# Clocks: how time and memory are measured
# ---------------------------------------------------------------------------


class CudaClock:
    """CUDA events around each call, on the stream of the library that runs it.

    ``time(fn, library=..., sets=..., warmup=..., reps=...)`` calls ``fn(i)``
    (``i`` the input set, rotated) ``warmup`` times untimed, then ``reps``
    times each between two events, and returns the milliseconds of each call.
    ``peak_bytes(fn, library=...)`` runs ``fn()`` once and returns the most
    bytes the library's allocator held for it above what it held before
    (outputs and workspace; cuBLAS/cuDNN handle workspaces are not the
    allocator's and are not counted)."""

    name = "CUDA events"

    def __init__(self, torch=None):
        import cupy

        self.cupy = cupy
        self.torch = torch

    def _sync(self, library):
        if library == "torch":
            self.torch.cuda.synchronize()
        else:
            self.cupy.cuda.Device().synchronize()

    def time(self, fn, *, library, sets, warmup, reps, label=""):
        for i in range(warmup):
            fn(i % sets)
        self._sync(library)
        if library == "torch":
            make = lambda: self.torch.cuda.Event(enable_timing=True)  # noqa: E731
            elapsed = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            make = self.cupy.cuda.Event
            elapsed = self.cupy.cuda.get_elapsed_time
        starts = [make() for _ in range(reps)]
        ends = [make() for _ in range(reps)]
        for r in range(reps):
            starts[r].record()
            fn(r % sets)
            ends[r].record()
        ends[-1].synchronize()
        return [float(elapsed(a, b)) for a, b in zip(starts, ends)]

    def peak_bytes(self, fn, *, library, label=""):
        self._sync(library)
        gc.collect()
        if library == "torch":
            torch = self.torch
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            result = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            del result
            return int(peak)
        hook = _cupy_peak_hook(self.cupy)
        with hook:
            result = fn()
            self._sync(library)
        del result
        return int(hook.peak)


def _cupy_peak_hook(cupy):
    """A CuPy memory-pool hook counting the bytes allocated (and not yet
    freed) since it was entered, and their peak."""

    class PeakHook(cupy.cuda.MemoryHook):
        name = "cupydcn_bench_peak"

        def __init__(self):
            self.live, self.now, self.peak = {}, 0, 0

        def malloc_postprocess(self, **kw):
            if kw.get("mem_ptr"):
                self.live[kw["mem_ptr"]] = kw["mem_size"]
                self.now += kw["mem_size"]
                self.peak = max(self.peak, self.now)

        def free_postprocess(self, **kw):
            self.now -= self.live.pop(kw.get("mem_ptr"), 0)

    return PeakHook()


# ---------------------------------------------------------------------------
# Platforms: where the arrays live
# ---------------------------------------------------------------------------


class GpuPlatform:
    """CuPy arrays on the current CUDA device, torch tensors on ``cuda``."""

    name = "GPU"
    torch_device = "cuda"

    def __init__(self, cupy):
        self.cupy = cupy
        self.xp = cupy
        self.clock = None    # made once torch is known: CudaClock(torch)
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.props = props
        self.l2_bytes = int(props.get("l2CacheSize", 0) or 0)

    def make_clock(self, torch):
        if self.clock is None:
            self.clock = CudaClock(torch)
        return self.clock

    def to_device(self, host):
        return self.cupy.asarray(host)

    def free_memory(self):
        gc.collect()
        self.cupy.get_default_memory_pool().free_all_blocks()

    def torch_usable(self, torch):
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA device (a CPU build?)"
        return None

    def set_tf32(self, enabled):
        """Set CuPy's float32 GEMM compute type; return (previous, effective name)."""
        from cupy._core import _routines_linalg as linalg

        previous = linalg.get_compute_type(numpy.float32)
        wanted = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(numpy.float32, wanted)
        effective = linalg.get_compute_type(numpy.float32)
        previous_cupydcn = _config.set_tf32(bool(enabled))
        return (previous, previous_cupydcn), (
            f"{linalg.compute_type_to_str(effective)} (cupydcn's own GEMMs: "
            f"{'TF32' if _config.get_tf32() else 'IEEE float32'})")

    def restore_tf32(self, previous):
        from cupy._core import _routines_linalg as linalg

        linalg.set_compute_type(numpy.float32, previous[0])
        _config.set_tf32(previous[1])

    def device_info(self):
        cupy, props = self.cupy, self.props
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        driver = cupy.cuda.runtime.driverGetVersion()
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        try:
            nvrtc = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
        except Exception:  # NVRTC missing: reported, not fatal here
            nvrtc = None
        return {
            "device": f"{name} (sm_{props['major']}{props['minor']})",
            "gpu": name,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "gpu_memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "l2_cache_mib": round(self.l2_bytes / _MIB, 1),
            "sm_count": props.get("multiProcessorCount"),
            "driver": f"{driver // 1000}.{driver % 1000 // 10}",
            "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
            "nvrtc": nvrtc,
            "cupy": cupy.__version__,
        }


class CpuPlatform:
    """NumPy arrays and torch CPU tensors, timed by an injected clock: the CPU
    test tier's way through the whole pipeline (cupydcn runs its NumPy path)."""

    name = "CPU"
    torch_device = "cpu"
    xp = numpy
    l2_bytes = 0

    def __init__(self, clock):
        self.clock = clock

    def make_clock(self, torch):
        return self.clock

    def to_device(self, host):
        return numpy.array(host)

    def free_memory(self):
        gc.collect()

    def torch_usable(self, torch):
        return None

    def set_tf32(self, enabled):
        return None, "n/a (CPU)"

    def restore_tf32(self, previous):
        pass

    def device_info(self):
        try:
            import cupy
            cupy_version = cupy.__version__
        except ImportError:
            cupy_version = None
        return {"device": f"CPU ({_platform.machine()}), NumPy arrays: not a GPU timing",
                "gpu": None, "compute_capability": None, "gpu_memory_gib": None,
                "l2_cache_mib": None, "sm_count": None, "driver": None, "cuda_runtime": None,
                "nvrtc": None, "cupy": cupy_version}


def detect_gpu():
    """(GpuPlatform, None), or (None, one line saying why there is none)."""
    try:
        import cupy
    except ImportError as error:
        return None, f"CuPy is not installed ({error}); the benchmarks need a CUDA GPU"
    from cupydcn import _gpu

    why = _gpu.no_gpu_reason()
    if why is not None:
        return None, f"{why}; the benchmarks need one"
    return GpuPlatform(cupy), None


# ---------------------------------------------------------------------------
# torch, torchvision and TF32
# ---------------------------------------------------------------------------


class Baselines(NamedTuple):
    torch: object          # the module or None
    ops: object            # torchvision.ops or None
    notes: tuple           # why a baseline is missing, for the table
    versions: dict


def load_baselines(platform, wanted=True):
    """torch and torchvision.ops where installed and usable on ``platform``."""
    versions = {"torch": None, "torch_cuda": None, "cudnn": None, "torchvision": None}
    if not wanted:
        return Baselines(None, None, ("torch not used (--no-torch)",), versions)
    try:
        import torch
    except ImportError:
        return Baselines(None, None, ("torch not installed: cupydcn is timed alone",), versions)
    versions["torch"] = torch.__version__
    why = platform.torch_usable(torch)
    if why:
        return Baselines(None, None, (f"{why}: cupydcn is timed alone",), versions)
    versions["torch_cuda"] = torch.version.cuda
    try:
        versions["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        versions["cudnn"] = None
    try:
        import torchvision
        import torchvision.ops as ops
    except ImportError:
        return Baselines(torch, None, ("torchvision not installed: no deform_conv2d or "
                                       "roi_align column",), versions)
    except Exception as error:  # a torchvision built for another torch fails this way
        first = (str(error).strip().splitlines() or [""])[0]
        return Baselines(torch, None, (f"torchvision unusable ({type(error).__name__}: "
                                       f"{first}): no torchvision column",), versions)
    versions["torchvision"] = getattr(torchvision, "__version__", "unknown")
    return Baselines(torch, ops, (), versions)


@contextlib.contextmanager
def tf32_mode(platform, torch, enabled):
    """Apply the TF32 choice to CuPy and torch alike; yield what was set."""
    previous, cupy_mode = platform.set_tf32(enabled)
    state = {"enabled": bool(enabled), "cupy_float32_compute_type": cupy_mode}
    restore = []
    if torch is not None:
        mode = "tf32" if enabled else "ieee"
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
            saved = (matmul.fp32_precision, cudnn.conv.fp32_precision)
            matmul.fp32_precision = mode
            cudnn.conv.fp32_precision = mode
            restore.append(lambda: (setattr(matmul, "fp32_precision", saved[0]),
                                    setattr(cudnn.conv, "fp32_precision", saved[1])))
            state["torch"] = f"matmul.fp32_precision={mode}, cudnn.conv.fp32_precision={mode}"
        else:
            saved = (matmul.allow_tf32, cudnn.allow_tf32)
            matmul.allow_tf32 = cudnn.allow_tf32 = bool(enabled)
            restore.append(lambda: (setattr(matmul, "allow_tf32", saved[0]),
                                    setattr(cudnn, "allow_tf32", saved[1])))
            state["torch"] = f"matmul.allow_tf32={bool(enabled)}, cudnn.allow_tf32={bool(enabled)}"
        # the floor is cuDNN's best algorithm for the shape, found during the warm-up
        saved_benchmark = cudnn.benchmark
        cudnn.benchmark = True
        restore.append(lambda: setattr(cudnn, "benchmark", saved_benchmark))
    try:
        yield state
    finally:
        for undo in reversed(restore):
            undo()
        platform.restore_tf32(previous)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _draw(rng, shape, kind):
    if kind == "normal":
        return rng.standard_normal(shape, dtype=numpy.float32)
    low, high = kind
    return (rng.random(shape, dtype=numpy.float32) * (high - low) + low).astype(numpy.float32)


def make_inputs(case, dtype, seed):
    """One input set of ``case``: host arrays already in ``dtype`` (random, never zeros)."""
    rng = numpy.random.default_rng(seed)
    if case.kind == "conv":
        kh, kw = case.kernel
        taps = case.offset_groups * kh * kw
        fan_in = case.C // case.groups * kh * kw
        host = {
            "input": _draw(rng, (case.B, case.C, case.H, case.W), "normal"),
            "offset": _draw(rng, (case.B, 2 * taps, case.Ho, case.Wo), (-2.0, 2.0)),
            "weight": _draw(rng, (case.Cout, case.C // case.groups, kh, kw), "normal")
            / numpy.float32(math.sqrt(fan_in)),
            "bias": _draw(rng, (case.Cout,), "normal") if case.bias else None,
            "mask": _draw(rng, (case.B, taps, case.Ho, case.Wo), (0.0, 1.0)) if case.mask else None,
            "grad_output": _draw(rng, (case.B, case.Cout, case.Ho, case.Wo), "normal"),
        }
    else:
        ph, pw = case.bins
        img_h, img_w = case.H / case.spatial_scale, case.W / case.spatial_scale
        smallest = min(16.0, img_h, img_w)
        size_h = numpy.exp(rng.uniform(math.log(smallest), math.log(max(img_h / 2, smallest)),
                                       case.R))
        size_w = numpy.exp(rng.uniform(math.log(smallest), math.log(max(img_w / 2, smallest)),
                                       case.R))
        y1 = rng.uniform(0, img_h - size_h)
        x1 = rng.uniform(0, img_w - size_w)
        rois = numpy.stack([rng.integers(0, case.N, case.R).astype(numpy.float64),
                            x1, y1, x1 + size_w, y1 + size_h], axis=1).astype(numpy.float32)
        host = {
            "input": _draw(rng, (case.N, case.C, case.H, case.W), "normal"),
            "rois": rois,
            "offset": _draw(rng, (case.R, 2, ph, pw), (-1.0, 1.0)),
            "mask": _draw(rng, (case.R, 1, ph, pw), (0.0, 1.0)) if case.mask else None,
            "grad_output": _draw(rng, (case.R, case.C, ph, pw), "normal"),
        }
    return {k: None if v is None else v.astype(dtype.dtype) for k, v in host.items()}


def _set_bytes(host):
    return sum(v.nbytes for v in host.values() if v is not None)


def choose_sets(host, l2_bytes, override=None):
    """Input sets to rotate: enough that they cover twice the L2 cache."""
    if override:
        return override
    need = math.ceil(2 * l2_bytes / max(_set_bytes(host), 1)) if l2_bytes else 2
    return max(2, min(MAX_SETS, need))


def check_slice(case, host, sliced):
    """The inputs the correctness gate runs on: all of set 0, or for the
    NumPy reference image 0 (conv) or the first ROI_CHECK RoIs."""
    if not sliced:
        return host
    if case.kind == "conv":
        per_image = {"input", "offset", "mask", "grad_output"}
        return {k: v[:1] if v is not None and k in per_image else v for k, v in host.items()}
    per_roi = {"rois", "offset", "mask", "grad_output"}
    return {k: v[:ROI_CHECK] if v is not None and k in per_roi else v for k, v in host.items()}


def to_host64(x):
    """A float64 NumPy copy of a NumPy, CuPy or torch array."""
    if hasattr(x, "detach"):  # torch
        import torch

        return x.detach().to(torch.float64).cpu().numpy()
    if hasattr(x, "get"):
        x = x.get()
    return numpy.asarray(x).astype(numpy.float64)


def rel_err(got, ref):
    """``||got - ref|| / ||ref||``; inf when ``got`` has a non-finite value or
    the shapes differ."""
    got, ref = to_host64(got), to_host64(ref)
    if got.shape != ref.shape or not numpy.all(numpy.isfinite(got)):
        return float("inf")
    scale = numpy.linalg.norm(ref)
    diff = numpy.linalg.norm(got - ref)
    return float(diff / scale) if scale > 0 else float(diff)


# ---------------------------------------------------------------------------
# Ops: one library's way of running one case
# ---------------------------------------------------------------------------


class _Op:
    """Runs one case in one library: ``results`` once for the gate, then
    ``load`` the rotated sets and ``run(pass, i)`` for the clock."""

    column = ""        # "cupydcn", "torchvision" or "dense"
    label = ""         # what the table footnote calls it
    library = "cupy"   # whose events and allocator measure it
    reference = ""     # the key of the float64 reference it is held to

    def __init__(self, platform, case, dtype):
        self.platform, self.case, self.dtype = platform, case, dtype
        self.sets = []

    def load(self, host_sets):
        self.sets = [self.prepare(h) for h in host_sets]

    def before(self, which):
        """Set-up for timing pass ``which`` outside the timed calls."""

    def unload(self):
        self.sets = []


class CupydcnConv(_Op):
    column, label, library, reference = "cupydcn", "cupydcn.deform_conv2d", "cupy", "deform"
    deterministic = False  # the deterministic backward (bench --deterministic)

    def prepare(self, host):
        return {k: None if v is None else self.platform.to_device(v) for k, v in host.items()}

    def _forward(self, d):
        import cupydcn

        c = self.case
        return cupydcn.deform_conv2d(d["input"], d["offset"], d["weight"], d["bias"], c.stride,
                                     c.padding, c.dilation, mask=d["mask"])

    def _backward(self, d):
        import cupydcn

        c = self.case
        return cupydcn.deform_conv2d_backward(d["grad_output"], d["input"], d["offset"],
                                              d["weight"], d["bias"], c.stride, c.padding,
                                              c.dilation, mask=d["mask"],
                                              deterministic=self.deterministic)

    def run(self, which, i):
        d = self.sets[i]
        if which == "fwd":
            return self._forward(d)
        if which == "bwd":
            return self._backward(d)
        return self._forward(d), self._backward(d)

    def results(self, host):
        d = self.prepare(host)
        out, grads = self._forward(d), self._backward(d)
        found = {"out": out}
        found.update({f"grad_{k}": g for k, g in grads._asdict().items() if g is not None})
        return {k: to_host64(v) for k, v in found.items()}


class CupydcnRoI(CupydcnConv):
    label, reference = "cupydcn.deform_roi_pool", "roi"

    def _keywords(self):
        c = self.case
        return dict(output_size=c.bins, spatial_scale=c.spatial_scale,
                    sampling_ratio=c.sampling_ratio, gamma=c.gamma)

    def _forward(self, d):
        import cupydcn

        return cupydcn.deform_roi_pool(d["input"], d["rois"], d["offset"], mask=d["mask"],
                                       **self._keywords())

    def _backward(self, d):
        import cupydcn

        return cupydcn.deform_roi_pool_backward(d["grad_output"], d["input"], d["rois"],
                                                d["offset"], mask=d["mask"], **self._keywords())


class _TorchOp(_Op):
    """A torch op: forward under no_grad, backward by autograd from a graph
    kept per input set (``retain_graph``), forward+backward from scratch."""

    library = "torch"
    leaves = ()      # the inputs that get gradients, in the order of ``grads``
    others = ()      # the other inputs used (no gradient)

    def __init__(self, platform, case, dtype, torch, ops=None):
        super().__init__(platform, case, dtype)
        self.torch, self.ops = torch, ops
        self.tdtype = getattr(torch, dtype.name)   # torch.float32, torch.bfloat16, ...
        self._graphs = {}

    def _tensor(self, a, grad=False):
        wide = numpy.float64 if a.dtype == numpy.float64 else numpy.float32
        t = self.torch.from_numpy(numpy.ascontiguousarray(a, dtype=wide))
        t = t.to(device=self.platform.torch_device, dtype=self.tdtype)
        return t.requires_grad_(grad)

    def prepare(self, host):
        leaves = {k: self._tensor(host[k], True) for k in self.leaves if host.get(k) is not None}
        others = {k: self._tensor(host[k]) for k in self.others if host.get(k) is not None}
        return {**leaves, **others, "grad_output": self._tensor(host["grad_output"])}

    def _leaves(self, d):
        return [d[k] for k in self.leaves if k in d]

    def _grads(self, out, d, retain=False):
        return self.torch.autograd.grad(out, self._leaves(d), d["grad_output"],
                                        retain_graph=retain)

    def run(self, which, i):
        d = self.sets[i]
        if which == "fwd":
            with self.torch.no_grad():
                return self._forward(d)
        if which == "bwd":
            return self._grads(self._graphs[i], d, retain=True)
        return self._grads(self._forward(d), d)

    def before(self, which):
        # backward alone: one forward graph per input set, kept (retain_graph)
        self._graphs = {i: self._forward(d) for i, d in enumerate(self.sets)} \
            if which == "bwd" else {}

    def unload(self):
        self._graphs = {}
        super().unload()

    def results(self, host):
        d = self.prepare(host)
        out = self._forward(d)
        grads = self._grads(out, d)
        found = {"out": out}
        found.update({f"grad_{k}": g for k, g in zip([k for k in self.leaves if k in d], grads)})
        return {k: to_host64(v) for k, v in found.items()}


class TorchvisionConv(_TorchOp):
    column, label, reference = "torchvision", "torchvision.ops.deform_conv2d", "deform"
    leaves = ("input", "offset", "weight", "bias", "mask")

    def _forward(self, d):
        c = self.case
        return self.ops.deform_conv2d(d["input"], d["offset"], d["weight"], d.get("bias"),
                                      stride=c.stride, padding=c.padding, dilation=c.dilation,
                                      mask=d.get("mask"))


class DenseConv(_TorchOp):
    column, label, reference = "dense", "torch conv2d (cuDNN)", "dense"
    leaves = ("input", "weight", "bias")

    def _forward(self, d):
        c = self.case
        return self.torch.nn.functional.conv2d(d["input"], d["weight"], d.get("bias"), c.stride,
                                               c.padding, c.dilation, c.groups)


class TorchvisionRoIAlign(_TorchOp):
    column, label, reference = "torchvision", "torchvision.ops.roi_align", "roi_align"
    leaves = ("input",)
    others = ("rois",)

    def _forward(self, d):
        c = self.case
        return self.ops.roi_align(d["input"], d["rois"], output_size=c.bins,
                                  spatial_scale=c.spatial_scale,
                                  sampling_ratio=c.sampling_ratio, aligned=True)


def reference_results(key, case, host, baselines, platform):
    """The float64 results an op is held to: ``deform`` (torchvision on float64
    inputs, or the NumPy reference), ``dense`` (torch's float64 conv2d),
    ``roi`` and ``roi_align`` (the NumPy reference with and without offset and mask)."""
    from cupydcn import reference

    f64 = {k: None if v is None else v.astype(numpy.float64) for k, v in host.items()}
    float64 = _dtypes.lookup(numpy.float64)
    if key == "deform" and baselines.ops is not None:
        return TorchvisionConv(platform, case, float64, baselines.torch,
                               baselines.ops).results(f64)
    if key == "dense":
        return DenseConv(platform, case, float64, baselines.torch).results(f64)
    if key == "deform":
        c = case
        out = reference.deform_conv2d(f64["input"], f64["offset"], f64["weight"], f64["bias"],
                                      c.stride, c.padding, c.dilation, f64["mask"])
        grads = reference.deform_conv2d_backward(f64["grad_output"], f64["input"], f64["offset"],
                                                 f64["weight"], f64["bias"], c.stride, c.padding,
                                                 c.dilation, f64["mask"])
        names = ("input", "offset", "weight", "bias", "mask")
        found = {"out": out}
        found.update({f"grad_{n}": g for n, g in zip(names, grads) if g is not None})
        return found
    deformable = key == "roi"
    offset = f64["offset"] if deformable else None
    mask = f64["mask"] if deformable else None
    args = (f64["input"], f64["rois"], offset, case.bins, case.spatial_scale,
            case.sampling_ratio, case.gamma, mask)
    out = reference.deform_roi_pool(*args)
    grad_input, grad_offset, grad_mask = reference.deform_roi_pool_backward(f64["grad_output"],
                                                                          *args)
    found = {"out": out, "grad_input": grad_input}
    if deformable:
        found["grad_offset"] = grad_offset
        if grad_mask is not None:
            found["grad_mask"] = grad_mask
    return found


def make_ops(case, dtype, platform, baselines, deterministic=False):
    ops = [(CupydcnConv if case.kind == "conv" else CupydcnRoI)(platform, case, dtype)]
    ops[0].deterministic = deterministic
    if baselines.ops is not None:
        cls = TorchvisionConv if case.kind == "conv" else TorchvisionRoIAlign
        ops.append(cls(platform, case, dtype, baselines.torch, baselines.ops))
    if baselines.torch is not None and case.kind == "conv":
        ops.append(DenseConv(platform, case, dtype, baselines.torch))
    return ops


def reference_name(key, case, baselines):
    if key == "deform" and baselines.ops is not None:
        return "torchvision float64"
    if key == "dense":
        return "torch conv2d float64"
    if case.kind == "conv":
        return "NumPy reference, image 0"
    return f"NumPy reference, first {min(case.R, ROI_CHECK)} RoIs"


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _stats(times):
    t = numpy.asarray(times, dtype=numpy.float64)
    p10, p25, p50, p75, p90 = numpy.percentile(t, [10, 25, 50, 75, 90])
    return {"median_ms": float(p50), "p10_ms": float(p10), "p90_ms": float(p90),
            "p25_ms": float(p25), "p75_ms": float(p75), "min_ms": float(t.min()),
            "mean_ms": float(t.mean()), "reps": int(t.size)}


class Progress:
    """A one-line progress bar on a terminal; one line per item otherwise."""

    def __init__(self, total, stream):
        self.total, self.stream, self.done = max(total, 1), stream, 0
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.width = 0
        self.item = ""

    def begin(self, text):
        self.item = text
        if self.tty:
            self.show("")
        else:
            print(f"[{self.done + 1}/{self.total}] {text}", file=self.stream, flush=True)

    def show(self, detail):
        if not self.tty:
            return
        filled = round(24 * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} {self.item}"
                f"{': ' + detail if detail else ''}")[:150]
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def clear(self):
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

    def advance(self):
        self.done += 1
        self.show("")

    def close(self):
        self.clear()


def environment(platform, baselines, tf32_state, clock):
    import cupydcn

    env = {"cupydcn": cupydcn.__version__, "numpy": numpy.__version__,
           "python": _platform.python_version(), "os": _platform.platform(),
           "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "clock": getattr(clock, "name", type(clock).__name__),
           "workspace_limit_bytes": _config.get_workspace_limit()}
    env.update(platform.device_info())
    env.update(baselines.versions)
    env["tf32"] = tf32_state
    return env


_ROW_ENV = ("gpu", "driver", "cuda_runtime", "cupy", "torch", "torchvision", "cupydcn")


def _failure(error):
    first_line = (str(error).strip().splitlines() or [""])[0][:120]
    return {"why": f"{type(error).__name__}: {first_line}"}


def bench_case(case, dtype, options, platform, baselines, clock, progress, say):
    """Gate, time and measure one case in one dtype: a list of result rows (one per pass)."""
    tolerance = dtype.tolerance
    if options.tf32 and dtype.name == "float32":
        tolerance = max(tolerance, TF32_TOLERANCE)
    first = make_inputs(case, dtype, seed=1)
    n_sets = choose_sets(first, platform.l2_bytes, options.sets)
    host_sets = [first] + [make_inputs(case, dtype, seed=1 + k) for k in range(1, n_sets)]
    ops = make_ops(case, dtype, platform, baselines, options.deterministic)
    sliced = case.kind == "roi" or baselines.ops is None
    check = check_slice(case, first, sliced)

    outcome, references = {}, {}
    for op in ops:
        progress.show(f"checking {op.column}")
        previous, _config.poison = _config.poison, op.column == "cupydcn"
        try:
            got = op.results(check)
        except Exception as error:  # an unsupported dtype in a baseline, or a crash
            status = "unsupported" if op.column != "cupydcn" else "failed"
            outcome[op.column] = {"status": status, **_failure(error)}
            continue
        finally:
            _config.poison = previous
        if op.reference not in references:
            try:
                references[op.reference] = reference_results(op.reference, case, check,
                                                             baselines, platform)
            except Exception as error:  # e.g. out of memory in float64: say so, go on
                references[op.reference] = _failure(error)
        ref = references[op.reference]
        if "why" in ref:
            outcome[op.column] = {"status": "failed" if op.column == "cupydcn" else "unsupported",
                                  "why": f"no reference: {ref['why']}"}
            continue
        errors = {k: rel_err(v, ref[k]) if k in ref else float("inf") for k, v in got.items()}
        worst = max(errors.values())
        ok = worst <= tolerance
        outcome[op.column] = {
            "status": "ok" if ok else ("refused" if op.column == "cupydcn" else "inaccurate"),
            "max_rel_err": worst, "rel_err": errors, "tolerance": tolerance,
            "reference": reference_name(op.reference, case, baselines)}
    parts = []
    for op in ops:
        o = outcome[op.column]
        if "max_rel_err" in o:
            mark = "" if o["status"] == "ok" else f" {o['status'].upper()}"
            parts.append(f"{op.column} {o['max_rel_err']:.1e}{mark}")
        else:
            parts.append(f"{op.column} {o['status']} ({o['why']})")
    against = reference_name(ops[0].reference, case, baselines)
    say(f"  {case.name} {dtype.name}: max rel. error {', '.join(parts)} "
        f"(tolerance {tolerance:.0e}; against {against})")

    timings = {}
    for op in ops:
        o = outcome[op.column]
        if o["status"] not in ("ok", "inaccurate"):
            continue
        op.load(host_sets)
        try:
            for which in PASSES:
                progress.show(f"{op.column} {which}")
                op.before(which)
                times = clock.time(lambda i, w=which: op.run(w, i), library=op.library,
                                   sets=n_sets, warmup=options.warmup, reps=options.reps,
                                   label=f"{op.column} {which}")
                peak = clock.peak_bytes(lambda w=which: op.run(w, 0), library=op.library,
                                        label=f"{op.column} {which}")
                timings[op.column, which] = {**_stats(times), "peak_bytes": int(peak)}
        finally:
            op.unload()
            platform.free_memory()

    rows = []
    flop = case.gemm_flop()
    for which in PASSES:
        row = {"case": case.name, "spec": case.spec(), "dtype": dtype.name, "pass": which,
               "tf32": bool(options.tf32), "deterministic": bool(options.deterministic),
               "sets": n_sets, "warmup": options.warmup,
               "gemm_gflop": None if flop is None else flop * (1, 2, 3)[PASSES.index(which)] / 1e9}
        for column in LIBRARIES:
            o = outcome.get(column)
            if o is None:
                row[column] = None
                continue
            entry = {k: v for k, v in o.items()}
            entry["label"] = next(op.label for op in ops if op.column == column)
            entry.update(timings.get((column, which), {}))
            if row["gemm_gflop"] and "median_ms" in entry:
                entry["tflops"] = row["gemm_gflop"] / entry["median_ms"]
            row[column] = entry
        mine = (row["cupydcn"] or {}).get("median_ms")
        theirs = (row["torchvision"] or {}).get("median_ms")
        dense = (row["dense"] or {}).get("median_ms")
        row["speedup_vs_torchvision"] = theirs / mine if mine and theirs else None
        row["times_dense"] = mine / dense if mine and dense else None
        rows.append(row)
    return rows


class Report(NamedTuple):
    environment: dict
    rows: list
    notes: list
    exit_status: int


def run(options, platform, out=None, err=None):
    """Run every case and dtype of ``options`` on ``platform``; print the table."""
    out = out or sys.stdout
    err = err or sys.stderr
    baselines = load_baselines(platform, options.torch)
    clock = platform.make_clock(baselines.torch)
    notes = list(baselines.notes)
    rows = []
    progress = Progress(len(options.cases) * len(options.dtypes), err)

    def say(line):
        progress.clear()
        print(line, file=out, flush=True)
        progress.show("")

    with tf32_mode(platform, baselines.torch, options.tf32) as tf32_state:
        env = environment(platform, baselines, tf32_state, clock)
        for line in environment_lines(env):
            print(line, file=out)
        for line in notes:
            print(f"note: {line}", file=out)
        print("\ncorrectness gate (relative norm error against float64; cupydcn is timed only "
              "under its dtype's tolerance):", file=out, flush=True)
        for case in options.cases:
            for dtype in options.dtypes:
                progress.begin(f"{case.name} {dtype.name}")
                rows.extend(bench_case(case, dtype, options, platform, baselines, clock,
                                       progress, say))
                progress.advance()
    progress.close()
    row_env = {k: env.get(k) for k in _ROW_ENV}
    for row in rows:
        row["env"] = row_env
    table_notes = _table_notes(rows)
    notes.extend(table_notes)
    print("", file=out)
    print(format_table(rows), file=out)
    print(f"\ntimes: median [p10-p90] of {options.reps} calls after {options.warmup} warm-up "
          f"calls, {clock_name(clock)}, input sets rotated; MiB: peak extra memory of one call "
          f"(each library's allocator); speed-up = torchvision / cupydcn; x dense = cupydcn / "
          f"dense cuDNN conv2d of the same shape (the floor)", file=out)
    for note in table_notes:
        print(f"note: {note}", file=out)
    bad = [r for r in rows if (r["cupydcn"] or {}).get("status") in ("refused", "failed")]
    status = 1 if bad else 0
    if bad:
        print(f"\n{len({(r['case'], r['dtype']) for r in bad})} case(s) refused: cupydcn's "
              "result is wrong, no time is posted", file=out)
    out.flush()
    return Report(env, rows, notes, status)


def clock_name(clock):
    return getattr(clock, "name", type(clock).__name__)


def environment_lines(env):
    lines = [f"cupydcn {env['cupydcn']}, NumPy {env['numpy']}, Python {env['python']}, "
             f"CuPy {env['cupy'] or 'not installed'}",
             f"device: {env['device']}"]
    if env.get("gpu"):
        lines.append(f"driver {env['driver']}, CUDA runtime {env['cuda_runtime']}, "
                     f"NVRTC {env['nvrtc']}, {env['gpu_memory_gib']} GiB, "
                     f"L2 {env['l2_cache_mib']} MiB")
    lines.append(f"torch {env['torch'] or '-'} (CUDA {env['torch_cuda'] or '-'}, cuDNN "
                 f"{env['cudnn'] or '-'}), torchvision {env['torchvision'] or '-'}")
    tf32 = env["tf32"]
    lines.append(f"TF32 {'on' if tf32['enabled'] else 'off'}: CuPy float32 GEMMs "
                 f"{tf32['cupy_float32_compute_type']}"
                 + (f"; torch {tf32['torch']}" if tf32.get("torch") else ""))
    return lines


def _table_notes(rows):
    notes = []
    for column in ("torchvision", "dense"):
        missing = {}
        for row in rows:
            o = row[column]
            if o and o["status"] == "unsupported":
                missing.setdefault(row["dtype"], o["why"])
        for dtype, why in missing.items():
            notes.append(f"{column} has no {dtype} here: n/a in the table ({why})")
    if any(r["spec"]["kind"] == "roi" and r["torchvision"] for r in rows):
        notes.append("RoI rows: torchvision = roi_align(aligned=True), without offset or "
                     "mask; cupydcn's backward also computes the offset and mask gradients")
    flagged = {(r["case"], r["dtype"], c) for r in rows for c in ("torchvision", "dense")
               if r[c] and r[c]["status"] == "inaccurate"}
    for case, dtype, column in sorted(flagged):
        notes.append(f"{column} on {case} {dtype} is above the tolerance (err marked !): "
                     "timed anyway, it is the baseline")
    return notes


def _ms(entry):
    if entry is None:
        return "-"
    if "median_ms" in entry:
        return f"{entry['median_ms']:.3f}"
    return {"unsupported": "n/a", "refused": "REFUSED", "failed": "FAILED"}.get(
        entry["status"], entry["status"])


def _spread(entry):
    if entry and "median_ms" in entry:
        return f"{entry['p10_ms']:.3f}-{entry['p90_ms']:.3f}"
    return "-"


def _mib(entry):
    if entry and "peak_bytes" in entry:
        return f"{entry['peak_bytes'] / _MIB:.1f}"
    return "-"


def _err(entry):
    if entry is None or "max_rel_err" not in entry:
        return "-"
    return f"{entry['max_rel_err']:.1e}" + ("" if entry["status"] == "ok" else "!")


TABLE_COLUMNS = ("case", "dtype", "pass", "cupydcn ms", "p10-p90", "torchvision ms", "dense ms",
                 "speed-up", "x dense", "MiB cupydcn", "MiB tv", "MiB dense", "err cupydcn",
                 "err tv", "err dense")


def table_cells(row):
    c, t, d = row["cupydcn"], row["torchvision"], row["dense"]
    return (row["case"], row["dtype"], row["pass"], _ms(c), _spread(c), _ms(t), _ms(d),
            f"{row['speedup_vs_torchvision']:.2f}x" if row["speedup_vs_torchvision"] else "-",
            f"{row['times_dense']:.2f}x" if row["times_dense"] else "-",
            _mib(c), _mib(t), _mib(d), _err(c), _err(t), _err(d))


def format_table(rows):
    cells = [TABLE_COLUMNS] + [table_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]
    left = 3   # case, dtype, pass are left-aligned, numbers right-aligned

    def fmt(line):
        return "  ".join(v.ljust(w) if i < left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(line, widths))).rstrip()

    rule = "-" * len(fmt(cells[0]))
    return "\n".join([fmt(cells[0]), rule, *(fmt(line) for line in cells[1:])])


# ---------------------------------------------------------------------------
# Files: JSON, CSV, PNG
# ---------------------------------------------------------------------------


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _prepare(path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path, report, options):
    settings = {"reps": options.reps, "warmup": options.warmup, "sets": options.sets,
                "tf32": options.tf32, "quick": options.quick,
                "dtypes": [d.name for d in options.dtypes],
                "cases": [c.spec() | {"name": c.name} for c in options.cases],
                "passes": list(PASSES)}
    document = {"tool": "cupydcn bench", "schema": 1, "environment": report.environment,
                "settings": settings, "results": report.rows, "notes": report.notes,
                "exit_status": report.exit_status}
    _prepare(path).write_text(json.dumps(_jsonable(document), indent=1) + "\n")


CSV_LIBRARY_FIELDS = ("status", "median_ms", "p10_ms", "p90_ms", "peak_mib", "max_rel_err")


def csv_header():
    head = ["case", "kind", "dtype", "pass", "tf32", "sets", "gemm_gflop"]
    for column in LIBRARIES:
        head += [f"{column}_{f}" for f in CSV_LIBRARY_FIELDS]
    return head + ["speedup_vs_torchvision", "times_dense", *_ROW_ENV]


def write_csv(path, report):
    with open(_prepare(path), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(csv_header())
        for row in report.rows:
            line = [row["case"], row["spec"]["kind"], row["dtype"], row["pass"], row["tf32"],
                    row["sets"], row["gemm_gflop"]]
            for column in LIBRARIES:
                entry = row[column] or {}
                values = dict(entry)
                if "peak_bytes" in entry:
                    values["peak_mib"] = round(entry["peak_bytes"] / _MIB, 3)
                line += [values.get(f, "") for f in CSV_LIBRARY_FIELDS]
            line += [row["speedup_vs_torchvision"], row["times_dense"]]
            line += [row["env"].get(k) for k in _ROW_ENV]
            writer.writerow(["" if v is None else v for v in line])


def import_pyplot():
    """matplotlib's pyplot on the Agg backend; UsageError when it is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise UsageError(f"--plot needs matplotlib ({error}); install it "
                         "(python -m pip install matplotlib) or drop --plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def write_plot(path, report):
    """Bars of the speed-up over torchvision and of the fraction of the dense
    floor reached (dense time / cupydcn time), per case and pass, one colour per dtype."""
    pyplot = import_pyplot()
    rows = report.rows
    labels = list(dict.fromkeys(f"{r['case']}\n{r['pass']}" for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    panels = (("speedup_vs_torchvision", "torchvision time / cupydcn time (>1: cupydcn faster)"),
              ("times_dense", "dense cuDNN time / cupydcn time (1 = the floor)"))
    size = (max(8.0, 0.55 * len(labels) * len(dtypes) + 3), 9)
    figure, axes = pyplot.subplots(2, 1, figsize=size, squeeze=False)
    width = 0.8 / max(len(dtypes), 1)
    for ax, (key, title) in zip(axes[:, 0], panels):
        drawn = False
        for k, dtype in enumerate(dtypes):
            xs, ys = [], []
            for r in rows:
                value = r[key]
                if r["dtype"] == dtype and value:
                    shift = (k - (len(dtypes) - 1) / 2) * width
                    xs.append(labels.index(f"{r['case']}\n{r['pass']}") + shift)
                    ys.append(value if key == "speedup_vs_torchvision" else 1.0 / value)
            if xs:
                ax.bar(xs, ys, width=width, label=dtype, color=f"C{k}")
                drawn = True
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no baseline in this run", transform=ax.transAxes, ha="center")
    env = report.environment
    figure.suptitle(f"cupydcn {env['cupydcn']} on {env['device']}, TF32 "
                    f"{'on' if env['tf32']['enabled'] else 'off'}; torch {env['torch'] or '-'}, "
                    f"torchvision {env['torchvision'] or '-'}", fontsize=10)
    figure.tight_layout()
    figure.savefig(_prepare(path), dpi=110)
    pyplot.close(figure)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def main(argv=None, *, platform=None, out=None, err=None):
    """``cupydcn bench ARGS``; returns the exit status (see ``--help``).

    ``platform`` replaces the GPU (the CPU test tier passes a
    :class:`CpuPlatform` with a fake clock)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        options = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    if options.list:
        for case in options.cases:
            print(case.name, file=out)
        return 0
    try:
        if options.plot:
            import_pyplot()
    except UsageError as error:
        print(f"cupydcn bench: {error}", file=err)
        return 2
    if platform is None:
        platform, why = detect_gpu()
        if platform is None:
            print(f"cupydcn bench: {why}", file=err)
            return 1
    report = run(options, platform, out, err)
    for flag, writer in ((options.json, lambda p: write_json(p, report, options)),
                         (options.csv, lambda p: write_csv(p, report)),
                         (options.plot, lambda p: write_plot(p, report))):
        if flag:
            writer(flag)
            print(f"wrote {os.fspath(flag)}", file=out)
    return report.exit_status


if __name__ == "__main__":
    sys.exit(main())
