"""What `ktool finetune --base` accepts, made into one thing: a headless network with its preprocessing.

A base is one of
- a keras.applications network (:data:`APPLICATIONS`), with ``weights`` "imagenet" (the Keras download,
  or the file already in the Keras cache ~/.keras/models), a weights file, or "none";
- a recipe from the registry (``ktool recipes``), with a weights file or "none";
- a run folder of `ktool train`, `ktool finetune` (its best model without the classifier) or
  `ktool pretrain` (its encoder).

Every base takes 0..255 pixels: the network's own preprocessing is a layer inside the model.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Application:
    """A keras.applications network: its constructor, default input size and preprocessing."""

    constructor: str
    size: int
    preprocessing: str  # an ImagePreprocessing mode; "none" where the network rescales inputs itself
    min_size: int = 32
    paper: str = ""


APPLICATIONS = {
    "vgg16": Application("VGG16", 224, "caffe", paper="Simonyan and Zisserman 2015"),
    "vgg19": Application("VGG19", 224, "caffe", paper="Simonyan and Zisserman 2015"),
    "resnet50": Application("ResNet50", 224, "caffe", paper="He et al. 2016"),
    "resnet101": Application("ResNet101", 224, "caffe", paper="He et al. 2016"),
    "resnet152": Application("ResNet152", 224, "caffe", paper="He et al. 2016"),
    "inception_v3": Application("InceptionV3", 299, "tf", min_size=75, paper="Szegedy et al. 2016"),
    "mobilenet_v2": Application("MobileNetV2", 224, "tf", paper="Sandler et al. 2018"),
    "mobilenet_v3_small": Application("MobileNetV3Small", 224, "none", paper="Howard et al. 2019"),
    "mobilenet_v3_large": Application("MobileNetV3Large", 224, "none", paper="Howard et al. 2019"),
    "efficientnet_b0": Application("EfficientNetB0", 224, "none", paper="Tan and Le 2019"),
    "efficientnet_b1": Application("EfficientNetB1", 240, "none", paper="Tan and Le 2019"),
    "efficientnet_b2": Application("EfficientNetB2", 260, "none", paper="Tan and Le 2019"),
    "efficientnet_b3": Application("EfficientNetB3", 300, "none", paper="Tan and Le 2019"),
}


@dataclass
class Base:
    """A headless network ready for transfer.

    Attributes:
        name: what was asked for (application or recipe name, or the run folder).
        model: tf_keras functional model, 0..255 pixels -> top features (4-D map or flat vector).
        weights: where the weights came from, for the report ("imagenet", a path, "none", a run).
        pretrained: False when the weights are random ("none").
        image_size: (height, width) the base is built for.
        channels: input channels.
        preprocessing: the ImagePreprocessing mode inside the model (for export metadata).
        groups: cut points, input to output (the last one is the top): where features are read for
            probes and where blocks are unfrozen from.
    """

    name: str
    model: object
    weights: str
    pretrained: bool
    image_size: tuple
    channels: int
    preprocessing: str
    groups: list
    size_reason: str = ""  # why the base takes image_size (see choose_input_size)

    @property
    def top(self) -> str:
        return self.model.layers[-1].name


# ------------------------------------------------------------------------------------- input size
SIZE_STEP = 32  # the networks here downsample by 32: other sizes work, but waste a ragged border
# The smallest input for pretrained (ImageNet) weights: the smallest resolution Keras publishes MobileNetV2's
# ImageNet weights for. Below it the pretrained filters see objects far smaller than they were trained on:
# on 32x32 CIFAR-10 (1,000 images, 5-fold probes, MobileNetV2 ImageNet) the best probe reached 52.6% at 32x32
# against 65.8% at 64, 63.7% at 96 and 66.3% at 128. Random weights (--weights none) take the network's minimum.
PRETRAINED_MIN_SIZE = 96


def input_size_rule(data_size, minimum: int, default: int) -> tuple[int, int]:
    """The input (height, width) for images whose median resolution is ``data_size`` (height, width):
    each side rounded to the nearest multiple of 32, at least the base's ``minimum`` and at most its
    ``default`` (the size it was pretrained at). Small images are not upsampled beyond what the base needs:
    upsampling adds no information and costs the square of the factor in compute (224 for 32x32 images
    is 49 times the work of 32)."""
    return tuple(int(min(default, max(minimum, SIZE_STEP * int(side / SIZE_STEP + 0.5)))) for side in data_size)


def data_resolution(source, sample: int = 256, seed: int = 0) -> tuple[int, int] | None:
    """The median (height, width) of ``source``'s train+val images, from the cheapest place that knows it:
    the arrays' shape (.npz, TFDS with a fixed shape), the folder scan when every image has one size, else
    the headers of up to ``sample`` random files (Pillow reads the size without decoding), or the first
    ``sample`` TFDS examples. None when there are no images."""
    if source.image_shape:
        return tuple(int(d) for d in source.image_shape[:2])
    scan = getattr(source, "scan", None)
    if scan is not None and scan.min_size and scan.min_size == scan.max_size:
        return int(scan.min_size[1]), int(scan.min_size[0])
    splits = [source.splits[n] for n in ("train", "val") if n in source.splits and len(source.splits[n])]
    if any(split.kind == "images" for split in splits):
        return tuple(int(d) for d in next(s for s in splits if s.kind == "images").images.shape[1:3])
    paths = [p for split in splits if split.kind == "paths" for p in split.paths]
    if paths:
        rng = np.random.default_rng(seed)
        sizes = [_header_size(paths[i]) for i in rng.permutation(len(paths))[:sample]]
    else:
        sizes = [tuple(int(d) for d in image.shape[:2]) for s in splits for image, _ in s.dataset.take(sample)]
    sizes = [size for size in sizes if size]
    return tuple(int(round(float(np.median(side)))) for side in zip(*sizes)) if sizes else None


def _header_size(path) -> tuple[int, int] | None:
    """(height, width) from an image file's header, None if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError):
        return None
    return int(height), int(width)


