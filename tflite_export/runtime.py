"""Running exported files: .tflite with LiteRT (ai-edge-litert, XNNPACK on CPU), .onnx with
onnxruntime, SavedModel folders with TensorFlow; and timing them.

Nothing here imports TensorFlow unless a SavedModel is opened, so ``ktool predict`` and
``ktool benchmark`` run on a Jetson or a phone dev board that has only ai-edge-litert or
onnxruntime (plus numpy and Pillow).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from tflite_export.quiet import native_output_hidden
from tflite_export.untrusted import (
    MAX_LABELS_BYTES,
    label_lines,
    read_capped,
    sanitize_text,
)

SUFFIXES = {".tflite": "tflite", ".onnx": "onnx"}
# Larger than any phone or Jetson model (and than a flatbuffer or protobuf can hold without
# external weights): a file over it is refused before it is read into memory.
MAX_MODEL_BYTES = 2 * 1024**3
MAX_IMAGE_SIDE = 4096  # input height and width: a 4096x4096x4 float32 image is 256 MB


def open_model(model, *, threads: int | None = None):
    """A runner for a .tflite or .onnx file (path or bytes with ``kind``) or a SavedModel folder.

    Args:
        model: a path, or ``(bytes, kind)`` with kind "tflite" or "onnx".
        threads: CPU threads (None: the runtime's default).

    Raises:
        ValueError: not a .tflite, .onnx file or SavedModel folder, a file that is not the model its
            name says (random bytes, truncated), over :data:`MAX_MODEL_BYTES`, or with labels over
            their cap; the message names the file.
        FileNotFoundError: the file does not exist.
    """
    if isinstance(model, tuple):
        content, kind = model
        try:
            return {"tflite": TFLiteRunner, "onnx": OnnxRunner}[kind](content, threads=threads)
        except ValueError as err:
            raise ValueError(_about(f"the {kind} model in memory", err)) from None
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist.")
    if path.is_dir() and (path / "saved_model.pb").exists():
        return SavedModelRunner(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None or not path.is_file():
        raise ValueError(f"model={str(path)!r}: give a .tflite or .onnx file (or a SavedModel folder).")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ValueError(
            f"{path} is {size / 1024**3:.1f} GiB, over the {MAX_MODEL_BYTES / 1024**3:g} GiB a "
            f".tflite or .onnx model can be; it was not read. Is it the right file?"
        )
    try:
        runner = {"tflite": TFLiteRunner, "onnx": OnnxRunner}[kind](path.read_bytes(), threads=threads)
        if runner.labels is None:
            runner.labels = _labels_beside(path)
    except ValueError as err:  # the runners' messages say what is wrong; this names the file
        raise ValueError(_about(str(path), err)) from None
    return runner


def _about(name: str, err: ValueError) -> str:
    """``err``'s message about the file ``name``: "x.tflite is not ..." or "x.tflite: the packed ..."."""
    message = str(err)
    return f"{name} {message}" if message.startswith(("is ", "has ", "its ")) else f"{name}: {message}"


def _labels_beside(path: Path) -> list[str] | None:
    """The class names in the labels.txt beside a model file (sanitized, size-capped), or None."""
    labels = path.parent / "labels.txt"
    if not labels.is_file():  # not a FIFO or a device that would block or never end
        return None
    with open(labels, "rb") as f:
        return label_lines(read_capped(f, MAX_LABELS_BYTES, str(labels)), str(labels))


class Runner:
    """Runs an exported classifier on float32 images of 0..255 pixels; returns its outputs (probabilities).

    What the input tensor gets is read from the file (:func:`_model_input`): an integer input takes the
    pixel bytes as they are, a float input ``(pixel - mean) / std`` from the TFLite metadata's
    normalization (the pixels themselves without one, as ktoolkit's files take them).

    Attributes:
        kind: "tflite", "onnx" or "saved_model".
        input_shape: (height, width, channels), whatever the file's layout (an NCHW .onnx is transposed).
        input_dtype: numpy dtype of the input tensor (uint8/int8 for integer I/O).
        normalization: (mean, std) per channel applied to a float input, or None.
        labels: class names from the file's metadata (or labels.txt beside it), or None.
    """

    kind = ""
    labels: list[str] | None = None
    normalization: tuple[np.ndarray, np.ndarray] | None = None

    def predict(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_one(self, image: np.ndarray) -> np.ndarray:
        """One image (batch of one), the way a phone app calls the model; for latency."""
        return self.predict(image[None])


class TFLiteRunner(Runner):
    kind = "tflite"

    def __init__(self, content: bytes, *, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        from tflite_export.metadata import model_labels, read_normalization

        if len(content) < 8 or bytes(content[4:8]) != b"TFL3":
            raise ValueError(
                f"is not a TFLite model (it has no TFL3 flatbuffer identifier: "
                f"{bytes(content[4:8])!r}); was it written completely?"
            )
        try:  # LiteRT verifies the flatbuffer before it reads anything from it
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
        except ValueError as err:
            raise ValueError(f"is not a valid TFLite model ({err}); was it written completely?") from None
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if not inputs or not outputs:
            raise ValueError("is not an image classifier (it has no input or no output tensor).")
        self._input, self._output = inputs[0], outputs[0]
        self.input_shape = _image_shape(list(self._input["shape"]))
        self.input_dtype = np.dtype(self._input["dtype"])
        self._dynamic_batch = int(self._input["shape_signature"][0]) == -1
        self._batch = None
        self.labels = model_labels(content)
        if self.input_dtype.kind == "f":
            self.normalization = read_normalization(content, self.input_shape[-1])

    def _resize(self, batch: int):
        if self._batch != batch:
            if self._dynamic_batch or batch == 1:
                self.interpreter.resize_tensor_input(self._input["index"], [batch, *self.input_shape])
            with native_output_hidden():  # XNNPACK's "INFO: Created ... delegate" line
                self.interpreter.allocate_tensors()
            self._batch = batch

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if not self._dynamic_batch and len(images) != 1:
            return np.concatenate([self.predict(image[None]) for image in images])
        self._resize(len(images))
        self.interpreter.set_tensor(self._input["index"], _model_input(images, self.input_dtype, self.normalization))
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
        if _onnx_has_external_data(content):
            raise ValueError(
                "has tensors stored in external files; onnxruntime would read them relative to the "
                "current folder, so ktoolkit runs only self-contained .onnx files (as it exports)."
            )
        try:
            self.session = onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001  (onnxruntime's errors are pybind types, not ValueError)
            raise ValueError(
                f"is not an ONNX model onnxruntime can load ({type(err).__name__}: "
                f"{str(err)[:200]}); was it written completely?"
            ) from None
        self._input = self.session.get_inputs()[0]
        shape = list(self._input.shape)
        self._channels_first = _channels_first(shape)
        self.input_shape = _image_shape([shape[0], *shape[2:], shape[1]] if self._channels_first else shape)
        self.input_dtype = np.dtype(_ONNX_TYPES.get(self._input.type, np.float32))
        self.labels = _onnx_labels(self.session.get_modelmeta().custom_metadata_map.get("labels"))

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = _model_input(np.asarray(images, dtype=np.float32), self.input_dtype)
        if self._channels_first:
            images = images.transpose(0, 3, 1, 2)
        return self.session.run(None, {self._input.name: images})[0]


_ONNX_TYPES = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(float16)": np.float16}


def _channels_first(shape) -> bool:
    """True for an (N, C, H, W) image input (PyTorch's layout): 1, 3 or 4 channels second, a last axis
    that cannot be channels."""
    return (
        len(shape) == 4
        and shape[1] in (1, 3, 4)
        and not (isinstance(shape[3], (int, np.integer)) and 0 < shape[3] <= 4)
    )


def _image_shape(shape) -> tuple[int, int, int]:
    """(height, width, channels) of an input shape (batch, H, W, C), checked: the probe image and the
    benchmark's image are allocated from it, so a file cannot ask for gigabytes."""
    dims = shape[1:] if len(shape) == 4 else ()
    if not (
        len(dims) == 3
        and all(isinstance(d, (int, np.integer)) for d in dims)
        and 0 < dims[0] <= MAX_IMAGE_SIDE
        and 0 < dims[1] <= MAX_IMAGE_SIDE
        and 0 < dims[2] <= 4
    ):
        raise ValueError(
            f"is not an image classifier ktoolkit can run: its input shape is {list(shape)}, not "
            f"(batch, height, width, channels) with sides up to {MAX_IMAGE_SIDE} and 1 to 4 channels."
        )
    return tuple(int(d) for d in dims)


def _onnx_labels(text: str | None) -> list[str] | None:
    """The class names an .onnx file stores (a JSON list in its metadata), sanitized; None if none."""
    if not text:
        return None
    if len(text) > MAX_LABELS_BYTES:
        raise ValueError(f"its 'labels' metadata is {len(text):,} characters, over the {MAX_LABELS_BYTES:,} cap.")
    try:
        labels = json.loads(text)
    except ValueError:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(label, (str, int)) for label in labels):
        raise ValueError("its 'labels' metadata is not a JSON list of class names.")
    return [sanitize_text(label) or str(i) for i, label in enumerate(labels)]


# ONNX protobuf field numbers where tensors live (onnx.proto3): a TensorProto stored outside the file
# has external_data (13) or data_location EXTERNAL (14 = 1).
_ONNX_MESSAGES = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _onnx_has_external_data(content: bytes, kind: str = "model", depth: int = 0) -> bool:
    """True when a tensor anywhere in an ONNX protobuf refers to external data. Walks the wire format
    (onnx itself need not be installed on the device); weights are skipped, not parsed.

    Raises:
        ValueError: the protobuf is malformed or nested deeper than a real model.
    """
    if depth > 64:
        raise ValueError("is not a valid ONNX model (its graphs are nested more than 64 deep).")
    view, at = memoryview(content), 0
    while at < len(view):
        key, at = _varint(view, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(view, at)
            if kind == "tensor" and field == 14 and value == 1:
                return True
        elif wire == 2:
            length, at = _varint(view, at)
            if at + length > len(view):
                raise ValueError("is not a valid ONNX model (a field runs past the end; truncated?).")
            if kind == "tensor" and field == 13:
                return True
            child = _ONNX_MESSAGES.get(kind, {}).get(field)
            if child and _onnx_has_external_data(view[at : at + length], child, depth + 1):
                return True
            at += length
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            raise ValueError(f"is not a valid ONNX model (protobuf wire type {wire}); was it written completely?")
    return False


def _varint(view, at: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if at >= len(view):
            break
        byte = view[at]
        value, at, shift = value | (byte & 0x7F) << shift, at + 1, shift + 7
        if not byte & 0x80:
            return value, at
    raise ValueError("is not a valid ONNX model (a malformed protobuf number; truncated?).")


class SavedModelRunner(Runner):
    kind = "saved_model"

    def __init__(self, folder):
        import tensorflow as tf  # tf_keras already chosen: importing tflite_export ran recipes._keras

        self.folder = Path(folder)
        self._serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
        spec = self._serve.structured_input_signature[1]["input"]
        self.input_shape = tuple(int(d) for d in spec.shape[1:])
        self.input_dtype = np.dtype(np.float32)
        self.labels = _labels_beside(Path(folder))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self._serve(input=np.asarray(images, dtype=np.float32))["predictions"].numpy()


def _model_input(images: np.ndarray, dtype: np.dtype, normalization=None) -> np.ndarray:
    """What an input tensor of ``dtype`` takes for float32 images of 0..255 pixels, as phone clients feed it.

    An integer input gets the pixel bytes as they are (int8: shifted by 128), as the Task Library and
    MediaPipe copy camera bytes into a uint8 tensor: the tensor's quantization *is* the normalization
    (Google's uint8 files: scale 1/127.5, zero point 127, so real = (pixel - 127) / 127.5; ktoolkit's:
    scale 1, zero point 0, the pixel itself). Quantizing 0..255 as if the pixels were the real values
    would saturate every byte at 255 on Google's files. A float input gets ``(pixel - mean) / std`` with
    the metadata's normalization, or the pixels as they are without one.
    """
    if dtype.kind in "iu":
        pixels = np.clip(np.round(images), 0, 255)
        return (pixels - 128 if dtype == np.int8 else pixels).astype(dtype)
    if normalization is not None:
        mean, std = normalization
        images = (images - mean) / std
    return np.asarray(images, dtype=dtype)


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
        results.append(
            {
                "threads": int(count),
                "runs": runs,
                "p50_ms": statistics.median(times),
                "p90_ms": float(np.percentile(times, 90)),
                "mean_ms": statistics.fmean(times),
                "min_ms": min(times),
            }
        )
    return results


def _progress(iterable, show: bool, what: str):
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=what, unit="run", leave=False)


def interleaved_latency(
    models, *, threads: int = 1, runs: int = 30, rounds: int = 5, warmup: int = 3, progress: bool = False
) -> list[dict]:
    """Single-image latency of several files measured together, round-robin, like a benchmark.

    Timing one file, then converting the next, then timing that one compares files under whatever else the
    machine was doing at each moment (under load a file can look 2x slower than it is). Here every file
    gets a runner first; then ``rounds`` times, in a rotating order, each file runs ``warmup`` untimed and
    about ``runs / rounds`` timed single-image inferences on a fixed random image, so every file is timed in
    every stretch of the measurement and a burst of load spreads over all of them. The result per file is
    the median (and p90, mean, min) over all its timed runs, plus the spread of the per-round medians.

    Args:
        models: paths (or anything :func:`open_model` takes) of the files to time together.
        threads: CPU threads of every runner.
        runs: timed runs per file in all (at least ``rounds``; rounded up to a multiple of it).
        rounds: repetitions of the round-robin.
        warmup: untimed runs per file at the start of each round (caches, XNNPACK's first-run packing).
        progress: a bar (count, rate, ETA) over the rounds' files.

    Returns:
        One dict per model, in ``models`` order: threads, runs, rounds, p50_ms, p90_ms, mean_ms, min_ms,
        round_p50_ms (min and max of the per-round medians), interleaved (True).
    """
    if not models:
        return []
    if runs < 1 or rounds < 1:
        raise ValueError(f"runs={runs}, rounds={rounds}: both must be >= 1.")
    rounds, per_round = min(rounds, runs), -(-runs // min(rounds, runs))
    runners = [open_model(model, threads=int(threads)) for model in models]
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 255, runner.input_shape).astype(np.float32) for runner in runners]
    times = [[[] for _ in range(rounds)] for _ in runners]
    order = [(r, k) for r in range(rounds) for k in range(len(runners))]
    for r, k in _progress(order, progress, "timing"):
        i = (k + r) % len(runners)  # rotate who goes first: no file always runs right after another
        for _ in range(warmup):
            runners[i].predict_one(images[i])
        for _ in range(per_round):
            start = time.perf_counter()
            runners[i].predict_one(images[i])
            times[i][r].append((time.perf_counter() - start) * 1000)
    results = []
    for per_file in times:
        flat = [t for chunk in per_file for t in chunk]
        medians = [statistics.median(chunk) for chunk in per_file]
        results.append(
            {
                "threads": int(threads),
                "runs": len(flat),
                "rounds": rounds,
                "p50_ms": statistics.median(flat),
                "p90_ms": float(np.percentile(flat, 90)),
                "mean_ms": statistics.fmean(flat),
                "min_ms": min(flat),
                "round_p50_ms": [min(medians), max(medians)],
                "interleaved": True,
            }
        )
    return results
