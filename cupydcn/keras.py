"""Keras 3 layers: deformable convolution (DCNv1/v2) and deformable RoI pooling.

* :class:`DeformConv2D`: DCNv1 (Dai et al., 2017) with its offset branch built
  in: a convolution with bias of the layer's geometry predicting
  ``2*deform_groups*kh*kw`` offset channels, zero-initialised, so the layer
  starts as a plain ``keras.layers.Conv2D``.
* :class:`ModulatedDeformConv2D`: DCNv2 (Zhu et al., 2019): the branch predicts
  ``3*deform_groups*kh*kw`` channels, offsets then a mask through a sigmoid
  (mmcv's ``ModulatedDeformConv2dPack``); at init the offsets are 0 and the
  mask 0.5, so the layer starts as ``0.5 * conv(x) + bias``.
* :class:`DeformRoIPool2D`: mmcv's deformable RoI pooling on ``[features, rois]``
  (``[features, rois, offset]`` for given offsets), optionally with offsets
  (and a mask) learned by fully connected layers as mmcv's
  ``DeformRoIPoolPack`` / ``ModulatedDeformRoIPoolPack``.

The layers run on the Keras "jax" backend (through ``cupydcn.jax``), the
"torch" backend (through ``cupydcn.torch``) and the "tensorflow" backend
(through ``cupydcn.tensorflow``): CUDA kernels for GPU tensors, the CPU
backend (``cupydcn.set_cpu_backend``) for CPU tensors. Other backends raise
ValueError. Each layer takes ``algorithm=None`` (the automatic choice) or the
name of one of ``cupydcn.algorithms(op)``, saved in its config. The numbers are
those of docs/semantics.md (torchvision, mmcv). channels_last convolutions
reach the kernels without a copy: on tensorflow as NHWC tensors (the bridge
hands the core channels-last views, which ``im2col_nhwc`` reads in place on
the GPU), on torch through ``ops.transpose`` (a view: a channels_last tensor);
on jax the transposes are XLA's, and the RoI pooling's kernels are NCHW. On the jax backend the
layers are jit-compiled with the rest of the model (the ops are XLA buffer
callbacks); on torch and tensorflow they cannot be compiled
(``supports_jit = False``; Keras's ``jit_compile="auto"`` then leaves XLA off).

Kernels use Keras's layout ``(kh, kw, C/groups, filters)`` (``kernel``) and are
turned into torchvision's ``(filters, C/groups, kh, kw)`` at each call; the
offset branch's kernel is ``offset_kernel`` ``(kh, kw, C, K*deform_groups*kh*kw)``
with ``offset_bias``, K = 2 (offsets, (dy, dx) interleaved per tap as in
docs/semantics.md §2.2) or 3 (then the last third is the mask).

Example:
    >>> import keras, cupydcn.keras
    >>> x = keras.Input((32, 32, 16))
    >>> y = cupydcn.keras.ModulatedDeformConv2D(32, 3, padding="same")(x)
    >>> model = keras.Model(x, y)
"""

from __future__ import annotations

import math

import keras
from keras import ops

from cupydcn import _ops, _validation
from cupydcn._validation import ArgumentError

__all__ = ["DeformConv2D", "DeformRoIPool2D", "ModulatedDeformConv2D"]

_BACKENDS = ("jax", "torch", "tensorflow")


def _check_backend():
    """Keras's backend name, if cupydcn has a bridge for it."""
    backend = keras.backend.backend()
    if backend not in _BACKENDS:
        raise ArgumentError(f"cupydcn.keras supports the 'jax', 'torch' and 'tensorflow' Keras "
                            f"backends, got {backend!r}")
    return backend


def _bridge():
    """The cupydcn bridge of Keras's backend: ("jax" | "torch" | "tensorflow", module)."""
    backend = _check_backend()
    if backend == "jax":
        import cupydcn.jax as bridge
    elif backend == "torch":
        import cupydcn.torch as bridge
    else:
        import cupydcn.tensorflow as bridge
    return backend, bridge


def _supports_jit():
    """The jax bridge's ops are XLA buffer callbacks, compiled with the model;
    the torch and tensorflow ones call the core from Python (no torch.compile
    of the layer, no XLA)."""
    return keras.backend.backend() == "jax"


