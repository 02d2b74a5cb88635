"""Keras to TFLite (with the converter's post-training quantization) and to a SavedModel folder.

Conversion uses TFLite's builtin operators only, never Select TF ops, so every file runs on the
plain Android and LiteRT runtimes. A layer that needs a TensorFlow op TFLite lacks is named in
the error, with the fix.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings

import numpy as np

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """The converter could not turn the model into builtin TFLite ops (the message says which layer)."""


def to_tflite(
    model,
    quantize: str | None = None,
    *,
    representative=None,
    int8_io: bool = False,
    progress: bool = False,
    fold_normalization: bool = False,
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
        fold_normalization: for "int8" models with an ``ImagePreprocessing`` layer: keep the
            normalization out of the int8 graph (:func:`int8_normalization_outside`): with uint8 input
            and a scalar normalization the input's quantization is the normalization, as in Google's
            own int8 files; else it is folded into the first convolution where that is exact, else
            done in float before the first QUANTIZE. Either way the file still takes 0..255 pixels.

    Returns:
        The .tflite file's bytes.

    Raises:
        ConversionError: an operation has no builtin TFLite kernel; the message names the layer.
    """
    if fold_normalization and quantize == "int8":
        from tflite_export.prepare import normalization_of, preprocessing_reads_input

        norm = normalization_of(model)
        if norm is not None and preprocessing_reads_input(model):
            return int8_normalization_outside(model, norm, representative, int8_io=int8_io, progress=progress)
        if norm is not None:
            log.warning(
                "%s: its ImagePreprocessing does not take the model's input; it stays in the int8 graph", model.name
            )
    return _convert(model, quantize, representative, (int8_io, int8_io), progress)


def _convert(model, quantize, representative, uint8_io: tuple[bool, bool], progress: bool) -> bytes:
    """``to_tflite`` without the normalization handling; ``uint8_io``: (uint8 input, uint8 output) for int8."""
    import tensorflow as tf

    # From a traced function rather than from_keras_model, which first saves every layer's own
    # functions as a SavedModel (a third of the time for a MobileNet). Same graph, same names.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_serving_function(model)], model)
    converter.target_spec.supported_ops = _quantization(converter, quantize, representative, uint8_io, progress)
    try:
        with warnings.catch_warnings(), _quiet_stderr(), _elapsed(progress, "converting"):  # bars still show
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


def _quantization(converter, quantize, representative, uint8_io: tuple[bool, bool], progress: bool) -> list:
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
            if uint8_io[0]:
                converter.inference_input_type = tf.uint8
            if uint8_io[1]:
                converter.inference_output_type = tf.uint8
        else:
            ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    elif quantize not in (None, "dynamic"):
        raise ValueError(f"quantize={quantize!r}: use None, 'float16', 'dynamic', 'int8' or 'int16x8'.")
    return ops


def int8_normalization_outside(model, norm, representative, *, int8_io: bool = False, progress: bool = False) -> bytes:
    """A full-integer int8 file of ``model`` whose ``ImagePreprocessing`` (``norm``) is not int8 arithmetic.

    Left in the graph, the normalization becomes an int8 MUL and ADD whose output is quantized over a
    calibrated range wider than the pixels' (measured on MobileNetV2 with "tf": [-1, 2], so only 171 of
    the 256 pixel values reach the first convolution), and the file was slower and less faithful than
    Google's own int8 MobileNetV2. Instead, in this order of preference:

    1. uint8 input and a scalar normalization ("tf", "unit", one channel): the model is converted
       without the layer, and the uint8 input's quantization *is* the normalization (``real = scale *
       (pixel - zero_point)``: "tf" 1/127.5 and 127 or 128, "unit" 1/255 and 0). The file takes
       camera bytes exactly as Google's does; all 256 values reach the first convolution.
    2. the first convolution reads no padding: the normalization is folded into its kernel and bias
       (exact, see :func:`tflite_export.prepare.first_conv_fold`); the file takes pixels, uint8 with
       scale 1 and zero point 0 or float32.
    3. otherwise (e.g. "torch" or "caffe" before a "same" convolution, whose zero padding is the mean
       pixel): float ops before the first QUANTIZE: [DEQUANTIZE from uint8,] [REVERSE_V2,] MUL, ADD,
       then QUANTIZE, so the int8 graph starts from the exactly normalized image.

    Args:
        model: the Keras model with its ``ImagePreprocessing`` layer (left unchanged afterwards).
        norm: that layer's :class:`~tflite_export.prepare.Normalization`.
        representative: calibration images, 0..255 pixels (N, H, W, C).
        int8_io: uint8 input and output tensors (else float32).
        progress: a progress bar over the calibration images.
    """
    from tflite_export.prepare import first_conv_fold, preprocessing_bypassed, weights_replaced

    if representative is None or not len(representative):
        raise ValueError("quantize='int8' needs representative images to calibrate on.")
    if norm.scalar and int8_io:
        with preprocessing_bypassed(model):
            content = _convert(model, "int8", norm.apply(representative), (True, True), progress)
        return set_input_quantization(content, norm.scale[0], -norm.offset[0] / norm.scale[0])
    fold = first_conv_fold(model, norm)
    if fold is not None:
        conv, kernel, bias = fold
        with preprocessing_bypassed(model), weights_replaced(conv, [kernel, bias]):
            content = _convert(model, "int8", np.asarray(representative, np.float32), (int8_io, int8_io), progress)
        return set_input_quantization(content, 1.0, 0.0) if int8_io else content
    with preprocessing_bypassed(model):
        content = _convert(model, "int8", norm.apply(representative), (False, int8_io), progress)
    return prepend_normalization(content, norm, uint8_input=int8_io)


