"""Does the exported file still compute what the Keras model computed? Both run on the same
held-out images; the comparison is accuracy of each, top-1 agreement, the largest change of a
class's accuracy, and the largest change of a probability."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Verification:
    """The exported file against the Keras model, on ``images`` held-out images.

    Attributes:
        images: number of held-out images.
        keras_accuracy: the run's Keras model's top-1 accuracy.
        accuracy: the file's top-1 accuracy.
        agreement: share of images where the file's top-1 class is the Keras model's.
        max_class_change: the largest change of one class's accuracy (recall), in points (signed;
            negative: the file is worse on that class).
        max_class_change_class: which class that is.
        max_probability_change: the largest absolute change of any probability.
        converted_agreement: for fine-tuned modes, agreement with the fine-tuned Keras model the file
            was converted from (the run's model is the reference for the budget).
    """

    images: int
    keras_accuracy: float
    accuracy: float
    agreement: float
    max_class_change: float
    max_class_change_class: str
    max_probability_change: float
    converted_agreement: float | None = None

    @property
    def accuracy_drop(self) -> float:
        """Accuracy lost, in points (negative: the file is more accurate)."""
        return 100.0 * (self.keras_accuracy - self.accuracy)

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop}


def compare(
    keras_probs: np.ndarray,
    file_probs: np.ndarray,
    labels: np.ndarray,
    class_names,
    converted_probs: np.ndarray | None = None,
) -> Verification:
    """Compares the file's probabilities with the Keras model's on the same images (N, C)."""
    keras_top, file_top = keras_probs.argmax(-1), file_probs.argmax(-1)
    changes = []
    for c in range(len(class_names)):
        members = labels == c
        if members.any():
            changes.append((100.0 * (np.mean(file_top[members] == c) - np.mean(keras_top[members] == c)), c))
    change, cls = max(changes, key=lambda t: abs(t[0])) if changes else (0.0, 0)
    return Verification(
        images=len(labels),
        keras_accuracy=float(np.mean(keras_top == labels)),
        accuracy=float(np.mean(file_top == labels)),
        agreement=float(np.mean(keras_top == file_top)),
        max_class_change=float(change),
        max_class_change_class=str(class_names[cls]),
        max_probability_change=float(np.abs(keras_probs - file_probs).max()),
        converted_agreement=None if converted_probs is None else float(np.mean(converted_probs.argmax(-1) == file_top)),
    )


def run_over(predict, dataset, *, progress: bool = False, what: str = "verifying"):
    """Runs ``predict`` (images -> probabilities) over a dataset of (images, labels); returns both."""
    probs, labels = [], []
    batches = dataset
    if progress:
        from tqdm import tqdm

        total = int(dataset.cardinality().numpy())
        batches = tqdm(dataset, total=total if total > 0 else None, desc=what, unit="batch", leave=False)
    for images, y in batches:
        probs.append(np.asarray(predict(np.asarray(images)), dtype=np.float32))
        labels.append(np.asarray(y))
    return np.concatenate(probs), np.concatenate(labels).astype(int)