def _bridge_kwargs(backend, algorithm, data_format="channels_first"):
    """The bridge's keywords besides the op's: the TensorFlow bridge's
    ``data_format`` (the layout the layer hands it), and ``algorithm`` when
    one was chosen."""
    kwargs = {"data_format": data_format} if backend == "tensorflow" else {}
    if algorithm is not None:
        kwargs["algorithm"] = algorithm
    return kwargs


def _algorithm(op, algorithm):
    """``algorithm`` checked against ``op``'s implementations (the
    dispatcher's error names those that exist)."""
    _ops.SPECS[op].check_algorithm(algorithm)
    return algorithm


def _padding_arg(padding):
    """'valid', 'same', or an (h, w) pair of symmetric zero paddings."""
    if isinstance(padding, str):
        padding = padding.lower()
        if padding not in ("valid", "same"):
            raise ArgumentError(f"padding must be 'valid', 'same', an int or a pair of ints, "
                                f"got {padding!r}")
        return padding
    return _validation.pair(padding, "padding", 0)


def _data_format(data_format):
    data_format = keras.config.image_data_format() if data_format is None else data_format
    if data_format not in ("channels_last", "channels_first"):
        raise ArgumentError(f"data_format must be 'channels_last' or 'channels_first', "
                            f"got {data_format!r}")
    return data_format


def _to_nchw(x, data_format):
    return ops.transpose(x, (0, 3, 1, 2)) if data_format == "channels_last" else x


def _from_nchw(x, data_format):
    return ops.transpose(x, (0, 2, 3, 1)) if data_format == "channels_last" else x


