"""The host executor (kernels/host_runtime.h) against CUDA's execution model.

The test kernels (tests/kernels/host_primitives.cu) run on the host backend with
its checks on. What they move or compute is compared with NumPy written from
the CUDA programming guide and the PTX ISA (shuffles, votes, barriers,
ldmatrix, mma fragments, cp.async groups); the checks themselves are shown to
fire (races, divergent barriers, masks, late asynchronous copies), and the
block-cooperative GEMM, which uses all of it, matches NumPy and fails under
each mutation of the issue (a barrier removed, a fragment index off by one, a
missing cp.async wait, a barrier under a divergent branch).
"""

import pathlib

import numpy
import pytest

from cupydcn import _dtypes, _kernels
from helpers import assert_close

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes")

PATH = pathlib.Path(__file__).resolve().parent / "kernels" / "host_primitives.cu"
F32 = _dtypes.DTYPES[numpy.dtype(numpy.float32)]


def _expressions():
    plain = ("indices", "last_writer", "reverse_dynamic", "read_unwritten", "barrier_votes", "divergent_barrier",
             "split_barrier", "histogram", "shuffles", "half_warp", "bad_mask", "exited_lane",
             "to_tf32")
    names = [f"{k}<float, int>" for k in plain]
    names += [f"reverse<float, int, {s}>" for s in ("true", "false")]
    names += [f"mma_fragments<float, int, {t}>" for t in (0, 1, 2)]
    names += [f"ldmatrix_rows<float, int, {c}, {t}>" for c in (1, 2, 4) for t in ("false", "true")]
    names += [f"async_copy<float, int, {w}>" for w in (0, 1, 2)]
    return tuple(names) + GEMMS


GEMMS = ("gemm<dcn_half, int>", "gemm<dcn_bfloat16, int>")
PRIMITIVES = _kernels.KernelFile(PATH, _expressions())
GEMM_ONLY = _kernels.KernelFile(PATH, GEMMS)


@pytest.fixture(scope="module")
def host():
    return _kernels.HostBackend(checks=True, workers=2, seed=3)


def run(backend, kernel, args, grid=(1,), block=(32,), template=(), shared=0, dtype=F32,
        file=PRIMITIVES, cooperative=None):
    backend.launch(file, kernel, dtype, 32, 1, args, grid=grid, block=block, shared=shared,
                   template=template, cooperative=cooperative)


# ---------------------------------------------------------------- grids and blocks

@pytest.mark.parametrize("grid, block", [((3,), (5,)), ((2, 3), (4, 2)), ((2, 1, 3), (3, 2, 2)),
                                         ((1, 2, 2), (32, 1, 2))])
@pytest.mark.parametrize("cooperative", [False, True])
def test_every_thread_of_a_3d_launch_sees_its_indices(host, grid, block, cooperative):
    g3, b3 = grid + (1,) * (3 - len(grid)), block + (1,) * (3 - len(block))
    nb, nt = numpy.prod(g3), numpy.prod(b3)
    out = numpy.full((nb * nt, 12), -1, numpy.int32)
    run(host, "indices", [out], grid=grid, block=block, cooperative=cooperative)
    expected = []
    for bz in range(g3[2]):
        for by in range(g3[1]):
            for bx in range(g3[0]):
                for tz in range(b3[2]):
                    for ty in range(b3[1]):
                        for tx in range(b3[0]):
                            expected.append([bx, by, bz, tx, ty, tz, *b3, *g3])
    numpy.testing.assert_array_equal(out, numpy.array(expected))


def test_bad_launch_configurations_are_refused(host):
    with pytest.raises(ValueError, match=r"block must have at most 1024 threads, got \(64, 32, 1\)"):
        run(host, "indices", [numpy.zeros(1, numpy.int32)], block=(64, 32))
    with pytest.raises(ValueError, match=r"grid must be 1 to 3 positive ints"):
        run(host, "indices", [numpy.zeros(1, numpy.int32)], grid=(0,))
    with pytest.raises(KeyError, match=r"indices<float, int, 3> is not built"):
        run(host, "indices", [numpy.zeros(1, numpy.int32)], template=(3,))


