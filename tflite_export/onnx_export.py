"""Keras to ONNX with tf2onnx, for TensorRT on a Jetson (and onnxruntime anywhere).

The graph keeps the Keras model's interface: input ``input`` of shape (batch, height, width,
channels), float32 RGB pixels 0..255 (normalization is inside), output ``predictions`` with the
class probabilities. The batch dimension is named "batch" and dynamic. Class names and the input
convention are stored in the model's metadata_props, where onnxruntime and Netron show them.

int8 files are QuantizeLinear/DequantizeLinear (QDQ) graphs in the form TensorRT builds INT8 engines
from: symmetric int8 everywhere (zero points 0, which TensorRT requires), weights per output channel,
biases kept float (TensorRT's ONNX parser has rejected int32 bias DequantizeLinear nodes), and the
model's input, in-model normalization and softmax output kept float, so the raw 0..255 pixels are
never quantized (symmetric over 0..255 they would lose every other pixel level). Two ways there:

- :func:`quantize_int8`: post-training, onnxruntime's static quantization with ranges calibrated on
  training images by a histogram method (:data:`CALIBRATION`) rather than min/max, which one outlier
  stretches; the logits feeding the softmax stay float too (int8 steps would tie close classes).
  Symmetric int8 gives one-sided tensors (every ReLU6 output) 128 levels instead of 256, so the bounded
  activations are first centered about zero, exactly (:func:`center_clips`): on a MobileNetV2 flowers5
  run that took the drop from 1.6 to 0.2 points, with 17 explicit Pads more (onnxruntime then ran the
  file at 2.0x float32's time, against 1.4x). ``symmetric=False`` writes a uint8 form for onnxruntime
  alone, which TensorRT cannot build (``ktool export --onnx-target onnxruntime``).
- :func:`qat_to_qdq`: a tfmot quantization-aware model, whose fake-quantization ops tf2onnx turns
  into uint8 QDQ pairs (the learned ranges) and whose weights it folds onto their int8 grid; the
  pairs are made symmetric int8 over the learned range and the weights get int8 DequantizeLinear.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17

# Calibration of the activation ranges: "percentile" clips the top 0.001% of each tensor's magnitudes,
# "entropy" picks the range whose quantized histogram loses the least information (KL divergence, as
# TensorRT's entropy calibrator), "minmax" keeps every value. Top-1 agreement with the float model,
# symmetric int8, onnxruntime 1.31: LeNet-5 on 360 digits 0.997 for all three; the ImageNet MobileNetV2
# on 500 flowers5 photos, 200 calibration images, percentile 0.62, min/max 0.59, entropy 0.39 (it clips
# the ReLU6 outputs); a MobileNetV2 + linear head flowers5 run (128x128, 431 test images) percentile
# 0.914, min/max 0.923 (4 images apart). Percentile is the default: never far behind, and safe against
# a single outlier, which min/max is not.
CALIBRATIONS = ("percentile", "entropy", "minmax")
CALIBRATION = "percentile"
PERCENTILE = 99.999
HISTOGRAM_BINS = 2048  # histogram of the magnitudes for percentile, of the signed values for entropy
ENTROPY_QUANTIZED_BINS = 255  # int8's levels across [-T, T]
CALIBRATION_CHUNK = 16  # images per calibration pass: bounds the memory the intermediate tensors take

WEIGHTED = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# What the in-model normalization and layout changes become before the first weighted layer: kept float.
NORMALIZATION_OPS = frozenset(
    {"Mul", "Add", "Sub", "Div", "Reshape", "Transpose", "Cast", "Identity", "Unsqueeze", "Squeeze", "Pad"}
    | {"Slice", "Gather", "Split", "Concat", "ReverseSequence"}  # a channel flip (BGR models)
)
# Ops whose output is a graph output that stays float (probabilities).
OUTPUT_OPS = frozenset({"Softmax", "Sigmoid"})


def to_onnx(model, *, labels, description: str = "") -> bytes:
    """Converts a tf_keras model to ONNX bytes (opset :data:`OPSET`)."""
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    height, width, channels = model.input_shape[1:]
    spec = [tf.TensorSpec((None, height, width, channels), tf.float32, name="input")]
    serve = tf.function(lambda x: model(x, training=False), input_signature=spec).get_concrete_function()
    # Frozen here rather than by tf2onnx's from_function, which takes every captured tensor for an input:
    # tfmot's sparsity-preserving QAT captures its masks, and the file then wanted them fed at run time.
    frozen = convert_variables_to_constants_v2(serve, lower_control_flow=False, aggressive_inlining=True)
    source, target = frozen.inputs[0].name, frozen.outputs[0].name
    quiet = tf.get_logger()
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # tf2onnx's TF1 freezing calls log deprecations
    try:
        proto, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(add_shapes=True),
            input_names=[source],
            output_names=[target],
            opset=OPSET,
            tensors_to_rename={source: "input", target: "predictions"},
        )
    finally:
        quiet.setLevel(level)
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    for key, value in {
        "labels": json.dumps(list(labels)),
        "input": "float32 RGB pixels 0..255, NHWC; the model normalizes them itself",
        "description": description,
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def quantize_int8(
    content: bytes,
    representative,
    *,
    calibration: str = CALIBRATION,
    symmetric: bool = True,
    center: bool = True,
    progress: bool = False,
) -> bytes:
    """Statically quantizes a float ONNX classifier to TensorRT-style int8 QDQ (see the module docstring).

    Args:
        content: the float model's bytes (from :func:`to_onnx`).
        representative: calibration images, (N, H, W, C) float32 on the 0..255 scale.
        calibration: how activation ranges are set, one of :data:`CALIBRATIONS`.
        symmetric: symmetric int8 activations (zero points 0), the only kind TensorRT builds. False:
            asymmetric uint8 activations, for onnxruntime only (``ktool export --onnx-target onnxruntime``).
            On a MobileNetV2 + linear head flowers5 run (128x128, 431 test images, onnxruntime CPU), the
            symmetric file (centered, the default) had an accuracy drop of +0.23 points, top-1 agreement
            with the Keras model 93.7%, at about 2.0x float32's latency; the asymmetric one -0.46 points
            (2 images more right), 95.8%, at 0.56x float32's. Symmetric is the default because it is the
            form a Jetson's TensorRT runs.
        center: with ``symmetric``, center the bounded activations (ReLU6) on their calibrated ranges,
            exactly (:func:`center_clips`): all 256 levels for them in TensorRT's form too. A MobileNetV2 +
            linear head flowers5 run (128x128, 431 test images, 200 calibration images): KL divergence
            from the float probabilities 0.011 against 0.032, top-1 agreement 0.937 against 0.912.
        progress: log each calibration chunk with the elapsed time.

    Returns:
        The int8 model's bytes; it passes ``onnx.checker`` and :func:`int8_problems` finds nothing.
    """
    import onnx
    from onnxruntime import quantization as oq

    method = _method(calibration)
    with tempfile.TemporaryDirectory(prefix="ktoolkit-onnx-") as tmp:
        pre, out, cache = _prepared(content, Path(tmp)), Path(tmp, "int8.onnx"), Path(tmp, "ranges.json")
        ranges = _calibrate(pre, representative, method, Path(tmp), progress)
        if center and symmetric:
            ranges = _center_prepared(pre, ranges)
        graph = onnx.load(str(pre)).graph
        kept_float = float_head(graph) + float_tail(graph)
        oq.calibrate.save_tensors_data(ranges, cache)
        oq.quantize_static(
            str(pre),
            str(out),
            None,
            quant_format=oq.QuantFormat.QDQ,
            per_channel=True,
            activation_type=oq.QuantType.QInt8 if symmetric else oq.QuantType.QUInt8,
            weight_type=oq.QuantType.QInt8,
            nodes_to_exclude=kept_float,
            calibrate_method=method,
            calibration_cache_path=str(cache),
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": False},
        )
        result = onnx.load(str(out))
    _unquantize_inputs(result.graph, float_tail(result.graph))  # int8 logits would tie close classes
    _drop_unused_initializers(result.graph)
    return _checked(result, symmetric=symmetric)


def center_clips(model, ranges: dict | None = None) -> dict:
    """Re-centers each bounded activation (a Clip such as ReLU6) about zero, exactly, so that symmetric int8
    spends all 256 levels on the values it takes.

    Symmetric int8 spends half its levels on negative values a ReLU6 output never takes: 0..6 gets 128
    steps of 6/127. A Clip(a, b) fed by a Conv becomes Clip(a - c, b - c), the Conv's bias lowered by c,
    and every Conv that reads the clipped tensor gets c * (sum of each output channel's weights) added to
    its bias, which puts back what the shift took away (the "bias absorption" of Nagel et al. 2019,
    "Data-Free Quantization", carried into the clip's bounds). Zero padding would then pad with -c where
    the float model padded 0, so a reading Conv's padding becomes an explicit Pad with value -c (an
    existing Pad gets that value). Every step is exact in float; the file stays symmetric int8 with zero
    points 0 (TensorRT's form). A Clip is left alone unless all of this holds: constant finite bounds, a
    Conv with constant weights as its only producer, only Convs (directly or behind a constant-mode
    zero Pad) reading it, explicit padding (no auto_pad SAME), and neither tensor a graph output.

    Args:
        model: an ONNX ModelProto, changed in place.
        ranges: the calibrated (low, high) of tensors by name; a Clip whose output has one is centered on
            the part of [a, b] it covers (a ReLU6 that stays below 2 on [0, 2], so that it keeps 1/127
            steps), one without on [a, b].

    Returns:
        The symmetric (low, high) of every tensor that now holds a centered value (the Clip's input and
        output, and the Pads' outputs), by name: the ranges to quantize them with.
    """
    graph, shifted = model.graph, {}
    plans = [plan for clip in [n for n in graph.node if n.op_type == "Clip"] if (plan := _centering(graph, clip))]
    for clip, producer, (low, high), readers in plans:
        if ranges is not None and clip.output[0] in ranges:
            seen = [float(np.asarray(v).reshape(-1)[0]) for v in ranges[clip.output[0]]]
            low, high = max(low, seen[0]), min(high, seen[1])
        if not high > low:
            continue  # a Clip the calibration images never reach inside its bounds: nothing to center
        names = _apply_centering(graph, clip, producer, (low + high) / 2, readers)
        shifted.update(dict.fromkeys(names, ((low - high) / 2, (high - low) / 2)))
    return shifted


def _centering(graph, clip):
    """(clip, producer Conv, bounds, readers) when ``clip`` can be centered exactly (see :func:`center_clips`),
    else None; readers are (Conv, None) or (Pad, the Convs reading the Pad)."""
    bounds = [_constant(graph, name) for name in clip.input[1:3]]
    if len(bounds) != 2 or any(b is None or b.size != 1 or not np.isfinite(b).all() for b in bounds):
        return None
    low, high = (float(b) for b in bounds)
    if low + high == 0:
        return None  # already symmetric
    outputs, consumers = {o.name for o in graph.output}, _consumers(graph)
    producer = next((n for n in graph.node if clip.input[0] in n.output), None)
    if producer is None or not _takes_bias(graph, producer, None) or len(consumers[clip.input[0]]) != 1:
        return None
    readers, plan = consumers.get(clip.output[0], []), []
    if not readers or {clip.input[0], clip.output[0]} & outputs:
        return None
    for reader in readers:
        if _takes_bias(graph, reader, clip.output[0]):
            plan.append((reader, None))
            continue
        padded = consumers.get(reader.output[0], []) if reader.op_type == "Pad" else []
        value = _constant(graph, reader.input[2]) if len(reader.input) > 2 and reader.input[2] else np.zeros(1)
        mode = next((a.s for a in reader.attribute if a.name == "mode"), b"constant")
        if not padded or mode != b"constant" or value is None or np.any(value != 0) or reader.output[0] in outputs:
            return None
        if not all(_takes_bias(graph, conv, reader.output[0], padding=False) for conv in padded):
            return None
        plan.append((reader, padded))
    return clip, producer, (low, high), plan


def _takes_bias(graph, node, source, *, padding: bool = True) -> bool:
    """Whether ``node`` is a Conv with a constant weight whose bias can absorb a shift of its input ``source``
    (None: of its output): explicit padding (none when not ``padding``), ``source`` its data input alone."""
    if node.op_type != "Conv" or len(node.input) < 2 or _constant(graph, node.input[1]) is None:
        return False
    if source is None:
        return True
    pads = next((list(a.ints) for a in node.attribute if a.name == "pads"), [])
    auto = next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
    return (
        node.input[0] == source
        and source not in node.input[1:]
        and auto in (b"NOTSET", b"VALID")
        and (padding or not any(pads))
    )


def _apply_centering(graph, clip, producer, shift: float, readers) -> list[str]:
    """Shifts ``clip``'s tensor by -``shift`` (see :func:`center_clips`): the bounds, the producer's bias, the
    readers' biases, and the readers' zero padding, as a Pad with value -``shift``. Returns the names of the
    tensors that hold the shifted values."""
    from onnx import helper

    shift = np.float32(shift)
    low, high = (float(_constant(graph, name)) for name in clip.input[1:3])
    _add_to_bias(graph, producer, -shift, weighted=False)
    clip.input[1] = _new_constant(graph, f"{clip.name}_centered_min", np.array(low - shift, np.float32))
    clip.input[2] = _new_constant(graph, f"{clip.name}_centered_max", np.array(high - shift, np.float32))
    names = [clip.input[0], clip.output[0]]
    for reader, padded in readers:
        if padded is not None:  # an existing Pad: pads with -c now
            value = _new_constant(graph, f"{reader.name}_centered_value", np.array(-shift, np.float32))
            del reader.input[2:]
            reader.input.append(value)
            names.append(reader.output[0])
            for conv in padded:
                _add_to_bias(graph, conv, shift, weighted=True)
            continue
        _add_to_bias(graph, reader, shift, weighted=True)
        attribute = next((a for a in reader.attribute if a.name == "pads"), None)
        if attribute is None or not any(attribute.ints):
            continue
        half = len(attribute.ints) // 2
        pads = [0, 0, *attribute.ints[:half], 0, 0, *attribute.ints[half:]]
        inputs = [
            reader.input[0],
            _new_constant(graph, f"{reader.name}_centered_pads", np.array(pads, np.int64)),
            _new_constant(graph, f"{reader.name}_centered_value", np.array(-shift, np.float32)),
        ]
        padded_name = f"{reader.name}_centered_padded"
        pad = helper.make_node("Pad", inputs, [padded_name], name=f"{reader.name}_centered_pad", mode="constant")
        graph.node.insert(list(graph.node).index(reader), pad)
        reader.input[0] = padded_name
        names.append(padded_name)
        del attribute.ints[:]
        attribute.ints.extend([0] * (2 * half))
    return names


def _add_to_bias(graph, conv, shift, *, weighted: bool) -> None:
    """Adds ``shift`` to ``conv``'s bias (``weighted``: ``shift`` times the sum of each output channel's
    weights, what a shift of the input by ``shift`` takes away); a new initializer, never a shared one."""
    weights = _constant(graph, conv.input[1]).astype(np.float64)
    bias = _constant(graph, conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    bias = np.zeros(weights.shape[0]) if bias is None else bias.astype(np.float64)
    delta = shift * weights.reshape(weights.shape[0], -1).sum(axis=1) if weighted else shift
    name = _new_constant(graph, f"{conv.name}_centered_bias", (bias + delta).astype(np.float32))
    if len(conv.input) > 2:
        conv.input[2] = name
    else:
        conv.input.append(name)


def _constant(graph, name):
    """The value of the initializer or Constant node output ``name``, or None when it is neither."""
    from onnx import numpy_helper

    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _new_constant(graph, stem: str, value) -> str:
    """Adds ``value`` as an initializer under a name starting with ``stem`` that no tensor has yet; returns it."""
    from onnx import numpy_helper

    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    name, index = stem, 1
    while name in taken:
        name, index = f"{stem}_{index}", index + 1
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _prepared(content: bytes, tmp: Path) -> Path:
    """Writes ``content`` into ``tmp`` and runs onnxruntime's pre-processing on it; returns the result's path."""
    from onnxruntime import quantization as oq

    source, prepared = tmp / "float.onnx", tmp / "pre.onnx"
    source.write_bytes(content)
    oq.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    return prepared


def _center_prepared(path: Path, ranges):
    """Centers the bounded activations of the model at ``path`` (rewritten) on their calibrated ``ranges``
    (:func:`center_clips`); returns the ranges for the changed model, the centered tensors' symmetric."""
    import onnx
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    model = onnx.load(str(path))
    calibrated = {name: data.range_value for name, data in ranges.items()}
    shifted = center_clips(model, calibrated)
    _drop_unused_initializers(model.graph)
    onnx.save(model, str(path))
    log.info("ONNX int8: %d tensor(s) of bounded activations centered about zero", len(shifted))
    merged = {**calibrated, **shifted}
    return TensorsData(
        ranges.calibration_method,
        {name: TensorData(lowest=np.float32(low), highest=np.float32(high)) for name, (low, high) in merged.items()},
    )


def _unquantize_inputs(graph, names) -> None:
    """Removes the Q/DQ pairs in front of the nodes called ``names`` (the softmax: its logits stay float)."""
    producers = {output: node for node in graph.node for output in node.output}
    consumers = _consumers(graph)
    for node in [n for n in graph.node if n.name in names]:
        dequantize = producers.get(node.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = producers.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        if len(consumers[quantize.output[0]]) == 1 and len(consumers[dequantize.output[0]]) == 1:
            _bypass(graph, quantize, dequantize)


def _method(calibration: str):
    """onnxruntime's CalibrationMethod called ``calibration`` (one of :data:`CALIBRATIONS`)."""
    from onnxruntime import quantization as oq

    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration={calibration!r}: use one of {', '.join(CALIBRATIONS)}.")
    names = {"percentile": "Percentile", "entropy": "Entropy", "minmax": "MinMax"}
    return getattr(oq.CalibrationMethod, names[calibration])


def _calibrate(model_path: Path, images, method, tmp: Path, progress: bool):
    """The activation ranges of ``model_path`` on ``images``, collected :data:`CALIBRATION_CHUNK` images
    at a time (onnxruntime keeps every intermediate tensor of a pass in memory)."""
    from onnxruntime import quantization as oq

    options = {
        oq.CalibrationMethod.Percentile: {"num_bins": HISTOGRAM_BINS, "percentile": PERCENTILE, "symmetric": True},
        oq.CalibrationMethod.Entropy: {"num_bins": HISTOGRAM_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
        oq.CalibrationMethod.MinMax: {"symmetric": True},
    }[method]
    calibrator = oq.create_calibrator(
        model_path,
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=method,
        extra_options=options,
    )
    images = np.asarray(images, dtype="float32")
    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints each step; the CLI shows its own lines
        for start in range(0, len(images), CALIBRATION_CHUNK):
            calibrator.collect_data(_Images(images[start : start + CALIBRATION_CHUNK]))
            if progress:
                done = min(start + CALIBRATION_CHUNK, len(images))
                log.info("ONNX int8 calibration: %d/%d images, %.0f s", done, len(images), time.time() - started)
        if method == oq.CalibrationMethod.Entropy:  # onnxruntime's own search loops in Python over every bin
            histograms = calibrator.collector.histogram_dict
            ranges = oq.calibrate.TensorsData(
                method, {name: entropy_range(h[0], h[1]) + tuple(h[:2]) for name, h in histograms.items()}
            )
        else:
            ranges = calibrator.compute_data()
    del calibrator  # closes its session before the folder goes
    return ranges


def entropy_range(hist, edges, levels: int = ENTROPY_QUANTIZED_BINS) -> tuple:
    """The symmetric range (-T, T) whose quantization into ``levels`` steps loses the least information
    about the histogram (``hist`` over ``edges``, symmetric about 0): the threshold T that minimizes the
    KL divergence between the clipped distribution and its quantized copy (Migacz, "8-bit inference
    with TensorRT", GTC 2017), searched over every bin from ``levels`` bins wide to the whole histogram."""
    hist = np.asarray(hist, np.float64).copy()
    bins, zero = len(hist), len(hist) // 2
    # The bins at 0 hold every zero a ReLU made: counted, they outweigh the whole distribution's tail and
    # the search clips ReLU6 outputs at a quarter of their range. As NVIDIA's pytorch-quantization
    # does, they count as much as their neighbours.
    hist[zero - 1], hist[zero] = hist[zero - 2], hist[zero + 1]
    best, best_half = np.inf, zero
    for half in range((levels + 1) // 2, zero + 1):
        start, end = zero - half, min(zero + half, bins)
        p = hist[start:end].copy()
        p[0] += hist[:start].sum()
        p[-1] += hist[end:].sum()
        nonzero = p > 0
        groups = np.minimum(np.arange(len(p)) * levels // len(p), levels - 1)
        counts = np.bincount(groups, weights=hist[start:end], minlength=levels)
        occupied = np.bincount(groups, weights=nonzero, minlength=levels)
        q = np.where(nonzero, counts[groups] / np.maximum(occupied[groups], 1), 0.0)
        divergence = _kl(p, q)
        if divergence < best:
            best, best_half = divergence, half
    threshold = float(max(abs(edges[zero - best_half]), abs(edges[min(zero + best_half, bins)])))
    return (np.array(-threshold, np.float32), np.array(threshold, np.float32))


def _kl(p, q, eps: float = 1e-4) -> float:
    """KL(p || q) of two histograms, both smoothed (zeros get ``eps``), inf when q has no mass."""
    if q.sum() == 0 or p.sum() == 0:
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    q = np.where(q > 0, q, eps)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class _Images:
    """onnxruntime's CalibrationDataReader protocol over an array of images, one per run."""

    def __init__(self, images):
        self._images = iter(images)

    def get_next(self):
        image = next(self._images, None)
        return None if image is None else {"input": image[None]}


def float_head(graph) -> list[str]:
    """Names of the nodes that stay float at the input: those between the graph input and the first
    weighted layer (the normalization, layout changes), so that the first quantized tensor is the
    normalized image; and, when a weighted layer reads the raw pixels themselves (no normalization in the
    model), that layer too, since symmetric int8 over 0..255 would keep only every other pixel level."""
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    raw = {i.name for i in graph.input}  # pixels as given, or only moved around
    normalized = set()  # computed from the pixels by arithmetic
    head = []
    for node in graph.node:  # topological order
        data = [i for i in node.input if i and i not in constants]
        if not data or not all(i in raw or i in normalized for i in data):
            continue
        if node.op_type in NORMALIZATION_OPS:
            arithmetic = node.op_type in ("Mul", "Add", "Sub", "Div") or any(i in normalized for i in data)
            (normalized if arithmetic else raw).update(node.output)
            head.append(node.name)
        elif node.op_type in WEIGHTED and any(i in raw for i in data):
            head.append(node.name)
    return head


def float_tail(graph) -> list[str]:
    """Names of the nodes that compute a graph output from the logits (softmax): they stay float."""
    outputs = {o.name for o in graph.output}
    return [n.name for n in graph.node if n.op_type in OUTPUT_OPS and set(n.output) & outputs]


def qat_to_qdq(content: bytes) -> bytes:
    """Turns tf2onnx's conversion of a tfmot quantization-aware model into TensorRT-style int8 QDQ.

    tf2onnx writes each activation fake-quantization as a uint8 QuantizeLinear/DequantizeLinear pair
    (scale and zero point from the learned min/max) and folds the weight fake-quantizations into float
    constants on their int8 grid. Here each pair becomes symmetric int8 over the learned range (the
    larger of its two ends), the pair on the raw 0..255 input is removed (the input and the in-model
    normalization stay float), and each Conv/Gemm/MatMul weight becomes an int8 initializer behind a
    per-output-channel DequantizeLinear, on the grid QAT trained (found from the values), so the
    weights are the ones the quantization-aware model computed with.

    Args:
        content: the bytes :func:`to_onnx` wrote for the quantization-aware Keras model.

    Returns:
        The int8 QDQ model's bytes; ``onnx.checker`` passes and :func:`int8_problems` finds nothing.
    """
    import onnx

    model = onnx.load_from_string(content)
    pairs = _activation_pairs(model.graph)
    if not pairs:
        raise ValueError(
            "the model has no fake-quantization ops: qat_to_qdq takes a quantization-aware (tfmot) model's "
            "ONNX; quantize a float model with quantize_int8 instead."
        )
    inputs = {i.name for i in model.graph.input}
    for quantize, dequantize in pairs:
        if quantize.input[0] in inputs:
            _bypass(model.graph, quantize, dequantize)
        else:
            _make_symmetric(model.graph, quantize, dequantize)
    rounded = _quantize_weights(model.graph)
    _drop_unused_initializers(model.graph)
    if rounded:
        log.info("QAT to ONNX: %d weight tensor(s) were not on an int8 grid and were rounded to one", rounded)
    return _checked(model)


def _activation_pairs(graph):
    """(QuantizeLinear, DequantizeLinear) pairs with uint8 zero points, the Q's output read by the DQ alone."""
    consumers = _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    pairs = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        readers = consumers.get(node.output[0], [])
        if inits[node.input[2]].data_type == 2 and [r.op_type for r in readers] == ["DequantizeLinear"]:  # UINT8
            pairs.append((node, readers[0]))
    return pairs


def _bypass(graph, quantize, dequantize) -> None:
    """Removes a Q/DQ pair: the DQ's readers read the Q's input."""
    source, target = quantize.input[0], dequantize.output[0]
    if any(output.name == target for output in graph.output):
        return  # never the input's pair, which feeds the normalization; kept rather than renaming an output
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == target:
                node.input[i] = source
    graph.node.remove(quantize)
    graph.node.remove(dequantize)


def _make_symmetric(graph, quantize, dequantize) -> None:
    """Gives a uint8 Q/DQ pair symmetric int8 parameters over the same real range's larger end."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    scale = float(numpy_helper.to_array(inits[quantize.input[1]]))
    zero = int(numpy_helper.to_array(inits[quantize.input[2]]))
    low, high = (0 - zero) * scale, (255 - zero) * scale
    new_scale = np.float32(max(-low, high, 1e-12) / 127)
    stem = quantize.output[0]
    names = (f"{stem}_int8_scale", f"{stem}_int8_zero_point")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(new_scale), names[0]),
            numpy_helper.from_array(np.array(0, np.int8), names[1]),
        ]
    )
    for node in (quantize, dequantize):
        node.input[1], node.input[2] = names
        for attribute in node.attribute:
            if attribute.name == "axis":
                node.attribute.remove(attribute)
                break


def _quantize_weights(graph) -> int:
    """Puts each float weight of a Conv/Gemm/MatMul behind an int8 per-channel DequantizeLinear; returns
    how many were not already on an int8 grid."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    done, rounded, new_nodes = {}, 0, []
    for node in graph.node:
        axis = _weight_axis(node, inits)
        if axis is None:
            continue
        name = node.input[1]
        if name not in done:
            weights = numpy_helper.to_array(inits[name]).astype(np.float32)
            scales, exact = grid_scales(weights, axis)
            rounded += not exact
            shape = [1] * weights.ndim
            shape[axis] = -1
            values = np.clip(np.round(weights / scales.reshape(shape)), -127, 127).astype(np.int8)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(values, f"{name}_int8"),
                    numpy_helper.from_array(scales.astype(np.float32), f"{name}_int8_scale"),
                    numpy_helper.from_array(np.zeros(len(scales), np.int8), f"{name}_int8_zero_point"),
                ]
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_zero_point"],
                    [f"{name}_dequantized"],
                    name=f"{name}_DequantizeLinear",
                    axis=axis,
                )
            )
            done[name] = f"{name}_dequantized"
        node.input[1] = done[name]
    _prepend(graph, new_nodes)
    return rounded


def _weight_axis(node, inits) -> int | None:
    """The output-channel axis of ``node``'s constant float weight (input 1), or None when it has none."""
    if node.op_type not in WEIGHTED or len(node.input) < 2 or node.input[1] not in inits:
        return None
    weight = inits[node.input[1]]
    if weight.data_type != 1 or len(weight.dims) < 2:  # FLOAT, a matrix or a kernel
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if len(weight.dims) == 4 else None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if len(weight.dims) == 2 else None


def grid_scales(weights, axis: int) -> tuple[np.ndarray, bool]:
    """Per-channel (along ``axis``) symmetric int8 scales for ``weights``, and whether every value lies
    exactly on its channel's grid.

    A quantization-aware model's weights are k * scale with integer |k| <= 127, but the scale comes from
    a range learned before the last update, so it is not max|w| / 127: each channel tries max|w| / n
    for n = 127, 126, ... and keeps the first that makes every value an integer multiple. A channel
    with no such n (a float layer) gets max|w| / 127, the post-training choice.
    """
    moved = np.moveaxis(np.asarray(weights, np.float32), axis, 0).reshape(np.shape(weights)[axis], -1)
    peak = np.abs(moved).max(axis=1)
    scales = np.where(peak > 0, peak / 127, 1.0).astype(np.float32)
    pending = np.flatnonzero(peak > 0)
    for n in range(127, 0, -1):
        if not len(pending):
            break
        candidate = (peak[pending] / n).astype(np.float32)
        units = moved[pending] / candidate[:, None]
        fits = np.abs(units - np.round(units)).max(axis=1) < 1e-3
        scales[pending[fits]] = candidate[fits]
        pending = pending[~fits]
    return scales, not len(pending)


def _prepend(graph, nodes) -> None:
    """Puts ``nodes`` (constants' DequantizeLinear) first, keeping the graph in topological order."""
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(list(nodes) + existing)


def _drop_unused_initializers(graph) -> None:
    """Removes the initializers no node reads any more (the replaced scales and float weights)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def _consumers(graph) -> dict:
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def int8_problems(model, *, symmetric: bool = True) -> list[str]:
    """What keeps an int8 QDQ ONNX model (a ModelProto) from being the TensorRT-style file this module
    promises: a non-float graph input or output, a quantized graph input, a DequantizeLinear of an int32
    (bias) or other non-int8 constant, no quantization at all, and with ``symmetric`` a zero point that
    is not int8 0."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    problems = [
        f"graph {kind} {value.name!r} is not float32"
        for kind, values in (("input", graph.input), ("output", graph.output))
        for value in values
        if value.type.tensor_type.elem_type != 1
    ]
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        problems.append("no QuantizeLinear/DequantizeLinear node: the model is not quantized")
    for node in qdq:
        if node.op_type == "QuantizeLinear" and node.input[0] in inputs:
            problems.append(f"{node.name}: the graph input {node.input[0]!r} is quantized")
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].data_type != 3:
            problems.append(f"{node.name}: dequantizes a constant that is not int8 (an int32 bias?)")
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        if symmetric and zero is not None and (zero.data_type != 3 or np.any(numpy_helper.to_array(zero) != 0)):
            problems.append(f"{node.name}: zero point not int8 0 (TensorRT takes symmetric int8 only)")
    return problems


def _checked(model, *, symmetric: bool = True) -> bytes:
    """``model``'s bytes, after ``onnx.checker`` and :func:`int8_problems` (an error is ktoolkit's bug)."""
    import onnx

    onnx.checker.check_model(model)
    problems = int8_problems(model, symmetric=symmetric)
    if problems:
        raise RuntimeError("int8 ONNX export produced a file TensorRT would not take: " + "; ".join(problems[:5]))
    return model.SerializeToString()
