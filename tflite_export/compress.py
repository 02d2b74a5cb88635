"""Compression by fine-tuning, with tensorflow-model-optimization: pruning, clustering and
quantization-aware training, alone or combined (each later step preserves what the earlier ones did).

Each step wraps the layers, fine-tunes on the run's training split for a few epochs and, except
quantization-aware training, strips the wrappers again, so the result is a plain Keras model that
the TFLite or ONNX converter takes. Quantization-aware models keep their fake-quantization nodes:
the converter reads the learned ranges from them.

- **prune**: magnitude pruning of every Conv2D and Dense kernel (Zhu and Gupta 2017), sparsity
  rising from 0 to ``sparsity`` along a polynomial schedule over the first 70% of the steps.
- **cluster**: weight sharing (Han et al. 2016): each kernel's values are replaced by
  ``clusters`` centroids (k-means++ initialized) that fine-tuning moves; after pruning, zeros stay zero.
- **qat**: quantization-aware training (Jacob et al. 2018), int8 fake quantization in the forward
  pass; after pruning or clustering, the sparsity or the clusters are preserved.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

STEPS = ("prune", "cluster", "qat")
RANGE_IMAGES = 64  # training images that set the activation ranges before quantization-aware training


def compress(
    model,
    steps,
    source,
    *,
    epochs: int = 2,
    steps_per_epoch: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    sparsity: float = 0.8,
    clusters: int = 16,
    progress: bool = False,
):
    """Runs the ``steps`` ("prune", "cluster", "qat", in that order) on a copy of ``model``.

    Args:
        model: a float32 tf_keras classifier (nested models, e.g. a keras.applications base inside a
            transfer model, are flattened first: tfmot only wraps top-level layers).
        steps: the steps to run, a subsequence of :data:`STEPS`.
        source: the :class:`~ktoolkit.export.source.ExportSource` (or any object with its ``dataset``,
            ``data.splits`` and ``calibration_images``) whose training split fine-tunes.
        epochs: fine-tuning epochs per step.
        steps_per_epoch: cap on the batches per epoch (None: the whole training split).
        batch_size: fine-tuning batch size.
        lr: Adam's learning rate for fine-tuning.
        sparsity: the fraction of zero weights pruning ends at.
        clusters: shared values per kernel when clustering.
        progress: show Keras's progress bar.

    Returns:
        The compressed Keras model, ready to convert.
    """
    unknown = [s for s in steps if s not in STEPS]
    if unknown or list(steps) != sorted(steps, key=STEPS.index):
        raise ValueError(f"steps={list(steps)!r}: use steps among {', '.join(STEPS)}, in that order.")
    import tf_keras

    tf_keras.utils.set_random_seed(0)  # the same export twice gives the same file (k-means++, shuffling)
    model = _copy(flatten(model))  # fine-tuning must not change the caller's model
    train = source.dataset("train", batch_size=batch_size, training=True, one_hot=True).repeat()
    per_epoch = steps_per_epoch or max(1, math.ceil(len(source.data.splits["train"]) / batch_size))

    def fine_tune(wrapped, what, callbacks=()):
        _fine_tune(wrapped, train, epochs, per_epoch, lr, progress, list(callbacks), what)

    done = []
    for step in steps:
        if step == "prune":
            model = _prune(model, sparsity, end_step=max(1, int(0.7 * epochs * per_epoch)), fine_tune=fine_tune)
        elif step == "cluster":
            model = _cluster(model, clusters, preserve_sparsity="prune" in done, fine_tune=fine_tune)
        else:
            model = fold_batch_norm(model)
            qat = _quantize_aware(model, done)
            _start_ranges(qat, model, source.calibration_images(RANGE_IMAGES))
            fine_tune(qat, "quantization-aware training")
            model = qat  # not stripped: the converter reads the learned ranges from it
        done.append(step)
    return model


def _prune(model, sparsity: float, end_step: int, fine_tune):
    """Magnitude pruning to ``sparsity`` along a polynomial schedule that ends at ``end_step``; stripped."""
    import tensorflow_model_optimization as tfmot

    prune = tfmot.sparsity.keras
    schedule = prune.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0, end_step=end_step, frequency=max(1, end_step // 20)
    )
    wrapped = _clone(model, lambda layer: prune.prune_low_magnitude(layer, pruning_schedule=schedule))
    fine_tune(wrapped, f"pruning to {sparsity:.0%} sparsity", [prune.UpdatePruningStep()])
    return prune.strip_pruning(wrapped)


def _cluster(model, clusters: int, preserve_sparsity: bool, fine_tune):
    """Weight clustering (k-means++ initialized centroids, moved by fine-tuning); stripped."""
    import tensorflow_model_optimization as tfmot

    cluster = tfmot.clustering.keras

    def wrap(layer):
        k = _clusters_for(layer, clusters, preserve_sparsity)
        if k is None:
            return layer
        # the public cluster_weights passes preserve_sparsity on to the experimental implementation
        return cluster.cluster_weights(
            layer,
            number_of_clusters=k,
            preserve_sparsity=preserve_sparsity,
            cluster_centroids_init=cluster.CentroidInitialization.KMEANS_PLUS_PLUS,
        )

    wrapped = _clone(model, wrap)
    fine_tune(wrapped, f"clustering to {clusters} values per kernel")
    return cluster.strip_clustering(wrapped)


def _compressible(layer) -> bool:
    """Conv2D and Dense kernels are pruned and clustered; depthwise kernels (a few weights per
    channel, MobileNet's bottleneck) and batch-norm parameters are left alone."""
    return type(layer).__name__ in ("Conv2D", "Dense")


def _clusters_for(layer, clusters: int, preserve_sparsity: bool) -> int | None:
    """``clusters``, or fewer for a kernel with too few weights to share them (None: too few to
    cluster at all). k-means++ needs at least as many weights as centroids; sparsity-preserving
    clustering splits the centroids other than zero between the negative and the positive weights
    in proportion to their counts; tfmot wants at least 3 clusters."""
    kernel = layer.kernel.numpy()
    if not preserve_sparsity:
        k = min(clusters, kernel.size)
    else:
        positive, negative = int((kernel > 0).sum()), int((kernel < 0).sum())
        k = min(clusters, 1 + min(positive, negative)) if positive + negative >= 2 else 0
        k = max(k, 3) if positive + negative >= 2 else 0
    return k if k >= 3 else None


def _clone(model, wrap):
    """``model`` with ``wrap(layer)`` in place of each compressible layer (wrappers keep the weights)."""
    import tf_keras

    return tf_keras.models.clone_model(
        model, clone_function=lambda layer: wrap(layer) if _compressible(layer) else layer
    )


def _copy(model):
    import tf_keras

    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _quantize_aware(model, done):
    """Wraps ``model`` for quantization-aware training, preserving earlier pruning or clustering.

    Layers that tfmot's 8-bit registry knows get its per-layer configs; weightless layers it does
    not know (ktoolkit's ImagePreprocessing, ChannelPad, LRN) get their output quantized, so the
    whole graph runs in int8 after conversion.
    """
    import tensorflow_model_optimization as tfmot
    import tf_keras

    q = tfmot.quantization.keras
    registry = q.default_8bit.Default8BitQuantizeRegistry()
    output_only = _output_quantize_config_class()

    def annotate(layer):
        if isinstance(layer, tf_keras.layers.InputLayer):
            return layer
        # Batch normalization after a convolution is folded into it by tfmot's layout transforms.
        if registry.supports(layer) or isinstance(layer, tf_keras.layers.BatchNormalization):
            return q.quantize_annotate_layer(layer)
        if not layer.weights:
            return q.quantize_annotate_layer(layer, output_only())
        log.warning(
            "quantization-aware training: layer %r (%s) is not supported by tfmot and stays float during "
            "fine-tuning; the converter calibrates it",
            layer.name,
            type(layer).__name__,
        )
        return layer

    annotated = tf_keras.models.clone_model(model, clone_function=annotate)
    if "cluster" in done:
        scheme = tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity="prune" in done)
    elif "prune" in done:
        scheme = q.collab_opts.Default8BitPrunePreserveQuantizeScheme()
    else:
        scheme = q.default_8bit.Default8BitQuantizeScheme()
    with q.quantize_scope({output_only.__name__: output_only}):
        return q.quantize_apply(annotated, scheme)


