"""What is exported: the run's Keras model made ready for conversion, its classes, and its data.

:func:`load_source` turns a run folder (or a .keras file plus data) into an :class:`ExportSource`:
the model in float32 with one output (:func:`tflite_export.prepare.prepare_model`), the class names,
and the run's own train/val/test split (as recorded in the run's splits.json, by content), so
calibration images come from "train" and verification runs on the held-out "test" split that training
never saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tflite_export.prepare import find_preprocessing, prepare_model

log = logging.getLogger(__name__)

# The verdict on a file wants at least this many held-out images: with fewer, one image is over a third of
# a point and a 1-point budget can rarely be decided. The test split alone when it has them, else val too.
MIN_VERDICT_IMAGES = 300


@dataclass
class ExportSource:
    """A model ready to convert, with everything the files and the checks need.

    Attributes:
        model: the tf_keras model, float32, one softmax output.
        class_names: class names in output order.
        name: file stem for the exported files (the model's name).
        data: the :class:`ktoolkit.data.DataSource`, split as in training.
        heldout: the split that verifies ("test", or "val" when the run kept no test split).
        preprocessing: the normalization inside the model (an ``ImagePreprocessing`` mode), or None.
        origin: where the model came from, for the reports.
    """

    model: object
    class_names: list
    name: str
    data: object
    heldout: str
    preprocessing: str | None = None
    origin: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.model.input_shape[1:])

    def dataset(self, split, *, batch_size: int = 32, training: bool = False, one_hot: bool = False, seed: int = 0):
        """A split (its name or a :class:`ktoolkit.data.Split`) as a tf.data pipeline of (float32 0..255
        images, labels), made as in training; ``training`` shuffles and caches (fine-tuning is short
        and starts from a trained model, so it does without augmentation)."""
        from ktoolkit.data import split_dataset

        height, width, channels = self.image_shape
        split = self.data.splits[split] if isinstance(split, str) else split
        return split_dataset(
            split,
            num_classes=len(self.class_names),
            image_size=(height, width),
            channels=channels,
            batch_size=batch_size,
            training=training,
            one_hot=one_hot,
            seed=seed,
            cache="memory" if training else None,
        )

    def verdict_splits(self, min_images: int = MIN_VERDICT_IMAGES) -> list[str]:
        """The held-out splits an exported file is judged on: ``heldout`` (the test split), plus "val" when
        the test split has fewer than ``min_images`` images and the data has a val split. Never "train": the
        splits are the run's own (splits.json), or other data with this run's training images left out.

        Val chose the run's best epoch, so the Keras model's accuracy on it is a little optimistic; the drop,
        the Keras model against the file on the same images, is not biased by that."""
        splits = [self.heldout]
        val = self.data.splits.get("val")
        if self.heldout == "test" and len(self.data.splits["test"]) < min_images and val is not None and len(val):
            splits.append("val")
        return splits

    def heldout_dataset(self, splits, *, batch_size: int = 32):
        """The ``splits`` (names) one after the other, in that order, as one pipeline of (images, labels)."""
        datasets = [self.dataset(name, batch_size=batch_size) for name in splits]
        combined = datasets[0]
        for more in datasets[1:]:
            combined = combined.concatenate(more)
        return combined

    def calibration_images(self, count: int, seed: int = 0) -> np.ndarray:
        """``count`` training images (float32, 0..255), drawn at random with ``seed``: the
        representative sample that full-integer quantization calibrates its ranges on."""
        key = ("calibration", count, seed)
        if key not in self._cache:
            train = self.data.splits["train"]
            rng = np.random.default_rng(seed)
            picked = np.sort(rng.choice(len(train), size=min(count, len(train)), replace=False))
            images = [np.asarray(x) for x, _ in self.dataset(train.subset(picked), batch_size=64)]
            self._cache[key] = np.concatenate(images)
        return self._cache[key]


def load_source(model, *, data: str | None = None, progress: bool = False) -> ExportSource:
    """Loads a run folder's model (or a .keras file) and its data for export.

    Args:
        model: a run folder or a .keras file.
        data: the images to calibrate and verify on; default the run's own data, split exactly as in
            training: the split recorded in the run's splits.json (calibration on its train split,
            verification on its test split, else val), unchanged files only, with one warning that
            counts the changed or missing ones. A run without splits.json gets its split recomputed,
            with a warning. Other data gets a stratified 80/10/10 split (seed 0), its held-out splits
            without this run's training images; its classes must be the model's.
        progress: progress bars while scanning the data.

    Raises:
        ValueError: no data (a bare .keras file without ``data``), classes that differ from the
            model's, a model that is not a classifier, or every recorded held-out image changed.
        FileNotFoundError: the model or the data does not exist.
    """
    from ktoolkit.runs import open_classifier

    classifier = open_classifier(model, prepare=prepare_model)
    keras_model, names, path, run = classifier.model, classifier.class_names, classifier.path, classifier.run
    if data is None and run is None:
        raise ValueError(
            f"{path} is not in a run folder, so there are no images to calibrate and verify on; "
            f"pass data=... (--data) with the classes {', '.join(names[:5])}..."
        )
    source, heldout = _run_data(run, data, names, progress)
    return ExportSource(
        model=keras_model,
        class_names=list(names),
        name=keras_model.name,
        data=source,
        heldout=heldout,
        preprocessing=find_preprocessing(keras_model),
        origin=str(Path(path)),
    )


def _run_data(run, data, names, progress):
    """The data split as in training (see :func:`load_source`) and the name of its held-out split;
    a ValueError when its classes are not the model's or a split is missing."""
    from ktoolkit.data.manifest import data_for_run

    found = data_for_run(run, data, val_fraction=0.1, test_fraction=0.1, exclude=("val", "test"), progress=progress)
    source = found.source
    data = source.origin if data is None else data
    if found.verification is not None:
        counts = found.verification.counts
        recorded = next((s for s in ("test", "val") if counts.get(s, {}).get("recorded")), None)
        found.verification.check([recorded] if recorded else [], "verifying on")
        if recorded == "test" and counts.get("val", {}).get("unchanged"):  # val may join the verdict's images
            found.verification.check(["val"], "verifying on")
        found.verification.check(["train"], "calibrating and fine-tuning on")
    if list(source.class_names) != list(names):
        raise ValueError(
            f"data={str(data)!r} has the classes {', '.join(source.class_names)}, but the model was "
            f"trained on {', '.join(names)}; export with the run's own data or data with the same classes."
        )
    heldout = next((s for s in ("test", "val") if len(source.splits.get(s, ())) > 0), None)
    if heldout is None or len(source.splits.get("train", ())) == 0:
        raise ValueError(
            f"data={str(data)!r} needs a training split (calibration, fine-tuning) and a held-out "
            f"test or val split (verification); its split sizes are "
            f"{ {k: len(v) for k, v in source.splits.items()} }."
        )
    return source, heldout
