"""Which Keras a recipe is built with.

ktoolkit trains, compresses and exports with tf_keras (the Keras 2 API), because
tensorflow-model-optimization and keras-cv only work with it. Recipes can also be built with
Keras 3 (``api="keras3"``) for users who live there; the layer graph is the same.
"""

from __future__ import annotations

import os

# Must happen before TensorFlow resolves ``tf.keras``: it makes tf.keras, tfmot and keras-cv use
# tf_keras. Forced, not defaulted: with Keras 3 behind tf.keras, tfmot fails at import.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

APIS = ("tf_keras", "keras3")
DEFAULT_API = "tf_keras"


def check_api(api: str | None) -> str:
    """Returns the API name, raising a ValueError that lists the valid ones."""
    api = DEFAULT_API if api is None else api
    if api not in APIS:
        raise ValueError(f"api={api!r} is not a Keras API ktoolkit builds with; use one of {', '.join(APIS)}.")
    return api


def get_keras(api: str | None = None):
    """Returns the Keras module for ``api`` ("tf_keras", the default, or "keras3")."""
    api = check_api(api)
    if api == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    if not keras.__version__.startswith("3."):
        raise ImportError(
            f"api='keras3' needs Keras 3, but keras {keras.__version__} is installed; pip install 'keras>=3'."
        )
    return keras


def api_of(model) -> str:
    """Returns "tf_keras" or "keras3" for a built model."""
    module = type(model).__module__
    return "tf_keras" if module.startswith("tf_keras") else "keras3"
