"""k-nearest-neighbour classifier on cached features (CS231n's first classifier), k and metric by CV.

An image is given the class most of its ``k`` nearest training images have (uniform votes; of tied
classes, the lowest index, as scikit-learn's ``KNeighborsClassifier``). Two metrics:

- ``cosine``: the cosine similarity of the raw features (rows scaled to unit length). Pooled ReLU
  features are non-negative and their direction carries the class (the usual kNN evaluation of
  self-supervised features, e.g. Wu et al. 2018, Caron et al. 2021, uses it on the raw features).
- ``l2``: Euclidean distance on the features standardized as the linear probe standardizes them
  (``features.standardization``): raw pooled features differ in scale by orders of magnitude between
  channels, and the few large ones would decide the distance alone.

k and the metric are chosen by stratified k-fold cross-validation over every labelled image (the
standardization of each fold from its fit part only), and the classifier keeps every image as a
reference. As a Keras model (:func:`knn_classifier_model`) it is the base cut at the features, a Dense
layer of one score per reference (the dot product with the reference, or ``2 x.t - |t|^2``, which orders
references as the L2 distance does) and ``NeighbourVote`` (top-k, the references' labels, one-hot, mean):
TFLite builtin ops only (TOPK_V2, GATHER, ONE_HOT, MEAN).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ktoolkit.transfer.features import one_blas_thread

KS = (1, 3, 5, 7, 11, 15, 21)
METRICS = ("cosine", "l2")
# Every reference is a unit of the Dense layer: 20,000 references of 1,280 features are 100 MB of weights
# and a 20,000-way top-k per image. Beyond, a linear classifier is the better tool.
MAX_REFERENCES = 20_000
_CHUNK = 1024  # query rows per score matrix (bounds memory at _CHUNK x references)


@dataclass
class KnnClassifier:
    """The references (in the metric's space), their labels, k, the metric and the CV evidence."""

    references: np.ndarray  # (N, D) float64: unit rows (cosine) or standardized features (l2)
    labels: np.ndarray  # (N,) int
    k: int
    metric: str
    num_classes: int
    mean: np.ndarray | None = None  # (D,) l2: the standardization of the references
    scale: np.ndarray | None = None
    cv: object = None  # ktoolkit.stats.Accuracy of the out-of-fold predictions of the chosen (metric, k)
    cv_predictions: np.ndarray | None = None  # (N,) out-of-fold predicted class of each image
    cv_scores: dict = field(default_factory=dict)  # {"cosine k=5": cross-validated accuracy}
    folds: int = 0
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return len(self.labels)

    def neighbours(self, features) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest references of each row: (indices, scores), nearest first."""
        queries = _space(features, self.metric, self.mean, self.scale)
        return _nearest(queries, self.references, self.metric, self.k)

    def predict_proba(self, features) -> np.ndarray:
        """The share of each class among the ``k`` nearest references, (n, classes)."""
        indices, _ = self.neighbours(features)
        return _votes(self.labels[indices], self.num_classes)

    def accuracy(self, features, labels) -> float:
        return float((self.predict_proba(features).argmax(1) == np.asarray(labels)).mean())

    def near_ties(self, features, tolerance: float = 1e-5) -> np.ndarray:
        """Rows whose k-th and (k+1)-th nearest references score within ``tolerance`` (relative) of each
        other: there float32 (the Keras model) and float64 (this class) may pick different neighbours."""
        queries = _space(features, self.metric, self.mean, self.scale)
        if self.k >= len(self.labels):
            return np.zeros(len(queries), bool)
        _, scores = _nearest(queries, self.references, self.metric, self.k + 1)
        size = np.maximum(1.0, np.abs(scores).max(axis=1))
        return np.abs(scores[:, -2] - scores[:, -1]) <= tolerance * size


def _space(x, metric: str, mean=None, scale=None) -> np.ndarray:
    """Features as the metric compares them: unit rows (cosine; a zero row stays zero) or standardized (l2)."""
    x = np.asarray(x, np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms > 0, norms, 1.0)
    if metric == "l2":
        return (x - mean) / scale
    raise ValueError(f"metric={metric!r} is not a kNN metric; use one of {', '.join(METRICS)}.")


def _nearest(queries, references, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n, k) of each query's ``k`` highest-scoring references and their scores, best first; of
    equal scores the lower index first (as tf.math.top_k). l2 scores are ``2 q.t - |t|^2``: the squared
    distance minus ``|q|^2``, the same order."""
    k = min(k, len(references))
    offset = -(references**2).sum(axis=1) if metric == "l2" else 0.0
    factor = 2.0 if metric == "l2" else 1.0
    out_idx, out_scores = [], []
    for start in range(0, len(queries), _CHUNK):
        scores = factor * queries[start : start + _CHUNK] @ references.T + offset
        if k < scores.shape[1]:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        picked = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, -picked), axis=-1)
        out_idx.append(np.take_along_axis(part, order, axis=1))
        out_scores.append(np.take_along_axis(picked, order, axis=1))
    if not out_idx:
        return np.zeros((0, k), np.int64), np.zeros((0, k))
    return np.concatenate(out_idx), np.concatenate(out_scores)


