"""ResNet (He, Zhang, Ren and Sun 2016, Deep Residual Learning for Image Recognition) and
SE-ResNet (Hu, Shen and Sun 2018, Squeeze-and-Excitation Networks).

One builder, :func:`resnet`, makes every variant: a stem, stages of residual blocks, a pooled
classifier head. Blocks are "basic" (two 3x3 convolutions; ResNet-18/34 and the CIFAR nets) or
"bottleneck" (1x1-3x3-1x1 with 4x expansion; ResNet-50/101/152). Squeeze-and-excitation is a
block option (``se_ratio``), not a separate network: SE-ResNet-50 is ResNet-50 with ``se_ratio=16``.

- ``resnet50``/``resnet101``/``resnet152`` mirror keras.applications ResNet50/101/152 layer for
  layer (names, conv biases, BN epsilon 1.001e-5, the stride in the first 1x1 convolution of a
  stage as in the original Caffe models, "caffe" preprocessing), so the official weight files
  load with ``weights=path`` and give the same outputs.
- ``resnet18``/``resnet34`` use the same names and stem with basic blocks, no conv biases and
  BN epsilon 1e-5, as torchvision (whose counts, 11,689,512 and 21,797,672 trainable, they match
  exactly); the strided 3x3 convolution pads 1 pixel on every side (torchvision's padding).
  He et al. give FLOPs, not parameter counts, for the ImageNet nets: ``paper_params`` holds the
  commonly cited (torchvision) figures.
- ``cifar_resnet20`` ... ``cifar_resnet110`` are section 4.2's 6n+2-layer nets for 32x32 inputs
  (16/32/64 filters), with option A shortcuts (subsample by 2, zero-pad the new channels; no
  parameters) by default. The paper subtracts the per-pixel training mean; these recipes use
  "torch" preprocessing (ImageNet mean/std, close to CIFAR-10's own: mean ~ (125, 123, 114),
  std ~ (63, 62, 67) on the 0..255 scale).
- ``se_resnet50`` is the ResNet-50 layout without conv biases (as the SENet release) plus an SE
  unit in every block: 28,088,024 trainable parameters, the paper's 28.09M.
"""

from __future__ import annotations

from recipes.blocks import Kit, check_head_args, finish, image_input, pooled_classifier
from recipes.registry import register

BLOCKS = ("basic", "bottleneck")
SHORTCUTS = ("projection", "zeros")

_IMAGENET = {
    "stem": "imagenet",
    "input_shape": (224, 224, 3),
    "num_classes": 1000,
    "se_ratio": 0,
    "shortcut": "projection",
    "filters": (64, 128, 256, 512),
}
_KERAS = {**_IMAGENET, "block": "bottleneck", "use_bias": True, "bn_epsilon": 1.001e-5, "preprocessing": "caffe"}
_TORCH = {**_IMAGENET, "use_bias": False, "bn_epsilon": 1e-5, "preprocessing": "torch"}
_CIFAR = {
    "stem": "cifar",
    "input_shape": (32, 32, 3),
    "num_classes": 10,
    "se_ratio": 0,
    "shortcut": "zeros",
    "filters": (16, 32, 64),
    "block": "basic",
    "use_bias": False,
    "bn_epsilon": 1e-5,
    "preprocessing": "torch",
}

# Per variant: blocks per stage (Table 1; section 4.2 for CIFAR: n = (depth - 2) / 6) and the layout.
CONFIGS = {
    "resnet18": {**_TORCH, "block": "basic", "blocks": (2, 2, 2, 2)},
    "resnet34": {**_TORCH, "block": "basic", "blocks": (3, 4, 6, 3)},
    "resnet50": {**_KERAS, "blocks": (3, 4, 6, 3)},
    "resnet101": {**_KERAS, "blocks": (3, 4, 23, 3)},
    "resnet152": {**_KERAS, "blocks": (3, 8, 36, 3)},
    "se_resnet50": {**_TORCH, "block": "bottleneck", "blocks": (3, 4, 6, 3), "se_ratio": 16},
    **{f"cifar_resnet{6 * n + 2}": {**_CIFAR, "blocks": (n,) * 3} for n in (3, 5, 7, 9, 18)},
}
_PAPER = "He et al. 2016, Deep Residual Learning for Image Recognition"
_SE_PAPER = "Hu et al. 2018, Squeeze-and-Excitation Networks"


