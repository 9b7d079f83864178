"""cupydcn.tensorflow: the TensorFlow bridge against the array-in, array-out core.

CPU tier: TensorFlow CPU tensors run the core's CPU backend, so every
result and gradient must equal what the core returns for the same NumPy
arrays, bit for bit (the bridge adds no numerics): both data formats, eagerly
and inside ``tf.function`` (where the core runs in a ``tf.py_function``);
``algorithm=`` selects each implementation, forward and backward.
GPU tier (marker ``gpu``): the same comparison for GPU tensors, where
TensorFlow sees a GPU (the GPU test machine has no TensorFlow today, so this
is skipped there too).
"""

import re

import numpy
import pytest

tf = pytest.importorskip("tensorflow")

from helpers import DTYPES, dtype_name, spy_choices

import cupydcn
import cupydcn.tensorflow as dcn

TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)

# (B, C, H, W, Cout, kh, kw, groups, offset_groups, stride, padding, dilation, mask, bias)
CONV_CASES = [
    (2, 4, 7, 6, 6, 3, 3, 1, 2, (1, 1), (1, 1), (1, 1), True, True),
    (1, 6, 8, 5, 4, 3, 2, 2, 3, (2, 1), (0, 2), (2, 1), False, False),
    (3, 2, 5, 4, 2, 1, 1, 2, 1, (1, 2), (0, 0), (1, 1), True, False),
    (0, 2, 5, 5, 2, 3, 3, 1, 1, (1, 1), (1, 1), (1, 1), True, True),
]
CONV_NAMES = ("input", "offset", "weight", "bias", "mask")


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
        "grad_output": rng.standard_normal((B, Cout, Ho, Wo)),
    }
    arrays = {k: None if v is None else v.astype(dtype) for k, v in arrays.items()}
    return arrays, {"stride": stride, "padding": padding, "dilation": dilation}


def to_tf(a, channels_last, layout_free=False):
    """A NumPy NCHW array as a tensor in the data format (rank-4 arrays only)."""
    if a is None:
        return None
    if channels_last and not layout_free and a.ndim == 4:
        a = a.transpose(TO_NHWC)
    return tf.constant(a)


def to_nchw(t, channels_last, layout_free=False):
    a = t.numpy()
    if channels_last and not layout_free and a.ndim == 4:
        a = a.transpose(TO_NCHW)
    return a


def assert_same(got, expected, what):
    """Bit-equal (as float64, which holds every supported dtype exactly)."""
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    numpy.testing.assert_array_equal(numpy.asarray(got, numpy.float64),
                                     numpy.asarray(expected, numpy.float64), err_msg=what)


def conv_tape(tensors, grad_output, params, data_format, graph):
    """(output, gradients of sum(output * grad_output) for every tensor)."""

    def run(*xs):
        with tf.GradientTape() as tape:
            tape.watch([x for x in xs if x is not None])
            kwargs = dict(zip(CONV_NAMES, xs))
            out = dcn.deform_conv2d(**kwargs, **params, data_format=data_format)
            loss = tf.reduce_sum(out * grad_output)
        present = [x for x in xs if x is not None]
        grads = iter(tape.gradient(loss, present))
        return out, [None if x is None else next(grads) for x in xs]

    if graph:
        run = tf.function(run)
    return run(*tensors)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", CONV_CASES,
                         ids=lambda c: f"B{c[0]}C{c[1]}k{c[5]}{c[6]}g{c[7]}dg{c[8]}")
