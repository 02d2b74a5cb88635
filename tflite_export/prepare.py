"""A Keras model made convertible: one output (auxiliary heads dropped) and float32 layers; and the
normalization its ``ImagePreprocessing`` layer applies, for the file's metadata and for int8 files
that do the normalization outside the int8 graph (:mod:`tflite_export.convert`): the layer passed
through while the converter traces the model, or folded exactly into the first convolution.

Model in, model out: nothing here knows about run folders or data.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def prepare_model(model):
    """The model as the converters want it: one output (GoogLeNet's auxiliary heads are dropped)
    and float32 layers (a mixed-precision run's model is rebuilt from its config)."""
    import tf_keras

    if len(model.outputs) > 1:
        names = [layer.name for layer in model.layers]
        if "predictions" not in names:
            raise ValueError(
                f"{model.name} has {len(model.outputs)} outputs and no layer named 'predictions' to "
                f"keep; export a model with one classifier output."
            )
        model = tf_keras.Model(model.inputs, model.get_layer("predictions").output, name=model.name)
    return as_float32(model)


def as_float32(model):
    """Returns ``model`` with every layer's dtype policy float32 (same weights).

    A run trained with ``--mixed-precision`` saves layers with the mixed_float16/mixed_bfloat16
    policy; the TFLite and ONNX converters would bake the casts in, so the model is rebuilt from its
    config with the policy replaced.
    """
    config = model.get_config()
    if not _replace_mixed_policies(config):
        return model
    log.info("%s was trained with mixed precision; rebuilding it in float32 for export", model.name)
    rebuilt = type(model).from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _replace_mixed_policies(config) -> bool:
    """Replaces mixed dtype policies in a (nested) Keras config by "float32"; True if any was found."""
    found = False
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "dtype" and isinstance(value, dict) and "mixed" in str(value.get("config", {}).get("name", "")):
                config[key] = "float32"
                found = True
            else:
                found |= _replace_mixed_policies(value)
    elif isinstance(config, list):
        for value in config:
            found |= _replace_mixed_policies(value)
    return found


def find_preprocessing(model) -> str | None:
    """The mode of the model's ``ImagePreprocessing`` layer (searched in nested models too), or None."""
    layer = preprocessing_layer(model)
    return layer.mode if layer is not None else None


def preprocessing_layer(model):
    """The model's ``ImagePreprocessing`` layer (searched in nested models too), or None."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            found = preprocessing_layer(layer)
            if found is not None:
                return found
        elif type(layer).__name__ == "ImagePreprocessing":
            return layer
    return None


@dataclass(frozen=True)
class Normalization:
    """What an ``ImagePreprocessing`` layer computes: ``y = x[..., order] * scale + offset`` per channel,
    with ``order`` reversed (RGB to BGR) when ``reverse``.

    Attributes:
        mode: the layer's mode ("tf", "unit", "torch", "caffe").
        scale, offset: one number per channel (in the order after the reversal).
        reverse: the channels are reversed first ("caffe").
    """

    mode: str
    scale: tuple
    offset: tuple
    reverse: bool = False

    @classmethod
    def of_mode(cls, mode: str, channels: int = 3) -> Normalization:
        from recipes.layers import preprocessing_affine

        scale, offset, reverse = preprocessing_affine(mode, channels)
        return cls(mode, tuple(float(s) for s in scale), tuple(float(o) for o in offset), bool(reverse))

    @property
    def scalar(self) -> bool:
        """True when every channel gets the same scale and offset and none is reordered."""
        return not self.reverse and len(set(self.scale)) == 1 and len(set(self.offset)) == 1

    @property
    def mean(self) -> list[float]:
        """Per input channel, the pixel value that becomes 0 (``y = (x - mean) / std``; metadata's mean)."""
        return [-o / s for s, o in zip(self._in_order(self.scale), self._in_order(self.offset))]

    @property
    def std(self) -> list[float]:
        """Per input channel, the pixel step that becomes 1 (metadata's std)."""
        return [1 / s for s in self._in_order(self.scale)]

    def _in_order(self, values) -> tuple:
        return tuple(values[::-1]) if self.reverse else tuple(values)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """The layer's output for ``images`` (N, H, W, C) of 0..255 pixels, in float32 as the layer computes it."""
        x = np.asarray(images, dtype=np.float32)
        if self.reverse:
            x = x[..., ::-1]
        return x * np.asarray(self.scale, np.float32) + np.asarray(self.offset, np.float32)


def normalization_of(model) -> Normalization | None:
    """The normalization of the model's ``ImagePreprocessing`` layer, or None (no layer, or mode "none")."""
    layer = preprocessing_layer(model)
    if layer is None or layer.mode == "none":
        return None
    return Normalization.of_mode(layer.mode, int(layer.input_shape[-1]))


@contextlib.contextmanager
def preprocessing_bypassed(model):
    """While inside, the model's ``ImagePreprocessing`` layer passes its input through unchanged, so a
    conversion traced meanwhile takes normalized values (the layer's output) as its input. The layer
    is restored on the way out, whatever happens."""
    layer = preprocessing_layer(model)
    if layer is None:
        yield model
        return
    layer.call = lambda inputs, *args, **kwargs: inputs  # an instance attribute: __call__ finds it first
    try:
        yield model
    finally:
        del layer.call


def first_conv_fold(model, norm: Normalization):
    """The first convolution with the normalization folded in, when that is exact; else None.

    The normalization is affine per input channel, so a convolution of its output equals a convolution
    of the pixels with the kernel scaled per input channel (and the reversal applied to the kernel's
    input axis), plus a constant added to the bias: ``b' = b + sum(W * offset)``. That holds at every
    output position only when the convolution reads no padding: the original pads the *normalized*
    image with zeros (the mean pixel), which no padding of the pixels reproduces per channel. So the
    fold is made only when the preprocessing's output goes to exactly one ``Conv2D`` (one group, with
    a bias) whose padding adds nothing ("valid", or "same" where the kernel and strides need none).

    Returns:
        (conv layer, folded kernel, folded bias) as float32 arrays, or None.
    """
    layer = preprocessing_layer(model)
    consumers = [node.outbound_layer for node in getattr(layer, "_outbound_nodes", [])] if layer else []
    if len(consumers) != 1 or type(consumers[0]).__name__ != "Conv2D":
        return None
    conv = consumers[0]
    if not conv.use_bias or getattr(conv, "groups", 1) != 1 or not _reads_no_padding(conv):
        return None
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in conv.get_weights())
    scale, offset = np.asarray(norm.scale), np.asarray(norm.offset)
    folded_bias = bias + np.einsum("hwco,c->o", kernel, offset)
    folded = kernel * scale[None, None, :, None]
    if norm.reverse:
        folded = folded[:, :, ::-1, :]  # the kernel's channel c reads pixel channel C-1-c
    return conv, folded.astype(np.float32), folded_bias.astype(np.float32)


def _reads_no_padding(conv) -> bool:
    """True when the convolution's padding adds no pixel: "valid", or "same" with a 1x1 kernel (and
    dilation 1), or "same" where every side divides as the strides need (computed from the input)."""
    if conv.padding == "valid":
        return True
    height, width = conv.input_shape[1:3]
    if height is None or width is None:
        return all(k == 1 for k in conv.kernel_size)
    for size, k, s, d in zip((height, width), conv.kernel_size, conv.strides, conv.dilation_rate):
        out = -(-size // s)
        if max((out - 1) * s + (k - 1) * d + 1 - size, 0):
            return False
    return True


@contextlib.contextmanager
def weights_replaced(layer, weights):
    """While inside, ``layer`` has ``weights`` (a list as ``get_weights`` gives); the old ones come back after."""
    old = layer.get_weights()
    layer.set_weights(weights)
    try:
        yield layer
    finally:
        layer.set_weights(old)


def preprocessing_reads_input(model) -> bool:
    """True when the ``ImagePreprocessing`` layer takes the model's input directly (through nested
    models that take it directly too): only then does passing the layer through make the model's input
    the normalized image, and only then can the normalization move into the input's quantization."""
    target = preprocessing_layer(model)
    if target is None:
        return False
    for layer in model.layers:
        if layer is target or (hasattr(layer, "layers") and _contains(layer, target)):
            if not _reads(layer, model.inputs):
                return False
            return layer is target or preprocessing_reads_input(layer)
    return False


def _contains(model, target) -> bool:
    return any(layer is target or (hasattr(layer, "layers") and _contains(layer, target)) for layer in model.layers)


def _reads(layer, inputs) -> bool:
    """True when every call of ``layer`` takes exactly one of ``inputs`` (the same tensor objects)."""
    nodes = getattr(layer, "_inbound_nodes", [])
    for node in nodes:
        given = node.input_tensors
        given = given if isinstance(given, (list, tuple)) else [given]
        if len(given) != 1 or not any(given[0] is tensor for tensor in inputs):
            return False
    return bool(nodes)
