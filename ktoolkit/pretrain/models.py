"""What `ktool pretrain` trains: the network of each method, the SimCLR training step, the two views
of the input pipeline, and the encoder kept for transfer.

Every model here takes 0..255 pixels, like every ktoolkit model: the autoencoder recipes take 0..1
inputs, so they get an ``ImagePreprocessing("unit")`` layer in front (in the same flat graph, so
layer names stay addressable for freezing and cutting).
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras

from recipes.autoencoder import encoder_of
from recipes.contrastive import nt_xent_loss
from recipes.layers import custom_layers


def build_network(method: str, recipe, input_shape, *, noise=None, noise_strength=None, options=None):
    """The functional model pretraining trains, on 0..255 pixels.

    Autoencoders: image -> ``reconstruction`` (0..1). Contrastive: image -> ``projection`` (z), with
    ``recipe`` as the backbone when it is a classification recipe.
    """
    import recipes

    options = dict(options or {})
    if method == "contrastive":
        if recipe.task == "classification":
            options["backbone"] = recipe.name
            recipe = recipes.get("contrastive_encoder")
        return recipe.build(input_shape=tuple(input_shape), **options)
    if method == "denoising":
        options.update(noise=noise, noise_strength=noise_strength)
    autoencoder = recipe.build(input_shape=tuple(input_shape), **options)
    _check_chain(autoencoder)
    scale = custom_layers("tf_keras").ImagePreprocessing("unit", name="preprocessing")
    return _chain(autoencoder.input_shape[1:], [scale, *autoencoder.layers[1:]], autoencoder.name)


def transfer_encoder(network):
    """The encoder kept after pretraining: from the pixels to ``embedding``, without the denoising
    autoencoder's training-only ``noise`` layer (then as a copy of the layers, else sharing them)."""
    names = [layer.name for layer in network.layers]
    if "noise" not in names:
        return encoder_of(network, name=f"{network.name}_encoder")
    layers = network.layers[1 : names.index("embedding") + 1]
    return _chain(
        network.input_shape[1:], [layer for layer in layers if layer.name != "noise"], f"{network.name}_encoder"
    )


def _chain(input_shape, layers, name):
    """A new model of copies of ``layers`` (same configuration and weights), one after the other.

    Copies, not the layers themselves: a layer called in two graphs has no single ``output``, which
    cutting a model by layer name (features, fine-tuning) needs.
    """
    inputs = tf_keras.Input(tuple(input_shape), name="input")
    x = inputs
    for layer in layers:
        copy = layer.__class__.from_config(layer.get_config())
        x = copy(x)
        copy.set_weights(layer.get_weights())
    return tf_keras.Model(inputs, x, name=name)


def _check_chain(model):
    """Raises a ValueError unless every layer of ``model`` takes the previous layer's output only."""
    for previous, layer in zip(model.layers, model.layers[1:]):
        inbound = layer._inbound_nodes[0].inbound_layers
        inbound = inbound if not isinstance(inbound, (list, tuple)) else inbound[0] if len(inbound) == 1 else None
        if inbound is not previous:
            raise ValueError(
                f"{model.name}: layer {layer.name!r} does not follow {previous.name!r}; pretraining puts "
                "a scaling layer in front of autoencoders, which must be a chain of layers."
            )


class SimCLR(tf_keras.Model):
    """Trains ``network`` (image -> projection z) with the NT-Xent loss on batches of two views.

    The data are ``(view1, view2)`` batches: ``view1[k]`` and ``view2[k]`` are random transformations
    of image ``k``, its positive pair; the other 2N - 2 views of the batch are its negatives. Both
    views go through ``network`` as one batch, so batch normalization sees the statistics of both
    (SimCLR's global batch norm, on one device).
    """

    def __init__(self, network, temperature: float, **kwargs):
        super().__init__(name=f"{network.name}_simclr", **kwargs)
        self.network = network
        self.temperature = float(temperature)
        self.loss_tracker = tf_keras.metrics.Mean(name="loss")
        self.output_names = list(network.output_names)  # what ``call`` returns, for code that reads outputs
        self.built = True  # its variables are the (built) network's; BackupAndRestore needs a built model

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def _contrastive_loss(self, data, training):
        view1, view2 = data
        z = self.network(tf.concat([view1, view2], axis=0), training=training)
        z1, z2 = tf.split(z, 2, axis=0)
        return nt_xent_loss(z1, z2, self.temperature)

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss = self._contrastive_loss(data, training=True)
            total = loss + tf.add_n(self.network.losses) if self.network.losses else loss
            # Replicas' gradients are summed: scale as Keras does for compiled losses.
            total = total / self.distribute_strategy.num_replicas_in_sync
        variables = self.network.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        self.loss_tracker.update_state(self._contrastive_loss(data, training=False))
        return {"loss": self.loss_tracker.result()}


def two_views(dataset, views, seed: int, fixed: bool = False, image_shape=None):
    """Maps a dataset of ``(images, labels)`` batches to ``(view1, view2)``: two independent random
    transformations (:class:`ktoolkit.data.Augmenter` with ``views``) of each batch. Labels are dropped.

    ``fixed``: the same views every epoch (for a validation loss that epochs can be compared on).
    ``image_shape``: (height, width, channels) of the images, made static for the ops that need it (blur's kernel).
    """
    from ktoolkit.data import Augmenter

    augmenter = Augmenter(views, seed=seed)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=not fixed).batch(4, drop_remainder=True)

    def pair(batch, s):
        images, s = batch[0], tf.reshape(s, (2, 2))
        if image_shape is not None:
            images = tf.ensure_shape(images, [None, *image_shape])
        return augmenter(images, None, s[0])[0], augmenter(images, None, s[1])[0]

    return tf.data.Dataset.zip((dataset, seeds)).map(pair, num_parallel_calls=tf.data.AUTOTUNE)