def _model_object(tflite: bytes):
    from ai_edge_litert import schema_py_generated as schema

    return schema.ModelT.InitFromObj(schema.Model.GetRootAs(tflite, 0))


def _pack(model) -> bytes:
    builder = sharing_builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _builtin(model, op) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _consumers(graph, tensor: int) -> list:
    return [op for op in graph.operators if op.inputs is not None and tensor in list(op.inputs)]


def set_input_quantization(tflite: bytes, scale: float, zero_point: float) -> bytes:
    """The file with its uint8 input tensor quantized as ``real = scale * (q - zero_point)``.

    The input of a full-integer file goes through a QUANTIZE op (uint8 to int8) that re-scales from the
    input's parameters to the int8 tensor's, so the input's parameters can be set to what the pixels
    mean without touching the graph. When calibration saw the whole range, the converter already chose
    them (``zero_point`` 127.5 gives the converter's 127 or 128, whichever its rounding made) and they
    are kept; else they are set, ``zero_point`` rounded, and the QUANTIZE re-scales.

    Raises:
        ValueError: the input is not uint8 or feeds something other than QUANTIZE.
    """
    from ai_edge_litert import schema_py_generated as schema

    model = _model_object(tflite)
    graph = model.subgraphs[0]
    tensor = graph.tensors[graph.inputs[0]]
    kinds = {_builtin(model, op) for op in _consumers(graph, graph.inputs[0])}
    if tensor.type != schema.TensorType.UINT8 or kinds != {schema.BuiltinOperator.QUANTIZE}:
        raise ValueError("set_input_quantization needs a full-integer file with a uint8 input that feeds QUANTIZE.")
    q = tensor.quantization
    old_scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else 0.0
    old_zero = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else -1
    if abs(old_scale - scale) <= 1e-6 * scale and abs(old_zero - zero_point) <= 0.5:
        return tflite
    params = schema.QuantizationParametersT()
    params.scale, params.zeroPoint = [float(scale)], [int(round(zero_point))]
    tensor.quantization = params
    return _pack(model)


