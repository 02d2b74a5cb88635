"""Label budgets: how many labels does a representation need? The two standard readouts of a frozen
encoder, a linear classifier and k-nearest neighbours, trained on ``n`` labelled images per class
(10, 100, all), for the pretrained encoder and for the same architecture at random initialization,
all tested on the same test images; and the learning curve of it (accuracy against labels per class).

Where pretraining pays shows at the small budgets: ten labels per class are too few to learn a good
classifier on random features, while a representation that already groups the classes needs few.
The subsets are nested (the 10 of a class are among its 100) and drawn with the run's seed, so every
readout of a budget trains on the same images. C (linear) and k and the metric (kNN) are chosen by
stratified cross-validation inside each subset: no image outside the budget is looked at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ktoolkit.stats import Accuracy, paired_difference

log = logging.getLogger(__name__)

BUDGETS = (10, 100, None)  # labels per class; None: every training image
BUDGET_FLAG = "--labels-per-class"
LEARNING_CURVE = "learning_curve.png"
ENCODERS = ("pretrained", "random")
CLASSIFIERS = ("linear", "knn")


@dataclass
class Readout:
    """One classifier on one encoder's frozen features, trained on a budget of labels."""

    encoder: str  # "pretrained" or "random" (the same architecture at random initialization)
    classifier: str  # "linear" (logistic regression) or "knn"
    labels_per_class: int | None  # None: every training image
    train_images: int
    accuracy: Accuracy  # on the test images
    setting: str  # what cross-validation chose: "C=0.1" or "cosine k=5"
    classes: int = 0
    hits: np.ndarray | None = field(default=None, repr=False)  # per test image: right or not (paired comparisons)

    @property
    def per_class(self) -> float:
        """Labels per class: the budget, or (all) the training images over the classes."""
        return self.labels_per_class or self.train_images / max(1, self.classes)

    def to_dict(self) -> dict:
        return {
            "encoder": self.encoder,
            "classifier": self.classifier,
            "labels_per_class": self.labels_per_class,
            "train_images": self.train_images,
            "setting": self.setting,
            **self.accuracy.to_dict(),
        }


def parse_budgets(text) -> tuple:
    """``"10,100,all"`` -> ``(10, 100, None)``; a ValueError naming the flag for anything else."""
    if isinstance(text, (tuple, list)):
        items = [str(v) if v is not None else "all" for v in text]
    else:
        items = [s.strip() for s in str(text).split(",") if s.strip()]
    budgets = []
    for item in items:
        if item.lower() == "all":
            budgets.append(None)
            continue
        if not item.isdigit() or int(item) < 2:
            raise ValueError(
                f"{BUDGET_FLAG}: {item!r} is not a number of labels per class >= 2 (cross-validation needs two "
                "per class) or 'all'; write e.g. 10,100,all."
            )
        budgets.append(int(item))
    if not budgets:
        raise ValueError(f"{BUDGET_FLAG}: give at least one budget, e.g. 10,100,all.")
    numbers = sorted({b for b in budgets if b is not None})
    return (*numbers, *([None] if None in budgets else []))


