"""Robustness on the CPU tier: bad values, huge sizes, determinism, concurrency,
recovery, and properties over random shapes (hypothesis).

The kernels run here through the host build; the memory-safety check builds
them with AddressSanitizer (the CPU stand-in for compute-sanitizer's memcheck,
which the GPU tier runs) and feeds them NaN, +-inf and +-1e30.
"""

import os
import pathlib
import subprocess
import sys
import shutil
import signal
import threading

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cupydcn
from cupydcn import _arrays, _deform_conv, _kernels, _validation, reference
from helpers import assert_close
from test_deform_conv import CASES, make_case, reference_results, run_kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- memory safety

def _libasan():
    compiler = _kernels.HostBackend().compiler
    path = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


BAD_VALUES = str(ROOT / "tests" / "bad_values.py")


@pytest.fixture(scope="module")
def asan_env(tmp_path_factory):
    library = _libasan()
    if library is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime (libasan.so)")
    return {**os.environ, "LD_PRELOAD": library, "ASAN_OPTIONS": "detect_leaks=0",
            "PYTHONPATH": str(ROOT), "CUPYDCN_CACHE_DIR": str(tmp_path_factory.mktemp("asan"))}


def test_bad_values_never_touch_memory_out_of_bounds(asan_env):
    """Every op, forward and backward, on NaN/inf/huge coordinates and bad batch
    indices, with the kernels built with AddressSanitizer: no error."""
    result = subprocess.run([sys.executable, BAD_VALUES, "host"], env=asan_env,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr[-3000:]
    assert "AddressSanitizer" not in result.stderr


def test_address_sanitizer_catches_an_out_of_bounds_write(asan_env):
    result = subprocess.run([sys.executable, BAD_VALUES, "host", "mutated"], env=asan_env,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert "heap-buffer-overflow" in result.stderr


# compute-sanitizer runs: each subprocess has its own limit (under the GPU tier's
# per-test limit), so a hang is a failure that names the command, not a stuck tier.
SANITIZER_PROBE_TIMEOUT = 30
SANITIZER_TIMEOUT = 100
SANITIZER_PROBE = ("import cupy; cupy.cuda.set_allocator(None); "
                   "print('probe', int((cupy.arange(10) + 1).sum()))")


def _find_compute_sanitizer():
    """compute-sanitizer on the PATH, in a CUDA toolkit, or from the
    nvidia-cuda-sanitizer-api wheel (nvidia/cu13/bin, nvidia/cuda_sanitizer_api/bin)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    folders = [pathlib.Path(home) / "bin" for home in homes if home]
    for entry in sys.path:
        folders += sorted(pathlib.Path(entry or ".").glob("nvidia/*/bin"))
    for folder in folders:
        candidate = folder / "compute-sanitizer"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _memcheck(sanitizer, args, timeout):
    """(exit status, stdout, stdout + stderr) of ``args`` run by Python under memcheck.
    On timeout the whole process group (the sanitizer and its target) is killed."""
    command = [sanitizer, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20",
               sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(command)} did not finish in {timeout} s:\n"
                        f"{(stdout + stderr)[-3000:]}")
    return process.returncode, stdout, stdout + stderr


@pytest.fixture(scope="module")
def compute_sanitizer():
    """The compute-sanitizer executable, once it has shown that it can run a CuPy
    kernel on this device (drivers, containers and virtual GPUs may refuse it)."""
    sanitizer = _find_compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on the PATH, in $CUDA_HOME/bin, "
                    "/usr/local/cuda/bin or an nvidia-cuda-sanitizer-api wheel")
    status, stdout, report = _memcheck(sanitizer, ["-c", SANITIZER_PROBE], SANITIZER_PROBE_TIMEOUT)
    if status != 0 or "probe 55" not in stdout:
        said = [line.strip() for line in report.splitlines() if line.strip()][-4:]
        pytest.skip(f"{sanitizer} cannot run a CuPy kernel on this device (exit {status}): "
                    + " | ".join(said))
    return sanitizer


@pytest.mark.gpu
def test_gpu_bad_values_pass_compute_sanitizer_memcheck(compute_sanitizer, tmp_path):
    """The same workload on the GPU under compute-sanitizer, CuPy's pool off: zero errors."""
    status, stdout, report = _memcheck(compute_sanitizer, [BAD_VALUES, "cupy"], SANITIZER_TIMEOUT)
    (tmp_path / "memcheck.log").write_text(report)
    assert status == 0 and "clean" in stdout, report[-3000:]
    assert "ERROR SUMMARY: 0 errors" in report, report[-3000:]


@pytest.mark.gpu
def test_compute_sanitizer_catches_an_out_of_bounds_write(compute_sanitizer, tmp_path):
    """The planted write one element past the columns buffer, under the same run:
    memcheck must see it (what shows the clean run above proves something)."""
    status, _, report = _memcheck(compute_sanitizer, [BAD_VALUES, "cupy", "mutated"],
                                  SANITIZER_TIMEOUT)
    (tmp_path / "memcheck-mutated.log").write_text(report)
    assert status != 0, report[-3000:]
    assert "Invalid __global__ write" in report and "deform_im2col" in report, report[-3000:]
    assert "ERROR SUMMARY: 0 errors" not in report, report[-3000:]


def test_non_finite_positions_count_as_outside(host):
    """A sample at a NaN/inf/huge position contributes 0, like a far-away one."""
    typed, _, params = make_case(CASES[0], numpy.float64)
    far = dict(typed)
    far["offset"] = typed["offset"].copy()
    bad = dict(typed)
    bad["offset"] = typed["offset"].copy()
    for value, step in ((numpy.nan, 3), (numpy.inf, 5), (-1e30, 7)):
        bad["offset"].flat[::step] = value
        far["offset"].flat[::step] = 1e4  # finite, far outside
    out_bad, grads_bad = run_kernels(host, bad, params)
    out_far, grads_far = run_kernels(host, far, params)
    numpy.testing.assert_array_equal(out_bad, out_far)
    numpy.testing.assert_array_equal(grads_bad.input, grads_far.input)
    numpy.testing.assert_array_equal(grads_bad.weight, grads_far.weight)
    assert numpy.all(numpy.isfinite(grads_bad.offset))
    ref = reference.deform_conv2d(bad["input"], bad["offset"], bad["weight"], bad["bias"],
                                  mask=bad["mask"], **params)
    assert_close(out_bad, ref, numpy.float64)


# ---------------------------------------------------------------- large sizes

def test_large_input_plan_is_bounded_by_the_workspace():
    """B=1, C=256, 3x3 at 1024x1024: columns of 2.4e9 elements, in row chunks."""
    shapes = {"input": (1, 256, 1024, 1024), "offset": (1, 18, 1024, 1024),
              "weight": (256, 256, 3, 3)}
    fake = {k: numpy.lib.stride_tricks.as_strided(numpy.zeros(1, numpy.float32), v,
                                                  (0,) * len(v)) for k, v in shapes.items()}
    geo = _validation.check_deform_conv2d(fake["input"], fake["offset"], fake["weight"], padding=1)
    assert geo.C * 9 * geo.Ho * geo.Wo > 2**31
    for limit in (64 * 2**20, 256 * 2**20, 2**30):
        previous = cupydcn.set_workspace_limit(limit)
        try:
            plan = _deform_conv.tiles(geo)
        finally:
            cupydcn.set_workspace_limit(previous)
        rows = [t.out_rows for t in plan]
        assert max(rows) * geo.C * 9 * geo.Wo * 4 <= limit
        assert sum(rows) == geo.Ho and all(t.nb == 1 for t in plan)
        assert _deform_conv._index_bits(geo, plan) == 32  # every buffer fits int32
    # an input that itself passes 2**31 elements needs 64-bit indices
    shapes["input"] = (9, 256, 1024, 1024)
    shapes["offset"] = (9, 18, 1024, 1024)
    fake = {k: numpy.lib.stride_tricks.as_strided(numpy.zeros(1, numpy.float32), v,
                                                  (0,) * len(v)) for k, v in shapes.items()}
    geo = _validation.check_deform_conv2d(fake["input"], fake["offset"], fake["weight"], padding=1)
    assert _deform_conv._index_bits(geo, _deform_conv.tiles(geo)) == 64


# ---------------------------------------------------------------- determinism

def test_deterministic_backward_is_independent_of_the_grid():
    """The gather backward sums in a fixed order: any grid gives the same bits."""
    typed, _, params = make_case(CASES[4], numpy.float32)
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    results = []
    for grid, block in ((1, 1), (3, 5), (16, 32)):
        backend = _kernels.HostBackend(grid=grid, block=block)
        grads = _deform_conv.backward(backend, geo, typed["grad_output"], typed["input"],
                                      typed["offset"], typed["weight"], typed["mask"],
                                      frozenset(_deform_conv.GRADIENTS) - {"bias"},
                                      deterministic=True)
        results.append(grads)
    for other in results[1:]:
        for name in ("input", "offset", "weight", "mask"):
            numpy.testing.assert_array_equal(getattr(other, name), getattr(results[0], name))


# ---------------------------------------------------------------- concurrency

def run_in_threads(work, count):
    """Run ``work(i)`` for i in range(count), each in its own thread, at once;
    return what they raised."""
    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as error:  # reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_share_the_host_build_and_compute_correctly(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYDCN_CACHE_DIR", str(tmp_path))  # every thread compiles at once
    cases = [make_case(CASES[i % 2], numpy.float64, seed=i) for i in range(6)]
    expected = [reference_results(exact, params)[0] for _, exact, params in cases]
    backend = _kernels.HostBackend()
    results = [None] * len(cases)

    def work(i):
        typed, _, params = cases[i]
        own = backend if i % 2 else _kernels.HostBackend()
        results[i] = run_kernels(own, typed, params)[0]

    errors = run_in_threads(work, len(cases))
    assert not errors, errors
    for got, ref in zip(results, expected):
        assert_close(got, ref, numpy.float64)
    assert len(list(tmp_path.glob("host_deform_conv_*.so"))) == 1


def test_cupy_backend_is_one_object_under_threads():
    pytest.importorskip("cupy", reason="CuPy is not installed")
    seen = []
    assert not run_in_threads(lambda i: seen.append(_kernels.cupy_backend()), 8)
    assert len(seen) == 8 and len({id(b) for b in seen}) == 1


class _FakeCuda:
    """A DLPack array that claims to live on a CUDA device."""

    def __init__(self, device):
        self.device = device
        self.shape, self.dtype = (1,), numpy.float32

    def __dlpack__(self, **kwargs):
        raise AssertionError("not converted in these tests")

    def __dlpack_device__(self):
        return 2, self.device


def test_device_selection_follows_the_arrays():
    assert _arrays._where(_FakeCuda(1), "input") == ("cuda", 1)
    assert _arrays._where(numpy.zeros(1), "input") == ("cpu", None)
    with pytest.raises(ValueError, match=r"offset is on cuda:1 but input is on cuda:0"):
        _arrays.Call(input=_FakeCuda(0), offset=_FakeCuda(1))
    with pytest.raises(ValueError, match=r"weight is on the CPU but input is on cuda:3"):
        _arrays.Call(input=_FakeCuda(3), weight=numpy.zeros(1))


# ---------------------------------------------------------------- recovery

def test_a_failed_kernel_build_leaves_the_next_call_working(host):
    broken = _kernels.HostBackend(sources={"deform_conv": "this is not C++"})
    typed, exact, params = make_case(CASES[0], numpy.float64)
    with pytest.raises(RuntimeError, match="host build of deform_conv.cu failed"):
        run_kernels(broken, typed, params)
    out, _ = run_kernels(host, typed, params)
    assert_close(out, reference_results(exact, params)[0], numpy.float64)


# ---------------------------------------------------------------- properties

DOCUMENTED_ERRORS = (ValueError, TypeError)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_validation_raises_only_documented_errors(data):
    dim = st.integers(0, 5)
    shape = lambda rank: st.lists(dim, min_size=rank, max_size=rank).map(tuple)  # noqa: E731
    dtypes = st.sampled_from([numpy.float32, numpy.float64, numpy.float16, numpy.int32])
    rank = st.sampled_from([3, 4, 4, 4, 5])
    arrays = {name: numpy.ones(data.draw(shape(data.draw(rank))), data.draw(dtypes))
              for name in ("input", "offset", "weight")}
    mask = data.draw(st.none() | shape(4).map(lambda s: numpy.ones(s, numpy.float32)))
    bias = data.draw(st.none() | shape(1).map(lambda s: numpy.ones(s, numpy.float32)))
    param = st.integers(-1, 3) | st.tuples(st.integers(-1, 3), st.integers(-1, 3))
    kwargs = {k: data.draw(param) for k in ("stride", "padding", "dilation")}
    try:
        out = cupydcn.deform_conv2d(arrays["input"], arrays["offset"], arrays["weight"], bias,
                                    mask=mask, **kwargs)
    except DOCUMENTED_ERRORS as error:
        assert str(error)  # every error says what went wrong
    else:
        geo = _validation.check_deform_conv2d(arrays["input"], arrays["offset"],
                                              arrays["weight"], bias, mask=mask, **kwargs)
        assert out.shape == (geo.B, geo.Cout, geo.Ho, geo.Wo)


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 2))
    dg = draw(st.integers(1, 2))
    C = groups * dg * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    H = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 7))
    W = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 7))
    return (draw(st.integers(1, 3)), C, H, W, groups * draw(st.integers(1, 2)), kh, kw, groups,
            dg, stride, padding, dilation, draw(st.booleans()), draw(st.booleans()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), seed=st.integers(0, 2**16),
       deterministic=st.booleans())
