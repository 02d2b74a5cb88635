"""The SimCLR encoder (Chen, Kornblith, Norouzi and Hinton 2020, A Simple Framework for Contrastive
Learning of Visual Representations): a backbone from the registry, global average pooling to the
representation ``h`` (layer ``embedding``), and the projection head ``g``, an MLP with one hidden
layer, to ``z`` (layer ``projection``), on which :func:`nt_xent_loss` is computed.

The backbone is built headless and its layers are part of the same functional graph (the model
starts at the backbone's input), so layer names stay flat (``stage1_block1_out``, ...), the model
saves and reloads with ``safe_mode=True``, and :func:`encoder_of` (input to ``embedding``) is the
network kept after pretraining. The registry's metadata (preprocessing, minimum size, layer groups)
is that of the default backbone, cifar_resnet20.
"""

from __future__ import annotations

from recipes.autoencoder import encoder_of
from recipes.blocks import Kit, check_head_args, finish
from recipes.registry import register

__all__ = ["contrastive_encoder", "encoder_of", "nt_xent_loss"]

_PAPER = "Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations"
# cifar_resnet20's groups (recipes.resnet.layer_groups), then the representation and the head.
_GROUPS = (
    ("stem", "stem_relu"),
    ("stage1", "stage1_block3_out"),
    ("stage2", "stage2_block3_out"),
    ("stage3", "stage3_block3_out"),
    ("embedding", "embedding"),
    ("projection_head", "projection"),
)


@register(
    "contrastive_encoder",
    family="contrastive",
    paper=_PAPER,
    input_shape=(32, 32, 3),
    num_classes=None,
    params=283_120,
    paper_params=None,
    preprocessing="torch",
    layer_groups=_GROUPS,
    head_start="projection_hidden",
    min_size=8,
    task="contrastive",
    description="SimCLR: cifar_resnet20 backbone, 64-d representation h, MLP projection head to 128-d z",
    options={"backbone": "cifar_resnet20", "projection_dim": 128, "loss": "nt_xent_loss", "temperature": 0.5},
)
def contrastive_encoder(
    input_shape=None,
    num_classes=None,
    include_top=True,
    pooling=None,
    weights=None,
    name=None,
    *,
    api="tf_keras",
    include_preprocessing=True,
    backbone="cifar_resnet20",
    backbone_options=None,
    projection_dim=128,
    hidden_dim=None,
    weight_decay=0.0,
    kernel_initializer="glorot_uniform",
):
    """Builds a SimCLR encoder: backbone -> ``embedding`` (h) -> projection head -> ``projection`` (z).

    The projection head is the paper's ``g(h) = W2 relu(W1 h)``: ``projection_hidden`` (Dense, no
    bias: batch norm follows, as in the released code), ``projection_bn``, ``projection_relu`` and
    ``projection`` (Dense ``projection_dim``, linear). Train on pairs of augmented views with
    :func:`nt_xent_loss`; keep :func:`encoder_of` (h, not z, is the representation to transfer).

    Args:
        input_shape: (height, width, channels); default (32, 32, 3); at least the backbone's minimum.
        num_classes: ignored (kept so that every recipe has the same signature).
        include_top: keep the projection head; without it the model ends at ``embedding`` (h).
        pooling: how ``embedding`` pools the backbone's last map: None or "avg" (global average, as
            in the paper) or "max". Backbones that end in a vector (linear_classifier, mlp) are not pooled.
        weights: None or a path to a weights file for the whole model.
        name: model name; default "contrastive_encoder".
        api: "tf_keras" or "keras3".
        include_preprocessing: the backbone's in-model preprocessing (its registry ``preprocessing``).
        backbone: name of a registered classification recipe, built with ``include_top=False``.
        backbone_options: extra keyword arguments for the backbone builder (e.g. ``{"batch_norm": True}``).
        projection_dim: size of z (128 in the paper).
        hidden_dim: width of the head's hidden layer; None: the size of h, as in the paper.
        weight_decay: L2 factor on every kernel, backbone included.
        kernel_initializer: Keras initializer name for the projection head.

    Returns:
        A Keras functional model.
    """
    from recipes import registry

    check_head_args("contrastive_encoder", False, pooling, num_classes)
    base = registry.get(backbone) if isinstance(backbone, str) else None
    if base is None or base.task != "classification":
        choices = ", ".join(registry.names(task="classification"))
        raise ValueError(
            f"contrastive_encoder: backbone={backbone!r} must be the name of a classification recipe: {choices}."
        )
    for value, arg in ((projection_dim, "projection_dim"), (hidden_dim, "hidden_dim")):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"contrastive_encoder: {arg}={value!r} must be a positive integer.")
    options = dict(backbone_options or {})
    clash = {"input_shape", "include_top", "pooling", "api", "include_preprocessing", "weight_decay"} & set(options)
    if clash:
        raise ValueError(
            f"contrastive_encoder: backbone_options may not set {', '.join(sorted(clash))}; "
            "pass them to contrastive_encoder itself."
        )
    kit = Kit(api, weight_decay, kernel_initializer)
    trunk = base.build(
        input_shape=tuple(input_shape or (32, 32, 3)),
        include_top=False,
        pooling=None,
        api=api,
        include_preprocessing=include_preprocessing,
        weight_decay=weight_decay,
        **options,
    )
    x = trunk.output
    if len(x.shape) == 4:
        pool = kit.layers.GlobalMaxPooling2D if pooling == "max" else kit.layers.GlobalAveragePooling2D
        x = pool(name="embedding")(x)
    else:
        x = kit.layers.Identity(name="embedding")(x)
    if include_top:
        x = kit.dense(x, hidden_dim or int(x.shape[-1]), use_bias=False, name="projection_hidden")
        x = kit.bn(x, name="projection_bn")
        x = kit.act(x, "relu", name="projection_relu")
        x = kit.dense(x, projection_dim, name="projection")
    return finish(kit, trunk.input, x, name or "contrastive_encoder", weights)


def nt_xent_loss(z1, z2, temperature=0.5):
    """The NT-Xent loss (normalized temperature-scaled cross-entropy; SimCLR, eq. 1), TensorFlow.

    ``z1[k]`` and ``z2[k]`` are the projections of two views of image ``k``. Over the 2N vectors,
    each one's positive is its other view and the 2N - 2 remaining vectors are its negatives:
    ``l(i, j) = -log(exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t))`` with cosine
    similarity ``sim``; the loss is the mean of ``l`` over all 2N ordered positive pairs.

    Args:
        z1, z2: (N, d) tensors or arrays, N >= 2 (each row a view's projection).
        temperature: t (0.5 for CIFAR-10 in the paper).

    Returns:
        A scalar float32 tensor.
    """
    import tensorflow as tf

    if not temperature > 0:
        raise ValueError(f"nt_xent_loss: temperature={temperature!r} must be > 0.")
    z1 = tf.convert_to_tensor(z1, tf.float32)
    z2 = tf.convert_to_tensor(z2, tf.float32)
    if z1.shape.rank != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent_loss: z1 and z2 must be (N, d) with the same shape; got {z1.shape} and {z2.shape}.")
    n = tf.shape(z1)[0]
    z = tf.math.l2_normalize(tf.concat([z1, z2], axis=0), axis=1)
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits -= tf.eye(2 * n) * 1e9  # a vector is not its own negative
    labels = tf.concat([tf.range(n, 2 * n), tf.range(n)], axis=0)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_mean(losses)
