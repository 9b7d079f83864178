"""``cupydcn check``: is this machine computing the right numbers?

Reports the GPU and CuPy found and the CPU backend, runs every kernel
implementation of every op (``cupydcn.algorithms``) forward and backward on
the GPU (or, with no GPU, the same kernel source compiled for the CPU), and
compares each result with the float64 NumPy reference at the tolerances of
docs/semantics.md §5.3.
Exit status 0 when every comparison passes.
"""

from __future__ import annotations

import platform
import sys
import threading
import types

import numpy

from cupydcn import (_deform_conv, _dispatch, _dtypes, _gpu, _kernels, _roi_pool, _validation,
                     reference)


def environment():
    """(lines describing the machine, the backend to run on or None, why)."""
    import cupydcn

    lines = [f"cupydcn {cupydcn.__version__}, NumPy {numpy.__version__}, "
             f"Python {platform.python_version()}"]
    cpu, why_cpu = _dispatch.cpu_backend_reason()
    lines.append(f"CPU backend (NumPy and CPU framework arrays): {cpu} ({why_cpu})")
    try:
        import cupy
    except ImportError as error:
        lines.append(f"CuPy: not installed ({error})")
        cupy = None
    if cupy is not None:
        lines.append(f"CuPy {cupy.__version__}")
        why = _gpu.no_gpu_reason()
        if why is None:
            count = cupy.cuda.runtime.getDeviceCount()
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            driver = cupy.cuda.runtime.driverGetVersion()
            runtime = cupy.cuda.runtime.runtimeGetVersion()
            lines.append(f"GPU: {name} (sm_{props['major']}{props['minor']}), {count} device(s), "
                         f"driver {driver // 1000}.{driver % 1000 // 10}, "
                         f"CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}")
            return lines, _kernels.cupy_backend(), "GPU"
        lines.append(why)
    compiler = _dispatch._compiler()
    if compiler:
        lines.append(f"running the kernels compiled for the CPU with {compiler} (no GPU)")
        return lines, _kernels.HostBackend(grid=4, block=64), "CPU (host-built kernels)"
    lines.append("no GPU and no C++ compiler: nothing can run the kernels")
    return lines, None, None


def _to_host(x):
    return numpy.asarray(x.get() if hasattr(x, "get") else x, dtype=numpy.float64)


def _rel(got, ref):
    got, ref = _to_host(got), numpy.asarray(ref, dtype=numpy.float64)
    if not numpy.all(numpy.isfinite(got)):
        return float("inf")
    scale = numpy.linalg.norm(ref)
    return float(numpy.linalg.norm(got - ref) / (scale if scale else 1.0))


def _arrays(**arrays):
    return types.SimpleNamespace(**arrays)


