"""`ktool advise`: size the data, measure its similarity to the base's pretraining, pick the strategy."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Advice:
    """The numbers behind a transfer-learning decision."""

    base: str
    weights: str
    classes: int
    train_images: int
    images_per_class: float  # median over classes of the training split
    similarity: float
    similarity_source: str  # "batchnorm" or "probes"
    decision: object  # recipes.transfer.Decision
    batchnorm: object = None  # similarity.BatchNormDistance or None
    probes: list = field(default_factory=list)  # similarity.ProbeResult per cut point, input to output
    best_cut: str = ""
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """What `ktool advise` prints and the report shows."""
        out = [
            f"base {self.base} (weights {self.weights})",
            f"data: {self.classes} classes, {self.train_images:,} training images, "
            f"{self.images_per_class:,.0f} per class (median)",
        ]
        if self.batchnorm is not None:
            bn = self.batchnorm
            out.append(
                f"batch-norm similarity {bn.similarity:.3f} = exp(-KL {bn.first_kl:.3f} at {bn.layers[0][0]}) "
                f"on {bn.images} images (mean KL over all {len(bn.layers)} BN layers: {bn.mean_kl:.3f})"
            )
        if self.probes:
            out.append(
                "linear probes by depth (held-out accuracy): "
                + ", ".join(f"{p.layer} {p.val_accuracy:.1%}" for p in self.probes)
            )
            best = best_probe(self.probes)
            out.append(
                f"probe ratio top/best {self.probes[-1].val_accuracy / max(best.val_accuracy, 1e-9):.3f} "
                f"(best: {best.layer})"
            )
        out.append(f"similarity used: {self.similarity_source}")
        out += self.decision.reasons()
        return out

    def to_dict(self) -> dict:
        return {
            "base": self.base,
            "weights": self.weights,
            "classes": self.classes,
            "train_images": self.train_images,
            "images_per_class": self.images_per_class,
            "similarity": self.similarity,
            "similarity_source": self.similarity_source,
            "decision": self.decision.to_dict(),
            "batchnorm": None
            if self.batchnorm is None
            else {
                "similarity": self.batchnorm.similarity,
                "first_kl": self.batchnorm.first_kl,
                "mean_kl": self.batchnorm.mean_kl,
                "images": self.batchnorm.images,
                "layers": self.batchnorm.layers,
            },
            "probes": [vars(p) for p in self.probes],
            "best_cut": self.best_cut,
            "seconds": round(self.seconds, 1),
        }


def best_probe(probes):
    """The probe with the best held-out accuracy; of equals, the deepest: deeper features are the more
    robust ones (to int8 quantization too), so an earlier cut must win outright."""
    return max(reversed(probes), key=lambda p: p.val_accuracy)


def sample_indices(labels, per_class: int, seed: int = 0) -> np.ndarray:
    """Up to ``per_class`` random indices of each class, sorted."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def load_images(split, image_size, channels) -> np.ndarray:
    """The split's images as one float32 array (N, H, W, C), 0..255."""
    from ktoolkit.data import make_dataset

    dataset = make_dataset(
        split,
        num_classes=int(split.labels.max()) + 1,
        image_size=image_size,
        channels=channels,
        batch_size=64,
        training=False,
        one_hot=False,
        cache=None,
    )
    return np.concatenate([np.asarray(x) for x, _ in dataset]) if len(split) else np.zeros((0, *image_size, channels))


