"""Top-k predictions for image files, from a run folder, a saved Keras model, or an exported .tflite
or .onnx file.

Exported files run without TensorFlow (images are decoded with Pillow, the model with ai-edge-litert
or onnxruntime), so the same command works on a Jetson or a phone dev board.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ktoolkit.runs import open_classifier, printable_names

EXPORTED = (".tflite", ".onnx")


@dataclass
class Prediction:
    path: str
    top: list  # (label, probability), best first
    error: str | None = None


def is_exported(model) -> bool:
    """True for a .tflite or .onnx file (run by LiteRT or onnxruntime instead of Keras)."""
    return Path(model).suffix.lower() in EXPORTED


def predict_files(model, images, top_k: int = 5) -> list[Prediction]:
    """Predicts each image file; unreadable files get an error instead of stopping the others.

    ``model`` is a run folder, a .keras file, or a .tflite/.onnx file (class names from its
    metadata, else labels.txt beside it, else "0", "1", ...).
    """
    if is_exported(model):
        predict, names, shape, read = _exported(model)
    else:
        classifier = open_classifier(model)
        keras_model, names = classifier.model, classifier.labels
        shape = keras_model.input_shape[1:]
        predict, read = (lambda x: np.asarray(keras_model(x, training=False))), _read_tf
    results = []
    for image in images:
        path = Path(image)
        try:
            pixels = read(path, shape)
        except (OSError, ValueError) as err:
            reason = "file not found" if not path.exists() else f"not a readable image ({type(err).__name__})"
            results.append(Prediction(str(path), [], reason))
            continue
        probs = predict(pixels[None])[0]
        order = np.argsort(-probs)[: max(1, min(top_k, len(names)))]
        results.append(Prediction(str(path), [(names[i], float(probs[i])) for i in order]))
    return results


def _exported(model):
    from tflite_export.runtime import open_model

    runner = open_model(model)
    probe = runner.predict(np.zeros((1, *runner.input_shape), dtype=np.float32))
    n = int(probe.shape[-1])
    names = runner.labels or [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{model} has {n} outputs but its labels list {len(names)} classes.")
    return runner.predict, printable_names(names), runner.input_shape, _read_pillow


def _read_tf(path: Path, shape) -> np.ndarray:
    """Decodes and resizes like training's pipeline (tf.io.decode_image, bilinear tf.image.resize)."""
    import tensorflow as tf

    height, width, channels = shape
    try:
        pixels = tf.io.decode_image(tf.io.read_file(str(path)), channels=channels, expand_animations=False)
    except tf.errors.OpError as err:
        raise ValueError(str(err)) from None
    return tf.image.resize(pixels, (height, width)).numpy()


def _read_pillow(path: Path, shape) -> np.ndarray:
    """Decodes with Pillow and resizes with its bilinear filter to float32 pixels. (Pillow averages over
    the source pixels when it shrinks; tf.image.resize samples: large photos differ slightly.)"""
    from PIL import Image

    height, width, channels = shape
    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32)
    return pixels.reshape(height, width, channels)
