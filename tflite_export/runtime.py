"""Running exported files: .tflite with LiteRT (ai-edge-litert, XNNPACK on CPU), .onnx with
onnxruntime, SavedModel folders with TensorFlow; and timing them.

Nothing here imports TensorFlow unless a SavedModel is opened, so ``ktool predict`` and
``ktool benchmark`` run on a Jetson or a phone dev board that has only ai-edge-litert or
onnxruntime (plus numpy and Pillow).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

SUFFIXES = {".tflite": "tflite", ".onnx": "onnx"}


def open_model(model, *, threads: int | None = None):
    """A runner for a .tflite or .onnx file (path or bytes with ``kind``) or a SavedModel folder.

    Args:
        model: a path, or ``(bytes, kind)`` with kind "tflite" or "onnx".
        threads: CPU threads (None: the runtime's default).

    Raises:
        ValueError: not a .tflite, .onnx file or SavedModel folder.
        FileNotFoundError: the file does not exist.
    """
    if isinstance(model, tuple):
        content, kind = model
        return {"tflite": TFLiteRunner, "onnx": OnnxRunner}[kind](content, threads=threads)
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist.")
    if path.is_dir() and (path / "saved_model.pb").exists():
        return SavedModelRunner(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"model={str(path)!r}: give a .tflite or .onnx file (or a SavedModel folder).")
    runner = {"tflite": TFLiteRunner, "onnx": OnnxRunner}[kind](path.read_bytes(), threads=threads)
    if runner.labels is None:
        runner.labels = _labels_beside(path)
    return runner


def _labels_beside(path: Path) -> list[str] | None:
    labels = path.parent / "labels.txt"
    return [line for line in labels.read_text().splitlines() if line.strip()] if labels.exists() else None


class Runner:
    """Runs an exported classifier on float32 images of 0..255 pixels; returns probabilities.

    Attributes:
        kind: "tflite", "onnx" or "saved_model".
        input_shape: (height, width, channels).
        input_dtype: numpy dtype of the input tensor (uint8/int8 for integer I/O).
        labels: class names from the file's metadata (or labels.txt beside it), or None.
    """

    kind = ""
    labels: list[str] | None = None

    def predict(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_one(self, image: np.ndarray) -> np.ndarray:
        """One image (batch of one), the way a phone app calls the model; for latency."""
        return self.predict(image[None])


class TFLiteRunner(Runner):
    kind = "tflite"

    def __init__(self, content: bytes, *, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        from tflite_export.metadata import packed_labels

        self.interpreter = Interpreter(model_content=content, num_threads=threads)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])
        self.input_dtype = np.dtype(self._input["dtype"])
        self._dynamic_batch = int(self._input["shape_signature"][0]) == -1
        self._batch = None
        self.labels = packed_labels(content)

    def _resize(self, batch: int):
        if self._batch != batch:
            if self._dynamic_batch or batch == 1:
                self.interpreter.resize_tensor_input(self._input["index"], [batch, *self.input_shape])
            self.interpreter.allocate_tensors()
            self._batch = batch

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if not self._dynamic_batch and len(images) != 1:
            return np.concatenate([self.predict(image[None]) for image in images])
        self._resize(len(images))
        self.interpreter.set_tensor(self._input["index"], _quantize(images, self.input_dtype, self._input))
        self.interpreter.invoke()
        return _dequantize(self.interpreter.get_tensor(self._output["index"]), self._output)


class OnnxRunner(Runner):
    kind = "onnx"

    def __init__(self, content: bytes, *, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0]
        self.input_shape = tuple(int(d) for d in self._input.shape[1:])
        self.input_dtype = np.dtype(np.float32)
        labels = self.session.get_modelmeta().custom_metadata_map.get("labels")
        self.labels = json.loads(labels) if labels else None

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input.name: np.asarray(images, dtype=np.float32)})[0]


class SavedModelRunner(Runner):
    kind = "saved_model"

    def __init__(self, folder):
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        import tensorflow as tf

        self.folder = Path(folder)
        self._serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
        spec = self._serve.structured_input_signature[1]["input"]
        self.input_shape = tuple(int(d) for d in spec.shape[1:])
        self.input_dtype = np.dtype(np.float32)
        self.labels = _labels_beside(Path(folder))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self._serve(input=np.asarray(images, dtype=np.float32))["predictions"].numpy()


def _quantize(images: np.ndarray, dtype: np.dtype, details: dict) -> np.ndarray:
    if dtype == np.float32:
        return images
    scale, zero_point = details["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(images / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantize(values: np.ndarray, details: dict) -> np.ndarray:
    if values.dtype == np.float32:
        return values
    scale, zero_point = details["quantization"]
    return (values.astype(np.float32) - zero_point) * scale


def benchmark(model, *, threads=(1, 2, 4), runs: int = 50, warmup: int = 5, progress: bool = False) -> list[dict]:
    """Latency of single-image inference, per thread count, on this machine.

    A .tflite file runs with LiteRT's default CPU path (XNNPACK); an .onnx file with onnxruntime's
    CPU provider. Each thread count gets a fresh runner, ``warmup`` untimed runs, then ``runs``
    timed ones on a fixed random image.

    Returns:
        One dict per thread count: threads, runs, p50_ms, p90_ms, mean_ms, min_ms.
    """
    results = []
    for count in threads:
        runner = open_model(model, threads=int(count))
        image = np.random.default_rng(0).uniform(0, 255, runner.input_shape).astype(np.float32)
        for _ in range(warmup):
            runner.predict_one(image)
        times = []
        for _ in _progress(range(runs), progress, f"{count} thread(s)"):
            start = time.perf_counter()
            runner.predict_one(image)
            times.append((time.perf_counter() - start) * 1000)
        results.append({"threads": int(count), "runs": runs, "p50_ms": statistics.median(times),
                        "p90_ms": float(np.percentile(times, 90)), "mean_ms": statistics.fmean(times),
                        "min_ms": min(times)})
    return results


def _progress(iterable, show: bool, what: str):
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=what, unit="run", leave=False)
