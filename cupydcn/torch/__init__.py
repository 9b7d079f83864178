"""PyTorch bridge: cupydcn's ops as ``torch.library`` custom ops, with autograd,
and the modules of torchvision and mmcv built on them.

Ops (namespace ``cupydcn``, each backward registered as its own op, each with a
fake implementation so ``torch.compile(fullgraph=True)`` traces them):

* :func:`deform_conv2d`: a drop-in for ``torchvision.ops.deform_conv2d``;
* :func:`deform_roi_pool`, :func:`deform_psroi_pool`: mmcv's and the official
  DCN operator's deformable RoI pooling.

Each takes ``algorithm=None`` (an implementation from
``cupydcn.algorithms(op)``), scripts with ``torch.jit.script`` and is a leaf
of ``torch.fx`` symbolic tracing.

Modules: :class:`DeformConv2d` (torchvision), :class:`DeformConv2dPack`,
:class:`ModulatedDeformConv2dPack`, :class:`DeformRoIPool`,
:class:`DeformRoIPoolPack`, :class:`ModulatedDeformRoIPoolPack` (mmcv) and
:class:`DeformPSRoIPool` (DCNv2's ``DCNv2Pooling``). Each foreign library's own
names, signatures and argument orders: ``cupydcn.torch.mmcv``,
``cupydcn.torch.dcnv2`` (DCNv2 / CenterNet), ``cupydcn.torch.detectron2``.

The bridge holds DLPack and autograd only; the numbers are the core's
(docs/semantics.md). Its rooms: ``_interop`` (tensors to CuPy/NumPy views
and back, torch's device, stream and caching allocator), ``_ops`` (the custom
ops generated from ``cupydcn._ops.SPECS``: schemas, fakes, autograd,
autocast, deterministic mode; and the typed entry points), ``modules`` (the
modules), ``_onnx`` (ONNX export).

CUDA tensors run the CUDA kernels on their device, on torch's current stream,
with CuPy allocating from torch's caching allocator; CPU tensors run the CPU
backend (``cupydcn.set_cpu_backend``). Inputs cross by DLPack without copies;
the op results are tensors that torch allocates (``torch.empty`` on the
input's device and torch's current stream) and the core writes into, so
``record_stream`` and the caching allocator treat them as any other torch
tensor. Shapes are checked by ``cupydcn._validation`` (in the fake
implementations too), so a mistake gets the same message from torch as from
CuPy or NumPy, as a ``cupydcn.ArgumentError`` (a ``ValueError`` and a
``RuntimeError``, what torchvision raises) or ``cupydcn.ArgumentTypeError``
(a ``TypeError`` and a ``RuntimeError``; e.g. "offset must be a
torch.Tensor, got numpy.ndarray").

Autocast (CUDA and CPU): deform_conv2d runs in the autocast dtype (float16 or
bfloat16), as torch's convolutions do; the RoI poolings run in float32 and
return the input's dtype, as torchvision's roi_align does (RoI coordinates in
bfloat16 would be off by pixels). float64 tensors are never cast.
Deterministic mode: under ``torch.use_deterministic_algorithms(True)`` every
backward runs the core's deterministic path (no floating-point atomics), so
gradients are bit-identical run after run.

Importing ``cupydcn`` does not import this module (nor torch): import it as
``import cupydcn.torch``.
"""

from cupydcn.torch._ops import deform_conv2d, deform_psroi_pool, deform_roi_pool
from cupydcn.torch.modules import (
    DeformConv2d,
    DeformConv2dPack,
    DeformPSRoIPool,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformConv2dPack,
    ModulatedDeformRoIPoolPack,
    _conv_parameters,  # noqa: F401  (cupydcn.torch.detectron2's)
    _MMCVDeformConv2d,  # noqa: F401  (cupydcn.torch.mmcv's)
)

# The entry points' public home (torch.fx prints and imports call_function
# targets by module: "cupydcn.torch.deform_conv2d", as numpy names its functions)
for _function in (deform_conv2d, deform_psroi_pool, deform_roi_pool):
    _function.__module__ = __name__
del _function

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformPSRoIPool",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformConv2dPack",
    "ModulatedDeformRoIPoolPack",
    "deform_conv2d",
    "deform_psroi_pool",
    "deform_roi_pool",
]
