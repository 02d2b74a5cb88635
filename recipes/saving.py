"""Loading model and weight files safely: nothing in a file from a stranger runs code.

Keras's ``safe_mode=True`` only refuses Python lambdas: tf_keras 2.21 still imports whatever module a
config names (a ``Lambda`` layer whose function is ``pydoc.pipepager`` runs a shell command while the
model is rebuilt). So before anything is deserialized, :func:`check_config` walks the whole config and
allows only what real files contain (measured by saving every recipe, keras.applications networks
and compiled models with tf_keras and Keras 3): Keras's built-in layers, initializers, regularizers,
constraints, dtype policies, functional/sequential models, a few pure TensorFlow ops, and ktoolkit's
registered layers; losses, metrics and optimizers only when the model is compiled. Archives and HDF5
files are bounded (member count and sizes, links to other files) before they are read.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
import tempfile
import types
import zipfile
import zlib

from recipes._keras import api_of, check_api, get_keras
from recipes.layers import custom_layers

log = logging.getLogger(__name__)

_CONFIG = "config.json"
_WEIGHTS = "model.weights.h5"
_KNOWN_MEMBERS = {_CONFIG, _WEIGHTS, "metadata.json"}

MAX_CONFIG_BYTES = 64 << 20  # the config of ResNet-152 is 1.6 MB
MAX_MEMBERS = 4096
MAX_MEMBER_BYTES = 16 << 30  # one member and the whole archive, unpacked; VGG-19 with its top is 0.55 GB
MAX_CONFIG_NODES = 5_000_000
MAX_H5_OBJECTS = 500_000

# Built-in families: the module a config names -> (attribute of the Keras module, base class path).
_FAMILIES = {
    "keras.layers": ("layers", "layers.Layer"),
    "keras.initializers": ("initializers", "initializers.Initializer"),
    "keras.regularizers": ("regularizers", "regularizers.Regularizer"),
    "keras.constraints": ("constraints", "constraints.Constraint"),
}
_COMPILE_FAMILIES = {
    "keras.losses": ("losses", "losses.Loss"),
    "keras.metrics": ("metrics", "metrics.Metric"),
    "keras.optimizers": ("optimizers", "optimizers.Optimizer"),
    "keras.optimizers.schedules": ("optimizers.schedules", "optimizers.schedules.LearningRateSchedule"),
}
# Built-in layers that carry code, load other files or read unbounded vocabularies.
_REFUSED_LAYERS = {
    "Lambda": "is a Lambda layer (arbitrary code)",
    "TFSMLayer": "loads a SavedModel from another path",
    "TorchModuleWrapper": "holds a pickled PyTorch module (arbitrary code)",
    "JaxLayer": "wraps a Python function (arbitrary code)",
    "FlaxLayer": "wraps a Python function (arbitrary code)",
    "TextVectorization": "reads a vocabulary file",
    "StringLookup": "reads a vocabulary file",
    "IntegerLookup": "reads a vocabulary file",
}
# Where tf_keras (2.13..2.21, under the names it had) and Keras 3 write their model classes.
_FUNCTIONAL_MODULES = {
    "keras.engine.functional",
    "keras.src.engine.functional",
    "tf_keras.src.engine.functional",
    "keras.src.models.functional",
}
_TF_OP_MODULES = {
    "keras.layers.core.tf_op_layer",
    "keras.src.layers.core.tf_op_layer",
    "tf_keras.src.layers.core.tf_op_layer",
}
_TOP_LEVEL = {"Sequential", "Model", "Functional", "DTypePolicy", "FloatDTypePolicy"}  # module "keras"
_KTOOLKIT_MODULES = {"recipes.layers", "recipes.losses"}
# TensorFlow ops a functional model may call on its tensors (keras.applications' MobileNetV3 uses
# __operators__.add and math.multiply): pure tensor math, no I/O.
_TF_OP_PREFIXES = ("__operators__.", "math.", "nn.")
_TF_OPS = {
    "reshape",
    "concat",
    "cast",
    "identity",
    "transpose",
    "expand_dims",
    "squeeze",
    "stack",
    "clip_by_value",
    "image.resize",
}
_CODE_KEYS = ("function_type", "output_shape_type", "mask_type", "output_shape_module", "mask_module")


class UnsafeModelError(ValueError):
    """A model or weights file that ktoolkit refuses to open: loading it could run code or exhaust memory."""


def load_model(path, api: str | None = None, compile: bool = False):
    """Loads a ``.keras`` (or full-model ``.h5``) file after checking that nothing in it can run code.

    Same result as ``keras.models.load_model(path, safe_mode=True)`` for ktoolkit's own files, but the
    config is checked first (:func:`check_config`), and it is fast for deep models: Keras reads the
    weights straight out of the zip archive, and Python's zip seeks make that quadratic (115 s for
    ResNet-152 on two cores); this copies the weights member out first (a few seconds).

    Args:
        path: the ``.keras`` (or ``.h5``) file.
        api: "tf_keras" (default) or "keras3", the Keras that saved the file.
        compile: also restore the optimizer and loss (``.keras`` files only).

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeModelError: the file holds code (a Lambda layer, a function of another module, an
            unregistered class) or is a zip bomb; nothing of it was deserialized.
        ValueError: the file is not a Keras model file, or does not rebuild.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist.")
    api = check_api(api)
    K = _register(api)
    name = os.path.basename(path)
    if _is_hdf5(path):
        return _load_h5_model(K, api, path, name, compile)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path!r} is not a .keras model archive ({err}); was it written completely?") from err
    with archive, tempfile.TemporaryDirectory(prefix="ktoolkit-load-") as tmp:
        infos = _check_members(archive, name)
        config = _read_config(archive, infos, name)
        if not compile:
            config["compile_config"] = None
        check_config(config, name, api=api, compile=compile)
        if set(infos) - {"metadata.json"} != {_CONFIG, _WEIGHTS}:
            # another layout (npz weights, assets): Keras's own loader, now that the config passed
            log.info("%s: %s holds %s; loading it with Keras's loader", name, path, sorted(infos))
            return _rebuild(name, lambda: K.models.load_model(path, safe_mode=True, compile=compile))
        model = _rebuild(name, lambda: K.saving.deserialize_keras_object(config, safe_mode=True))
        weights = _copy_member(archive, infos[_WEIGHTS], os.path.join(tmp, _WEIGHTS), name)
        check_h5_file(weights, f"{name}: {_WEIGHTS}", max_dataset_bytes=max_weight_bytes(model))
        _rebuild(name, lambda: model.load_weights(weights), what="its weights do not fit its config")
    return model


