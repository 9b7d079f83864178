"""CPU timings of deformable convolution: the host backend beside torchvision and NumPy.

    python benchmarks/cpu_bench.py [--repeat 7] [--workers N] [--algorithm NAME ...] [--json out.json]

float32 DCNv2 (mask and bias), padding 1, forward and forward + backward (every
gradient), on the shapes of issue 12: input (2, 64, 64, 64) with weight
(64, 64, 3, 3), and input (8, 32, 32, 32) with weight (32, 32, 3, 3). Side by
side in one run:

* ``host:<algorithm>``: cupydcn's kernels compiled for the CPU
  (``kernels/host_runtime.h``) with the checks off and blocks in parallel on
  ``--workers`` threads (default: the cores), through the dispatcher's
  implementation ``<algorithm>`` (``--algorithm``, repeatable; default: every
  registered one that runs on the host, e.g. ``im2col`` and ``im2col_fused``);
  the GEMMs are NumPy's (its BLAS).
* ``cupydcn.torch``: ``cupydcn.torch.deform_conv2d`` on CPU tensors with
  autograd, the users' path (the dispatcher's automatic choice), if torch is
  importable: what issue 12's targets are about.
* ``torchvision``: ``torchvision.ops.deform_conv2d`` on CPU tensors, if importable.
* ``numpy``: ``cupydcn.reference`` (the float64 NumPy reference, what CPU users
  got before the host backend), timed once per case: it is slow.

Each result is first checked against the reference (relative error of the
forward and of every gradient), then timed: the median of ``--repeat`` runs
after one warm-up. Prints a table (and writes JSON with ``--json``). A program,
not a test: the tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from types import SimpleNamespace  # noqa: E402

from cupydcn import (_deform_conv, _dispatch, _dtypes, _kernels, _validation,  # noqa: E402
                     reference)

TOLERANCE = 1e-4  # relative error of every result against the float64 reference

CASES = [((2, 64, 64, 64), (64, 64, 3, 3)), ((8, 32, 32, 32), (32, 32, 3, 3))]
WRT = frozenset({"input", "offset", "weight", "bias", "mask"})


def make_case(input_shape, weight_shape, seed=0):
    rng = numpy.random.default_rng(seed)
    B, C, H, W = input_shape
    Cout, _, kh, kw = weight_shape
    f = numpy.float32
    x = rng.standard_normal(input_shape).astype(f)
    w = (rng.standard_normal(weight_shape) * 0.05).astype(f)
    b = rng.standard_normal(Cout).astype(f)
    offset = rng.uniform(-2, 2, (B, 2 * kh * kw, H, W)).astype(f)
    mask = rng.uniform(0, 1, (B, kh * kw, H, W)).astype(f)
    grad = rng.standard_normal((B, Cout, H, W)).astype(f)
    return dict(input=x, weight=w, bias=b, offset=offset, mask=mask, grad=grad)


def median_times(functions, repeat):
    """Median wall time of each function, the runs interleaved (A B A B ...) so
    that a change in the machine's load falls on all of them alike."""
    for function in functions:
        function()  # warm-up (and the host build, the first time)
    times = [[] for _ in functions]
    for _ in range(repeat):
        for function, spent in zip(functions, times):
            start = time.perf_counter()
            function()
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def rel_err(got, ref):
    got, ref = numpy.asarray(got, numpy.float64), numpy.asarray(ref, numpy.float64)
    return float(numpy.linalg.norm(got - ref) / max(numpy.linalg.norm(ref), 1e-300))


def host_algorithms():
    """The registered deform_conv2d implementations that run on the host."""
    return [i.name for i in _dispatch._registry["deform_conv2d"] if _dispatch.HOST in i.runs_on]


class Host:
    def __init__(self, workers, algorithm):
        self.backend = _kernels.HostBackend(checks=False, workers=workers)
        if algorithm not in host_algorithms():
            raise SystemExit(f"--algorithm must be one of {', '.join(host_algorithms())}, "
                             f"got {algorithm!r}")
        self.implementation = _dispatch.implementation("deform_conv2d", algorithm)
        self.name, self.short = f"host:{algorithm}", algorithm
        # TF32 is held to float16's tolerance in the forward
        self.forward_tolerance = max(TOLERANCE, self.implementation.forward_tolerance(
            _dtypes.lookup(numpy.float32)))

    @staticmethod
    def _call(c):
        geo = _validation.check_deform_conv2d(c["input"], c["offset"], c["weight"], c["bias"], 1,
                                              1, 1, c["mask"], grad_output=c["grad"])
        arrays = SimpleNamespace(input=c["input"], offset=c["offset"], weight=c["weight"],
                                 bias=c["bias"], mask=c["mask"], grad_output=c["grad"])
        return geo, arrays

    def forward(self, c):
        geo, arrays = self._call(c)
        return self.implementation.forward(self.backend, geo, arrays)

    def forward_backward(self, c):
        geo, arrays = self._call(c)
        out = self.implementation.forward(self.backend, geo, arrays)
        grads = self.implementation.backward(self.backend, geo, arrays, WRT)
        return out, grads