def choose_input_size(name: str, source=None, image_size=None, weights=None) -> tuple[tuple | None, str]:
    """The input size for base ``name`` on ``source`` (a DataSource) and why: ``(size or None, reason)``;
    None means the base's own size.

    ``image_size`` (``--image-size``) wins; a run folder or a recipe takes its own fixed size; a
    keras.applications base takes :func:`input_size_rule` of the data's median resolution, floored at
    :data:`PRETRAINED_MIN_SIZE` with pretrained ``weights`` (anything but "none") and at the network's own
    minimum with random ones.
    """
    key = str(name).lower().replace("-", "_")
    given = tuple(int(d) for d in image_size) if image_size else None
    if Path(os.path.expanduser(str(name))).is_dir():
        return given, "the run folder's own fixed input size" + (" (--image-size ignored)" if given else "")
    if given:
        return given, f"--image-size {given[0]},{given[1]} (given)"
    if key not in APPLICATIONS:
        return None, "the recipe's own input size"
    app = APPLICATIONS[key]
    data = data_resolution(source) if source is not None else None
    if data is None:
        return None, f"{key}'s default {app.size}x{app.size}" + ("" if source is None else " (no image sizes known)")
    random = weights is not None and str(weights).lower() == "none"
    floor = app.min_size if random else max(app.min_size, PRETRAINED_MIN_SIZE)
    size = input_size_rule(data, floor, app.size)
    least = f"{key}'s minimum {floor}" if random else f"{floor}, the smallest input for pretrained weights,"
    return size, (
        f"the data's median resolution {data[0]}x{data[1]} (height x width) rounded to multiples of {SIZE_STEP}, "
        f"at least {least} and at most {key}'s default {app.size}: images are not upsampled beyond what the "
        "base needs (--image-size overrides)"
    )


def load_base(name: str, *, weights: str | None = None, image_size=None, data=None) -> Base:
    """Builds the base ``name`` with ``weights`` at ``image_size``.

    Without ``image_size``: from the data (``data``, a DataSource) by :func:`choose_input_size`, else the
    base's own size; ``Base.size_reason`` says which and why. ``weights`` None means "imagenet" for
    keras.applications, the run's own for run folders and "none" for registry recipes.

    Raises:
        ValueError: an unknown base, a weights value that does not fit it, or an impossible download
            (the message says where to put the file).
        FileNotFoundError: a weights file or run folder that does not exist.
    """
    size, reason = choose_input_size(name, data, image_size, weights)
    base = _load_base(name, weights, size)
    if size is None or Path(os.path.expanduser(str(name))).is_dir():
        reason = f"{reason}: {base.image_size[0]}x{base.image_size[1]}"
    base.size_reason = reason
    log.info("input size %dx%d: %s", *base.image_size, reason)
    return base