def test_host_kernels_agree_with_reference_on_random_cases(host, case, seed, deterministic):
    typed, exact, params = make_case(case, numpy.float64, seed=seed)
    ref_out, ref_grads = reference_results(exact, params)
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          typed["bias"], mask=typed["mask"], **params)
    out = _deform_conv.forward(host, geo, typed["input"], typed["offset"], typed["weight"],
                               typed["bias"], typed["mask"])
    wrt = _validation.check_wrt(_deform_conv.GRADIENTS, _deform_conv.GRADIENTS,
                                bias=typed["bias"], mask=typed["mask"])
    grads = _deform_conv.backward(host, geo, typed["grad_output"], typed["input"],
                                  typed["offset"], typed["weight"], typed["mask"], wrt,
                                  deterministic)
    assert_close(out, ref_out, numpy.float64, "forward")
    for name in _deform_conv.GRADIENTS:
        if getattr(ref_grads, name) is not None:
            assert_close(getattr(grads, name), getattr(ref_grads, name), numpy.float64, name)


# ---------------------------------------------------------------- GPU: concurrency, recovery

@pytest.mark.gpu
def test_gpu_threads_on_their_own_streams(gpu):
    """Eight threads, each on its own non-blocking stream, at once, starting
    from an empty module cache so that they also compile concurrently."""
    import cupy

    gpu._modules.clear()
    cases = [make_case(CASES[i % 3], numpy.float32, seed=i) for i in range(8)]
    expected = [reference_results(exact, params) for _, exact, params in cases]
    results = [None] * len(cases)

    def work(i):
        typed, _, params = cases[i]
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            dev = {k: None if v is None else cupy.asarray(v) for k, v in typed.items()}
            out = cupydcn.deform_conv2d(dev["input"], dev["offset"], dev["weight"],
                                        dev["bias"], mask=dev["mask"], **params)
            grads = cupydcn.deform_conv2d_backward(
                dev["grad_output"], dev["input"], dev["offset"], dev["weight"], dev["bias"],
                mask=dev["mask"], **params)
            results[i] = (out.get(stream=stream), grads.input.get(stream=stream),
                          grads.offset.get(stream=stream))
        stream.synchronize()

    errors = run_in_threads(work, len(cases))
    assert not errors, errors
    for (out, grad_input, grad_offset), (ref_out, ref_grads) in zip(results, expected):
        assert_close(out, ref_out, numpy.float32, "forward")
        assert_close(grad_input, ref_grads.input, numpy.float32, "grad_input")
        assert_close(grad_offset, ref_grads.offset, numpy.float32, "grad_offset")


