"""Convolutional autoencoders (Masci et al. 2011, Stacked Convolutional Auto-Encoders for
Hierarchical Feature Extraction) and their denoising version (Vincent et al. 2008, Extracting and
Composing Robust Features with Denoising Autoencoders), plus the linear autoencoder, whose optimum
spans the same subspace as PCA (Baldi and Hornik 1989).

The encoder halves the resolution at every stage (3x3 stride-2 convolution, batch norm, ReLU); the
bottleneck layer is named ``embedding`` (the encoder's last map, or a Dense ``latent_dim`` vector);
the decoder mirrors the encoder with stride-2 transposed convolutions and ends in ``reconstruction``,
a sigmoid convolution with the input's channels at the input's size.

Inputs are expected on the 0..1 scale already (preprocessing "none"): an autoencoder reconstructs
what it sees, and the sigmoid output is compared with the input itself (e.g. MSE or binary
cross-entropy), so scale images with ``x / 255`` before ``fit(x, x)``.

Autoencoders keep the image recipes' signature: ``num_classes`` is accepted and ignored, and
``include_top=False`` drops the decoder, which is the same model as :func:`encoder_of`.
"""

from __future__ import annotations

from recipes._keras import api_of, get_keras
from recipes.blocks import Kit, check_head_args, finish, image_input, pool_features
from recipes.registry import register

NOISES = ("gaussian", "masking", "salt_pepper")
_MASCI = "Masci et al. 2011, Stacked Convolutional Auto-Encoders for Hierarchical Feature Extraction"
_VINCENT = "Vincent et al. 2008, Extracting and Composing Robust Features with Denoising Autoencoders"
_GROUPS = (("encoder", "embedding"), ("decoder", "reconstruction"))


def encoder_of(model, name=None):
    """The encoder of an autoencoder or contrastive model: from ``model.input`` to the layer named
    ``embedding``, sharing its layers (and weights) with ``model``.

    Raises:
        ValueError: ``model`` has no layer named "embedding".
    """
    try:
        embedding = model.get_layer("embedding")
    except ValueError:
        raise ValueError(
            f"encoder_of: model {model.name!r} has no layer named 'embedding'; build it with "
            "recipes.conv_autoencoder, recipes.denoising_autoencoder, recipes.linear_autoencoder or "
            "recipes.contrastive_encoder."
        ) from None
    K = get_keras(api_of(model))
    return K.Model(model.input, embedding.output, name=name or f"{model.name}_encoder")


