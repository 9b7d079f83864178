"""Issue 10, sections 3 and 4: every bad input gets a clear error from every
entry point, and the GPU findings that the host build can show."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import types

import numpy
import pytest

import cupydcn
from cupydcn import _arrays, _deform_conv, _gpu, _kernels, _validation

KERNELS = pathlib.Path(_kernels.kernel_dir())


# ---- the grid-stride loop cannot overflow its index type --------------------

# A kernel over a 16-bit index (short): with n near 32767 the old loop's
# i += blockDim*gridDim wrapped negative and ran on out of bounds; the loop in
# common.cuh must visit each of [0, n) exactly once for every grid.
_LOOP_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#define __global__
#define __device__
#define __forceinline__ inline
struct dim3_ { unsigned int x, y, z; };
static dim3_ threadIdx, blockIdx, blockDim, gridDim;
// DCN_KERNEL_LOOP, as kernels/common.cuh defines it:
@MACRO@

static int visits[32768];
static long long steps = 0, bad = 0;

template <typename I>
void count(I n) {
  DCN_KERNEL_LOOP(i, I, n) {
    if (i < 0 || i >= n || ++steps > 40000) { ++bad; return; }
    ++visits[i];
  }
}

int main(int argc, char** argv) {
  const short n = (short)atoi(argv[1]);
  gridDim = {(unsigned)atoi(argv[2]), 1, 1};
  blockDim = {(unsigned)atoi(argv[3]), 1, 1};
  for (unsigned b = 0; b < gridDim.x; ++b)
    for (unsigned t = 0; t < blockDim.x; ++t) {
      blockIdx = {b, 0, 0};
      threadIdx = {t, 0, 0};
      count<short>(n);
    }
  long long wrong = 0;
  for (int i = 0; i < 32768; ++i) wrong += visits[i] != (i < n ? 1 : 0);
  printf("%lld %lld\n", bad, wrong);
  return 0;
}
"""