@pytest.mark.gpu
def test_gpu_out_of_memory_then_a_valid_call_works(gpu):
    """A call that cannot get its memory fails cleanly; the next one works."""
    import cupy

    def huge(shape):  # a broadcast view: no memory until the op copies it
        return cupy.lib.stride_tricks.as_strided(cupy.zeros(1, cupy.float32), shape,
                                                 (0,) * len(shape))

    weight = cupy.ones((1, 4096, 3, 3), cupy.float32)
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
        cupydcn.deform_conv2d(huge((1, 4096, 4096, 4096)), huge((1, 18, 4096, 4096)), weight,
                              padding=1)
    typed, exact, params = make_case(CASES[0], numpy.float32)
    out = cupydcn.deform_conv2d(*(cupy.asarray(typed[k]) for k in ("input", "offset", "weight")),
                                cupy.asarray(typed["bias"]), mask=cupy.asarray(typed["mask"]),
                                **params)
    assert_close(out, reference_results(exact, params)[0], numpy.float32)


@pytest.mark.gpu
def test_gpu_each_call_stays_on_its_inputs_device(gpu):
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip(f"needs two GPUs, {count} present; the device selection logic is tested "
                    "without them by test_device_selection_follows_the_arrays")
    typed, exact, params = make_case(CASES[0], numpy.float32)
    with cupy.cuda.Device(1):
        dev = {k: None if v is None else cupy.asarray(v) for k, v in typed.items()}
    with cupy.cuda.Device(0):
        out = cupydcn.deform_conv2d(dev["input"], dev["offset"], dev["weight"], dev["bias"],
                                    mask=dev["mask"], **params)
        grads = cupydcn.deform_conv2d_backward(dev["grad_output"], dev["input"], dev["offset"],
                                               dev["weight"], dev["bias"], mask=dev["mask"],
                                               **params)
    assert out.device.id == 1 and grads.input.device.id == 1
    assert_close(out, reference_results(exact, params)[0], numpy.float32)


