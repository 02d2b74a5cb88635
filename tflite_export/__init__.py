"""Compression and on-device export (TFLite, ONNX, SavedModel), verified against the Keras model.

    from tflite_export import export, benchmark, open_model

    result = export("runs/mine", mode="int8", compare="float32,float16,qat")  # files + report in runs/mine/export
    runner = open_model("runs/mine/export/resnet18_int8.tflite")            # .tflite or .onnx
    probabilities = runner.predict(images)                                   # float32 0..255 pixels in
    benchmark("runs/mine/export/resnet18_int8.tflite", threads=(1, 2, 4))    # latency p50/p90

Modules: modes (the table of modes and formats), source (the run's model and data), compress
(tensorflow-model-optimization fine-tuning), convert (TFLite converter, SavedModel), onnx_export
(tf2onnx), metadata (TFLite metadata and labels), runtime (running and timing files), verify
(file vs Keras), compat (operators, GPU delegate and NNAPI coverage), report, export (the pipeline).
Nothing imports TensorFlow until a function needs it.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

from tflite_export.export import ExportedFile, ExportResult, export
from tflite_export.modes import FORMATS, MODES
from tflite_export.runtime import benchmark, open_model

__all__ = ["FORMATS", "MODES", "ExportResult", "ExportedFile", "benchmark", "export", "open_model"]
