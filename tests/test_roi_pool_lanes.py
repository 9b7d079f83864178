"""The warp-per-bin gradients of the RoI ops with several lanes, on the host
backend as cooperative launches (each lane a fiber, warp shuffles emulated)
with the checks on (shuffle masks, exited lanes, scheduling drawn from the
seed) and two workers, against the float64 reference: the offset and mask
gradients of deform_roi_pool (``deform_roi_pool_backward_offset``) and the
trans gradient of deform_psroi_pool, scattered and deterministic
(``deform_psroi_pool_backward_trans`` and ``_trans_gather``). The users' host
path runs them with one lane (a plain loop, no shuffle), CUDA with up to 8
(``_kernels.lanes_for``; the kernels take up to 32). These tests cover 2 to
32 lanes without a GPU: channel counts wider than a warp and not a multiple of
the lanes, items that do not fill the last warp, every dtype, the
deterministic results bit-identical whatever the scheduling, and mutations of
the kernels that must fail.
"""

import numpy
import pytest

from cupydcn import _dtypes, _kernels, _roi_pool, _validation
from helpers import DTYPES, dtype_name, rel_err
from roi_cases import (
    PSCase, RoICase, assert_bit_identical, compare, make_ps_case, make_roi_case, ps_reference,
    ps_run, roi_reference, roi_run, typed_and_exact)

# 40 channels: with 32 lanes a second, partly idle round; 13 RoIs x 3x2 bins
# = 78 bins, so 78*lanes threads end in a partial warp for lanes 2..16.
ROI = RoICase("wide", 2, 40, 9, 8, (3, 2), 1.0, 0, True, True)
# 2 trans classes of 20 channels (group 2: C = 160); 5x5 bins on a 3x3 part
# grid (cells of 1 to 4 bins); 17 RoIs: 850 bins and 306 part cells, neither
# a multiple of 4.
PS = PSCase("wide", 2, 9, 10, 40, 2, 5, 3, 2, 2, 0.5)
LANES = (2, 8, 32)


def fibers(seed=5):
    """The host backend running lanes as fibers, checks on, blocks on two workers."""
    return _kernels.HostBackend(checks=True, workers=2, seed=seed)


@pytest.fixture(scope="module")
def roi_data():
    return make_roi_case(ROI, seed=1)