@pytest.mark.gpu
def test_gpu_columns_past_2_31_match_the_reference_on_a_window(gpu):
    """B=1, C=256, 3x3 at 1024x1024 (columns of 2.4e9 elements), processed in
    row chunks within a 64 MiB workspace, against the reference on windows.

    With |offset| < m, the input rows [r0-1-m, r0+h+1+m) and padding 0 give the
    window's output pixels exactly the same sampling positions, so the
    reference can run on that crop; the forward, grad_offset and grad_mask of
    a pixel depend only on its own samples and grad_output."""
    import cupy

    B, C, H, W, m, h = 1, 256, 1024, 1024, 2, 4
    rng = numpy.random.default_rng(5)
    pool = cupy.get_default_memory_pool()
    dev = {
        "input": cupy.random.default_rng(1).standard_normal((B, C, H, W), dtype=cupy.float32),
        "offset": cupy.asarray(rng.uniform(-1.9, 1.9, (B, 18, H, W)).astype(numpy.float32)),
        "mask": cupy.asarray(rng.uniform(0, 1, (B, 9, H, W)).astype(numpy.float32)),
        "weight": cupy.asarray(rng.standard_normal((8, C, 3, 3)).astype(numpy.float32) / 48),
        "grad_output": cupy.asarray(rng.standard_normal((B, 8, H, W)).astype(numpy.float32)),
    }
    previous = cupydcn.set_workspace_limit(64 * 2**20)
    pool.free_all_blocks()
    before = pool.total_bytes()
    try:
        out = cupydcn.deform_conv2d(dev["input"], dev["offset"], dev["weight"], padding=1,
                                    mask=dev["mask"])
        grads = cupydcn.deform_conv2d_backward(dev["grad_output"], dev["input"], dev["offset"],
                                               dev["weight"], padding=1, mask=dev["mask"],
                                               wrt=("offset", "mask"))
        cupy.cuda.Device().synchronize()
    finally:
        cupydcn.set_workspace_limit(previous)
    grown = pool.total_bytes() - before
    results = out.nbytes + grads.offset.nbytes + grads.mask.nbytes
    # results + two workspace-sized buffers (columns, their gradient) + slack
    assert grown <= results + 4 * 64 * 2**20, (grown, results)
    for r0, c0 in ((0 + 1 + m, 1 + m), (517, 3), (H - h - 1 - m, W - h - 1 - m)):
        rows, cols = slice(r0 - 1 - m, r0 + h + 1 + m), slice(c0 - 1 - m, c0 + h + 1 + m)
        win_r, win_c = slice(r0 - m, r0 + h + m), slice(c0 - m, c0 + h + m)
        crop = {k: dev[k][:, :, rows, cols].get().astype(numpy.float64) for k in ("input",)}
        for k in ("offset", "mask", "grad_output"):
            crop[k] = dev[k][:, :, win_r, win_c].get().astype(numpy.float64)
        weight = dev["weight"].get().astype(numpy.float64)
        ref = reference.deform_conv2d(crop["input"], crop["offset"], weight, mask=crop["mask"])
        ref_grads = reference.deform_conv2d_backward(crop["grad_output"], crop["input"],
                                                     crop["offset"], weight, mask=crop["mask"])
        inner = (slice(None), slice(None), slice(m, m + h), slice(m, m + h))
        window = (slice(None), slice(None), slice(r0, r0 + h), slice(c0, c0 + h))
        assert_close(out[window], ref[inner], numpy.float32, "forward")
        assert_close(grads.offset[window], ref_grads[1][inner], numpy.float32, "grad_offset")
        assert_close(grads.mask[window], ref_grads[4][inner], numpy.float32, "grad_mask")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_roi_validation_raises_only_documented_errors(data):
    dim = st.integers(0, 4)
    shape = lambda rank: st.lists(dim, min_size=rank, max_size=rank).map(tuple)  # noqa: E731
    dtypes = st.sampled_from([numpy.float32, numpy.float64, numpy.int64])
    values = st.sampled_from([0.0, 1.0, -1.0, 2.5, numpy.nan, 1e30])
    arrays = {}
    for name, rank in (("input", [3, 4, 4]), ("rois", [1, 2, 2, 3]), ("offset", [4, 4, 3]),
                       ("trans", [4, 4, 3])):
        full = numpy.full(data.draw(shape(data.draw(st.sampled_from(rank)))), data.draw(values))
        with numpy.errstate(invalid="ignore"):  # NaN into an int array is fine here
            arrays[name] = full.astype(data.draw(dtypes))
    number = st.sampled_from([0, 1, 2, -1, 0.5, numpy.nan, numpy.inf])
    try:
        cupydcn.deform_roi_pool(arrays["input"], arrays["rois"],
                                data.draw(st.none() | st.just(arrays["offset"])),
                                output_size=data.draw(st.integers(-1, 3)),
                                spatial_scale=data.draw(number),
                                sampling_ratio=data.draw(st.integers(-1, 2)),
                                gamma=data.draw(number))
    except DOCUMENTED_ERRORS as error:
        assert str(error)
    try:
        cupydcn.deform_psroi_pool(arrays["input"], arrays["rois"],
                                  data.draw(st.none() | st.just(arrays["trans"])),
                                  spatial_scale=data.draw(number),
                                  group_size=data.draw(st.integers(0, 2)),
                                  pooled_size=data.draw(st.integers(0, 3)),
                                  part_size=data.draw(st.integers(-1, 2)),
                                  sample_per_part=data.draw(st.integers(0, 2)),
                                  trans_std=data.draw(number))
    except DOCUMENTED_ERRORS as error:
        assert str(error)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), R=st.integers(0, 5), ph=st.integers(1, 3),
       pw=st.integers(1, 3), sampling_ratio=st.integers(0, 2),
       scale=st.sampled_from([0.5, 1.0]), modulated=st.booleans(),
       deterministic=st.booleans())