def test_deform_conv2d_matches_core(case, data_format, graph):
    arrays, params = conv_case(case)
    last = data_format == "channels_last"
    expected = cupydcn.deform_conv2d(*(arrays[n] for n in CONV_NAMES[:4]), **params,
                                     mask=arrays["mask"])
    expected_grads = cupydcn.deform_conv2d_backward(
        arrays["grad_output"], *(arrays[n] for n in CONV_NAMES[:4]), **params,
        mask=arrays["mask"])
    tensors = [to_tf(arrays[n], last, layout_free=n == "weight") for n in CONV_NAMES]
    out, grads = conv_tape(tensors, to_tf(arrays["grad_output"], last), params, data_format,
                           graph)
    assert_same(to_nchw(out, last), expected, "forward")
    for name, grad in zip(CONV_NAMES, grads):
        reference = getattr(expected_grads, name)
        if reference is None:
            assert grad is None, name
        else:
            assert_same(to_nchw(grad, last, layout_free=name == "weight"), reference, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_deform_conv2d_dtypes(dtype):
    """Every supported dtype crosses the bridge (bfloat16 as its bit pattern)."""
    arrays, params = conv_case(CONV_CASES[0], dtype)
    expected = cupydcn.deform_conv2d(*(arrays[n] for n in CONV_NAMES[:4]), **params,
                                     mask=arrays["mask"])
    expected_grads = cupydcn.deform_conv2d_backward(
        arrays["grad_output"], *(arrays[n] for n in CONV_NAMES[:4]), **params,
        mask=arrays["mask"])
    tensors = [to_tf(arrays[n], True, layout_free=n == "weight") for n in CONV_NAMES]
    out, grads = conv_tape(tensors, to_tf(arrays["grad_output"], True), params, "channels_last",
                           graph=False)
    assert out.dtype == tf.as_dtype(numpy.dtype(dtype))
    assert_same(to_nchw(out, True), expected, "forward")
    for name, grad in zip(CONV_NAMES, grads):
        assert grad.dtype == out.dtype
        assert_same(to_nchw(grad, True, layout_free=name == "weight"),
                    getattr(expected_grads, name), name)


def test_deform_conv2d_variable_weight_gets_gradient():
    arrays, params = conv_case(CONV_CASES[0], numpy.float32)
    weight = tf.Variable(arrays["weight"])
    bias = tf.Variable(arrays["bias"])
    x = to_tf(arrays["input"], True)
    offset = to_tf(arrays["offset"], True)
    with tf.GradientTape() as tape:
        out = dcn.deform_conv2d(x, offset, weight, bias, **params)
    g_weight, g_bias = tape.gradient(out, [weight, bias])
    expected = cupydcn.deform_conv2d_backward(
        numpy.ones((2, 6, 7, 6), numpy.float32), *(arrays[n] for n in CONV_NAMES[:4]), **params)
    assert_same(g_weight.numpy(), expected.weight, "weight")
    assert_same(g_bias.numpy(), expected.bias, "bias")


def test_graph_mode_static_shapes():
    """Inside tf.function with unknown sizes the output keeps what is known."""
    spec = [tf.TensorSpec([None, None, None, 4], tf.float32),
            tf.TensorSpec([None, 5, 6, 18], tf.float32),
            tf.TensorSpec([3, 4, 3, 3], tf.float32)]

    @tf.function(input_signature=spec)
    def run(x, offset, weight):
        out = dcn.deform_conv2d(x, offset, weight, padding=1)
        assert out.shape.as_list() == [None, 5, 6, 3]
        return out

    out = run(tf.ones((2, 5, 6, 4)), tf.zeros((2, 5, 6, 18)), tf.ones((3, 4, 3, 3)))
    assert out.shape == (2, 5, 6, 3)


# --------------------------------------------------------------------------
# RoI pooling
# --------------------------------------------------------------------------


def roi_case(dtype=numpy.float64, with_offset=True, with_mask=True, seed=1):
    rng = numpy.random.default_rng(seed)
    N, C, H, W, ph, pw = 2, 3, 8, 9, 3, 2
    rois = numpy.array([[0, 1, 1, 6, 5], [1, 0.5, 2, 8, 7], [0, 2.2, 2, 3, 3.5],
                        [1, -1, 0, 4, 9]], dtype)
    R = len(rois)
    arrays = {
        "input": rng.standard_normal((N, C, H, W)).astype(dtype),
        "rois": rois,
        "offset": rng.uniform(-1, 1, (R, 2, ph, pw)).astype(dtype) if with_offset else None,
        "mask": rng.uniform(0, 1, (R, 1, ph, pw)).astype(dtype) if with_mask else None,
        "grad_output": rng.standard_normal((R, C, ph, pw)).astype(dtype),
    }
    return arrays, dict(output_size=(ph, pw), spatial_scale=0.75, sampling_ratio=2, gamma=0.2)


ROI_NAMES = ("input", "rois", "offset", "mask")


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("with_offset,with_mask", [(True, True), (True, False), (False, False)])
def test_deform_roi_pool_matches_core(with_offset, with_mask, data_format, graph):
    arrays, params = roi_case(with_offset=with_offset, with_mask=with_mask)
    last = data_format == "channels_last"
    core_args = [arrays[n] for n in ROI_NAMES]
    expected = cupydcn.deform_roi_pool(*core_args[:3], **params, mask=arrays["mask"])
    expected_grads = cupydcn.deform_roi_pool_backward(arrays["grad_output"], *core_args[:3],
                                                      **params, mask=arrays["mask"])
    tensors = [to_tf(arrays[n], last) for n in ROI_NAMES]
    grad_output = to_tf(arrays["grad_output"], last)

    def run(*xs):
        with tf.GradientTape() as tape:
            tape.watch([x for x in xs if x is not None])
            out = dcn.deform_roi_pool(*xs[:3], **params, mask=xs[3], data_format=data_format)
            loss = tf.reduce_sum(out * grad_output)
        present = [x for x in xs if x is not None]
        grads = iter(tape.gradient(loss, present))
        return out, [None if x is None else next(grads) for x in xs]

    out, grads = (tf.function(run) if graph else run)(*tensors)
    assert_same(to_nchw(out, last), expected, "forward")
    by_name = dict(zip(ROI_NAMES, grads))
    assert by_name["rois"] is None  # no gradient for the boxes, as in mmcv
    for name in ("input", "offset", "mask"):
        reference = getattr(expected_grads, name)
        if reference is None:
            assert by_name[name] is None, name
        else:
            assert_same(to_nchw(by_name[name], last), reference, name)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("with_trans", [True, False])
def test_deform_psroi_pool_matches_core(with_trans, data_format):
    rng = numpy.random.default_rng(2)
    N, G, P, output_dim, H, W = 2, 2, 4, 3, 8, 9
    x = rng.standard_normal((N, output_dim * G * G, H, W))
    rois = numpy.array([[0, 1, 1, 6, 5], [1, 0, 2, 8, 7], [1, 2, 3, 3, 4]], numpy.float64)
    trans = rng.uniform(-1, 1, (3, 2, 2, 2)) if with_trans else None
    params = dict(spatial_scale=0.5, group_size=G, pooled_size=P, part_size=2 if with_trans else 0,
                  sample_per_part=2, trans_std=0.1)
    expected = cupydcn.deform_psroi_pool(x, rois, trans, **params)
    grad_output = rng.standard_normal(expected.shape)
    expected_grads = cupydcn.deform_psroi_pool_backward(grad_output, x, rois, trans, **params)
    last = data_format == "channels_last"
    tensors = [to_tf(a, last) for a in (x, rois, trans)]
    with tf.GradientTape() as tape:
        tape.watch([t for t in tensors if t is not None])
        out = dcn.deform_psroi_pool(*tensors, **params, data_format=data_format)
        loss = tf.reduce_sum(out * to_tf(grad_output, last))
    g_input, g_rois, *g_trans = tape.gradient(loss, [t for t in tensors if t is not None])
    assert_same(to_nchw(out, last), expected, "forward")
    assert g_rois is None
    assert_same(to_nchw(g_input, last), expected_grads.input, "input")
    if with_trans:
        assert_same(to_nchw(g_trans[0], last), expected_grads.trans, "trans")


def test_deform_psroi_pool_graph_mode():
    rng = numpy.random.default_rng(3)
    x = tf.constant(rng.standard_normal((1, 5, 6, 2 * 4)), tf.float32)
    rois = tf.constant([[0, 0, 0, 4, 3]], tf.float32)
    trans = tf.constant(rng.uniform(-1, 1, (1, 2, 2, 2)), tf.float32)
    params = dict(group_size=2, pooled_size=2, trans_std=0.1, sample_per_part=2)

    @tf.function
    def run(x, trans):
        with tf.GradientTape() as tape:
            tape.watch([x, trans])
            out = dcn.deform_psroi_pool(x, rois, trans, **params)
        return out, tape.gradient(out, [x, trans])

    out, (g_x, g_trans) = run(x, trans)
    nchw = [numpy.asarray(t).transpose(TO_NCHW) for t in (x, trans)]
    assert_same(to_nchw(out, True), cupydcn.deform_psroi_pool(nchw[0], rois.numpy(), nchw[1],
                                                              **params), "forward")
    grads = cupydcn.deform_psroi_pool_backward(numpy.ones((1, 2, 2, 2), numpy.float32), nchw[0],
                                               rois.numpy(), nchw[1], **params)
    assert_same(to_nchw(g_x, True), grads.input, "input")
    assert_same(to_nchw(g_trans, True), grads.trans, "trans")


# --------------------------------------------------------------------------
# Validation: the core's messages
# --------------------------------------------------------------------------


def core_error(function, *args, **kwargs):
    with pytest.raises((TypeError, ValueError)) as info:
        function(*args, **kwargs)
    return info.type, str(info.value)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_conv_errors_carry_core_messages(data_format):
    last = data_format == "channels_last"
    x = numpy.zeros((1, 4, 5, 5), numpy.float32)
    w = numpy.zeros((2, 4, 3, 3), numpy.float32)
    bad = {
        "offset channels": (x, numpy.zeros((1, 16, 5, 5), numpy.float32), w, {}),
        "weight dtype": (x, numpy.zeros((1, 18, 5, 5), numpy.float32), w.astype(numpy.float64),
                         {}),
        "offset size": (x, numpy.zeros((1, 18, 4, 5), numpy.float32), w, {}),
        "input dtype": (x.astype(numpy.int32), numpy.zeros((1, 18, 5, 5), numpy.int32),
                        w.astype(numpy.int32), {}),
        "stride": (x, numpy.zeros((1, 18, 5, 5), numpy.float32), w, {"stride": 0}),
    }
    for what, (xa, oa, wa, extra) in bad.items():
        kind, message = core_error(cupydcn.deform_conv2d, xa, oa, wa, padding=1, **extra)
        with pytest.raises(kind) as info:
            dcn.deform_conv2d(to_tf(xa, last), to_tf(oa, last), tf.constant(wa), padding=1,
                              data_format=data_format, **extra)
        assert str(info.value).startswith(message), what


def test_conv_rank_error_names_the_data_format():
    with pytest.raises(ValueError,
                       match=r"input must be 4-D \(B, H, W, C\), got shape \(5, 5, 4\)"):
        dcn.deform_conv2d(tf.zeros((5, 5, 4)), tf.zeros((1, 5, 5, 18)), tf.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="data_format must be 'channels_last' or "
                                         "'channels_first', got 'NHWC'"):
        dcn.deform_conv2d(tf.zeros((1, 5, 5, 4)), tf.zeros((1, 5, 5, 18)),
                          tf.zeros((2, 4, 3, 3)), data_format="NHWC")


def test_roi_errors_carry_core_messages():
    x = numpy.zeros((1, 3, 4, 4), numpy.float32)
    rois = numpy.array([[0, 0, 0, 2, 2]], numpy.float32)
    for what, args in {
        "rois shape": (x, rois[:, :4]),
        "batch index": (x, numpy.array([[3, 0, 0, 2, 2]], numpy.float32)),
        "offset shape": (x, rois, numpy.zeros((1, 2, 3, 3), numpy.float32)),
    }.items():
        kind, message = core_error(cupydcn.deform_roi_pool, *args, output_size=2)
        with pytest.raises(kind) as info:
            dcn.deform_roi_pool(*(to_tf(a, True) for a in args), output_size=2)
        assert str(info.value).startswith(message), what


def test_graph_mode_runtime_error_carries_core_message():
    """Checks that need the values (RoI batch indices) run in the core; inside
    tf.function TensorFlow reports them as InvalidArgumentError."""
    spec = [tf.TensorSpec([None, None, None, 3], tf.float32), tf.TensorSpec([None, 5], tf.float32)]

    @tf.function(input_signature=spec)
    def run(x, rois):
        return dcn.deform_roi_pool(x, rois, output_size=2)

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"rois\[:, 0\] must hold batch indices in \[0, N\) = \[0, 1\), got 3"):
        run(tf.zeros((1, 4, 4, 3)), tf.constant([[3, 0, 0, 2, 2]], tf.float32))


