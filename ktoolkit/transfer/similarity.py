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
2. **Linear probes by depth**: a quick held-out logistic regression on the features of each cut point.
   When the top features are the best (ratio top / best = 1), the network's most specific features fit
   the data; when an earlier layer beats the top, the top has specialized in another domain. This works
   for any network (VGG has no batch normalization) and also chooses the cut for `linear-early`.

The decision (recipes.transfer.decide) uses the batch-norm similarity when the base has BN layers,
else the probe ratio. Validated with MobileNetV2's ImageNet weights: see benchmarks/README.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class BatchNormDistance:
    """Per-layer KL divergence of the data's activation statistics from the BN layers' stored ones."""

    similarity: float  # exp(-first_kl)
    first_kl: float  # at the first BN layer
    mean_kl: float  # over all BN layers
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
    model, images: np.ndarray, batch_size: int = 32, *, cache=None, key: str | None = None
) -> BatchNormDistance | None:
    """Compares the statistics of ``images`` (N, H, W, C, 0..255) inside ``model`` with its BN layers'.

    Returns None when the model has no batch normalization. With a ``cache`` (features.FeatureCache) and
    a ``key`` naming the model and the images, the measured statistics are kept and reused.
    """
    import tf_keras

    started = time.time()
    bns = [bn for bn in _bn_layers(model) if len(bn.input.shape) == 4]
    if not bns:
        return None
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
    first_kl, mean_kl = layers[0][1], float(np.mean([k for _, k in layers]))
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
    layer: str
    dims: int
    train_accuracy: float
    val_accuracy: float
    seconds: float


def probe_depths(features: dict, train_labels, val_features: dict, val_labels, num_classes: int) -> list[ProbeResult]:
    """One held-out linear probe per layer (``features``: {layer: (N, D)}, input to output)."""
    from ktoolkit.transfer.features import fit_linear

    results = []
    for layer, x in features.items():
        probe = fit_linear(x, train_labels, val_features[layer], val_labels, num_classes=num_classes, Cs=(0.3,))
        results.append(ProbeResult(layer, int(x.shape[1]), probe.train_accuracy, probe.val_accuracy, probe.seconds))
    return results


def probe_ratio(results: list[ProbeResult]) -> float:
    """Top-layer probe accuracy over the best probe accuracy at any depth (1.0: the top is best)."""
    best = max(r.val_accuracy for r in results)
    return float(results[-1].val_accuracy / best) if best > 0 else 0.0
