"""Evaluating a classifier: accuracy, top-5, per-class precision/recall/F1, the confusion matrix and
the most confused pairs; written into a run folder as metrics.json, per_class.csv and a PNG."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ktoolkit.io import write_json, write_text
from ktoolkit.stats import Accuracy, wilson


@dataclass
class Evaluation:
    """The result of evaluating predictions against labels."""

    class_names: list
    accuracy: float
    top5: float | None
    confusion: np.ndarray
    per_class: list = field(default_factory=list)  # dicts: class, precision, recall, f1, support
    most_confused: list = field(default_factory=list)  # dicts: true, predicted, count, share of the true class
    images: int = 0
    correct: int = 0
    top5_correct: int | None = None
    # For the pictures (never written to metrics.json): the probabilities (N, C), the labels (N,) and
    # images_at(indices) -> {index: uint8 image} of the evaluated images, when they can be read back.
    probabilities: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    images_at: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "accuracy_ci95": list(wilson(self.correct, self.images)),
            "top5": self.top5,
            "top5_ci95": None if self.top5_correct is None else list(wilson(self.top5_correct, self.images)),
            "macro_f1": float(np.mean([c["f1"] for c in self.per_class])) if self.per_class else None,
            "per_class": self.per_class,
            "most_confused": self.most_confused,
            "confusion_matrix": self.confusion.tolist(),
            "class_names": list(self.class_names),
        }


def predict_probabilities(model, dataset, *, progress: bool = False):
    """Runs ``model`` over a dataset of (images, labels); returns (probabilities, integer labels)."""
    probs, labels = [], []
    total = dataset.cardinality().numpy()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(total) if total > 0 else None, desc="evaluating", unit="batch", leave=False)
    for images, y in dataset:
        out = model.predict_on_batch(images)  # one compiled graph (a plain call runs layer by layer in Python)
        if isinstance(out, (list, tuple)):
            out = out[0]
        elif isinstance(out, dict):
            out = out["predictions"]
        probs.append(np.asarray(out, dtype=np.float32))
        y = np.asarray(y)
        labels.append(y.argmax(-1) if y.ndim == 2 else y)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return np.concatenate(probs), np.concatenate(labels).astype(int)


def evaluate_predictions(probs: np.ndarray, labels: np.ndarray, class_names) -> Evaluation:
    """Computes every metric from class probabilities (N, C) and integer labels (N,)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    n = len(class_names)
    predicted = probs.argmax(-1)
    top5 = top5_correct = None
    if n > 5:
        top = np.argsort(-probs, axis=-1)[:, :5]
        top5_correct = int(sum(label in row for label, row in zip(labels, top)))
        top5 = top5_correct / len(labels) if len(labels) else 0.0
    cm = confusion_matrix(labels, predicted, labels=range(n))
    p, r, f, s = precision_recall_fscore_support(labels, predicted, labels=range(n), zero_division=0)
    per_class = [
        {
            "class": name,
            "precision": float(p[i]),
            "recall": float(r[i]),
            "recall_ci95": list(wilson(int(cm[i, i]), int(s[i]))),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, name in enumerate(class_names)
    ]
    off = [(int(cm[i, j]), i, j) for i in range(n) for j in range(n) if i != j and cm[i, j] > 0]
    most = [
        {"true": class_names[i], "predicted": class_names[j], "count": c, "share": c / max(1, int(cm[i].sum()))}
        for c, i, j in sorted(off, reverse=True)[:10]
    ]
    return Evaluation(
        list(class_names),
        float(np.mean(predicted == labels)) if len(labels) else 0.0,
        top5,
        cm,
        per_class,
        most,
        int(len(labels)),
        int(np.sum(predicted == labels)),
        top5_correct,
        probabilities=probs,
        labels=np.asarray(labels),
    )


def evaluate_model(model, dataset, class_names, *, progress: bool = False) -> Evaluation:
    """Every metric of ``model`` on ``dataset``; the pictures read their images back from the same dataset."""
    from ktoolkit.report import dataset_images

    probs, labels = predict_probabilities(model, dataset, progress=progress)
    evaluation = evaluate_predictions(probs, labels, class_names)
    evaluation.images_at = functools.partial(dataset_images, dataset)
    return evaluation


def split_images_at(splits, image_size, channels):
    """images_at(indices) -> {index: uint8 image} for the ``splits`` evaluated one after the other (an index
    counts through them in that order), each image read on its own through the training pipeline's decoding."""
    from ktoolkit.report import split_images

    starts = np.cumsum([0] + [len(s) for s in splits])

    def images_at(indices):
        found = {}
        for k, split in enumerate(splits):
            mine = [i for i in indices if starts[k] <= i < starts[k + 1]]
            for i, image in zip(mine, split_images(split, [i - starts[k] for i in mine], image_size, channels)):
                found[i] = image
        return found

    return images_at


def save_evaluation(evaluation: Evaluation, run, split: str = "test") -> dict:
    """Writes metrics.json, per_class.csv and confusion_matrix.png into ``run``; returns the metrics."""
    from ktoolkit.report import plot_confusion_matrix

    metrics = {"split": split, **evaluation.to_dict()}
    write_json(run.metrics, metrics)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["class", "precision", "recall", "f1", "support"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(evaluation.per_class)
    write_text(run.per_class, out.getvalue())
    plot_confusion_matrix(
        evaluation.confusion,
        evaluation.class_names,
        run.confusion,
        title=f"{split} split: accuracy {Accuracy(evaluation.correct, evaluation.images).text()}",
    )
    if evaluation.probabilities is not None and evaluation.images_at is not None and evaluation.images:
        from ktoolkit.report import evaluation_pictures

        evaluation_pictures(
            evaluation.probabilities,
            evaluation.labels,
            evaluation.class_names,
            evaluation.images_at,
            run.root,
            split=split,
        )
    return metrics


def metrics_line(metrics: dict) -> str:
    """``test accuracy 93.5% (95% CI 89.7-95.9%, 245 images), top-5 99.2% (95% CI ...)``."""
    line = f"{metrics.get('split', 'held-out')} accuracy {Accuracy.from_metrics(metrics).text()}"
    if metrics.get("top5") is not None:
        top5 = metrics.get("top5_ci95")
        ci = f" (95% CI {100 * top5[0]:.1f}-{100 * top5[1]:.1f}%)" if top5 else ""
        line += f", top-5 {metrics['top5']:.1%}{ci}"
    return line


class EvaluationRun(NamedTuple):
    """What :func:`evaluate_run` gives back (unpacks as ``metrics, folder``)."""

    metrics: dict
    folder: Path

    def lines(self) -> list[str]:
        """What `ktool evaluate` prints: the accuracy with its interval, macro F1, every class, the most
        confused pairs and where it was written."""
        m = self.metrics
        out = [f"{metrics_line(m).replace(' accuracy ', ': accuracy ', 1)}, macro F1 {m['macro_f1']:.3f}"]
        for c in m["per_class"]:
            low, high = c.get("recall_ci95") or wilson(round(c["recall"] * c["support"]), c["support"])
            out.append(
                f"  {c['class']:<20} precision {c['precision']:.3f}  recall {c['recall']:.3f} "
                f"[{low:.2f}, {high:.2f}]  F1 {c['f1']:.3f}  ({c['support']} images)"
            )
        if m["most_confused"]:
            out.append("most confused (true -> predicted):")
            out += [f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in m["most_confused"][:5]]
        out.append(f"written to {self.folder}")
        return out


def evaluate_run(model, *, data=None, split=None, out=None, batch_size: int = 32, progress: bool = False):
    """Evaluates a run folder's (or a .keras file's) model; returns an :class:`EvaluationRun` (metrics, output
    folder).

    Without ``data``, or with the run's own data (however its path is written), the split recorded
    in the run's splits.json is used, so ``split`` "test" is exactly the held-out split of training:
    files added since are ignored, and changed or missing ones are left out with one warning that
    counts them (all of them gone is an error). A run without splits.json (an older ktoolkit) gets
    its split recomputed, with a warning that it cannot be verified. Other data is evaluated whole
    (``split="all"``) unless a split is named, without the files that were this run's training
    images; its class names must be among the model's.
    """
    from ktoolkit.data.manifest import data_for_run
    from ktoolkit.report import write_evaluation_report
    from ktoolkit.runs import Run, open_classifier

    classifier = open_classifier(model)
    run, names = classifier.run, classifier.class_names
    if data is None and run is None:
        raise ValueError(f"{classifier.path} is not in a run folder, so there is no default data; pass --data.")
    found = data_for_run(run, data, verify=None if split == "all" else [split or "test"], progress=progress)
    split = split or ("test" if found.own else "all")
    if found.verification is not None:
        found.verification.check(list(found.verification.counts) if split == "all" else [split], "evaluating")
    data = found.source.origin if data is None else data
    dataset, splits = _evaluation_dataset(classifier, found.source, split, data, batch_size)
    evaluation = evaluate_model(classifier.model, dataset, names, progress=progress)
    # The pictures read their few images on their own (not a second pass over every image).
    evaluation.images_at = split_images_at(splits, classifier.model.input_shape[1:3], classifier.model.input_shape[3])
    folder = Path(out) if out else ((run.root / "eval") if run else Path(f"eval-{classifier.path.stem}"))
    # Into a run folder: one command at a time, as training and export (a second one fails at once).
    inside = run is not None and folder.resolve().is_relative_to(run.root.resolve())
    with run.lock() if inside else contextlib.nullcontext():
        metrics = save_evaluation(evaluation, Run(folder), split=split)
        write_evaluation_report(folder, metrics, model=str(classifier.path), data=str(data))
    return EvaluationRun(metrics, folder)


def _evaluation_dataset(classifier, source, split: str, data, batch_size: int):
    """``split`` of ``source`` (every split with images for "all") as one tf.data pipeline of (images,
    the model's class indices), and the splits it goes through in order; a ValueError for classes the model
    does not know or no images."""
    import tensorflow as tf

    from ktoolkit.data import split_dataset

    names = classifier.class_names
    unknown = [c for c in source.class_names if c not in names]
    if unknown:
        raise ValueError(
            f"data={data!r} has classes the model does not know: {', '.join(unknown)}; "
            f"the model's classes are {', '.join(names)}."
        )
    mapping = tf.constant([names.index(c) for c in source.class_names], dtype=tf.int64)
    wanted = [s for s in source.splits if (split == "all" or s == split) and len(source.splits[s])]
    if not wanted:
        raise ValueError(
            f"data={data!r} has no {split!r} split with images; its splits are "
            f"{', '.join(s for s in source.splits if len(source.splits[s])) or 'none'}."
        )
    height, width, channels = classifier.model.input_shape[1:]
    parts = [
        split_dataset(
            source.splits[s],
            num_classes=len(source.class_names),
            image_size=(height, width),
            channels=channels,
            batch_size=batch_size,
            training=False,
            one_hot=False,
        )
        for s in wanted
    ]
    dataset = functools.reduce(lambda a, b: a.concatenate(b), parts)
    return dataset.map(lambda x, y: (x, tf.gather(mapping, tf.cast(y, tf.int64)))), [source.splits[s] for s in wanted]
