"""Pieces every recipe shares: the input and its preprocessing, conv/dense layers with the
paper's options (batch norm, L2, initializers), the classifier head, and loading weights.

A :class:`Kit` carries the Keras module and the options one model is built with, so each family's
builder reads as the paper's table: ``x = kit.conv(x, 64, 3, name="block1_conv1")``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from recipes._keras import api_of, check_api, get_keras
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


class WeightsMismatchError(ValueError):
    """A weights file that does not fit the model: the message names the first layer that does not match."""


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
    try:
        load_weights_file(model, path, label=f"weights file {path!r}")
    except WeightsMismatchError as err:
        raise ValueError(
            f"weights file {path!r} does not fit model {model.name!r}: {err}. Build the recipe with the same "
            "configuration (num_classes, include_top, input channels) as the model that saved the file."
        ) from None


def load_weights_file(model, path: str, label: str | None = None) -> str:
    """Loads the weights file ``path`` into ``model`` after checking that it fits; returns how it matched.

    Args:
        model: the target model.
        path: a ``.keras`` model file, a ``.weights.h5`` file or a Keras 2 ``.h5`` (weights or full model).
        label: how messages name the file (default: its name).

    Returns:
        "by name" or "in order".

    Raises:
        WeightsMismatchError: the first layer of ``model`` that gets no weights or weights of other
            shapes (the message does not name the file: callers add it and the fix).
        ValueError: not a weights file, or an unsafe one (these name the file).
    """
    from recipes.saving import check_h5_file, legacy_weight_layers, max_weight_bytes

    label = label or os.path.basename(path)
    if path.lower().endswith(".keras"):
        return _copy_weights_by_name(model, path)
    check_h5_file(path, label, max_dataset_bytes=max_weight_bytes(model))
    layers = legacy_weight_layers(path, label)
    if layers is None:  # the .weights.h5 layout: Keras matches every variable by its place, strictly
        _keras_load(model, path, ".weights.h5")
        return "in order"
    problem = _mismatch_in_order(model, layers)
    if problem is None:
        _keras_load(model, path, ".h5")
        return "in order"
    file_names = {name for name, _ in layers}
    weighted = [layer.name for layer in model.layers if layer.weights]
    shared = sum(name in file_names for name in weighted)
    if shared:
        by_name = _mismatch_by_name(model, layers)
        if by_name is None and api_of(model) == "tf_keras":
            _keras_load(model, path, ".h5", by_name=True)
            return "by name"
        if 2 * shared >= len(weighted):  # mostly the same names: the file was meant to match by name
            problem = by_name or "the file matches only by layer name, which Keras 3 does not load"
    raise WeightsMismatchError(problem)


def _keras_load(model, path: str, suffix: str, by_name: bool = False):
    """Keras picks the layout by the file's suffix: a file named otherwise is linked under the right one."""
    import tempfile

    try:
        if path.lower().endswith(suffix) and not (suffix == ".h5" and path.lower().endswith(".weights.h5")):
            return model.load_weights(path, by_name=True) if by_name else model.load_weights(path)
        with tempfile.TemporaryDirectory(prefix="ktoolkit-weights-") as tmp:
            link = os.path.join(tmp, "weights" + suffix)
            os.symlink(os.path.abspath(path), link)
            return model.load_weights(link, by_name=True) if by_name else model.load_weights(link)
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsMismatchError((str(err).strip().splitlines() or [type(err).__name__])[0][:300]) from None


def _shapes(layer) -> list:
    """The layer's weight shapes in the order Keras 2 ``.h5`` files store them (trainable first)."""
    return [tuple(w.shape) for w in [*layer.trainable_weights, *layer.non_trainable_weights]]


def _mismatch_in_order(model, layers) -> str | None:
    targets = [(layer.name, _shapes(layer)) for layer in model.layers if layer.weights]
    saved = [(name, shapes) for name, shapes in layers if shapes]
    for (name, shapes), (file_name, file_shapes) in zip(targets, saved):
        if shapes != file_shapes:
            return (
                f"layer {name!r} expects weights of shapes {shapes}, the file's layer in its place "
                f"({file_name!r}) has {file_shapes}"
            )
    if len(targets) > len(saved):
        return (
            f"layer {targets[len(saved)][0]!r} has no weights in the file (the file has weights for "
            f"{len(saved)} layers, the model for {len(targets)})"
        )
    if len(saved) > len(targets):
        return (
            f"the file has weights for {len(saved)} layers, the model for {len(targets)} (the first extra "
            f"one is {saved[len(targets)][0]!r})"
        )
    return None


def _mismatch_by_name(model, layers) -> str | None:
    saved = dict(layers)
    for layer in model.layers:
        shapes = _shapes(layer)
        file_shapes = saved.get(layer.name)
        if shapes and not file_shapes:
            return f"layer {layer.name!r} has no weights in the file"
        if layer.name in saved and file_shapes != shapes:
            return (
                f"layer {layer.name!r} expects weights of shapes {shapes}, the file's layer of that name has "
                f"{file_shapes}"
            )
    return None


def _leaf_layers(model):
    """The layers of ``model`` with nested models opened up, so a base inside a classifier matches too."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _copy_weights_by_name(model, path) -> str:
    """Copies the weights of the ``.keras`` model ``path`` into ``model`` by layer name, all or nothing."""
    from recipes.saving import load_model

    source = load_model(path, api=api_of(model))
    by_name = {}
    for layer in _leaf_layers(source):
        by_name.setdefault(layer.name, layer)
    pairs = []
    for layer in _leaf_layers(model):
        if not layer.weights:
            continue
        other = by_name.get(layer.name)
        if other is None or not other.weights:
            raise WeightsMismatchError(f"layer {layer.name!r} has no weights in the file")
        shapes, file_shapes = [tuple(w.shape) for w in layer.weights], [tuple(w.shape) for w in other.weights]
        if shapes != file_shapes:
            raise WeightsMismatchError(
                f"layer {layer.name!r} expects weights of shapes {shapes}, the file's layer "
                f"of that name has {file_shapes}"
            )
        pairs.append((layer, other))
    if not pairs:
        raise WeightsMismatchError("the model has no layers with weights to load")
    for layer, other in pairs:  # checked first, so a file that does not fit leaves the model as it was
        layer.set_weights(other.get_weights())
    return "by name"
