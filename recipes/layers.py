"""Custom layers the recipes need, registered so that saved models load with ``safe_mode=True``.

Every layer exists once per Keras API (tf_keras and Keras 3): :func:`custom_layers` builds the
classes for one API and registers them under the package name ``ktoolkit``. Under tf_keras they
use TensorFlow ops that the TFLite converter maps to builtin ops; under Keras 3 they use
``keras.ops`` so they run on any Keras 3 backend.
"""

from __future__ import annotations

import functools
import types

from recipes._keras import check_api, get_keras

# Per-channel statistics of ImageNet, in RGB order, on the 0..255 pixel scale.
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# name -> (what the model expects, documented for users and for TFLite metadata)
PREPROCESSING_MODES = {
    "caffe": "RGB to BGR, then minus the ImageNet mean per channel (VGG, ResNet-50 in keras.applications)",
    "torch": "scale to 0..1, then minus the ImageNet mean and divided by its standard deviation per channel",
    "tf": "scale to -1..1 (x / 127.5 - 1; Inception, MobileNet)",
    "unit": "scale to 0..1 (x / 255)",
    "none": "no preprocessing: the model takes its inputs as they are",
}


def check_preprocessing(mode: str) -> str:
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"preprocessing={mode!r} is not known; use one of {', '.join(PREPROCESSING_MODES)}.")
    return mode


def preprocessing_affine(mode: str, channels: int = 3) -> tuple[list[float], list[float], bool]:
    """Returns (scale, offset, reverse_channels) so that ``y = x[..., order] * scale + offset``."""
    check_preprocessing(mode)
    if mode == "none":
        return [1.0] * channels, [0.0] * channels, False
    if mode == "unit":
        return [1 / 255.0] * channels, [0.0] * channels, False
    if mode == "tf":
        return [1 / 127.5] * channels, [-1.0] * channels, False
    if channels != 3:
        raise ValueError(f"preprocessing={mode!r} needs 3 input channels, got {channels}; use 'unit' or 'tf'.")
    if mode == "torch":
        return [1 / s for s in IMAGENET_STD_RGB], [-m / s for m, s in zip(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)], False
    return [1.0] * 3, [-m for m in CAFFE_MEAN_BGR], True  # caffe: applied after RGB -> BGR


@functools.cache
def custom_layers(api: str | None = None) -> types.SimpleNamespace:
    """Builds and registers the custom layer classes for one Keras API (cached)."""
    api = check_api(api)
    K = get_keras(api)
    register = K.saving.register_keras_serializable(package="ktoolkit")
    if api == "tf_keras":
        import tensorflow as tf

        ops = None
    else:
        tf = None
        ops = K.ops

    factories = (
        _local_response_normalization,
        _image_preprocessing,
        _channel_pad,
        _random_masking,
        _salt_and_pepper,
        _neighbour_vote,
    )
    classes = {}
    for factory in factories:
        cls = factory(K, tf, ops)
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
        register(cls)
        classes[cls.__name__] = cls
    return types.SimpleNamespace(**classes)


def _local_response_normalization(K, tf, ops):
    """The LocalResponseNormalization class for one Keras API (``tf``: TensorFlow under tf_keras, else None; ``ops``: keras.ops)."""

    class LocalResponseNormalization(K.layers.Layer):
        """Local response normalization across channels (Krizhevsky et al. 2012, section 3.3).

        ``b = a / (bias + alpha * sum(a_j^2 for j within depth_radius of the channel)) ** beta``.
        The paper's k=2, n=5, alpha=1e-4, beta=0.75 are the defaults (n = 2 * depth_radius + 1).
        """

        def __init__(self, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75, **kwargs):
            super().__init__(**kwargs)
            self.depth_radius = int(depth_radius)
            self.bias = float(bias)
            self.alpha = float(alpha)
            self.beta = float(beta)

        def call(self, inputs):
            if tf is not None:
                return tf.nn.local_response_normalization(
                    inputs, depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha, beta=self.beta
                )
            r = self.depth_radius
            channels = inputs.shape[-1]
            squared = ops.pad(ops.square(inputs), [[0, 0], [0, 0], [0, 0], [r, r]])
            window = sum(squared[..., i : i + channels] for i in range(2 * r + 1))
            return inputs / ops.power(self.bias + self.alpha * window, self.beta)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {
                **super().get_config(),
                "depth_radius": self.depth_radius,
                "bias": self.bias,
                "alpha": self.alpha,
                "beta": self.beta,
            }

    return LocalResponseNormalization


