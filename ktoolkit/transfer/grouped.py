"""Per-group learning rates: a functional model that trains each group of layers with its own optimizer."""

from __future__ import annotations

import tensorflow as tf
import tf_keras


class GroupedLearningRates(tf_keras.Model):
    """A functional model that applies one optimizer per group of layers.

    ``set_groups({group: optimizer}, {layer name: group})`` before ``fit``; the optimizer given to
    ``compile`` is one of them (Keras reports its learning rate). The optimizers are attributes of the
    model, so checkpoints (BackupAndRestore) save and restore all of them. Used for training only: the
    run saves a plain functional model made of the same layers.
    """

    def set_groups(self, optimizers: dict, groups: dict):
        self._group_optimizers = list({id(o): o for o in optimizers.values()}.values())
        index = {id(o): i for i, o in enumerate(self._group_optimizers)}
        layer_of = {weight.ref(): layer.name for layer in self.layers for weight in layer.trainable_weights}
        # the optimizer of each trainable variable, in trainable_variables order (set the trainable flags first)
        self._variable_group = [index[id(optimizers[groups[layer_of[v.ref()]]])] for v in self.trainable_variables]

    def train_step(self, data):
        x, y, sample_weight = tf_keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        for i, optimizer in enumerate(self._group_optimizers):
            pairs = [(g, v) for g, v, k in zip(gradients, variables, self._variable_group) if k == i]
            if pairs:
                optimizer.apply_gradients(pairs)
        return self.compute_metrics(x, y, y_pred, sample_weight)