# --------------------------------------------------------------------------
# algorithm=, and the ops built from their specs
# --------------------------------------------------------------------------

OPS = ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool")


def op_case(op):
    """(arrays, grad_output, params, core forward, core backward) of a small
    float64 call of ``op``, NCHW; the core functions take them by name."""
    if op == "deform_conv2d":
        arrays, params = conv_case(CONV_CASES[0])
        core = (cupydcn.deform_conv2d, cupydcn.deform_conv2d_backward)
    elif op == "deform_roi_pool":
        arrays, params = roi_case()
        core = (cupydcn.deform_roi_pool, cupydcn.deform_roi_pool_backward)
    else:
        rng = numpy.random.default_rng(4)
        arrays = {"input": rng.standard_normal((2, 3 * 4, 8, 9)),
                  "rois": numpy.array([[0, 1, 1, 6, 5], [1, 0, 2, 8, 7]], numpy.float64),
                  "trans": rng.uniform(-1, 1, (2, 2, 2, 2)),
                  "grad_output": rng.standard_normal((2, 3, 3, 3))}
        params = dict(spatial_scale=0.5, group_size=2, pooled_size=3, part_size=2,
                      sample_per_part=2, trans_std=0.1)
        core = (cupydcn.deform_psroi_pool, cupydcn.deform_psroi_pool_backward)
    grad_output = arrays.pop("grad_output")
    return arrays, grad_output, params, *core


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("op,algorithm", [(op, name) for op in OPS
                                          for name in cupydcn.algorithms(op)])
