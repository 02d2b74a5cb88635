"""How close is a dataset to what a pretrained network was trained on? Two measurements.

1. **Batch-norm statistics** (networks with batch normalization): every BN layer keeps the mean and
   variance of its inputs over the pretraining data (``moving_mean``, ``moving_variance``). We feed a
   sample of the new data through the frozen network and measure, layer by layer, how far the new
   inputs' per-channel mean and variance are from the stored ones: the KL divergence between the two
   Gaussians, median over channels. The similarity is ``exp(-KL)`` at the **first** BN layer, which sees
   the statistics of the network's first filters (colour, contrast, edges): 1 for data that looks like
   the pretraining data to the network, lower for data far from it. Deeper layers' distances are
   reported too (``mean_kl``) but not used: with MobileNetV2/ImageNet they depend on the input
   resolution and did not separate Fashion-MNIST from flower photos, while the first layer's did at
   every size we tried (96-224: flowers5 KL 0.02-0.05, digits 0.25, Fashion-MNIST 0.33-0.36).
2. **Linear probes by depth**: a logistic regression on the features of each cut point, scored by
   stratified k-fold cross-validation on a sample of train+val images (every sampled image scored once,
   with a 95% interval). When the top features are the best (ratio top / best = 1), the network's most
   specific features fit the data; when an earlier layer beats the top, the top has specialized in
   another domain. This works for any network (VGG has no batch normalization) and also chooses the
   cut for `linear-early`.

The decision (recipes.transfer.decide): when the best earlier cut beats the top beyond the 95% interval
of their paired difference (same images: Newcombe's interval), the data is "different" for this base;
otherwise the batch-norm similarity decides when the base has BN layers, else the probe ratio.
Validated with MobileNetV2's ImageNet weights: see benchmarks/README.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ktoolkit.stats import Accuracy, PairedDifference, paired_difference, stratified_folds

log = logging.getLogger(__name__)


@dataclass
class BatchNormDistance:
    """Per-layer KL divergence of the data's activation statistics from the BN layers' stored ones."""

    similarity: float  # exp(-first_kl)
    first_kl: float  # at the first BN layer
    mean_kl: float | None  # over all BN layers (None: only the first was measured, the default)
    layers: list = field(default_factory=list)  # (layer name, median KL over channels), input to output
    images: int = 0
    seconds: float = 0.0


def _bn_layers(model):
    return [
        layer
        for layer in model.layers
        if type(layer).__name__ in ("BatchNormalization", "SyncBatchNormalization") and layer.moving_mean is not None
    ]


def batchnorm_distance(
    model, images: np.ndarray, batch_size: int = 32, *, cache=None, key: str | None = None, every_layer: bool = False
) -> BatchNormDistance | None:
    """Compares the statistics of ``images`` (N, H, W, C, 0..255) inside ``model`` with its BN layers'.

    Only the first BN layer decides (see the module docstring), so by default only it is measured: the
    network up to it is a convolution or two, where the statistics of every layer (``every_layer``, which
    also gives ``mean_kl``) cost a forward pass of the whole network with 104 extra outputs (6.6 of the
    33 s of a cold linear run on digits at 96x96).

    Returns None when the model has no batch normalization. With a ``cache`` (features.FeatureCache) and
    a ``key`` naming the model and the images, the measured statistics are kept and reused.
    """
    import tf_keras

    started = time.time()
    bns = [bn for bn in _bn_layers(model) if len(bn.input.shape) == 4]
    if not bns:
        return None
    bns = bns if every_layer else bns[:1]
    key = f"{key}-all" if key and every_layer else key
    sizes = [int(bn.input.shape[-1]) for bn in bns]
    stats = cache.load(f"bnstats-{key}") if cache is not None and key else None
    if stats is None or len(stats) != 2 * sum(sizes):
        pool = tf_keras.layers.GlobalAveragePooling2D
        outputs = []
        for i, bn in enumerate(bns):
            x = bn.input
            outputs.append(pool(name=f"bn_stat_mean_{i}")(x))
            outputs.append(pool(name=f"bn_stat_square_{i}")(tf_keras.layers.Multiply(name=f"bn_stat_sq_{i}")([x, x])))
        probe = tf_keras.Model(model.inputs, outputs)
        sums = None
        for start in range(0, len(images), batch_size):  # predict_on_batch: one compiled graph, not layer by layer
            batch = probe.predict_on_batch(np.asarray(images[start : start + batch_size], np.float32))
            batch = [np.asarray(b, np.float64).sum(axis=0) for b in batch]
            sums = batch if sums is None else [s + b for s, b in zip(sums, batch)]
        stats = np.concatenate(sums) / len(images)
        if cache is not None and key:
            cache.save(f"bnstats-{key}", stats)
    layers, offset = [], 0
    for bn, size in zip(bns, sizes):
        mean, square = stats[offset : offset + size], stats[offset + size : offset + 2 * size]
        offset += 2 * size
        var = np.maximum(square - mean**2, 1e-6)
        mu, sigma2 = np.asarray(bn.moving_mean, np.float64), np.asarray(bn.moving_variance, np.float64) + bn.epsilon
        kl = 0.5 * (var / sigma2 + (mean - mu) ** 2 / sigma2 - 1.0 - np.log(var / sigma2))
        layers.append((bn.name, float(np.median(kl))))
    first_kl = layers[0][1]
    mean_kl = float(np.mean([k for _, k in layers])) if every_layer else None
    return BatchNormDistance(
        similarity=float(np.exp(-first_kl)),
        first_kl=first_kl,
        mean_kl=mean_kl,
        layers=layers,
        images=len(images),
        seconds=time.time() - started,
    )


@dataclass
class ProbeResult:
    """A linear probe at one cut point, scored by cross-validation on the probe sample.

    Attributes:
        layer: the cut point.
        dims: its number of (pooled) features.
        train_accuracy: mean over folds of the accuracy on the fold's own fit images.
        accuracy: out-of-fold accuracy (each sampled image predicted once, by a probe that did not see it),
            with its 95% interval and the per-fold accuracies.
        correct: per image of the sample (the same images, in the same order, for every depth), whether its
            out-of-fold prediction was right: what paired comparisons between depths use.
        seconds: fitting time over all folds.
    """

    layer: str
    dims: int
    train_accuracy: float
    accuracy: Accuracy
    correct: np.ndarray = field(repr=False)
    seconds: float = 0.0

    @property
    def val_accuracy(self) -> float:
        """The held-out (out-of-fold) accuracy as a float, for callers that want one number."""
        return self.accuracy.value

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "dims": self.dims,
            "train_accuracy": self.train_accuracy,
            "val_accuracy": self.val_accuracy,
            "accuracy": self.accuracy.to_dict(),
            "seconds": round(self.seconds, 3),
        }


def probe_depths(features: dict, labels, num_classes: int, *, folds: int = 5, seed: int = 0) -> list[ProbeResult]:
    """One linear probe per layer (``features``: {layer: (N, D)}, input to output), scored by stratified k-fold
    cross-validation over all N images: every image is scored once, by a probe fit on the other folds (the
    standardization too), so the comparison between depths rests on N images, not on a small validation split.
    The folds are the same for every layer, so per-image results pair up across depths."""
    from ktoolkit.transfer.features import fit_linear

    labels = np.asarray(labels)
    splits = stratified_folds(labels, folds, seed)
    how = f"{len(splits)}-fold cross-validated"
    results = []
    for layer, x in features.items():
        predicted, fit_accuracy, fold_accuracy, seconds = np.zeros(len(labels), np.int64), [], [], 0.0
        for fit, held in splits:
            probe = fit_linear(x[fit], labels[fit], x[held], labels[held], num_classes=num_classes, Cs=(0.3,))
            predicted[held] = probe.predict_proba(x[held]).argmax(1)
            fit_accuracy.append(probe.train_accuracy)
            fold_accuracy.append(float((predicted[held] == labels[held]).mean()))
            seconds += probe.seconds
        accuracy = Accuracy.of(predicted, labels, how=how, folds=fold_accuracy)
        results.append(
            ProbeResult(layer, int(x.shape[1]), float(np.mean(fit_accuracy)), accuracy, predicted == labels, seconds)
        )
    return results


def probe_ratio(results: list[ProbeResult]) -> float:
    """Top-layer probe accuracy over the best probe accuracy at any depth (1.0: the top is best)."""
    best = max(r.val_accuracy for r in results)
    return float(results[-1].val_accuracy / best) if best > 0 else 0.0


def within_uncertainty(best: ProbeResult, other: ProbeResult) -> bool:
    """Whether ``best`` does not beat ``other`` beyond the 95% interval of their paired difference."""
    return not paired_difference(best.correct, other.correct).low > 0


def chosen_cut(results: list[ProbeResult]) -> ProbeResult:
    """The cut for linear-early: of the probes within the best one's uncertainty, the deepest. Deeper
    features are the more robust ones (to int8 quantization too), so an earlier cut must win beyond
    the noise of the probes, not by an image or two."""
    best = max(reversed(results), key=lambda r: r.val_accuracy)
    return next(r for r in reversed(results) if r is best or within_uncertainty(best, r))


@dataclass(frozen=True)
class TopComparison:
    """The best probe before the top layer against the top layer's, on the same images."""

    earlier: ProbeResult
    top: ProbeResult
    difference: PairedDifference  # earlier minus top

    @property
    def earlier_cut_better(self) -> bool:
        """The earlier cut beats the top beyond the 95% interval (the interval is above 0)."""
        return self.difference.low > 0

    def text(self) -> str:
        return f"{self.earlier.layer} minus top {self.top.layer}: {self.difference.text()}"

    def to_dict(self) -> dict:
        d = self.difference
        return {
            "earlier": self.earlier.layer,
            "top": self.top.layer,
            "difference": d.difference,
            "ci95": [d.low, d.high],
            "only_earlier": d.only_a,
            "only_top": d.only_b,
            "images": d.images,
            "mcnemar_p": d.p_value,
            "earlier_cut_better": self.earlier_cut_better,
        }


def compare_to_top(results: list[ProbeResult]) -> TopComparison | None:
    """The best earlier probe (of equals, the deepest) minus the top one, paired; None with one probe."""
    if len(results) < 2:
        return None
    earlier = max(reversed(results[:-1]), key=lambda r: r.val_accuracy)
    return TopComparison(earlier, results[-1], paired_difference(earlier.correct, results[-1].correct))