@pytest.fixture(scope="module")
def ps_data():
    return make_ps_case(PS, seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("lanes", LANES)
def test_roi_offset_grad_with_lanes_matches_reference(roi_data, lanes, dtype):
    typed, exact = typed_and_exact(roi_data, dtype)
    ref_out, ref_grads = roi_reference(exact, ROI)
    out, grads = roi_run(fibers(), typed, ROI, lanes=lanes)
    compare(out, grads, ref_out, ref_grads, dtype, f"deform_roi_pool lanes={lanes}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["scatter", "deterministic"])
def test_psroi_trans_grad_with_lanes_matches_reference(ps_data, deterministic, lanes, dtype):
    typed, exact = typed_and_exact(ps_data, dtype)
    ref_out, _, ref_grads = ps_reference(exact, PS)
    out, _, grads = ps_run(fibers(), typed, PS, deterministic=deterministic, lanes=lanes)
    compare(out, grads, ref_out, ref_grads, dtype, f"deform_psroi_pool lanes={lanes}")


@pytest.mark.parametrize("lanes", (1, 32))
def test_one_roi_with_lanes(lanes):
    """Batch 1: a single RoI, fewer bins than a warp holds lanes."""
    arrays = make_roi_case(ROI, seed=2, specials=False)
    for k in ("rois", "offset", "mask", "grad_output"):
        arrays[k] = arrays[k][:1]
    ref_out, ref_grads = roi_reference(arrays, ROI)
    out, grads = roi_run(fibers(), arrays, ROI, lanes=lanes)
    compare(out, grads, ref_out, ref_grads, numpy.float64, "deform_roi_pool one RoI")


def test_lanes_with_64bit_indices(roi_data, ps_data, monkeypatch):
    monkeypatch.setattr(_dtypes, "INT32_LIMIT", 0)
    typed, exact = typed_and_exact(roi_data, numpy.float32)
    ref_out, ref_grads = roi_reference(exact, ROI)
    out, grads = roi_run(fibers(), typed, ROI, lanes=8)
    compare(out, grads, ref_out, ref_grads, numpy.float32, "deform_roi_pool 64-bit lanes=8")
    typed, exact = typed_and_exact(ps_data, numpy.float32)
    ref_out, _, ref_grads = ps_reference(exact, PS)
    for deterministic in (False, True):
        out, _, grads = ps_run(fibers(), typed, PS, deterministic=deterministic, lanes=8)
        compare(out, grads, ref_out, ref_grads, numpy.float32, "deform_psroi_pool 64-bit lanes=8")


def test_lanes_results_are_bit_identical_run_to_run(roi_data, ps_data):
    """A fixed reduction order: the offset, mask and (deterministic) trans
    gradients give the same bits whatever order the fibers and blocks run in
    (different seeds), and the deterministic input gradients as well."""
    typed, _ = typed_and_exact(roi_data, numpy.float32)
    runs = [roi_run(fibers(seed), typed, ROI, deterministic=True, lanes=8)[1]
            for seed in (1, 2)]
    assert_bit_identical(runs, "deform_roi_pool lanes=8")
    typed, _ = typed_and_exact(ps_data, numpy.float32)
    runs = [ps_run(fibers(seed), typed, PS, deterministic=True, lanes=8)[2] for seed in (1, 2)]
    assert_bit_identical(runs, "deform_psroi_pool lanes=8")


def test_lanes_choice_and_bad_lanes(roi_data):
    class Device:
        name = "cupy"

    host = fibers()
    assert _kernels.lanes_for(host, 256, _roi_pool.CUDA_LANES) == 1
    assert [_kernels.lanes_for(Device, c, _roi_pool.CUDA_LANES) for c in (1, 2, 3, 6, 20, 256)
            ] == [1, 2, 2, 4, 8, 8] and _roi_pool.CUDA_LANES == 8
    with pytest.raises(_validation.ArgumentError,
                       match="lanes must be a power of two from 1 to 32, got 3"):
        roi_run(host, roi_data, ROI, lanes=3)
    with pytest.raises(_validation.ArgumentError, match="got 64"):
        ps_run(host, make_ps_case(PS, specials=False), PS, lanes=64)


def test_launch_block_fits_the_kernels_launch_bounds():
    """deform_roi_pool_backward_offset declares __launch_bounds__(256): every
    launch of it (BLOCK threads, the warp-per-bin launch and the default)
    must fit, and a whole number of warps."""
    text = _kernels.source("deform_roi_pool")
    assert "__launch_bounds__(256," in text
    assert _kernels.BLOCK <= 256 and _kernels.BLOCK % _kernels.WARP == 0


def test_users_host_path_runs_one_lane_as_a_plain_loop(roi_data, monkeypatch):
    """On the host the warp-per-bin kernels take one lane and every RoI
    kernel runs as a plain loop (no fibers)."""
    host = fibers()
    seen = []
    launch = _kernels.HostBackend.launch

    def spy(self, file, kernel, dtype, bits, n, args, **options):
        seen.append((kernel, options.get("cooperative")))
        return launch(self, file, kernel, dtype, bits, n, args, **options)

    monkeypatch.setattr(_kernels.HostBackend, "launch", spy)
    roi_run(host, roi_data, ROI)
    ps_run(host, make_ps_case(PS, specials=False), PS, deterministic=True)
    assert "deform_roi_pool_backward_offset" in dict(seen)
    assert "deform_psroi_pool_backward_trans_gather" in dict(seen)
    assert {cooperative for _, cooperative in seen} == {False}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("lanes", (1, 8, 32))
def test_gpu_lanes_match_reference(gpu, roi_data, ps_data, lanes, dtype):
    """The same kernels on the GPU with real shuffles, every width the
    heuristic could take, the deterministic trans gradient bit-identical run
    to run."""
    import cupy

    def on_gpu(arrays):
        return {k: None if v is None else cupy.asarray(v) for k, v in arrays.items()}

    typed, exact = typed_and_exact(roi_data, dtype)
    ref_out, ref_grads = roi_reference(exact, ROI)
    out, grads = roi_run(gpu, on_gpu(typed), ROI, lanes=lanes)
    compare(out, grads, ref_out, ref_grads, dtype, f"deform_roi_pool GPU lanes={lanes}")
    typed, exact = typed_and_exact(ps_data, dtype)
    ref_out, _, ref_grads = ps_reference(exact, PS)
    runs = [ps_run(gpu, on_gpu(typed), PS, deterministic=True, lanes=lanes) for _ in range(2)]
    assert_bit_identical([r[2] for r in runs], f"deform_psroi_pool GPU lanes={lanes}")
    compare(runs[0][0], runs[0][2], ref_out, ref_grads, dtype,
            f"deform_psroi_pool GPU lanes={lanes}")


# ---------------------------------------------------------------- mutations

ROI_MUTATIONS = {
    "shuffle distance": ("sum_dx += __shfl_xor_sync(0xffffffffu, sum_dx, (int)s);",
                         "sum_dx += __shfl_xor_sync(0xffffffffu, sum_dx, (int)(s / 2));"),
    "reduction step removed": ("for (I s = lanes / 2; s > 0; s /= 2)",
                               "for (I s = lanes / 2; s > 1; s /= 2)"),
    "partial warp": ("const I threads = ((items * lanes + 31) / 32) * 32;",
                     "const I threads = items * lanes;"),
    "channel start": ("const T* grad_c = grad + lane * bins;",
                      "const T* grad_c = grad + (lane / 2) * bins;"),
    "channel stride": ("c += lanes, grad_c", "c += 2 * lanes, grad_c"),
}

SCATTER, GATHER = "deform_psroi_pool_backward_trans", "deform_psroi_pool_backward_trans_gather"
# (old, new, the trans kernels it breaks)
PS_MUTATIONS = {
    "shuffle distance (scatter)": (
        "grad_x += __shfl_xor_sync(0xffffffffu, grad_x, (int)s);",
        "grad_x += __shfl_xor_sync(0xffffffffu, grad_x, (int)(s / 2));", (SCATTER,)),
    "shuffle distance (gather)": (
        "sum_y += __shfl_xor_sync(0xffffffffu, sum_y, (int)s);",
        "sum_y += __shfl_xor_sync(0xffffffffu, sum_y, (int)(s / 2));", (GATHER,)),
    "channel stride": (
        "c < c_begin + channels_each_class; c += lanes)",
        "c < c_begin + channels_each_class; c += lanes - 1)", (SCATTER, GATHER)),
    "channel start": (
        "for (I c = c_begin + lane;", "for (I c = c_begin + lane / 2;", (SCATTER, GATHER)),
    "partial warp (scatter)": (
        "const I items = R * num_classes * bins;\n"
        "  const I threads = ((items * lanes + 31) / 32) * 32;",
        "const I items = R * num_classes * bins;\n"
        "  const I threads = items * lanes;", (SCATTER,)),
    "partial warp (gather)": (
        "const I items = R * num_classes * cells;\n"
        "  const I threads = ((items * lanes + 31) / 32) * 32;",
        "const I items = R * num_classes * cells;\n"
        "  const I threads = items * lanes;", (GATHER,)),
}
PS_MUTATION_RUNS = [pytest.param(name, kernel, id=f"{name}-{kernel}")
                    for name, (_, _, kernels) in sorted(PS_MUTATIONS.items())
                    for kernel in kernels]


def _broken(file, old, new):
    text = _kernels.source(file)
    assert text.count(old) == 1, old
    return _kernels.HostBackend(checks=True, workers=2, seed=5,
                                sources={file: text.replace(old, new)})


def _fails(run, grads_of, ref_grads, names, kernel):
    """True when ``run`` raises a host-check error naming ``kernel`` or some
    gradient in ``names`` is off."""
    try:
        grads = grads_of(run())
    except RuntimeError as error:  # e.g. a shuffle naming a lane that has exited
        assert kernel in str(error)
        return True
    return max(rel_err(getattr(grads, n), getattr(ref_grads, n)) for n in names) > 1e-3


@pytest.mark.parametrize("mutation", sorted(ROI_MUTATIONS))
def test_a_wrong_roi_offset_kernel_fails(roi_data, mutation):
    backend = _broken("deform_roi_pool", *ROI_MUTATIONS[mutation])
    _, ref_grads = roi_reference(roi_data, ROI)
    assert _fails(lambda: roi_run(backend, roi_data, ROI, wrt=("offset", "mask"), lanes=8),
                  lambda result: result[1], ref_grads, ("offset", "mask"),
                  "deform_roi_pool_backward_offset"), mutation


@pytest.mark.parametrize("mutation, kernel", PS_MUTATION_RUNS)
def test_a_wrong_psroi_trans_kernel_fails(ps_data, mutation, kernel):
    old, new, _ = PS_MUTATIONS[mutation]
    backend = _broken("deform_psroi_pool", old, new)
    _, _, ref_grads = ps_reference(ps_data, PS)
    assert _fails(lambda: ps_run(backend, ps_data, PS, wrt=("trans",),
                                 deterministic=kernel == GATHER, lanes=8),
                  lambda result: result[2], ref_grads, ("trans",), kernel), mutation