class _DeformConv2DBase(keras.layers.Layer):
    """What DeformConv2D and ModulatedDeformConv2D share."""

    _modulated = False

    def __init__(self, filters, kernel_size, strides=1, padding="valid", dilation_rate=1,
                 groups=1, deform_groups=1, use_bias=True, activation=None, data_format=None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 offset_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, algorithm=None, **kwargs):
        super().__init__(**kwargs)
        _check_backend()
        self.algorithm = _algorithm("deform_conv2d", algorithm)
        self.filters = int(filters)
        self.kernel_size = _validation.pair(kernel_size, "kernel_size", 1)
        self.strides = _validation.pair(strides, "strides", 1)
        self.padding = _padding_arg(padding)
        self.dilation_rate = _validation.pair(dilation_rate, "dilation_rate", 1)
        self.groups = int(groups)
        self.deform_groups = int(deform_groups)
        self.use_bias = bool(use_bias)
        self.activation = keras.activations.get(activation)
        self.data_format = _data_format(data_format)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.offset_initializer = keras.initializers.get(offset_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        if self.filters < 1 or self.groups < 1 or self.deform_groups < 1:
            raise ArgumentError(f"filters, groups and deform_groups must be >= 1, got "
                                f"{self.filters}, {self.groups}, {self.deform_groups}")
        if self.filters % self.groups:
            raise ArgumentError(f"filters = {self.filters} must be divisible by groups = "
                                f"{self.groups}")
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.supports_jit = _supports_jit()

    @property
    def _branch_channels(self):
        kh, kw = self.kernel_size
        return (3 if self._modulated else 2) * self.deform_groups * kh * kw

    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def build(self, input_shape):
        channels = input_shape[self._channel_axis()]
        if channels is None:
            raise ArgumentError(f"{type(self).__name__} needs a known number of input channels, "
                                f"got input shape {tuple(input_shape)}")
        for divisor, name in ((self.groups, "groups"), (self.deform_groups, "deform_groups")):
            if channels % divisor:
                raise ArgumentError(f"the input's channels ({channels}) must be divisible by "
                                    f"{name} = {divisor}")
        kh, kw = self.kernel_size
        self.kernel = self.add_weight(
            name="kernel", shape=(kh, kw, channels // self.groups, self.filters),
            initializer=self.kernel_initializer, regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer=self.bias_initializer,
                regularizer=self.bias_regularizer, constraint=self.bias_constraint)
        self.offset_kernel = self.add_weight(
            name="offset_kernel", shape=(kh, kw, channels, self._branch_channels),
            initializer=self.offset_initializer)
        self.offset_bias = self.add_weight(
            name="offset_bias", shape=(self._branch_channels,), initializer="zeros")
        axis = self._channel_axis() % 4
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={axis: channels})

    def _pads(self, height, width):
        """(top, bottom, left, right) zero padding; 'same' is Keras's (and
        TensorFlow's): ceil(size / stride) outputs, the odd pixel at the end."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding != "same":
            (ph, pw) = self.padding
            return (ph, ph, pw, pw)
        pads = []
        for size, k, s, d, axis in zip((height, width), self.kernel_size, self.strides,
                                       self.dilation_rate, ("height", "width")):
            span = d * (k - 1) + 1
            if s == 1:
                total = span - 1
            elif size is None:
                raise ArgumentError(f"padding='same' with strides > 1 needs a known input "
                                    f"{axis}, got None")
            else:
                total = max((math.ceil(size / s) - 1) * s + span - size, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)

    def _spatial(self, shape):
        return (shape[1], shape[2]) if self.data_format == "channels_last" else (shape[2],
                                                                                  shape[3])

    def compute_output_shape(self, input_shape):
        height, width = self._spatial(input_shape)
        top, bottom, left, right = self._pads(height, width)
        sizes = []
        for size, pad, k, s, d in zip((height, width), (top + bottom, left + right),
                                      self.kernel_size, self.strides, self.dilation_rate):
            sizes.append(None if size is None else (size + pad - d * (k - 1) - 1) // s + 1)
        if self.data_format == "channels_last":
            return (input_shape[0], *sizes, self.filters)
        return (input_shape[0], self.filters, *sizes)

    def call(self, inputs):
        backend, bridge = _bridge()
        height, width = self._spatial(inputs.shape)
        top, bottom, left, right = self._pads(height, width)
        padded = inputs
        if top or bottom or left or right:
            spatial = [(top, bottom), (left, right)]
            widths = ([(0, 0), *spatial, (0, 0)] if self.data_format == "channels_last"
                      else [(0, 0), (0, 0), *spatial])
            padded = ops.pad(inputs, widths)
        branch = ops.conv(padded, self.offset_kernel, strides=self.strides, padding="valid",
                          data_format=self.data_format, dilation_rate=self.dilation_rate)
        branch = ops.add(branch, ops.reshape(self.offset_bias, self._bias_shape()))
        # The TensorFlow bridge takes channels_last tensors as they are (its
        # kernels read NHWC memory); the others take NCHW (on torch the
        # transposes are views: a channels_last tensor for the core).
        layout = self.data_format if backend == "tensorflow" else "channels_first"
        if layout != self.data_format:
            branch = _to_nchw(branch, self.data_format)
        n_offset = 2 * self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        if layout == "channels_last":
            offset = branch[..., :n_offset]
            mask = ops.sigmoid(branch[..., n_offset:]) if self._modulated else None
        else:
            offset = branch[:, :n_offset]
            mask = ops.sigmoid(branch[:, n_offset:]) if self._modulated else None
        if top == bottom and left == right:
            x, padding = inputs, (top, left)  # the kernels pad symmetrically themselves
        else:
            x, padding = padded, (0, 0)  # zero padding = the kernels' zero outside the image
        weight = ops.transpose(self.kernel, (3, 2, 0, 1))  # -> (filters, C/groups, kh, kw)
        bias = None if self.bias is None else ops.convert_to_tensor(self.bias)
        if layout != self.data_format:
            x = _to_nchw(x, self.data_format)
        out = bridge.deform_conv2d(x, offset, weight, bias, stride=self.strides,
                                   padding=padding, dilation=self.dilation_rate, mask=mask,
                                   **_bridge_kwargs(backend, self.algorithm, layout))
        if layout != self.data_format:
            out = _from_nchw(out, self.data_format)
        return self.activation(out) if self.activation is not None else out

    def _bias_shape(self):
        if self.data_format == "channels_last":
            return (1, 1, 1, self._branch_channels)
        return (1, self._branch_channels, 1, 1)

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "dilation_rate": self.dilation_rate,
            "groups": self.groups,
            "deform_groups": self.deform_groups,
            "use_bias": self.use_bias,
            "activation": keras.activations.serialize(self.activation),
            "data_format": self.data_format,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "offset_initializer": keras.initializers.serialize(self.offset_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "algorithm": self.algorithm,
        })
        return config


@keras.saving.register_keras_serializable(package="cupydcn")
class DeformConv2D(_DeformConv2DBase):
    """Deformable convolution v1 with a learned, zero-initialised offset branch.

    ``y = deform_conv2d(x, offset_conv(x), kernel) + bias``, where
    ``offset_conv`` is a convolution with bias of the same kernel size,
    strides, padding and dilation producing ``2*deform_groups*kh*kw`` channels
    (dy, dx per tap, docs/semantics.md §2.2). At init the offsets are 0 and the layer
    equals ``keras.layers.Conv2D`` with the same kernel.

    Args:
        filters: output channels.
        kernel_size: int or (kh, kw).
        strides: int or (sh, sw).
        padding: "valid", "same" (Keras's: ``ceil(size/stride)`` outputs, the
            odd padding pixel at the bottom/right; with strides > 1 it needs a
            known input height and width), or an int or (ph, pw) of symmetric
            zero padding.
        dilation_rate: int or (dh, dw).
        groups: weight groups (input channels and filters divisible by it).
        deform_groups: offset groups (input channels divisible by it).
        use_bias, activation, data_format (None: Keras's image_data_format),
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, kernel_constraint, bias_constraint: as for Conv2D.
        offset_initializer: initializer of the offset branch's kernel ("zeros").
        algorithm: None (the automatic choice) or the name of one of
            ``cupydcn.algorithms("deform_conv2d")``, for the forward and the
            backward (saved in ``get_config``).

    Input (B, H, W, C) (channels_first: (B, C, H, W)); output (B, Ho, Wo,
    filters) (channels_first: (B, filters, Ho, Wo)).
    """


@keras.saving.register_keras_serializable(package="cupydcn")
class ModulatedDeformConv2D(_DeformConv2DBase):
    """Modulated deformable convolution (DCNv2) with a learned offset and mask branch.

    The branch, a convolution with bias of the layer's geometry, predicts
    ``3*deform_groups*kh*kw`` channels: the first two thirds are the offsets
    (as in :class:`DeformConv2D`), the last third goes through a sigmoid and
    is the mask multiplying each sampled value (mmcv's
    ``ModulatedDeformConv2dPack``). Zero-initialised: at init the offsets are
    0 and the mask 0.5, so ``y = 0.5 * conv(x, kernel) + bias``.

    Arguments, input and output: as for :class:`DeformConv2D`.
    """

    _modulated = True


@keras.saving.register_keras_serializable(package="cupydcn")
class DeformRoIPool2D(keras.layers.Layer):
    """Deformable RoI pooling (RoIAlign style, mmcv's ``deform_roi_pool``).

    Inputs ``[features, rois]`` or ``[features, rois, offset]``: features
    (N, H, W, C) (channels_first: (N, C, H, W)); rois (R, 5) of the features'
    dtype, rows ``[batch_index, x1, y1, x2, y2]`` in image coordinates; offset
    (R, ph, pw, 2) (channels_first: (R, 2, ph, pw); channel 0 moves x, 1 moves
    y, in units of ``gamma*roi_size``). Output (R, ph, pw, C) (channels_first:
    (R, C, ph, pw)). Without offset this is RoIAlign with ``aligned=True``.

    With ``learn_offsets=True`` the layer is mmcv's ``DeformRoIPoolPack``:
    it pools without offset, flattens each RoI's (C, ph, pw) bins (mmcv's
    order), and predicts the offsets with Dense(fc_channels) -> ReLU ->
    Dense(fc_channels) -> ReLU -> Dense(2*ph*pw), the last zero-initialised,
    then pools again with them. ``modulated=True`` adds mmcv's
    ``ModulatedDeformRoIPoolPack`` mask branch, Dense(fc_channels) -> ReLU ->
    Dense(ph*pw) (zero-initialised) -> sigmoid, multiplying each bin; at init
    the offsets are 0 and the mask 0.5.

    Args:
        output_size: int or (ph, pw).
        spatial_scale: image -> feature map scale (e.g. 1/16).
        sampling_ratio: samples per bin per axis, 0 = adaptive.
        gamma: the offset scale.
        learn_offsets: predict the offsets (mmcv's pack) instead of taking
            them as a third input.
        modulated: also predict a sigmoid mask (needs learn_offsets).
        fc_channels: width of the hidden Dense layers (mmcv's
            ``deform_fc_channels``, 1024).
        data_format: None (Keras's image_data_format), "channels_last" or
            "channels_first".
        algorithm: None (the automatic choice) or the name of one of
            ``cupydcn.algorithms("deform_roi_pool")``, for the forward and the
            backward (saved in ``get_config``).
    """

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                 learn_offsets=False, modulated=False, fc_channels=1024, data_format=None,
                 algorithm=None, **kwargs):
        super().__init__(**kwargs)
        _check_backend()
        self.algorithm = _algorithm("deform_roi_pool", algorithm)
        self.output_size = _validation.pair(output_size, "output_size", 1)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.learn_offsets = bool(learn_offsets)
        self.modulated = bool(modulated)
        self.fc_channels = int(fc_channels)
        self.data_format = _data_format(data_format)
        if self.modulated and not self.learn_offsets:
            raise ArgumentError("modulated=True needs learn_offsets=True (mmcv's "
                                "ModulatedDeformRoIPoolPack learns both)")
        self.supports_jit = _supports_jit()
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = self.mask_fc = None
        if self.learn_offsets:
            self.offset_fc = [keras.layers.Dense(self.fc_channels, activation="relu"),
                              keras.layers.Dense(self.fc_channels, activation="relu"),
                              keras.layers.Dense(2 * bins, kernel_initializer="zeros")]
        if self.modulated:
            self.mask_fc = [keras.layers.Dense(self.fc_channels, activation="relu"),
                            keras.layers.Dense(bins, kernel_initializer="zeros",
                                               activation="sigmoid")]

    def _split(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) not in (2, 3):
            raise ArgumentError(
                "DeformRoIPool2D takes [features, rois] or [features, rois, offset], "
                f"got {type(inputs).__name__}")
        if len(inputs) == 3 and self.learn_offsets:
            raise ArgumentError("DeformRoIPool2D(learn_offsets=True) predicts its offsets: "
                                "call it on [features, rois]")
        return inputs[0], inputs[1], inputs[2] if len(inputs) == 3 else None

    def build(self, input_shape):
        features = input_shape[0]
        channels = features[-1 if self.data_format == "channels_last" else 1]
        flat = None if channels is None else channels * self.output_size[0] * self.output_size[1]
        if self.learn_offsets and flat is None:
            raise ArgumentError("DeformRoIPool2D(learn_offsets=True) needs a known number of "
                                "feature channels")
        for stack in (self.offset_fc, self.mask_fc):
            shape = (None, flat)
            for dense in stack or ():
                dense.build(shape)
                shape = dense.compute_output_shape(shape)

    def compute_output_shape(self, input_shape):
        features, rois = input_shape[0], input_shape[1]
        channels = features[-1 if self.data_format == "channels_last" else 1]
        ph, pw = self.output_size
        if self.data_format == "channels_last":
            return (rois[0], ph, pw, channels)
        return (rois[0], channels, ph, pw)

    def call(self, inputs):
        backend, bridge = _bridge()
        features, rois, offset = self._split(inputs)
        x = _to_nchw(features, self.data_format)
        if offset is not None:
            offset = _to_nchw(offset, self.data_format)
        ph, pw = self.output_size

        def pool(offset=None, mask=None):
            return bridge.deform_roi_pool(x, rois, offset, output_size=self.output_size,
                                          spatial_scale=self.spatial_scale,
                                          sampling_ratio=self.sampling_ratio, gamma=self.gamma,
                                          mask=mask, **_bridge_kwargs(backend, self.algorithm))

        mask = None
        if self.learn_offsets:
            flat = ops.reshape(pool(), (-1, x.shape[1] * ph * pw))  # (R, C*ph*pw), mmcv's order
            offset = flat
            for dense in self.offset_fc:
                offset = dense(offset)
            offset = ops.reshape(offset, (-1, 2, ph, pw))
            if self.modulated:
                mask = flat
                for dense in self.mask_fc:
                    mask = dense(mask)
                mask = ops.reshape(mask, (-1, 1, ph, pw))
        return _from_nchw(pool(offset, mask), self.data_format)

    def get_config(self):
        config = super().get_config()
        config.update({
            "output_size": self.output_size,
            "spatial_scale": self.spatial_scale,
            "sampling_ratio": self.sampling_ratio,
            "gamma": self.gamma,
            "learn_offsets": self.learn_offsets,
            "modulated": self.modulated,
            "fc_channels": self.fc_channels,
            "data_format": self.data_format,
            "algorithm": self.algorithm,
        })
        return config