def test_host_roi_kernels_agree_with_reference_on_random_cases(host, seed, R, ph, pw,
                                                               sampling_ratio, scale, modulated,
                                                               deterministic):
    from cupydcn import _roi_pool

    rng = numpy.random.default_rng(seed)
    feat = rng.standard_normal((2, 3, 7, 9))
    corners = numpy.sort(rng.uniform(-4, 12, (R, 2, 2)), axis=1) / scale
    rois = numpy.column_stack([rng.integers(0, 2, R), corners[:, 0, 0], corners[:, 0, 1],
                               corners[:, 1, 0], corners[:, 1, 1]]).reshape(R, 5)
    offset = rng.uniform(-0.4, 0.4, (R, 2, ph, pw))
    mask = rng.uniform(0, 1, (R, 1, ph, pw)) if modulated else None
    grad = rng.standard_normal((R, 3, ph, pw))
    params = dict(output_size=(ph, pw), spatial_scale=scale, sampling_ratio=sampling_ratio,
                  gamma=0.1)
    geo = _validation.check_deform_roi_pool(feat, rois, offset, mask=mask, **params)
    out = _roi_pool.roi_pool_forward(host, geo, feat, rois, offset, mask)
    grads = _roi_pool.roi_pool_backward(host, geo, grad, feat, rois, offset, mask,
                                        deterministic=deterministic)
    assert_close(out, reference.deform_roi_pool(feat, rois, offset, mask=mask, **params),
                 numpy.float64, "forward")
    ref_grads = reference.deform_roi_pool_backward(grad, feat, rois, offset, mask=mask, **params)
    for name, got, ref in zip(_roi_pool.ROI_GRADIENTS, grads, ref_grads):
        if ref is not None:
            assert_close(got, ref, numpy.float64, name)