@pytest.fixture(scope="module")
def loop_program(tmp_path_factory):
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler!r}) to build the loop test")
    folder = tmp_path_factory.mktemp("loop")
    source = folder / "loop.cpp"
    common = (KERNELS / "common.cuh").read_text()
    macro = re.search(r"#define DCN_KERNEL_LOOP\(.*?[^\\]\n", common, re.S)
    assert macro, "DCN_KERNEL_LOOP not found in kernels/common.cuh"
    source.write_text(_LOOP_PROGRAM.replace("@MACRO@", macro.group(0)))
    binary = folder / "loop"
    subprocess.run([compiler, "-std=c++17", "-O1", "-fwrapv", f"-I{KERNELS}", str(source),
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    return binary


@pytest.mark.parametrize("n, grid, block", [
    (32767, 3, 5),        # n at the type's maximum: the old loop wrapped past it
    (32760, 8, 1000),     # a stride of 8000 from near the top
    (32000, 2, 1000),     # the last thread's step crosses 32767
    (7, 3, 5),            # more threads than work
    (0, 3, 5),
])
def test_grid_stride_loop_cannot_overflow(loop_program, n, grid, block):
    result = subprocess.run([str(loop_program), str(n), str(grid), str(block)], check=True,
                            capture_output=True, text=True, timeout=60)
    bad, wrong = map(int, result.stdout.split())
    assert (bad, wrong) == (0, 0), f"out-of-range or repeated indices: {result.stdout}"


def test_old_grid_stride_loop_would_have_wrapped(tmp_path, loop_program):
    """The same program with the old macro shows the wrap, so the test above
    can fail."""
    compiler = os.environ.get("CXX") or "c++"
    old_macro = ("#define DCN_KERNEL_LOOP(i, I, n) \\\n"
                 "  for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (n); \\\n"
                 "       i += (I)blockDim.x * (I)gridDim.x)\n")
    source = tmp_path / "loop.cpp"
    source.write_text(_LOOP_PROGRAM.replace("@MACRO@", old_macro))
    binary = tmp_path / "loop"
    subprocess.run([compiler, "-std=c++17", "-O1", "-fwrapv", f"-I{tmp_path}", str(source),
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary), "32767", "3", "5"], check=True, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split()[0] != "0"


# ---- the RoI gathers weigh each sample against the key kernel's cell ---------


def _perturbed_gather(file, gather, expression):
    """The source of ``file`` with ``expression`` (a sample coordinate) moved
    one ulp toward -inf inside the ``gather`` kernel only: the gather then
    disagrees with the key kernel by one ulp, as FMA contraction can make it."""
    text = _kernels.source(file)
    head, body = text.split(f"__global__ void {gather}(", 1)
    assert expression in body, expression
    body = body.replace(expression, f"std::nextafter({expression}, (A)-1e30)")
    return f"{head}__global__ void {gather}({body}"


def _roi_input_grad(backend):
    # One sample per bin, exactly at y = -1, the edge of the counted range:
    # start_y = -1.5 - 0.5 = -2, bin_h = 2, sample at -2 + 0.5*2 = -1; it
    # reads row 0 with full weight (y < 0 is clamped to 0). One ulp lower it
    # would be outside and count nothing.
    from cupydcn import _roi_pool

    x = numpy.random.default_rng(0).standard_normal((1, 2, 4, 5))
    rois = numpy.array([[0, 1.5, -1.5, 3.5, 0.5]])
    grad = numpy.ones((1, 2, 1, 1))
    geo = _validation.check_deform_roi_pool(x, rois, None, 1, 1.0, 1, 0.1)
    return _roi_pool.roi_pool_backward(backend, geo, grad, x, rois, None, None,
                                       frozenset({"input"}), deterministic=True).input


def test_roi_gather_uses_the_key_kernels_cell():
    plain = _roi_input_grad(_kernels.HostBackend(grid=3, block=5))
    assert plain[0, :, 0, 2].tolist() == [1.0, 1.0]  # the sample counted, full weight
    moved = _roi_input_grad(_kernels.HostBackend(grid=3, block=5, sources={
        "deform_roi_pool": _perturbed_gather("deform_roi_pool",
                                             "deform_roi_pool_backward_input_gather",
                                             "dcn_roi_sample_y(bin, iy)")}))
    numpy.testing.assert_array_equal(moved, plain)


def _psroi_input_grad(backend):
    # round(y1)*scale - 0.5 = -0.5: the first sample row lies exactly on the
    # lower edge of the counted range [-0.5, H - 0.5] and reads row 0.
    from cupydcn import _roi_pool

    x = numpy.random.default_rng(1).standard_normal((1, 1, 4, 5))
    rois = numpy.array([[0, 1.0, 0.0, 3.0, 2.0]])
    grad = numpy.ones((1, 1, 1, 1))
    geo = _validation.check_deform_psroi_pool(x, rois, None, 1.0, 1, 1, 1, 0, 2, 0.0)
    _, count = _roi_pool.psroi_pool_forward(backend, geo, x, rois, None)
    return _roi_pool.psroi_pool_backward(backend, geo, grad, x, rois, None, count,
                                         frozenset({"input"}), deterministic=True).input


def test_psroi_gather_uses_the_key_kernels_cell():
    plain = _psroi_input_grad(_kernels.HostBackend(grid=3, block=5))
    assert plain[0, 0, 0].sum() > 0  # samples on the edge row are counted
    moved = _psroi_input_grad(_kernels.HostBackend(grid=3, block=5, sources={
        "deform_psroi_pool": _perturbed_gather("deform_psroi_pool",
                                               "deform_psroi_pool_backward_input_gather",
                                               "bin.hstart + (A)ih * bin.sub_h")}))
    # the interior samples move by one ulp too (weights change by ~1e-16); the
    # edge samples must still count (dropped, each would take 0.125 away)
    numpy.testing.assert_allclose(moved, plain, rtol=0, atol=1e-12)


# ---- every bad input gets a clear error --------------------------------------


def _conv_args(dtype=numpy.float32):
    rng = numpy.random.default_rng(2)
    return dict(input=rng.standard_normal((1, 4, 6, 6)).astype(dtype),
                offset=rng.uniform(-1, 1, (1, 18, 6, 6)).astype(dtype),
                weight=rng.standard_normal((4, 4, 3, 3)).astype(dtype))


def _roi_args(dtype=numpy.float32):
    rng = numpy.random.default_rng(3)
    return dict(input=rng.standard_normal((1, 4, 6, 6)).astype(dtype),
                rois=numpy.array([[0, 0.5, 0.5, 4.0, 5.0]], dtype))


_CALLS = {
    "deform_conv2d": lambda a: cupydcn.deform_conv2d(a["input"], a["offset"], a["weight"],
                                                     padding=1),
    "deform_conv2d_backward": lambda a: cupydcn.deform_conv2d_backward(
        a["grad_output"], a["input"], a["offset"], a["weight"], padding=1),
    "deform_roi_pool": lambda a: cupydcn.deform_roi_pool(a["input"], a["rois"], output_size=2),
    "deform_roi_pool_backward": lambda a: cupydcn.deform_roi_pool_backward(
        a["grad_output"], a["input"], a["rois"], output_size=2),
    "deform_psroi_pool": lambda a: cupydcn.deform_psroi_pool(a["input"], a["rois"],
                                                             pooled_size=2),
    "deform_psroi_pool_backward": lambda a: cupydcn.deform_psroi_pool_backward(
        a["grad_output"], a["input"], a["rois"], pooled_size=2),
}


def _arguments(op):
    if op.startswith("deform_conv2d"):
        args = _conv_args()
        if op.endswith("backward"):
            args["grad_output"] = numpy.ones((1, 4, 6, 6), numpy.float32)
        return args
    args = _roi_args()
    if op.endswith("backward"):
        args["grad_output"] = numpy.ones((1, 4, 2, 2), numpy.float32)
    return args


@pytest.mark.parametrize("op, name", [(op, name) for op in _CALLS for name in _arguments(op)])
@pytest.mark.parametrize("bad, got", [(None, "None"), ([[1.0, 2.0]], "list")])
def test_a_missing_or_foreign_array_is_named(op, name, bad, got):
    args = _arguments(op)
    _CALLS[op](args)  # the good call works
    args[name] = bad
    message = f"{name} must be a NumPy, CuPy or DLPack-capable array, got {got}"
    with pytest.raises(cupydcn.ArgumentTypeError, match=re.escape(message)):
        _CALLS[op](args)
    with pytest.raises(TypeError):  # Python's habit
        _CALLS[op](args)
    with pytest.raises(RuntimeError):  # torchvision's
        _CALLS[op](args)


def test_error_classes():
    assert issubclass(cupydcn.ArgumentError, ValueError)
    assert issubclass(cupydcn.ArgumentError, RuntimeError)
    assert issubclass(cupydcn.ArgumentTypeError, TypeError)
    assert issubclass(cupydcn.ArgumentTypeError, RuntimeError)
    assert {"ArgumentError", "ArgumentTypeError"} <= set(cupydcn.__all__)


def test_every_raise_in_the_package_is_an_argument_error_or_internal():
    """No plain ValueError/TypeError for a bad argument left in the entry
    points: every ``raise ValueError``/``TypeError`` is gone from the modules
    this issue covers."""
    package = pathlib.Path(cupydcn.__file__).parent
    internal = {"_kernels.py", "_dtypes.py"}  # kernel ABI misuse; re-raised by _validation
    files = [f for f in package.rglob("*.py") if f.name not in internal]
    assert len(files) > 10
    for path in files:
        assert not re.search(r"raise (ValueError|TypeError)\(", path.read_text()), path


def _wrong_sizes_args():
    # torchvision's TestDeformConv.get_fn_args: batch 10, 6 -> 2 channels,
    # weight groups 2, offset groups 3, kernel (3, 2), stride (2, 1),
    # padding (1, 0), dilation (2, 1), a 5 x 4 input
    rng = numpy.random.default_rng(4)
    x = rng.standard_normal((10, 6, 5, 4)).astype(numpy.float32)
    weight = rng.standard_normal((2, 3, 3, 2)).astype(numpy.float32)
    offset = rng.standard_normal((10, 2 * 3 * 3 * 2, 2, 3)).astype(numpy.float32)
    mask = rng.uniform(0, 1, (10, 3 * 3 * 2, 2, 3)).astype(numpy.float32)
    return x, weight, offset, mask, dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1))