def _load_base(name: str, weights, image_size) -> Base:
    import recipes

    path = Path(os.path.expanduser(str(name)))
    if path.is_dir():
        return _from_run(path, weights, image_size)
    key = str(name).lower().replace("-", "_")
    if key in APPLICATIONS:
        return _from_application(key, weights or "imagenet", image_size)
    if str(name).endswith((".keras", ".h5")) or os.sep in str(name):
        raise FileNotFoundError(
            f"--base {name}: no such run folder; give a run folder (runs/NAME), an application "
            f"({', '.join(APPLICATIONS)}) or a recipe name."
        )
    try:
        recipe = recipes.get(key)
    except recipes.UnknownRecipeError:
        raise _unknown_base(name, key) from None
    return _from_recipe(recipe, weights or "none", image_size)


def _unknown_base(name: str, key: str) -> ValueError:
    """The error for a --base that is no application, recipe or run folder, with the closest names."""
    import difflib

    import recipes

    close = difflib.get_close_matches(key, list(dict.fromkeys([*APPLICATIONS, *recipes.names()])), 4, 0.6)
    return ValueError(
        f"--base {name!r} is not a keras.applications base ({', '.join(APPLICATIONS)}), a recipe "
        "(`ktool recipes`) or a run folder" + (f"; did you mean {', '.join(close)}?" if close else ".")
    )


def check_base(name: str, weights: str | None = None):
    """What :func:`load_base` would refuse about ``name`` and ``weights`` by name alone, without
    TensorFlow (the CLI calls it before the seconds TensorFlow takes to load).

    Raises:
        ValueError: a name that is no keras.applications base, recipe, run folder or file (with the
            closest names).
        FileNotFoundError: a path-like base or a weights file that does not exist.
    """
    import recipes

    path = Path(os.path.expanduser(str(name)))
    key = str(name).lower().replace("-", "_")
    if not path.exists() and key not in APPLICATIONS:
        if str(name).endswith((".keras", ".h5")) or os.sep in str(name):
            raise FileNotFoundError(
                f"--base {name}: no such run folder; give a run folder (runs/NAME), an "
                f"application ({', '.join(APPLICATIONS)}) or a recipe name."
            )
        try:
            recipes.get(key)
        except recipes.UnknownRecipeError:
            raise _unknown_base(name, key) from None
    if (
        weights is not None
        and str(weights).lower() not in ("imagenet", "none", "run")
        and not Path(os.path.expanduser(str(weights))).is_file()
    ):
        raise FileNotFoundError(
            f"--weights {weights}: no such file; give imagenet, none, or the path of a .h5 or .keras weights file."
        )


def _size(image_size, default: int, minimum: int, name: str) -> tuple:
    size = tuple(image_size) if image_size else (default, default)
    if min(size) < minimum:
        raise ValueError(f"--image-size {size[0]},{size[1]}: {name} needs at least {minimum}x{minimum}.")
    return size


def _from_application(key: str, weights: str, image_size) -> Base:
    import tf_keras

    from recipes.layers import custom_layers

    app = APPLICATIONS[key]
    size = _size(image_size, app.size, app.min_size, key)
    inputs = tf_keras.Input((*size, 3), name="image")
    x = custom_layers("tf_keras").ImagePreprocessing(app.preprocessing, name="preprocessing")(inputs)
    build = getattr(tf_keras.applications, app.constructor)
    kwargs = {"include_top": False, "input_tensor": x, "input_shape": (*size, 3)}
    if key.startswith("mobilenet_v3"):
        kwargs["include_preprocessing"] = True
    lowered = str(weights).lower()
    if lowered == "imagenet":
        network = _download(key, lambda: build(weights="imagenet", **kwargs))
    else:
        network = build(weights=None, **kwargs)
    model = tf_keras.Model(inputs, network.output, name=key)
    if lowered not in ("imagenet", "none"):
        _load_weights_file(model, weights, key)
    return _finish(key, model, weights, lowered != "none", size, 3, app.preprocessing)


