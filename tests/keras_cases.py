"""cupydcn.keras cases, run under one Keras backend per process.

Keras picks its backend once, at import, from KERAS_BACKEND, so
tests/test_keras.py runs this file in a subprocess per backend ("jax", "torch"
and "tensorflow"): ``KERAS_BACKEND=jax python -m pytest tests/keras_cases.py``.
The file name does not start with ``test_`` so that the main run does not
collect it in its own process.
"""

import sys

import numpy
import pytest

keras = pytest.importorskip("keras")

import cupydcn
import cupydcn.keras as ck
from helpers import spy_choices

BACKEND = keras.backend.backend()
CONV_LAYERS = [ck.DeformConv2D, ck.ModulatedDeformConv2D]


def to_numpy(x):
    """A float64 copy. Not keras.ops.convert_to_numpy: its numpy.array() of a
    torch 2.13 tensor or a tf.Variable warns under NumPy 2 (their __array__
    takes no ``copy``)."""
    if isinstance(x, keras.Variable):
        x = keras.ops.convert_to_tensor(x)
    if BACKEND == "torch" and not isinstance(x, numpy.ndarray):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "numpy"):
        x = x.numpy()
    return numpy.asarray(x, numpy.float64)


def assert_close(got, expected, tol=1e-5, what=""):
    got, expected = to_numpy(got), to_numpy(expected)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    err = numpy.linalg.norm(got - expected) / max(numpy.linalg.norm(expected), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


# Keras's saving and get/set_weights call numpy.array() on torch 2.13 tensors
# and tf.Variables, whose __array__ takes no ``copy``: NumPy 2 warns.
NUMPY2_ARRAY_COPY = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def random_input(shape, seed=0):
    return numpy.random.default_rng(seed).standard_normal(shape).astype("float32")


# kwargs of the layer; padding as an int is compared with ZeroPadding2D + "valid"
CONV_CONFIGS = {
    "same": dict(kernel_size=3, padding="same"),
    "valid-k23": dict(kernel_size=(2, 3), padding="valid"),
    "same-stride2": dict(kernel_size=3, padding="same", strides=2),
    "same-k2-stride2-asymmetric": dict(kernel_size=2, padding="same", strides=2),
    "int-pad-dilation2": dict(kernel_size=3, padding=2, dilation_rate=2),
    "groups2-deform_groups2": dict(kernel_size=3, padding="same", groups=2, deform_groups=2),
    "no-bias": dict(kernel_size=3, padding="same", use_bias=False),
    "channels_first": dict(kernel_size=3, padding="same", data_format="channels_first"),
}


@pytest.mark.parametrize("layer_class", CONV_LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("config", list(CONV_CONFIGS.values()), ids=list(CONV_CONFIGS))
def test_zero_initialised_branch_is_a_plain_conv2d(layer_class, config):
    """Offsets 0 (and mask sigmoid(0) = 0.5 for DCNv2) at init: the layer is
    Keras's own Conv2D with the same kernel (halved for DCNv2), bias added."""
    channels_first = config.get("data_format") == "channels_first"
    x = random_input((2, 4, 9, 8) if channels_first else (2, 9, 8, 4))
    layer = layer_class(6, **config)
    out = layer(x)
    if layer.bias is not None:
        layer.bias.assign(random_input((6,), seed=1))
        out = layer(x)
    conv_config = dict(config)
    padding = conv_config.pop("padding")
    conv_config.pop("deform_groups", None)
    if isinstance(padding, int):
        pad = keras.layers.ZeroPadding2D(padding, data_format=conv_config.get("data_format"))
        x_conv, padding = pad(x), "valid"
    else:
        x_conv = x
    conv_config["use_bias"] = False
    conv = keras.layers.Conv2D(6, padding=padding, **conv_config)
    conv.build(x_conv.shape)
    conv.kernel.assign(layer.kernel)
    expected = to_numpy(conv(x_conv))
    if layer_class is ck.ModulatedDeformConv2D:
        expected = 0.5 * expected
    if layer.bias is not None:
        axis = 1 if channels_first else -1
        shape = [1, 1, 1, 1]
        shape[axis] = 6
        expected = expected + to_numpy(layer.bias).reshape(shape)
    assert tuple(out.shape) == expected.shape == layer.compute_output_shape(x.shape)
    assert_close(out, expected, what=layer_class.__name__)


@pytest.mark.parametrize("layer_class", CONV_LAYERS, ids=lambda c: c.__name__)
def test_layer_is_the_core_op_on_its_branch(layer_class):
    """With a random offset branch, the layer computes cupydcn.deform_conv2d
    (NCHW, torchvision's weight layout) on the branch's offsets and mask."""
    x = random_input((2, 7, 6, 4))
    layer = layer_class(3, 3, padding="same", deform_groups=2, offset_initializer="random_normal")
    out = layer(x)
    kernel = to_numpy(layer.kernel).astype(numpy.float32)
    branch = to_numpy(keras.ops.conv(x, layer.offset_kernel, padding="same"))
    branch = (branch + to_numpy(layer.offset_bias)).astype(numpy.float32).transpose(0, 3, 1, 2)
    taps = 2 * 2 * 9
    mask = None
    if layer_class is ck.ModulatedDeformConv2D:
        mask = 1 / (1 + numpy.exp(-branch[:, taps:]))
    expected = cupydcn.deform_conv2d(x.transpose(0, 3, 1, 2), branch[:, :taps],
                                     kernel.transpose(3, 2, 0, 1),
                                     to_numpy(layer.bias).astype(numpy.float32), padding=1,
                                     mask=mask)
    assert_close(out, expected.transpose(0, 2, 3, 1), what=layer_class.__name__)


@NUMPY2_ARRAY_COPY
@pytest.mark.parametrize("layer_class", CONV_LAYERS, ids=lambda c: c.__name__)
def test_get_config_round_trip(layer_class, tmp_path):
    layer = layer_class(5, (3, 2), strides=(2, 1), padding=(1, 0), dilation_rate=(1, 2),
                        groups=1, deform_groups=2, use_bias=False, activation="relu",
                        kernel_initializer="he_normal", offset_initializer="zeros",
                        kernel_regularizer="l2", name="dcn")
    config = layer.get_config()
    rebuilt = layer_class.from_config(config)
    assert rebuilt.get_config() == config
    again = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(again) is layer_class and again.get_config() == config

    x = random_input((2, 8, 8, 4))
    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, layer_class(4, 3, padding="same", deform_groups=2,
                                            offset_initializer="random_normal")(inputs))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert_close(loaded(x), model(x), tol=0, what="reloaded model")


@pytest.mark.parametrize("layer_class", CONV_LAYERS, ids=lambda c: c.__name__)
def test_fit_trains_every_weight(layer_class):
    keras.utils.set_random_seed(0)
    x = random_input((8, 6, 6, 3))
    y = random_input((8, 6, 6, 2), seed=1)
    inputs = keras.Input((6, 6, 3))
    layer = layer_class(2, 3, padding="same")
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = {w.path: to_numpy(w) for w in layer.weights}
    history = model.fit(x, y, epochs=4, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0], losses
    for w in layer.weights:  # the offset (and mask) branch too
        assert not numpy.array_equal(to_numpy(w), before[w.path]), w.path


@NUMPY2_ARRAY_COPY
def test_mixed_precision():
    x = random_input((2, 6, 6, 3))
    layer = ck.ModulatedDeformConv2D(4, 3, padding="same", dtype="mixed_float16")
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == "float32"
    reference = ck.ModulatedDeformConv2D(4, 3, padding="same")
    reference(x)
    reference.set_weights(layer.get_weights())
    assert_close(out, reference(x), tol=1e-2, what="float16")


def test_conv_argument_errors():
    with pytest.raises(ValueError, match="padding must be 'valid', 'same', an int or a pair"):
        ck.DeformConv2D(4, 3, padding="causal")
    with pytest.raises(ValueError, match="strides must be >= 1, got 0"):  # the core's check
        ck.DeformConv2D(4, 3, strides=0)
    with pytest.raises(ValueError, match="filters = 5 must be divisible by groups = 2"):
        ck.DeformConv2D(5, 3, groups=2)
    with pytest.raises(ValueError, match=r"the input's channels \(6\) must be divisible by "
                                         "deform_groups = 4"):
        ck.DeformConv2D(4, 3, deform_groups=4)(random_input((1, 5, 5, 6)))


# --------------------------------------------------------------------------
# RoI pooling
# --------------------------------------------------------------------------

FEATURES = random_input((2, 8, 9, 3), seed=2)
ROIS = numpy.array([[0, 1, 1, 6, 5], [1, 0.5, 2, 8, 7], [1, 2, 2, 4, 3]], numpy.float32)


def core_roi_pool(offset=None, mask=None, **params):
    out = cupydcn.deform_roi_pool(FEATURES.transpose(0, 3, 1, 2), ROIS, offset,
                                  mask=mask, **params)
    return out.transpose(0, 2, 3, 1)


def test_roi_pool_is_the_core_op():
    layer = ck.DeformRoIPool2D((3, 2), spatial_scale=0.5, sampling_ratio=2, gamma=0.2)
    assert_close(layer([FEATURES, ROIS]), core_roi_pool(output_size=(3, 2), spatial_scale=0.5,
                                                        sampling_ratio=2, gamma=0.2))
    offset = random_input((3, 3, 2, 2), seed=3)
    assert_close(layer([FEATURES, ROIS, offset]),
                 core_roi_pool(offset.transpose(0, 3, 1, 2), output_size=(3, 2),
                               spatial_scale=0.5, sampling_ratio=2, gamma=0.2))
    first = ck.DeformRoIPool2D(2, data_format="channels_first")
    assert_close(first([FEATURES.transpose(0, 3, 1, 2), ROIS]),
                 core_roi_pool(output_size=2).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("modulated", [False, True])
def test_roi_pool_pack_starts_as_plain_pooling(modulated):
    layer = ck.DeformRoIPool2D(3, sampling_ratio=2, learn_offsets=True, modulated=modulated,
                               fc_channels=16)
    expected = core_roi_pool(output_size=3, sampling_ratio=2)
    assert_close(layer([FEATURES, ROIS]), 0.5 * expected if modulated else expected)
    assert len(layer.trainable_weights) == (10 if modulated else 6)


@pytest.mark.parametrize("modulated", [False, True])
def test_roi_pool_pack_fit(modulated):
    keras.utils.set_random_seed(0)
    features = keras.Input((8, 9, 3))
    rois = keras.Input((5,))
    layer = ck.DeformRoIPool2D(2, sampling_ratio=2, learn_offsets=True, modulated=modulated,
                               fc_channels=8)
    model = keras.Model([features, rois], layer([features, rois]))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    # one RoI per image: fit slices features and rois along the same axis
    batch_rois = numpy.array([[0, 1, 1, 6, 5], [1, 0.5, 2, 8, 7]], numpy.float32)
    target = random_input((2, 2, 2, 3), seed=4)
    before = [to_numpy(w) for w in layer.trainable_weights]
    history = model.fit([FEATURES, batch_rois], target, epochs=3, batch_size=2, shuffle=False,
                        verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0], losses
    last_offset_kernel = layer.offset_fc[-1].kernel
    assert not numpy.array_equal(to_numpy(last_offset_kernel), before[4])


def test_roi_pool_config_round_trip():
    layer = ck.DeformRoIPool2D((3, 4), spatial_scale=0.25, sampling_ratio=1, gamma=0.3,
                               learn_offsets=True, modulated=True, fc_channels=32,
                               data_format="channels_first", name="pool")
    config = layer.get_config()
    assert ck.DeformRoIPool2D.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="modulated=True needs learn_offsets=True"):
        ck.DeformRoIPool2D(2, modulated=True)
    with pytest.raises(ValueError, match=r"predicts its offsets: call it on \[features, rois\]"):
        ck.DeformRoIPool2D(2, learn_offsets=True, fc_channels=4)([FEATURES, ROIS,
                                                                  random_input((3, 2, 2, 2))])


# --------------------------------------------------------------------------
# algorithm=
# --------------------------------------------------------------------------


def bridge_takes_algorithm():
    """Whether the bridge of this backend has ``algorithm=``."""
    import inspect

    bridge = ck._bridge()[1]
    return "algorithm" in inspect.signature(bridge.deform_conv2d).parameters


# layer class -> (op, constructor kwargs, inputs, target shape); DeformConv2D
# shares ModulatedDeformConv2D's code
LAYER_CASES = {
    "ModulatedDeformConv2D": ("deform_conv2d", dict(filters=3, kernel_size=3, padding="same",
                                                    deform_groups=2,
                                                    offset_initializer="random_normal"),
                              [random_input((2, 6, 5, 4))], (2, 6, 5, 3)),
    "DeformRoIPool2D": ("deform_roi_pool", dict(output_size=2, sampling_ratio=2,
                                                learn_offsets=True, modulated=True,
                                                fc_channels=8),
                        [FEATURES[:2], numpy.array([[0, 1, 1, 6, 5], [1, 0.5, 2, 8, 7]],
                                                   numpy.float32)], (2, 2, 2, 3)),
}


@NUMPY2_ARRAY_COPY
@pytest.mark.parametrize("name,algorithm", [(n, a) for n, case in LAYER_CASES.items()
                                            for a in cupydcn.algorithms(case[0])])
def test_algorithm_selects_the_implementation(name, algorithm, monkeypatch):
    """The layer's algorithm runs its op, forward and backward (a fit step),
    and its outputs are the reference implementation's within float32's
    tolerance; the config keeps it."""
    if not bridge_takes_algorithm():
        pytest.skip(f"the {BACKEND} bridge has no algorithm= yet")
    op, kwargs, inputs, target_shape = LAYER_CASES[name]
    layer_class = getattr(ck, name)
    keras.utils.set_random_seed(0)
    layer = layer_class(**kwargs, algorithm=algorithm)
    reference = layer_class(**kwargs, algorithm="reference")
    arguments = inputs if len(inputs) > 1 else inputs[0]
    to_numpy(reference(arguments))  # let the jax backend's asynchronous call finish first
    seen = spy_choices(monkeypatch)
    out = to_numpy(layer(arguments))  # waits for the jax backend's asynchronous call
    assert seen and set(seen) == {algorithm}, seen
    reference.set_weights(layer.get_weights())
    # TF32 is held to float16's tolerance (Implementation.forward_tolerance_as)
    from cupydcn import _dispatch

    tol = 1e-2 if _dispatch.implementation(op, algorithm).forward_tolerance_as else 1e-5
    assert_close(out, reference(arguments), tol, what=f"{algorithm} against the reference")
    assert layer.get_config()["algorithm"] == algorithm
    assert layer_class.from_config(layer.get_config()).algorithm == algorithm
    symbolic = [keras.Input(x.shape[1:]) for x in inputs]
    model = keras.Model(symbolic, layer_class(**kwargs, algorithm=algorithm)(
        symbolic if len(symbolic) > 1 else symbolic[0]))
    model.compile(optimizer="sgd", loss="mse")
    seen.clear()
    model.fit(inputs, random_input(target_shape, seed=5), epochs=1, batch_size=2, verbose=0)
    assert len(seen) >= 2 and set(seen) == {algorithm}, seen  # the backward too


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_unknown_algorithm_names_those_that_exist(name):
    op, kwargs, _, _ = LAYER_CASES[name]
    names = ", ".join(cupydcn.algorithms(op))
    with pytest.raises(cupydcn.ArgumentError, match=f"algorithm must be None or one of {names} "
                                                    f"for {op}, got 'winograd'"):
        getattr(ck, name)(**kwargs, algorithm="winograd")
    assert getattr(ck, name)(**kwargs).get_config()["algorithm"] is None


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------


BRIDGES = {"jax": "cupydcn.jax", "torch": "cupydcn.torch", "tensorflow": "cupydcn.tensorflow"}


def test_dispatches_to_the_backend_bridge_only():
    ck.DeformConv2D(2, 3)(random_input((1, 5, 5, 2)))
    assert BRIDGES[BACKEND] in sys.modules
    for backend, other in BRIDGES.items():
        if backend != BACKEND:
            assert other not in sys.modules, other


def test_jit_compile_only_on_the_jax_backend():
    """jit_compile="auto" compiles the model (the layers included) on the jax
    backend, whose ops are XLA buffer callbacks, and leaves XLA off elsewhere."""
    inputs = keras.Input((6, 6, 3))
    features = keras.Input((8, 9, 3))
    rois = keras.Input((5,))
    for model in (keras.Model(inputs, ck.ModulatedDeformConv2D(2, 3, padding="same")(inputs)),
                  keras.Model([features, rois], ck.DeformRoIPool2D(2)([features, rois]))):
        model.compile(optimizer="sgd", loss="mse")
        assert model.jit_compile is (BACKEND == "jax")


def test_other_backends_are_refused(monkeypatch):
    built = ck.DeformConv2D(2, 3)
    built(random_input((1, 5, 5, 2)))
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    message = ("cupydcn.keras supports the 'jax', 'torch' and 'tensorflow' Keras backends, "
               "got 'numpy'")
    for make in (lambda: ck.DeformConv2D(2, 3), lambda: ck.ModulatedDeformConv2D(2, 3),
                 lambda: ck.DeformRoIPool2D(2)):
        with pytest.raises(ValueError) as info:
            make()
        assert str(info.value) == message
    with pytest.raises(ValueError, match="supports the 'jax', 'torch' and 'tensorflow' Keras"):
        built.call(random_input((1, 5, 5, 2)))


# --------------------------------------------------------------------------
# GPU tier: the torch backend on CUDA
# --------------------------------------------------------------------------


@pytest.mark.gpu
def test_torch_backend_layers_on_cuda():
    if BACKEND != "torch":
        pytest.skip("the Keras GPU tier runs the torch backend")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    keras.utils.set_random_seed(0)
    x = random_input((4, 12, 10, 8))
    for layer_class in CONV_LAYERS:
        layer = layer_class(6, 3, padding="same", strides=2, deform_groups=2,
                            offset_initializer=keras.initializers.RandomNormal(stddev=0.05))
        out = layer(x)
        assert out.device.type == "cuda"
        # the same weights on the CPU path (the NumPy reference) agree
        kernel = to_numpy(layer.kernel).astype(numpy.float32).transpose(3, 2, 0, 1)
        branch = keras.ops.conv(keras.ops.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]),
                                layer.offset_kernel, strides=2)
        branch = (to_numpy(branch) + to_numpy(layer.offset_bias)).astype(numpy.float32)
        branch = branch.transpose(0, 3, 1, 2)
        taps = 2 * 2 * 9
        mask = (1 / (1 + numpy.exp(-branch[:, taps:])) if layer_class is ck.ModulatedDeformConv2D
                else None)
        xp = numpy.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]).transpose(0, 3, 1, 2)
        expected = cupydcn.deform_conv2d(xp, branch[:, :taps], kernel,
                                         to_numpy(layer.bias).astype(numpy.float32), stride=2,
                                         mask=mask.astype(numpy.float32) if mask is not None
                                         else None)
        assert_close(out, expected.transpose(0, 2, 3, 1), what=layer_class.__name__)
        inputs = keras.Input((12, 10, 8))
        model = keras.Model(inputs, layer_class(4, 3, padding="same")(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        history = model.fit(x, random_input((4, 12, 10, 4), seed=1), epochs=3, batch_size=2,
                            verbose=0)
        assert history.history["loss"][-1] < history.history["loss"][0]
    pool = ck.DeformRoIPool2D(3, sampling_ratio=2, learn_offsets=True, modulated=True,
                              fc_channels=8)
    pooled = pool([FEATURES, ROIS])
    assert pooled.device.type == "cuda"
    assert_close(pooled, 0.5 * core_roi_pool(output_size=3, sampling_ratio=2))