def _register(api: str):
    """Registers ktoolkit's layers and losses so the loader finds them by name; returns Keras."""
    from recipes import losses

    custom_layers(api)
    losses.custom_losses(api)
    return get_keras(api)


def _rebuild(name: str, build, what: str = "it could not be rebuilt from its config"):
    """Runs a Keras step of loading, turning Keras's errors about a malformed file into one line."""
    try:
        return build()
    except UnsafeModelError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OSError, RecursionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(f"{name}: {what} ({first}); save the model again with ktoolkit or Keras.") from None


def _check_members(archive: zipfile.ZipFile, name: str) -> dict:
    """The archive's members by name, refusing hostile names and sizes before anything is read."""
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise UnsafeModelError(
            f"{name}: the archive has {len(infos)} members (a model has 3); ktoolkit refuses "
            "to open it. Save the model again with ktoolkit or Keras."
        )
    by_name = {}
    for info in infos:
        member = info.filename
        parts = member.replace("\\", "/").split("/")
        if member.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] or "\x00" in member:
            raise UnsafeModelError(
                f"{name}: archive member {member!r} points outside the archive; ktoolkit "
                "refuses to open it. Save the model again with ktoolkit or Keras."
            )
        if member in by_name:
            raise UnsafeModelError(f"{name}: archive member {member!r} appears twice; ktoolkit refuses to open it.")
        if info.file_size > MAX_MEMBER_BYTES or info.flag_bits & 0x1:
            reason = "is encrypted" if info.flag_bits & 0x1 else f"unpacks to {info.file_size:,} bytes"
            raise UnsafeModelError(
                f"{name}: archive member {member!r} {reason}; ktoolkit refuses to open it. "
                "Save the model again with ktoolkit or Keras."
            )
        by_name[member] = info
    total = sum(info.file_size for info in infos)
    if total > MAX_MEMBER_BYTES:
        raise UnsafeModelError(
            f"{name}: the archive unpacks to {total:,} bytes (at most {MAX_MEMBER_BYTES:,}); "
            "ktoolkit refuses to open it. Save the model again with ktoolkit or Keras."
        )
    if _CONFIG not in by_name:
        raise ValueError(
            f"{name}: the archive has no {_CONFIG} ({', '.join(sorted(by_name)) or 'no members'}), so "
            "it is not a .keras model; pass a file written by model.save('NAME.keras')."
        )
    if by_name[_CONFIG].file_size > MAX_CONFIG_BYTES:
        raise UnsafeModelError(
            f"{name}: {_CONFIG} unpacks to {by_name[_CONFIG].file_size:,} bytes (at most "
            f"{MAX_CONFIG_BYTES:,}); ktoolkit refuses to open it."
        )
    return by_name


