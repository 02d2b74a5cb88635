"""ktoolkit: from a folder of images to a verified, quantized model on a phone or a Jetson."""

# Before TensorFlow resolves tf.keras: tf_keras (Keras 2) is the runtime, because
# tensorflow-model-optimization and keras-cv only work with it (README, "Why tf_keras"). The one place
# that sets TF_USE_LEGACY_KERAS is recipes/_keras.py, which imports no TensorFlow.
from recipes import _keras  # noqa: F401

__version__ = "0.2.0"  # the one place: pyproject.toml reads it
