"""`ktool advise`: size the data, measure its similarity to the base's pretraining, pick the strategy.

- Size: the median over classes of the labelled images the user has (train+val: the test split is kept
  for the evaluation), against recipes.transfer.SMALL_IMAGES_PER_CLASS.
- Similarity: the batch-norm statistic where the base has batch normalization, else the probe ratio;
  overruled by the linear probes when an earlier cut beats the top beyond their paired 95% interval.
- Linear probes by depth: stratified k-fold cross-validation on a sample of train+val images, so every
  sampled image is scored once and each probe's accuracy carries its interval.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

PROBE_FOLDS = 5
# Up to this many train+val images of each class are probed. 100 (the value before) was too few to see a
# 4-point difference: on flowers5 (MobileNetV2, 128x128) block_13 beat the top by +2.4 points, 95% CI -1.6 to
# +6.3, on 500 images ("no earlier cut is better"), and by +3.8, CI +1.2 to +6.4, on 1,500 (300 per class);
# the classifier on all 3,876 labelled images then scores 72.9% at block_13 against 71.0% at the top on the
# 431 test photos. The fits cost 3.3 s either way (one BLAS thread).
PROBE_IMAGES_PER_CLASS = 300
SIZE_COUNTED = "labelled images per class (train+val, median)"


@dataclass
class Advice:
    """The numbers behind a transfer-learning decision."""

    base: str
    weights: str
    classes: int
    train_images: int
    images_per_class: float  # median over classes of train+val
    similarity: float
    similarity_source: str  # "batchnorm" or "probes": what the similarity number is
    decision: object  # recipes.transfer.Decision (decision.evidence: what decided similar/different)
    batchnorm: object = None  # similarity.BatchNormDistance or None
    probes: list = field(default_factory=list)  # similarity.ProbeResult per cut point, input to output
    best_cut: str = ""  # the cut for linear-early (similarity.chosen_cut)
    seconds: float = 0.0
    val_images: int = 0
    probe_images: int = 0  # the cross-validated probe sample (train+val)
    comparison: object = None  # similarity.TopComparison: best earlier cut minus the top, paired
    knn: object = None  # ktoolkit.stats.Accuracy of a kNN classifier on the top features (CV), or None
    image_size: tuple = ()
    image_size_reason: str = ""

    def lines(self) -> list[str]:
        """What `ktool advise` prints and the report shows."""
        out = [f"base {self.base} (weights {self.weights})"]
        if self.image_size:
            out.append(f"input size {self.image_size[0]}x{self.image_size[1]}: {self.image_size_reason or 'given'}")
        out.append(
            f"data: {self.classes} classes, {self.train_images:,} training + {self.val_images:,} validation images, "
            f"{self.images_per_class:,.0f} per class (median) of train+val"
        )
        if self.batchnorm is not None:
            bn = self.batchnorm
            out.append(
                f"batch-norm similarity {bn.similarity:.3f} = exp(-KL {bn.first_kl:.3f} at {bn.layers[0][0]}) "
                f"on {bn.images} images"
                + ("" if bn.mean_kl is None else f" (mean KL over all {len(bn.layers)} BN layers: {bn.mean_kl:.3f})")
            )
        if self.probes:
            how = self.probes[0].accuracy.how
            out.append(f"linear probes by depth ({how} on {self.probe_images:,} train+val images, each scored once):")
            out += [f"  {p.layer} ({p.dims} features): {p.accuracy.text()}" for p in self.probes]
            if self.comparison is not None:
                verdict = "beats the top" if self.comparison.earlier_cut_better else "does not beat the top"
                out.append(f"best earlier cut vs top: {self.comparison.text()}: {verdict} beyond the 95% interval")
            best = max(self.probes, key=lambda p: p.val_accuracy)
            out.append(
                f"probe ratio top/best {self.probes[-1].val_accuracy / max(best.val_accuracy, 1e-9):.3f} "
                f"(best: {best.layer}; cut for linear-early: {self.best_cut})"
            )
        if self.knn is not None:
            out.append(f"kNN on top features: {self.knn.text()}")
        out.append(
            f"similarity number: {self.similarity_source}; similar/different decided by: "
            f"{getattr(self.decision, 'evidence', self.similarity_source)}"
        )
        out += self.decision.reasons()
        return out

    def to_dict(self) -> dict:
        bn = self.batchnorm
        return {
            "base": self.base,
            "weights": self.weights,
            "image_size": list(self.image_size) if self.image_size else None,
            "image_size_reason": self.image_size_reason,
            "classes": self.classes,
            "train_images": self.train_images,
            "val_images": self.val_images,
            "images_per_class": self.images_per_class,
            "images_per_class_counted": SIZE_COUNTED,
            "similarity": self.similarity,
            "similarity_source": self.similarity_source,
            "evidence": getattr(self.decision, "evidence", self.similarity_source),
            "decision": self.decision.to_dict(),
            "batchnorm": None
            if bn is None
            else {
                "similarity": bn.similarity,
                "first_kl": bn.first_kl,
                "mean_kl": bn.mean_kl,
                "images": bn.images,
                "layers": bn.layers,
            },
            "probe_images": self.probe_images,
            "probes": [p.to_dict() for p in self.probes],
            "earlier_vs_top": None if self.comparison is None else self.comparison.to_dict(),
            "knn": None if self.knn is None else self.knn.to_dict(),
            "best_cut": self.best_cut,
            "seconds": round(self.seconds, 1),
        }


def best_probe(probes):
    """The cut for linear-early: of the probes within the best one's 95% uncertainty (paired, same
    images), the deepest: deeper features are the more robust ones (to int8 quantization too), so an
    earlier cut must win beyond the noise of the probes."""
    from ktoolkit.transfer.similarity import chosen_cut

    return chosen_cut(probes)


def labelled_per_class(source) -> float:
    """Median over classes (with images) of the train+val images per class: what the user has for training,
    apart from the test split."""
    counts = np.zeros(source.num_classes, np.int64)
    for name in ("train", "val"):
        split = source.splits.get(name)
        if split is not None and len(split):
            counts += split.class_counts(source.num_classes)
    return float(np.median(counts[counts > 0])) if counts.any() else 0.0


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
    probe_images_per_class: int = PROBE_IMAGES_PER_CLASS,
    seed: int = 0,
    cache=None,
    whole_split_limit: int = 50_000,
    progress: bool = False,
) -> Advice:
    """Measures size and similarity of ``source`` (a DataSource) for ``base`` (a transfer.bases.Base).

    Size: the median over classes of train+val. Similarity: see the module docstring and
    ``ktoolkit/transfer/similarity.py``. Probes run on up to ``probe_images_per_class`` train+val images
    per class, scored by stratified k-fold cross-validation. When the data is small (the linear
    quadrants) and its train and validation splits hold at most ``whole_split_limit`` images, their
    features are computed whole and cached for the classifier.
    """
    from ktoolkit.transfer.features import model_key
    from ktoolkit.transfer.similarity import compare_to_top
    from recipes import transfer

    started = time.time()
    train, val = source.splits["train"], source.splits.get("val")
    val_images = len(val) if val is not None else 0
    per_class = labelled_per_class(source)
    key = model_key(base.model)
    bn = _batchnorm_similarity(base, source, similarity_images, seed, cache, key)
    small = per_class < (transfer.SMALL_IMAGES_PER_CLASS if small_threshold is None else small_threshold)
    whole = small and len(train) + val_images <= whole_split_limit
    probes, labels, top = _probes(base, source, probe_images_per_class, seed, whole, progress, cache=cache, key=key)
    comparison = compare_to_top(probes)
    similarity, kind, decision = _decide(bn, probes, comparison, per_class, small_threshold, similarity_threshold)
    log.info("similar/different decided by %s", decision.evidence)
    return Advice(
        base=base.name,
        weights=base.weights,
        classes=source.num_classes,
        train_images=len(train),
        images_per_class=per_class,
        similarity=similarity,
        similarity_source=kind,
        decision=decision,
        batchnorm=bn,
        probes=probes,
        best_cut=best_probe(probes).layer,
        seconds=time.time() - started,
        val_images=val_images,
        probe_images=len(labels),
        comparison=comparison,
        knn=_knn(top, labels, source.num_classes, seed),
        image_size=tuple(base.image_size),
        image_size_reason=getattr(base, "size_reason", ""),
    )


def _decide(bn, probes, comparison, per_class: float, small_threshold, similarity_threshold):
    """The similarity (batch norm where the base has it, else the probes' ratio), the probes' paired
    comparison of the best earlier cut with the top, and recipes.transfer's decision from both.
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
        earlier_cut_better=None if comparison is None else comparison.earlier_cut_better,
        probe_evidence="" if comparison is None else comparison.text(),
        similarity_source="batch-norm" if kind == "batchnorm" else "probes",
        counted=SIZE_COUNTED,
    )
    return similarity, kind, decision


