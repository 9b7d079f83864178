"""cupydcn.jax: the JAX bridge against the core and the float64 reference.

CPU tier: JAX CPU arrays run the core's CPU path inside XLA buffer callbacks,
so every result and gradient must equal what the core returns for the same
NumPy arrays, bit for bit (the bridge adds no numerics), and be within the
dtype table's tolerance of the float64 reference; eagerly, under ``jit``,
``grad`` (``jax.vjp``) and ``vmap``. float64 runs inside ``jax.enable_x64``
(scoped: no global config leaks to other tests).
GPU tier (marker ``gpu``): the same on a CUDA device, and that the core reads
JAX's own buffers (pointer equality) on XLA's stream under ``jit`` and
writes its results into XLA's output buffers (no copy). ``algorithm=``
selects each implementation through the bridge; a result the core does not
write into its output buffer is copied into place.
"""

import re

import numpy
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install jax)")

import jax.numpy as jnp
from helpers import DTYPES, assert_close, dtype_name, rounded, spy_choices

import cupydcn
import cupydcn.jax as dcn
from cupydcn import _deform_conv, _roi_pool, reference

F64 = numpy.dtype(numpy.float64)
CONV_NAMES = ("input", "offset", "weight", "bias", "mask")
ROI_NAMES = ("input", "offset", "mask")
PSROI_NAMES = ("input", "trans")


def precision(dtype):
    """float64 needs jax_enable_x64, scoped to the caller's ``with`` block."""
    return jax.enable_x64(numpy.dtype(dtype) == F64)


def assert_same(got, expected, what):
    """Bit-equal (as float64, which holds every supported dtype exactly)."""
    got = numpy.asarray(got)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    assert got.dtype == expected.dtype, (what, got.dtype, expected.dtype)
    numpy.testing.assert_array_equal(got.astype(F64), numpy.asarray(expected, F64), err_msg=what)


def run(function, arrays, cotangent, mode):
    """(output, gradients) of ``function(**arrays)`` for the cotangent, by
    ``jax.vjp``, eagerly or under ``jit``; None arrays stay None."""
    present = {k: v for k, v in arrays.items() if v is not None}

    def forward_backward(present, cotangent):
        out, pullback = jax.vjp(lambda p: function(**{**arrays, **p}), present)
        return out, pullback(cotangent)[0]

    if mode == "jit":
        forward_backward = jax.jit(forward_backward)
    out, grads = forward_backward({k: jnp.asarray(v) for k, v in present.items()},
                                  jnp.asarray(cotangent))
    return out, {k: grads.get(k) for k in arrays}


# --------------------------------------------------------------------------
# Deformable convolution
# --------------------------------------------------------------------------

# (B, C, H, W, Cout, kh, kw, groups, offset_groups, stride, padding, dilation, mask, bias)
CONV_CASES = [
    (2, 4, 7, 6, 6, 3, 3, 1, 2, (1, 1), (1, 1), (1, 1), True, True),
    (1, 6, 8, 5, 4, 3, 2, 2, 3, (2, 1), (0, 2), (2, 1), False, False),
    (3, 2, 5, 4, 2, 1, 1, 2, 1, (1, 2), (0, 0), (1, 1), True, False),
    (0, 2, 5, 5, 2, 3, 3, 1, 1, (1, 1), (1, 1), (1, 1), True, True),
]


def conv_id(case):
    return f"B{case[0]}C{case[1]}k{case[5]}{case[6]}g{case[7]}dg{case[8]}"


