"""``cupydcn check``: is this machine computing the right numbers?

Reports the GPU and CuPy found, runs every op forward and backward on the GPU
(or, with no GPU, the same kernel source compiled for the CPU), and compares
each result with the float64 NumPy reference at SEMANTICS.md's tolerances.
Exit status 0 when every comparison passes.
"""

from __future__ import annotations

import platform
import shutil
import sys

import numpy

from cupydcn import _deform_conv, _dtypes, _kernels, _validation, reference

def environment():
    """(lines describing the machine, the backend to run on or None, why)."""
    import cupydcn

    lines = [f"cupydcn {cupydcn.__version__}, NumPy {numpy.__version__}, "
             f"Python {platform.python_version()}"]
    try:
        import cupy
    except ImportError as error:
        lines.append(f"CuPy: not installed ({error})")
        cupy = None
    if cupy is not None:
        lines.append(f"CuPy {cupy.__version__}")
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:
            count, why = 0, f"{error}"
        else:
            why = "0 CUDA devices"
        if count:
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            driver = cupy.cuda.runtime.driverGetVersion()
            runtime = cupy.cuda.runtime.runtimeGetVersion()
            lines.append(f"GPU: {name} (sm_{props['major']}{props['minor']}), {count} device(s), "
                         f"driver {driver // 1000}.{driver % 1000 // 10}, "
                         f"CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}")
            return lines, _kernels.cupy_backend(), "GPU"
        lines.append(f"GPU: none ({why})")
    compiler = shutil.which(_kernels.HostBackend().compiler)
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


def _conv_case(backend, dtype):
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
    out = _deform_conv.forward(backend, geo, dev["input"], dev["offset"], dev["weight"],
                               dev["bias"], dev["mask"])
    grads = _deform_conv.backward(backend, geo, dev["grad_output"], dev["input"], dev["offset"],
                                  dev["weight"], dev["mask"], frozenset(_deform_conv.GRADIENTS))
    ref_out = reference.deform_conv2d(exact["input"], exact["offset"], exact["weight"],
                                      exact["bias"], mask=exact["mask"], **params)
    ref_grads = reference.deform_conv2d_backward(exact["grad_output"], exact["input"],
                                                 exact["offset"], exact["weight"], exact["bias"],
                                                 mask=exact["mask"], **params)
    results = [("deform_conv2d forward", _rel(out, ref_out))]
    for name, got, ref in zip(_deform_conv.GRADIENTS, grads, ref_grads):
        results.append((f"deform_conv2d grad_{name}", _rel(got, ref)))
    return results


CASES = [_conv_case]


def main(argv=None):
    lines, backend, where = environment()
    for line in lines:
        print(line)
    if backend is None:
        return 1
    failures = 0
    print(f"\n{'op':<34}{'dtype':<10}{'rel. error':>12}{'tolerance':>11}  result   [{where}]")
    for dtype in _dtypes.DTYPES.values():
        tolerance = dtype.tolerance
        for case in CASES:
            for op, err in case(backend, dtype.dtype):
                ok = err <= tolerance
                failures += not ok
                print(f"{op:<34}{dtype.name:<10}{err:>12.2e}{tolerance:>11.0e}  "
                      f"{'ok' if ok else 'FAILED'}")
    print(f"\n{'all ops match the reference' if not failures else f'{failures} comparison(s) FAILED'}"
          f" on {where}")
    sys.stdout.flush()
    return 0 if not failures else 1