def _knn(features, labels, num_classes: int, seed: int):
    """The kNN probe on the top features of the probe sample (ktoolkit.transfer.knn.knn_probe: k and metric
    by cross-validation), or None where that module is not there."""
    try:
        from ktoolkit.transfer.knn import knn_probe
    except ImportError:
        return None
    return knn_probe(features, labels, num_classes=num_classes, folds=PROBE_FOLDS, seed=seed)


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


def probe_sample(source, per_class: int, seed: int = 0) -> dict:
    """Up to ``per_class`` images of each class drawn from train+val together: ``{split name: sorted indices}``.
    Classes with fewer than 2 images in the sample are left out (cross-validation cannot score them)."""
    parts = [(name, source.splits[name]) for name in ("train", "val") if name in source.splits]
    labels = np.concatenate([split.labels for _, split in parts])
    picked = sample_indices(labels, per_class, seed)
    counts = np.bincount(labels[picked], minlength=source.num_classes)
    picked = picked[counts[labels[picked]] >= 2]
    if len(np.unique(labels[picked])) < 2:
        raise ValueError(
            f"--data {source.origin}: the linear probes need at least 2 labelled images (train+val) in each of "
            "2 classes or more; add images."
        )
    out, offset = {}, 0
    for name, split in parts:
        out[name] = picked[(picked >= offset) & (picked < offset + len(split))] - offset
        offset += len(split)
    return out


