"""The fused backward of deformable convolution (``im2col_fused`` and
``im2col_fused_deterministic``, kernels/deform_conv_fused.cu) on the host backend with its checks on (races,
warp-operation masks, scheduling drawn from the seed), against the float64
reference: odd shapes, groups and offset groups, stride and dilation, with and
without mask, for 1, 8 and 32 lanes per (pixel, offset group) item (the warp
reduction over channels at every width), scattered (float atomics) and
gathered (deterministic: bit-identical whatever the scheduling), and mutations
of the kernels that must fail. tests/test_implementations.py runs it through the public API in
every dtype as well.
"""

import numpy
import pytest

import cupydcn
from cupydcn import _conv_fused, _deform_conv, _dispatch, _dtypes, _kernels, _validation
from helpers import DTYPES, dtype_name, rel_err
from test_deform_conv import CASES, case_id, compare_all, make_case, reference_results

# A group wider than a warp (40 channels: two rounds of 32 lanes, the second
# partly idle), two weight groups inside one offset group, non-square kernel.
WIDE = (2, 40, 5, 6, 6, 2, 3, 2, 1, (1, 2), (1, 1), (2, 1), True, False)
LANES = (1, 8, 32)


def run_fused(backend, typed, params, wrt=_deform_conv.GRADIENTS, lanes=None,
              deterministic=False):
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          typed["bias"], mask=typed["mask"],
                                          grad_output=typed["grad_output"], **params)
    out = _deform_conv.forward(backend, geo, typed["input"], typed["offset"], typed["weight"],
                               typed["bias"], typed["mask"])
    wrt = _validation.check_wrt(wrt, _deform_conv.GRADIENTS, bias=typed["bias"],
                                mask=typed["mask"])
    grads = _conv_fused.backward(backend, geo, typed["grad_output"], typed["input"],
                                 typed["offset"], typed["weight"], typed["mask"], wrt, lanes,
                                 deterministic)
    return out, grads


DETERMINISTIC = pytest.mark.parametrize("deterministic", [False, True],
                                        ids=["scatter", "gather"])


