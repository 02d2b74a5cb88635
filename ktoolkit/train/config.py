"""Training configuration: one dataclass, validated early, written into every run folder.

The CLI flags of `ktool train` are these fields with ``-`` for ``_``; a YAML file holds the same
names (``ktool train --config cfg.yaml --epochs 5``: flags override the file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "reduce-on-plateau")
DISTRIBUTES = ("auto", "none", "mirrored", "multiworker")
CACHES = ("memory", "none")  # or a file path


class RunConfig:
    """What the configurations of runs share (`ktool train`, `pretrain`, `finetune`): the YAML file of
    settings (the same names as the flags), and the checks of the fields they have in common."""

    KIND = "run"  # in messages: "unknown run setting(s)"
    RESUMABLE: tuple = ()  # settings that may differ when an interrupted run is resumed

    def __post_init__(self):
        """Normalizes what YAML and flags give loosely: image_size 64 or [64, 64] -> (64, 64)."""
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = tuple(int(v) for v in self.image_size)
        elif isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        if hasattr(self, "recipe_options"):
            self.recipe_options = dict(self.recipe_options or {})

    def _bad(self, name, hint):
        raise ValueError(f"{name}={getattr(self, name)!r}: {hint}")

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
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            bad("epochs", "must be a whole number >= 1.")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            bad("batch_size", "must be a whole number >= 1 (per replica).")
        if self.lr is not None and not self.lr > 0:  # None: the command's default (ktool finetune)
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
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            bad("steps_per_epoch", "must be >= 1, or None for the whole split.")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size else None
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            import difflib

            hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, names, 1)) else u for u in unknown]
            raise ValueError(f"unknown {cls.KIND} setting(s): {', '.join(hints)}; the settings are {', '.join(sorted(names))}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path, **overrides):
        """Reads a YAML file of settings; ``overrides`` that are not None win over the file."""
        import yaml

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist.")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must be a mapping of setting: value, like the config.yaml of a run.")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run depends on.

    Attributes:
        recipe: registry name of the architecture (``ktool recipes`` lists them).
        data: a class-per-folder directory, a CSV, an .npz, or ``tfds:NAME``.
        out: the run folder (created; an interrupted run there is resumed).
        epochs: number of epochs.
        batch_size: images per replica per step; the global batch is this times the replicas.
        optimizer: sgd (with momentum), adam, adamw or rmsprop.
        lr: peak learning rate (scaled by nothing; set it for the global batch).
        momentum: SGD/RMSprop momentum.
        schedule: constant, step (x0.1 at 50% and 75% of the epochs), cosine, or reduce-on-plateau.
        weight_decay: decoupled weight decay of the optimizer (AdamW-style for every optimizer).
        label_smoothing: label smoothing of the cross-entropy.
        mixed_precision: float16 compute on GPUs (bfloat16 on CPUs), float32 variables.
        jit: compile the training step with XLA.
        distribute: auto (all visible GPUs with MirroredStrategy, else the default strategy), none,
            mirrored, or multiworker (MultiWorkerMirroredStrategy from TF_CONFIG).
        image_size: (height, width) to train at; default the recipe's.
        channels: 1 or 3; default the recipe's.
        val_fraction, test_fraction: stratified split of unsplit data.
        seed: seed for the split, shuffling, augmentation and initialization.
        augment: augmentations, e.g. "flip,crop" or "flip,crop,color=20,mixup=0.2"; "none" (the default:
            flips are wrong for digits and text, so augmentation is asked for, not assumed).
        cache: "memory", "none", or a folder for tf.data's cache files (one set per split and image size).
        early_stopping: patience in epochs on the validation loss (0: off).
        strict: fail on unreadable images instead of skipping them.
        deterministic: deterministic tf.data order (slower).
        data_dir: tensorflow-datasets data folder for ``tfds:`` sources.
        steps_per_epoch: cap on steps per epoch (quick runs); None: the whole training split.
        recipe_options: extra keyword arguments of the recipe builder (e.g. {"dropout": 0.3}).
    """

    recipe: str = "lenet5"
    data: str = ""
    out: str = "runs/train"
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    schedule: str = "constant"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    mixed_precision: bool = False
    jit: bool = False
    distribute: str = "auto"
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    augment: str = "none"
    cache: str = "memory"
    early_stopping: int = 0
    strict: bool = False
    deterministic: bool = False
    data_dir: str | None = None
    steps_per_epoch: int | None = None
    recipe_options: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Raises a ValueError naming the first bad field, its value and the valid ones."""
        bad = self._bad
        if not self.data:
            bad("data", "give the training data: a folder with one subfolder per class, a CSV, an .npz or tfds:NAME.")
        self.check_common()
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", "must be in [0, 1), e.g. 0.1.")
        if self.early_stopping < 0:
            bad("early_stopping", "is a patience in epochs; 0 turns it off.")
        import recipes

        recipe = recipes.get(self.recipe)  # UnknownRecipeError with close matches
        if recipe.task != "classification":
            raise ValueError(f"recipe={self.recipe!r} is {'an' if recipe.task[0] in 'aeiou' else 'a'} {recipe.task} "
                             "model, trained without labels; `ktool train` trains classifiers "
                             f"({', '.join(recipes.names(task='classification')[:4])}, ...).")
        return self

    KIND = "training"
    # Settings that may differ when an interrupted run is resumed (they do not change the result).
    RESUMABLE = ("epochs", "early_stopping", "deterministic", "strict", "cache", "data_dir", "distribute")