def _probes(base, source, probe_images_per_class: int, seed: int, whole: bool, progress: bool, *, cache, key: str):
    """The linear probes at every cut point of ``base``, cross-validated on a sample of train+val images.

    When ``whole`` (the data is small), the linear strategies will need the features of the whole
    splits anyway: one pass computes (and caches) every cut point, and the probes use their share of it.
    Returns (probes, the sample's labels, the sample's top-layer features)."""
    from ktoolkit.transfer.features import extract_features
    from ktoolkit.transfer.similarity import probe_depths

    picked = probe_sample(source, probe_images_per_class, seed)
    kwargs = dict(image_size=base.image_size, channels=base.channels, cache=cache, key=key, progress=progress)

    def features(split, idx):
        if whole:
            return {k: v[idx] for k, v in extract_features(base.model, base.groups, split, **kwargs).items()}
        return extract_features(base.model, base.groups, split.subset(idx), **kwargs)

    parts = {name: features(source.splits[name], idx) for name, idx in picked.items() if len(idx)}
    x = {layer: np.concatenate([part[layer] for part in parts.values()]) for layer in base.groups}
    labels = np.concatenate([source.splits[name].labels[idx] for name, idx in picked.items() if len(idx)])
    probes = probe_depths(x, labels, source.num_classes, folds=PROBE_FOLDS, seed=seed)
    return probes, labels, x[base.groups[-1]]