def stage_names(config):
    """The stage prefixes of ``config``: conv2..conv5 (ImageNet, as keras.applications), stage1..3 (CIFAR)."""
    cfg = CONFIGS[config]
    if cfg["stem"] == "imagenet":
        return [f"conv{i + 2}" for i in range(len(cfg["blocks"]))]
    return [f"stage{i + 1}" for i in range(len(cfg["blocks"]))]


def layer_groups(config):
    """``(group, last layer)`` from input to output: the stem, then one group per stage."""
    cfg = CONFIGS[config]
    stem = ("conv1", "pool1_pool") if cfg["stem"] == "imagenet" else ("stem", "stem_relu")
    stages = tuple((s, f"{s}_block{n}_out") for s, n in zip(stage_names(config), cfg["blocks"]))
    return (stem,) + stages


def resnet(
    config,
    input_shape=None,
    num_classes=None,
    include_top=True,
    pooling=None,
    weights=None,
    name=None,
    *,
    api="tf_keras",
    include_preprocessing=True,
    classifier_activation="softmax",
    se_ratio=None,
    shortcut=None,
    dropout=0.0,
    weight_decay=0.0,
    kernel_initializer="he_normal",
):
    """Builds the ResNet variant ``config`` (a key of :data:`CONFIGS`).

    Args:
        config: "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "se_resnet50",
            "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56" or "cifar_resnet110".
        input_shape: (height, width, channels); default (224, 224, 3), (32, 32, 3) for CIFAR; at
            least 32x32 (8x8 for CIFAR).
        num_classes: number of output classes; default 1000 (10 for CIFAR).
        include_top: keep the classifier (``avg_pool``, ``predictions``).
        pooling: without the top, None keeps the last stage's map; "avg" or "max" pools it.
        weights: None or a path to a weights file (the keras.applications ResNet50/101/152 .h5
            files fit resnet50/101/152).
        name: model name; default the config name.
        api: "tf_keras" or "keras3".
        include_preprocessing: apply the variant's normalization inside the model ("caffe" for
            resnet50/101/152, "torch" for the others), so it takes RGB pixels 0..255.
        classifier_activation: activation of ``predictions`` ("softmax", or None for logits).
        se_ratio: squeeze-and-excitation reduction in every block (16 in Hu et al.); 0 for none.
            None takes the variant's (16 for se_resnet50, else 0).
        shortcut: where a block changes shape, "projection" (1x1 conv + BN, option B) or "zeros"
            (subsample by 2 and zero-pad the new channels, option A, no parameters). None takes
            the variant's ("zeros" for CIFAR, else "projection").
        dropout: dropout before ``predictions`` (0 in the paper).
        weight_decay: L2 factor on every kernel (1e-4 in the paper).
        kernel_initializer: Keras initializer name ("he_normal", He et al. 2015, as in the paper).

    Returns:
        A Keras functional model.
    """
    if config not in CONFIGS:
        raise ValueError(f"resnet: config={config!r} must be one of {', '.join(CONFIGS)}.")
    cfg = CONFIGS[config]
    se_ratio = cfg["se_ratio"] if se_ratio is None else se_ratio
    shortcut = cfg["shortcut"] if shortcut is None else shortcut
    num_classes = cfg["num_classes"] if num_classes is None else num_classes
    if isinstance(se_ratio, bool) or not isinstance(se_ratio, (int, float)) or se_ratio < 0:
        raise ValueError(
            f"{config}: se_ratio={se_ratio!r} must be 0 (no squeeze-and-excitation) or a positive "
            "reduction ratio such as 16."
        )
    if shortcut not in SHORTCUTS:
        raise ValueError(f"{config}: shortcut={shortcut!r} must be one of {', '.join(SHORTCUTS)}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"{config}: dropout={dropout!r} must be in [0, 1).")
    check_head_args(config, include_top, pooling, num_classes)
    kit = Kit(api, weight_decay, kernel_initializer)
    min_size = 32 if cfg["stem"] == "imagenet" else 8
    inputs, x = image_input(
        kit, input_shape, cfg["input_shape"], min_size, cfg["preprocessing"], include_preprocessing, config
    )
    eps, bias = cfg["bn_epsilon"], cfg["use_bias"]
    if cfg["stem"] == "imagenet":
        x = kit.layers.ZeroPadding2D(3, name="conv1_pad")(x)
        x = kit.conv(x, 64, 7, strides=2, padding="valid", use_bias=bias, name="conv1_conv")
        x = kit.bn(x, name="conv1_bn", epsilon=eps)
        x = kit.act(x, "relu", name="conv1_relu")
        x = kit.layers.ZeroPadding2D(1, name="pool1_pad")(x)
        x = kit.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    else:
        x = kit.conv_bn_act(x, cfg["filters"][0], 3, name="stem", use_bias=bias, bn_epsilon=eps)
    for s, (stage, filters, blocks) in enumerate(zip(stage_names(config), cfg["filters"], cfg["blocks"])):
        for b in range(1, blocks + 1):
            x = residual_block(
                kit,
                x,
                cfg["block"],
                filters,
                stride=2 if s > 0 and b == 1 else 1,
                name=f"{stage}_block{b}",
                use_bias=bias,
                bn_epsilon=eps,
                se_ratio=se_ratio,
                shortcut=shortcut,
            )
    x = pooled_classifier(kit, x, include_top, pooling, num_classes, classifier_activation, dropout)
    return finish(kit, inputs, x, name or config, weights)


def residual_block(
    kit, x, block, filters, stride, name, use_bias=True, bn_epsilon=1.001e-5, se_ratio=0, shortcut="projection"
):
    """One residual block, named as keras.applications: ``{name}_0_*`` the shortcut, ``{name}_1_*``
    ... the residual branch, ``{name}_se_*`` the SE unit, ``{name}_add``, ``{name}_out``.

    ``block`` is "basic" (3x3, 3x3; ``filters`` out) or "bottleneck" (1x1, 3x3, 1x1; ``4 * filters``
    out, the stride in the first 1x1 as in the original Caffe models and keras.applications).
    """
    if block not in BLOCKS:
        raise ValueError(f"residual_block: block={block!r} must be one of {', '.join(BLOCKS)}.")
    out_channels = filters * (4 if block == "bottleneck" else 1)
    skip = x
    if stride != 1 or x.shape[-1] != out_channels:
        if shortcut == "projection":
            skip = kit.conv(
                x, out_channels, 1, strides=stride, padding="valid", use_bias=use_bias, name=f"{name}_0_conv"
            )
            skip = kit.bn(skip, name=f"{name}_0_bn", epsilon=bn_epsilon)
        else:  # option A: the same grid as the strided convolution, new channels zero
            if stride != 1:
                skip = kit.layers.MaxPooling2D(1, strides=stride, name=f"{name}_0_pool")(skip)
            if x.shape[-1] != out_channels:
                skip = kit.custom.ChannelPad(out_channels, name=f"{name}_0_pad")(skip)

    if block == "bottleneck":
        convs = [(filters, 1, stride), (filters, 3, 1), (out_channels, 1, 1)]
    else:
        convs = [(filters, 3, stride), (filters, 3, 1)]
    for i, (width, kernel, strides) in enumerate(convs, start=1):
        padding = "valid" if kernel == 1 else "same"
        if kernel > 1 and strides > 1:  # pad both sides (torchvision), so the grid matches the shortcut's
            x = kit.layers.ZeroPadding2D(kernel // 2, name=f"{name}_{i}_pad")(x)
            padding = "valid"
        x = kit.conv(x, width, kernel, strides=strides, padding=padding, use_bias=use_bias, name=f"{name}_{i}_conv")
        x = kit.bn(x, name=f"{name}_{i}_bn", epsilon=bn_epsilon)
        if i < len(convs):
            x = kit.act(x, "relu", name=f"{name}_{i}_relu")
    if se_ratio:
        x = squeeze_excite(kit, x, se_ratio, name=f"{name}_se")
    x = kit.layers.Add(name=f"{name}_add")([skip, x])
    return kit.act(x, "relu", name=f"{name}_out")


def squeeze_excite(kit, x, ratio, name):
    """Hu et al. 2018, Fig. 3: global average pool (squeeze), C -> C/ratio (relu) -> C (sigmoid)
    1x1 convolutions with biases (excitation), then channel-wise rescaling of ``x``."""
    channels = x.shape[-1]
    s = kit.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_squeeze")(x)
    s = kit.conv(s, max(1, int(channels // ratio)), 1, activation="relu", name=f"{name}_reduce")
    s = kit.conv(s, channels, 1, activation="sigmoid", name=f"{name}_expand")
    return kit.layers.Multiply(name=f"{name}_excite")([x, s])


def _variant(config, params, paper_params, description, paper=_PAPER):
    cfg = CONFIGS[config]
    options = {
        "paper_weight_decay": 1e-4,
        "block": cfg["block"],
        "blocks": cfg["blocks"],
        "shortcut": cfg["shortcut"],
        "se_ratio": cfg["se_ratio"],
    }

    @register(
        config,
        family="resnet",
        paper=paper,
        input_shape=cfg["input_shape"],
        num_classes=cfg["num_classes"],
        params=params,
        paper_params=paper_params,
        preprocessing=cfg["preprocessing"],
        layer_groups=layer_groups(config),
        head_start="avg_pool",
        min_size=32 if cfg["stem"] == "imagenet" else 8,
        description=description,
        options=options,
    )
    def builder(
        input_shape=None,
        num_classes=cfg["num_classes"],
        include_top=True,
        pooling=None,
        weights=None,
        name=None,
        **options,
    ):
        return resnet(config, input_shape, num_classes, include_top, pooling, weights, name, **options)

    builder.__name__ = builder.__qualname__ = config
    builder.__doc__ = f"ResNet variant {config}: {description} ({paper}). Options as :func:`recipes.resnet.resnet`."
    return builder


resnet18 = _variant("resnet18", 11_699_112, 11.7e6, "18 layers, basic blocks")
resnet34 = _variant("resnet34", 21_814_696, 21.8e6, "34 layers, basic blocks")
resnet50 = _variant("resnet50", 25_636_712, 25.6e6, "50 layers, bottleneck blocks (keras.applications ResNet50)")
resnet101 = _variant("resnet101", 44_707_176, 44.5e6, "101 layers, bottleneck blocks (keras.applications ResNet101)")
resnet152 = _variant("resnet152", 60_419_944, 60.2e6, "152 layers, bottleneck blocks (keras.applications ResNet152)")
cifar_resnet20 = _variant("cifar_resnet20", 271_098, 0.27e6, "CIFAR, 20 layers (n=3), option A shortcuts")
cifar_resnet32 = _variant("cifar_resnet32", 466_426, 0.46e6, "CIFAR, 32 layers (n=5), option A shortcuts")
cifar_resnet44 = _variant("cifar_resnet44", 661_754, 0.66e6, "CIFAR, 44 layers (n=7), option A shortcuts")
cifar_resnet56 = _variant("cifar_resnet56", 857_082, 0.85e6, "CIFAR, 56 layers (n=9), option A shortcuts")
cifar_resnet110 = _variant("cifar_resnet110", 1_736_058, 1.7e6, "CIFAR, 110 layers (n=18), option A shortcuts")
se_resnet50 = _variant(
    "se_resnet50",
    28_141_144,
    28.09e6,
    "ResNet-50 with squeeze-and-excitation (ratio 16) in every block",
    paper=_SE_PAPER,
)