def _reason(text: str) -> str:
    """The useful end of Keras's fetch-failure message ("... -- [Errno -2] Name or service not known")."""
    first = text.strip().splitlines()[0] if text.strip() else "no reason given"
    reason = first.rsplit(" -- ", 1)[-1] if " -- " in first else first
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _download(key: str, build):
    """Builds with weights="imagenet"; when the download fails, says which file to put where."""
    try:
        return build()
    except Exception as err:  # Keras raises a bare Exception for fetch failures
        text = str(err)
        if "fetch failure" not in text.lower() and "url" not in text.lower():
            raise
        url = re.search(r"https?://\S+?\.h5", text)
        file = url.group(0).rsplit("/", 1)[-1] if url else f"the {key} no-top weights file"
        # where tf_keras looks (it does not read KERAS_HOME): ~/.keras, or /tmp/.keras when that is not writable
        home = Path("~/.keras").expanduser()
        cache = (
            home
            if os.access(home, os.W_OK) or not home.exists() and os.access(home.parent, os.W_OK)
            else Path("/tmp/.keras")
        ) / "models"
        raise ValueError(
            f"--weights imagenet: the {key} weights could not be downloaded ({_reason(text)}). "
            f"Put {file} in {cache}/ (the Keras cache: Keras then finds it without a download)"
            + (f", from {url.group(0)}," if url else ",")
            + " or pass --weights PATH to a copy of it, or --weights none to start from random weights."
        ) from None


def _load_weights_file(model, weights, name: str):
    """Loads ``--weights FILE`` strictly: every layer of the base with weights must get weights of its shapes.

    Official files load layer by layer in order; a file with the classifier top (more layers than the
    headless base) by layer name; a ``.keras`` model by layer name after its config was checked.
    """
    from recipes.saving import WeightsMismatchError, load_weights_file

    path = Path(os.path.expanduser(str(weights)))
    if not path.is_file():
        raise FileNotFoundError(
            f"--weights {weights}: no such file; give imagenet, none, or the path of a .h5 or "
            f".keras weights file for {name}."
        )
    try:
        how = load_weights_file(model, str(path), label=f"--weights {path}")
    except WeightsMismatchError as err:
        raise ValueError(
            f"--weights {path}: the file does not fit {name} ({err}); give the no-top (or full) weights file of {name}."
        ) from None
    log.info("--weights %s: loaded into %s %s", path, name, how)


def _from_recipe(recipe, weights: str, image_size) -> Base:
    lowered = str(weights).lower()
    if lowered == "imagenet":
        raise ValueError(
            f"--weights imagenet: recipe {recipe.name!r} has no ImageNet download; use a keras.applications "
            f"base ({', '.join(APPLICATIONS)}), --weights PATH, or --weights none."
        )
    if recipe.task != "classification":
        raise ValueError(
            f"--base {recipe.name}: a {recipe.task} recipe; pretrain it with `ktool pretrain` and pass "
            "the run folder as --base."
        )
    size = _size(image_size, recipe.input_shape[0], recipe.min_size, recipe.name)
    channels = recipe.input_shape[2]
    model = recipe.build(input_shape=(*size, channels), include_top=False)
    if lowered != "none":
        _load_weights_file(model, weights, recipe.name)
    return _finish(recipe.name, model, weights, lowered != "none", size, channels, recipe.preprocessing)


def _from_run(path: Path, weights, image_size) -> Base:
    import tf_keras

    import recipes
    from ktoolkit.runs import Run, open_classifier
    from ktoolkit.transfer.features import cut_points

    if weights not in (None, "run"):
        raise ValueError(
            f"--weights {weights}: --base {path} is a run folder, which brings its own weights; leave --weights out."
        )
    run = Run(path)
    if run.encoder.exists():
        model, what = recipes.load_model(run.encoder), "encoder"
    else:
        classifier = open_classifier(path)
        full, file = classifier.model, classifier.path
        cuts = cut_points(full)
        if not cuts:
            raise ValueError(f"--base {path}: its model has no convolutional layers to transfer from.")
        model, what = tf_keras.Model(full.inputs, full.get_layer(cuts[-1]).output, name=f"{full.name}_base"), file.name
    height, width, channels = model.input_shape[1:]
    if image_size and tuple(image_size) != (height, width):
        log.info("--image-size %s ignored: the run's model takes %dx%d", image_size, height, width)
    preprocessing = next((layer.mode for layer in model.layers if type(layer).__name__ == "ImagePreprocessing"), "none")
    return _finish(str(path), model, f"{path}/{what}", True, (height, width), channels, preprocessing)


def _finish(name, model, weights, pretrained, size, channels, preprocessing) -> Base:
    from ktoolkit.transfer.features import cut_points

    groups = cut_points(model)
    if not groups or groups[-1] != model.layers[-1].name:
        groups.append(model.layers[-1].name)
    log.info(
        "base %s: %s parameters, weights %s, %d cut points", name, f"{model.count_params():,}", weights, len(groups)
    )
    return Base(str(name), model, str(weights), pretrained, tuple(size), channels, preprocessing, groups)
