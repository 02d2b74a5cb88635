"""A Keras model made convertible: one output (auxiliary heads dropped) and float32 layers; and the
normalization its ``ImagePreprocessing`` layer applies, for the file's metadata.

Model in, model out: nothing here knows about run folders or data.
"""

from __future__ import annotations

import logging

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
    for layer in model.layers:
        if hasattr(layer, "layers"):
            found = find_preprocessing(layer)
            if found:
                return found
        elif type(layer).__name__ == "ImagePreprocessing":
            return layer.mode
    return None
