"""Keras to ONNX with tf2onnx, for TensorRT on a Jetson (and onnxruntime anywhere).

The graph keeps the Keras model's interface: input ``input`` of shape (batch, height, width,
channels), float32 RGB pixels 0..255 (normalization is inside), output ``predictions`` with the
class probabilities. The batch dimension is named "batch" and dynamic. Class names and the input
convention are stored in the model's metadata_props, where onnxruntime and Netron show them.

int8 files are quantized by onnxruntime's static quantization, calibrated on training images like
TFLite's int8: QuantizeLinear/DequantizeLinear pairs with symmetric int8 scales (zero points 0),
per output channel for weights, which is the explicit quantization TensorRT builds INT8 engines from.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

OPSET = 17


def to_onnx(model, *, labels, description: str = "") -> bytes:
    """Converts a tf_keras model to ONNX bytes (opset :data:`OPSET`)."""
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    height, width, channels = model.input_shape[1:]
    spec = [tf.TensorSpec((None, height, width, channels), tf.float32, name="input")]
    serve = tf.function(lambda x: {"predictions": model(x, training=False)}, input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=OPSET)
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


def quantize_int8(content: bytes, representative, *, progress: bool = False) -> bytes:
    """Statically quantizes an ONNX model to int8 QDQ form, calibrated (min/max) on ``representative``
    images (N, H, W, C float32 0..255); symmetric activations and per-channel symmetric weights."""
    from onnxruntime import quantization as oq

    from tflite_export.convert import calibration_progress

    class Images(oq.CalibrationDataReader):
        def __init__(self):
            self._images = iter(calibration_progress(representative, progress))

        def get_next(self):
            image = next(self._images, None)
            return None if image is None else {"input": image[None].astype("float32")}

    with tempfile.TemporaryDirectory(prefix="ktoolkit-onnx-") as tmp:
        src, pre, out = Path(tmp, "float.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(content)
        oq.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        oq.quantize_static(
            str(pre),
            str(out),
            Images(),
            quant_format=oq.QuantFormat.QDQ,
            per_channel=True,
            activation_type=oq.QuantType.QInt8,
            weight_type=oq.QuantType.QInt8,
            calibrate_method=oq.CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        return out.read_bytes()