def _read_config(archive: zipfile.ZipFile, infos: dict, name: str) -> dict:
    try:
        with archive.open(infos[_CONFIG]) as member:
            raw = member.read(MAX_CONFIG_BYTES + 1)  # the declared size bounds what zipfile returns
        config = json.loads(raw)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError, RuntimeError) as err:
        raise ValueError(f"{name}: {_CONFIG} cannot be read ({err}); was the file written completely?") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{name}: {_CONFIG} is not valid JSON ({str(err)[:200]}); save the model again.") from None
    if not isinstance(config, dict):
        message = f"{name}: {_CONFIG} is not a model config (a JSON object); save the model again."
        raise ValueError(message)  # noqa: TRY004 - a bad file is the user's mistake: a ValueError, like the others
    return config


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, destination: str, name: str) -> str:
    """Copies one member to ``destination`` by reading it: a hostile name never becomes a path."""
    try:
        with archive.open(info) as source, open(destination, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as err:
        raise ValueError(f"{name}: {info.filename} cannot be read ({err}); was the file written completely?") from None
    return destination


def _is_hdf5(path: str) -> bool:
    """HDF5 by its name or its signature (a .keras archive starts with the zip signature instead)."""
    if path.lower().endswith((".h5", ".hdf5")):
        return True
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


_FIX = "Rebuild the model without it (ktoolkit's recipes need no Lambda layers) or use a registered custom layer."


def check_config(config, source: str, api: str | None = None, compile: bool = False) -> None:
    """Walks a model config (a ``.keras`` config.json or an ``.h5`` model_config) before it is deserialized.

    Args:
        config: the parsed JSON.
        source: the file, for the message.
        api: "tf_keras" (default) or "keras3".
        compile: whether losses, metrics and optimizers (the compile config) will be deserialized.

    Raises:
        UnsafeModelError: naming the source, the layer and the reason for the first thing refused.
    """
    allowed = _allowed(check_api(api))
    stack = [(config, _object_name(config) or "model")]
    seen = 0
    while stack:
        node, layer = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise UnsafeModelError(f"{source}: the config has over {MAX_CONFIG_NODES:,} objects; ktoolkit refuses it.")
        if isinstance(node, list):
            stack.extend((value, layer) for value in node if isinstance(value, (dict, list)))
            continue
        if "class_name" in node:
            layer = _object_name(node) or layer
            reason = _refusal(node, allowed, compile)
        else:
            reason = _plain_refusal(node, allowed)
        if reason:
            raise UnsafeModelError(f"{source}: layer {layer!r} {reason}; ktoolkit refuses to load it. {_FIX}")
        stack.extend((value, layer) for value in node.values() if isinstance(value, (dict, list)))


def _object_name(node) -> str | None:
    config = node.get("config") if isinstance(node, dict) else None
    name = config.get("name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def _plain_refusal(node: dict, allowed) -> str | None:
    """What a dict that is no Keras object may not hold: a module, a function type, a made-up activation."""
    if node.get("module") is not None:
        return f"names Python module {node['module']!r} (a Lambda-style function reference)"
    for key in _CODE_KEYS:
        if node.get(key) is not None:
            return f"has {key}={node[key]!r} (a serialized Python function)"
    for key in ("activation", "recurrent_activation"):
        value = node.get(key)
        if isinstance(value, str) and value not in allowed.activations:
            return f"has {key}={value!r}, which is not a Keras activation"
    return None


def _refusal(node: dict, allowed, compile: bool) -> str | None:
    """Why the Keras object ``node`` (a dict with class_name) is refused; None when it is allowed."""
    cls, module, registered = node.get("class_name"), node.get("module"), node.get("registered_name")
    if not all(value is None or isinstance(value, str) for value in (cls, module, registered)) or not cls:
        return "has a class_name, module or registered_name that is not a string"
    if cls in _REFUSED_LAYERS or (registered or "").split(">")[-1] in _REFUSED_LAYERS:
        return _REFUSED_LAYERS.get(cls) or _REFUSED_LAYERS[registered.split(">")[-1]]
    if cls == "__lambda__":
        return "holds a Python lambda (arbitrary code)"
    if cls == "__keras_tensor__" and module is None:
        return None
    if cls.startswith("__"):
        return f"holds a serialized {cls} object, which no Keras model file of ktoolkit contains"
    if cls == "function":
        return _function_refusal(node, allowed, compile)
    if ">" in cls or (registered and ">" in registered):
        return _ktoolkit_refusal(cls, module, registered, allowed, compile)
    if registered is not None and registered != cls:
        return f"has registered_name {registered!r}, which is not a class ktoolkit knows"
    if module in _KTOOLKIT_MODULES:
        return f"is {module}.{cls}, which is not a registered ktoolkit class"
    return _builtin_refusal(cls, module, node.get("config"), allowed, compile)


def _function_refusal(node: dict, allowed, compile: bool) -> str | None:
    module, name, registered = node.get("module"), node.get("config"), node.get("registered_name")
    families = {"keras.activations": allowed.activations}
    if compile:
        families.update({"keras.losses": allowed.loss_functions, "keras.metrics": allowed.metric_functions})
    if module not in families:
        return f"uses a function from module {module!r} ({module}.{name}), which is not a Keras activation"
    if not isinstance(name, str) or name not in families[module] or registered not in (None, name):
        return f"uses the function {module}.{name}, which Keras does not have"
    return None


def _ktoolkit_refusal(cls: str, module, registered, allowed, compile: bool) -> str | None:
    key = registered if registered and ">" in registered else cls
    names = allowed.layers | (allowed.losses if compile else set())
    if key not in names or cls not in (key, key.split(">", 1)[1]) or module not in (None, *_KTOOLKIT_MODULES):
        return f"is a custom class {key!r} (module {module!r}) that ktoolkit did not register"
    return None


def _builtin_refusal(cls: str, module, config, allowed, compile: bool) -> str | None:
    """A class of Keras itself: the module must be one real files name, the class one Keras exports there."""
    if cls in ("TFOpLambda", "SlicingOpLambda") and module in (None, *_TF_OP_MODULES):
        function = config.get("function") if isinstance(config, dict) else None
        if not isinstance(function, str) or "cls_symbol" in config or not _pure_tf_op(function):
            return f"calls the TensorFlow function {function!r}, which is not pure tensor math"
        return None
    if module in _FUNCTIONAL_MODULES or module in _TF_OP_MODULES:
        functional = cls == "Functional" and module in _FUNCTIONAL_MODULES
        return None if functional else f"is {module}.{cls}, not a Keras model"
    if module == "keras" or (module is None and cls in _TOP_LEVEL):
        return None if cls in allowed.top_level else f"is keras.{cls}, which is not a Keras model or dtype policy"
    if module == "keras.mixed_precision":
        return None if cls in allowed.policies else f"is keras.mixed_precision.{cls}, not a dtype policy"
    families = dict(_FAMILIES, **(_COMPILE_FAMILIES if compile else {}))
    if module is None:  # legacy .h5 configs name layers without a module
        hit = any(cls in allowed.classes[family] for family in families)
        return None if hit else f"is a class {cls!r} that is not a Keras built-in"
    if module in _COMPILE_FAMILIES and not compile:
        return f"is {module}.{cls}, which only a compiled model has (load with compile=True to restore it)"
    if module not in families:
        return f"names module {module!r} for class {cls!r}, which is not a Keras or ktoolkit module"
    if cls not in allowed.classes[module]:
        return f"is {module}.{cls}, which Keras does not have"
    return None


def _pure_tf_op(function: str) -> bool:
    parts = function.split(".")
    if not all(part.isidentifier() and not part.startswith("_") or part == "__operators__" for part in parts):
        return False
    return function.startswith(_TF_OP_PREFIXES) or function in _TF_OPS


@functools.cache
def _allowed(api: str) -> types.SimpleNamespace:
    """What one Keras API's files may name: its exported classes per family, activations, ktoolkit's classes."""
    from recipes import losses

    K = _register(api)
    classes = {}
    for module, (attr, base_path) in {**_FAMILIES, **_COMPILE_FAMILIES}.items():
        namespace, base = _attr(K, attr), _attr(K, base_path)
        classes[module] = {
            name
            for name, value in vars(namespace).items()
            if inspect.isclass(value) and issubclass(value, base) and name not in _REFUSED_LAYERS
        }

    def functions(namespace):
        return {
            name
            for name, value in vars(namespace).items()
            if not name.startswith("_")
            and inspect.isfunction(value)
            and name not in ("get", "serialize", "deserialize")
        }

    registered = K.saving.get_registered_name
    return types.SimpleNamespace(
        classes=classes,
        activations=functions(K.activations),
        loss_functions=functions(K.losses),
        metric_functions=functions(K.metrics),
        top_level={name for name in _TOP_LEVEL if inspect.isclass(getattr(K, name, None))} | {"Functional"},
        policies={
            name for name in ("Policy", "DTypePolicy") if inspect.isclass(getattr(K.mixed_precision, name, None))
        },
        layers={registered(cls) for cls in vars(custom_layers(api)).values()},
        losses={registered(cls) for cls in vars(losses.custom_losses(api)).values()},
    )


def _attr(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _load_h5_model(K, api: str, path: str, name: str, compile: bool):
    """A full-model ``.h5`` file: its model_config is checked, then rebuilt, then its weights loaded strictly."""
    if compile:
        raise ValueError(
            f"{name}: compile=True restores the optimizer from .keras files only; load the .h5 file "
            "with compile=False, or save the model as NAME.keras."
        )
    check_h5_file(path, name)
    with _open_h5(path, name) as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        raise ValueError(
            f"{name}: an HDF5 file without a model_config attribute holds weights only, not a model; "
            "build the model and load the file as its weights (weights=PATH), or pass a .keras file."
        )
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as err:
        message = f"{name}: its model_config is not valid JSON ({str(err)[:200]}); save the model again."
        raise ValueError(message) from None
    check_config(config, name, api=api, compile=False)
    model = _rebuild(name, lambda: K.models.model_from_json(json.dumps(config)))
    _rebuild(name, lambda: load_weights_file(model, path), what="its weights do not fit its model_config")
    return model


def _open_h5(path: str, label: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or ["unreadable"])[0][:200]
        raise ValueError(
            f"{label} is not an HDF5 file ({first}); pass a file written by Keras's model.save or model.save_weights."
        ) from None


def check_h5_file(path: str, label: str, max_dataset_bytes: int | None = None) -> None:
    """Refuses an HDF5 file that could make loading read other files or unbounded memory.

    Only metadata is read: links and dataset shapes, never the data.

    Args:
        path: the HDF5 file.
        label: how the message names it.
        max_dataset_bytes: the largest dataset (its declared shape times its item size) allowed: a
            weight of the model it is loaded into is never larger. None: no bound.

    Raises:
        UnsafeModelError: links to other files, virtual or external datasets, non-numeric datasets,
            too many objects or a dataset over ``max_dataset_bytes``.
        ValueError: not an HDF5 file.
    """
    import h5py

    with _open_h5(path, label) as f:
        count = 0

        def visit(name, link):
            nonlocal count
            count += 1
            if count > MAX_H5_OBJECTS:
                return f"has over {MAX_H5_OBJECTS:,} objects"
            if isinstance(link, h5py.ExternalLink):
                return f"links {name!r} to another file ({link.filename})"
            if isinstance(link, h5py.SoftLink):
                return f"has a soft link {name!r} (Keras writes none)"
            obj = f.get(name)
            return _dataset_problem(name, obj, max_dataset_bytes) if isinstance(obj, h5py.Dataset) else None

        problem = f.visititems_links(visit)
    if problem:
        raise UnsafeModelError(f"{label} {problem}; ktoolkit refuses to read it. Save the weights again with Keras.")


def _dataset_problem(name: str, dataset, max_bytes: int | None) -> str | None:
    if dataset.is_virtual or dataset.external:
        return f"stores dataset {name!r} in other files"
    if dataset.dtype.kind not in "biufc":
        return f"has a non-numeric dataset {name!r} ({dataset.dtype})"
    size = int(dataset.size or 0) * dataset.dtype.itemsize
    if max_bytes is not None and size > max_bytes:
        return (
            f"declares dataset {name!r} of shape {tuple(dataset.shape)} ({size:,} bytes), larger than any weight "
            "of the model"
        )
    return None


def legacy_weight_layers(path: str, label: str) -> list | None:
    """The layers of a Keras 2 ``.h5`` weights (or full-model) file: ``[(layer name, [weight shapes])]``.

    None for the newer ``.weights.h5`` layout, which Keras loads strictly itself. Shapes are read
    from the metadata, never the data.
    """
    with _open_h5(path, label) as f:
        group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        if "layer_names" not in group.attrs:
            return None
        layers = []
        for layer_name in group.attrs["layer_names"]:
            layer_name = layer_name.decode("utf8") if isinstance(layer_name, bytes) else str(layer_name)
            weights = group.get(layer_name)
            names = weights.attrs.get("weight_names", []) if weights is not None else []
            names = [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]
            shapes = [tuple(weights[n].shape) if n in weights else None for n in names]
            layers.append((layer_name, shapes))
    return layers


def max_weight_bytes(model) -> int:
    """The bound on one dataset of a weights file for ``model``: twice its largest variable, plus 1 MiB."""
    largest = max((_count(w.shape) * _itemsize(w.dtype) for w in model.weights), default=0)
    return 2 * largest + (1 << 20)


def _count(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim or 1)
    return total


def _itemsize(dtype) -> int:
    import numpy as np

    try:
        return np.dtype(getattr(dtype, "as_numpy_dtype", dtype)).itemsize
    except TypeError:  # a dtype numpy does not name (bfloat16 under some Keras versions): bound it as 8 bytes
        return 8


# --------------------------------------------------------------------------- weight files into a model
class WeightsMismatchError(ValueError):
    """A weights file that does not fit the model: the message names the first layer that does not match."""


def load_weights_file(model, path: str, label: str | None = None) -> str:
    """Loads the weights file ``path`` into ``model`` after checking that it fits; returns how it matched.

    Args:
        model: the target model.
        path: a ``.keras`` model file, a ``.weights.h5`` file or a Keras 2 ``.h5`` (weights or full model).
        label: how messages name the file (default: its name).

    Returns:
        "by name" or "in order".

    Raises:
        WeightsMismatchError: the first layer of ``model`` that gets no weights or weights of other
            shapes (the message does not name the file: callers add it and the fix).
        ValueError: not a weights file, or an unsafe one (these name the file).
    """
    label = label or os.path.basename(path)
    if path.lower().endswith(".keras"):
        return _copy_weights_by_name(model, path)
    check_h5_file(path, label, max_dataset_bytes=max_weight_bytes(model))
    layers = legacy_weight_layers(path, label)
    if layers is None:  # the .weights.h5 layout: Keras matches every variable by its place, strictly
        _keras_load(model, path, ".weights.h5")
        return "in order"
    problem = _mismatch_in_order(model, layers)
    if problem is None:
        _keras_load(model, path, ".h5")
        return "in order"
    file_names = {name for name, _ in layers}
    weighted = [layer.name for layer in model.layers if layer.weights]
    shared = sum(name in file_names for name in weighted)
    if shared:
        by_name = _mismatch_by_name(model, layers)
        if by_name is None and api_of(model) == "tf_keras":
            _keras_load(model, path, ".h5", by_name=True)
            return "by name"
        if 2 * shared >= len(weighted):  # mostly the same names: the file was meant to match by name
            problem = by_name or "the file matches only by layer name, which Keras 3 does not load"
    raise WeightsMismatchError(problem)


def _keras_load(model, path: str, suffix: str, by_name: bool = False):
    """Keras picks the layout by the file's suffix: a file named otherwise is linked under the right one."""
    import tempfile

    try:
        if path.lower().endswith(suffix) and not (suffix == ".h5" and path.lower().endswith(".weights.h5")):
            return model.load_weights(path, by_name=True) if by_name else model.load_weights(path)
        with tempfile.TemporaryDirectory(prefix="ktoolkit-weights-") as tmp:
            link = os.path.join(tmp, "weights" + suffix)
            os.symlink(os.path.abspath(path), link)
            return model.load_weights(link, by_name=True) if by_name else model.load_weights(link)
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsMismatchError((str(err).strip().splitlines() or [type(err).__name__])[0][:300]) from None


def _shapes(layer) -> list:
    """The layer's weight shapes in the order Keras 2 ``.h5`` files store them (trainable first)."""
    return [tuple(w.shape) for w in [*layer.trainable_weights, *layer.non_trainable_weights]]


def _mismatch_in_order(model, layers) -> str | None:
    targets = [(layer.name, _shapes(layer)) for layer in model.layers if layer.weights]
    saved = [(name, shapes) for name, shapes in layers if shapes]
    for (name, shapes), (file_name, file_shapes) in zip(targets, saved):
        if shapes != file_shapes:
            return (
                f"layer {name!r} expects weights of shapes {shapes}, the file's layer in its place "
                f"({file_name!r}) has {file_shapes}"
            )
    if len(targets) > len(saved):
        return (
            f"layer {targets[len(saved)][0]!r} has no weights in the file (the file has weights for "
            f"{len(saved)} layers, the model for {len(targets)})"
        )
    if len(saved) > len(targets):
        return (
            f"the file has weights for {len(saved)} layers, the model for {len(targets)} (the first extra "
            f"one is {saved[len(targets)][0]!r})"
        )
    return None


def _mismatch_by_name(model, layers) -> str | None:
    saved = dict(layers)
    for layer in model.layers:
        shapes = _shapes(layer)
        file_shapes = saved.get(layer.name)
        if shapes and not file_shapes:
            return f"layer {layer.name!r} has no weights in the file"
        if layer.name in saved and file_shapes != shapes:
            return (
                f"layer {layer.name!r} expects weights of shapes {shapes}, the file's layer of that name has "
                f"{file_shapes}"
            )
    return None


def _leaf_layers(model):
    """The layers of ``model`` with nested models opened up, so a base inside a classifier matches too."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _copy_weights_by_name(model, path) -> str:
    """Copies the weights of the ``.keras`` model ``path`` into ``model`` by layer name, all or nothing."""
    source = load_model(path, api=api_of(model))
    by_name = {}
    for layer in _leaf_layers(source):
        by_name.setdefault(layer.name, layer)
    pairs = []
    for layer in _leaf_layers(model):
        if not layer.weights:
            continue
        other = by_name.get(layer.name)
        if other is None or not other.weights:
            raise WeightsMismatchError(f"layer {layer.name!r} has no weights in the file")
        shapes, file_shapes = [tuple(w.shape) for w in layer.weights], [tuple(w.shape) for w in other.weights]
        if shapes != file_shapes:
            raise WeightsMismatchError(
                f"layer {layer.name!r} expects weights of shapes {shapes}, the file's layer "
                f"of that name has {file_shapes}"
            )
        pairs.append((layer, other))
    if not pairs:
        raise WeightsMismatchError("the model has no layers with weights to load")
    for layer, other in pairs:  # checked first, so a file that does not fit leaves the model as it was
        layer.set_weights(other.get_weights())
    return "by name"
