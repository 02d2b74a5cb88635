"""VGG (Simonyan and Zisserman 2015, Very Deep Convolutional Networks for Large-Scale Image
Recognition): configurations A, A-LRN, B, C, D and E of Table 1.

Layer names follow keras.applications (``block1_conv1`` ... ``fc1``, ``fc2``, ``predictions``), so
VGG-D and VGG-E load the official VGG16/VGG19 weight files and compute the same outputs.
"""

from __future__ import annotations

from recipes.blocks import Kit, check_head_args, dense_classifier, finish, image_input
from recipes.registry import register

# Table 1: per block, the convolutions as (kernel size, filters). "lrn" marks A-LRN's LRN layer.
CONFIGS = {
    "vgg_a": [[(3, 64)], [(3, 128)], [(3, 256)] * 2, [(3, 512)] * 2, [(3, 512)] * 2],
    "vgg_a_lrn": [[(3, 64), "lrn"], [(3, 128)], [(3, 256)] * 2, [(3, 512)] * 2, [(3, 512)] * 2],
    "vgg_b": [[(3, 64)] * 2, [(3, 128)] * 2, [(3, 256)] * 2, [(3, 512)] * 2, [(3, 512)] * 2],
    "vgg_c": [
        [(3, 64)] * 2,
        [(3, 128)] * 2,
        [(3, 256)] * 2 + [(1, 256)],
        [(3, 512)] * 2 + [(1, 512)],
        [(3, 512)] * 2 + [(1, 512)],
    ],
    "vgg_d": [[(3, 64)] * 2, [(3, 128)] * 2, [(3, 256)] * 3, [(3, 512)] * 3, [(3, 512)] * 3],
    "vgg_e": [[(3, 64)] * 2, [(3, 128)] * 2, [(3, 256)] * 4, [(3, 512)] * 4, [(3, 512)] * 4],
}
_PAPER = "Simonyan and Zisserman 2015, Very Deep Convolutional Networks for Large-Scale Image Recognition"
_GROUPS = tuple((f"block{i}", f"block{i}_pool") for i in range(1, 6)) + (("fc1", "fc1"), ("fc2", "fc2"))


def vgg(
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
    batch_norm=False,
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds a VGG configuration of Table 1 (``config`` is a key of :data:`CONFIGS`).

    Args:
        config: "vgg_a", "vgg_a_lrn", "vgg_b", "vgg_c", "vgg_d" or "vgg_e".
        input_shape: (height, width, channels); default (224, 224, 3); at least 32x32.
        num_classes: number of output classes.
        include_top: keep the three fully connected layers (fc1, fc2, predictions).
        pooling: without the top, None keeps block5_pool's map; "avg" or "max" pools it.
        weights: None or a path to a weights file (the keras.applications VGG16/VGG19 files fit D/E).
        name: model name; default the config name.
        api: "tf_keras" or "keras3".
        include_preprocessing: apply the "caffe" normalization inside the model (plain RGB 0..255 in).
        classifier_activation: activation of ``predictions`` ("softmax", or None for logits).
        dropout: dropout after fc1 and fc2 (0.5 in the paper).
        batch_norm: batch normalization after every convolution (not in the paper; "VGG-BN").
        weight_decay: L2 factor on every kernel (5e-4 in the paper).
        kernel_initializer: Keras initializer name.
    """
    if config not in CONFIGS:
        raise ValueError(f"vgg: config={config!r} must be one of {', '.join(CONFIGS)}.")
    check_head_args(config, include_top, pooling, num_classes)
    kit = Kit(api, weight_decay, kernel_initializer)
    inputs, x = image_input(kit, input_shape, (224, 224, 3), 32, "caffe", include_preprocessing, config)
    for b, block in enumerate(CONFIGS[config], start=1):
        x = _block(kit, x, b, block, batch_norm)
    x = dense_classifier(
        kit,
        x,
        include_top,
        pooling,
        num_classes,
        classifier_activation,
        hidden=(("fc1", 4096), ("fc2", 4096)),
        dropout=dropout,
    )
    return finish(kit, inputs, x, name or config, weights)


def _block(kit, x, b, block, batch_norm):
    """Block ``b`` of Table 1: its convolutions (and LRN) in order, then ``block{b}_pool``."""
    conv_index = 0
    for layer in block:
        if layer == "lrn":
            x = kit.lrn(x, name=f"block{b}_lrn")
            continue
        conv_index += 1
        kernel, filters = layer
        conv_name = f"block{b}_conv{conv_index}"
        if batch_norm:
            x = kit.conv(x, filters, kernel, name=conv_name, use_bias=False)
            x = kit.bn(x, name=f"{conv_name}_bn")
            x = kit.act(x, "relu", name=f"{conv_name}_relu")
        else:
            x = kit.conv(x, filters, kernel, activation="relu", name=conv_name)
    return kit.layers.MaxPooling2D(2, strides=2, name=f"block{b}_pool")(x)


def _variant(config, params, paper_params, description):
    @register(
        config,
        family="vgg",
        paper=_PAPER,
        input_shape=(224, 224, 3),
        params=params,
        paper_params=paper_params,
        preprocessing="caffe",
        layer_groups=_GROUPS,
        head_start="flatten",
        min_size=32,
        description=description,
        options={"paper_weight_decay": 5e-4, "dropout": 0.5},
    )
    def builder(input_shape=None, num_classes=1000, include_top=True, pooling=None, weights=None, name=None, **options):
        return vgg(config, input_shape, num_classes, include_top, pooling, weights, name, **options)

    builder.__name__ = builder.__qualname__ = config
    builder.__doc__ = f"VGG configuration {description} ({_PAPER}). Options as :func:`recipes.vgg.vgg`."
    return builder


vgg_a = _variant("vgg_a", 132_863_336, 133e6, "A: 11 weight layers")
vgg_a_lrn = _variant("vgg_a_lrn", 132_863_336, 133e6, "A-LRN: 11 weight layers, LRN after the first")
vgg_b = _variant("vgg_b", 133_047_848, 133e6, "B: 13 weight layers")
vgg_c = _variant("vgg_c", 133_638_952, 134e6, "C: 16 weight layers, 1x1 convolutions in blocks 3-5")
vgg_d = _variant("vgg_d", 138_357_544, 138e6, "D (VGG16): 16 weight layers")
vgg_e = _variant("vgg_e", 143_667_240, 144e6, "E (VGG19): 19 weight layers")
vgg16, vgg19 = vgg_d, vgg_e
