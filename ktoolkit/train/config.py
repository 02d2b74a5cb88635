"""Training configuration: one dataclass, validated early, written into every run folder.

The CLI flags of `ktool train` are these fields with ``-`` for ``_``; a YAML file holds the same
names (``ktool train --config cfg.yaml --epochs 5``: flags override the file).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "warmup-cosine", "reduce-on-plateau")
DISTRIBUTES = ("auto", "none", "mirrored", "multiworker")
CACHES = ("memory", "none")  # or a file path
CLASS_WEIGHTS = ("auto", "none")
#: --class-weight auto weights the classes when the largest has more than this times the images of the smallest.
IMBALANCE_THRESHOLD = 1.5
#: A settings file is a few hundred bytes; anything bigger is the wrong file (and is not parsed).
MAX_CONFIG_BYTES = 1 << 20
#: Largest image side a run takes: beyond it one batch alone would not fit in memory.
MAX_IMAGE_SIDE = 8192
_MAX_INT = 2**63 - 1  # what TensorFlow's int64 holds
#: ``lr: auto``: the learning rate is found by the learning-rate finder (`ktool lr-find`) before training.
LR_AUTO = "auto"


class ConfigError(ValueError):
    """A setting with a bad value. ``field``, ``value`` and ``hint`` let the CLI name the flag or the
    file the value came from; ``where`` is that file, once known."""

    def __init__(self, field: str, value, hint: str, where: str = ""):
        self.field, self.value, self.hint, self.where = field, value, hint, where
        shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."  # a file's value is bounded
        super().__init__((f"{where}: " if where else "") + f"{field}={shown}: {hint}")

    def located(self, where) -> ConfigError:
        """The same error, saying which file the value came from."""
        return ConfigError(self.field, self.value, self.hint, str(where))


def _kind(value) -> str:
    """What a wrong value is, in YAML's words, for "(not a string)"."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, numbers.Integral):
        return "a whole number"
    if isinstance(value, numbers.Real):
        return "a fraction" if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "null" if value is None else type(value).__name__


def _as_int(name, value) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if abs(value) > _MAX_INT:
            raise ConfigError(name, value, "is too large for a whole-number setting (at most 2**63 - 1).")
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return _as_int(name, int(value))  # 5.0 from a YAML file means 5
    raise ConfigError(name, value, f"must be a whole number (not {_kind(value)}).")


def _as_float(name, value) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(name, value, "must be a finite number.")
        return float(value)
    raise ConfigError(name, value, f"must be a number (not {_kind(value)}).")


def _number_or_word(name, value, words) -> float | str:
    """A number, or one of ``words`` (``lr``: a rate, or "auto"). A string that reads as a number is one
    (YAML 1.1 reads ``1e-3``, without a dot, as a string)."""
    if isinstance(value, str):
        if value.strip().lower() in words:
            return value.strip().lower()
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(
                name, value, f"must be a number, e.g. 1e-3, or {' or '.join(words)} (the learning-rate finder's pick)."
            ) from None
    return _as_float(name, value)


def number_or_auto(value):
    """The ``--lr`` flag's type: a number as a float, anything else as given (the config names a bad one
    in one line, ``--lr fast: must be a number ... or auto``, where click would add its usage text)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def accepts_auto(config_class, name: str = "lr") -> bool:
    """Whether ``config_class``'s field ``name`` takes "auto" (``lr``: train and finetune, not pretrain)."""
    annotation = _field_types(config_class).get(name)
    return any(LR_AUTO in typing.get_args(a) for a in typing.get_args(annotation) if typing.get_origin(a) is Literal)


def _as_size(name, value, length: int) -> tuple:
    """(height, width) from HEIGHT (a square) or [HEIGHT, WIDTH] of whole numbers >= 1."""
    items = [value] * length if isinstance(value, numbers.Real) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or len(items) != length:
        raise ConfigError(
            name, value, f"must be HEIGHT,WIDTH: {length} whole numbers, e.g. [224, 224] (not {_kind(value)})."
        )
    try:
        size = tuple(_as_int(name, v) for v in items)
    except ConfigError:
        size = ()
    if len(size) != length or min(size) < 1:
        raise ConfigError(name, value, f"must be HEIGHT,WIDTH: {length} whole numbers >= 1, e.g. [224, 224].")
    return size