def fold_batch_norm(model):
    """Returns ``model`` with each batch normalization that follows a Conv2D or DepthwiseConv2D folded
    into that layer's kernel and bias (same function, inference mode).

    tfmot quantizes a convolution's kernel before the batch normalization after it, and a
    depthwise kernel with one range for all channels: MobileNetV2's first depthwise kernel spans
    -56..56 before normalization, so most channels round to zero. Folded, as the TFLite converter
    folds them, the kernels carry their channels' real scales.
    """
    import tf_keras

    config = model.get_config()
    folds = _foldable_batch_norms(config)
    if not folds:
        return model
    _remove_folded(config, folds)
    folded = tf_keras.Model.from_config(config)
    into = {conv: bn for bn, conv in folds.items()}
    for layer in folded.layers:
        old = model.get_layer(layer.name)
        if layer.name not in into:
            layer.set_weights(old.get_weights())
            continue
        depthwise = layer.__class__.__name__ == "DepthwiseConv2D"
        layer.set_weights(_folded_weights(old, model.get_layer(into[layer.name]), depthwise))
    log.info("folded %d batch normalization(s) into the convolutions before quantization-aware training", len(folds))
    return folded


def _foldable_batch_norms(config: dict) -> dict[str, str]:
    """Batch normalization -> the convolution it folds into: the only consumer of a linear Conv2D or
    DepthwiseConv2D, normalizing the channel axis."""
    entries = {layer["name"]: layer for layer in config["layers"]}
    consumers = {}
    for layer in config["layers"]:
        for node in layer["inbound_nodes"]:
            for inbound in node:
                consumers.setdefault(inbound[0], []).append(layer["name"])
    for output in config["output_layers"]:
        consumers.setdefault(output[0], []).append(None)
    folds = {}
    for layer in config["layers"]:
        if layer["class_name"] != "BatchNormalization" or len(layer["inbound_nodes"]) != 1:
            continue
        source = layer["inbound_nodes"][0][0][0]
        conv = entries[source]
        if (
            conv["class_name"] in ("Conv2D", "DepthwiseConv2D")
            and conv["config"].get("activation") == "linear"
            and consumers.get(source) == [layer["name"]]
            and layer["config"]["axis"] in (-1, [3], 3)
        ):
            folds[layer["name"]] = source
    return folds


