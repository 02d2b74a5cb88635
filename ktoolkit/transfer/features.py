"""CNN codes: features of a (frozen) network at a layer, cached on disk, and linear classifiers on them.

The top-layer features of a pretrained network are computed once per (network, weights, layer, data,
image size) and kept in the cache folder (``KTOOLKIT_CACHE_DIR``, default ~/.cache/ktoolkit), so a
linear classifier trains in seconds and a second run is instant. Features of a 4-D layer are its
global average pool. A linear classifier (multinomial logistic regression) is fit on standardized
features and folded back into a Dense layer, so the result is a plain Keras model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

C_GRID = (0.01, 0.1, 1.0)  # fit_linear's choice on a validation split
# fit_linear_cv's grid, walked from the strongest regularization up (the first C that no later one beats
# wins): 1e-4 to 10 in steps of 10^0.5. Three values (0.01, 0.1, 1) left flowers5's best C (0.001, 70.9%
# cross-validated on 3,876 images against 69.7% at 0.01) outside the grid; scikit-learn's
# LogisticRegressionCV searches 1e-4 to 1e4.
CV_C_GRID = tuple(float(f"{c:.3g}") for c in np.logspace(-4, 1, 11))
C_PATIENCE = 2  # larger Cs tried after the best before the walk stops
# Features are standardized with their standard deviation, but never divided by less than this fraction
# of the median feature's: a nearly constant feature (pooled ReLU6 channels of an early layer vary by
# 0.0003 around 4) would otherwise get a weight thousands of times the others, which no 8-bit
# quantization of the classifier survives.
SCALE_FLOOR = 0.3


def one_blas_thread(fn):
    """Runs ``fn`` with NumPy/SciPy's BLAS limited to one thread (threadpoolctl, a scikit-learn dependency).

    Why: the classifiers here multiply matrices of a few thousand rows, where a second BLAS thread gains
    little on an idle machine, and OpenBLAS threads that spin-wait for a core make the same fits 8-18x
    slower on a loaded one (5-fold C choice on 1,617 digits features: 7.2 s with one thread, 57-129 s with
    the default two, load 7-9, 2 cores). TensorFlow's own thread pools are not affected.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _blas_threads(1):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _blas_threads(count: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn requires it
        yield
        return
    with threadpool_limits(count, user_api="blas"):
        yield


# ----------------------------------------------------------------------------------------- cut points
def cut_points(model) -> list[str]:
    """Layers where ``model`` can be cut: every path from the input to the output passes through them.

    Returns the last such layer of each spatial resolution (image-shaped outputs), input to output,
    so for a ResNet these are the ends of its stages. Found from the graph, for any functional model.
    """
    layers = model.layers
    index = {id(layer): i for i, layer in enumerate(layers)}
    reach = [i for i in range(len(layers))]  # furthest consumer of each layer
    for i, layer in enumerate(layers):
        for node in layer._outbound_nodes:
            j = index.get(id(node.outbound_layer))
            if j is not None:
                reach[i] = max(reach[i], j)
    cuts, furthest = [], 0  # furthest: the furthest consumer of any layer before layer i
    for i, layer in enumerate(layers):
        shape = _output_shape(layer)
        if furthest <= i and i > 0 and shape is not None and len(shape) == 4 and type(layer).__name__ not in _NOT_CUTS:
            cuts.append((layer.name, tuple(shape[1:3])))
        furthest = max(furthest, reach[i])
    ends = [name for k, (name, size) in enumerate(cuts) if k + 1 == len(cuts) or cuts[k + 1][1] != size]
    return ends


# Layers that only pad or rescale: cutting there gives the same features as the layer before.
_NOT_CUTS = ("ZeroPadding2D", "Rescaling", "Normalization", "ImagePreprocessing", "InputLayer")


def _output_shape(layer):
    try:
        shape = layer.output_shape
    except (AttributeError, RuntimeError):
        return None
    return shape if isinstance(shape, tuple) else None


