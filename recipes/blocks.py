"""Pieces every recipe shares: the input and its preprocessing, conv/dense layers with the
paper's options (batch norm, L2, initializers), the classifier head, and loading weights.

A :class:`Kit` carries the Keras module and the options one model is built with, so each family's
builder reads as the paper's table: ``x = kit.conv(x, 64, 3, name="block1_conv1")``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from recipes._keras import check_api, get_keras
from recipes.layers import check_preprocessing, custom_layers

POOLINGS = (None, "avg", "max")


@dataclass
class Kit:
    """The Keras API and the regularization options of one model being built."""

    api: str = "tf_keras"
    weight_decay: float = 0.0
    kernel_initializer: str = "glorot_uniform"

    def __post_init__(self):
        self.api = check_api(self.api)
        self.K = get_keras(self.api)
        self.layers = self.K.layers
        self.custom = custom_layers(self.api)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0 (an L2 factor such as 1e-4).")

    def regularizer(self):
        return self.K.regularizers.L2(self.weight_decay) if self.weight_decay else None

    def conv(
        self,
        x,
        filters,
        kernel_size,
        strides=1,
        padding="same",
        name=None,
        activation=None,
        use_bias=True,
        groups=1,
        dilation_rate=1,
    ):
        return self.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            activation=activation,
            use_bias=use_bias,
            groups=groups,
            dilation_rate=dilation_rate,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.regularizer(),
            name=name,
        )(x)

    def dense(self, x, units, name=None, activation=None, use_bias=True, dtype=None):
        return self.layers.Dense(
            units,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.regularizer(),
            name=name,
            dtype=dtype,
        )(x)

    def bn(self, x, name=None, epsilon=1e-3, momentum=0.99, scale=True):
        return self.layers.BatchNormalization(axis=-1, epsilon=epsilon, momentum=momentum, scale=scale, name=name)(x)

    def act(self, x, activation="relu", name=None):
        return self.layers.Activation(activation, name=name)(x)

    def conv_bn_act(
        self,
        x,
        filters,
        kernel_size,
        strides=1,
        padding="same",
        name="conv",
        activation="relu",
        use_bias=False,
        bn_epsilon=1e-3,
        bn_scale=True,
    ):
        """Conv, batch norm, activation, named ``{name}_conv``, ``{name}_bn``, ``{name}_{activation}``."""
        x = self.conv(x, filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias, name=f"{name}_conv")
        x = self.bn(x, name=f"{name}_bn", epsilon=bn_epsilon, scale=bn_scale)
        return self.act(x, activation, name=f"{name}_{activation}") if activation else x

    def lrn(self, x, name, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75):
        return self.custom.LocalResponseNormalization(depth_radius, bias, alpha, beta, name=name)(x)


def image_input(
    kit: Kit, input_shape, default_shape, min_size: int, preprocessing: str, include_preprocessing: bool, recipe: str
):
    """Creates the model input and, optionally, the in-model preprocessing layer.

    Returns ``(inputs, x)``. Raises a ValueError naming the recipe when the shape is too small.
    """
    shape = tuple(default_shape if input_shape is None else input_shape)
    if len(shape) != 3 or any(d is not None and int(d) <= 0 for d in shape):
        raise ValueError(
            f"{recipe}: input_shape={input_shape!r} must be (height, width, channels), e.g. {tuple(default_shape)}."
        )
    h, w = shape[0], shape[1]
    if (h is not None and h < min_size) or (w is not None and w < min_size):
        raise ValueError(
            f"{recipe}: input_shape={shape} is too small; height and width must be at least {min_size} "
            f"(the default is {tuple(default_shape)})."
        )
    inputs = kit.layers.Input(shape=shape, name="input")
    x = inputs
    if include_preprocessing and check_preprocessing(preprocessing) != "none":
        x = kit.custom.ImagePreprocessing(preprocessing, name="preprocessing")(x)
    return inputs, x


def check_head_args(recipe: str, include_top: bool, pooling, num_classes: int):
    if pooling not in POOLINGS:
        raise ValueError(f"{recipe}: pooling={pooling!r} must be None, 'avg' or 'max'.")
    if include_top and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"{recipe}: num_classes={num_classes!r} must be a positive integer when include_top=True.")


def pool_features(kit: Kit, x, pooling):
    """The ``pooling`` of a headless model: None keeps the feature map."""
    if pooling == "avg":
        return kit.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return kit.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


def predictions(kit: Kit, x, num_classes: int, classifier_activation, name="predictions"):
    """The last classification layer: Dense(num_classes) with the given activation.

    It computes in float32 whatever the global dtype policy, so mixed-precision training keeps a
    numerically safe softmax (the Keras mixed-precision guide's advice).
    """
    return kit.dense(x, num_classes, activation=classifier_activation, name=name, dtype="float32")


def dense_classifier(
    kit: Kit, x, include_top, pooling, num_classes, classifier_activation, hidden=(), activation="relu", dropout=0.0
):
    """The head of the flatten-and-fully-connected networks (LeNet, AlexNet, VGG): Flatten, then a
    Dense layer per ``(name, units)`` in ``hidden``, each followed by ``{name}_dropout`` when
    ``dropout``, then ``predictions``; without the top, ``pooling`` decides the output."""
    if not include_top:
        return pool_features(kit, x, pooling)
    x = kit.layers.Flatten(name="flatten")(x)
    for layer_name, units in hidden:
        x = kit.dense(x, units, activation=activation, name=layer_name)
        if dropout:
            x = kit.layers.Dropout(dropout, name=f"{layer_name}_dropout")(x)
    return predictions(kit, x, num_classes, classifier_activation)


def pooled_classifier(
    kit: Kit,
    x,
    include_top,
    pooling,
    num_classes,
    classifier_activation,
    dropout=0.0,
    pool_name="avg_pool",
    dropout_name="head_dropout",
):
    """The head of the global-pooling networks (GoogLeNet, Inception, ResNet): average pool,
    optional dropout, then ``predictions``; without the top, ``pooling`` decides the output."""
    if not include_top:
        return pool_features(kit, x, pooling)
    x = kit.layers.GlobalAveragePooling2D(name=pool_name)(x)
    if dropout:
        x = kit.layers.Dropout(dropout, name=dropout_name)(x)
    return predictions(kit, x, num_classes, classifier_activation)


def finish(kit: Kit, inputs, outputs, name: str, weights):
    """Makes the functional model and loads ``weights`` (None, or a path to a weights file)."""
    model = kit.K.Model(inputs, outputs, name=name)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model, weights):
    """Loads a weights file into ``model``, refusing one that does not fit it.

    ``.h5``/``.weights.h5`` files are matched layer by layer in order, which is how the official
    keras.applications files load (recipes name their layers the same way); a Keras 2 ``.h5`` file that
    does not fit in order (a file with the classifier top, for a model without it) is matched by layer
    name. A ``.keras`` file is a whole saved model, checked like any model file: its weights are
    copied layer by layer by name. Every layer of ``model`` that has weights must receive weights of
    the same shapes: a file of another architecture is an error, never random features.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a weights file, unsafe (:class:`recipes.saving.UnsafeModelError`), or one that
            does not fit ``model`` (the first layer that does not match, and the fix).
    """
    if isinstance(weights, str) and weights.lower() == "imagenet":
        raise ValueError(
            "weights='imagenet': recipes load weight files by path. Pass the keras.applications file (for "
            "example ~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels.h5 for vgg_d) as weights=PATH, or use "
            "`ktool finetune --base vgg16 --weights imagenet`, which fetches or finds it."
        )
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            f"weights={weights!r}: recipes take None or a path to a weights file (.h5, .weights.h5, .keras). "
            "For weights='imagenet', use the keras.applications base in `ktool finetune`."
        )
    path = os.path.expanduser(os.fspath(weights))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file {path!r} does not exist; pass the path of a .h5, .weights.h5 or .keras file."
        )
    from recipes.saving import WeightsMismatchError, load_weights_file

    try:
        load_weights_file(model, path, label=f"weights file {path!r}")
    except WeightsMismatchError as err:
        raise ValueError(
            f"weights file {path!r} does not fit model {model.name!r}: {err}. Build the recipe with the same "
            "configuration (num_classes, include_top, input channels) as the model that saved the file."
        ) from None