def prepend_normalization(tflite: bytes, norm, *, uint8_input: bool = False) -> bytes:
    """The file with ``norm`` computed in float32 before everything else: the float32 input (which
    took normalized values) becomes a pixel input followed by [REVERSE_V2,] MUL and ADD, whose result
    goes where the input went (the QUANTIZE of a full-integer file). With ``uint8_input`` the input is
    uint8 pixels (scale 1, zero point 0) and a DEQUANTIZE comes first. Scalar normalizations get scalar
    constants."""
    from ai_edge_litert import schema_py_generated as schema

    model = _model_object(tflite)
    graph = model.subgraphs[0]
    source = graph.inputs[0]
    if graph.tensors[source].type != schema.TensorType.FLOAT32:
        raise ValueError("prepend_normalization needs a file with a float32 input.")
    consumers = _consumers(graph, source)
    ops, x = [], source
    if uint8_input:
        x = _add_step(model, graph, ops, "DEQUANTIZE", [x], None, "input_pixels")
        _set_uint8_pixels(graph.tensors[source])
    if norm.reverse:
        axis = _add_constant(model, graph, np.array([3], np.int32), "normalization/axis")
        x = _add_step(model, graph, ops, "REVERSE_V2", [x, axis], "ReverseV2Options", "normalization/bgr")
    shape = () if norm.scalar else (len(norm.scale),)
    for kind, values, options, identity in (
        ("MUL", norm.scale, "MulOptions", 1.0),
        ("ADD", norm.offset, "AddOptions", 0.0),
    ):
        if all(v == identity for v in values):
            continue  # "caffe" only subtracts
        constant = _add_constant(
            model, graph, np.resize(np.asarray(values, np.float32), shape), f"normalization/{kind}"
        )
        x = _add_step(model, graph, ops, kind, [x, constant], options, f"normalization/{kind.lower()}")
    for op in consumers:
        op.inputs = [x if i == source else i for i in op.inputs]
    graph.operators = ops + list(graph.operators)
    return _pack(model)


def _set_uint8_pixels(tensor) -> None:
    from ai_edge_litert import schema_py_generated as schema

    params = schema.QuantizationParametersT()
    params.scale, params.zeroPoint = [1.0], [0]
    tensor.type, tensor.quantization = schema.TensorType.UINT8, params


def _add_constant(model, graph, values: np.ndarray, name: str) -> int:
    """Appends a constant tensor (with its buffer) to ``graph``; returns its index."""
    from ai_edge_litert import schema_py_generated as schema

    buffer = schema.BufferT()
    buffer.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), dtype=np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape = np.asarray(values.shape, np.int32)
    tensor.type = {np.dtype(np.float32): schema.TensorType.FLOAT32, np.dtype(np.int32): schema.TensorType.INT32}[
        values.dtype
    ]
    tensor.buffer, tensor.name = len(model.buffers) - 1, name.encode()
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _add_step(model, graph, ops: list, kind: str, inputs: list, options: str | None, name: str) -> int:
    """Appends to ``ops`` a ``kind`` operator on ``inputs`` (its output a float32 tensor shaped like the
    graph's input); returns the output tensor's index."""
    import copy

    from ai_edge_litert import schema_py_generated as schema

    like = graph.tensors[graph.inputs[0]]
    out = schema.TensorT()
    out.shape, out.shapeSignature = copy.copy(like.shape), copy.copy(like.shapeSignature)
    out.type, out.name, out.buffer = schema.TensorType.FLOAT32, name.encode(), 0
    graph.tensors.append(out)
    op = schema.OperatorT()
    op.opcodeIndex = _opcode(model, getattr(schema.BuiltinOperator, kind))
    op.inputs, op.outputs = list(inputs), [len(graph.tensors) - 1]
    if options:
        op.builtinOptionsType = getattr(schema.BuiltinOptions, options)
        op.builtinOptions = getattr(schema, f"{options}T")()
    ops.append(op)
    return len(graph.tensors) - 1


def _opcode(model, builtin: int) -> int:
    """The index of ``builtin``'s operator code in the model (added, version 1, when missing)."""
    from ai_edge_litert import schema_py_generated as schema

    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:  # any version runs float32
            return index
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


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
def _quiet_stderr():
    """Hides what the converter's C++ code prints ("fully_quantize: 0, inference_type: 6, ...") while it
    runs; Python's stderr (the calibration progress bar, log lines) still shows. A failure does not replay
    them: they are the MLIR dump the raised exception also holds. ``ktool -v`` (DEBUG logging) shows them."""
    from tflite_export.quiet import native_output_hidden

    with native_output_hidden(replay=False):
        yield


@contextlib.contextmanager
def _elapsed(show: bool, what: str, delay: float = 2.0):
    """While the block runs (the converter is one blocking call with no count to show), a line with the
    seconds elapsed, from ``delay`` seconds on (after the calibration bar, which draws its samples first)."""
    if not show:
        yield
        return
    import threading

    from tqdm import tqdm

    stop, bars = threading.Event(), []

    def tick():
        if stop.wait(delay):
            return
        bars.append(tqdm(desc=what, bar_format="{desc}: {elapsed} elapsed", leave=False))
        while not stop.wait(1.0):
            bars[0].refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for bar in bars:
            bar.close()


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
