"""Keras to TFLite (with the converter's post-training quantization) and to a SavedModel folder.

Conversion uses TFLite's builtin operators only, never Select TF ops, so every file runs on the
plain Android and LiteRT runtimes. A layer that needs a TensorFlow op TFLite lacks is named in
the error, with the fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """The converter could not turn the model into builtin TFLite ops (the message says which layer)."""


def to_tflite(
    model, quantize: str | None = None, *, representative=None, int8_io: bool = False, progress: bool = False
) -> bytes:
    """Converts a tf_keras model to a .tflite flatbuffer.

    Args:
        model: the Keras model (float32; quantization-aware models carry their fake-quant ranges).
        quantize: None (float32), "float16", "dynamic", "int8" or "int16x8".
        representative: for "int8" and "int16x8": an array of calibration images (N, H, W, C),
            float32 on the model's input scale; fed one at a time.
        int8_io: for "int8": uint8 input and output tensors instead of float32, so the file takes
            camera bytes as they are (the Android Task Library and MediaPipe accept uint8 or float32
            image inputs, not int8). Inside, the model is int8 either way.
        progress: a progress bar over the calibration images.

    Returns:
        The .tflite file's bytes.

    Raises:
        ConversionError: an operation has no builtin TFLite kernel; the message names the layer.
    """
    import tensorflow as tf

    # From a traced function rather than from_keras_model, which first saves every layer's own
    # functions as a SavedModel (a third of the time for a MobileNet). Same graph, same names.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_serving_function(model)], model)
    converter.target_spec.supported_ops = _quantization(converter, quantize, representative, int8_io, progress)
    try:
        with warnings.catch_warnings(), _quiet_stderr(not progress):  # the progress bar is on stderr too
            warnings.simplefilter(
                "ignore"
            )  # "Statistics for quantized inputs were expected": the ranges come from calibration
            content = converter.convert()
    except Exception as err:  # the converter raises ConverterError and, for some graphs, other types
        missing = _missing_ops(str(err))
        if not missing:
            raise
        raise ConversionError(_explain(model, missing)) from None
    return compact(content)


def _quantization(converter, quantize, representative, int8_io: bool, progress: bool) -> list:
    """Sets ``converter``'s optimizations, types and calibration data for ``quantize``; returns the ops sets."""
    import tensorflow as tf

    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize in ("int8", "int16x8"):
        if representative is None or not len(representative):
            raise ValueError(f"quantize={quantize!r} needs representative images to calibrate on.")

        def samples():
            for image in calibration_progress(representative, progress):
                yield [image[None].astype("float32")]

        converter.representative_dataset = samples
        if quantize == "int8":
            ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if int8_io:
                converter.inference_input_type = tf.uint8
                converter.inference_output_type = tf.uint8
        else:
            ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    elif quantize not in (None, "dynamic"):
        raise ValueError(f"quantize={quantize!r}: use None, 'float16', 'dynamic', 'int8' or 'int16x8'.")
    return ops


def _sharing_builder_class():
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        """Writes each distinct small numeric vector once and points every table that has it there.

        Per-channel int8 quantization gives every weight and bias tensor a zero-point vector (int64, 8
        bytes a channel) that is all zeros: in MobileNetV2 that is 250 KB of identical vectors. Flatbuffers
        allow several tables to reference one vector, and the runtime only reads them, so they are shared
        (tensor shapes and equal scale vectors too). Weight buffers (uint8) are never shared.
        """

        def __init__(self, size):
            super().__init__(size)
            self._shared = {}

        def CreateNumpyVector(self, x):
            if x.dtype.kind == "u" and x.dtype.itemsize == 1:
                return super().CreateNumpyVector(x)
            key = (x.dtype.str, x.shape, x.tobytes())
            if key not in self._shared:
                self._shared[key] = super().CreateNumpyVector(x)
            return self._shared[key]

    return SharingBuilder


