"""AlexNet (Krizhevsky, Sutskever and Hinton 2012, ImageNet Classification with Deep Convolutional
Neural Networks) and ZFNet (Zeiler and Fergus 2013, Visualizing and Understanding Convolutional
Networks, arXiv:1311.2901 / ECCV 2014, Fig. 3): five convolutions, LRN after the first two,
overlapping 3x3/2 max pooling, and three fully connected layers.

``alexnet`` is the one-tower network: the paper's layer sizes with every convolution seeing all
channels (62,378,344 parameters). ``alexnet_grouped`` keeps the paper's two-GPU split: conv2, conv4
and conv5 only see the half of the channels computed on their own GPU (``groups=2``), while conv3
and the fully connected layers connect across; that is the paper's "60 million parameters"
(60,965,224) and the kernel shapes of Caffe's bvlc_alexnet.

Layer groups end at pool1, pool2, conv3, conv4 and pool5 in both networks, so they exist with
``lrn=False`` too; in ZFNet, whose normalization follows the pooling, lrn1 and lrn2 (no weights)
therefore open the next group.

The input is 227x227: the paper's "224x224" does not give its 55x55 first layer with an 11x11/4
valid convolution; 227 does (the well-known erratum, and what Caffe uses). The paper subtracts the
mean training image; here the per-channel ImageNet mean ("caffe" preprocessing) stands in for it.
The paper initializes from N(0, 0.01) with some biases at 1; ``kernel_initializer`` defaults to
Glorot uniform like every recipe.
"""

from __future__ import annotations

from collections import namedtuple

from recipes.blocks import Kit, check_head_args, dense_classifier, finish, image_input
from recipes.registry import register

# One convolution of the layer table. padding: "valid", "same", or an int (that many zero pixels on
# every side, then a valid convolution). after: what follows the ReLU, in order: "lrn", "pool"
# (3x3/2 valid max pooling) or "pool_same" (3x3/2 "same" max pooling).
Conv = namedtuple("Conv", "filters kernel strides padding groups after")

CONFIGS = {
    "alexnet": {
        "input_shape": (227, 227, 3),
        "min_size": 67,
        "convs": (
            Conv(96, 11, 4, "valid", 1, ("lrn", "pool")),
            Conv(256, 5, 1, "same", 1, ("lrn", "pool")),
            Conv(384, 3, 1, "same", 1, ()),
            Conv(384, 3, 1, "same", 1, ()),
            Conv(256, 3, 1, "same", 1, ("pool",)),
        ),
    },
    "alexnet_grouped": {
        "input_shape": (227, 227, 3),
        "min_size": 67,
        "convs": (
            Conv(96, 11, 4, "valid", 1, ("lrn", "pool")),
            Conv(256, 5, 1, "same", 2, ("lrn", "pool")),
            Conv(384, 3, 1, "same", 1, ()),
            Conv(384, 3, 1, "same", 2, ()),
            Conv(256, 3, 1, "same", 2, ("pool",)),
        ),
    },
    # Fig. 3: 224 -> 110 (7x7/2 after 1-pixel padding) -> 55 (pool) -> 26 (5x5/2) -> 13 (pool) -> 13
    # -> 13 -> 13 -> 6 (pool). The "contrast normalization" follows the pooling in layers 1 and 2.
    "zfnet": {
        "input_shape": (224, 224, 3),
        "min_size": 53,
        "convs": (
            Conv(96, 7, 2, 1, 1, ("pool_same", "lrn")),
            Conv(256, 5, 2, "valid", 1, ("pool_same", "lrn")),
            Conv(384, 3, 1, "same", 1, ()),
            Conv(384, 3, 1, "same", 1, ()),
            Conv(256, 3, 1, "same", 1, ("pool",)),
        ),
    },
}
_ALEXNET_PAPER = (
    "Krizhevsky, Sutskever and Hinton 2012, ImageNet Classification with Deep Convolutional Neural Networks"
)
_ZFNET_PAPER = "Zeiler and Fergus 2013, Visualizing and Understanding Convolutional Networks"
_GROUPS = (
    ("conv1", "pool1"),
    ("conv2", "pool2"),
    ("conv3", "conv3"),
    ("conv4", "conv4"),
    ("conv5", "pool5"),
    ("fc6", "fc6"),
    ("fc7", "fc7"),
)

_FC = (("fc6", 4096), ("fc7", 4096))  # the fully connected layers before predictions (fc8)


