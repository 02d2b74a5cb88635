"""The linear classifier and the multilayer perceptron of the CS231n notes (Linear classification;
Neural Networks 1-2): the image flattened to a vector of pixels, then ``s = W x + b`` (linear) or
fully connected hidden layers with a nonlinearity, dropout and L2 before it (MLP).

Both score classes with ``predictions``. With ``classifier_activation=None`` the outputs are the raw
scores ``s`` that :func:`recipes.multiclass_hinge` (the multiclass SVM loss) expects; the default
softmax goes with cross-entropy. Neither has a feature map: the features are vectors, so ``pooling``
(accepted so that every recipe takes the same arguments) changes nothing.
"""

from __future__ import annotations

from recipes.blocks import Kit, check_head_args, finish, image_input, predictions
from recipes.registry import register

_PAPER = "CS231n Convolutional Neural Networks for Visual Recognition, course notes (Karpathy et al., Stanford)"


def _flat_input(kit, input_shape, include_preprocessing, recipe):
    inputs, x = image_input(kit, input_shape, (32, 32, 3), 1, "unit", include_preprocessing, recipe)
    return inputs, kit.layers.Flatten(name="flatten")(x)


@register(
    "linear_classifier",
    family="linear",
    paper=_PAPER + ": Linear classification",
    input_shape=(32, 32, 3),
    num_classes=10,
    params=30_730,
    paper_params=30_730,
    preprocessing="unit",
    layer_groups=(("flatten", "flatten"),),
    head_start="predictions",
    min_size=1,
    task="classification",
    description="s = Wx + b on the flattened pixels (softmax or multiclass SVM loss)",
    options={"losses": ("sparse_categorical_crossentropy", "multiclass_hinge")},
)
def linear_classifier(
    input_shape=None,
    num_classes=10,
    include_top=True,
    pooling=None,
    weights=None,
    name=None,
    *,
    api="tf_keras",
    include_preprocessing=True,
    classifier_activation="softmax",
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds the linear classifier ``s = W x + b`` on the flattened image.

    CIFAR-10's 32x32x3 images and 10 classes give W of 10x3072 and 30,730 parameters, as in the notes.

    Args:
        input_shape: (height, width, channels); default (32, 32, 3); any size (height and width fixed).
        num_classes: number of classes (rows of W).
        include_top: keep ``predictions``; without it the model returns the flattened pixels (the
            vector the classifier scores).
        pooling: accepted for uniformity; the output is already a vector, so it has no effect.
        weights: None or a path to a weights file.
        name: model name; default "linear_classifier".
        api: "tf_keras" or "keras3".
        include_preprocessing: scale 0..255 pixels to 0..1 inside the model.
        classifier_activation: "softmax" (for cross-entropy), or None for the raw scores that
            :func:`recipes.multiclass_hinge` takes.
        weight_decay: L2 factor on W: the loss gains ``weight_decay * sum(W**2)``, the notes'
            regularization ``lambda * R(W)`` with lambda = weight_decay.
        kernel_initializer: Keras initializer name.

    Returns:
        A Keras functional model.
    """
    check_head_args("linear_classifier", include_top, pooling, num_classes)
    kit = Kit(api, weight_decay, kernel_initializer)
    inputs, x = _flat_input(kit, input_shape, include_preprocessing, "linear_classifier")
    if include_top:
        x = predictions(kit, x, num_classes, classifier_activation)
    return finish(kit, inputs, x, name or "linear_classifier", weights)


@register(
    "mlp",
    family="mlp",
    paper=_PAPER + ": Neural Networks",
    input_shape=(32, 32, 3),
    num_classes=10,
    params=820_874,
    paper_params=None,
    preprocessing="unit",
    layer_groups=(("flatten", "flatten"), ("fc1", "fc1_act"), ("fc2", "fc2_act")),
    head_start="predictions",
    min_size=1,
    task="classification",
    description="fully connected network: 3072-256-128-10, ReLU, dropout",
    options={"hidden_units": (256, 128), "dropout": 0.5},
)
def mlp(
    input_shape=None,
    num_classes=10,
    include_top=True,
    pooling=None,
    weights=None,
    name=None,
    *,
    api="tf_keras",
    include_preprocessing=True,
    classifier_activation="softmax",
    hidden_units=(256, 128),
    activation="relu",
    dropout=0.5,
    batch_norm=False,
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds a multilayer perceptron on the flattened image.

    Hidden layer ``i`` (from 1) is ``fc{i}`` (Dense), ``fc{i}_bn`` (with ``batch_norm``) and
    ``fc{i}_act`` (the nonlinearity); ``fc{i}_dropout`` follows it whenever another Dense layer does.

    Args:
        input_shape: (height, width, channels); default (32, 32, 3); any size (height and width fixed).
        num_classes: number of classes.
        include_top: keep ``predictions``; without it the model returns the last hidden layer's
            activations (before its dropout).
        pooling: accepted for uniformity; the output is already a vector, so it has no effect.
        weights: None or a path to a weights file.
        name: model name; default "mlp".
        api: "tf_keras" or "keras3".
        include_preprocessing: scale 0..255 pixels to 0..1 inside the model.
        classifier_activation: "softmax", or None for raw scores (e.g. for :func:`recipes.multiclass_hinge`).
        hidden_units: widths of the hidden layers, input to output (at least one).
        activation: the hidden nonlinearity ("relu" in the notes; "tanh", "sigmoid", ...).
        dropout: dropout rate after each hidden layer (0 for none).
        batch_norm: batch normalization between each hidden Dense layer and its nonlinearity.
        weight_decay: L2 factor on every kernel.
        kernel_initializer: Keras initializer name ("he_normal" suits ReLU, as the notes advise).

    Returns:
        A Keras functional model.
    """
    check_head_args("mlp", include_top, pooling, num_classes)
    units = _check_mlp_options(hidden_units, dropout)
    kit = Kit(api, weight_decay, kernel_initializer)
    inputs, x = _flat_input(kit, input_shape, include_preprocessing, "mlp")
    for i, width in enumerate(units, start=1):
        x = kit.dense(x, width, name=f"fc{i}", use_bias=not batch_norm)
        if batch_norm:
            x = kit.layers.BatchNormalization(name=f"fc{i}_bn")(x)
        x = kit.act(x, activation, name=f"fc{i}_act")
        if dropout and (include_top or i < len(units)):
            x = kit.layers.Dropout(dropout, name=f"fc{i}_dropout")(x)
    if include_top:
        x = predictions(kit, x, num_classes, classifier_activation)
    return finish(kit, inputs, x, name or "mlp", weights)


def _check_mlp_options(hidden_units, dropout):
    """The hidden widths as a tuple, after checking them and the dropout rate."""
    units = tuple(hidden_units)
    if not units or any(not isinstance(u, int) or u < 1 for u in units):
        raise ValueError(
            f"mlp: hidden_units={hidden_units!r} must be a non-empty sequence of positive integers, e.g. (256, 128)."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"mlp: dropout={dropout!r} must be in [0, 1).")
    return units
