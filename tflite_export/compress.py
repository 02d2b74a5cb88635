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


def compress(model, steps, source, *, epochs: int = 2, steps_per_epoch: int | None = None, batch_size: int = 32,
             lr: float = 1e-3, sparsity: float = 0.8, clusters: int = 16, progress: bool = False):
    """Runs the ``steps`` ("prune", "cluster", "qat", in that order) on a copy of ``model``.

    Args:
        model: a float32 tf_keras classifier (nested models, e.g. a keras.applications base inside a
            transfer model, are flattened first: tfmot only wraps top-level layers).
        steps: the steps to run, a subsequence of :data:`STEPS`.
        source: the :class:`~tflite_export.source.ExportSource` whose training split fine-tunes.
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
    import tensorflow_model_optimization as tfmot

    model = _copy(flatten(model))  # fine-tuning must not change the caller's model
    train = source.dataset("train", batch_size=batch_size, training=True, one_hot=True).repeat()
    per_epoch = steps_per_epoch or max(1, math.ceil(len(source.data.splits["train"]) / batch_size))
    done = []
    for step in steps:
        if step == "prune":
            end = max(1, int(0.7 * epochs * per_epoch))
            schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=sparsity,
                                                             begin_step=0, end_step=end,
                                                             frequency=max(1, end // 20))
            wrapped = _clone(model, lambda layer: tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule))
            _fine_tune(wrapped, train, epochs, per_epoch, lr, progress, [tfmot.sparsity.keras.UpdatePruningStep()],
                       f"pruning to {sparsity:.0%} sparsity")
            model = tfmot.sparsity.keras.strip_pruning(wrapped)
        elif step == "cluster":
            cluster = tfmot.clustering.keras.cluster_weights  # passes preserve_sparsity on to the experimental code
            init = tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS
            preserve = "prune" in done

            def wrap(layer):
                k = _clusters_for(layer, clusters, preserve)
                return layer if k is None else cluster(layer, number_of_clusters=k, cluster_centroids_init=init,
                                                       preserve_sparsity=preserve)

            wrapped = _clone(model, wrap)
            _fine_tune(wrapped, train, epochs, per_epoch, lr, progress, [], f"clustering to {clusters} values per kernel")
            model = tfmot.clustering.keras.strip_clustering(wrapped)
        else:
            model = _quantize_aware(model, done)
            _fine_tune(model, train, epochs, per_epoch, lr, progress, [], "quantization-aware training")
        done.append(step)
    return model


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

    return tf_keras.models.clone_model(model, clone_function=lambda layer: wrap(layer) if _compressible(layer) else layer)


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
        log.warning("quantization-aware training: layer %r (%s) is not supported by tfmot and stays float during "
                    "fine-tuning; the converter calibrates it", layer.name, type(layer).__name__)
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
            return [q.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]

        def get_config(self):
            return {}

    return OutputQuantizeConfig


def _fine_tune(model, train, epochs, steps_per_epoch, lr, progress, callbacks, what):
    import tf_keras

    log.info("%s: fine-tuning %d epoch(s) of %d steps", what, epochs, steps_per_epoch)
    model.compile(optimizer=tf_keras.optimizers.Adam(lr), loss=tf_keras.losses.CategoricalCrossentropy(),
                  metrics=["accuracy"])
    history = model.fit(train, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                        verbose=1 if progress else 0)
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