def conv_case(case, dtype=numpy.float64, seed=0):
    B, C, H, W, Cout, kh, kw, groups, dg, stride, padding, dilation, with_mask, with_bias = case
    rng = numpy.random.default_rng(seed)
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    arrays = {
        "input": rng.standard_normal((B, C, H, W)),
        "offset": rng.uniform(-2.5, 2.5, (B, 2 * dg * kh * kw, Ho, Wo)),
        "weight": rng.standard_normal((Cout, C // groups, kh, kw)),
        "bias": rng.standard_normal(Cout) if with_bias else None,
        "mask": rng.uniform(0, 1, (B, dg * kh * kw, Ho, Wo)) if with_mask else None,
    }
    arrays = {k: None if v is None else v.astype(dtype) for k, v in arrays.items()}
    cotangent = rng.standard_normal((B, Cout, Ho, Wo)).astype(dtype)
    return arrays, cotangent, {"stride": stride, "padding": padding, "dilation": dilation}


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_id)
def test_deform_conv2d(case, dtype, mode):
    arrays, cotangent, params = conv_case(case, dtype)
    with precision(dtype):
        out, grads = run(lambda **a: dcn.deform_conv2d(**a, **params), arrays, cotangent, mode)
    # the core's numbers exactly
    args = [arrays[n] for n in CONV_NAMES[:4]]
    assert_same(out, cupydcn.deform_conv2d(*args, **params, mask=arrays["mask"]), "forward")
    expected = cupydcn.deform_conv2d_backward(cotangent, *args, **params, mask=arrays["mask"])
    for name in CONV_NAMES:
        if arrays[name] is None:
            assert grads[name] is None, name
        else:
            assert_same(grads[name], getattr(expected, name), name)
    # and the float64 reference within the dtype's tolerance
    exact = {k: None if v is None else rounded(v, dtype) for k, v in arrays.items()}
    geometry = (params["stride"], params["padding"], params["dilation"])
    exact_args = [exact[n] for n in CONV_NAMES[:4]]
    assert_close(out, reference.deform_conv2d(*exact_args, *geometry, exact["mask"]), dtype,
                 "forward")
    ref_grads = reference.deform_conv2d_backward(rounded(cotangent, dtype), *exact_args,
                                                 *geometry, exact["mask"])
    for name, ref in zip(CONV_NAMES, ref_grads):
        if arrays[name] is not None and ref.size:
            assert_close(grads[name], ref, dtype, name)


def test_deform_conv2d_float64_gradients_match_finite_differences():
    from jax.test_util import check_grads

    arrays, _, params = conv_case(CONV_CASES[0], seed=3)
    names = [n for n in CONV_NAMES if arrays[n] is not None]
    with jax.enable_x64(True):
        check_grads(lambda *a: dcn.deform_conv2d(**dict(zip(names, a)), **params),
                    [jnp.asarray(arrays[n]) for n in names], order=1, modes=["rev"],
                    atol=1e-6, rtol=1e-6)


def test_grad_of_part_runs_only_that_half_of_the_backward(monkeypatch):
    """The backward is two callbacks (input/offset/mask and weight/bias); under
    jit, XLA drops the one whose gradients are not used."""
    calls = []
    core = _deform_conv.deform_conv2d_backward

    def spy(*args, **kwargs):
        calls.append(tuple(sorted(kwargs["wrt"])))
        return core(*args, **kwargs)

    monkeypatch.setattr(_deform_conv, "deform_conv2d_backward", spy)
    arrays, _, params = conv_case(CONV_CASES[0], numpy.float32)

    def loss(x, w):
        return dcn.deform_conv2d(x, arrays["offset"], w, padding=1).sum()

    jax.jit(jax.grad(loss, argnums=0))(arrays["input"], arrays["weight"]).block_until_ready()
    assert calls == [("input", "offset")]  # no mask given: not asked for
    calls.clear()
    jax.jit(jax.grad(loss, argnums=1))(arrays["input"], arrays["weight"]).block_until_ready()
    assert calls == [("weight",)]  # no bias given


def test_inputs_cross_without_a_copy_under_jit(monkeypatch):
    """The core reads XLA's buffers themselves: NumPy views at the JAX arrays'
    addresses (the GPU tier checks the same for CuPy views)."""
    seen = {}
    core = _deform_conv.deform_conv2d

    def spy(input, offset, weight, *args, **kwargs):
        seen.update(kind=type(input), input=input.ctypes.data, weight=weight.ctypes.data)
        return core(input, offset, weight, *args, **kwargs)

    monkeypatch.setattr(_deform_conv, "deform_conv2d", spy)
    arrays, _, params = conv_case(CONV_CASES[0], numpy.float32)
    x, offset, weight = (jnp.asarray(arrays[n]) for n in ("input", "offset", "weight"))
    jax.jit(lambda x, o, w: dcn.deform_conv2d(x, o, w, padding=1))(x, offset, weight)
    assert seen == {"kind": numpy.ndarray, "input": x.unsafe_buffer_pointer(),
                    "weight": weight.unsafe_buffer_pointer()}


# --------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------


def count_calls(monkeypatch, module, name):
    """Batch sizes of the core calls of ``module.name``."""
    calls = []
    core = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args[1].shape[0] if name.endswith("backward") else args[0].shape[0])
        return core(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def vmapped_conv_arrays(V=3, case=CONV_CASES[0]):
    cases = [conv_case(case, numpy.float32, seed=s) for s in range(V)]
    stacked = {n: numpy.stack([c[0][n] for c in cases]) for n in CONV_NAMES}
    return cases, stacked, cases[0][2]


def fold(a):
    """A vmapped array with its vmapped axis folded into the batch."""
    return a.reshape(-1, *a.shape[2:])


def test_vmap_folds_into_the_batch(monkeypatch):
    """vmap over input, offset and mask with a shared weight: one core call
    with the vmapped axis folded into the batch, forward and backward, nested
    vmap included; the results are that call's (the host-built kernels' GEMM
    may round a batch of 6 differently from three batches of 2)."""
    forward = count_calls(monkeypatch, _deform_conv, "deform_conv2d")
    backward = count_calls(monkeypatch, _deform_conv, "deform_conv2d_backward")
    cases, s, params = vmapped_conv_arrays()
    weight, bias = cases[0][0]["weight"], cases[0][0]["bias"]

    def conv(x, o, m):
        return dcn.deform_conv2d(x, o, weight, bias, mask=m, **params)

    out = jax.jit(jax.vmap(conv))(s["input"], s["offset"], s["mask"])
    assert forward == [3 * 2]
    folded = [fold(s[n]) for n in ("input", "offset", "mask")]
    expected = cupydcn.deform_conv2d(folded[0], folded[1], weight, bias, mask=folded[2],
                                     **params)
    assert_same(numpy.asarray(out), expected.reshape(out.shape), "folded")
    nested = jax.vmap(jax.vmap(conv))(*(s[n].reshape(1, 3, *s[n].shape[1:])
                                        for n in ("input", "offset", "mask")))
    assert forward[1:] == [3 * 2]
    assert_same(nested[0], numpy.asarray(out), "nested")
    grad_input = jax.jit(jax.grad(lambda x: jax.vmap(conv)(x, s["offset"], s["mask"]).sum()))(
        s["input"])
    assert backward == [3 * 2]  # no weight gradient asked for under jit: only the data half
    g = cupydcn.deform_conv2d_backward(numpy.ones(expected.shape, numpy.float32), folded[0],
                                       folded[1], weight, bias, mask=folded[2], **params)
    assert_same(numpy.asarray(grad_input), g.input.reshape(grad_input.shape), "grad")


def test_vmap_runs_per_element_where_it_cannot_fold(monkeypatch):
    """A shared offset, or a vmapped weight: one core call per vmapped element."""
    forward = count_calls(monkeypatch, _deform_conv, "deform_conv2d")
    cases, s, params = vmapped_conv_arrays()
    first = cases[0][0]
    out = jax.vmap(lambda x: dcn.deform_conv2d(x, first["offset"], first["weight"], **params))(
        s["input"])
    assert forward == [2, 2, 2]
    out_w = jax.vmap(lambda w: dcn.deform_conv2d(first["input"], first["offset"], w, **params),
                     in_axes=1, out_axes=2)(s["weight"].swapaxes(0, 1))
    assert forward[3:] == [2, 2, 2]
    for v, (arrays, _, _) in enumerate(cases):
        assert_same(out[v], cupydcn.deform_conv2d(arrays["input"], first["offset"],
                                                  first["weight"], **params), f"input[{v}]")
        assert_same(out_w[:, :, v], cupydcn.deform_conv2d(first["input"], first["offset"],
                                                          arrays["weight"], **params),
                    f"weight[{v}]")


def test_per_example_gradients():
    """vmap of grad: the weight and bias gradients of each vmapped element."""
    cases, s, params = vmapped_conv_arrays()
    first = cases[0][0]

    def loss(w, b, x, o, m):
        return dcn.deform_conv2d(x, o, w, b, mask=m, **params).sum()

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, None, 0, 0, 0)))(
        first["weight"], first["bias"], s["input"], s["offset"], s["mask"])
    for v, (arrays, _, _) in enumerate(cases):
        expected = cupydcn.deform_conv2d_backward(
            numpy.ones((2, 6, 7, 6), numpy.float32), arrays["input"], arrays["offset"],
            first["weight"], first["bias"], mask=arrays["mask"], **params)
        assert_same(grads[0][v], expected.weight, f"weight[{v}]")
        assert_same(grads[1][v], expected.bias, f"bias[{v}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_vmap_of_vjp_in_every_dtype(dtype):
    """jit(vmap(vjp)) over input, offset and mask with a shared weight and bias:
    the output and the input, offset and mask gradients are the core's for
    the folded batch, the weight and bias gradients the core's for each
    element."""
    cases = [conv_case(CONV_CASES[0], dtype, seed=s) for s in range(2)]
    weight, bias = cases[0][0]["weight"], cases[0][0]["bias"]
    params = cases[0][2]

    def one(x, o, m, g):
        out, pullback = jax.vjp(lambda x, o, w, b, m: dcn.deform_conv2d(x, o, w, b, mask=m,
                                                                        **params),
                                x, o, weight, bias, m)
        return out, pullback(g)

    with precision(dtype):
        out, grads = jax.jit(jax.vmap(one))(
            *(numpy.stack([c[0][n] for c in cases]) for n in ("input", "offset", "mask")),
            numpy.stack([c[1] for c in cases]))
    folded = {n: numpy.concatenate([c[0][n] for c in cases]) for n in ("input", "offset", "mask")}
    args = (folded["input"], folded["offset"], weight, bias)
    expected = cupydcn.deform_conv2d(*args, mask=folded["mask"], **params)
    assert_same(numpy.asarray(out), expected.reshape(out.shape), "forward")
    expected = cupydcn.deform_conv2d_backward(numpy.concatenate([c[1] for c in cases]), *args,
                                              mask=folded["mask"], **params)
    for name, grad in zip(CONV_NAMES, grads):
        if name in folded:
            assert_same(numpy.asarray(grad), getattr(expected, name).reshape(grad.shape), name)
    for v, (arrays, cotangent, _) in enumerate(cases):
        expected = cupydcn.deform_conv2d_backward(
            cotangent, arrays["input"], arrays["offset"], weight, bias, mask=arrays["mask"],
            wrt=("weight", "bias"), **params)
        for name, grad in zip(CONV_NAMES, grads):
            if name not in folded:
                assert_same(grad[v], getattr(expected, name), f"{name}[{v}]")


# --------------------------------------------------------------------------
# RoI pooling
# --------------------------------------------------------------------------

ROIS = [[0, 1, 1, 6, 5], [1, 0.5, 2, 8, 7], [0, 2.2, 2, 3, 3.5], [1, -1, 0, 4, 9]]


def roi_case(dtype=numpy.float64, with_offset=True, with_mask=True, R=4, seed=1):
    rng = numpy.random.default_rng(seed)
    N, C, H, W, ph, pw = 2, 3, 8, 9, 3, 2
    arrays = {
        "input": rng.standard_normal((N, C, H, W)).astype(dtype),
        "rois": numpy.array(ROIS[:R], dtype).reshape(R, 5),
        "offset": rng.uniform(-1, 1, (R, 2, ph, pw)).astype(dtype) if with_offset else None,
        "mask": rng.uniform(0, 1, (R, 1, ph, pw)).astype(dtype) if with_mask else None,
    }
    cotangent = rng.standard_normal((R, C, ph, pw)).astype(dtype)
    return arrays, cotangent, dict(output_size=(ph, pw), spatial_scale=0.75, sampling_ratio=2,
                                   gamma=0.2)


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("with_offset,with_mask,R", [(True, True, 4), (True, False, 3),
                                                     (False, False, 4), (True, True, 0)],
                         ids=["modulated", "offset", "plain", "R0"])
def test_deform_roi_pool(with_offset, with_mask, R, dtype, mode):
    arrays, cotangent, params = roi_case(dtype, with_offset, with_mask, R)
    with precision(dtype):
        out, grads = run(lambda **a: dcn.deform_roi_pool(**a, **params), arrays, cotangent, mode)
    args = [arrays[n] for n in ("input", "rois", "offset")]
    assert_same(out, cupydcn.deform_roi_pool(*args, **params, mask=arrays["mask"]), "forward")
    expected = cupydcn.deform_roi_pool_backward(cotangent, *args, **params, mask=arrays["mask"])
    for name in ROI_NAMES:
        if arrays[name] is None:
            assert grads[name] is None, name
        else:
            assert_same(grads[name], getattr(expected, name), name)
    assert not numpy.asarray(grads["rois"]).any()  # rois get a zero gradient
    exact = {k: None if v is None else rounded(v, dtype) for k, v in arrays.items()}
    exact_args = [exact[n] for n in ("input", "rois", "offset")]
    scalars = (params["output_size"], params["spatial_scale"], params["sampling_ratio"],
               params["gamma"])
    if R:
        assert_close(out, reference.deform_roi_pool(*exact_args, *scalars, exact["mask"]), dtype,
                     "forward")
        ref_grads = reference.deform_roi_pool_backward(rounded(cotangent, dtype), *exact_args,
                                                       *scalars, exact["mask"])
        for name, ref in zip(ROI_NAMES, ref_grads):
            if arrays[name] is not None:
                assert_close(grads[name], ref, dtype, name)


PSROI_PARAMS = dict(spatial_scale=0.5, group_size=2, pooled_size=3, part_size=2,
                    sample_per_part=2, trans_std=0.1)


def psroi_case(dtype=numpy.float64, with_trans=True, R=4, seed=2):
    rng = numpy.random.default_rng(seed)
    arrays = {
        "input": rng.standard_normal((2, 3 * 4, 9, 10)).astype(dtype),
        "rois": (numpy.array(ROIS[:R], numpy.float64).reshape(R, 5) * [1, 2, 2, 2, 2])
        .astype(dtype),
        "trans": rng.uniform(-1, 1, (R, 2 * 3, 2, 2)).astype(dtype) if with_trans else None,
    }
    return arrays, rng.standard_normal((R, 3, 3, 3)).astype(dtype)


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("with_trans,R", [(True, 4), (False, 3), (True, 0)],
                         ids=["trans", "no_trans", "R0"])
def test_deform_psroi_pool(with_trans, R, dtype, mode):
    arrays, cotangent = psroi_case(dtype, with_trans, R)
    with precision(dtype):
        out, grads = run(lambda **a: dcn.deform_psroi_pool(**a, **PSROI_PARAMS), arrays,
                         cotangent, mode)
        _, count = dcn.deform_psroi_pool(**arrays, **PSROI_PARAMS, return_count=True)
    args = [arrays[n] for n in ("input", "rois", "trans")]
    expected_out, expected_count = cupydcn.deform_psroi_pool(*args, **PSROI_PARAMS,
                                                             return_count=True)
    assert_same(out, expected_out, "forward")
    assert_same(count, expected_count, "count")
    expected = cupydcn.deform_psroi_pool_backward(cotangent, *args, **PSROI_PARAMS)
    for name in PSROI_NAMES:
        if arrays[name] is None:
            assert grads[name] is None, name
        else:
            assert_same(grads[name], getattr(expected, name), name)
    exact = {k: None if v is None else rounded(v, dtype) for k, v in arrays.items()}
    keywords = dict(PSROI_PARAMS, output_dim=3)
    if R:
        ref_out, _ = reference.deform_psroi_pool(exact["input"], exact["rois"], exact["trans"],
                                                 **keywords)
        assert_close(out, ref_out, dtype, "forward")
        ref_grads = reference.deform_psroi_pool_backward(
            rounded(cotangent, dtype), exact["input"], exact["rois"], exact["trans"], **keywords)
        for name, ref in zip(PSROI_NAMES, ref_grads):
            if arrays[name] is not None:
                assert_close(grads[name], ref, dtype, name)


def test_roi_pool_float64_gradients_match_finite_differences():
    from jax.test_util import check_grads

    arrays, _, params = roi_case(seed=5)
    ps_arrays, _ = psroi_case(seed=6)
    with jax.enable_x64(True):
        check_grads(lambda x, o, m: dcn.deform_roi_pool(x, arrays["rois"], o, mask=m, **params),
                    [jnp.asarray(arrays[n]) for n in ROI_NAMES], order=1, modes=["rev"],
                    atol=1e-6, rtol=1e-6)
        check_grads(lambda x, t: dcn.deform_psroi_pool(x, ps_arrays["rois"], t, **PSROI_PARAMS),
                    [jnp.asarray(ps_arrays[n]) for n in PSROI_NAMES], order=1, modes=["rev"],
                    atol=1e-6, rtol=1e-6)


def test_roi_ops_under_vmap(monkeypatch):
    """vmap over any argument of the RoI ops: one core call per element."""
    calls = count_calls(monkeypatch, _roi_pool, "deform_roi_pool")
    arrays, _, params = roi_case(numpy.float32)
    features = numpy.stack([arrays["input"], 2 * arrays["input"]])
    out = jax.jit(jax.vmap(lambda f: dcn.deform_roi_pool(f, arrays["rois"], arrays["offset"],
                                                         mask=arrays["mask"], **params)))(features)
    assert calls == [2, 2]
    for v in range(2):
        assert_same(out[v], cupydcn.deform_roi_pool(features[v], arrays["rois"], arrays["offset"],
                                                    mask=arrays["mask"], **params), f"[{v}]")
    rois = numpy.stack([arrays["rois"][:2], arrays["rois"][2:]])
    offsets = numpy.stack([arrays["offset"][:2], arrays["offset"][2:]])
    out = jax.vmap(lambda r, o: dcn.deform_roi_pool(arrays["input"], r, o, **params))(rois,
                                                                                      offsets)
    assert_same(out.reshape(4, *out.shape[2:]),
                cupydcn.deform_roi_pool(arrays["input"], arrays["rois"], arrays["offset"],
                                        **params), "over rois")
    ps, cotangent = psroi_case(numpy.float32)
    trans = numpy.stack([ps["trans"], -ps["trans"]])
    grads = jax.vmap(jax.grad(lambda t: dcn.deform_psroi_pool(ps["input"], ps["rois"], t,
                                                              **PSROI_PARAMS).sum()))(trans)
    for v in range(2):
        expected = cupydcn.deform_psroi_pool_backward(
            numpy.ones_like(cotangent), ps["input"], ps["rois"], trans[v], **PSROI_PARAMS)
        assert_same(grads[v], expected.trans, f"trans[{v}]")


# --------------------------------------------------------------------------
# Errors: the core's messages, raised when tracing
# --------------------------------------------------------------------------


def core_error(function, *args, **kwargs):
    with pytest.raises((TypeError, ValueError)) as info:
        function(*args, **kwargs)
    return info.type, str(info.value)


@pytest.mark.parametrize("mutate", [
    lambda a: a.update(offset=a["offset"][:, :16]),
    lambda a: a.update(weight=a["weight"][:, :3]),
    lambda a: a.update(mask=a["mask"][:, :, :-1]),
    lambda a: a.update(bias=a["bias"][:2]),
    lambda a: a.update(input=a["input"][0]),
    lambda a: a.update(offset=a["offset"].astype(numpy.float16)),
    lambda a: a.update({k: v.astype(numpy.int32) for k, v in a.items()}),
], ids=["offset-channels", "weight-groups", "mask-shape", "bias-shape", "input-rank",
        "dtype-mismatch", "int32"])
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_conv_errors_are_the_cores(mutate, mode):
    arrays, _, params = conv_case(CONV_CASES[0], numpy.float32)
    mutate(arrays)
    expected = core_error(cupydcn.deform_conv2d, **arrays, **params)
    function = lambda **a: dcn.deform_conv2d(**a, **params)  # noqa: E731
    if mode == "jit":
        function = jax.jit(function)
    assert core_error(function, **arrays) == expected


def test_argument_errors_are_the_cores():
    arrays, _, _ = conv_case(CONV_CASES[0], numpy.float32)
    for kwargs in (dict(stride=0), dict(padding=(1, 2, 3)), dict(dilation=1.5)):
        assert (core_error(dcn.deform_conv2d, **arrays, **kwargs)
                == core_error(cupydcn.deform_conv2d, **arrays, **kwargs))
    roi, _, _ = roi_case(numpy.float32)
    for kwargs in (dict(spatial_scale=0), dict(sampling_ratio=-1), dict(output_size=0),
                   dict(rois=roi["rois"][:, :4]), dict(offset=roi["offset"][:2])):
        call = dict(roi, **kwargs)
        assert (core_error(dcn.deform_roi_pool, **call)
                == core_error(cupydcn.deform_roi_pool, **call))
    ps, _ = psroi_case(numpy.float32)
    for kwargs in (dict(output_dim=5), dict(group_size=0), dict(trans=ps["trans"][:, :4])):
        call = {**ps, **PSROI_PARAMS, **kwargs}
        assert (core_error(dcn.deform_psroi_pool, **call)
                == core_error(cupydcn.deform_psroi_pool, **call))


def test_bad_roi_batch_index_is_reported_when_running():
    """A batch index is a value, unknown when tracing: the core's check fails
    when the program runs, and JAX reports it with the core's message (a
    JaxRuntimeError under jit)."""
    arrays, _, params = roi_case(numpy.float32)
    arrays["rois"][1, 0] = 2
    _, message = core_error(cupydcn.deform_roi_pool, **arrays, **params)
    args = (arrays["input"], arrays["rois"], arrays["offset"], params["output_size"],
            params["spatial_scale"], params["sampling_ratio"], params["gamma"], arrays["mask"])
    jitted = jax.jit(dcn.deform_roi_pool, static_argnums=(3, 4, 5, 6))
    with pytest.raises(jax.errors.JaxRuntimeError, match=re.escape(message)):
        jitted(*args).block_until_ready()
    # eagerly, JAX 0.10 lets the core's ValueError itself through
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=re.escape(message)):
        dcn.deform_roi_pool(*args).block_until_ready()


