"""Losses the recipes come with: the multiclass SVM (hinge) loss of the CS231n notes.

Softmax cross-entropy is Keras's own (``SparseCategoricalCrossentropy``); the SVM loss sits next to
it for the linear classifier: ``L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + delta)`` (Weston and
Watkins 1999), on raw scores (build the classifier with ``classifier_activation=None``).
"""

from __future__ import annotations

import functools
import types

from recipes._keras import check_api, get_keras


@functools.cache
def custom_losses(api: str | None = None) -> types.SimpleNamespace:
    """Builds and registers the loss classes for one Keras API (cached)."""
    api = check_api(api)
    K = get_keras(api)
    if api == "tf_keras":
        import tensorflow as ops_module

        ops = types.SimpleNamespace(
            one_hot=lambda y, n, dtype: ops_module.one_hot(y, n, dtype=dtype),
            cast=ops_module.cast,
            reshape=ops_module.reshape,
            maximum=ops_module.maximum,
            sum=lambda x, axis: ops_module.reduce_sum(x, axis=axis),
            shape=lambda x: x.shape,
        )
    else:
        kops = K.ops
        ops = types.SimpleNamespace(
            one_hot=lambda y, n, dtype: kops.one_hot(y, n, dtype=dtype),
            cast=kops.cast,
            reshape=kops.reshape,
            maximum=kops.maximum,
            sum=lambda x, axis: kops.sum(x, axis=axis),
            shape=lambda x: x.shape,
        )

    class MulticlassHinge(K.losses.Loss):
        """Multiclass SVM loss on integer labels and raw class scores.

        Args:
            delta: the margin (1.0 in the CS231n notes).
        """

        def __init__(self, delta=1.0, name="multiclass_hinge", **kwargs):
            super().__init__(name=name, **kwargs)
            self.delta = float(delta)

        def call(self, y_true, y_pred):
            num_classes = y_pred.shape[-1]
            labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
            truth = ops.one_hot(labels, num_classes, y_pred.dtype)
            correct = ops.sum(y_pred * truth, axis=-1)
            margins = ops.maximum(0.0, y_pred - correct[:, None] + self.delta) * (1.0 - truth)
            return ops.sum(margins, axis=-1)

        def get_config(self):
            return {**super().get_config(), "delta": self.delta}

    MulticlassHinge.__module__ = __name__
    K.saving.register_keras_serializable(package="ktoolkit")(MulticlassHinge)
    return types.SimpleNamespace(MulticlassHinge=MulticlassHinge)


def multiclass_hinge(delta: float = 1.0, api: str | None = None):
    """Returns the multiclass SVM loss for ``api`` ("tf_keras" or "keras3")."""
    return custom_losses(api).MulticlassHinge(delta=delta)
