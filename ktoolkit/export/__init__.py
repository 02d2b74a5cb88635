"""The export workflow: a run folder's model to verified .tflite/.onnx/SavedModel files and a report.

    from ktoolkit.export import ExportConfig, export

    result = export("runs/mine", mode="int8", compare="float32,float16,qat")  # files + report in runs/mine/export
    result = export("runs/mine", ExportConfig(mode="int8", max_accuracy_drop=0.5))  # the same settings as a value

Modules: workflow (the pipeline: for each mode compress -> convert -> metadata -> verify -> write ->
time), source (the run's model and data, split as in training), report (export_report.md/.json,
export_compare.png). The steps on files and models are :mod:`tflite_export`'s; this package adds what
knows about run folders, data splits and reports.
"""

from ktoolkit.export.workflow import ExportConfig, ExportedFile, ExportResult, export

__all__ = ["ExportConfig", "ExportResult", "ExportedFile", "export"]
