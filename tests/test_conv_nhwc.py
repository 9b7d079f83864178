"""Deformable convolution on channels-last memory (``im2col_nhwc``,
kernels/deform_conv_nhwc.cu, cupydcn/_conv_nhwc.py).

The kernels on the host backend with its checks on (scheduling drawn from the
seed, a small grid and an odd block for the grid-stride loops) against the
float64 reference, in all four dtypes: channels-last and mixed-format inputs
(offset, mask and grad_output channels-last or NCHW), groups, offset groups,
stride, dilation, unequal padding, batch 1, 3 and 33, the 16-byte vector path
and its scalar fallback, 1, 8 and 32 lanes per item (the warp reduction over
channels), tiles bounded by the workspace and 64-bit indices; every output
buffer starts as NaN (conftest). Then the memory formats of the results, the
dispatcher's choices, the bridges (torch channels_last and TensorFlow NHWC
reach the kernels without a copy), mutations of the kernels that must fail,
and register spills (nvcc). tests/test_implementations.py runs it through
the public API with NCHW inputs (converted) in every dtype as well.
"""

import re
import shutil
import subprocess

import numpy
import pytest

import cupydcn
from cupydcn import _conv_nhwc, _deform_conv, _dispatch, _dtypes, _kernels, _validation
from helpers import DTYPES, dtype_name, rel_err
from test_deform_conv import CASES, case_id, compare_all, make_case, reference_results

# Channels that fill 16-byte vectors in every dtype (8 per weight group and per
# offset group: 8 halves, 2 x 4 floats, 4 x 2 doubles); two weight groups,
# two offset groups, a non-square kernel, stride, dilation, unequal padding.
VECTOR = (3, 16, 7, 6, 6, 3, 2, 2, 2, (2, 1), (1, 0), (1, 2), True, True)
# An offset group wider than a warp (40 channels: a second, partly idle round
# of 32 lanes) with two weight groups inside it.
WIDE = (2, 40, 5, 6, 6, 2, 3, 2, 1, (1, 2), (1, 1), (2, 1), True, False)
# Which 4-D arrays are channels-last (the input always is).
FORMATS = {
    "all-channels-last": ("input", "offset", "mask", "grad_output"),
    "mixed": ("input", "mask"),
    "input-only": ("input",),
}


def channels_last(a):
    """``a`` (B, C, H, W) with the same values in channels-last memory."""
    return numpy.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def formatted(typed, names):
    return {k: channels_last(v) if k in names and v is not None else v
            for k, v in typed.items()}


def run_nhwc(backend, typed, params, wrt=_deform_conv.GRADIENTS, lanes=None, vector=None):
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          typed["bias"], mask=typed["mask"],
                                          grad_output=typed["grad_output"], **params)
    out = _conv_nhwc.forward(backend, geo, typed["input"], typed["offset"], typed["weight"],
                             typed["bias"], typed["mask"], vector=vector)
    wrt = _validation.check_wrt(wrt, _deform_conv.GRADIENTS, bias=typed["bias"],
                                mask=typed["mask"])
    grads = _conv_nhwc.backward(backend, geo, typed["grad_output"], typed["input"],
                                typed["offset"], typed["weight"], typed["mask"], wrt, lanes,
                                vector)
    return out, grads


@pytest.fixture
def checked_host(host, monkeypatch):
    """The public API's host backend replaced by the checked one."""
    monkeypatch.setattr(_dispatch, "_host", host)
    previous = cupydcn.set_cpu_backend("host")
    yield host
    cupydcn.set_cpu_backend(previous)


# ---------------------------------------------------------------- numbers