def test_wrong_sizes_like_torchvision_core():
    """torchvision's test_wrong_sizes, on the core: a ValueError (and a
    RuntimeError, what torchvision's own test expects)."""
    x, weight, offset, mask, params = _wrong_sizes_args()
    cupydcn.deform_conv2d(x, offset, weight, mask=mask, **params)
    for error in (ValueError, RuntimeError):
        with pytest.raises(error, match=r"offset\.shape\[1\] must be"):
            cupydcn.deform_conv2d(x, offset[:, :2], weight, **params)
        with pytest.raises(error, match=r"mask\.shape must be"):
            cupydcn.deform_conv2d(x, offset, weight, mask=mask[:, :2], **params)


# ---- wrt ---------------------------------------------------------------------


def test_wrt_naming_an_absent_array_is_an_error():
    a = _conv_args()
    grad = numpy.ones((1, 4, 6, 6), numpy.float32)
    with pytest.raises(cupydcn.ArgumentError, match=r"wrt names 'mask' but mask is None"):
        cupydcn.deform_conv2d_backward(grad, a["input"], a["offset"], a["weight"], padding=1,
                                       wrt=("mask",))
    with pytest.raises(ValueError, match=r"wrt names 'bias', 'mask' but bias and mask are None"):
        cupydcn.deform_conv2d_backward(grad, a["input"], a["offset"], a["weight"], padding=1,
                                       wrt=["input", "bias", "mask"])
    # the default (every gradient) means every one that applies
    grads = cupydcn.deform_conv2d_backward(grad, a["input"], a["offset"], a["weight"], padding=1)
    assert grads.bias is None and grads.mask is None and grads.input is not None
    r = _roi_args()
    rgrad = numpy.ones((1, 4, 2, 2), numpy.float32)
    with pytest.raises(cupydcn.ArgumentError, match=r"wrt names 'offset' but offset is None"):
        cupydcn.deform_roi_pool_backward(rgrad, r["input"], r["rois"], output_size=2,
                                         wrt={"input", "offset"})
    with pytest.raises(cupydcn.ArgumentError, match=r"wrt names 'trans' but trans is None"):
        cupydcn.deform_psroi_pool_backward(rgrad, r["input"], r["rois"], pooled_size=2,
                                           wrt=("trans",))