def autoencoder(
    input_shape=None,
    num_classes=None,
    include_top=True,
    pooling=None,
    weights=None,
    name=None,
    *,
    api="tf_keras",
    include_preprocessing=True,
    filters=(32, 64),
    latent_dim=None,
    batch_norm=True,
    activation="relu",
    output_activation="sigmoid",
    noise=None,
    noise_strength=0.1,
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
    recipe="conv_autoencoder",
):
    """Builds a convolutional autoencoder, denoising when ``noise`` is set.

    Layer names: ``noise`` (denoising only), ``encoder_block{i}_conv/_bn/_{activation}``, then
    ``encoder_flatten`` and the Dense ``embedding`` (with ``latent_dim``) or the identity layer
    ``embedding`` on the last map (without), then ``decoder_dense`` and ``decoder_reshape`` (with
    ``latent_dim``), ``decoder_block{i}_conv/_bn/_{activation}`` and ``reconstruction``.

    Args:
        input_shape: (height, width, channels); default (32, 32, 3). Height and width must be
            multiples of 2 ** len(filters) so that the output has the input's size; with
            ``latent_dim`` they must be known (not None).
        num_classes: ignored (kept so that every recipe has the same signature).
        include_top: keep the decoder; without it the model is the encoder (input to ``embedding``).
        pooling: without the top and without ``latent_dim``, None keeps the embedding map and
            "avg"/"max" pool it to a vector; no effect otherwise.
        weights: None or a path to a weights file.
        name: model name; default ``recipe``.
        api: "tf_keras" or "keras3".
        include_preprocessing: accepted for uniformity; inputs are taken as they are (0..1).
        filters: filters of the encoder stages, each halving the resolution; the decoder mirrors them.
        latent_dim: size of a Dense bottleneck, or None for a convolutional bottleneck (the last
            encoder map is the embedding).
        batch_norm: batch normalization after every hidden (transposed) convolution.
        activation: hidden nonlinearity ("relu"); None makes the hidden layers linear.
        output_activation: "sigmoid" for 0..1 images; None for a linear output.
        noise: None, or the corruption of a denoising autoencoder, applied in training only:
            "gaussian" (additive, stddev ``noise_strength``), "masking" (each value set to 0 with
            probability ``noise_strength``) or "salt_pepper" (a fraction ``noise_strength`` set to 0 or 1).
        noise_strength: the noise's stddev or rate.
        weight_decay: L2 factor on every kernel.
        kernel_initializer: Keras initializer name.
        recipe: the name used in error messages and as the default model name.
    """
    check_head_args(recipe, False, pooling, num_classes)
    stages = tuple(filters)
    if not stages or any(not isinstance(f, int) or f < 1 for f in stages):
        raise ValueError(
            f"{recipe}: filters={filters!r} must be a non-empty sequence of positive integers, e.g. (32, 64)."
        )
    if latent_dim is not None and (not isinstance(latent_dim, int) or latent_dim < 1):
        raise ValueError(
            f"{recipe}: latent_dim={latent_dim!r} must be None (convolutional bottleneck) or a positive integer."
        )
    if noise is not None and noise not in NOISES:
        raise ValueError(f"{recipe}: noise={noise!r} must be None or one of {', '.join(NOISES)}.")
    if noise is not None and not (noise_strength >= 0 and (noise == "gaussian" or noise_strength < 1)):
        raise ValueError(f"{recipe}: noise_strength={noise_strength!r} must be >= 0 (and < 1 for {noise!r}, a rate).")
    factor = 2 ** len(stages)
    kit = Kit(api, weight_decay, kernel_initializer)
    inputs, x = image_input(kit, input_shape, (32, 32, 3), factor, "none", include_preprocessing, recipe)
    height, width, channels = inputs.shape[1:]
    if any(d is not None and d % factor for d in (height, width)):
        raise ValueError(
            f"{recipe}: input_shape={tuple(inputs.shape[1:])} must have height and width that are multiples of "
            f"{factor} (2 ** len(filters), filters={stages}) so that the reconstruction has the input's size."
        )
    if latent_dim is not None and (height is None or width is None):
        raise ValueError(
            f"{recipe}: input_shape={tuple(inputs.shape[1:])} needs a fixed height and width with "
            f"latent_dim={latent_dim}."
        )
    if channels is None:
        raise ValueError(f"{recipe}: input_shape={tuple(inputs.shape[1:])} needs a known number of channels.")

    if noise == "gaussian":
        x = kit.layers.GaussianNoise(noise_strength, name="noise")(x)
    elif noise == "masking":
        x = kit.custom.RandomMasking(noise_strength, name="noise")(x)
    elif noise == "salt_pepper":
        x = kit.custom.SaltAndPepper(noise_strength, name="noise")(x)

    for i, width_i in enumerate(stages, start=1):
        x = _stage(kit, x, kit.layers.Conv2D, width_i, f"encoder_block{i}", batch_norm, activation)
    map_shape = tuple(x.shape[1:])
    if latent_dim is not None:
        x = kit.layers.Flatten(name="encoder_flatten")(x)
        x = kit.dense(x, latent_dim, name="embedding")
    else:
        x = kit.layers.Identity(name="embedding")(x)
    if not include_top:
        if latent_dim is None:
            x = pool_features(kit, x, pooling)
        return finish(kit, inputs, x, name or recipe, weights)

    if latent_dim is not None:
        units = map_shape[0] * map_shape[1] * map_shape[2]
        x = kit.dense(x, units, activation=activation, name="decoder_dense")
        x = kit.layers.Reshape(map_shape, name="decoder_reshape")(x)
    for i, width_i in enumerate(reversed(stages), start=1):
        x = _stage(kit, x, kit.layers.Conv2DTranspose, width_i, f"decoder_block{i}", batch_norm, activation)
    x = kit.conv(x, int(channels), 3, activation=output_activation, name="reconstruction")
    return finish(kit, inputs, x, name or recipe, weights)


def _stage(kit, x, conv_class, filters, name, batch_norm, activation):
    """A 3x3 stride-2 (transposed) convolution, batch norm and the activation."""
    x = conv_class(
        filters,
        3,
        strides=2,
        padding="same",
        use_bias=not batch_norm,
        kernel_initializer=kit.kernel_initializer,
        kernel_regularizer=kit.regularizer(),
        name=f"{name}_conv",
    )(x)
    if batch_norm:
        x = kit.bn(x, name=f"{name}_bn")
    return kit.act(x, activation, name=f"{name}_{activation}") if activation else x


