"""The transfer-learning decision matrix, as a small pure function.

CS231n's four cases for a network pretrained on a big dataset (ImageNet), by the size of your
dataset and how similar it is to the pretraining data:

==================  ==========================================  ============================================
                    similar to the pretraining data              different
==================  ==========================================  ============================================
small dataset       ``linear``: linear classifier on the         ``linear-early``: linear classifier on
                    top-layer CNN codes                          features from an earlier layer
large dataset       ``finetune``: new head, then unfreeze the    ``full``: train the whole network, starting
                    top blocks with a lower learning rate        from the pretrained weights
==================  ==========================================  ============================================

``decide(images_per_class, similarity)`` returns the quadrant and the strategy with the reasons.
How ktoolkit measures the similarity is in ``ktoolkit/transfer/similarity.py``; you can pass your own.

Thresholds (both overridable):
- small: fewer than :data:`SMALL_IMAGES_PER_CLASS` training images per class (median over classes).
  1,000 per class is where, in the fine-tuning literature and in our flowers5 benchmark, training the
  top blocks starts to beat a linear classifier on frozen codes instead of overfitting.
- similar: a similarity at or above :data:`SIMILARITY_THRESHOLD` (batch-norm similarity, 0..1: 0.88 is
  KL 0.13 at the first BN layer, between natural photos (0.95-0.98) and digits or clothing
  silhouettes (0.70-0.78) with ImageNet MobileNetV2), or :data:`PROBE_RATIO_THRESHOLD` when the
  similarity is the top/best linear-probe accuracy ratio (bases without batch normalization).
"""

from __future__ import annotations

from dataclasses import dataclass

SMALL_IMAGES_PER_CLASS = 1000
SIMILARITY_THRESHOLD = 0.88
PROBE_RATIO_THRESHOLD = 0.98

STRATEGIES = {
    ("small", "similar"): "linear",
    ("large", "similar"): "finetune",
    ("small", "different"): "linear-early",
    ("large", "different"): "full",
}

DESCRIPTIONS = {
    "linear": "a linear classifier on the top-layer CNN codes (features computed once and cached)",
    "linear-early": "a linear classifier on features from an earlier layer (the cut chosen by held-out probes)",
    "finetune": "a new head on the frozen base, then the top blocks unfrozen with lower learning rates",
    "full": "the whole network trained, starting from the pretrained weights",
}


@dataclass(frozen=True)
class Decision:
    """Which quadrant of the matrix a dataset falls in, and why."""

    strategy: str
    size: str  # "small" or "large"
    similarity_class: str  # "similar" or "different"
    images_per_class: float
    similarity: float
    small_threshold: float
    similarity_threshold: float

    @property
    def quadrant(self) -> str:
        return f"{self.size} and {self.similarity_class}"

    def reasons(self) -> list[str]:
        """One line per axis with the number and the threshold, then the strategy."""
        return [
            f"{self.images_per_class:,.0f} training images per class "
            f"{'<' if self.size == 'small' else '>='} {self.small_threshold:,.0f}: {self.size}",
            f"similarity {self.similarity:.3f} {'>=' if self.similarity_class == 'similar' else '<'} "
            f"{self.similarity_threshold:.3f}: {self.similarity_class}",
            f"{self.quadrant} -> {self.strategy}: {DESCRIPTIONS[self.strategy]}",
        ]

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "quadrant": self.quadrant,
            "size": self.size,
            "similarity_class": self.similarity_class,
            "images_per_class": self.images_per_class,
            "similarity": self.similarity,
            "small_threshold": self.small_threshold,
            "similarity_threshold": self.similarity_threshold,
            "reasons": self.reasons(),
        }


def decide(
    images_per_class: float,
    similarity: float,
    *,
    small_threshold: float = SMALL_IMAGES_PER_CLASS,
    similarity_threshold: float = SIMILARITY_THRESHOLD,
) -> Decision:
    """The transfer-learning strategy for a dataset.

    Args:
        images_per_class: training images per class (ktoolkit uses the median over classes).
        similarity: how similar the data is to the pretraining data, higher is more similar.
        small_threshold: fewer images per class than this is "small".
        similarity_threshold: a similarity at or above this is "similar".

    Returns:
        A :class:`Decision`: ``strategy`` is "linear", "linear-early", "finetune" or "full".

    Example:
        >>> decide(500, 0.95).strategy
        'linear'
        >>> decide(5000, 0.1).strategy
        'full'
    """
    for name, value in (
        ("images_per_class", images_per_class),
        ("similarity", similarity),
        ("small_threshold", small_threshold),
        ("similarity_threshold", similarity_threshold),
    ):
        if not isinstance(value, (int, float)) or value != value or value < 0:
            raise ValueError(f"{name}={value!r}: must be a number >= 0.")
    size = "small" if images_per_class < small_threshold else "large"
    kind = "similar" if similarity >= similarity_threshold else "different"
    return Decision(
        STRATEGIES[(size, kind)],
        size,
        kind,
        float(images_per_class),
        float(similarity),
        float(small_threshold),
        float(similarity_threshold),
    )
