"""Shared test set-up: tf_keras runtime, quiet TensorFlow, a fresh Keras session per test."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
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