def _image_preprocessing(K, tf, ops):
    """The ImagePreprocessing class for one Keras API (``tf``: TensorFlow under tf_keras, else None; ``ops``: keras.ops)."""

    class ImagePreprocessing(K.layers.Layer):
        """The normalization an architecture expects, inside the model, so it takes plain pixels.

        ``mode`` is one of :data:`PREPROCESSING_MODES`. Inputs are pixels on the 0..255 scale.
        """

        def __init__(self, mode="unit", **kwargs):
            super().__init__(**kwargs)
            self.mode = check_preprocessing(mode)

        def build(self, input_shape):
            scale, offset, reverse = preprocessing_affine(self.mode, int(input_shape[-1]))
            self._scale, self._offset, self._reverse = scale, offset, reverse
            super().build(input_shape)

        def is_scalar(self) -> bool:
            """True when every channel gets the same scale and offset and none is reordered ("tf", "unit",
            one channel): the normalization is then one multiply and one add by scalars, which the
            converters keep scalar and an int8 export can fold into the input's quantization."""
            return not self._reverse and len(set(self._scale)) == 1 and len(set(self._offset)) == 1

        def call(self, inputs):
            x = inputs
            if self._reverse:
                x = tf.reverse(x, axis=[-1]) if tf is not None else ops.flip(x, axis=-1)
            dtype = x.dtype
            # Scalars when the channels agree: the same numbers, and no per-channel vector ops in the files.
            scale, offset = (self._scale[0], self._offset[0]) if self.is_scalar() else (self._scale, self._offset)
            scale = K.ops.convert_to_tensor(scale, dtype) if tf is None else tf.constant(scale, dtype)
            offset = K.ops.convert_to_tensor(offset, dtype) if tf is None else tf.constant(offset, dtype)
            return x * scale + offset

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "mode": self.mode}

    return ImagePreprocessing


def _channel_pad(K, tf, ops):
    """The ChannelPad class for one Keras API (``tf``: TensorFlow under tf_keras, else None; ``ops``: keras.ops)."""

    class ChannelPad(K.layers.Layer):
        """Zero-pads the channel axis up to ``channels``: the parameter-free projection shortcut
        ("option A") of the CIFAR ResNets (He et al. 2016, section 4.2)."""

        def __init__(self, channels, **kwargs):
            super().__init__(**kwargs)
            self.channels = int(channels)

        def call(self, inputs):
            extra = self.channels - inputs.shape[-1]
            before, after = extra // 2, extra - extra // 2
            paddings = [[0, 0], [0, 0], [0, 0], [before, after]]
            return tf.pad(inputs, paddings) if tf is not None else ops.pad(inputs, paddings)

        def compute_output_shape(self, input_shape):
            return (*input_shape[:-1], self.channels)

        def get_config(self):
            return {**super().get_config(), "channels": self.channels}

    return ChannelPad


