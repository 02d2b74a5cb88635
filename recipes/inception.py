"""Inception-v3 (Szegedy, Vanhoucke, Ioffe, Shlens and Wojna 2016, Rethinking the Inception
Architecture for Computer Vision), batch-normalized, as released with the paper's weights.

The graph is the one of keras.applications ``InceptionV3``: same layers, same order, same
weights (every convolution has no bias and is followed by a batch norm without scale, epsilon
1e-3, and a ReLU), so the official weight files load through ``weights=path`` and give the same
outputs. Unlike the paper's Table 1, the stem's fourth convolution is 1x1 (80) and its fifth
3x3 (192), as in the released model.

Layer names are by role instead of Keras' ``conv2d_N``: the module outputs are ``mixed0`` ...
``mixed10`` as in keras.applications; inside module ``m`` each branch is ``{m}_branch1x1``,
``{m}_branch5x5``, ``{m}_branch3x3``, ``{m}_branch3x3dbl``, ``{m}_branch7x7``,
``{m}_branch7x7dbl``, ``{m}_branch7x7x3`` or ``{m}_branch_pool`` (after the pooling layer
``{m}_pool``); a branch's i-th convolution is ``{branch}_{i}`` (just ``{branch}`` when it has one),
made of ``_conv``, ``_bn`` and ``_relu`` layers, e.g. ``mixed0_branch5x5_2_conv``. The split
convolutions of the 8x8 modules are ``{branch}_2a``/``_3a`` (1x3) and ``_2b``/``_3b`` (3x1),
concatenated into ``{branch}`` (keras names these ``mixed9_0``/``mixed9_1`` and ``concatenate``). The stem is
``stem_conv1`` ... ``stem_conv5`` with ``stem_pool1`` and ``stem_pool2``.
"""

from __future__ import annotations

from recipes.blocks import Kit, check_head_args, finish, image_input, pooled_classifier
from recipes.registry import register

_PAPER = "Szegedy et al. 2016, Rethinking the Inception Architecture for Computer Vision"
_GROUPS = (("stem", "stem_pool2"), ("mixed_35x35", "mixed2"), ("mixed_17x17", "mixed7"), ("mixed_8x8", "mixed10"))
MIN_SIZE = 75
AUX_MIN_SIZE = 107  # the smallest input where mixed7 is at least 5x5, so the auxiliary 5x5/3 pooling fits


def conv_bn(kit: Kit, x, filters, kernel_size, name, strides=1, padding="same"):
    """Convolution without bias, batch norm without scale (no gamma), ReLU: keras' ``conv2d_bn``.

    Named ``{name}_conv``, ``{name}_bn``, ``{name}_relu``.
    """
    return kit.conv_bn_act(x, filters, kernel_size, strides=strides, padding=padding, name=name, bn_scale=False)


def _branch(kit: Kit, x, name, *convs):
    """A chain of :func:`conv_bn`; each conv is ``(filters, kernel)`` or ``(filters, kernel, strides, padding)``."""
    for i, conv in enumerate(convs, start=1):
        filters, kernel, strides, padding = (*conv, 1, "same") if len(conv) == 2 else conv
        x = conv_bn(kit, x, filters, kernel, name if len(convs) == 1 else f"{name}_{i}", strides, padding)
    return x


def _pool_branch(kit: Kit, x, name, filters):
    """3x3 average pooling (stride 1), then a 1x1 projection to ``filters``."""
    x = kit.layers.AveragePooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    return conv_bn(kit, x, filters, 1, f"{name}_branch_pool")


def _concat(kit: Kit, branches, name):
    return kit.layers.Concatenate(axis=-1, name=name)(branches)


def module_a(kit: Kit, x, pool_filters, name):
    """35x35 module (Figure 5): the 5x5 convolution is kept in one branch, and factorized into
    two 3x3 in another. Output 224 + ``pool_filters`` channels."""
    return _concat(
        kit,
        [
            _branch(kit, x, f"{name}_branch1x1", (64, 1)),
            _branch(kit, x, f"{name}_branch5x5", (48, 1), (64, 5)),
            _branch(kit, x, f"{name}_branch3x3dbl", (64, 1), (96, 3), (96, 3)),
            _pool_branch(kit, x, name, pool_filters),
        ],
        name,
    )