# --------------------------------------------------------------------------
# algorithm=, and the core writing into XLA's output buffers
# --------------------------------------------------------------------------

OPS = ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool")


def op_case(op, dtype):
    """(bridge function, arrays, cotangent, params, core forward, core
    backward) of a small call of ``op``; every function takes the arrays and
    params by name."""
    if op == "deform_conv2d":
        arrays, cotangent, params = conv_case(CONV_CASES[0], dtype)
        return (dcn.deform_conv2d, arrays, cotangent, params, cupydcn.deform_conv2d,
                cupydcn.deform_conv2d_backward)
    if op == "deform_roi_pool":
        arrays, cotangent, params = roi_case(dtype)
        return (dcn.deform_roi_pool, arrays, cotangent, params, cupydcn.deform_roi_pool,
                cupydcn.deform_roi_pool_backward)
    arrays, cotangent = psroi_case(dtype)
    return (dcn.deform_psroi_pool, arrays, cotangent, PSROI_PARAMS, cupydcn.deform_psroi_pool,
            cupydcn.deform_psroi_pool_backward)


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("op,algorithm", [(op, name) for op in OPS
                                          for name in cupydcn.algorithms(op)])
def test_algorithm_selects_the_implementation(op, algorithm, mode, monkeypatch):
    """Each implementation available here runs the forward and the backward
    through the bridge: the core's numbers for that algorithm exactly, and
    the reference's within float64's tolerance."""
    from cupydcn import _dispatch

    implementation = _dispatch.implementation(op, algorithm)
    if implementation.dtypes is not None and "float64" not in implementation.dtypes:
        pytest.skip(f"{algorithm} does not support float64 (this test's dtype)")
    function, arrays, cotangent, params, core, core_backward = op_case(op, F64)
    seen = spy_choices(monkeypatch)
    with precision(F64):
        out, grads = run(lambda **a: function(**a, **params, algorithm=algorithm), arrays,
                         cotangent, mode)
    assert seen and set(seen) == {algorithm}, seen  # forward and backward alike
    expected = core(**arrays, **params, algorithm=algorithm)
    exact = core(**arrays, **params, algorithm="reference")
    expected_grads = core_backward(cotangent, **arrays, **params, algorithm=algorithm)
    exact_grads = core_backward(cotangent, **arrays, **params, algorithm="reference")
    from cupydcn import _dispatch

    # an implementation with float atomics adds in another order on another run
    # (the host backend runs blocks on several cores): the same bits only when
    # it is deterministic, else float64's tolerance
    if _dispatch.implementation(op, algorithm).deterministic:
        same = assert_same
    else:
        def same(got, expected, what):
            assert_close(got, expected, F64, what)
    same(out, expected, "forward")
    assert_close(out, exact, F64, "forward against the reference")
    for name, grad in expected_grads._asdict().items():
        if grad is not None:
            same(grads[name], grad, name)
            assert_close(grads[name], getattr(exact_grads, name), F64, f"{name} (reference)")


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("op", OPS)
def test_unknown_algorithm_names_those_that_exist(op, mode):
    function, arrays, _, params, _, _ = op_case(op, numpy.float32)
    call = lambda **a: function(**a, **params, algorithm="winograd")  # noqa: E731
    if mode == "jit":
        call = jax.jit(call)
    names = ", ".join(cupydcn.algorithms(op))
    with pytest.raises(cupydcn.ArgumentError,
                       match=re.escape(f"algorithm must be None or one of {names} for {op}, "
                                       f"got 'winograd'")):
        call(**arrays)


