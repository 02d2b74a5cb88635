"""Top-k predictions for image files, from a run folder or a saved model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ktoolkit.runs import resolve_model_path


@dataclass
class Prediction:
    path: str
    top: list  # (label, probability), best first
    error: str | None = None


def load_classifier(model):
    """Returns (keras model, class names) for a run folder or a .keras file.

    Class names come from the run's classes.json (next to the file), else they are "0", "1", ...
    """
    import recipes

    path, run = resolve_model_path(model)
    keras_model = recipes.load_model(path)
    n = int(keras_model.output_shape[-1])
    names = run.class_names() if run else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{path} has {n} outputs but its classes.json lists {len(names)} classes.")
    return keras_model, names


def predict_files(model, images, top_k: int = 5) -> list[Prediction]:
    """Predicts each image file; unreadable files get an error instead of stopping the others."""
    import tensorflow as tf

    keras_model, names = load_classifier(model)
    height, width, channels = keras_model.input_shape[1:]
    results = []
    for image in images:
        path = Path(image)
        try:
            data = tf.io.read_file(str(path))
            pixels = tf.io.decode_image(data, channels=channels, expand_animations=False)
            pixels = tf.image.resize(pixels, (height, width))
        except (tf.errors.OpError, ValueError) as err:
            reason = "file not found" if not path.exists() else f"not a readable image ({type(err).__name__})"
            results.append(Prediction(str(path), [], reason))
            continue
        probs = np.asarray(keras_model(pixels[None], training=False))[0]
        order = np.argsort(-probs)[: max(1, min(top_k, len(names)))]
        results.append(Prediction(str(path), [(names[i], float(probs[i])) for i in order]))
    return results