def _votes(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Uniform votes: (n, k) labels -> (n, classes) shares."""
    return (neighbour_labels[..., None] == np.arange(num_classes)).mean(axis=1)


def _oof_predictions(x, y, splits, ks, metrics, num_classes) -> dict:
    """{(metric, k): out-of-fold predicted class of every image}, each from the other folds' references."""
    from ktoolkit.transfer.features import standardization

    predicted = {(m, k): np.zeros(len(y), np.int64) for m in metrics for k in ks}
    for fit, held in splits:
        for metric in metrics:
            mean, scale = standardization(x[fit]) if metric == "l2" else (None, None)
            refs = _space(x[fit], metric, mean, scale)
            indices, _ = _nearest(_space(x[held], metric, mean, scale), refs, metric, max(ks))
            labels = y[fit][indices]
            for k in ks:
                predicted[(metric, k)][held] = _votes(labels[:, :k], num_classes).argmax(axis=1)
    return predicted


@one_blas_thread
def fit_knn(
    x,
    y,
    *,
    num_classes: int | None = None,
    ks=KS,
    metrics=METRICS,
    folds: int = 5,
    seed: int = 0,
    max_references: int | None = MAX_REFERENCES,
) -> KnnClassifier:
    """A kNN classifier on every image of ``x``, with k and the metric chosen by stratified k-fold CV.

    Every (metric, k) is scored by its out-of-fold predictions (each image voted on by the other folds'
    images; k larger than a fold's references is not tried); the most right wins, of equals the first in
    ``metrics`` then ``ks`` order (the smaller k). ``folds`` as in ``ktoolkit.stats.stratified_folds``.

    Raises:
        ValueError: more than ``max_references`` images, or a metric that is not one of METRICS.
    """
    from ktoolkit.stats import Accuracy, stratified_folds
    from ktoolkit.transfer.features import standardization

    started = time.time()
    x, y = np.asarray(x, np.float64), np.asarray(y).astype(np.int64)
    if max_references is not None and len(y) > max_references:
        raise ValueError(
            f"strategy=knn: {len(y):,} labelled images is more than the {max_references:,} references the kNN "
            "classifier keeps; use --strategy linear (or auto) for this much data."
        )
    for metric in metrics:
        _space(x[:0], metric, 0.0, 1.0)  # a ValueError names a bad metric before any work
    num_classes = num_classes or int(y.max()) + 1
    splits = stratified_folds(y, folds, seed)
    smallest = min(len(fit) for fit, _ in splits)
    ks = [k for k in ks if 1 <= k <= smallest] or [1]
    predicted = _oof_predictions(x, y, splits, ks, metrics, num_classes)
    correct = {key: int((p == y).sum()) for key, p in predicted.items()}
    metric, k = max(predicted, key=lambda key: correct[key])  # max keeps the first of equals
    per_fold = [float((predicted[(metric, k)][held] == y[held]).mean()) for _, held in splits]
    mean, scale = standardization(x) if metric == "l2" else (None, None)
    return KnnClassifier(
        references=_space(x, metric, mean, scale),
        labels=y,
        k=k,
        metric=metric,
        num_classes=num_classes,
        mean=mean,
        scale=scale,
        cv=Accuracy.of(predicted[(metric, k)], y, how=f"{len(splits)}-fold cross-validated", folds=per_fold),
        cv_predictions=predicted[(metric, k)],
        cv_scores={f"{m} k={kk}": c / len(y) for (m, kk), c in correct.items()},
        folds=len(splits),
        seconds=time.time() - started,
    )


def knn_probe(x, y, *, num_classes: int | None = None, folds: int = 5, seed: int = 0, ks=KS, metrics=METRICS):
    """The cross-validated accuracy (a ``ktoolkit.stats.Accuracy``) of :func:`fit_knn` on ``x``: kNN as a
    probe of how well features separate the classes, beside the linear probe (``advise``)."""
    return fit_knn(x, y, num_classes=num_classes, ks=ks, metrics=metrics, folds=folds, seed=seed).cv


def knn_classifier_model(model, layer: str, knn: KnnClassifier, name: str | None = None):
    """``model`` cut at ``layer``, global average pooling, then the kNN vote: a plain Keras classifier whose
    last layer ("predictions") gives the share of each class among the ``k`` nearest references.

    cosine: unit-length features (UnitNormalization) times the unit references; l2: the standardization
    folded into the Dense layer, kernel ``2 (t / scale)^T`` and bias ``-|t|^2 - 2 (mean / scale) . t`` for
    standardized references t, which is ``2 z.t - |t|^2`` for the standardized query z.
    """
    import tf_keras

    from recipes.layers import custom_layers

    x = model.get_layer(layer).output
    if len(x.shape) == 4:
        x = tf_keras.layers.GlobalAveragePooling2D(name="avg_pool_features")(x)
    refs = knn.references
    if knn.metric == "cosine":
        x = tf_keras.layers.UnitNormalization(axis=-1, name="feature_normalization")(x)
        kernel, bias = refs.T, np.zeros(len(refs))
    else:
        kernel = 2.0 * (refs / knn.scale).T
        bias = -(refs**2).sum(axis=1) - 2.0 * refs @ (knn.mean / knn.scale)
    dense = tf_keras.layers.Dense(len(refs), name="neighbour_scores")
    scores = dense(x)
    dense.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    vote = custom_layers("tf_keras").NeighbourVote(k=knn.k, num_classes=knn.num_classes, name="predictions")
    outputs = vote(scores)
    vote.set_weights([knn.labels.astype(np.int32)])
    return tf_keras.Model(model.inputs, outputs, name=name or f"{model.name}_knn")