def spy_stores(monkeypatch):
    """The results the bridge had to copy into XLA's buffers."""
    stores = []
    store = dcn._store

    def spy(out, result):
        stores.append(result.shape)
        return store(out, result)

    monkeypatch.setattr(dcn, "_store", spy)
    return stores


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("op", OPS)
def test_core_writes_into_xlas_output_buffers(op, dtype, monkeypatch):
    """Forward and backward, under jit and vmap (folded and per element): the
    core allocates its results as XLA's output buffers, so none is copied."""
    stores = spy_stores(monkeypatch)
    function, arrays, cotangent, params, core, core_backward = op_case(op, dtype)
    with precision(dtype):
        out, grads = run(lambda **a: function(**a, **params), arrays, cotangent, "jit")
        if op == "deform_conv2d":
            vmapped = {k: v if k in ("weight", "bias") else numpy.stack([v, v])
                       for k, v in arrays.items()}
            folded = jax.jit(jax.vmap(lambda x, o, m: function(x, o, arrays["weight"],
                                                               arrays["bias"], mask=m, **params)))(
                vmapped["input"], vmapped["offset"], vmapped["mask"])
            per_element = jax.vmap(lambda w: function(arrays["input"], arrays["offset"], w,
                                                      **params))(vmapped["weight"][None])
    assert stores == []
    assert_same(out, core(**arrays, **params), "forward")
    for name, grad in core_backward(cotangent, **arrays, **params)._asdict().items():
        if grad is not None:
            assert_same(grads[name], grad, name)
    if op == "deform_conv2d":
        expected = core(fold(vmapped["input"]), fold(vmapped["offset"]), arrays["weight"],
                        arrays["bias"], mask=fold(vmapped["mask"]), **params)
        assert_same(numpy.asarray(folded), expected.reshape(folded.shape), "vmap, folded")
        assert_same(numpy.asarray(per_element[0]),
                    core(arrays["input"], arrays["offset"], arrays["weight"], **params),
                    "vmap, per element")


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float16], ids=dtype_name)
def test_results_allocated_out_of_order_are_copied_into_place(dtype, monkeypatch):
    """input and offset of one shape: in float16 the core allocates the offset
    gradient before the input gradient (which it converts from float32 at the
    end), so each takes the other's buffer first; the bridge puts them right."""
    stores = spy_stores(monkeypatch)
    rng = numpy.random.default_rng(7)
    x = rng.standard_normal((1, 18, 5, 5)).astype(dtype)
    offset = rng.uniform(-1, 1, (1, 18, 5, 5)).astype(dtype)
    weight = rng.standard_normal((2, 18, 3, 3)).astype(dtype)
    cotangent = rng.standard_normal((1, 2, 5, 5)).astype(dtype)
    arrays = dict(input=x, offset=offset, weight=weight)
    _, grads = run(lambda **a: dcn.deform_conv2d(**a, padding=1), arrays, cotangent, "jit")
    expected = cupydcn.deform_conv2d_backward(cotangent, x, offset, weight, padding=1)
    for name in arrays:
        assert_same(grads[name], getattr(expected, name), name)
    assert len(stores) == (2 if dtype == numpy.float16 else 0), stores


