"""deform_conv2d and its backward: the kernels against the float64 reference.

CPU tier: the kernel source compiled for the host (``host`` fixture) runs the
whole op (tiling, GEMMs, every kernel) on NumPy arrays, for every dtype.
GPU tier (marker ``gpu``): the same comparisons through the public API on CuPy
arrays over a randomized sweep. Every buffer a kernel must fill starts as NaN.
"""

import numpy
import pytest

import cupydcn
from cupydcn import _deform_conv, _dtypes, _kernels, _validation, reference
from helpers import DTYPES, assert_close, dtype_name, rel_err, rounded, to_numpy

# (B, C, H, W, Cout, kh, kw, groups, offset_groups, stride, padding, dilation, mask, bias)
CASES = [
    (1, 4, 7, 9, 6, 3, 3, 1, 1, (1, 1), (1, 1), (1, 1), True, True),
    (3, 6, 8, 5, 4, 3, 2, 2, 3, (2, 1), (0, 2), (2, 1), True, False),
    (2, 4, 9, 11, 8, 1, 1, 4, 2, (1, 2), (0, 0), (1, 1), False, True),
    (2, 3, 6, 7, 5, 2, 3, 1, 3, (2, 2), (1, 0), (2, 2), False, False),
    (33, 2, 5, 4, 2, 3, 3, 2, 2, (1, 1), (1, 1), (1, 1), True, True),
]


def case_id(case):
    B, C, H, W, Cout, kh, kw, g, dg, s, p, d, m, b = case
    return (f"B{B}C{C}x{H}x{W}-O{Cout}-k{kh}{kw}-g{g}dg{dg}-s{s[0]}{s[1]}p{p[0]}{p[1]}"
            f"d{d[0]}{d[1]}{'-mask' if m else ''}{'-bias' if b else ''}")


