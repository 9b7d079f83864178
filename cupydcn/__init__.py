"""cupydcn: deformable convolution (DCNv1/v2) and deformable RoI pooling as
CUDA C kernels loaded with CuPy, behind an array-in, array-out API.

CuPy arrays and CUDA DLPack arrays (torch, JAX, ...) run on their GPU without
copies; NumPy arrays run on the CPU backend (:func:`set_cpu_backend`: the same
kernels compiled for the CPU, or the NumPy reference ``cupydcn.reference``).
Each op has several implementations (:func:`algorithms`); every op function
takes ``algorithm=`` to name one, else the dispatcher chooses. The
numbers are those of torchvision and mmcv (docs/semantics.md). Importing cupydcn
imports neither CuPy's CUDA runtime, torch nor TensorFlow.

Bad arguments raise :class:`ArgumentError` (a ``ValueError`` and a
``RuntimeError``: shapes, values) or :class:`ArgumentTypeError` (a ``TypeError``
and a ``RuntimeError``: types, dtypes, a missing array), from every entry point
and every bridge, each naming the argument, the value received and the value
expected.
"""

from cupydcn._config import get_tf32, get_workspace_limit, set_tf32, set_workspace_limit
from cupydcn._dispatch import algorithms, get_cpu_backend, set_cpu_backend
from cupydcn._deform_conv import DeformConv2dGrads, deform_conv2d, deform_conv2d_backward
from cupydcn._validation import ArgumentError, ArgumentTypeError
from cupydcn._roi_pool import (
    DeformPSRoIPoolGrads,
    DeformRoIPoolGrads,
    deform_psroi_pool,
    deform_psroi_pool_backward,
    deform_roi_pool,
    deform_roi_pool_backward,
)

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "DeformConv2dGrads",
    "DeformPSRoIPoolGrads",
    "DeformRoIPoolGrads",
    "algorithms",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_psroi_pool",
    "deform_psroi_pool_backward",
    "deform_roi_pool",
    "deform_roi_pool_backward",
    "get_cpu_backend",
    "get_tf32",
    "get_workspace_limit",
    "set_cpu_backend",
    "set_tf32",
    "set_workspace_limit",
]