# --------------------------------------------------------------------------
# GPU tier: JAX on CUDA
# --------------------------------------------------------------------------


def jax_gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError as error:
        pytest.skip(f"JAX sees no GPU ({error}); it needs jax[cuda12] or jax[cuda13]")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_gpu_zero_copy_on_xlas_stream(dtype, monkeypatch):
    """Under jit on a CUDA device the core gets CuPy views of JAX's buffers
    (same addresses), runs on XLA's stream (not CuPy's default stream) and
    writes its results into XLA's output buffers (no result is copied);
    results and gradients match the float64 reference."""
    import cupy

    device = jax_gpu()
    stores = spy_stores(monkeypatch)
    seen = {}
    core = _deform_conv.deform_conv2d

    def spy(input, offset, weight, *args, **kwargs):
        seen.update(kind=type(input), input=input.data.ptr, offset=offset.data.ptr,
                    weight=weight.data.ptr, stream=cupy.cuda.get_current_stream().ptr)
        return core(input, offset, weight, *args, **kwargs)

    monkeypatch.setattr(_deform_conv, "deform_conv2d", spy)
    arrays, cotangent, params = conv_case(CONV_CASES[0], dtype)
    with precision(dtype):
        on_gpu = {k: jax.device_put(v, device) for k, v in arrays.items() if v is not None}
        out = jax.jit(lambda a: dcn.deform_conv2d(**a, **params))(on_gpu)
        assert seen["kind"] is cupy.ndarray
        for name in ("input", "offset", "weight"):
            assert seen[name] == on_gpu[name].unsafe_buffer_pointer(), name
        assert seen["stream"] != 0
        assert out.devices() == {device}
        _, grads = run(lambda **a: dcn.deform_conv2d(**a, **params), on_gpu,
                       jax.device_put(cotangent, device), "jit")
    assert stores == []
    exact = {k: None if v is None else rounded(v, dtype) for k, v in arrays.items()}
    geometry = (params["stride"], params["padding"], params["dilation"])
    exact_args = [exact[n] for n in CONV_NAMES[:4]]
    assert_close(numpy.asarray(out), reference.deform_conv2d(*exact_args, *geometry,
                                                             exact["mask"]), dtype, "forward")
    ref_grads = reference.deform_conv2d_backward(rounded(cotangent, dtype), *exact_args,
                                                 *geometry, exact["mask"])
    for name, ref in zip(CONV_NAMES, ref_grads):
        assert_close(numpy.asarray(grads[name]), ref, dtype, name)


