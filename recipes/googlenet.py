"""GoogLeNet (Szegedy et al. 2015, Going Deeper with Convolutions): the network of Table 1, nine
inception modules, and optionally the two auxiliary classifiers of section 5 for training.

Layer names follow the authors' Caffe model (bvlc_googlenet) with ``/`` written as ``_``:
``conv1_7x7_s2``, ``pool1_3x3_s2``, ``pool1_norm1``, ``conv2_3x3_reduce``, ``conv2_3x3``,
``conv2_norm2``, ``pool2_3x3_s2``, ``inception_3a_1x1`` ... ``inception_3a_output``,
``pool3_3x3_s2``, ..., ``pool5_7x7_s1``, ``head_dropout``, ``predictions``. Every convolution has
its ReLU built in and "same" padding, which gives Table 1's sizes (224 -> 112 -> 56 -> 28 -> 14 -> 7).

The paper does not give the LRN constants; these are bvlc_googlenet's (size 5, alpha 1e-4 averaged
over the window, beta 0.75, k=1). The final 7x7 average pool is a global average pool, so any
input size works. Preprocessing is "caffe" (BGR minus the ImageNet mean), as in bvlc_googlenet.

Parameters: 6,998,552 with 1000 classes (6,990,272 weights + 8,280 biases), 2.9% above Table 1's
"6.8M". Table 1 counts weights only, in units of 1024 (its 3a row, 159K, is 163,328 weights), and
some rows do not match its own filter counts: conv1 2.7K (9.2K), 4c 463K (497.5K), 5a 1072K
(1018K). Its column sums to 6,797.7K; the filter counts give 6,826.4K = 6,990,272 weights.
"""

from __future__ import annotations

from recipes.blocks import Kit, check_head_args, finish, image_input, pooled_classifier, predictions
from recipes.registry import register

# Table 1: per module, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
# bvlc_googlenet's LRN: Caffe divides alpha by the window size n=5 and uses k=1.
_LRN = {"depth_radius": 2, "bias": 1.0, "alpha": 1e-4 / 5, "beta": 0.75}
AUX_LOSS_WEIGHT = 0.3  # section 5: the auxiliary losses are added with weight 0.3
AUX_SOURCES = {"aux1": "4a", "aux2": "4d"}
AUX_MIN_SIZE = 65  # the 4a/4d map (input / 16) must be at least 5x5 for the aux heads' 5x5 pool
_PAPER = "Szegedy et al. 2015, Going Deeper with Convolutions"
_GROUPS = (
    ("stem", "pool2_3x3_s2"),
    ("inception_3", "pool3_3x3_s2"),
    ("inception_4", "pool4_3x3_s2"),
    ("inception_5", "inception_5b_output"),
)


def inception_module(kit, x, name, filters):
    """One inception module (Fig. 2b): 1x1, 1x1 -> 3x3, 1x1 -> 5x5 and 3x3 max pool -> 1x1
    branches, each with ReLU, concatenated along channels as ``{name}_output``.

    ``filters`` is a row of Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
    """
    n1, n3r, n3, n5r, n5, proj = filters
    b1 = kit.conv(x, n1, 1, activation="relu", name=f"{name}_1x1")
    b3 = kit.conv(x, n3r, 1, activation="relu", name=f"{name}_3x3_reduce")
    b3 = kit.conv(b3, n3, 3, activation="relu", name=f"{name}_3x3")
    b5 = kit.conv(x, n5r, 1, activation="relu", name=f"{name}_5x5_reduce")
    b5 = kit.conv(b5, n5, 5, activation="relu", name=f"{name}_5x5")
    bp = kit.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    bp = kit.conv(bp, proj, 1, activation="relu", name=f"{name}_pool_proj")
    return kit.layers.Concatenate(axis=-1, name=f"{name}_output")([b1, b3, b5, bp])


def _aux_head(kit, x, name, num_classes, classifier_activation):
    """Section 5's auxiliary classifier: 5x5/3 average pool, 1x1 conv 128 + ReLU, FC 1024 + ReLU,
    70% dropout, FC with the classifier activation; the output layer is called ``name``."""
    x = kit.layers.AveragePooling2D(5, strides=3, padding="valid", name=f"{name}_avg_pool")(x)
    x = kit.conv(x, 128, 1, activation="relu", name=f"{name}_conv")
    x = kit.layers.Flatten(name=f"{name}_flatten")(x)
    x = kit.dense(x, 1024, activation="relu", name=f"{name}_fc")
    x = kit.layers.Dropout(0.7, name=f"{name}_dropout")(x)
    return predictions(kit, x, num_classes, classifier_activation, name=name)