@pytest.mark.parametrize("wrt, error, message", [
    ("input", cupydcn.ArgumentError,
     r"wrt must name gradients among \('input', 'offset', 'weight', 'bias', 'mask'\) as a "
     r"tuple, list or set of names, got the string 'input'"),
    (("input", "offsets"), cupydcn.ArgumentError,
     r"wrt must name gradients among \('input', 'offset', 'weight', 'bias', 'mask'\), "
     r"got \['offsets'\]"),
    (None, cupydcn.ArgumentTypeError, r"as a tuple, list or set of names, got None"),
    ((1,), cupydcn.ArgumentTypeError, r"got \(1,\)"),
])
def test_wrt_must_be_a_collection_of_known_names(wrt, error, message):
    a = _conv_args()
    grad = numpy.ones((1, 4, 6, 6), numpy.float32)
    with pytest.raises(error, match=message):
        cupydcn.deform_conv2d_backward(grad, a["input"], a["offset"], a["weight"], padding=1,
                                       wrt=wrt)
    with pytest.raises(RuntimeError):
        cupydcn.deform_conv2d_backward(grad, a["input"], a["offset"], a["weight"], padding=1,
                                       wrt=wrt)


# ---- no GPU, the command line ---------------------------------------------------


class _FakeRuntime:
    def __init__(self, count=None, error=None):
        self.count, self.error = count, error

    def getDeviceCount(self):
        if self.error is not None:
            raise self.error
        return self.count


def _fake_cupy(runtime):
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


def test_no_gpu_reason_says_no_gpu_first(monkeypatch):
    driver = ("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA "
              "runtime version")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(_FakeRuntime(error=RuntimeError(driver))))
    assert _gpu.no_gpu_reason() == f"no CUDA GPU found (CuPy: {driver})"
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(_FakeRuntime(count=0)))
    assert _gpu.no_gpu_reason() == "no CUDA GPU found (CuPy: 0 CUDA devices)"
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(_FakeRuntime(count=1)))
    assert _gpu.no_gpu_reason() is None
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    assert _gpu.no_gpu_reason().startswith("no CUDA GPU found (CuPy is not installed")


def test_bench_and_check_use_the_one_message(monkeypatch):
    from cupydcn import _bench, _check

    driver = "cudaErrorInsufficientDriver: CUDA driver version is insufficient"
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(_FakeRuntime(error=RuntimeError(driver))))
    platform, why = _bench.detect_gpu()
    assert platform is None and why.startswith(f"no CUDA GPU found (CuPy: {driver})")
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        __version__="0", cuda=types.SimpleNamespace(runtime=_FakeRuntime(error=RuntimeError(
            driver)))))
    lines, _, _ = _check.environment()
    assert f"no CUDA GPU found (CuPy: {driver})" in lines


def test_command_line(capsys):
    from cupydcn.__main__ import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "check" in err and "bench" in err and "a command is needed" in err
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"cupydcn {cupydcn.__version__}"
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    assert "float64 NumPy" in out and "first run compiles" in out