# ------------------------------------------------------------------------------------------ features
def model_key(model) -> str:
    """A hash of the architecture and every weight: cached features are reused only for this model."""
    h = hashlib.sha1(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for weight in model.weights:
        h.update(np.ascontiguousarray(weight.numpy()).data)
    return h.hexdigest()[:16]


def feature_model(model, layers):
    """A model from ``model``'s input to the pooled features of each of ``layers``."""
    import tf_keras

    outputs = []
    for name in layers:
        x = model.get_layer(name).output
        if len(x.shape) == 4:
            x = tf_keras.layers.GlobalAveragePooling2D(name=f"{name}_features")(x)
        elif len(x.shape) != 2:
            raise ValueError(
                f"layer={name!r} has output shape {tuple(x.shape)}; features need an image-shaped or flat layer."
            )
        outputs.append(x)
    return tf_keras.Model(model.inputs, outputs, name=f"{model.name}_features")


@dataclass
class FeatureCache:
    """Feature arrays on disk, one .npy file per (model, layer, data, image size)."""

    root: Path = field(
        default_factory=lambda: (
            Path(os.environ.get("KTOOLKIT_CACHE_DIR", "~/.cache/ktoolkit")).expanduser() / "features"
        )
    )
    hits: int = 0
    misses: int = 0

    def path(self, key: str) -> Path:
        return Path(self.root) / f"{key}.npy"

    def load(self, key: str):
        path = self.path(key)
        if path.exists():
            try:
                array = np.load(path)
                self.hits += 1
                return array
            except (OSError, ValueError):
                log.warning("ignoring unreadable feature cache file %s", path)
        self.misses += 1
        return None

    def save(self, key: str, array: np.ndarray):
        from ktoolkit.io import atomic_path

        Path(self.root).mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(key)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)


def extract_features(
    model,
    layers,
    split,
    *,
    image_size,
    channels,
    batch_size: int = 64,
    cache: FeatureCache | None = None,
    key: str | None = None,
    progress: bool = False,
) -> dict:
    """Features of ``split``'s images at each of ``layers``: ``{layer: array (N, D)}`` in split order.

    Cached layers are read from ``cache``; the others are computed in one pass over the data.
    ``key`` identifies the model (default :func:`model_key`).
    """
    from ktoolkit.data import make_dataset

    layers = list(dict.fromkeys(layers))
    result, keys = {}, {}
    if cache is not None:
        key = key or model_key(model)
        for name in layers:
            keys[name] = hashlib.sha1(
                f"{key}|{name}|{split.fingerprint()}|{tuple(image_size)}|{channels}".encode()
            ).hexdigest()[:24]
            cached = cache.load(keys[name])
            if cached is not None and len(cached) == len(split):
                result[name] = cached
    todo = [name for name in layers if name not in result]
    if todo:
        started = time.time()
        dataset = make_dataset(
            split,
            num_classes=int(split.labels.max()) + 1,
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            training=False,
            one_hot=False,
            cache=None,
        )
        outputs = _predict_batches(feature_model(model, todo), dataset.map(lambda x, y: x), len(split), progress)
        for name, array in zip(todo, outputs):
            result[name] = array.astype(np.float32)
            if cache is not None:
                cache.save(keys[name], result[name])
        log.info("features of %d images at %d layer(s) in %.1f s", len(split), len(todo), time.time() - started)
    return {name: result[name] for name in layers}


def _predict_batches(model, dataset, images: int, progress: bool) -> list[np.ndarray]:
    """``model``'s outputs (a list, one array per output) over ``dataset``, batch by batch with one compiled graph;
    with ``progress`` a bar of images done, their rate and the time left."""
    from tqdm.auto import tqdm

    chunks = []
    with tqdm(total=images, desc="features", unit="img", disable=not progress, leave=False) as bar:
        for batch in dataset:
            out = model.predict_on_batch(batch)
            chunks.append([np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])])
            bar.update(len(chunks[-1][0]))
    if not chunks:
        return [np.zeros((0, *o.shape[1:]), np.float32) for o in model.outputs]
    return [np.concatenate(parts) for parts in zip(*chunks)]


# --------------------------------------------------------------------------------- linear classifier
@dataclass
class LinearProbe:
    """A multinomial logistic regression on standardized features (weights in the original scale).

    A probe from :func:`fit_linear_cv` also carries its cross-validated accuracy (``cv``), the out-of-fold
    prediction of every image it was fit on (``cv_predictions``, each made by a fold model that did not see
    that image), the cross-validated accuracy of every C tried (``cv_scores``) and how many images and
    folds were used.
    """

    kernel: np.ndarray  # (D, classes), applies to raw features
    bias: np.ndarray  # (classes,)
    C: float
    train_accuracy: float
    val_accuracy: float | None
    seconds: float
    mean: np.ndarray | None = None  # (D,) the standardization the classifier was fit with
    scale: np.ndarray | None = None  # (D,)
    cv: object = None  # ktoolkit.stats.Accuracy of the out-of-fold predictions (fit_linear_cv)
    cv_predictions: np.ndarray | None = None  # (images,) out-of-fold predicted class of each image
    cv_scores: dict = field(default_factory=dict)  # {C: cross-validated accuracy}
    images: int = 0  # images the final classifier was fit on
    folds: int = 0

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        logits = features @ self.kernel + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def accuracy(self, features, labels) -> float:
        return float((self.predict_proba(features).argmax(1) == np.asarray(labels)).mean())


def standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-feature mean and scale the classifiers standardize with, computed from ``x`` only.

    The scale is the standard deviation floored at ``SCALE_FLOOR`` times the median one (see there);
    all ones when no feature varies.
    """
    x = np.asarray(x, np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    varying = scale[scale > 1e-8]
    scale = np.maximum(scale, SCALE_FLOOR * np.median(varying)) if len(varying) else np.ones_like(scale)
    return mean, scale


def _probe_path(x, y, Cs, num_classes: int, max_iter: int):
    """Logistic regressions on ``x`` (standardized with ``x``'s own statistics), one per C in increasing
    order, each warm-started from the previous solution (far fewer iterations in all): yields LinearProbes."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean, scale = standardization(x)
    z = ((x - mean) / scale).astype(np.float32)  # float32: the solver reads half the bytes
    clf = LogisticRegression(max_iter=max_iter, tol=1e-3, warm_start=True)
    for C in sorted(Cs):
        clf.set_params(C=C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(z, y)
        kernel = np.zeros((z.shape[1], num_classes))
        bias = np.full(num_classes, -1e4)  # classes absent from training are never predicted
        binary = len(clf.classes_) == 2
        coef = np.vstack([-clf.coef_[0] / 2, clf.coef_[0] / 2]) if binary else clf.coef_
        intercept = np.array([-clf.intercept_[0] / 2, clf.intercept_[0] / 2]) if binary else clf.intercept_
        kernel[:, clf.classes_] = (coef / scale).T
        bias[clf.classes_] = intercept - (coef * (mean / scale)).sum(axis=1)
        probe = LinearProbe(
            kernel.astype(np.float32),
            bias.astype(np.float32),
            C,
            0.0,
            None,
            0.0,
            *(a.astype(np.float32) for a in (mean, scale)),
        )
        probe.train_accuracy = probe.accuracy(x, y)
        probe.images = len(y)
        yield probe


@one_blas_thread
def fit_linear(
    train_x, train_y, val_x=None, val_y=None, *, num_classes: int | None = None, Cs=C_GRID, max_iter: int = 300
) -> LinearProbe:
    """Fits logistic regression on features, picking the inverse regularization C on the validation split.

    Without validation data, C=1 (features are standardized, so that is a sensible scale). For small data,
    :func:`fit_linear_cv` uses every labelled image instead.
    """
    started = time.time()
    train_x, train_y = np.asarray(train_x, np.float64), np.asarray(train_y)
    num_classes = num_classes or int(train_y.max()) + 1
    has_val = val_x is not None and len(val_x) > 0
    best = None
    for probe in _probe_path(train_x, train_y, sorted(Cs) if has_val else (1.0,), num_classes, max_iter):
        if has_val:
            probe.val_accuracy = probe.accuracy(np.asarray(val_x, np.float64), val_y)
        if best is None or (probe.val_accuracy or 0) > (best.val_accuracy or 0):
            best = probe
    best.seconds = time.time() - started
    return best


@one_blas_thread
def fit_linear_cv(
    x, y, *, num_classes: int | None = None, Cs=CV_C_GRID, folds: int = 5, seed: int = 0, max_iter: int = 300
) -> LinearProbe:
    """Logistic regression on all of ``x``, with C chosen by stratified k-fold cross-validation.

    Why: on small data a validation split of 10% (24 images of 245) both wastes a tenth of the images and
    picks C on a handful of them. Here every image is predicted once by a model fit on the other folds
    (standardized with that fold's fit part only: no leakage), the C with the most right out-of-fold
    predictions wins (of equals, the smallest: the strongest regularization), and the final classifier is
    refit on every image with it (the same warm-started path up to that C). ``folds`` is at most 5, fewer
    when a class has fewer images (``ktoolkit.stats.stratified_folds``, which refuses classes of one image).

    The folds walk the C grid together, from the strongest regularization up (each fit warm-started from
    the last), and stop once :data:`C_PATIENCE` larger Cs in a row have not beaten the best: the weakly
    regularized end is where the solver needs most iterations, and past the best it only overfits.

    Returns:
        A LinearProbe with ``cv`` (an Accuracy, "k-fold cross-validated", per-fold accuracies),
        ``cv_predictions``, ``cv_scores`` (every C tried), ``C``, ``images`` and ``folds``; ``val_accuracy``
        is None.
    """
    from ktoolkit.stats import Accuracy, stratified_folds

    started = time.time()
    x, y = np.asarray(x, np.float64), np.asarray(y).astype(np.int64)
    num_classes = num_classes or int(y.max()) + 1
    Cs = sorted(Cs)
    splits = stratified_folds(y, folds, seed)
    predicted = _cv_path(x, y, splits, Cs, num_classes, max_iter)  # (Cs tried, images)
    correct = (predicted == y).sum(axis=1)
    best = int(np.argmax(correct))  # the first of equals: the smallest C
    per_fold = [float((predicted[best, held] == y[held]).mean()) for _, held in splits]
    *_, probe = _probe_path(x, y, Cs[: best + 1], num_classes, max_iter)
    probe.cv = Accuracy.of(predicted[best], y, how=f"{len(splits)}-fold cross-validated", folds=per_fold)
    probe.cv_predictions = predicted[best]
    probe.cv_scores = {C: float(c) / len(y) for C, c in zip(Cs, correct)}
    probe.folds = len(splits)
    probe.seconds = time.time() - started
    return probe


def _cv_path(x, y, splits, Cs, num_classes: int, max_iter: int) -> np.ndarray:
    """Out-of-fold predictions of every image at each C of ``Cs`` (increasing), the folds advancing together;
    stops after :data:`C_PATIENCE` Cs in a row without a new best. Returns (Cs tried, images)."""
    paths = [(_probe_path(x[fit], y[fit], Cs, num_classes, max_iter), held) for fit, held in splits]
    rows, best = [], -1
    for i in range(len(Cs)):
        row = np.zeros(len(y), np.int64)
        for path, held in paths:
            row[held] = next(path).predict_proba(x[held]).argmax(axis=1)
        rows.append(row)
        correct = int((row == y).sum())
        if best < 0 or correct > best:
            best, best_at = correct, i
        elif i - best_at >= C_PATIENCE:
            break
    for path, _ in paths:
        path.close()
    return np.stack(rows)


def linear_classifier_model(model, layer: str, probe: LinearProbe, name: str | None = None):
    """``model`` cut at ``layer``, global average pooling, and the probe as a softmax Dense layer
    named "predictions": a plain Keras classifier that `ktool evaluate/predict/export` take as is.

    An image-shaped layer is pooled first (kept 1x1) and then standardized per channel by a 1x1 depthwise
    convolution ("feature_standardization"): one weight per channel, which int8 quantizes without error,
    and the pooled values quantized on the standardized scale. Pooling first matters in int8: standardizing
    the whole map before the pooling (as ktoolkit did before) requantized every element per tensor at 0.53
    standardized units per step (a flowers5 block_13 map spans -52..+83); pooled first, the int8 file flips
    the top-1 of 119 of 4,107 flowers5 images against 156 (paired difference +0.9 points, CI +0.4 to +1.4,
    McNemar p=0.0002). A standardization layer of SUB and MUL after the pooling was worse (211 flips).
    """
    import tf_keras

    x = model.get_layer(layer).output
    kernel, bias = probe.kernel, probe.bias
    standardized = len(x.shape) == 4 and probe.mean is not None
    if len(x.shape) == 4:
        x = tf_keras.layers.GlobalAveragePooling2D(name="avg_pool_features", keepdims=standardized)(x)
    if standardized:
        standardize = tf_keras.layers.DepthwiseConv2D(1, name="feature_standardization")
        x = tf_keras.layers.Flatten(name="standardized_features")(standardize(x))
        standardize.set_weights([(1.0 / probe.scale).reshape(1, 1, -1, 1), -probe.mean / probe.scale])
        kernel, bias = kernel * probe.scale[:, None], bias + probe.mean @ kernel
    dense = tf_keras.layers.Dense(kernel.shape[1], activation="softmax", name="predictions")
    outputs = dense(x)
    dense.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return tf_keras.Model(model.inputs, outputs, name=name or f"{model.name}_linear")