class TorchOp:
    """A deform_conv2d of a torch library on CPU tensors, with autograd."""
    forward_tolerance = None

    def _tensors(self, c, grad):
        t = {k: self.torch.from_numpy(v) for k, v in c.items()}
        if grad:
            for k in ("input", "offset", "weight", "bias", "mask"):
                t[k].requires_grad_(True)
        return t

    def forward(self, c):
        t = self._tensors(c, False)
        with self.torch.no_grad():
            return self.op(t["input"], t["offset"], t["weight"], t["bias"], padding=1,
                           mask=t["mask"]).numpy()

    def forward_backward(self, c):
        t = self._tensors(c, True)
        out = self.op(t["input"], t["offset"], t["weight"], t["bias"], padding=1, mask=t["mask"])
        out.backward(t["grad"])
        grads = _deform_conv.DeformConv2dGrads(*(t[k].grad.numpy() for k in
                                                 ("input", "offset", "weight", "bias", "mask")))
        return out.detach().numpy(), grads


class CupydcnTorch(TorchOp):
    """``cupydcn.torch.deform_conv2d``: the user's CPU path (validation, the
    dispatcher's automatic choice, the host backend with its default workers)."""
    name, short = "cupydcn.torch", "cupydcn.torch"

    def __init__(self):
        import torch

        import cupydcn.torch

        self.torch, self.op = torch, cupydcn.torch.deform_conv2d


class TorchVision(TorchOp):
    name = "torchvision"

    def __init__(self):
        import torch
        import torchvision.ops

        self.torch, self.op = torch, torchvision.ops.deform_conv2d


def reference_results(c):
    out = reference.deform_conv2d(c["input"], c["offset"], c["weight"], c["bias"], padding=(1, 1),
                                  mask=c["mask"])
    grads = reference.deform_conv2d_backward(c["grad"], c["input"], c["offset"], c["weight"],
                                             c["bias"], padding=(1, 1), mask=c["mask"])
    # reference order: input, offset, weight, bias, mask
    return out, _deform_conv.DeformConv2dGrads(*grads)


def _grads_error(grads, ref):
    names = ("input", "offset", "weight", "bias", "mask")
    return max(rel_err(getattr(grads, n), getattr(ref, n)) for n in names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--algorithm", action="append", default=None,
                        help=f"a host implementation to time (repeatable; default: all of "
                             f"{', '.join(host_algorithms())})")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    hosts = [Host(args.workers, name) for name in (args.algorithm or host_algorithms())]
    impls = list(hosts)
    try:
        hosts.append(CupydcnTorch())
        impls.append(hosts[-1])
    except ImportError as error:
        print(f"cupydcn.torch not timed: {error}")
    try:
        impls.append(TorchVision())
        import torch
        import torchvision
        tv = f"torch {torch.__version__}, torchvision {torchvision.__version__}, " \
             f"{torch.get_num_threads()} threads"
    except ImportError as error:
        tv = f"torchvision not importable: {error}"
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores; python {platform.python_version()}, "
          f"numpy {numpy.__version__}; {tv}; host workers {hosts[0].backend.workers}; "
          f"load average {os.getloadavg()[0]:.1f}")

    results = []
    for input_shape, weight_shape in CASES:
        c = make_case(input_shape, weight_shape)
        start = time.perf_counter()
        ref_out, ref_grads = reference_results(c)
        numpy_fwd_bwd = time.perf_counter() - start
        start = time.perf_counter()
        reference.deform_conv2d(c["input"], c["offset"], c["weight"], c["bias"], padding=(1, 1),
                                mask=c["mask"])
        numpy_fwd = time.perf_counter() - start
        row = {"input": input_shape, "weight": weight_shape,
               "numpy": {"forward": numpy_fwd, "forward_backward": numpy_fwd_bwd}}
        for impl in impls:
            out, grads = impl.forward_backward(c)
            err = (rel_err(impl.forward(c), ref_out), _grads_error(grads, ref_grads))
            if err[0] > (impl.forward_tolerance or TOLERANCE) or err[1] > TOLERANCE:
                raise SystemExit(f"{impl.name} disagrees with the reference: {err}")
            row[impl.name] = {"error": max(err)}
        for phase in ("forward", "forward_backward"):
            functions = [lambda impl=impl: getattr(impl, phase)(c) for impl in impls]
            for impl, median in zip(impls, median_times(functions, args.repeat)):
                row[impl.name][phase] = median
        results.append(row)

    print(f"\nfloat32 DCNv2 (mask, bias), padding 1; median of {args.repeat} runs, ms")
    width = max(len(h.name) for h in hosts) + 1
    header = f"{'input':>18} {'weight':>16} {'pass':>8} " + "".join(
        f"{h.name:>{width}}" for h in hosts) + f" {'torchvision':>12} {'numpy':>9} " + "".join(
        f"{'tv/' + h.short:>{width}}" for h in hosts)
    print(header)
    for row in results:
        for phase in ("forward", "forward_backward"):
            times = [row[h.name][phase] * 1e3 for h in hosts]
            tv = row.get("torchvision", {}).get(phase)
            tv_text = f"{tv * 1e3:12.1f}" if tv else f"{'-':>12}"
            ratios = "".join(f"{tv * 1e3 / t:{width}.2f}" if tv else f"{'-':>{width}}"
                             for t in times)
            print(f"{str(row['input']):>18} {str(row['weight']):>16} "
                  f"{'fwd' if phase == 'forward' else 'fwd+bwd':>8} "
                  + "".join(f"{t:{width}.1f}" for t in times)
                  + f" {tv_text} {row['numpy'][phase] * 1e3:9.1f} {ratios}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