def test_algorithm_selects_the_implementation(op, algorithm, graph, monkeypatch):
    """Each implementation available here runs the forward and the backward
    through the bridge: the core's numbers for that algorithm exactly, and
    the reference's within float64's tolerance."""
    from helpers import assert_close

    from cupydcn import _dispatch

    implementation = _dispatch.implementation(op, algorithm)
    if implementation.dtypes is not None and "float64" not in implementation.dtypes:
        pytest.skip(f"{algorithm} does not support float64 (this test's dtype)")
    arrays, grad_output, params, core, core_backward = op_case(op)
    seen = spy_choices(monkeypatch)
    names = list(arrays)
    function = getattr(dcn, op)

    def run(*xs):
        with tf.GradientTape() as tape:
            tape.watch(list(xs))
            out = function(**dict(zip(names, xs)), **params, data_format="channels_first",
                           algorithm=algorithm)
            loss = tf.reduce_sum(out * grad_output)
        return out, tape.gradient(loss, list(xs))

    out, grads = (tf.function(run) if graph else run)(*(tf.constant(a) for a in arrays.values()))
    assert seen and set(seen) == {algorithm}, seen  # forward and backward alike
    from cupydcn import _dispatch

    # an implementation with float atomics adds in another order on another run
    # (the host backend runs blocks on several cores): the same bits only when
    # it is deterministic, else float64's tolerance
    if _dispatch.implementation(op, algorithm).deterministic:
        same = assert_same
    else:
        def same(got, expected, what):
            assert_close(got, expected, numpy.float64, what)
    same(out.numpy(), core(**arrays, **params, algorithm=algorithm), "forward")
    assert_close(out.numpy(), core(**arrays, **params, algorithm="reference"), numpy.float64,
                 "forward against the reference")
    expected = core_backward(grad_output, **arrays, **params, algorithm=algorithm)
    exact = core_backward(grad_output, **arrays, **params, algorithm="reference")
    for name, grad in zip(names, grads):
        if name in expected._fields:
            same(grad.numpy(), getattr(expected, name), name)
            assert_close(grad.numpy(), getattr(exact, name), numpy.float64, f"{name} (reference)")
        else:
            assert grad is None, name  # rois


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("op", OPS)
def test_unknown_algorithm_names_those_that_exist(op, graph):
    """Raised at the call (when tracing inside tf.function), as the core's
    ArgumentError, not from the py_function at run time. (A function that
    autograph converts re-raises errors of classes it does not know as its
    StagingError, with the same message: hence autograph=False here.)"""
    arrays, _, params, _, _ = op_case(op)
    function = getattr(dcn, op)

    def call(*xs):
        return function(**dict(zip(arrays, xs)), **params, data_format="channels_first",
                        algorithm="winograd")

    if graph:
        call = tf.function(call, autograph=False)
    names = ", ".join(cupydcn.algorithms(op))
    with pytest.raises(cupydcn.ArgumentError,
                       match=re.escape(f"algorithm must be None or one of {names} for {op}, "
                                       f"got 'winograd'")):
        call(*(tf.constant(a) for a in arrays.values()))