def _remove_folded(config: dict, folds: dict[str, str]) -> None:
    """Drops the folded batch normalizations from ``config`` (in place): their convolutions get a bias and
    take their place as inputs and outputs."""
    config["layers"] = [layer for layer in config["layers"] if layer["name"] not in folds]
    for layer in config["layers"]:
        if layer["name"] in folds.values():
            layer["config"]["use_bias"] = True
        for node in layer["inbound_nodes"]:
            for inbound in node:
                inbound[0] = folds.get(inbound[0], inbound[0])
    for output in config["output_layers"]:
        output[0] = folds.get(output[0], output[0])


def _folded_weights(conv, bn, depthwise: bool) -> list:
    """[kernel, bias] of ``conv`` with the inference-mode batch normalization ``bn`` folded in."""
    import numpy as np

    kernel = conv.get_weights()[0]
    bias = conv.get_weights()[1] if conv.use_bias else 0.0
    gamma = bn.gamma.numpy() if bn.scale else 1.0
    beta = bn.beta.numpy() if bn.center else 0.0
    scale = gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    shaped = scale.reshape(kernel.shape[2], kernel.shape[3]) if depthwise else scale
    return [kernel * shaped, (bias - bn.moving_mean.numpy()) * scale + beta]


def _start_ranges(qat, model, images, batch_size: int = 16):
    """Sets the activation quantizers' ranges to what ``model``'s activations span on ``images``.

    tfmot starts every range at -6..6 and moves it by 0.1% of the batch's range per training step,
    which a short fine-tuning never finishes: activations beyond 6 (logits, residual sums) stay
    clipped. Starting from the measured ranges, as post-training calibration would, the
    quantization-aware model is as accurate as post-training int8 before its first step.
    """
    import numpy as np
    import tf_keras

    model = _copy(model)  # layers of its own: ``model``'s may also be called in the stripped or wrapped models
    layers = {layer.name: layer for layer in model.layers}
    plan, tensors = [], []  # (min variable, max variable, layer whose pre-activation it is), the float tensors
    for layer in qat.layers:
        found = {w.name.rsplit("/", 1)[-1].split(":")[0]: w for w in layer.weights}
        for kind in ("quantize_layer", "output", "post_activation", "pre_activation"):
            low, high = found.get(f"{kind}_min"), found.get(f"{kind}_max")
            inner = layers.get(layer.name.removeprefix("quant_"))
            if low is None or high is None or (inner is None and kind != "quantize_layer"):
                continue
            tensor = (
                model.inputs[0]
                if kind == "quantize_layer"
                else inner.input
                if kind == "pre_activation"
                else inner.output
            )
            plan.append((low, high, inner if kind == "pre_activation" else None))
            tensors.append(tensor)
    if not plan:
        return
    probe = tf_keras.Model(model.inputs, tensors)
    lows, highs = [np.inf] * len(tensors), [-np.inf] * len(tensors)
    for start in range(0, len(images), batch_size):
        values = probe(images[start : start + batch_size], training=False)
        values = values if isinstance(values, list) else [values]
        for i, (_, _, inner) in enumerate(plan):
            v = values[i]
            if inner is not None:  # the layer's output before its activation (softmax's logits)
                activation, inner.activation = inner.activation, tf_keras.activations.linear
                v = inner(v)
                inner.activation = activation
            v = np.asarray(v)
            lows[i], highs[i] = min(lows[i], float(v.min())), max(highs[i], float(v.max()))
    for i, (low, high, _) in enumerate(plan):
        low.assign(np.full(low.shape, min(lows[i], 0.0), dtype=np.float32))  # 0 stays representable
        high.assign(np.full(high.shape, max(highs[i], 0.0), dtype=np.float32))