def test_check_says_it_is_compiling_when_the_first_op_is_slow(monkeypatch, capsys):
    from cupydcn import _check

    said = threading.Event()
    notice = _check._compile_notice
    monkeypatch.setattr(_check, "_compile_notice", lambda: (notice(), said.set()))

    def slow_case(backend, dtype, implementation):
        assert said.wait(60), "no compile notice while the first case ran"
        return [("op", 0.0)]

    monkeypatch.setattr(_check, "environment", lambda: (["machine"], object(), "CPU"))
    monkeypatch.setattr(_check, "CASES", [("deform_conv2d", slow_case)])
    assert _check.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("compiling kernels for this machine, first run only") == 1


# ---- the conv deterministic path keeps its int64 sort keys in range ------------


def _geometry(B, C, H, W, offset_groups, Ho=None, Wo=None):
    from cupydcn import _dtypes

    return _validation.ConvGeometry(B, C, H, W, C, 3, 3, 1, offset_groups, Ho or H, Wo or W,
                                    (1, 1), (1, 1), (1, 1), _dtypes.lookup(numpy.float32))


def _covered(plan, geo):
    return sorted((b, oy) for t in plan for b in range(t.b0, t.b0 + t.nb)
                  for oy in range(t.oy0, t.oy0 + t.nrows))


@pytest.mark.parametrize("B, H, W, groups", [(512, 64, 64, 8), (4, 40000, 40000, 2),
                                             (3, 7, 9, 1)])
def test_key_safe_tiles_fit_int64(B, H, W, groups):
    geo = _geometry(B, 1, H, W, groups)
    plan = [_deform_conv._Tile(0, B, 0, H)]  # everything in one tile
    safe = _deform_conv.key_safe(geo, plan)
    assert all(_deform_conv._key_bound(geo, t.nb, t.nrows) <= 2**63 - 1 for t in safe)
    assert _covered(safe, geo) == _covered(plan, geo)  # every (image, row) exactly once
    if _deform_conv._key_bound(geo, B, H) <= 2**63 - 1:
        assert safe == plan


def test_key_safe_refuses_a_row_too_large():
    geo = _geometry(1, 1, 2**31, 2**31, 64, Ho=1, Wo=2**31)
    with pytest.raises(cupydcn.ArgumentError, match=r"overflow int64; use deterministic=False"):
        _deform_conv.key_safe(geo, [_deform_conv._Tile(0, 1, 0, 1)])


def test_deterministic_backward_in_key_safe_tiles(monkeypatch, host):
    """With the key limit lowered so that every tile must split, the host
    kernels' deterministic input gradient still equals the scatter's."""
    rng = numpy.random.default_rng(5)
    x = rng.standard_normal((3, 4, 6, 5))
    offset = rng.uniform(-2, 2, (3, 2 * 2 * 9, 6, 5))
    weight = rng.standard_normal((4, 4, 3, 3))
    mask = rng.uniform(0, 1, (3, 2 * 9, 6, 5))
    grad = rng.standard_normal((3, 4, 6, 5))
    geo = _validation.check_deform_conv2d(x, offset, weight, None, 1, 1, 1, mask, grad)

    def run(deterministic):
        return _deform_conv.backward(host, geo, grad, x, offset, weight, mask,
                                     frozenset({"input"}), deterministic).input

    scatter = run(False)
    limit = _deform_conv._key_bound(geo, 1, 2)  # two rows of one image per tile
    monkeypatch.setattr(_deform_conv, "_KEY_LIMIT", limit)
    assert len(_deform_conv.key_safe(geo, _deform_conv.tiles(geo))) == 3 * 3
    numpy.testing.assert_allclose(run(True), scatter, rtol=1e-12, atol=1e-12)


# ---- result buffers from the caller's allocator --------------------------------


def test_output_allocator_gives_the_callers_buffers():
    owners = []

    def allocate(shape, dtype):
        owner = {"buffer": numpy.empty(shape, dtype)}
        owners.append(owner)
        return owner, owner["buffer"]

    a = _conv_args(numpy.float64)
    grad = numpy.ones((1, 4, 6, 6))
    with _arrays.output_allocator(allocate) as owner_of:
        out = cupydcn.deform_conv2d(a["input"], a["offset"], a["weight"], padding=1)
        grads = cupydcn.deform_conv2d_backward(grad, a["input"], a["offset"], a["weight"],
                                               padding=1)
    assert owner_of(out) is owners[0] and out is owners[0]["buffer"]
    for g in (grads.input, grads.offset, grads.weight):
        assert owner_of(g) is not None and owner_of(g)["buffer"] is g
    assert owner_of(a["input"]) is None
    numpy.testing.assert_array_equal(
        out, cupydcn.deform_conv2d(a["input"], a["offset"], a["weight"], padding=1))
    # outside the block, results are the core's own again
    assert _arrays._allocator.get() is None
