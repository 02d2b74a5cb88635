"""ktoolkit: from a folder of images to a verified, quantized model on a phone or a Jetson."""

import os

# Before TensorFlow resolves tf.keras: tf_keras (Keras 2) is the runtime, because
# tensorflow-model-optimization and keras-cv only work with it. See README, "Why tf_keras".
os.environ["TF_USE_LEGACY_KERAS"] = "1"

__version__ = "0.2.0"  # the one place: pyproject.toml reads it