@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("case", [*CASES, VECTOR, WIDE], ids=case_id)
def test_nhwc_matches_reference(host, case, fmt):
    typed, exact, params = make_case(case, numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    out, grads = run_nhwc(host, formatted(typed, FORMATS[fmt]), params)
    compare_all(out, grads, ref_out, ref_grads, numpy.float64)


@pytest.mark.parametrize("vector", ("auto", "scalar"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_nhwc_every_dtype(host, dtype, vector):
    """Every dtype, on the 16-byte vector path (chosen by vector_width) and on
    the scalar one, with mixed formats."""
    typed, exact, params = make_case(VECTOR, dtype, seed=1)
    typed = formatted(typed, FORMATS["mixed"])
    ref_out, ref_grads = reference_results(exact, params)
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    nhwc = numpy.ascontiguousarray(typed["input"].transpose(0, 2, 3, 1))
    if nhwc.ctypes.data % 16 == 0:  # NumPy's allocations are 16-byte aligned
        width = _conv_nhwc.vector_width(numpy, geo, nhwc, _aligned(64, dtype))
        assert width == 16 // numpy.dtype(dtype).itemsize
    out, grads = run_nhwc(host, typed, params, vector=None if vector == "auto" else 1)
    compare_all(out, grads, ref_out, ref_grads, dtype)


def _aligned(n, dtype, shift=0):
    """n elements of ``dtype`` starting ``shift`` elements past a 16-byte boundary."""
    buffer = numpy.empty(n + 16, dtype)
    start = (-buffer.ctypes.data % 16) // buffer.itemsize + shift
    return buffer[start:start + n]


def test_vector_width_falls_back_to_scalar():
    typed, _, params = make_case(VECTOR, numpy.float32)
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    nhwc = _aligned(typed["input"].size, numpy.float32).reshape(3, 7, 6, 16)
    columns = _aligned(64, numpy.float32)
    assert _conv_nhwc.vector_width(numpy, geo, nhwc, columns) == 4
    misaligned = _aligned(typed["input"].size, numpy.float32, 1).reshape(3, 7, 6, 16)
    assert _conv_nhwc.vector_width(numpy, geo, misaligned, columns) == 1
    assert _conv_nhwc.vector_width(numpy, geo, nhwc, columns[1:]) == 1
    assert _conv_nhwc.vector_width(numpy, geo._replace(groups=8), nhwc, columns) == 1  # Cg 2
    assert _conv_nhwc.vector_width(numpy, geo._replace(offset_groups=8), nhwc, columns) == 1


@pytest.mark.parametrize("lanes", (1, 8, 32))
@pytest.mark.parametrize("case", [CASES[1], VECTOR, WIDE], ids=case_id)
def test_nhwc_lanes(host, case, lanes):
    """The warp reduction over channels at every width (fibers and shuffles
    on the host for lanes > 1)."""
    typed, exact, params = make_case(case, numpy.float64, seed=2)
    ref_out, ref_grads = reference_results(exact, params)
    out, grads = run_nhwc(host, formatted(typed, FORMATS["all-channels-last"]), params,
                          lanes=lanes)
    compare_all(out, grads, ref_out, ref_grads, numpy.float64)


@pytest.mark.parametrize("fmt", ("all-channels-last", "input-only"))
@pytest.mark.parametrize("limit", [1, 9216])  # rows of one image; two images (2 x 4608 bytes)
def test_nhwc_tiled_by_workspace(host, limit, fmt):
    """Rows of one image, and several images per tile (whose NCHW grad_output
    is multiplied one image at a time)."""
    typed, exact, params = make_case(CASES[1], numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    previous = cupydcn.set_workspace_limit(limit)
    try:
        geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                              mask=typed["mask"], **params)
        plan = _deform_conv.tiles(geo)
        assert len(plan) > 1 and (limit == 1 or max(t.nb for t in plan) > 1)
        out, grads = run_nhwc(host, formatted(typed, FORMATS[fmt]), params, lanes=4)
    finally:
        cupydcn.set_workspace_limit(previous)
    compare_all(out, grads, ref_out, ref_grads, numpy.float64)


def test_nhwc_64bit_indices(host, monkeypatch):
    monkeypatch.setattr(_dtypes, "INT32_LIMIT", 0)
    typed, exact, params = make_case(VECTOR, numpy.float32)
    ref_out, ref_grads = reference_results(exact, params)
    out, grads = run_nhwc(host, formatted(typed, FORMATS["mixed"]), params, lanes=8)
    compare_all(out, grads, ref_out, ref_grads, numpy.float32)


@pytest.mark.parametrize("wrt", [("input",), ("offset",), ("mask",), ("weight",), ("bias",),
                                 ("offset", "weight")], ids="-".join)
def test_nhwc_only_the_gradients_asked(host, wrt):
    typed, exact, params = make_case(VECTOR, numpy.float64)
    _, ref_grads = reference_results(exact, params)
    _, grads = run_nhwc(host, formatted(typed, FORMATS["mixed"]), params, wrt)
    for name in _deform_conv.GRADIENTS:
        got = getattr(grads, name)
        if name in wrt:
            assert rel_err(got, getattr(ref_grads, name)) <= 1e-12, name
        else:
            assert got is None, name


# ---------------------------------------------------------------- memory formats

@pytest.mark.parametrize("batch", (0, 1, 3))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_public_api_memory_formats(checked_host, batch, fmt):
    """Named, on the host: the result is channels-last, each gradient in its
    array's format (the weight's NCHW), the numbers the reference's; batch 0
    gives empty results of the right shapes."""
    case = (batch, *VECTOR[1:])
    typed, exact, params = make_case(case, numpy.float32, seed=3)
    ref_out, ref_grads = reference_results(exact, params)
    typed = formatted(typed, FORMATS[fmt])
    arrays = {k: typed[k] for k in ("input", "offset", "weight", "bias", "mask")}
    out = cupydcn.deform_conv2d(**arrays, **params, algorithm="im2col_nhwc")
    grads = cupydcn.deform_conv2d_backward(typed["grad_output"], **arrays, **params,
                                           algorithm="im2col_nhwc")
    assert out.shape == ref_out.shape
    for name in ("input", "offset", "mask", "weight"):
        got = getattr(grads, name)
        assert got.shape == typed[name].shape, name
        if batch:
            assert (_validation.is_channels_last(got)
                    == _validation.is_channels_last(typed[name])), name
            assert got.flags.c_contiguous != _validation.is_channels_last(typed[name]), name
    if batch:
        assert _validation.is_channels_last(out)
    compare_all(out, grads, ref_out, ref_grads, numpy.float32)


def test_named_with_nchw_input_converts(checked_host, monkeypatch):
    """An NCHW input named explicitly runs (its NHWC copy is made once) and
    gives an NCHW result."""
    typed, exact, params = make_case(VECTOR, numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    ran = []
    monkeypatch.setattr(_conv_nhwc, "forward", _spy(_conv_nhwc.forward, ran))
    arrays = {k: typed[k] for k in ("input", "offset", "weight", "bias", "mask")}
    out = cupydcn.deform_conv2d(**arrays, **params, algorithm="im2col_nhwc")
    grads = cupydcn.deform_conv2d_backward(typed["grad_output"], **arrays, **params,
                                           algorithm="im2col_nhwc")
    assert len(ran) == 1
    assert out.flags.c_contiguous and grads.input.flags.c_contiguous
    compare_all(out, grads, ref_out, ref_grads, numpy.float64)


def test_automatic_choice_on_the_host_keeps_the_format(checked_host):
    """On the CPU the automatic choice is deterministic (not im2col_nhwc: its
    backward has float atomics); the result still has the input's format."""
    typed, exact, params = make_case(CASES[0], numpy.float64)
    ref_out, _ = reference_results(exact, params)
    typed = formatted(typed, FORMATS["all-channels-last"])
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    assert geo.channels_last
    assert _dispatch.choose("deform_conv2d", False, geo)[0].name != "im2col_nhwc"
    out = cupydcn.deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                typed["bias"], mask=typed["mask"], **params)
    assert _validation.is_channels_last(out)
    assert rel_err(out, ref_out) <= 1e-12


def test_is_channels_last():
    x = numpy.zeros((2, 3, 4, 5))
    assert not _validation.is_channels_last(x)
    assert _validation.is_channels_last(channels_last(x))
    assert not _validation.is_channels_last(channels_last(numpy.zeros((2, 1, 4, 5))))  # both
    assert not _validation.is_channels_last(channels_last(x)[:, :, ::2])  # not dense
    assert not _validation.is_channels_last(x.transpose(0, 1, 3, 2))
    assert not _validation.is_channels_last(numpy.zeros((2, 3, 4)))


# ---------------------------------------------------------------- dispatcher

def _cuda_automatic(geo):
    """The automatic choice on CUDA (what choose takes, without a GPU)."""
    return next(i for i in _dispatch._registry["deform_conv2d"]
                if _dispatch._why_not(i, _dispatch.CUDA, geo, False) is None
                and (i.automatic is None or i.automatic(_dispatch.CUDA, geo)))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_dispatcher_registration(dtype, monkeypatch):
    """Registered for CUDA and the host, not deterministic; the automatic
    choice on CUDA for channels-last inputs in every dtype, never for NCHW."""
    monkeypatch.setattr(_dispatch, "_cupy_importable", lambda: True)
    impl = _dispatch.implementation("deform_conv2d", "im2col_nhwc")
    assert impl.runs_on == {_dispatch.CUDA, _dispatch.HOST} and not impl.deterministic
    typed, _, params = make_case(VECTOR, dtype)
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    assert not geo.channels_last
    assert _cuda_automatic(geo).name != "im2col_nhwc"
    nhwc = _validation.check_deform_conv2d(channels_last(typed["input"]), typed["offset"],
                                           typed["weight"], mask=typed["mask"], **params)
    assert nhwc.channels_last and _cuda_automatic(nhwc) is impl
    with pytest.raises(_validation.ArgumentError, match="not deterministic"):
        _dispatch.choose("deform_conv2d", False, nhwc, "im2col_nhwc", deterministic=True)


def test_bad_lanes(host):
    typed, _, params = make_case(VECTOR, numpy.float64)
    with pytest.raises(_validation.ArgumentError, match="lanes must be a power of two from 1 "
                                                        "to 32, got 3"):
        run_nhwc(host, typed, params, lanes=3)

    class Device:
        name = "cupy"

    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    cap = _conv_nhwc.CUDA_LANES
    assert _kernels.lanes_for(host, geo.C // geo.offset_groups, cap) == 1
    assert _kernels.lanes_for(Device, geo.C // geo.offset_groups, cap) == 8  # 8 per group
    assert _kernels.lanes_for(Device, 80, cap) == 32


# ---------------------------------------------------------------- bridges

def _spy(function, calls):
    def spy(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)
    return spy


class _LaunchSpy:
    """A backend recording each launch's arguments."""

    def __init__(self, backend):
        self.backend, self.launches = backend, []
        self.name, self.xp, self.grid = backend.name, backend.xp, backend.grid

    def launch(self, file, kernel, dtype, bits, n, args, **options):
        self.launches.append((kernel, args))
        return self.backend.launch(file, kernel, dtype, bits, n, args, **options)

    def pointers(self, kernel, position):
        return {args[position].ctypes.data for k, args in self.launches if k == kernel}


def test_torch_channels_last_runs_without_a_copy(host, monkeypatch):
    """A torch channels_last tensor reaches the kernels as its own memory;
    the result and the input gradient are channels_last; fake tensors get the
    same strides as the real op."""
    torch = pytest.importorskip("torch")
    import cupydcn.torch as dcn
    from torch._subclasses.fake_tensor import FakeTensorMode

    spy = _LaunchSpy(host)
    monkeypatch.setattr(_dispatch, "_host", spy)
    previous = cupydcn.set_cpu_backend("host")
    try:
        typed, exact, params = make_case(VECTOR, numpy.float32)
        x = torch.from_numpy(typed["input"]).to(memory_format=torch.channels_last)
        x.requires_grad_()
        offset, weight, mask = (torch.from_numpy(typed[k]) for k in ("offset", "weight", "mask"))
        y = dcn.deform_conv2d(x, offset, weight, None, params["stride"], params["padding"],
                              params["dilation"], mask, algorithm="im2col_nhwc")
        assert spy.pointers("deform_im2col_nhwc", 0) == {x.data_ptr()}
        assert y.is_contiguous(memory_format=torch.channels_last)
        y.backward(torch.from_numpy(typed["grad_output"]))
        assert spy.pointers("deform_col2im_nhwc", 1) == {x.data_ptr()}
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
        ref_out, ref_grads = reference_results({**exact, "bias": None}, params)
        assert rel_err(y.detach().numpy(), ref_out) <= 1e-5
        assert rel_err(x.grad.numpy(), ref_grads.input) <= 1e-5
        plain = [t.detach() for t in (x, offset, weight, mask)]
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) for t in plain]
            fy = torch.ops.cupydcn.deform_conv2d(fake[0], fake[1], fake[2], None,
                                                 list(params["stride"]), list(params["padding"]),
                                                 list(params["dilation"]), fake[3],
                                                 "im2col_nhwc")
        assert fy.stride() == y.stride()
    finally:
        cupydcn.set_cpu_backend(previous)


@pytest.mark.parametrize("algorithm", (None, "im2col_nhwc"))
@pytest.mark.parametrize("batch", (0, 3))
@pytest.mark.parametrize("fmt", ("channels_last", "contiguous"))
def test_torch_fake_strides_are_the_real_ones(fmt, batch, algorithm):
    """The fake implementations (torch.compile's tracing) give each result the
    strides the real op gives it, forward and backward, batch 0 included."""
    torch = pytest.importorskip("torch")
    import cupydcn.torch  # noqa: F401  (registers the ops)
    from torch._subclasses.fake_tensor import FakeTensorMode

    typed, _, params = make_case((batch, *VECTOR[1:]), numpy.float32)
    memory_format = getattr(torch, fmt + "_format" if fmt == "contiguous" else fmt)
    x, offset, mask, grad = (torch.from_numpy(typed[k]).contiguous(memory_format=memory_format)
                             for k in ("input", "offset", "mask", "grad_output"))
    weight = torch.from_numpy(typed["weight"])
    pairs = [list(params[k]) for k in ("stride", "padding", "dilation")]
    wrt = [True, True, True, False, True]

    def run(x, offset, weight, mask, grad):
        y = torch.ops.cupydcn.deform_conv2d(x, offset, weight, None, *pairs, mask, algorithm)
        grads = torch.ops.cupydcn.deform_conv2d_backward(grad, x, offset, weight, None, *pairs,
                                                         mask, wrt, algorithm)
        return [t.stride() for t in (y, *grads)]

    real = run(x, offset, weight, mask, grad)
    with FakeTensorMode() as mode:
        fake = run(*(mode.from_tensor(t) for t in (x, offset, weight, mask, grad)))
    assert fake == real
    assert (real[0][1] == 1) == (fmt == "channels_last")


def test_tensorflow_nhwc_runs_without_a_transpose(host, monkeypatch):
    """NHWC tensors reach the kernels as their own memory (no tf.transpose),
    and the result comes back NHWC with the reference's numbers."""
    tf = pytest.importorskip("tensorflow")
    import cupydcn.tensorflow as dcn

    spy = _LaunchSpy(host)
    monkeypatch.setattr(_dispatch, "_host", spy)

    def no_transpose(*args, **kwargs):
        raise AssertionError("tf.transpose called")

    monkeypatch.setattr(tf, "transpose", no_transpose)
    previous = cupydcn.set_cpu_backend("host")
    try:
        typed, exact, params = make_case(VECTOR, numpy.float32)
        nhwc = {k: tf.constant(numpy.ascontiguousarray(typed[k].transpose(0, 2, 3, 1)))
                for k in ("input", "offset", "mask", "grad_output")}
        weight, bias = tf.constant(typed["weight"]), tf.constant(typed["bias"])
        with tf.GradientTape() as tape:
            tape.watch([nhwc["input"], nhwc["offset"]])
            y = dcn.deform_conv2d(nhwc["input"], nhwc["offset"], weight, bias, **params,
                                  mask=nhwc["mask"], algorithm="im2col_nhwc")
        grads = tape.gradient(y, [nhwc["input"], nhwc["offset"]],
                              output_gradients=nhwc["grad_output"])
        assert spy.pointers("deform_im2col_nhwc", 0) >= {
            numpy.from_dlpack(nhwc["input"]).ctypes.data}
        ref_out, ref_grads = reference_results(exact, params)
        assert y.shape == ref_out.transpose(0, 2, 3, 1).shape
        assert rel_err(y.numpy(), ref_out.transpose(0, 2, 3, 1)) <= 1e-5
        assert rel_err(grads[0].numpy(), ref_grads.input.transpose(0, 2, 3, 1)) <= 1e-5
        assert rel_err(grads[1].numpy(), ref_grads.offset.transpose(0, 2, 3, 1)) <= 1e-5
    finally:
        cupydcn.set_cpu_backend(previous)


# ---------------------------------------------------------------- mutations

MUTATIONS = {
    "vector element": ("weights[corner] * dcn_load(v.v[e])", "weights[corner] * dcn_load(v.v[0])"),
    "corner pixel stride": ("image + (yy * W + xx) * C)", "image + (yy * W + xx) * (C - 1))"),
    "columns without groups": ("gw * taps * Cg + k * Cg + cl", "k * C + gw * Cg + cl"),
    "offset channel stride": ("dcn_conv_position(offset + b * osb + g * 2 * taps * osc + p * osp, "
                              "osc, k, i, j, oy, ox,\n                      stride_h",
                              "dcn_conv_position(offset + b * osb + g * 2 * taps * osc + p * osp, "
                              "osp, k, i, j, oy, ox,\n                      stride_h"),
    "scatter corner weight": ("(corner00 + (W + 1) * C + c), w11 * gm)",
                              "(corner00 + (W + 1) * C + c), w10 * gm)"),
    "reduction step removed": ("for (I s = lanes / 2; s > 0; s /= 2)",
                               "for (I s = lanes / 2; s > 1; s /= 2)"),
    "partial warp": ("const I threads = ((items * lanes + 31) / 32) * 32;",
                     "const I threads = items * lanes;"),
    "channel stride": ("cg += lanes)", "cg += 2 * lanes)"),
    "mask on the mask gradient": ("dcn_store<T>(sum_mask);", "dcn_store<T>(sum_mask * m);"),
    "grad offset stride": ("go[(2 * k + 1) * gosc]", "go[(2 * k + 1) * gosp]"),
}


# 40 channels per offset group (5 rounds of 8 lanes), 20 per weight group
# (16-byte vectors of 2 doubles), 3x3 taps on 3x3 output pixels: 81 items of 8
# lanes, which do not fill whole warps. Every mutation stays inside the buffers.
MUTATED = (1, 40, 5, 6, 6, 3, 3, 2, 1, (1, 2), (1, 1), (2, 1), True, False)


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_wrong_nhwc_kernel_fails(host, mutation):
    """Each plausible bug fails: the host checks report it, or a result is off."""
    old, new = MUTATIONS[mutation]
    text = _kernels.source("deform_conv_nhwc")
    assert text.count(old) == 1, old
    broken = _kernels.HostBackend(grid=host.grid, block=host.block, checks=True, workers=1,
                                  seed=host.seed,
                                  sources={"deform_conv_nhwc": text.replace(old, new)})
    typed, exact, params = make_case(MUTATED, numpy.float64)
    typed = formatted(typed, FORMATS["mixed"])
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          mask=typed["mask"], **params)
    assert geo.Ho * geo.Wo * geo.kh * geo.kw * 8 % 32
    assert _conv_nhwc.vector_width(numpy, geo, _aligned(64, numpy.float64),
                                   _aligned(64, numpy.float64)) == 2
    ref_out, ref_grads = reference_results(exact, params)
    try:
        out, grads = run_nhwc(broken, typed, params, lanes=8)
    except RuntimeError as error:  # a host check (e.g. a shuffle naming an exited lane)
        assert "nhwc" in str(error)
    else:
        worst = max([rel_err(out, ref_out)] + [rel_err(getattr(grads, n), getattr(ref_grads, n))
                                               for n in ("input", "offset", "mask", "weight")])
        assert worst > 1e-3, mutation


# ---------------------------------------------------------------- registers

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_no_register_spills(arch, tmp_path):
    """nvcc --resource-usage: every instantiation of both kernels with 0
    bytes of spill stores and loads (the table is in benchmarks/NOTES.md)."""
    expressions = _kernels.all_expressions("deform_conv_nhwc")
    src = tmp_path / "nhwc.cu"
    src.write_text(_kernels.source("deform_conv_nhwc") + "\nvoid* dcn_instances[] = {"
                   + ", ".join(f"(void*)&{e}" for e in expressions) + "};\n")
    result = subprocess.run(["nvcc", "-std=c++17", "-cubin", f"-arch={arch}", "--resource-usage",
                             "-o", str(tmp_path / "nhwc.cubin"), str(src)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert len(spills) == len(expressions), result.stderr
    assert all(s == ("0", "0") for s in spills), result.stderr
