"""Accuracies with their uncertainty: every accuracy ktoolkit prints or writes is an :class:`Accuracy`
(correct of images, with a 95% Wilson interval), and comparisons of two classifiers on the same images are
paired (:func:`paired_difference`, McNemar's exact test).

Why Wilson: on the 24-300 images of a typical validation split the normal ("Wald") interval is too
narrow and breaks at 0% and 100%; Wilson's score interval keeps its 95% coverage there (Brown, Cai &
DasGupta 2001, "Interval estimation for a binomial proportion"). A cross-validated accuracy is the
proportion of out-of-fold predictions that are right (each image predicted once, by a model that did not
see it), with the same interval, and the folds' spread reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for ``correct`` successes in ``n`` trials (95% by default); (0, 1) for n=0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must be between 0 and n={n}.")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (0.0 if correct == 0 else max(0.0, centre - half)), (1.0 if correct == n else min(1.0, centre + half))


def stratified_folds(labels, max_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold splits of ``labels`` as (fit indices, held-out indices), k = ``max_folds`` or the
    smallest class's count if that is fewer (at least 2). Every index is held out exactly once."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    counts = np.bincount(labels.astype(np.int64)) if labels.size else np.zeros(0, np.int64)
    smallest = int(counts[counts > 0].min()) if counts.any() else 0
    if smallest < 2:
        raise ValueError(f"cross-validation needs at least 2 images of every class; the smallest has {smallest}.")
    k = max(2, min(max_folds, smallest))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(fit, held) for fit, held in splitter.split(np.zeros(len(labels)), labels)]


@dataclass(frozen=True)
class Accuracy:
    """``correct`` of ``images`` right, with its 95% Wilson interval. ``how`` says where the number comes
    from ("held-out", "5-fold cross-validated", ...); ``folds`` are the per-fold accuracies of a CV estimate."""

    correct: int
    images: int
    how: str = "held-out"
    folds: tuple = field(default=())

    @classmethod
    def of(cls, predicted, labels, how: str = "held-out", folds=()) -> Accuracy:
        """From predicted and true class indices (or probabilities, argmaxed) of the same images."""
        predicted, labels = np.asarray(predicted), np.asarray(labels)
        if predicted.ndim == 2:
            predicted = predicted.argmax(axis=1)
        if predicted.shape != labels.shape:
            raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels.")
        return cls(int((predicted == labels).sum()), int(len(labels)), how, tuple(float(f) for f in folds))

    @classmethod
    def from_metrics(cls, metrics: dict) -> Accuracy:
        """The accuracy of a metrics.json (``correct`` of ``images``; files of older ktoolkit versions have only
        the fraction, so the count is recovered from it)."""
        images = int(metrics.get("images") or 0)
        correct = metrics.get("correct")
        if correct is None:
            correct = round(float(metrics.get("accuracy") or 0.0) * images)
        return cls(int(correct), images, how=str(metrics.get("split") or "held-out"))

    @property
    def value(self) -> float:
        return self.correct / self.images if self.images else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.images)

    @property
    def half_width(self) -> float:
        low, high = self.interval
        return (high - low) / 2

    def text(self) -> str:
        """``93.5% (95% CI 89.6-96.0%, 245 images)``; with folds, their range too."""
        if not self.images:
            return "n/a (0 images)"
        low, high = self.interval
        spread = f", folds {min(self.folds):.1%}-{max(self.folds):.1%}" if len(self.folds) > 1 else ""
        return f"{self.value:.1%} (95% CI {100 * low:.1f}-{100 * high:.1f}%, {self.images:,} images{spread})"

    def __str__(self) -> str:
        return self.text()

    def to_dict(self) -> dict:
        low, high = self.interval
        out = {
            "accuracy": self.value if self.images else None,
            "correct": self.correct,
            "images": self.images,
            "ci95": [round(low, 6), round(high, 6)],
            "interval": "wilson",
            "how": self.how,
        }
        if self.folds:
            out["folds"] = list(self.folds)
        return out


@dataclass(frozen=True)
class PairedDifference:
    """Classifier A minus classifier B on the same images: the accuracy difference, its 95% interval, and
    McNemar's exact two-sided p-value (from the images only one of the two gets right)."""

    difference: float
    low: float
    high: float
    only_a: int  # images A gets right and B wrong
    only_b: int
    images: int
    p_value: float

    @property
    def significant(self) -> bool:
        """A beats B, or B beats A, beyond the 95% interval (the interval excludes 0)."""
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        return (
            f"{100 * self.difference:+.1f} points (95% CI {100 * self.low:+.1f} to {100 * self.high:+.1f}, "
            f"{self.only_a} vs {self.only_b} discordant of {self.images:,} images, McNemar p={self.p_value:.2g})"
        )


def paired_difference(a_correct, b_correct, z: float = Z95) -> PairedDifference:
    """The accuracy of A minus B, from per-image correctness (two boolean arrays of the same images).

    The interval is Newcombe's (1998, method 10) for paired proportions, from the two Wilson intervals and
    the correlation of the pairs; it stays inside [-1, 1] and is sensible on few discordant images.
    """
    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} and {b.size} images: a paired comparison needs the same images.")
    n = int(a.size)
    both, only_a, only_b = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    neither = n - both - only_a - only_b
    if n == 0:
        return PairedDifference(0.0, -1.0, 1.0, 0, 0, 0, 1.0)
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson(both + only_a, n, z)
    lb, ub = wilson(both + only_b, n, z)
    # the phi correlation of the 2x2 table (0 when a margin is empty)
    margins = (both + only_a) * (neither + only_b) * (both + only_b) * (neither + only_a)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins > 0 else 0.0
    d = pa - pb
    low = d - math.sqrt(max(0.0, (pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2))
    high = d + math.sqrt(max(0.0, (ua - pa) ** 2 - 2 * phi * (ua - pa) * (pb - lb) + (pb - lb) ** 2))
    return PairedDifference(d, max(-1.0, low), min(1.0, high), only_a, only_b, n, mcnemar_exact(only_a, only_b))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value: under "A and B are equally accurate" each discordant image is a fair
    coin, so the smaller count is Binomial(only_a + only_b, 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    if n <= 1000:  # exact in integers; 2.0**n overflows a float from n = 1024 on
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    else:  # the regularized incomplete beta function: exact to float precision at any n
        from scipy.stats import binom

        tail = float(binom.cdf(k, n, 0.5))
    return min(1.0, 2 * tail)