def _output_quantize_config_class():
    """A QuantizeConfig that quantizes a layer's output only (for weightless custom layers)."""
    import tensorflow_model_optimization as tfmot

    q = tfmot.quantization.keras

    class OutputQuantizeConfig(q.QuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [
                q.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)
            ]

        def get_config(self):
            return {}

    return OutputQuantizeConfig


def _fine_tune(model, train, epochs, steps_per_epoch, lr, progress, callbacks, what):
    """Fine-tunes with Adam; batch normalization stays in inference mode (frozen), as when fine-tuning
    any trained network: a few steps of small-batch statistics would replace the ones it was
    trained with, and the moving averages (MobileNet's momentum is 0.999) could not follow."""
    import tf_keras

    for layer in model.layers:
        inner = getattr(layer, "layer", layer)  # tfmot wraps layers
        if isinstance(inner, tf_keras.layers.BatchNormalization):
            inner.trainable = False
    log.info("%s: fine-tuning %d epoch(s) of %d steps", what, epochs, steps_per_epoch)
    model.compile(
        optimizer=tf_keras.optimizers.Adam(lr), loss=tf_keras.losses.CategoricalCrossentropy(), metrics=["accuracy"]
    )
    history = model.fit(
        train, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=1 if progress else 0
    )
    log.info("%s: training accuracy %.1f%% in the last epoch", what, 100 * history.history["accuracy"][-1])


def flatten(model):
    """Returns a functional model with the same layers and weights in which no layer is a model.

    ``tf_keras.applications`` bases used as one layer of a transfer model (``x = base(x)``) become
    their individual layers, so that pruning, clustering and quantization reach them. Layers are
    shared with ``model``, not copied. A model without nested models is returned as it is.
    """
    import tf_keras

    if not any(isinstance(layer, tf_keras.Model) for layer in model.layers):
        return model
    inputs = [tf_keras.Input(shape=x.shape[1:], dtype=x.dtype, name=x.name.split(":")[0]) for x in model.inputs]
    outputs = _call_flat(model, inputs)
    return tf_keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)


def _call_flat(model, inputs):
    """Applies ``model``'s graph to ``inputs`` layer by layer, descending into nested models (the
    traversal of tf_keras's ``Functional._run_internal_graph``)."""
    import tensorflow as tf
    import tf_keras

    tensors = _Computed({str(id(x)): y for x, y in zip(model.inputs, inputs)})
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or any(i not in tensors for i in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(tensors)
            if isinstance(node.layer, tf_keras.Model):
                outputs = _call_flat(node.layer, tf.nest.flatten(args[0] if args else kwargs["inputs"]))
            else:
                outputs = node.layer(*args, **kwargs)
            for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                tensors[x_id] = y
    return [dict.__getitem__(tensors, str(id(x))) for x in model.outputs]


class _Computed(dict):
    """Tensor id -> computed tensor, in the form ``Node.map_arguments`` reads (a list it pops from)."""

    def __getitem__(self, key):
        return [dict.__getitem__(self, key)]