def test_the_old_launch_form_is_a_grid_stride_launch_of_256_threads():
    assert _kernels.launch_config(1000) == ((4, 1, 1), (256, 1, 1), 0)
    assert _kernels.launch_config(10**9) == ((_kernels.MAX_GRID, 1, 1), (256, 1, 1), 0)
    assert _kernels.launch_config(1, grid=(2, 3), block=8, shared=64) == ((2, 3, 1), (8, 1, 1), 64)
    with pytest.raises(ValueError, match=r"shared must be a non-negative number of bytes, got -1"):
        _kernels.launch_config(1, shared=-1)


@pytest.mark.parametrize("cooperative", [False, True])
def test_scheduling_varies_with_the_seed_under_checks(cooperative):
    """A kernel whose result depends on the order threads run in gives
    different results from launch to launch with checks on, one result without."""
    def finals(checks):
        results = set()
        for seed in range(12):
            backend = _kernels.HostBackend(checks=checks, workers=1, seed=seed)
            out = numpy.full(1, -1, numpy.int32)
            for _ in range(2):  # the same seed, the same order
                run(backend, "last_writer", [out], grid=(4,), block=(8,), cooperative=cooperative)
                results.add((seed, int(out[0])))
        return results

    varied = finals(True)
    assert len(varied) == 12 and len({final for _, final in varied}) > 1
    assert {final for _, final in finals(False)} == {31}


def test_checks_are_one_setting_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("CUPYDCN_HOST_CHECKS", "1")
    assert _kernels.HostBackend().checks
    monkeypatch.setenv("CUPYDCN_HOST_CHECKS", "0")
    assert not _kernels.HostBackend().checks
    assert _kernels.HostBackend(checks=True).checks
    monkeypatch.setenv("CUPYDCN_HOST_CHECKS", "yes")
    with pytest.raises(ValueError, match=r"\$CUPYDCN_HOST_CHECKS must be 0 or 1, got 'yes'"):
        _kernels.HostBackend()


# ---------------------------------------------------------------- shared memory and barriers

def test_shared_memory_is_one_copy_per_block(host):
    x = numpy.arange(4 * 128, dtype=numpy.float32)
    out = numpy.zeros_like(x)
    run(host, "reverse", [x, out], grid=(4,), block=(128,), template=(True,))
    numpy.testing.assert_array_equal(out, x.reshape(4, 128)[:, ::-1].reshape(-1))


def test_dynamic_shared_memory_has_the_launch_size(host):
    x = numpy.arange(3 * 96, dtype=numpy.float32)
    out = numpy.zeros_like(x)
    run(host, "reverse_dynamic", [x, out], grid=(3,), block=(96,), shared=96 * 4)
    numpy.testing.assert_array_equal(out, x.reshape(3, 96)[:, ::-1].reshape(-1))
    with pytest.raises(RuntimeError, match=r"outside \[0, 8\)"):  # 32 bytes for 96 threads
        run(host, "reverse_dynamic", [x, out], grid=(3,), block=(96,), shared=32)


def test_a_missing_barrier_is_reported_as_a_race(host):
    x = numpy.arange(128, dtype=numpy.float32)
    with pytest.raises(RuntimeError) as error:
        run(host, "reverse", [x, numpy.zeros_like(x)], block=(128,), template=(False,))
    report = str(error.value)
    assert "shared-memory race" in report and "kernel reverse<float, int, false>" in report
    assert "host_primitives.cu:" in report and "shared array 'buffer'" in report
    assert "block (0, 0, 0)" in report and report.count("thread (") == 2


def test_unwritten_shared_memory_reads_as_nan(host):
    out = numpy.zeros(64, numpy.float32)
    run(host, "read_unwritten", [out], block=(64,))
    assert numpy.isnan(out).all()


def test_barrier_counting_forms(host):
    rng = numpy.random.default_rng(0)
    for pattern in (rng.integers(0, 2, 96), numpy.ones(96), numpy.zeros(96)):
        pred = pattern.astype(numpy.int32)
        out = numpy.zeros((96, 3), numpy.int32)
        run(host, "barrier_votes", [pred, out], block=(96,))
        expected = [pred.sum(), int(pred.all()), int(pred.any())]
        numpy.testing.assert_array_equal(out, numpy.tile(expected, (96, 1)))


def test_a_divergent_barrier_is_an_error_not_a_hang(host):
    out = numpy.zeros(32, numpy.float32)
    with pytest.raises(RuntimeError, match=r"divergent __syncthreads.*has exited"):
        run(host, "divergent_barrier", [out], block=(32,))
    with pytest.raises(RuntimeError, match=r"divergent __syncthreads: .* waits at "
                                           r"host_primitives.cu:\d+ while"):
        run(host, "split_barrier", [out], block=(32,))


