"""The recipe registry: name -> builder + metadata.

Transfer learning, compression, export and the CLI read this metadata instead of special-casing
architectures. Registering is a decorator on the builder function::

    @register("vgg16", family="vgg", paper=..., input_shape=(224, 224, 3), params=138_357_544, ...)
    def vgg16(input_shape=None, num_classes=1000, include_top=True, pooling=None, weights=None, name=None, **options): ...

Looking a recipe up never imports TensorFlow, so listing recipes is instant.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

TASKS = ("classification", "autoencoder", "contrastive")


class UnknownRecipeError(KeyError):
    """A recipe name that is not registered; the message lists the closest names."""

    def __init__(self, name: str, known: list[str]):
        close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else "run `ktool recipes` for the list."
        self.name = name
        self.suggestions = close
        super().__init__(f"unknown recipe {name!r}; {hint}")

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


@dataclass(frozen=True)
class Recipe:
    """What the toolkit knows about one architecture.

    Attributes:
        name: registry name, e.g. "resnet50".
        builder: the function that builds the Keras model.
        family: e.g. "resnet"; variants of a family share one generic builder.
        paper: short citation, "He et al. 2016, Deep Residual Learning for Image Recognition".
        input_shape: the paper's input shape (height, width, channels).
        num_classes: the paper's number of classes.
        params: parameter count (``model.count_params()``, batch-norm statistics included) of the
            canonical configuration: the defaults, built with tf_keras.
        paper_params: the parameter count the paper reports, for comparison (None if it gives none).
        preprocessing: the normalization the model expects (see ``recipes.layers.PREPROCESSING_MODES``);
            built into the model unless ``include_preprocessing=False``.
        layer_groups: ``(group, last layer name)`` from input to output, e.g. ``("block3", "block3_pool")``:
            the depths where features can be taken and the units that are frozen together.
        head_start: name of the first layer of the classifier head (None when there is none).
        min_size: smallest height/width the builder accepts (the tests build at this size).
        task: "classification", "autoencoder" or "contrastive".
        description: one line for `ktool recipes`.
    """

    name: str
    builder: Callable
    family: str
    paper: str
    input_shape: tuple
    params: int
    preprocessing: str
    layer_groups: tuple = ()
    head_start: str | None = "predictions"
    num_classes: int = 1000
    paper_params: float | None = None
    min_size: int = 32
    task: str = "classification"
    description: str = ""
    options: dict = field(default_factory=dict)

    def build(self, **kwargs):
        """Builds the model; keyword arguments are the builder's (``num_classes``, ``api``, ...)."""
        return self.builder(**kwargs)

    def group_names(self) -> list[str]:
        return [group for group, _ in self.layer_groups]

    def group_output(self, group: str) -> str:
        """The name of the last layer of ``group``; raises a ValueError listing the groups."""
        for name, layer in self.layer_groups:
            if name == group:
                return layer
        raise ValueError(f"{self.name} has no layer group {group!r}; its groups are {', '.join(self.group_names())}.")


_REGISTRY: dict[str, Recipe] = {}


def register(name: str, **metadata) -> Callable:
    """Decorator that registers a builder under ``name`` with its :class:`Recipe` metadata."""

    def decorator(builder: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(
                f"recipe {name!r} is registered twice ({_REGISTRY[name].builder.__module__} and {builder.__module__})."
            )
        if metadata.get("task", "classification") not in TASKS:
            raise ValueError(f"recipe {name!r}: task must be one of {TASKS}.")
        _REGISTRY[name] = Recipe(name=name, builder=builder, **metadata)
        builder.recipe_name = name
        return builder

    return decorator


# Names people know the paper's networks by (VGG-16 and VGG-19 are configurations D and E).
ALIASES = {"vgg16": "vgg_d", "vgg19": "vgg_e"}


def get(name: str) -> Recipe:
    """Returns the recipe called ``name`` (or an alias, e.g. vgg16 = vgg_d); raises
    :class:`UnknownRecipeError` with close matches."""
    _load_all()
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise UnknownRecipeError(name, sorted(_REGISTRY))
    return _REGISTRY[key]


def names(task: str | None = None, family: str | None = None) -> list[str]:
    """Registered names, in registration order, optionally of one task or family."""
    _load_all()
    return [
        r.name
        for r in _REGISTRY.values()
        if (task is None or r.task == task) and (family is None or r.family == family)
    ]


def all_recipes() -> list[Recipe]:
    _load_all()
    return list(_REGISTRY.values())


def build(name: str, **kwargs):
    """Builds recipe ``name``: ``build("resnet18", num_classes=10, input_shape=(64, 64, 3))``."""
    return get(name).build(**kwargs)


def _load_all():
    import recipes  # noqa: F401  (importing the package registers every family)
