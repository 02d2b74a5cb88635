"""Saving and loading recipe models safely (``.keras`` files, ``safe_mode=True``)."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile

from recipes._keras import check_api, get_keras
from recipes.layers import custom_layers

_CONFIG = "config.json"
_WEIGHTS = "model.weights.h5"


def load_model(path, api: str | None = None, compile: bool = False):
    """Loads a ``.keras`` model saved from any recipe, in safe mode (no Lambda layers, no pickles).

    Same result as ``keras.models.load_model(path, safe_mode=True)``, but fast for deep models: Keras
    reads the weights straight out of the zip archive, and Python's zip seeks make that quadratic
    (115 s for ResNet-152 on two cores); this unpacks the weights file first (a few seconds).

    Args:
        path: the ``.keras`` file.
        api: "tf_keras" (default) or "keras3", the Keras that saved the file.
        compile: also restore the optimizer and loss.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a Keras model archive.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist.")
    api = check_api(api)
    K = get_keras(api)
    custom_layers(api)  # registers ktoolkit's layers so the loader can find them by name
    from recipes import losses

    losses.custom_losses(api)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path!r} is not a .keras model archive ({err}); was it written completely?") from err
    with archive, tempfile.TemporaryDirectory(prefix="ktoolkit-load-") as tmp:
        names = archive.namelist()
        if _CONFIG not in names or _WEIGHTS not in names or len(names) > 3:
            # another layout (npz weights, assets): Keras's own loader handles it
            return K.models.load_model(path, safe_mode=True, compile=compile)
        config = json.loads(archive.read(_CONFIG))
        if not compile:
            config["compile_config"] = None
        model = K.saving.deserialize_keras_object(config, safe_mode=True)
        weights = archive.extract(_WEIGHTS, tmp)
        model.load_weights(weights)
    return model