def test_shared_and_global_atomics_count_exactly_with_parallel_blocks(host):
    values = numpy.random.default_rng(1).integers(0, 16, 20000).astype(numpy.int32)
    bins = numpy.zeros(16, numpy.uint32)
    run(host, "histogram", [values, values.size, bins], grid=(37,), block=(64,))
    numpy.testing.assert_array_equal(bins, numpy.bincount(values, minlength=16))


def test_a_plain_kernel_launched_as_a_loop_refuses_cooperation(host):
    x = numpy.arange(128, dtype=numpy.float32)
    with pytest.raises(RuntimeError, match=r"shared memory at .*host_primitives.cu:\d+ in a "
                                           r"kernel launched without cooperative=True"):
        run(host, "reverse", [x, numpy.zeros_like(x)], block=(128,), template=(True,),
            cooperative=False)


# ---------------------------------------------------------------- warps

@pytest.mark.parametrize("width, delta", [(32, 1), (32, 5), (16, 3), (8, 2), (4, 1)])
def test_shuffles_and_votes_move_what_cuda_says(host, width, delta):
    rng = numpy.random.default_rng(width + delta)
    x = rng.standard_normal(32).astype(numpy.float32)
    src = rng.integers(0, 64, 32).astype(numpy.int32)
    out = numpy.zeros((5, 32), numpy.float32)
    votes = numpy.zeros((32, 3), numpy.uint32)
    run(host, "shuffles", [x, src, delta, width, out, votes])
    lane = numpy.arange(32)
    base, sub = lane - lane % width, lane % width
    numpy.testing.assert_array_equal(out[0], x[base + src % width])
    numpy.testing.assert_array_equal(out[1], x[numpy.where(sub >= delta, lane - delta, lane)])
    numpy.testing.assert_array_equal(out[2], x[numpy.where(sub + delta < width, lane + delta, lane)])
    xor = lane ^ delta
    numpy.testing.assert_array_equal(out[3], x[numpy.where(xor // width == lane // width, xor, lane)])
    numpy.testing.assert_array_equal(out[4], (x[lane ^ 1].astype(numpy.float64) * 3).astype(numpy.float32))
    ballot = sum(1 << int(i) for i in numpy.flatnonzero(x > 0))
    numpy.testing.assert_array_equal(votes, numpy.tile([ballot, (x > 0).any(), (x > 0).all()],
                                                       (32, 1)))


def test_a_half_warp_mask_involves_only_its_lanes(host):
    x = numpy.arange(32, dtype=numpy.float32)
    out = numpy.zeros(32, numpy.float32)
    run(host, "half_warp", [x, out])
    expected = x.copy()
    expected[:15] = x[1:16]
    numpy.testing.assert_array_equal(out, expected)


def test_mask_errors(host):
    out = numpy.zeros(32, numpy.float32)
    # the first of lanes 16..31 that the (varied) schedule runs
    with pytest.raises(RuntimeError, match=r"lane (1[6-9]|2\d|3[01])\] calls __shfl_sync with mask "
                                           r"0x0000ffff at .*host_primitives.cu:\d+, which does "
                                           r"not include its own lane"):
        run(host, "bad_mask", [out])
    with pytest.raises(RuntimeError, match=r"lane 1 of the mask has exited"):
        run(host, "exited_lane", [out])
    with pytest.raises(RuntimeError, match=r"lane 12 does not exist \(the block has 12 threads\)"):
        run(host, "half_warp", [numpy.zeros(32, numpy.float32), out], block=(12,))


# ---------------------------------------------------------------- tensor cores

def _bits16(values, dtype):
    return numpy.asarray(values, dtype).view(numpy.uint16).astype(numpy.uint32)


def _pack(lo, hi):
    return (lo | (hi << 16)).astype(numpy.uint32)


def _tf32(x):
    """cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits."""
    u = numpy.asarray(x, numpy.float32).view(numpy.uint32).astype(numpy.uint64)
    u = ((u + 0x1000) & 0xFFFFE000).astype(numpy.uint32)
    return u.view(numpy.float32)


def _fragments(A, B, C, kind):
    """Per-lane registers of mma.m16n8k16 (f16, bf16) or m16n8k8 (tf32), PTX ISA tables."""
    a = numpy.zeros((32, 4), numpy.uint32)
    b = numpy.zeros((32, 2), numpy.uint32)
    c = numpy.zeros((32, 4), numpy.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if kind == "tf32":
            bits = lambda v: numpy.float32(v).view(numpy.uint32)  # noqa: E731
            a[lane] = [bits(A[g, t]), bits(A[g + 8, t]), bits(A[g, t + 4]), bits(A[g + 8, t + 4])]
            b[lane] = [bits(B[t, g]), bits(B[t + 4, g])]
        else:
            dt = numpy.float16 if kind == "f16" else ml_dtypes.bfloat16
            h = lambda v: int(_bits16([v], dt)[0])  # noqa: E731
            pair = lambda x, y: h(x) | (h(y) << 16)  # noqa: E731
            a[lane] = [pair(A[g, 2 * t], A[g, 2 * t + 1]), pair(A[g + 8, 2 * t], A[g + 8, 2 * t + 1]),
                       pair(A[g, 2 * t + 8], A[g, 2 * t + 9]),
                       pair(A[g + 8, 2 * t + 8], A[g + 8, 2 * t + 9])]
            b[lane] = [pair(B[2 * t, g], B[2 * t + 1, g]), pair(B[2 * t + 8, g], B[2 * t + 9, g])]
        c[lane] = [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]
    return a, b, c


def _unfragment(d):
    D = numpy.zeros((16, 8), numpy.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1] = d[lane]
    return D


@pytest.mark.parametrize("kind, template", [("f16", 0), ("bf16", 1), ("tf32", 2)])
def test_mma_tile_is_the_product_of_the_rounded_inputs(host, kind, template):
    rng = numpy.random.default_rng(template)
    K = 8 if kind == "tf32" else 16
    A, B = rng.standard_normal((16, K)), rng.standard_normal((K, 8))
    C = rng.standard_normal((16, 8)).astype(numpy.float32)
    if kind == "tf32":
        A, B = _tf32(A), _tf32(B)
    else:
        dt = numpy.float16 if kind == "f16" else ml_dtypes.bfloat16
        A, B = A.astype(dt), B.astype(dt)
    a, b, c = _fragments(A, B, C, kind)
    d = numpy.zeros((32, 4), numpy.float32)
    run(host, "mma_fragments", [a, b, c, d], template=(template,))
    expected = A.astype(numpy.float64) @ B.astype(numpy.float64) + C
    numpy.testing.assert_allclose(_unfragment(d), expected, rtol=1e-5, atol=1e-5)


def test_tf32_rounding_is_nearest_ties_away(host):
    x = numpy.array([1 + 2.0**-11, 1 + 2.0**-11 + 2.0**-20, 1 + 3 * 2.0**-11, -(1 + 2.0**-11),
                     1.0, 3.1415926], numpy.float32)
    x = numpy.concatenate([x, numpy.random.default_rng(5).standard_normal(58).astype(numpy.float32)])
    out = numpy.zeros_like(x)
    run(host, "to_tf32", [x, out, x.size])
    numpy.testing.assert_array_equal(out, _tf32(x))
    assert out[0] == 1 + 2.0**-10 and out[3] == -(1 + 2.0**-10)  # ties away from zero


@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_moves_the_elements_the_ptx_isa_says(host, count, trans):
    rng = numpy.random.default_rng(count + 10 * trans)
    tile = rng.integers(0, 2**16, (32, 8)).astype(numpy.uint16)
    rows = rng.permutation(32).astype(numpy.int32)  # lane l gives row rows[l]
    out = numpy.zeros((32, count), numpy.uint32)
    run(host, "ldmatrix_rows", [tile, rows, out], template=(count, trans))
    for m in range(count):
        M = tile[rows[8 * m:8 * m + 8]].astype(numpy.uint32)  # matrix m, row r from lane 8m+r
        for lane in range(32):
            g, c = lane // 4, 2 * (lane % 4)
            lo, hi = (M[c, g], M[c + 1, g]) if trans else (M[g, c], M[g, c + 1])
            assert out[lane, m] == lo | (hi << 16), (m, lane)


# ---------------------------------------------------------------- asynchronous copies

def test_cp_async_lands_at_the_covering_wait(host):
    x = numpy.arange(128, dtype=numpy.float32) + 1
    out = numpy.zeros((32, 4), numpy.float32)
    run(host, "async_copy", [x, out], template=(2,))
    numpy.testing.assert_array_equal(out.reshape(-1), x)
    run(host, "async_copy", [x, out], template=(1,))  # wait_group 1: the first group only
    numpy.testing.assert_array_equal(out[:, :2], x.reshape(32, 4)[:, :2])
    assert numpy.isnan(out[:, 2:]).all()
    run(host, "async_copy", [x, out], template=(0,))  # no wait: stale (poison) data
    assert numpy.isnan(out).all()


# ---------------------------------------------------------------- the cooperative GEMM

def _gemm_case(dtype, M=64, N=64, K=64, seed=0):
    rng = numpy.random.default_rng(seed)
    A = rng.standard_normal((M, K)).astype(dtype)
    B = rng.standard_normal((K, N)).astype(dtype)
    return A, B, A.astype(numpy.float64) @ B.astype(numpy.float64)


def _run_gemm(backend, dtype, file=PRIMITIVES, seed=0):
    A, B, expected = _gemm_case(dtype, seed=seed)
    M, K = A.shape
    N = B.shape[1]
    C = numpy.full((M, N), numpy.nan, numpy.float32)
    rowsum = numpy.zeros(M, numpy.float32)
    backend.launch(file, "gemm", _dtypes.DTYPES[numpy.dtype(dtype)], 32, 1,
                   [A, B, C, rowsum, M, N, K], grid=(N // 32, M // 32), block=(128,))
    return C, rowsum, expected


@pytest.mark.parametrize("dtype", [numpy.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_cooperative_gemm_matches_numpy(host, dtype):
    C, rowsum, expected = _run_gemm(host, dtype)
    assert_close(C, expected, numpy.float32)
    assert_close(rowsum, expected.sum(axis=1), numpy.float32)


def test_cooperative_gemm_runs_the_same_without_checks():
    fast = _kernels.HostBackend(checks=False, workers=2)
    C, rowsum, expected = _run_gemm(fast, numpy.float16)
    assert_close(C, expected, numpy.float32)


def test_the_ucontext_fibers_run_the_same_as_the_fast_switch(host):
    """Where the x86-64 switch is not built (other CPUs, or DCN_HOST_UCONTEXT),
    fibers are POSIX ucontexts: the same kernel, checks on, gives the same
    tile products bit for bit (the row sums add atomically across parallel
    blocks, in a varying order)."""
    portable = _kernels.HostBackend(checks=True, workers=2, seed=3,
                                    flags=("-DDCN_HOST_UCONTEXT",))
    for dtype in (numpy.float16, ml_dtypes.bfloat16):
        C, rowsum, expected = _run_gemm(portable, dtype)
        assert_close(C, expected, numpy.float32)
        fast = _run_gemm(host, dtype)
        numpy.testing.assert_array_equal(C, fast[0])
        assert_close(rowsum, fast[1], numpy.float32)


MUTATIONS = {
    "barrier removed": ("__syncthreads();  // [mutation: tiles landed]", ""),
    "fragment index off by one": ("(16 * (warp / 2) + lane % 16) * 16",
                                  "(16 * (warp / 2) + (lane + 1) % 16) * 16"),
    "missing cp.async wait": ("dcn_cp_async_wait<0>();  // [mutation: wait]", ""),
    "barrier under a divergent branch": ("__syncthreads();  // [mutation: tiles consumed]",
                                         "if (warp < 2) __syncthreads();"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_each_mutation_of_the_gemm_fails(mutation):
    old, new = MUTATIONS[mutation]
    text = _kernels.source(GEMM_ONLY)
    assert text.count(old) == 1
    mutated = _kernels.HostBackend(checks=True, workers=2, seed=5,
                                   sources={GEMM_ONLY.name: text.replace(old, new)})
    try:
        C, rowsum, expected = _run_gemm(mutated, numpy.float16, file=GEMM_ONLY)
    except RuntimeError as error:
        failure = str(error)
    else:
        err = numpy.linalg.norm(C - expected) / numpy.linalg.norm(expected)
        failure = None if err < 1e-5 else f"wrong result (relative error {err})"
    assert failure is not None, f"the mutation '{mutation}' went unnoticed"
    # a divergent barrier also lets the warps that skip it run ahead into the
    # next step's copies: whichever the schedule meets first is reported
    expected_failure = {"barrier removed": ("shared-memory race",),
                        "fragment index off by one": ("wrong result",),
                        "missing cp.async wait": ("shared-memory race", "wrong result"),
                        "barrier under a divergent branch": ("divergent __syncthreads",
                                                             "shared-memory race")}[mutation]
    assert any(f in failure for f in expected_failure), failure