def make_case(case, dtype, seed=0):
    """Random inputs (rounded to ``dtype``) and the geometry of one case."""
    B, C, H, W, Cout, kh, kw, groups, dg, stride, padding, dilation, with_mask, with_bias = case
    rng = numpy.random.default_rng(seed)
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    arrays = {
        "input": rng.standard_normal((B, C, H, W)),
        "offset": rng.uniform(-2.5, 2.5, (B, 2 * dg * kh * kw, Ho, Wo)),
        "weight": rng.standard_normal((Cout, C // groups, kh, kw)) / numpy.sqrt(C // groups * kh * kw),
        "bias": rng.standard_normal(Cout) if with_bias else None,
        "mask": rng.uniform(0, 1, (B, dg * kh * kw, Ho, Wo)) if with_mask else None,
        "grad_output": rng.standard_normal((B, Cout, Ho, Wo)),
    }
    typed = {k: None if v is None else v.astype(dtype) for k, v in arrays.items()}
    exact = {k: None if v is None else rounded(v, dtype) for k, v in arrays.items()}
    params = {"stride": stride, "padding": padding, "dilation": dilation}
    return typed, exact, params


def reference_results(exact, params):
    out = reference.deform_conv2d(exact["input"], exact["offset"], exact["weight"], exact["bias"],
                                  mask=exact["mask"], **params)
    grads = reference.deform_conv2d_backward(exact["grad_output"], exact["input"], exact["offset"],
                                             exact["weight"], exact["bias"], mask=exact["mask"],
                                             **params)
    return out, _deform_conv.DeformConv2dGrads(*grads)


def run_kernels(backend, typed, params, wrt=_deform_conv.GRADIENTS):
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          typed["bias"], mask=typed["mask"], **params)
    out = _deform_conv.forward(backend, geo, typed["input"], typed["offset"], typed["weight"],
                               typed["bias"], typed["mask"])
    wrt = _validation.check_wrt(wrt, _deform_conv.GRADIENTS, bias=typed["bias"],
                                     mask=typed["mask"])
    grads = _deform_conv.backward(backend, geo, typed["grad_output"], typed["input"],
                                  typed["offset"], typed["weight"], typed["mask"], wrt)
    return out, grads


def compare_all(out, grads, ref_out, ref_grads, dtype, record=None):
    assert out.dtype == numpy.dtype(dtype)
    errors = {"forward": assert_close(out, ref_out, dtype, "forward")}
    for name in _deform_conv.GRADIENTS:
        expected = getattr(ref_grads, name)
        got = getattr(grads, name)
        if expected is None:
            assert got is None, name
            continue
        assert got.dtype == numpy.dtype(dtype), name
        errors[f"grad_{name}"] = assert_close(got, expected, dtype, f"grad_{name}")
    if record is not None:
        for op, err in errors.items():
            record(dtype_name(dtype), f"deform_conv2d {op}", err)
    return errors


# ---------------------------------------------------------------- CPU tier

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_host_kernels_match_reference(host, case, dtype):
    typed, exact, params = make_case(case, dtype)
    ref_out, ref_grads = reference_results(exact, params)
    out, grads = run_kernels(host, typed, params)
    compare_all(out, grads, ref_out, ref_grads, dtype)


@pytest.mark.parametrize("limit", [1, 700, 5000])
def test_host_kernels_tiled_by_workspace(host, limit):
    """Rows of one image, one image, several images per chunk: same numbers."""
    case = CASES[1]
    typed, exact, params = make_case(case, numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    previous = cupydcn.set_workspace_limit(limit)
    try:
        geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                              mask=typed["mask"], **params)
        plan = _deform_conv.tiles(geo)
        out, grads = run_kernels(host, typed, params)
    finally:
        cupydcn.set_workspace_limit(previous)
    assert len(plan) > 1
    for tile in plan:
        assert geo.C * geo.kh * geo.kw * tile.out_rows * geo.Wo * 8 <= max(limit, geo.C * 9 * geo.Wo * 8)
    compare_all(out, grads, ref_out, ref_grads, numpy.float64)


def test_host_kernels_64bit_indices(host, monkeypatch):
    """The long long instantiations compute the same numbers."""
    monkeypatch.setattr(_dtypes, "INT32_LIMIT", 0)
    assert _dtypes.index_bits(1) == 64
    typed, exact, params = make_case(CASES[1], numpy.float32)
    ref_out, ref_grads = reference_results(exact, params)
    out, grads = run_kernels(host, typed, params)
    compare_all(out, grads, ref_out, ref_grads, numpy.float32)


@pytest.mark.parametrize("wrt", [("input",), ("offset",), ("mask",), ("weight", "bias"),
                                 ("offset", "mask")])
def test_host_backward_computes_only_what_is_asked(host, wrt):
    typed, exact, params = make_case(CASES[0], numpy.float64)
    _, ref_grads = reference_results(exact, params)
    _, grads = run_kernels(host, typed, params, wrt=wrt)
    for name in _deform_conv.GRADIENTS:
        got = getattr(grads, name)
        if name in wrt:
            assert_close(got, getattr(ref_grads, name), numpy.float64, name)
        else:
            assert got is None, name


def test_host_kernels_odd_grid(host):
    """A grid of one thread and a large grid compute the same as the default."""
    typed, exact, params = make_case(CASES[0], numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    for grid, block in ((1, 1), (7, 64)):
        out, grads = run_kernels(_kernels.HostBackend(grid=grid, block=block), typed, params)
        compare_all(out, grads, ref_out, ref_grads, numpy.float64)


@pytest.mark.parametrize("per_thread", [1, 2, 3])
def test_im2col_channel_chunks(host, monkeypatch, per_thread):
    """deform_im2col with any number of channels per thread (1 on CUDA, a
    whole offset group on the host; 2 and 3 leave partial chunks of 5 and 4
    channels per group): the same columns, bit for bit, as the host's whole
    groups, and the reference's forward. Offset groups 1 and 2, groups 1."""
    for case in ((2, 5, 6, 7, 4, 3, 3, 1, 1, (1, 1), (1, 1), (1, 1), True, True),
                 (1, 8, 5, 6, 3, 2, 3, 1, 2, (2, 1), (1, 0), (1, 2), True, False)):
        typed, exact, params = make_case(case, numpy.float32)
        ref_out, _ = reference_results(exact, params)
        whole, _ = run_kernels(host, typed, params, wrt=())
        monkeypatch.setattr(_deform_conv, "im2col_channels_per_thread",
                            lambda backend, geo: per_thread)
        out, _ = run_kernels(host, typed, params, wrt=())
        monkeypatch.undo()
        numpy.testing.assert_array_equal(out, whole)
        assert_close(out, ref_out, numpy.float32, f"per_thread {per_thread}")


def test_a_wrong_kernel_fails(host):
    """The CPU tier catches a kernel bug: swap one bilinear weight."""
    text = _kernels.source("deform_conv")
    wrong = text.replace("hy * f.lx * v1", "hy * hx * v1", 1)
    assert wrong != text
    typed, exact, params = make_case(CASES[0], numpy.float64)
    ref_out, _ = reference_results(exact, params)
    broken = _kernels.HostBackend(sources={"deform_conv": wrong})
    out, _ = run_kernels(broken, typed, params)
    assert rel_err(out, ref_out) > 1e-3


def test_identity_zero_offset_is_conv2d(host):
    """Zero offsets and a mask of ones give the plain convolution (docs/semantics.md §2.7)."""
    typed, exact, params = make_case(CASES[3], numpy.float64)
    typed["offset"] = numpy.zeros_like(typed["offset"])
    typed["mask"] = None
    out, _ = run_kernels(host, typed, params)
    x, w = typed["input"], typed["weight"]
    (sh, sw), (ph, pw), (dh, dw) = params["stride"], params["padding"], params["dilation"]
    padded = numpy.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    B, C, H, W = x.shape
    Cout, Cg, kh, kw = w.shape
    groups = C // Cg
    Ho, Wo = out.shape[2:]
    expected = numpy.zeros_like(out)
    for g in range(groups):
        og = slice(g * Cout // groups, (g + 1) * Cout // groups)
        for i in range(kh):
            for j in range(kw):
                patch = padded[:, g * Cg:(g + 1) * Cg, i * dh:i * dh + sh * (Ho - 1) + 1:sh,
                               j * dw:j * dw + sw * (Wo - 1) + 1:sw]
                expected[:, og] += numpy.einsum("bchw,oc->bohw", patch, w[og, :, i, j])
    assert_close(out, expected, numpy.float64, "zero offset")


# ---------------------------------------------------------------- public API (CPU)

def test_numpy_inputs_run_the_reference_and_keep_dtype():
    typed, exact, params = make_case(CASES[0], numpy.float32)
    out = cupydcn.deform_conv2d(typed["input"], typed["offset"], typed["weight"], typed["bias"],
                                mask=typed["mask"], **params)
    assert isinstance(out, numpy.ndarray) and out.dtype == numpy.float32
    ref_out, ref_grads = reference_results(exact, params)
    assert_close(out, ref_out, numpy.float32)
    grads = cupydcn.deform_conv2d_backward(typed["grad_output"], typed["input"], typed["offset"],
                                           typed["weight"], typed["bias"], mask=typed["mask"],
                                           wrt=("input", "mask"), **params)
    assert isinstance(grads, cupydcn.DeformConv2dGrads)
    assert grads.offset is None and grads.weight is None and grads.bias is None
    assert grads.input.dtype == numpy.float32
    assert_close(grads.input, ref_grads.input, numpy.float32)
    assert_close(grads.mask, ref_grads.mask, numpy.float32)


def test_int_and_pair_parameters_agree():
    typed, _, _ = make_case(CASES[0], numpy.float64)
    a = cupydcn.deform_conv2d(typed["input"], typed["offset"], typed["weight"], padding=1)
    b = cupydcn.deform_conv2d(typed["input"], typed["offset"], typed["weight"], stride=(1, 1),
                              padding=(1, 1), dilation=[1, 1])
    numpy.testing.assert_array_equal(a, b)


def test_non_contiguous_inputs(host):
    typed, exact, params = make_case(CASES[1], numpy.float64)
    ref_out, ref_grads = reference_results(exact, params)
    strided = {k: None if v is None else numpy.asfortranarray(v) for k, v in typed.items()}
    assert not strided["input"].flags.c_contiguous
    out, grads = run_kernels(host, strided, params)
    compare_all(out, grads, ref_out, ref_grads, numpy.float64)
    out = cupydcn.deform_conv2d(strided["input"], strided["offset"], strided["weight"],
                                mask=strided["mask"], **params)
    assert_close(out, ref_out, numpy.float64)


@pytest.mark.parametrize("empty", ["batch", "cout"])
def test_empty_results(host, empty):
    case = list(CASES[0])
    case[0 if empty == "batch" else 4] = 0
    typed, _, params = make_case(tuple(case), numpy.float32)
    out, grads = run_kernels(host, typed, params)
    assert out.shape == (case[0], case[4], 7, 9)
    assert grads.input.shape == typed["input"].shape and not numpy.any(grads.input)
    assert grads.offset.shape == typed["offset"].shape and not numpy.any(grads.offset)
    out = cupydcn.deform_conv2d(typed["input"], typed["offset"], typed["weight"], typed["bias"],
                                mask=typed["mask"], **params)
    assert out.shape == (case[0], case[4], 7, 9)


class _DLPackOnly:
    """A foreign CPU array exposing only the DLPack protocol."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def from_dlpack(x):  # this module acts as _DLPackOnly's library
    return _DLPackOnly(numpy.from_dlpack(x))


def test_foreign_dlpack_arrays_come_back_in_their_library():
    typed, exact, params = make_case(CASES[0], numpy.float64)
    wrapped = {k: None if v is None else _DLPackOnly(v) for k, v in typed.items()}
    out = cupydcn.deform_conv2d(wrapped["input"], wrapped["offset"], wrapped["weight"],
                                wrapped["bias"], mask=wrapped["mask"], **params)
    assert isinstance(out, _DLPackOnly)
    ref_out, _ = reference_results(exact, params)
    assert_close(numpy.from_dlpack(out), ref_out, numpy.float64)


# ---------------------------------------------------------------- validation

def _valid():
    typed, _, _ = make_case(CASES[0], numpy.float32)
    return typed


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(input=a["input"][0]), ValueError,
     r"input must be 4-D \(B, C, H, W\), got shape \(4, 7, 9\)"),
    (lambda a: a.update(weight=a["weight"][0]), ValueError, r"weight must be 4-D"),
    (lambda a: a.update(offset=a["offset"][:, :16]), ValueError,
     r"offset.shape\[1\] must be a positive multiple of 2\*kh\*kw = 18, got 16"),
    (lambda a: a.update(offset=numpy.concatenate([a["offset"]] * 2)), ValueError,
     r"offset.shape\[0\] must be B = 1, got 2"),
    (lambda a: a.update(offset=a["offset"][:, :, :5]), ValueError,
     r"offset.shape\[2:\] must be \(Ho, Wo\) = \(7, 9\), got \(5, 9\)"),
    (lambda a: a.update(offset=numpy.concatenate([a["offset"]] * 3, axis=1)), ValueError,
     r"input.shape\[1\] \(C = 4\) must be divisible by offset_groups = 3"),
    (lambda a: a.update(mask=a["mask"][:, :4]), ValueError,
     r"mask.shape must be \(B, offset_groups\*kh\*kw, Ho, Wo\) = \(1, 9, 7, 9\), got \(1, 4, 7, 9\)"),
    (lambda a: a.update(weight=a["weight"][:, :3]), ValueError,
     r"input.shape\[1\] \(C = 4\) must be a positive number divisible by weight.shape\[1\] "
     r"\(C/groups = 3\)"),
    (lambda a: a.update(input=a["input"][:, :0], weight=a["weight"][:, :1]), ValueError,
     r"input.shape\[1\] \(C = 0\) must be a positive number divisible by weight.shape\[1\] "
     r"\(C/groups = 1\)"),
    (lambda a: a.update(weight=a["weight"][:5, :2]), ValueError,
     r"weight.shape\[0\] \(Cout = 5\) must be divisible by groups = 2"),
    (lambda a: a.update(bias=a["bias"][:3]), ValueError, r"bias.shape must be \(Cout,\) = \(6,\), got \(3,\)"),
    (lambda a: a.update(offset=a["offset"].astype(numpy.float64)), TypeError,
     r"offset.dtype must match input.dtype = float32, got float64"),
    (lambda a: a.update(input=a["input"].astype(numpy.int32)), TypeError,
     r"input.dtype must be one of float32, float64, float16, bfloat16.*, got int32"),
    (lambda a: a.update(stride=0), ValueError, r"stride must be >= 1, got 0"),
    (lambda a: a.update(dilation=(1, 0)), ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    (lambda a: a.update(padding=-1), ValueError, r"padding must be >= 0, got -1"),
    (lambda a: a.update(stride=1.5), TypeError, r"stride must be an int or a pair of ints, got 1.5"),
    (lambda a: a.update(padding=(1, 1, 1)), TypeError, r"padding must be an int or a pair of ints"),
    (lambda a: a.update(input=[[1.0]]), TypeError, r"input must be a NumPy, CuPy or DLPack-capable array"),
    (lambda a: a.update(padding=0, input=a["input"][:, :, :1, :1]), ValueError,
     r"the dilated kernel \(3, 3\) is larger than the padded input \(1, 1\)"),
])
def test_validation_errors(change, error, message):
    args = _valid()
    args.setdefault("padding", 1)
    change(args)
    kwargs = {k: args[k] for k in ("stride", "padding", "dilation") if k in args}
    with pytest.raises(error, match=message):
        cupydcn.deform_conv2d(args["input"], args["offset"], args["weight"], args["bias"],
                              mask=args["mask"], **kwargs)


def test_validation_grad_output_and_wrt():
    args = _valid()
    with pytest.raises(ValueError, match=r"grad_output.shape must be \(B, Cout, Ho, Wo\) = \(1, 6, 7, 9\)"):
        cupydcn.deform_conv2d_backward(args["grad_output"][:, :2], args["input"], args["offset"],
                                       args["weight"], padding=1)
    with pytest.raises(ValueError, match=r"wrt must name gradients among"):
        cupydcn.deform_conv2d_backward(args["grad_output"], args["input"], args["offset"],
                                       args["weight"], padding=1, wrt=("offsets",))


def test_validation_error_then_valid_call_works():
    args = _valid()
    with pytest.raises(ValueError):
        cupydcn.deform_conv2d(args["input"], args["offset"][:, :2], args["weight"], padding=1)
    out = cupydcn.deform_conv2d(args["input"], args["offset"], args["weight"], padding=1)
    assert numpy.all(numpy.isfinite(out))


def test_workspace_limit_setting():
    previous = cupydcn.set_workspace_limit(1234)
    try:
        assert cupydcn.get_workspace_limit() == 1234
        with pytest.raises(ValueError, match="workspace limit must be >= 1 byte, got 0"):
            cupydcn.set_workspace_limit(0)
    finally:
        cupydcn.set_workspace_limit(previous)
    assert cupydcn.get_workspace_limit() == previous


# ---------------------------------------------------------------- GPU tier

def _sweep(count, seed):
    """Random cases: per-axis stride/padding/dilation, non-square kernels,
    groups with offset groups, with and without mask and bias, odd sizes."""
    rng = numpy.random.default_rng(seed)
    cases = []
    for index in range(count):
        B = [1, 3, 33][index % 3]
        groups = int(rng.choice([1, 2]))
        dg = int(rng.choice([1, 2, 4]))
        C = int(numpy.lcm(groups, dg) * rng.integers(1, 3))
        Cout = groups * int(rng.integers(1, 4))
        kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        stride = tuple(int(s) for s in rng.integers(1, 3, 2))
        padding = tuple(int(p) for p in rng.integers(0, 3, 2))
        dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
        H = int(rng.integers(dilation[0] * (kh - 1) + 1, 14)) + (1 - B // 33) * 5
        W = int(rng.integers(dilation[1] * (kw - 1) + 1, 14))
        cases.append((B, C, H, W, Cout, kh, kw, groups, dg, stride, padding, dilation,
                      bool(rng.integers(0, 2)), bool(rng.integers(0, 2))))
    return cases


GPU_CASES = CASES + _sweep(12, seed=2024)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_matches_reference(gpu, case, dtype, record_error):
    import cupy

    typed, exact, params = make_case(case, dtype, seed=len(case_id(case)))
    ref_out, ref_grads = reference_results(exact, params)
    on_gpu = {k: None if v is None else cupy.asarray(v) for k, v in typed.items()}
    out = cupydcn.deform_conv2d(on_gpu["input"], on_gpu["offset"], on_gpu["weight"],
                                on_gpu["bias"], mask=on_gpu["mask"], **params)
    grads = cupydcn.deform_conv2d_backward(on_gpu["grad_output"], on_gpu["input"],
                                           on_gpu["offset"], on_gpu["weight"], on_gpu["bias"],
                                           mask=on_gpu["mask"], **params)
    assert isinstance(out, cupy.ndarray)
    compare_all(out, grads, ref_out, ref_grads, dtype, record=record_error)


@pytest.mark.gpu
def test_gpu_row_tiles_and_64bit_indices(gpu, monkeypatch, record_error):
    import cupy

    typed, exact, params = make_case(CASES[1], numpy.float32)
    ref_out, ref_grads = reference_results(exact, params)
    monkeypatch.setattr(_dtypes, "INT32_LIMIT", 0)
    previous = cupydcn.set_workspace_limit(1)
    try:
        on_gpu = {k: None if v is None else cupy.asarray(v) for k, v in typed.items()}
        out, grads = run_kernels(gpu, on_gpu, params)
    finally:
        cupydcn.set_workspace_limit(previous)
    compare_all(out, grads, ref_out, ref_grads, numpy.float32, record=record_error)


@pytest.mark.gpu
def test_gpu_non_contiguous_and_stream(gpu):
    import cupy

    typed, exact, params = make_case(CASES[0], numpy.float32)
    ref_out, _ = reference_results(exact, params)
    on_gpu = {k: None if v is None else cupy.asfortranarray(cupy.asarray(v))
              for k, v in typed.items()}
    # The inputs were written on the null stream, which a non-blocking stream does not
    # wait for: order them explicitly, as a caller handing arrays between streams must.
    ready = cupy.cuda.Event()
    ready.record()
    stream = cupy.cuda.Stream(non_blocking=True)
    stream.wait_event(ready)
    with stream:
        out = cupydcn.deform_conv2d(on_gpu["input"], on_gpu["offset"], on_gpu["weight"],
                                    on_gpu["bias"], mask=on_gpu["mask"], **params)
    stream.synchronize()
    assert_close(out, ref_out, numpy.float32)


@pytest.mark.gpu
def test_gpu_empty_batch_launches_nothing(gpu):
    import cupy

    case = list(CASES[0])
    case[0] = 0
    typed, _, params = make_case(tuple(case), numpy.float32)
    on_gpu = {k: None if v is None else cupy.asarray(v) for k, v in typed.items()}
    out = cupydcn.deform_conv2d(on_gpu["input"], on_gpu["offset"], on_gpu["weight"],
                                mask=on_gpu["mask"], **params)
    assert out.shape == (0, 6, 7, 9)


@pytest.mark.gpu
def test_gpu_mixed_devices_rejected(gpu):
    import cupy

    typed = _valid()
    with pytest.raises(ValueError, match=r"offset is on the CPU but input is on cuda:0"):
        cupydcn.deform_conv2d(cupy.asarray(typed["input"]), typed["offset"],
                              cupy.asarray(typed["weight"]), padding=1)


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=case_id)
def test_host_deterministic_backward_matches_reference(host, case, dtype):
    typed, exact, params = make_case(case, dtype)
    _, ref_grads = reference_results(exact, params)
    geo = _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                          typed["bias"], mask=typed["mask"], **params)
    grads = _deform_conv.backward(host, geo, typed["grad_output"], typed["input"],
                                  typed["offset"], typed["weight"], typed["mask"],
                                  frozenset({"input"}), deterministic=True)
    assert_close(grads.input, ref_grads.input, dtype, "deterministic grad_input")


def test_host_deterministic_backward_row_tiles(host):
    typed, exact, params = make_case(CASES[1], numpy.float64)
    _, ref_grads = reference_results(exact, params)
    previous = cupydcn.set_workspace_limit(1)
    try:
        grads = cupydcn.deform_conv2d_backward(
            typed["grad_output"], typed["input"], typed["offset"], typed["weight"],
            mask=typed["mask"], wrt=("input",), deterministic=True, **params)
    finally:
        cupydcn.set_workspace_limit(previous)
    assert_close(grads.input, ref_grads.input, numpy.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_gpu_deterministic_backward_is_bit_identical(gpu, dtype, record_error):
    import cupy

    # many samples land on the same pixels: atomics would reorder their sums
    case = (4, 32, 24, 24, 32, 3, 3, 1, 1, (1, 1), (1, 1), (1, 1), True, True)
    typed, exact, params = make_case(case, dtype)
    typed["offset"] = (typed["offset"].astype(numpy.float64) * 0.2).astype(dtype)
    exact["offset"] = rounded(typed["offset"], dtype)
    _, ref_grads = reference_results(exact, params)
    on_gpu = {k: None if v is None else cupy.asarray(v) for k, v in typed.items()}
    runs = [cupydcn.deform_conv2d_backward(on_gpu["grad_output"], on_gpu["input"],
                                           on_gpu["offset"], on_gpu["weight"], on_gpu["bias"],
                                           mask=on_gpu["mask"], deterministic=True, **params)
            for _ in range(3)]
    for name in _deform_conv.GRADIENTS:
        first = to_numpy(getattr(runs[0], name))
        for other in runs[1:]:
            numpy.testing.assert_array_equal(to_numpy(getattr(other, name)), first, err_msg=name)
        record_error(dtype_name(dtype), f"deform_conv2d deterministic grad_{name}",
                     assert_close(first, getattr(ref_grads, name), dtype, name))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_torch_cpu_tensors_through_the_core_api(dtype_name):
    """A CPU tensor of another library goes in without a copy and comes back in
    its library, bfloat16 included (NumPy's DLPack has no bfloat16)."""
    torch = pytest.importorskip("torch", reason="the foreign-library case uses torch's CPU build")
    from cupydcn import _arrays

    dtype = getattr(torch, dtype_name)
    typed, exact, params = make_case(CASES[0], numpy.float32)
    tensors = {k: None if v is None else torch.from_numpy(v).to(dtype) for k, v in typed.items()}
    call = _arrays.Call(input=tensors["input"])
    assert call.input.ctypes.data == tensors["input"].data_ptr()
    assert call.input.dtype.name == dtype_name
    out = cupydcn.deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"],
                                tensors["bias"], mask=tensors["mask"], **params)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype
    exact = {k: None if v is None else v.to(torch.float64).numpy() for k, v in tensors.items()}
    ref_out, _ = reference_results(exact, params)
    assert_close(out.to(torch.float64).numpy(), ref_out, _dtypes.lookup(dtype_name).dtype)