@pytest.mark.parametrize("op", OPS)
def test_signatures_follow_the_specs(op):
    """Each op takes its spec's arguments in order, then data_format and
    algorithm, positionally too."""
    import inspect

    from cupydcn import _ops

    spec = _ops.SPECS[op]
    parameters = inspect.signature(getattr(dcn, op)).parameters
    assert list(parameters) == [a.name for a in spec.args] + ["data_format", "algorithm"]
    arrays, _, params, core, _ = op_case(op)
    positional = [arrays.get(a.name, params.get(a.name, a.default)) for a in spec.args]
    out = getattr(dcn, op)(*(tf.constant(a) if isinstance(a, numpy.ndarray) else a
                             for a in positional), "channels_first", "reference")
    assert_same(out.numpy(), core(**arrays, **params, algorithm="reference"), "positional")
    with pytest.raises(cupydcn.ArgumentTypeError, match="multiple values for argument 'algorithm'"):
        getattr(dcn, op)(*positional, "channels_first", "reference", algorithm="reference")


@pytest.mark.parametrize("op", OPS)
def test_static_output_shapes_agree_with_the_checked_ones(op):
    """The layouts' output shapes (what graph mode knows before the sizes)
    equal the checked geometry's when every size is known, and keep what is
    known when the batch and the RoI count are not."""
    from cupydcn import _ops

    spec = _ops.SPECS[op]
    arrays, _, params, _, _ = op_case(op)
    shapes = {n: a.shape for n, a in arrays.items()}
    expected = spec.output_shapes(spec.check_shapes(**arrays, **params))
    assert spec.static_output_shapes(shapes, params) == expected
    unknown = [a.name for a in spec.args if a.spatial or a.name == "rois"]  # batch and RoIs
    partial = {n: (None, *s[1:]) if n in unknown else s for n, s in shapes.items()}
    got = spec.static_output_shapes(partial, params)
    assert got == {n: (None, *s[1:]) for n, s in expected.items()}