@register(
    "googlenet",
    family="googlenet",
    paper=_PAPER,
    input_shape=(224, 224, 3),
    params=6_998_552,
    paper_params=6.8e6,
    preprocessing="caffe",
    layer_groups=_GROUPS,
    head_start="pool5_7x7_s1",
    min_size=32,
    description="GoogLeNet (Inception v1): 22 layers, 9 inception modules, optional auxiliary heads",
    options={"aux_loss_weight": AUX_LOSS_WEIGHT, "dropout": 0.4, "aux_dropout": 0.7},
)
def googlenet(
    input_shape=None,
    num_classes=1000,
    include_top=True,
    pooling=None,
    weights=None,
    name=None,
    *,
    api="tf_keras",
    include_preprocessing=True,
    classifier_activation="softmax",
    aux_heads=False,
    dropout=0.4,
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds GoogLeNet (Table 1).

    With ``aux_heads=True`` it is the training network of section 5: three outputs, named
    "predictions", "aux1" (on inception 4a) and "aux2" (on inception 4d); compile it with
    ``loss_weights=googlenet_loss_weights(model)``. Its weights load by name into the inference
    build (``aux_heads=False``, one output), which is the main path alone.

    Args:
        input_shape: (height, width, channels); default (224, 224, 3); at least 32x32, and at
            least 65x65 with ``aux_heads`` (their 5x5 pool needs a 5x5 inception-4 map).
        num_classes: number of output classes.
        include_top: keep the average pool, dropout and ``predictions``.
        pooling: without the top, None keeps inception_5b's map; "avg" or "max" pools it.
        weights: None or a path to a weights file.
        name: model name; default "googlenet".
        api: "tf_keras" or "keras3".
        include_preprocessing: apply the "caffe" normalization inside the model (plain RGB 0..255 in).
        classifier_activation: activation of ``predictions`` and of the aux heads ("softmax", or None
            for logits).
        aux_heads: add the two auxiliary classifiers (training build); needs ``include_top=True``.
        dropout: dropout before ``predictions`` (0.4 in the paper).
        weight_decay: L2 factor on every kernel.
        kernel_initializer: Keras initializer name.

    Returns:
        A Keras functional model (three outputs with ``aux_heads``, else one).
    """
    check_head_args("googlenet", include_top, pooling, num_classes)
    if aux_heads and not include_top:
        raise ValueError("googlenet: aux_heads=True needs include_top=True (the auxiliary heads are classifiers).")
    if not 0 <= dropout < 1:
        raise ValueError(f"googlenet: dropout={dropout!r} must be in [0, 1).")
    kit = Kit(api, weight_decay, kernel_initializer)
    inputs, x = image_input(kit, input_shape, (224, 224, 3), 32, "caffe", include_preprocessing, "googlenet")
    if aux_heads:
        h, w = inputs.shape[1], inputs.shape[2]
        if (h is not None and h < AUX_MIN_SIZE) or (w is not None and w < AUX_MIN_SIZE):
            raise ValueError(
                f"googlenet: input_shape={tuple(inputs.shape[1:])} is too small for aux_heads=True; "
                f"height and width must be at least {AUX_MIN_SIZE} (or use aux_heads=False)."
            )

    x = kit.conv(x, 64, 7, strides=2, activation="relu", name="conv1_7x7_s2")
    x = kit.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1_3x3_s2")(x)
    x = kit.lrn(x, name="pool1_norm1", **_LRN)
    x = kit.conv(x, 64, 1, activation="relu", name="conv2_3x3_reduce")
    x = kit.conv(x, 192, 3, activation="relu", name="conv2_3x3")
    x = kit.lrn(x, name="conv2_norm2", **_LRN)
    x = kit.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2_3x3_s2")(x)

    aux = {}
    for stage, modules in ((3, "ab"), (4, "abcde"), (5, "ab")):
        for letter in modules:
            key = f"{stage}{letter}"
            x = inception_module(kit, x, f"inception_{key}", INCEPTION[key])
            for aux_name, source in AUX_SOURCES.items():
                if aux_heads and source == key:
                    aux[aux_name] = _aux_head(kit, x, aux_name, num_classes, classifier_activation)
        if stage < 5:
            x = kit.layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{stage}_3x3_s2")(x)

    x = pooled_classifier(
        kit, x, include_top, pooling, num_classes, classifier_activation, dropout, pool_name="pool5_7x7_s1"
    )
    outputs = [x, aux["aux1"], aux["aux2"]] if aux_heads and include_top else x
    return finish(kit, inputs, outputs, name or "googlenet", weights)


def googlenet_loss_weights(model) -> dict:
    """The loss weights of section 5 for a GoogLeNet model: ``{"predictions": 1.0, "aux1": 0.3,
    "aux2": 0.3}`` for the training build (``aux_heads=True``), ``{"predictions": 1.0}`` otherwise.

    Use as ``model.compile(loss={name: loss for name in weights}, loss_weights=weights)`` with
    ``weights = googlenet_loss_weights(model)``; tf_keras also takes a single loss for every output,
    Keras 3 needs one per output.
    """
    names = list(model.output_names)
    if "predictions" not in names:
        raise ValueError(
            f"googlenet_loss_weights: model {model.name!r} has no 'predictions' output "
            f"(outputs: {', '.join(names)}); pass a GoogLeNet built with include_top=True."
        )
    return {n: (AUX_LOSS_WEIGHT if n in AUX_SOURCES else 1.0) for n in names}
