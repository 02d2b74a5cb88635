"""Compression and on-device export (TFLite, ONNX, SavedModel), verified against the Keras model: file
in, file out. Nothing here knows about run folders; the export workflow of a run is
:mod:`ktoolkit.export`.

    from tflite_export import benchmark, open_model

    runner = open_model("runs/mine/export/resnet18_int8.tflite")            # .tflite or .onnx
    probabilities = runner.predict(images)                                   # float32 0..255 pixels in
    benchmark("runs/mine/export/resnet18_int8.tflite", threads=(1, 2, 4))    # latency p50/p90

Modules: modes (the table of modes and formats), prepare (a model made convertible: float32, one
output), compress (tensorflow-model-optimization fine-tuning), convert (TFLite converter, SavedModel),
onnx_export (tf2onnx), metadata (TFLite metadata and labels), runtime (running and timing files),
verify (file vs Keras), compat (operators, GPU delegate and NNAPI coverage), untrusted (names, paths
and reads from strangers' files made safe). Nothing imports TensorFlow until a function needs it.
"""

from recipes import _keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from tflite_export.modes import FORMATS, MODES
from tflite_export.runtime import benchmark, open_model

__all__ = ["FORMATS", "MODES", "benchmark", "open_model"]
