"""Shared test set-up: tf_keras runtime, quiet TensorFlow, a fresh Keras session per test."""

import os

from recipes import _keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    """Frees the previous test's models (VGG-E alone is 575 MB) and fixes the seeds."""
    import tf_keras

    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(0)
    yield
    tf_keras.backend.clear_session()


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory):
    """scikit-learn's 1,797 real handwritten digits (8x8, 0..16) as a uint8 .npz with class names."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images * (255.0 / 16.0)).round().astype("uint8")[..., None]
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=x, y=digits.target.astype("int64"), class_names=np.array([str(i) for i in range(10)]))
    return path


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """A class-per-folder directory of digit PNGs (30 per class), as a user's data would look."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits_png")
    counts = {}
    for image, label in zip(digits.images, digits.target):
        if counts.get(label, 0) >= 30:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / f"digit_{label}"
        folder.mkdir(exist_ok=True)
        pixels = (image * (255.0 / 16.0)).round().astype("uint8")
        Image.fromarray(np.kron(pixels, np.ones((4, 4), dtype="uint8"))).save(folder / f"{counts[label]:03d}.png")
    return root