def _random_masking(K, tf, ops):
    """The RandomMasking class for one Keras API (``tf``: TensorFlow under tf_keras, else None; ``ops``: keras.ops)."""

    class RandomMasking(K.layers.Layer):
        """Masking noise for denoising autoencoders: during training, each input value is set to 0
        with probability ``rate`` (Vincent et al. 2008). Unlike Dropout, nothing is rescaled."""

        def __init__(self, rate=0.25, seed=None, **kwargs):
            super().__init__(**kwargs)
            self.rate = float(rate)
            self.seed = seed
            self._generator = K.random.SeedGenerator(seed) if tf is None else None

        def call(self, inputs, training=None):
            if not training or self.rate <= 0:
                return inputs
            if tf is not None:
                keep = tf.random.uniform(tf.shape(inputs), seed=self.seed) >= self.rate
                return inputs * tf.cast(keep, inputs.dtype)
            keep = K.random.uniform(ops.shape(inputs), seed=self._generator) >= self.rate
            return inputs * ops.cast(keep, inputs.dtype)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "rate": self.rate, "seed": self.seed}

    return RandomMasking


def _salt_and_pepper(K, tf, ops):
    """The SaltAndPepper class for one Keras API (``tf``: TensorFlow under tf_keras, else None; ``ops``: keras.ops)."""

    class SaltAndPepper(K.layers.Layer):
        """Salt-and-pepper noise: during training, a fraction ``rate`` of input values is set to
        ``low`` or ``high`` with equal probability (Vincent et al. 2010)."""

        def __init__(self, rate=0.1, low=0.0, high=1.0, seed=None, **kwargs):
            super().__init__(**kwargs)
            self.rate = float(rate)
            self.low = float(low)
            self.high = float(high)
            self.seed = seed
            self._generator = K.random.SeedGenerator(seed) if tf is None else None

        def call(self, inputs, training=None):
            if not training or self.rate <= 0:
                return inputs
            if tf is not None:
                u = tf.random.uniform(tf.shape(inputs), seed=self.seed)
                salt = tf.cast(u < self.rate / 2, inputs.dtype)
                pepper = tf.cast((u >= self.rate / 2) & (u < self.rate), inputs.dtype)
            else:
                u = K.random.uniform(ops.shape(inputs), seed=self._generator)
                salt = ops.cast(u < self.rate / 2, inputs.dtype)
                pepper = ops.cast((u >= self.rate / 2) & (u < self.rate), inputs.dtype)
            keep = 1.0 - salt - pepper
            return inputs * keep + salt * self.high + pepper * self.low

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "rate": self.rate, "low": self.low, "high": self.high, "seed": self.seed}

    return SaltAndPepper


def _neighbour_vote(K, tf, ops):
    """The NeighbourVote class for one Keras API (``tf``: TensorFlow under tf_keras, else None; ``ops``: keras.ops)."""

    class NeighbourVote(K.layers.Layer):
        """The vote of a k-nearest-neighbour classifier (ktoolkit/transfer/knn.py): from one score per
        reference image (higher is nearer), the share of each class among the ``k`` best-scoring references.

        The references' labels are a non-trainable int32 weight. Uniform votes; of tied classes, argmax of
        the output gives the lowest index (as scikit-learn's KNeighborsClassifier). Ops: top-k, gather,
        one-hot, mean (TFLite builtins).
        """

        def __init__(self, k=1, num_classes=2, **kwargs):
            super().__init__(**kwargs)
            self.k = int(k)
            self.num_classes = int(num_classes)

        def build(self, input_shape):
            self.reference_labels = self.add_weight(
                name="reference_labels",
                shape=(int(input_shape[-1]),),
                dtype="int32",
                initializer="zeros",
                trainable=False,
            )
            super().build(input_shape)

        def call(self, scores):
            if tf is not None:
                nearest = tf.math.top_k(scores, k=self.k).indices
                votes = tf.one_hot(tf.gather(self.reference_labels, nearest), self.num_classes, dtype=scores.dtype)
                return tf.reduce_mean(votes, axis=1)
            _, nearest = ops.top_k(scores, k=self.k)
            votes = ops.one_hot(ops.take(self.reference_labels, nearest), self.num_classes, dtype=scores.dtype)
            return ops.mean(votes, axis=1)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], self.num_classes)

        def get_config(self):
            return {**super().get_config(), "k": self.k, "num_classes": self.num_classes}

    return NeighbourVote