@register(
    "conv_autoencoder",
    family="autoencoder",
    paper=_MASCI,
    input_shape=(32, 32, 3),
    num_classes=None,
    params=76_227,
    paper_params=None,
    preprocessing="none",
    layer_groups=_GROUPS,
    head_start="decoder_block1_conv",
    min_size=4,
    task="autoencoder",
    description="conv encoder (32, 64; stride 2) to a conv embedding, mirrored transposed-conv decoder",
    options={"loss": "mse", "input_scale": "0..1"},
)
def conv_autoencoder(
    input_shape=None,
    num_classes=None,
    include_top=True,
    pooling=None,
    weights=None,
    name=None,
    *,
    api="tf_keras",
    include_preprocessing=True,
    filters=(32, 64),
    latent_dim=None,
    batch_norm=True,
    activation="relu",
    output_activation="sigmoid",
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds a convolutional autoencoder (inputs on the 0..1 scale; train with ``fit(x, x)``).

    ``head_start`` in the registry is the first decoder layer of the default configuration
    ("decoder_block1_conv"; "decoder_dense" with ``latent_dim``): cutting the model there, like
    ``include_top=False`` or :func:`encoder_of`, leaves the encoder. Options as
    :func:`recipes.autoencoder.autoencoder`.
    """
    return autoencoder(
        input_shape,
        num_classes,
        include_top,
        pooling,
        weights,
        name,
        api=api,
        include_preprocessing=include_preprocessing,
        filters=filters,
        latent_dim=latent_dim,
        batch_norm=batch_norm,
        activation=activation,
        output_activation=output_activation,
        weight_decay=weight_decay,
        kernel_initializer=kernel_initializer,
        recipe="conv_autoencoder",
    )


@register(
    "denoising_autoencoder",
    family="autoencoder",
    paper=_VINCENT,
    input_shape=(32, 32, 3),
    num_classes=None,
    params=76_227,
    paper_params=None,
    preprocessing="none",
    layer_groups=_GROUPS,
    head_start="decoder_block1_conv",
    min_size=4,
    task="autoencoder",
    description="conv_autoencoder with input corruption in training (gaussian, masking, salt and pepper)",
    options={"loss": "mse", "input_scale": "0..1", "noise": NOISES},
)
def denoising_autoencoder(
    input_shape=None,
    num_classes=None,
    include_top=True,
    pooling=None,
    weights=None,
    name=None,
    *,
    api="tf_keras",
    include_preprocessing=True,
    noise="gaussian",
    noise_strength=0.1,
    filters=(32, 64),
    latent_dim=None,
    batch_norm=True,
    activation="relu",
    output_activation="sigmoid",
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds a denoising autoencoder: :func:`conv_autoencoder` with a ``noise`` layer right after
    the input that corrupts it in training only, so ``fit(x, x)`` learns to restore clean inputs.

    Args:
        noise: "gaussian" (stddev ``noise_strength``), "masking" (rate ``noise_strength`` of values
            set to 0, as in Vincent et al. 2008) or "salt_pepper" (rate ``noise_strength`` set to 0 or 1).
        noise_strength: stddev or rate; default 0.1.

    Other options as :func:`recipes.autoencoder.autoencoder`.
    """
    if noise is None:
        raise ValueError(f"denoising_autoencoder: noise=None; use one of {', '.join(NOISES)} (or conv_autoencoder).")
    return autoencoder(
        input_shape,
        num_classes,
        include_top,
        pooling,
        weights,
        name,
        api=api,
        include_preprocessing=include_preprocessing,
        filters=filters,
        latent_dim=latent_dim,
        batch_norm=batch_norm,
        activation=activation,
        output_activation=output_activation,
        noise=noise,
        noise_strength=noise_strength,
        weight_decay=weight_decay,
        kernel_initializer=kernel_initializer,
        recipe="denoising_autoencoder",
    )


def linear_autoencoder(input_dim, latent_dim, *, api="tf_keras", name=None, kernel_initializer="glorot_uniform"):
    """A linear autoencoder on vectors: ``embedding`` = Dense(latent_dim), ``reconstruction`` =
    Dense(input_dim), no nonlinearity. Trained with MSE, its decoder's rows span the subspace of the
    top ``latent_dim`` principal components (Baldi and Hornik 1989). Not a registered image recipe.
    """
    if not isinstance(input_dim, int) or input_dim < 1:
        raise ValueError(f"linear_autoencoder: input_dim={input_dim!r} must be a positive integer.")
    if not isinstance(latent_dim, int) or not 1 <= latent_dim <= input_dim:
        raise ValueError(
            f"linear_autoencoder: latent_dim={latent_dim!r} must be an integer in 1..input_dim ({input_dim})."
        )
    kit = Kit(api, 0.0, kernel_initializer)
    inputs = kit.layers.Input(shape=(input_dim,), name="input")
    x = kit.dense(inputs, latent_dim, name="embedding")
    x = kit.dense(x, input_dim, name="reconstruction")
    return finish(kit, inputs, x, name or "linear_autoencoder", None)