def advise(
    base,
    source,
    *,
    small_threshold: float | None = None,
    similarity_threshold: float | None = None,
    similarity_images: int = 256,
    probe_images_per_class: int = 100,
    seed: int = 0,
    cache=None,
    whole_split_limit: int = 50_000,
    progress: bool = False,
) -> Advice:
    """Measures size and similarity of ``source`` (a DataSource) for ``base`` (a transfer.bases.Base).

    Similarity: the batch-norm similarity when the base has batch normalization, else the linear-probe
    ratio (see ``ktoolkit/transfer/similarity.py``). Probes run on up to ``probe_images_per_class``
    training images per class and are scored on the validation split (or held-out training images).
    When the data is small (the linear quadrants) and its train and validation splits hold at most
    ``whole_split_limit`` images, their features are computed whole and cached for the classifier.
    """
    from ktoolkit.transfer.features import model_key
    from recipes import transfer

    started = time.time()
    train = source.splits["train"]
    counts = train.class_counts(source.num_classes)
    per_class = float(np.median(counts[counts > 0])) if counts.any() else 0.0
    key = model_key(base.model)
    bn = _batchnorm_similarity(base, source, similarity_images, seed, cache, key)
    small = per_class < (transfer.SMALL_IMAGES_PER_CLASS if small_threshold is None else small_threshold)
    whole = small and len(train) + len(source.splits.get("val") or []) <= whole_split_limit
    probes = _probes(base, source, probe_images_per_class, seed, whole, progress, cache=cache, key=key)
    best_cut = best_probe(probes).layer

    similarity, kind, decision = _decide(bn, probes, per_class, small_threshold, similarity_threshold)
    return Advice(
        base.name,
        base.weights,
        source.num_classes,
        len(train),
        per_class,
        similarity,
        kind,
        decision,
        bn,
        probes,
        best_cut,
        time.time() - started,
    )


def _decide(bn, probes, per_class: float, small_threshold, similarity_threshold):
    """The similarity (batch norm where the base has it, else the probes' ratio) and recipes.transfer's decision.
    Returns (similarity, its kind, the decision)."""
    from ktoolkit.transfer.similarity import probe_ratio
    from recipes import transfer

    if bn is not None:
        similarity, kind, threshold = bn.similarity, "batchnorm", transfer.SIMILARITY_THRESHOLD
    else:
        similarity, kind, threshold = probe_ratio(probes), "probes", transfer.PROBE_RATIO_THRESHOLD
    if similarity_threshold is not None:
        threshold = similarity_threshold
    decision = transfer.decide(
        per_class,
        similarity,
        similarity_threshold=threshold,
        small_threshold=transfer.SMALL_IMAGES_PER_CLASS if small_threshold is None else small_threshold,
    )
    return similarity, kind, decision


def _batchnorm_similarity(base, source, similarity_images: int, seed: int, cache, key: str):
    """The batch-norm statistics distance on a stratified sample of training images (None without batch norm)."""
    from ktoolkit.transfer.similarity import batchnorm_distance

    train = source.splits["train"]
    picked = sample_indices(train.labels, max(1, similarity_images // source.num_classes), seed)
    sample = train.subset(picked)
    return batchnorm_distance(
        base.model,
        load_images(sample, base.image_size, base.channels),
        cache=cache,
        key=f"{key}-{sample.fingerprint()}-{tuple(base.image_size)}-{base.channels}",
    )


def _probes(base, source, probe_images_per_class: int, seed: int, whole: bool, progress: bool, *, cache, key: str):
    """The linear probes at every cut point of ``base``.

    Up to ``probe_images_per_class`` training images per class, scored on the validation split (or on a
    fifth of those images held out). When ``whole`` (the data is small), the linear strategies will need
    the features of the whole splits anyway: one pass computes (and caches) every cut point, and the
    probes use their share of it."""
    from ktoolkit.transfer.features import extract_features
    from ktoolkit.transfer.similarity import probe_depths

    train = source.splits["train"]
    train_idx = sample_indices(train.labels, probe_images_per_class, seed)
    val = source.splits.get("val")
    if val is None or len(val) == 0:
        order = np.random.default_rng(seed).permutation(len(train_idx))
        held = max(1, len(order) // 5)
        val, val_idx, train_idx = train, np.sort(train_idx[order[:held]]), np.sort(train_idx[order[held:]])
    else:
        val_idx = sample_indices(val.labels, probe_images_per_class, seed)
    kwargs = dict(image_size=base.image_size, channels=base.channels, cache=cache, key=key, progress=progress)

    def features(split, idx):
        if whole:
            return {k: v[idx] for k, v in extract_features(base.model, base.groups, split, **kwargs).items()}
        return extract_features(base.model, base.groups, split.subset(idx), **kwargs)

    return probe_depths(
        features(train, train_idx),
        train.labels[train_idx],
        features(val, val_idx),
        val.labels[val_idx],
        source.num_classes,
    )
