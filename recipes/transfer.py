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

Similar or different, from all the evidence: ``earlier_cut_better=True`` (an earlier layer's linear probe
beats the top layer's beyond the 95% interval of their paired difference, on the same images) makes the
data "different" for this base whatever ``similarity`` says: the top features are specialized to
something else, which is the definition of "different" that matters for the choice. Otherwise the
similarity number decides. ``Decision.evidence`` names what decided: "batch-norm", "probes" or "both".

Thresholds (both overridable):
- small: fewer than :data:`SMALL_IMAGES_PER_CLASS` labelled images per class (median over classes;
  ktoolkit counts train+val, what the user has apart from the test split).
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
    "linear-early": "a linear classifier on features from an earlier layer (the cut chosen by cross-validated probes)",
    "finetune": "a new head on the frozen base, then the top blocks unfrozen with lower learning rates",
    "full": "the whole network trained, starting from the pretrained weights",
}


# What the similarity number is, by its ``similarity_source`` (for the reason line and the evidence).
SIMILARITY_NAMES = {"batch-norm": "batch-norm similarity", "probes": "probe ratio top/best", "given": "similarity"}


@dataclass(frozen=True)
class Decision:
    """Which quadrant of the matrix a dataset falls in, and why.

    ``evidence`` is what decided similar/different: ``similarity_source`` (the number alone: "batch-norm",
    "probes" for the probe ratio, or "given"), "probes" when the probes' paired comparison overruled a
    number that said similar, or "both" when the comparison and the batch-norm number both said different.
    """

    strategy: str
    size: str  # "small" or "large"
    similarity_class: str  # "similar" or "different"
    images_per_class: float
    similarity: float
    small_threshold: float
    similarity_threshold: float
    similarity_source: str = "given"
    earlier_cut_better: bool | None = None  # None: no probe comparison was made
    probe_evidence: str = ""
    counted: str = "training images per class"
    evidence: str = "given"

    @property
    def quadrant(self) -> str:
        return f"{self.size} and {self.similarity_class}"

    def reasons(self) -> list[str]:
        """One line per axis with the number and the threshold (and, for similar/different, the evidence that
        decided), then the strategy."""
        return [
            f"{self.images_per_class:,.0f} {self.counted} "
            f"{'<' if self.size == 'small' else '>='} {self.small_threshold:,.0f}: {self.size}",
            self._similarity_reason(),
            f"{self.quadrant} -> {self.strategy}: {DESCRIPTIONS[self.strategy]}",
        ]

    def _similarity_reason(self) -> str:
        name = SIMILARITY_NAMES.get(self.similarity_source, self.similarity_source)
        says = "similar" if self.similarity >= self.similarity_threshold else "different"
        number = f"{name} {self.similarity:.3f} {'>=' if says == 'similar' else '<'} {self.similarity_threshold:.3f}"
        if self.earlier_cut_better:
            probes = (
                "the linear probes: an earlier cut beats the top layer beyond the 95% interval of their paired "
                f"difference ({self.probe_evidence})"
            )
            if self.evidence == "both":
                return f"different, decided by both {probes}, and the {number}"
            return f"different, decided by {probes}; the {number} " + (
                "agrees" if says == "different" else "alone would say similar"
            )
        line = f"{number}: {self.similarity_class}"
        if self.evidence != "given":
            line += f", decided by the {SIMILARITY_NAMES.get(self.evidence, self.evidence)}"
        if self.earlier_cut_better is False:
            line += f" (the probes find no earlier cut better than the top beyond their 95% interval: {self.probe_evidence})"
        return line

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "quadrant": self.quadrant,
            "size": self.size,
            "similarity_class": self.similarity_class,
            "images_per_class": self.images_per_class,
            "counted": self.counted,
            "similarity": self.similarity,
            "similarity_source": self.similarity_source,
            "small_threshold": self.small_threshold,
            "similarity_threshold": self.similarity_threshold,
            "earlier_cut_better": self.earlier_cut_better,
            "probe_evidence": self.probe_evidence,
            "evidence": self.evidence,
            "reasons": self.reasons(),
        }


def decide(
    images_per_class: float,
    similarity: float,
    *,
    small_threshold: float = SMALL_IMAGES_PER_CLASS,
    similarity_threshold: float = SIMILARITY_THRESHOLD,
    earlier_cut_better: bool | None = None,
    probe_evidence: str = "",
    similarity_source: str = "given",
    counted: str = "training images per class",
) -> Decision:
    """The transfer-learning strategy for a dataset.

    Args:
        images_per_class: labelled images per class (ktoolkit uses the median over classes of train+val).
        similarity: how similar the data is to the pretraining data, higher is more similar.
        small_threshold: fewer images per class than this is "small".
        similarity_threshold: a similarity at or above this is "similar".
        earlier_cut_better: True when an earlier cut's linear probe beats the top layer's beyond their
            uncertainty (the data is then "different" whatever ``similarity`` says); False when the probes
            were compared and it does not; None when there was no comparison.
        probe_evidence: the comparison's numbers, for the reason line.
        similarity_source: what ``similarity`` is: "batch-norm", "probes" (top/best probe ratio) or "given".
        counted: what ``images_per_class`` counts, for the reason line.

    Returns:
        A :class:`Decision`: ``strategy`` is "linear", "linear-early", "finetune" or "full".

    Example:
        >>> decide(500, 0.95).strategy
        'linear'
        >>> decide(5000, 0.1).strategy
        'full'
        >>> decide(500, 0.95, earlier_cut_better=True, similarity_source="batch-norm").strategy
        'linear-early'
    """
    _check_numbers(
        images_per_class=images_per_class,
        similarity=similarity,
        small_threshold=small_threshold,
        similarity_threshold=similarity_threshold,
    )
    if earlier_cut_better not in (None, True, False):
        raise ValueError(f"earlier_cut_better={earlier_cut_better!r}: must be True, False or None.")
    size = "small" if images_per_class < small_threshold else "large"
    kind, evidence = _similar_or_different(similarity >= similarity_threshold, earlier_cut_better, similarity_source)
    return Decision(
        STRATEGIES[(size, kind)],
        size,
        kind,
        float(images_per_class),
        float(similarity),
        float(small_threshold),
        float(similarity_threshold),
        similarity_source,
        None if earlier_cut_better is None else bool(earlier_cut_better),
        probe_evidence,
        counted,
        evidence,
    )


def _check_numbers(**values):
    """A ValueError naming the first value that is not a number >= 0."""
    for name, value in values.items():
        if not isinstance(value, (int, float)) or value != value or value < 0:
            raise ValueError(f"{name}={value!r}: must be a number >= 0.")


def _similar_or_different(number_says_similar: bool, earlier_cut_better, source: str) -> tuple[str, str]:
    """(similar or different, the evidence that decided): the probes' paired comparison overrules the number."""
    if earlier_cut_better:
        return "different", "probes" if number_says_similar or source == "probes" else "both"
    return ("similar" if number_says_similar else "different"), source