def reduction_a(kit: Kit, x, name):
    """35x35 -> 17x17 grid reduction (Figure 10): stride-2 convolutions next to a stride-2 max
    pooling, concatenated. Output 768 channels."""
    return _concat(
        kit,
        [
            _branch(kit, x, f"{name}_branch3x3", (384, 3, 2, "valid")),
            _branch(kit, x, f"{name}_branch3x3dbl", (64, 1), (96, 3), (96, 3, 2, "valid")),
            kit.layers.MaxPooling2D(3, strides=2, name=f"{name}_pool")(x),
        ],
        name,
    )


def module_b(kit: Kit, x, channels_7x7, name):
    """17x17 module (Figure 6): 7x7 convolutions factorized into 1x7 and 7x1, with
    ``channels_7x7`` inner channels. Output 768 channels."""
    c = channels_7x7
    return _concat(
        kit,
        [
            _branch(kit, x, f"{name}_branch1x1", (192, 1)),
            _branch(kit, x, f"{name}_branch7x7", (c, 1), (c, (1, 7)), (192, (7, 1))),
            _branch(kit, x, f"{name}_branch7x7dbl", (c, 1), (c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))),
            _pool_branch(kit, x, name, 192),
        ],
        name,
    )


def reduction_b(kit: Kit, x, name):
    """17x17 -> 8x8 grid reduction. Output 1280 channels."""
    return _concat(
        kit,
        [
            _branch(kit, x, f"{name}_branch3x3", (192, 1), (320, 3, 2, "valid")),
            _branch(kit, x, f"{name}_branch7x7x3", (192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2, "valid")),
            kit.layers.MaxPooling2D(3, strides=2, name=f"{name}_pool")(x),
        ],
        name,
    )


def _split_1x3_3x1(kit: Kit, x, name, step):
    """The expanded filter bank of Figure 7: parallel 1x3 and 3x1 convolutions (``{name}_{step}a``,
    ``{name}_{step}b``), concatenated into ``name``."""
    return _concat(
        kit, [conv_bn(kit, x, 384, (1, 3), f"{name}_{step}a"), conv_bn(kit, x, 384, (3, 1), f"{name}_{step}b")], name
    )


def module_c(kit: Kit, x, name):
    """8x8 module with expanded filter banks (Figure 7). Output 2048 channels."""
    branch1x1 = _branch(kit, x, f"{name}_branch1x1", (320, 1))
    branch3x3 = conv_bn(kit, x, 384, 1, f"{name}_branch3x3_1")
    branch3x3 = _split_1x3_3x1(kit, branch3x3, f"{name}_branch3x3", 2)
    branch3x3dbl = _branch(kit, x, f"{name}_branch3x3dbl", (448, 1), (384, 3))
    branch3x3dbl = _split_1x3_3x1(kit, branch3x3dbl, f"{name}_branch3x3dbl", 3)
    return _concat(kit, [branch1x1, branch3x3, branch3x3dbl, _pool_branch(kit, x, name, 192)], name)


def aux_classifier(kit: Kit, x, num_classes, classifier_activation):
    """The auxiliary classifier on the 17x17x768 ``mixed7`` (Figure 8), batch-normalized
    ("BN-auxiliary", section 7): 5x5/3 average pooling, 1x1 convolution to 128, 5x5 convolution to
    768, fully connected ``aux``.

    At the paper's 299x299 the 5x5 convolution leaves a 1x1 map; on smaller inputs its kernel is
    cut to the pooled map (as the reference TF-slim implementation does), and the global average
    pooling before ``aux`` (a no-op on a 1x1 map) keeps the classifier's size independent of the input.
    """
    x = kit.layers.AveragePooling2D(5, strides=3, padding="valid", name="aux_pool")(x)
    x = conv_bn(kit, x, 128, 1, "aux_conv1")
    kernel = tuple(5 if d is None else min(5, int(d)) for d in x.shape[1:3])
    x = conv_bn(kit, x, 768, kernel, "aux_conv2", padding="valid")
    x = kit.layers.GlobalAveragePooling2D(name="aux_avg_pool")(x)
    return kit.dense(x, num_classes, activation=classifier_activation, name="aux")