def _checked(name: str, value, annotation):
    """``value`` as the type ``annotation`` says (int, float, bool, str, dict, tuple, X | None), or a
    ConfigError naming ``name``. Only lossless conversions: 5.0 -> 5, 1 -> 1.0, a path -> str."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        if words:  # float | Literal["auto"]: the learning rate
            return _number_or_word(name, value, words)
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if annotation is bool:
        if isinstance(value, bool):  # YAML's true/false/yes/no; a quoted "no" would be truthy
            return value
        raise ConfigError(name, value, f"must be true or false (not {_kind(value)}).")
    if annotation is int:
        return _as_int(name, value)
    if annotation is float:
        return _as_float(name, value)
    if annotation is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ConfigError(name, value, f"must be a string (not {_kind(value)}).")
    if typing.get_origin(annotation) is tuple:
        return _as_size(name, value, len(args))
    if annotation is dict or typing.get_origin(annotation) is dict:
        if value is None:  # recipe_options: null in older files means none
            return {}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ConfigError(name, value, f"must be a mapping of name: value (not {_kind(value)}).")
    return value


@dataclass
class RunConfig:
    """What the configurations of runs share (`ktool train`, `pretrain`, `finetune`): the settings they
    have in common (each command redeclares the ones whose default differs), the YAML file of settings
    (the same names as the flags, one flat mapping), and the checks of the fields they have in common.

    Attributes:
        data: a class-per-folder directory, a CSV, an .npz, or ``tfds:NAME``.
        out: the run folder (created; an interrupted run there is resumed).
        epochs: number of epochs.
        batch_size: images per replica per step; the global batch is this times the replicas.
        optimizer: sgd (with momentum), adam, adamw or rmsprop.
        lr: peak learning rate (scaled by nothing; set it for the global batch).
        momentum: SGD/RMSprop momentum.
        schedule: constant, step (x0.1 at 50% and 75% of the epochs), cosine, warmup-cosine (a linear
            warm-up from 0 over the first 10% of the steps, then cosine decay; SimCLR's), or reduce-on-plateau.
        weight_decay: decoupled weight decay of the optimizer (AdamW-style for every optimizer).
        distribute: auto (all visible GPUs with MirroredStrategy, else the default strategy), none,
            mirrored, or multiworker (MultiWorkerMirroredStrategy from TF_CONFIG).
        image_size: (height, width) to train at; default the recipe's (or the base's).
        channels: 1 or 3; default the recipe's.
        val_fraction, test_fraction: stratified split of unsplit data.
        seed: seed for the split, shuffling, augmentation and initialization.
        augment: augmentations, e.g. "flip,crop" or "flip,crop,color=20,mixup=0.2"; "none" (the default:
            flips are wrong for digits and text, so augmentation is asked for, not assumed).
        cache: "memory", "none", or a folder for tf.data's cache files (one set per split and image size).
        strict: fail on unreadable images instead of skipping them.
        deterministic: deterministic tf.data order (slower).
        data_dir: tensorflow-datasets data folder for ``tfds:`` sources.
        steps_per_epoch: cap on steps per epoch (quick runs); None: the whole training split.
    """

    data: str = ""
    out: str = "runs/train"
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    schedule: str = "constant"
    weight_decay: float = 0.0
    distribute: str = "auto"
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    augment: str = "none"
    cache: str = "memory"
    strict: bool = False
    deterministic: bool = False
    data_dir: str | None = None
    steps_per_epoch: int | None = None

    KIND = "run"  # in messages: "unknown run setting(s)"
    RESUMABLE = ()  # settings that may differ when an interrupted run is resumed
    LABELLED = True  # the run trains a classifier: its data needs at least 2 classes

    def resolved(self):
        """A copy with defaults that depend on other fields filled in, as the run folder records it
        (PretrainConfig fills the method's recipe and views); the fields as they are by default."""
        return self

    def __post_init__(self):
        """Checks every field's type against its annotation, naming the field (YAML's "no" in quotes is a
        string, not false), and normalizes what YAML and flags give loosely: image_size 64 -> (64, 64)."""
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), hints[f.name]))

    def _bad(self, name, hint):
        raise ConfigError(name, getattr(self, name), hint)

    def check_common(self):
        """Raises a ValueError naming the first bad field among the common ones (optimizer,
        schedule, distribute, epochs, batch size, learning rate, weight decay, split fractions,
        channels, image size, steps per epoch)."""
        bad = self._bad
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"use one of {', '.join(OPTIMIZERS)}.")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"use one of {', '.join(SCHEDULES)}.")
        if self.distribute not in DISTRIBUTES:
            bad("distribute", f"use one of {', '.join(DISTRIBUTES)}.")
        if self.epochs is not None and not (isinstance(self.epochs, int) and self.epochs >= 1):
            bad("epochs", "must be a whole number >= 1.")  # None: the command's default (ktool finetune)
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            bad("batch_size", "must be a whole number >= 1 (per replica).")
        if self.lr not in (None, LR_AUTO) and not self.lr > 0:  # None: the command's default (ktool finetune)
            bad("lr", "the learning rate must be > 0, e.g. 1e-3 for adam, 0.1 for sgd.")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0, e.g. 1e-4.")
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1).")
        if self.val_fraction + self.test_fraction >= 1:
            bad("val_fraction", f"plus test_fraction={self.test_fraction} leaves no training data.")
        if self.channels not in (None, 1, 3):
            bad("channels", "must be 1 (grayscale) or 3 (RGB).")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            bad("image_size", "must be HEIGHT,WIDTH, e.g. 224,224.")
        if self.image_size is not None and max(self.image_size) > MAX_IMAGE_SIDE:
            bad(
                "image_size",
                f"at most {MAX_IMAGE_SIDE} pixels a side (one batch would not fit in memory); train at e.g. 224,224.",
            )
        if not 0 <= self.seed < 2**32:  # what NumPy's and Python's random generators take
            bad("seed", "must be a whole number in [0, 2**32), e.g. 0.")
        if not self.out:
            bad("out", "give a run folder, e.g. runs/NAME.")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            bad("steps_per_epoch", "must be >= 1, or None for the whole split.")

    def check_recipe_options(self, recipe):
        """Refuses recipe_options the recipe's builder does not take, where its signature lists them
        (builders that forward ``**options`` to their family's are checked when they build)."""
        import inspect

        reserved = sorted({"input_shape", "num_classes"} & set(self.recipe_options))
        if reserved:
            self._bad(
                "recipe_options",
                f"{', '.join(reserved)} come from the run (--image-size, --channels and the "
                "data's classes); leave them out.",
            )
        params = inspect.signature(recipe.builder).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        taken = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(self.recipe_options) - set(params))
        if unknown:
            self._bad(
                "recipe_options",
                f"{recipe.name} has no option {', '.join(unknown)}; its options are {', '.join(taken)}.",
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def check_names(cls, values: dict, where: str = ""):
        """Raises a ValueError for keys of ``values`` that are no setting, with the closest names."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in values if k not in names)
        if unknown:
            import difflib

            hints = [
                f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, names, 1)) else u for u in unknown
            ]
            raise ValueError(
                (f"{where}: " if where else "") + f"unknown {cls.KIND} setting(s): {', '.join(hints)}; "
                f"the settings are {', '.join(sorted(names))}."
            )

    @classmethod
    def from_dict(cls, values: dict):
        cls.check_names(values)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path, **overrides):
        """Reads a YAML file of settings; ``overrides`` that are not None win over the file.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a file over :data:`MAX_CONFIG_BYTES`, a YAML syntax error (with its line), not a
                mapping, an unknown setting or a bad value; the message names the file.
        """
        values = read_settings(path)
        cls.check_names(values, where=f"config file {path}")
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls.from_dict({**values, **given})
        except ConfigError as err:
            raise (err.located(f"config file {path}") if err.field not in given else err) from None


@functools.cache
def _field_types(cls) -> dict:
    """The dataclass fields' annotations as types (the modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def read_settings(path) -> dict:
    """The mapping of a YAML settings file, read bounded (:data:`MAX_CONFIG_BYTES`) and never executed
    (``yaml.safe_load``). Errors name the file, and the line for a syntax error."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist.")
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder; give a YAML file, e.g. a run's config.yaml.")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)  # bounded even for /dev/zero or a file that grows
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"config file {path} is over {MAX_CONFIG_BYTES // 2**20} MiB; a settings file is a few "
            "lines of name: value (like a run's config.yaml): is it the right file?"
        )
    try:
        values = yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise ValueError(
            f"config file {path}: {_yaml_problem(err)}; settings are `name: value` lines, like a run's config.yaml."
        ) from None
    except RecursionError:
        raise ValueError(f"config file {path} is nested too deeply to be a settings file.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"config file {path} must be a mapping of setting: value, like the config.yaml of a run "
            f"(it is {_kind(values)})."
        )
    return values


def _yaml_problem(err) -> str:
    """ "YAML syntax error at line 3, column 5: ..." from a yaml.YAMLError (lines counted from 1)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "reason", None) or str(err).splitlines()[0]
    if mark is None and hasattr(err, "position"):  # yaml.reader.ReaderError: bytes that are not text
        return f"not UTF-8 text (byte {err.position}: {problem})"
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"YAML syntax error{where}: {problem}"


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run depends on: :class:`RunConfig`'s settings and these.

    Attributes:
        recipe: registry name of the architecture (``ktool recipes`` lists them).
        lr: peak learning rate, or "auto": the learning-rate finder's suggestion (``ktool lr-find``'s
            valley), found before the first epoch and written into config.yaml and the report.
        label_smoothing: label smoothing of the cross-entropy.
        mixed_precision: float16 compute on GPUs (bfloat16 on CPUs), float32 variables.
        jit: compile the training step with XLA.
        early_stopping: patience in epochs on the validation loss (0: off).
        class_weight: "auto" (balanced weights ``n / (classes * count)`` when the largest class of the
            training split has more than :data:`IMBALANCE_THRESHOLD` times the images of the smallest)
            or "none".
        recipe_options: extra keyword arguments of the recipe builder (e.g. {"dropout": 0.3}).
    """

    recipe: str = "lenet5"
    lr: float | Literal["auto"] = 1e-3
    label_smoothing: float = 0.0
    mixed_precision: bool = False
    jit: bool = False
    early_stopping: int = 0
    class_weight: str = "auto"
    recipe_options: dict = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        """Raises a ValueError naming the first bad field, its value and the valid ones."""
        bad = self._bad
        if not self.data:
            bad("data", "give the training data: a folder with one subfolder per class, a CSV, an .npz or tfds:NAME.")
        self.check_common()
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", "must be in [0, 1), e.g. 0.1.")
        if self.early_stopping < 0:
            bad("early_stopping", "is a patience in epochs; 0 turns it off.")
        if self.class_weight not in CLASS_WEIGHTS:
            bad("class_weight", f"use one of {', '.join(CLASS_WEIGHTS)}.")
        from ktoolkit.data.augment import AugmentConfig

        AugmentConfig.parse(self.augment)  # a ValueError names a bad option, before anything is loaded
        import recipes

        recipe = recipes.get(self.recipe)  # UnknownRecipeError with close matches
        self.check_recipe_options(recipe)
        if recipe.task != "classification":
            raise ValueError(
                f"recipe={self.recipe!r} is {'an' if recipe.task[0] in 'aeiou' else 'a'} {recipe.task} "
                "model, trained without labels; `ktool train` trains classifiers "
                f"({', '.join(recipes.names(task='classification')[:4])}, ...)."
            )
        return self

    KIND = "training"
    # Settings that may differ when an interrupted run is resumed (they do not change the result).
    RESUMABLE = ("epochs", "early_stopping", "deterministic", "strict", "cache", "data_dir", "distribute")