def _conv_case(backend, dtype, implementation):
    """One DCNv2 layer (groups 2, offset groups 2, stride 2) forward and backward."""
    rng = numpy.random.default_rng(7)
    B, C, H, W, Cout, k = 2, 8, 13, 11, 6, 3
    params = dict(stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    Ho, Wo = (H + 2 - 3) // 2 + 1, (W + 2 - 5) // 1 + 1
    host = {
        "input": rng.standard_normal((B, C, H, W)),
        "offset": rng.uniform(-2, 2, (B, 2 * 2 * k * k, Ho, Wo)),
        "weight": rng.standard_normal((Cout, C // 2, k, k)) / 6,
        "bias": rng.standard_normal(Cout),
        "mask": rng.uniform(0, 1, (B, 2 * k * k, Ho, Wo)),
        "grad_output": rng.standard_normal((B, Cout, Ho, Wo)),
    }
    exact = {key: v.astype(dtype).astype(numpy.float64) for key, v in host.items()}
    dev = {key: backend.xp.asarray(v.astype(dtype)) for key, v in host.items()}
    geo = _validation.check_deform_conv2d(dev["input"], dev["offset"], dev["weight"], dev["bias"],
                                          mask=dev["mask"], **params)
    arrays = _arrays(**dev)
    out = implementation.forward(backend, geo, arrays)
    grads = implementation.backward(backend, geo, arrays, frozenset(_deform_conv.GRADIENTS))
    ref_out = reference.deform_conv2d(exact["input"], exact["offset"], exact["weight"],
                                      exact["bias"], mask=exact["mask"], **params)
    ref_grads = reference.deform_conv2d_backward(exact["grad_output"], exact["input"],
                                                 exact["offset"], exact["weight"], exact["bias"],
                                                 mask=exact["mask"], **params)
    results = [("deform_conv2d forward", _rel(out, ref_out))]
    for name, got, ref in zip(_deform_conv.GRADIENTS, grads, ref_grads):
        results.append((f"deform_conv2d grad_{name}", _rel(got, ref)))
    return results


def _roi_inputs(backend, dtype, rng):
    feat = rng.standard_normal((2, 8, 17, 19))
    corners = numpy.sort(rng.uniform(-2, 20, (6, 2, 2)), axis=1)
    rois = numpy.column_stack([rng.integers(0, 2, 6), corners[:, 0, 0], corners[:, 0, 1],
                               corners[:, 1, 0], corners[:, 1, 1]])
    exact = {"feat": feat.astype(dtype).astype(numpy.float64),
             "rois": rois.astype(dtype).astype(numpy.float64)}
    dev = {"feat": backend.xp.asarray(feat.astype(dtype)),
           "rois": backend.xp.asarray(rois.astype(dtype))}
    return exact, dev


def _roi_case(backend, dtype, implementation):
    """Modulated deformable RoI pooling (3x3 bins, adaptive sampling)."""
    rng = numpy.random.default_rng(8)
    exact, dev = _roi_inputs(backend, dtype, rng)
    for name, shape, low, high in (("offset", (6, 2, 3, 3), -0.5, 0.5),
                                   ("mask", (6, 1, 3, 3), 0, 1), ("grad", (6, 8, 3, 3), -1, 1)):
        value = rng.uniform(low, high, shape).astype(dtype)
        exact[name], dev[name] = value.astype(numpy.float64), backend.xp.asarray(value)
    params = dict(output_size=(3, 3), spatial_scale=0.5, sampling_ratio=0, gamma=0.1)
    geo = _validation.check_deform_roi_pool(dev["feat"], dev["rois"], dev["offset"],
                                            mask=dev["mask"], **params)
    arrays = _arrays(input=dev["feat"], rois=dev["rois"], offset=dev["offset"],
                     mask=dev["mask"], grad_output=dev["grad"])
    out = implementation.forward(backend, geo, arrays)
    grads = implementation.backward(backend, geo, arrays, frozenset(_roi_pool.ROI_GRADIENTS))
    ref_out = reference.deform_roi_pool(exact["feat"], exact["rois"], exact["offset"],
                                        mask=exact["mask"], **params)
    ref_grads = reference.deform_roi_pool_backward(exact["grad"], exact["feat"], exact["rois"],
                                                   exact["offset"], mask=exact["mask"], **params)
    results = [("deform_roi_pool forward", _rel(out, ref_out))]
    for name, got, ref in zip(_roi_pool.ROI_GRADIENTS, grads, ref_grads):
        results.append((f"deform_roi_pool grad_{name}", _rel(got, ref)))
    return results


def _psroi_case(backend, dtype, implementation):
    """Deformable PS RoI pooling, 2 classes, 3x3 bins, 2x2 parts."""
    rng = numpy.random.default_rng(9)
    exact, dev = _roi_inputs(backend, dtype, rng)
    for name, shape in (("trans", (6, 4, 2, 2)), ("grad", (6, 2, 3, 3))):
        value = rng.uniform(-1, 1, shape).astype(dtype)
        exact[name], dev[name] = value.astype(numpy.float64), backend.xp.asarray(value)
    params = dict(spatial_scale=0.5, output_dim=2, group_size=2, pooled_size=3, part_size=2,
                  sample_per_part=2, trans_std=0.1)
    geo = _validation.check_deform_psroi_pool(dev["feat"], dev["rois"], dev["trans"], **params)
    arrays = _arrays(input=dev["feat"], rois=dev["rois"], trans=dev["trans"],
                     grad_output=dev["grad"])
    out, arrays.count = implementation.forward(backend, geo, arrays)
    grads = implementation.backward(backend, geo, arrays, frozenset(_roi_pool.PSROI_GRADIENTS))
    ref_out, _ = reference.deform_psroi_pool(exact["feat"], exact["rois"], exact["trans"], **params)
    ref_grads = reference.deform_psroi_pool_backward(exact["grad"], exact["feat"], exact["rois"],
                                                     exact["trans"], **params)
    results = [("deform_psroi_pool forward", _rel(out, ref_out))]
    for name, got, ref in zip(_roi_pool.PSROI_GRADIENTS, grads, ref_grads):
        results.append((f"deform_psroi_pool grad_{name}", _rel(got, ref)))
    return results


# (op, case): every kernel implementation of the op runs the case
CASES = [("deform_conv2d", _conv_case), ("deform_roi_pool", _roi_case),
         ("deform_psroi_pool", _psroi_case)]


def _kernel_implementations(op, dtype):
    """The op's registered implementations that run kernels (not the
    reference) and support ``dtype`` (a row of the dtype table)."""
    return [i for i in _dispatch._registry[op] if i.launch is not None
            and (i.dtypes is None or dtype.name in i.dtypes)]


def _tolerance(dtype, implementation, op):
    if op.endswith("forward"):
        return implementation.forward_tolerance(dtype)
    return dtype.tolerance


def _compile_notice():
    print("compiling kernels for this machine, first run only ...", flush=True)


def main(argv=None):
    lines, backend, where = environment()
    for line in lines:
        print(line)
    if backend is None:
        return 1
    failures = 0
    # The first run compiles the kernels (~15 s); a later one finds them cached.
    # Said only when the first op is slow, i.e. when a compile is under way.
    notice = threading.Timer(1.0, _compile_notice)
    notice.daemon = True
    notice.start()
    print(f"\n{'op':<34}{'algorithm':<22}{'dtype':<10}{'rel. error':>12}{'tolerance':>11}"
          f"  result   [{where}]", flush=True)
    for dtype in _dtypes.DTYPES.values():
        for op_name, case in CASES:
            for implementation in _kernel_implementations(op_name, dtype):
                results = case(backend, dtype.dtype, implementation)
                notice.cancel()
                for op, err in results:
                    tolerance = _tolerance(dtype, implementation, op)
                    ok = err <= tolerance
                    failures += not ok
                    print(f"{op:<34}{implementation.name:<22}{dtype.name:<10}{err:>12.2e}"
                          f"{tolerance:>11.0e}  {'ok' if ok else 'FAILED'}")
    verdict = "all ops match the reference" if not failures else f"{failures} comparison(s) FAILED"
    print(f"\n{verdict} on {where}")
    sys.stdout.flush()
    return 0 if not failures else 1
