"""Compression and on-device export (TFLite, ONNX), verified against the Keras model."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