def inception(
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
    dropout=0.0,
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds Inception-v3 (the network of the paper's Table 1 as released, batch-normalized).

    Args:
        input_shape: (height, width, channels); default (299, 299, 3); at least 75x75 (107x107 with
            ``aux_heads``).
        num_classes: number of output classes.
        include_top: keep the global average pooling and ``predictions``.
        pooling: without the top, None keeps mixed10's map; "avg" or "max" pools it.
        weights: None or a path to a weights file (the keras.applications InceptionV3 files fit the
            default configuration, with or without the top).
        name: model name; default "inception_v3".
        api: "tf_keras" or "keras3".
        include_preprocessing: apply the "tf" scaling (x / 127.5 - 1) inside the model (RGB 0..255 in).
        classifier_activation: activation of ``predictions`` and ``aux`` ("softmax", or None for logits).
        aux_heads: add the auxiliary classifier on mixed7 as a second output ``aux`` (train it with a
            loss weight such as 0.4; drop it for inference). Needs ``include_top``.
        dropout: dropout before ``predictions`` (0, as keras.applications; TF-slim trains with 0.2).
        weight_decay: L2 factor on every kernel (TF-slim trains with 4e-5).
        kernel_initializer: Keras initializer name.

    Returns:
        A Keras functional model; with ``aux_heads`` its outputs are ``[predictions, aux]``.
    """
    recipe = "inception_v3"
    check_head_args(recipe, include_top, pooling, num_classes)
    if aux_heads and not include_top:
        raise ValueError(f"{recipe}: aux_heads=True needs include_top=True (the auxiliary head is a classifier).")
    kit = Kit(api, weight_decay, kernel_initializer)
    inputs, x = image_input(kit, input_shape, (299, 299, 3), MIN_SIZE, "tf", include_preprocessing, recipe)
    if aux_heads and any(d is not None and d < AUX_MIN_SIZE for d in inputs.shape[1:3]):
        raise ValueError(
            f"{recipe}: aux_heads=True needs height and width of at least {AUX_MIN_SIZE} (mixed7 must "
            f"be at least 5x5 for the 5x5/3 pooling); input_shape={tuple(inputs.shape[1:])}."
        )

    # Stem: 299x299x3 -> 35x35x192.
    x = conv_bn(kit, x, 32, 3, "stem_conv1", strides=2, padding="valid")
    x = conv_bn(kit, x, 32, 3, "stem_conv2", padding="valid")
    x = conv_bn(kit, x, 64, 3, "stem_conv3")
    x = kit.layers.MaxPooling2D(3, strides=2, name="stem_pool1")(x)
    x = conv_bn(kit, x, 80, 1, "stem_conv4", padding="valid")
    x = conv_bn(kit, x, 192, 3, "stem_conv5", padding="valid")
    x = kit.layers.MaxPooling2D(3, strides=2, name="stem_pool2")(x)

    # 3 x Inception (Figure 5) at 35x35, reduction, 4 x Figure 6 at 17x17, reduction, 2 x Figure 7 at 8x8.
    for i, pool_filters in enumerate((32, 64, 64)):
        x = module_a(kit, x, pool_filters, f"mixed{i}")
    x = reduction_a(kit, x, "mixed3")
    for i, channels_7x7 in enumerate((128, 160, 160, 192), start=4):
        x = module_b(kit, x, channels_7x7, f"mixed{i}")
    aux = aux_classifier(kit, x, num_classes, classifier_activation) if aux_heads else None
    x = reduction_b(kit, x, "mixed8")
    for i in (9, 10):
        x = module_c(kit, x, f"mixed{i}")

    x = pooled_classifier(kit, x, include_top, pooling, num_classes, classifier_activation, dropout)
    return finish(kit, inputs, [x, aux] if aux_heads else x, name or recipe, weights)


@register(
    "inception_v3",
    family="inception",
    paper=_PAPER,
    input_shape=(299, 299, 3),
    params=23_851_784,
    paper_params=25e6,  # "less than 25 million parameters" (abstract)
    preprocessing="tf",
    layer_groups=_GROUPS,
    head_start="avg_pool",
    min_size=MIN_SIZE,
    description="Inception-v3: factorized convolutions, grid reductions, BN (keras InceptionV3 twin)",
    options={"aux_loss_weight": 0.4, "label_smoothing": 0.1},
)
def inception_v3(
    input_shape=None, num_classes=1000, include_top=True, pooling=None, weights=None, name=None, **options
):
    """Inception-v3 (Szegedy et al. 2016), batch-normalized. Options as :func:`recipes.inception.inception`."""
    return inception(input_shape, num_classes, include_top, pooling, weights, name, **options)