@DETERMINISTIC
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("case", [*CASES, WIDE], ids=case_id)
def test_fused_matches_reference(host, case, lanes, deterministic):
    typed, exact, params = make_case(case, numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    out, grads = run_fused(host, typed, params, lanes=lanes, deterministic=deterministic)
    compare_all(out, grads, ref_out, ref_grads, numpy.float64)


@DETERMINISTIC
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("lanes", (1, 8))
def test_fused_every_dtype(host, dtype, lanes, deterministic):
    typed, exact, params = make_case(WIDE, dtype, seed=1)
    ref_out, ref_grads = reference_results(exact, params)
    out, grads = run_fused(host, typed, params, lanes=lanes, deterministic=deterministic)
    compare_all(out, grads, ref_out, ref_grads, dtype)


@DETERMINISTIC
@pytest.mark.parametrize("limit", [1, 700])
def test_fused_tiled_by_workspace(host, limit, deterministic):
    """Rows of one image and images per chunk: the GEMM writes into one
    workspace reused by every tile, the kernel sees each tile's columns."""
    typed, exact, params = make_case(CASES[1], numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    previous = cupydcn.set_workspace_limit(limit)
    try:
        geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                              mask=typed["mask"], **params)
        assert len(_deform_conv.tiles(geo)) > 1
        out, grads = run_fused(host, typed, params, lanes=4, deterministic=deterministic)
    finally:
        cupydcn.set_workspace_limit(previous)
    compare_all(out, grads, ref_out, ref_grads, numpy.float64)


@DETERMINISTIC
def test_fused_64bit_indices(host, monkeypatch, deterministic):
    monkeypatch.setattr(_dtypes, "INT32_LIMIT", 0)
    typed, exact, params = make_case(WIDE, numpy.float32)
    ref_out, ref_grads = reference_results(exact, params)
    out, grads = run_fused(host, typed, params, lanes=8, deterministic=deterministic)
    compare_all(out, grads, ref_out, ref_grads, numpy.float32)


@DETERMINISTIC
@pytest.mark.parametrize("wrt", [("input",), ("offset",), ("mask",), ("weight", "bias"),
                                 ("offset", "mask")])
def test_fused_computes_only_what_is_asked(host, wrt, deterministic):
    typed, exact, params = make_case(CASES[0], numpy.float64)
    _, ref_grads = reference_results(exact, params)
    _, grads = run_fused(host, typed, params, wrt, lanes=4, deterministic=deterministic)
    for name in _deform_conv.GRADIENTS:
        got = getattr(grads, name)
        if name in wrt:
            assert rel_err(got, getattr(ref_grads, name)) <= 1e-12, name
        else:
            assert got is None, name


def test_fused_non_contiguous_grad_output(host):
    """grad_output is read in place by the GEMMs: a strided view gives the same numbers."""
    typed, exact, params = make_case(CASES[1], numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    g = typed["grad_output"]
    wide = numpy.zeros(g.shape[:-1] + (2 * g.shape[-1],))
    wide[..., ::2] = g
    typed["grad_output"] = wide[..., ::2]
    out, grads = run_fused(host, typed, params, lanes=8)
    compare_all(out, grads, ref_out, ref_grads, numpy.float64)


def test_lanes_choice_and_bad_lanes(host):
    typed, _, params = make_case(WIDE, numpy.float64)
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    channels = geo.C // geo.offset_groups  # 40 per offset group
    assert _kernels.lanes_for(host, channels, _conv_fused.CUDA_LANES) == 1

    class Device:
        name = "cupy"

    assert _kernels.lanes_for(Device, channels, _conv_fused.CUDA_LANES) == 8
    assert _kernels.lanes_for(Device, 4, _conv_fused.CUDA_LANES) == 4  # 10 offset groups
    with pytest.raises(ValueError, match="lanes must be a power of two from 1 to 32, got 3"):
        run_fused(host, typed, params, lanes=3)


def test_dispatcher_registration():
    """Registered for CUDA and the host; im2col_fused, not deterministic, is
    the first choice where atomics are allowed (CUDA); on the host the
    automatic choice is deterministic (parallel blocks), and so is
    deterministic=True: im2col_fused_deterministic; named, each runs on the
    host."""
    table = {i.name: i for i in _dispatch._registry["deform_conv2d"]}
    fused, gather = table["im2col_fused"], table["im2col_fused_deterministic"]
    assert fused.runs_on == gather.runs_on == {_dispatch.CUDA, _dispatch.HOST}
    assert not fused.deterministic and gather.deterministic
    assert fused.priority > table["im2col"].priority
    assert gather.priority > table["im2col_deterministic"].priority
    typed, _, params = make_case(CASES[0], numpy.float32)
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    previous = cupydcn.set_cpu_backend("host")
    try:
        assert _dispatch.choose("deform_conv2d", False, geo)[0] is gather
        assert _dispatch.choose("deform_conv2d", False, geo, "im2col_fused")[0] is fused
        cuda = [i for i in _dispatch._registry["deform_conv2d"]
                if _dispatch.CUDA in i.runs_on and "float32" in (i.dtypes or {"float32"})
                and (i.automatic is None or i.automatic(_dispatch.CUDA, geo))]
        assert cuda[0] is fused
        assert _dispatch.choose("deform_conv2d", False, geo, deterministic=True)[0] is gather
        with pytest.raises(_validation.ArgumentError, match="not deterministic"):
            _dispatch.choose("deform_conv2d", False, geo, "im2col_fused", deterministic=True)
    finally:
        cupydcn.set_cpu_backend(previous)


# ---------------------------------------------------------------- mutations

MUTATIONS = {
    "shuffle offset": ("sum_dy += __shfl_xor_sync(0xffffffffu, sum_dy, (int)s);",
                       "sum_dy += __shfl_xor_sync(0xffffffffu, sum_dy, (int)(s / 2));"),
    "reduction step removed": ("for (I s = lanes / 2; s > 0; s /= 2)",
                               "for (I s = lanes / 2; s > 1; s /= 2)"),
    "partial warp": ("const I threads = ((items * lanes + 31) / 32) * 32;",
                     "const I threads = items * lanes;"),
    "channel stride": ("cg += lanes)", "cg += 2 * lanes)"),
    "scatter corner weight": ("atomicAdd(gplane + y0 * W + x0 + 1, w01 * gm)",
                              "atomicAdd(gplane + y0 * W + x0 + 1, w10 * gm)"),
    "mask on the mask gradient": ("dcn_store<T>(sum_mask)", "dcn_store<T>(sum_mask * m)"),
    "columns without the mask": ("columns[index] = dcn_store<T>(value * m);",
                                 "columns[index] = dcn_store<T>(value);"),
}
# The deterministic gather of the input gradient (run with deterministic=True).
GATHER_MUTATIONS = {
    "gather corner role": ("(cx ? lx : (A)1 - lx);", "(cx ? (A)1 - lx : lx);"),
    "gather channel of the write": ("const I cg = c0 + lane + q * lanes;",
                                    "const I cg = c0 + lane + q;"),
    "gather chunk step": ("c0 += lanes * DCN_GATHER_CHANNELS", "c0 += DCN_GATHER_CHANNELS"),
    "gather columns row without the groups": ("const I row = (bi * groups * P + p) * Kg + k;",
                                              "const I row = (bi * P + p) * Kg + k;"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS) + sorted(GATHER_MUTATIONS))
def test_a_wrong_fused_kernel_fails(host, mutation):
    """Each plausible bug fails: the host checks report it, or a gradient is off."""
    deterministic = mutation in GATHER_MUTATIONS
    old, new = (GATHER_MUTATIONS if deterministic else MUTATIONS)[mutation]
    text = _kernels.source("deform_conv_fused")
    assert text.count(old) == 1, old
    broken = _kernels.HostBackend(grid=host.grid, checks=True, workers=1, seed=host.seed,
                                  sources={"deform_conv_fused": text.replace(old, new)})
    typed, exact, params = make_case(WIDE, numpy.float64)
    _, ref_grads = reference_results(exact, params)
    try:
        _, grads = run_fused(broken, typed, params, lanes=8, deterministic=deterministic)
    except RuntimeError as error:  # a host check (e.g. a shuffle naming an exited lane)
        assert "deform_col2im_fused" in str(error)
    else:
        worst = max(rel_err(getattr(grads, n), getattr(ref_grads, n))
                    for n in ("input", "offset", "mask", "weight"))
        assert worst > 1e-3, mutation


def test_weight_gradient_alone_is_bit_identical(host):
    """The weight gradient asked for alone (as the jax bridge does) is the
    same GEMM on the same columns as in the full backward: the same bits."""
    typed, _, params = make_case(WIDE, numpy.float32)
    _, full = run_fused(host, typed, params, lanes=8)
    _, alone = run_fused(host, typed, params, ("weight",), lanes=8)
    numpy.testing.assert_array_equal(alone.weight, full.weight)
    assert alone.input is None and alone.offset is None


@pytest.mark.parametrize("lanes", (1, 8))
def test_deterministic_backward_is_bit_identical_whatever_the_schedule(lanes):
    """The deterministic backward gives the same bits under different block
    orders, thread orders and numbers of workers (the scatter would not)."""
    typed, _, params = make_case(WIDE, numpy.float32)
    runs = [run_fused(_kernels.HostBackend(grid=3, checks=True, workers=workers, seed=seed),
                      typed, params, lanes=lanes, deterministic=True)[1]
            for workers, seed in ((1, 0), (2, 5), (2, 9))]
    for name in ("input", "offset", "mask", "weight"):
        for other in runs[1:]:
            numpy.testing.assert_array_equal(getattr(other, name), getattr(runs[0], name))