def test_graph_mode_static_shapes_of_the_roi_ops():
    """Inside tf.function with unknown RoI count and image size, the pooled
    size and the channels are known (output_dim solved from the channels)."""
    spec = [tf.TensorSpec([None, None, None, 12], tf.float32), tf.TensorSpec([None, 5], tf.float32)]

    @tf.function(input_signature=spec, autograph=False)  # plain Python asserts at trace time
    def run(x, rois):
        pooled = dcn.deform_roi_pool(x, rois, output_size=(2, 3))
        ps = dcn.deform_psroi_pool(x, rois, group_size=2, pooled_size=3)
        assert pooled.shape.as_list() == [None, 2, 3, 12]
        assert ps.shape.as_list() == [None, 3, 3, 3]
        return pooled, ps

    pooled, ps = run(tf.ones((1, 6, 6, 12)), tf.constant([[0, 0, 0, 4, 4]], tf.float32))
    assert pooled.shape == (1, 2, 3, 12) and ps.shape == (1, 3, 3, 3)


# --------------------------------------------------------------------------
# Interchange
# --------------------------------------------------------------------------


def test_cpu_results_cross_without_copy_when_aligned():
    """Aligned results are shared with TensorFlow; unaligned ones (which
    TensorFlow's kernels would abort on) are copied."""
    buffer = numpy.zeros(64 + 4 * 100, numpy.uint8)
    start = (-buffer.ctypes.data) % 64
    aligned = buffer[start:start + 400].view(numpy.float32)
    aligned[:] = numpy.arange(100)
    t = dcn._from_core(aligned)
    assert numpy.from_dlpack(t).ctypes.data == aligned.ctypes.data
    unaligned = buffer[start + 4:start + 404].view(numpy.float32)
    u = dcn._from_core(unaligned)
    assert numpy.from_dlpack(u).ctypes.data % 64 == 0
    numpy.testing.assert_array_equal((u + 1).numpy(), unaligned + 1)  # a TF kernel reads it