def budget_subset(labels, per_class: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``per_class`` images of each class (all of them for None). Nested: a class's
    first ``n`` of one random order, so a smaller budget's images are among a larger one's."""
    labels = np.asarray(labels).astype(np.int64)
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def effective_budgets(labels, budgets) -> list:
    """The budgets that differ: a budget at or above the largest class's count is 'all' (None)."""
    largest = int(np.bincount(np.asarray(labels).astype(np.int64)).max())
    kept = [None if b is None or b >= largest else b for b in budgets]
    return list(dict.fromkeys(kept))


def label_budget_readouts(features: dict, labels: dict, test: str, budgets, *, num_classes: int, seed: int = 0):
    """Linear and kNN readouts of every encoder's features at every budget, on the ``test`` split.

    Args:
        features: ``{encoder: {split: (N, D) array}}`` ("pretrained", and "random" when measured).
        labels: ``{split: (N,) labels}``.
        test: the split measured on.
        budgets: labels per class (None: all), as :func:`parse_budgets` gives them.
    """
    from ktoolkit.stats import stratified_folds
    from ktoolkit.transfer.features import fit_linear_cv
    from ktoolkit.transfer.knn import fit_knn

    train_labels = np.asarray(labels["train"]).astype(np.int64)
    out = []
    for budget in effective_budgets(train_labels, budgets):
        index = budget_subset(train_labels, budget, seed)
        y = train_labels[index]
        folds = min(5, int(np.bincount(y)[np.bincount(y) > 0].min()))
        if folds < 2:
            log.warning("%s %s: a class has one image; budget skipped", BUDGET_FLAG, budget)
            continue
        stratified_folds(y, folds, seed)  # a ValueError for a class of one image, before any fit
        for encoder, split_features in features.items():
            x, x_test = split_features["train"][index], split_features[test]
            linear = fit_linear_cv(x, y, num_classes=num_classes, folds=folds, seed=seed)
            knn = fit_knn(x, y, num_classes=num_classes, folds=folds, seed=seed, max_references=None)
            for name, model, setting in (
                ("linear", linear, f"C={linear.C:g}"),
                ("knn", knn, f"{knn.metric} k={knn.k}"),
            ):
                predicted = model.predict_proba(x_test).argmax(1)
                accuracy = Accuracy.of(predicted, labels[test], how=test)
                hits = predicted == np.asarray(labels[test])
                out.append(Readout(encoder, name, budget, len(y), accuracy, setting, num_classes, hits))
                log.info("%s, %s, %s per class: %s", encoder, name, budget or "all", accuracy.text())
    return out


def budget_table(readouts: list[Readout]) -> list[str]:
    """Markdown rows: one per budget, a column per encoder and classifier."""
    present = [
        (e, c) for e in ENCODERS for c in CLASSIFIERS if any(r.encoder == e and r.classifier == c for r in readouts)
    ]
    header = " | ".join(f"{'pretrained' if e == 'pretrained' else 'random init'}, {c}" for e, c in present)
    rows = [f"| labels per class | training images | {header} |", "|---" * (2 + len(present)) + "|"]
    for budget in dict.fromkeys(r.labels_per_class for r in readouts):
        cells = {(r.encoder, r.classifier): r for r in readouts if r.labels_per_class == budget}
        images = next(iter(cells.values())).train_images
        row = " | ".join(cells[key].accuracy.text() if key in cells else "" for key in present)
        rows.append(f"| {budget if budget is not None else 'all'} | {images:,} | {row} |")
    return rows


def gains(readouts: list[Readout]) -> list[str]:
    """One line per budget and classifier: pretrained minus random init on the same test images, in points with
    the paired 95% interval (Newcombe) and McNemar's p."""
    lines = []
    for budget in dict.fromkeys(r.labels_per_class for r in readouts):
        for classifier in CLASSIFIERS:
            pair = {r.encoder: r for r in readouts if r.labels_per_class == budget and r.classifier == classifier}
            if len(pair) == 2:
                difference = paired_difference(pair["pretrained"].hits, pair["random"].hits).text()
                lines.append(f"{budget if budget is not None else 'all'} labels per class, {classifier}: {difference}")
    return lines


def plot_learning_curve(readouts: list[Readout], path, title: str = "") -> None:
    """Test accuracy (%, 95% intervals) against labels per class (log scale), a line per encoder and
    classifier: pretrained solid, random initialization dashed."""
    from ktoolkit.io import save_figure
    from ktoolkit.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"linear": "tab:blue", "knn": "tab:orange"}
    for encoder in ENCODERS:
        for classifier in CLASSIFIERS:
            rows = [r for r in readouts if r.encoder == encoder and r.classifier == classifier]
            if not rows:
                continue
            x = [r.per_class for r in rows]
            y = [100 * r.accuracy.value for r in rows]
            low = [100 * (r.accuracy.value - r.accuracy.interval[0]) for r in rows]
            high = [100 * (r.accuracy.interval[1] - r.accuracy.value) for r in rows]
            label = f"{'pretrained' if encoder == 'pretrained' else 'random init'}, {classifier}"
            ax.errorbar(
                x,
                y,
                yerr=[low, high],
                marker="o",
                capsize=3,
                color=colours[classifier],
                linestyle="-" if encoder == "pretrained" else "--",
                label=label,
            )
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images per class (log scale)")
    ax.set_ylabel("test accuracy (%), 95% interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Where pretraining pays: accuracy against labels", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