def sharing_builder(size: int):
    """A flatbuffers Builder that writes each distinct numeric vector once (see ``compact``)."""
    return _sharing_builder_class()(size)


def compact(tflite: bytes) -> bytes:
    """The same model, re-serialized with identical small vectors (quantization zero points, scales,
    shapes) stored once and shared: the runtime reads them the same way, and a per-channel int8
    MobileNetV2 is 6% smaller (250 KB of its 4.0 MB were all-zero zero-point vectors). Files over 2 GB,
    whose weights lie outside the flatbuffer, are returned as they are."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(tflite, 0))
    if any((b.offset or 0) > 1 for b in model.buffers or []):
        return tflite
    builder = sharing_builder(len(tflite) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@contextlib.contextmanager
def _quiet_stderr(quiet: bool = True):
    """Sends file descriptor 2 to /dev/null while the converter runs: its C++ code prints progress
    ("fully_quantize: 0, ...") and, on failure, the MLIR dump that the raised exception also holds.
    Logging at DEBUG level keeps it."""
    if not quiet or log.isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def calibration_progress(images, show: bool):
    """``images``, behind a progress bar when ``show``."""
    if not show:
        return images
    from tqdm import tqdm

    return tqdm(images, desc="calibrating", unit="image", leave=False)


def _missing_ops(message: str) -> list[str]:
    """TensorFlow op names that have no builtin TFLite kernel, from a converter error message."""
    names = re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", message)
    for line in re.findall(r"TF Select ops: ([^\n]+)", message):
        names += [n.strip() for n in line.split(",")]
    return sorted({n for n in names if n})


def _explain(model, missing: list[str]) -> str:
    culprits = layers_using_ops(model, missing)
    where = (
        "; ".join(f"layer {name!r} ({kind}) uses {', '.join(ops)}" for name, kind, ops in culprits)
        or f"the model uses {', '.join(missing)}"
    )
    return (
        f"TFLite has no builtin kernel for {', '.join(missing)}: {where}. The export uses builtin ops only (no "
        f"Select TF ops), so the file runs on the plain Android and LiteRT runtimes. Rewrite that layer with "
        f"operations TFLite supports (https://ai.google.dev/edge/litert/models/ops_compatibility), or leave "
        f"it out of the exported model."
    )


def layers_using_ops(model, op_types) -> list[tuple[str, str, list[str]]]:
    """(layer name, layer class, op types) of the layers whose computation contains ``op_types``.

    Each leaf layer is traced on its own input shape; nested models are searched too.
    """
    import tensorflow as tf

    wanted = set(op_types)
    found = []
    for layer in _leaf_layers(model):
        try:
            specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), layer.input)
            graph = tf.function(lambda x, layer=layer: layer(x)).get_concrete_function(specs).graph
        except Exception as err:  # noqa: BLE001  (a layer that cannot be traced alone; the message still names the ops)
            log.debug("could not trace layer %r alone: %s", layer.name, err)
            continue
        used = sorted({op.type for op in graph.get_operations()} & wanted)
        if used:
            found.append((layer.name, type(layer).__name__, used))
    return found


def _leaf_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _leaf_layers(layer)
        elif type(layer).__name__ != "InputLayer":
            yield layer


def to_saved_model(model, folder) -> None:
    """Writes a SavedModel folder with one signature, ``serving_default(input) -> {"predictions"}``."""
    import tensorflow as tf

    tf.saved_model.save(model, str(folder), signatures={"serving_default": _serving_function(model)})


def _serving_function(model):
    """``model`` as a concrete function: ``input`` (batch, height, width, channels) float32 ->
    ``{"predictions": probabilities}`` (the names every exported file uses)."""
    import tensorflow as tf

    height, width, channels = model.input_shape[1:]
    spec = tf.TensorSpec((None, height, width, channels), tf.float32, name="input")
    return tf.function(lambda x: {"predictions": model(x, training=False)}).get_concrete_function(spec)