def alexnet_family(
    config,
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
    dropout=0.5,
    lrn=True,
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds AlexNet or ZFNet (``config`` is a key of :data:`CONFIGS`).

    Layers are named ``conv1`` ... ``conv5``, ``lrn1``, ``lrn2``, ``pool1``, ``pool2``, ``pool5``,
    ``flatten``, ``fc6``, ``fc7`` and ``predictions`` (the paper's fc8).

    Args:
        config: "alexnet", "alexnet_grouped" or "zfnet".
        input_shape: (height, width, channels); default (227, 227, 3) for AlexNet, (224, 224, 3) for
            ZFNet; at least 67x67 (AlexNet) or 53x53 (ZFNet), where pool5 is 1x1.
        num_classes: number of output classes.
        include_top: keep the three fully connected layers (fc6, fc7, predictions).
        pooling: without the top, None keeps pool5's map; "avg" or "max" pools it.
        weights: None or a path to a weights file.
        name: model name; default the config name.
        api: "tf_keras" or "keras3".
        include_preprocessing: apply the "caffe" normalization inside the model (plain RGB 0..255 in).
        classifier_activation: activation of ``predictions`` ("softmax", or None for logits).
        dropout: dropout after fc6 and fc7 (0.5 in the paper).
        lrn: keep the local response normalization layers (k=2, n=5, alpha=1e-4, beta=0.75);
            False removes them (the paper reports 1.2-1.4% higher error without).
        weight_decay: L2 factor on every kernel (5e-4 in the paper).
        kernel_initializer: Keras initializer name.

    Returns:
        A Keras functional model.
    """
    _check_args(config, include_top, pooling, num_classes, dropout)
    spec = CONFIGS[config]
    kit = Kit(api, weight_decay, kernel_initializer)
    inputs, x = image_input(
        kit, input_shape, spec["input_shape"], spec["min_size"], "caffe", include_preprocessing, config
    )
    for i, conv in enumerate(spec["convs"], start=1):
        x = _conv_stage(kit, x, i, conv, lrn)
    x = dense_classifier(kit, x, include_top, pooling, num_classes, classifier_activation, hidden=_FC, dropout=dropout)
    return finish(kit, inputs, x, name or config, weights)


def _check_args(config, include_top, pooling, num_classes, dropout):
    if config not in CONFIGS:
        raise ValueError(f"alexnet_family: config={config!r} must be one of {', '.join(CONFIGS)}.")
    check_head_args(config, include_top, pooling, num_classes)
    if not 0 <= dropout < 1:
        raise ValueError(f"{config}: dropout={dropout!r} must be in [0, 1).")


def _conv_stage(kit, x, i, conv, lrn):
    """``conv{i}`` (after its explicit zero padding, if any), then its LRN (when ``lrn``) and pooling steps."""
    padding = conv.padding
    if isinstance(padding, int):
        x = kit.layers.ZeroPadding2D(padding, name=f"conv{i}_pad")(x)
        padding = "valid"
    x = kit.conv(
        x,
        conv.filters,
        conv.kernel,
        strides=conv.strides,
        padding=padding,
        groups=conv.groups,
        activation="relu",
        name=f"conv{i}",
    )
    for step in conv.after:
        if step == "lrn":
            if lrn:
                x = kit.lrn(x, name=f"lrn{i}")
        else:
            x = kit.layers.MaxPooling2D(
                3, strides=2, padding="same" if step == "pool_same" else "valid", name=f"pool{i}"
            )(x)
    return x


def _variant(config, paper, params, paper_params, description):
    spec = CONFIGS[config]

    @register(
        config,
        family="alexnet",
        paper=paper,
        input_shape=spec["input_shape"],
        params=params,
        paper_params=paper_params,
        preprocessing="caffe",
        layer_groups=_GROUPS,
        head_start="flatten",
        min_size=spec["min_size"],
        description=description,
        options={"paper_weight_decay": 5e-4, "dropout": 0.5},
    )
    def builder(input_shape=None, num_classes=1000, include_top=True, pooling=None, weights=None, name=None, **options):
        return alexnet_family(config, input_shape, num_classes, include_top, pooling, weights, name, **options)

    builder.__name__ = builder.__qualname__ = config
    builder.__doc__ = (
        f"{description} ({paper}). Options as :func:`recipes.alexnet.alexnet_family` "
        "(dropout, lrn, weight_decay, kernel_initializer, ...)."
    )
    return builder


alexnet = _variant(
    "alexnet", _ALEXNET_PAPER, 62_378_344, 60e6, "AlexNet, one tower: 5 conv + 3 FC, LRN, overlapping pooling"
)
alexnet_grouped = _variant(
    "alexnet_grouped",
    _ALEXNET_PAPER,
    60_965_224,
    60e6,
    "AlexNet as in the paper: conv2, conv4, conv5 split in two GPU groups",
)
zfnet = _variant(
    "zfnet", _ZFNET_PAPER, 62_357_608, None, "ZFNet: AlexNet with a 7x7/2 first layer and a 5x5/2 second layer (Fig. 3)"
)