@pytest.mark.gpu
def test_gpu_roi_ops_and_vmap(monkeypatch):
    device = jax_gpu()
    stores = spy_stores(monkeypatch)
    arrays, cotangent, params = roi_case(numpy.float32)
    on_gpu = {k: jax.device_put(v, device) for k, v in arrays.items()}
    out, grads = run(lambda **a: dcn.deform_roi_pool(**a, **params), on_gpu,
                     jax.device_put(cotangent, device), "jit")
    exact = {k: v.astype(F64) for k, v in arrays.items()}
    scalars = (params["output_size"], params["spatial_scale"], params["sampling_ratio"],
               params["gamma"])
    args = [exact[n] for n in ("input", "rois", "offset")]
    assert_close(numpy.asarray(out), reference.deform_roi_pool(*args, *scalars, exact["mask"]),
                 numpy.float32, "roi forward")
    for name, ref in zip(ROI_NAMES, reference.deform_roi_pool_backward(
            cotangent.astype(F64), *args, *scalars, exact["mask"])):
        assert_close(numpy.asarray(grads[name]), ref, numpy.float32, name)
    cases, s, conv_params = vmapped_conv_arrays()
    first = cases[0][0]
    out = jax.jit(jax.vmap(lambda x, o, m: dcn.deform_conv2d(x, o, first["weight"], first["bias"],
                                                             mask=m, **conv_params)))(
        *(jax.device_put(s[n], device) for n in ("input", "offset", "mask")))
    for v, (a, _, _) in enumerate(cases):
        expected = reference.deform_conv2d(a["input"], a["offset"], first["weight"],
                                           first["bias"], conv_params["stride"],
                                           conv_params["padding"], conv_params["dilation"],
                                           a["mask"])
        assert_close(numpy.asarray(out[v]), expected, numpy.float32, f"vmap[{v}]")
    assert stores == []  # every result written by the core into XLA's buffers