def test_cpu_inputs_cross_without_copy():
    t = tf.constant(numpy.arange(12, dtype=numpy.float32).reshape(3, 4))
    a = dcn._to_core(t)
    assert isinstance(a, numpy.ndarray)
    assert a.ctypes.data == numpy.from_dlpack(t).ctypes.data


# --------------------------------------------------------------------------
# GPU tier
# --------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_tensors_match_the_cpu():
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("TensorFlow sees no GPU (a CPU-only TensorFlow build, or no CUDA device)")
    import cupy
    from helpers import assert_close

    arrays, params = conv_case(CONV_CASES[0], numpy.float32)
    results = {}
    for device in ("CPU:0", "GPU:0"):
        with tf.device(device):
            tensors = [to_tf(arrays[n], True, layout_free=n == "weight") for n in CONV_NAMES]
            grad_output = to_tf(arrays["grad_output"], True)
            if device == "GPU:0":
                assert isinstance(dcn._to_core(tensors[0]), cupy.ndarray)
            for graph in (False, True):
                out, grads = conv_tape(tensors, grad_output, params, "channels_last", graph)
                assert device in out.device
                results[device, graph] = [out.numpy()] + [g.numpy() for g in grads]
    for graph in (False, True):
        for name, got, expected in zip(("output",) + CONV_NAMES, results["GPU:0", graph],
                                       results["CPU:0", graph]):
            assert_close(got, expected, numpy.float32, name)


# --------------------------------------------------------------------------
# Issue 10: a missing tensor or a bad data_format gets a clear error
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["input", "offset", "weight"])
def test_missing_conv_tensor_is_named(name):
    arrays, params = conv_case(CONV_CASES[0], numpy.float32)
    args = {k: to_tf(arrays[k], True) for k in ("input", "offset", "weight")}
    args[name] = None
    with pytest.raises(cupydcn.ArgumentTypeError, match=rf"{name} must be a tf\.Tensor .*got None"):
        dcn.deform_conv2d(args["input"], args["offset"], args["weight"], **params)


def test_missing_roi_tensors_and_bad_data_format():
    x = tf.zeros((1, 6, 6, 4))
    with pytest.raises(RuntimeError, match=r"rois must be a tf\.Tensor .*got None"):
        dcn.deform_roi_pool(x, None, output_size=2)
    with pytest.raises(TypeError, match=r"input must be a tf\.Tensor .*got None"):
        dcn.deform_psroi_pool(None, tf.zeros((1, 5)), pooled_size=2)
    with pytest.raises(cupydcn.ArgumentTypeError, match=r"rois must be a tf\.Tensor .*got object"):
        dcn.deform_roi_pool(x, object(), output_size=2)
    with pytest.raises(cupydcn.ArgumentError, match=r"data_format must be"):
        dcn.deform_roi_pool(x, tf.zeros((1, 5)), output_size=2, data_format="NHWC")
