"""LeNet-5 (LeCun, Bottou, Bengio and Haffner 1998, Gradient-Based Learning Applied to Document
Recognition, section II.B): CONV-POOL-CONV-POOL-CONV-FC-FC on 32x32 grayscale digits.

C3 is fully connected to S2's six maps (the paper's Table I connects only some of them), which
gives 61,706 parameters. The paper's trainable subsampling and RBF output become plain pooling
and a softmax layer, as in every modern rendering.
"""

from __future__ import annotations

from recipes.blocks import Kit, check_head_args, dense_classifier, finish, image_input
from recipes.registry import register


@register(
    "lenet5",
    family="lenet",
    paper="LeCun et al. 1998, Gradient-Based Learning Applied to Document Recognition",
    input_shape=(32, 32, 1),
    num_classes=10,
    params=61_706,
    paper_params=60_000,
    preprocessing="unit",
    layer_groups=(("c1", "s2"), ("c3", "s4"), ("c5", "c5"), ("f6", "f6")),
    head_start="flatten",
    min_size=32,
    description="CONV-POOL-CONV-POOL-CONV-FC-FC for 32x32 digits",
)
def lenet5(
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
    activation="tanh",
    subsampling="avg",
    dropout=0.0,
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds LeNet-5.

    Args:
        input_shape: (height, width, channels); default (32, 32, 1). At least 32x32.
        num_classes: number of output classes.
        include_top: keep F6 and the output layer.
        pooling: without the top, None keeps C5's 1x1x120 map; "avg" or "max" pools it to a vector.
        weights: None or a path to a weights file.
        name: model name; default "lenet5".
        api: "tf_keras" or "keras3".
        include_preprocessing: scale 0..255 pixels to 0..1 inside the model.
        classifier_activation: activation of the output layer ("softmax", or None for logits).
        activation: "tanh" as in the paper, or e.g. "relu".
        subsampling: "avg" (the paper's S2/S4) or "max".
        dropout: dropout rate before the output layer (0 in the paper).
        weight_decay: L2 factor on every kernel.
        kernel_initializer: Keras initializer name.

    Returns:
        A Keras functional model.
    """
    _check_args(include_top, pooling, num_classes, subsampling)
    kit = Kit(api, weight_decay, kernel_initializer)
    inputs, x = image_input(kit, input_shape, (32, 32, 1), 32, "unit", include_preprocessing, "lenet5")
    pool = kit.layers.AveragePooling2D if subsampling == "avg" else kit.layers.MaxPooling2D
    x = kit.conv(x, 6, 5, padding="valid", activation=activation, name="c1")
    x = pool(2, name="s2")(x)
    x = kit.conv(x, 16, 5, padding="valid", activation=activation, name="c3")
    x = pool(2, name="s4")(x)
    x = kit.conv(x, 120, 5, padding="valid", activation=activation, name="c5")
    x = dense_classifier(
        kit,
        x,
        include_top,
        pooling,
        num_classes,
        classifier_activation,
        hidden=(("f6", 84),),
        activation=activation,
        dropout=dropout,
    )
    return finish(kit, inputs, x, name or "lenet5", weights)


def _check_args(include_top, pooling, num_classes, subsampling):
    check_head_args("lenet5", include_top, pooling, num_classes)
    if subsampling not in ("avg", "max"):
        raise ValueError(f"lenet5: subsampling={subsampling!r} must be 'avg' or 'max'.")
