"""`ktool pretrain`: learning a representation from images without their labels.

``pretrain(PretrainConfig(...))`` loads the images (a folder with or without class subfolders),
trains the method's network on the training split without ever reading a label, and leaves a run
folder like `ktool train`'s (config.yaml, data.json, history.csv, curves.png, report.md/html,
state.json; killed and started again, it resumes from the last completed epoch) with:

- ``encoder.keras``: the encoder, 0..255 pixels to the embedding, a plain Keras model that loads in
  safe mode: a base for `ktool finetune --base RUN`, and what `ktool linear-eval` measures;
- ``last.keras``: the whole network after the last epoch (autoencoder, or encoder with its
  projection head);
- ``pretrain.json``: the method and what was measured on the validation split (autoencoders: the
  reconstruction error, and for denoising the error of the noisy input and of its reconstruction);
- ``reconstructions.png`` (autoencoders: input, noisy input, output) and ``embeddings.png`` (a 2-D
  PCA projection of the embeddings, coloured by class where the data have classes).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from ktoolkit.io import save_figure, save_model, write_json
from ktoolkit.pretrain.config import PretrainConfig
from ktoolkit.runs import Run
from ktoolkit.train.engine import run_command

log = logging.getLogger(__name__)

RESULT_FILE = "pretrain.json"
RECONSTRUCTIONS = "reconstructions.png"
EMBEDDINGS = "embeddings.png"
LINEAR_EVAL = "linear_eval"  # the default folder of `ktool linear-eval` inside the run
# At most this many images are projected in embeddings.png.
PROJECTED_IMAGES = 2000
_METHODS = {
    "autoencoder": "autoencoder: the encoder's embedding must keep what the decoder needs to reconstruct the image "
    "(mean squared error)",
    "denoising": "denoising autoencoder (Vincent et al. 2008): the image is corrupted in training and the network "
    "reconstructs the clean one",
    "contrastive": "contrastive (SimCLR, Chen et al. 2020): two random views of each image are pulled together, the "
    "other images of the batch pushed away (NT-Xent loss)",
}


@dataclass
class PretrainResult:
    """What a finished pretraining run gives back (everything is also in the run folder)."""

    run: Run
    config: PretrainConfig
    measurements: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0

    def lines(self) -> list[str]:
        """What `ktool pretrain` prints: the measurements (losses, no accuracies: no labels) and the encoder."""
        out = []
        if self.measurements:
            out.append("measured: " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in self.measurements.items()))
        return [*out, f"encoder: {self.run.encoder}  (report: {self.run.report_md})"]


@run_command
def pretrain(
    config: PretrainConfig | None = None, *, progress: bool = False, overwrite: bool = False, **overrides
) -> PretrainResult:
    """Pretrains ``config.recipe`` with ``config.method`` on ``config.data`` and writes the run folder ``config.out``.

    Args:
        config: the settings; keyword ``overrides`` (the same names) replace single fields.
        progress: show progress bars on the terminal.
        overwrite: replace a finished run in ``config.out`` instead of refusing.

    Returns:
        A :class:`PretrainResult` with the measurements of ``pretrain.json``.

    Raises:
        ValueError: a bad setting (named), or an interrupted run with different settings in ``out``.
        RunExistsError: ``out`` holds a finished run and ``overwrite`` is False.
    """
    from ktoolkit.train.engine import start_run

    # the settings resolved and checked, the folder checked, the distribution made (first: see
    # ktoolkit.train.engine), the folder locked, the images loaded (a resumed run's recorded split)
    start = start_run(config or PretrainConfig(), overrides, overwrite=overwrite, progress=progress)
    config, run, distribution, chief, started = start.config, start.run, start.distribution, start.chief, start.started
    data = _data(config, run, start.source, distribution, start.description, chief)
    network, history, resumed = _fit_network(config, run, distribution, data, chief, progress)
    encoder = _save_networks(run, network, chief)
    measurements = {}
    if chief:  # the checkpoint stays until finish() has marked the run complete
        measurements = _finish_pretrain(config, run, data, network, encoder, history, started)
    return PretrainResult(
        run=run,
        config=config,
        measurements=measurements,
        history=history,
        seconds=time.time() - started,
        resumed_from_epoch=resumed,
    )


@dataclass
class _Data:
    """The images pretraining reads (labels, where there are any, only colour embeddings.png) and their batches."""

    source: object
    recipe: object
    image_size: tuple
    channels: int
    train_split: object
    val_split: object
    train_ds: object
    val_ds: object
    steps: int


def _data(config: PretrainConfig, run: Run, source, distribution, description: str, chief: bool) -> _Data:
    """The run header, the seed and the datasets of ``source`` (the run's images: class folders optional):
    pixels to pixels for the autoencoders, two views of each image for contrastive learning."""
    import tf_keras

    import recipes
    from ktoolkit.data import AugmentConfig, split_dataset
    from ktoolkit.pretrain import models
    from ktoolkit.train.engine import _global_batch, repeat_for_steps, steps_per_epoch, write_run_header

    recipe = recipes.get(config.recipe)
    image_size = pretraining_size(config, recipe, source)
    channels = config.channels or recipe.input_shape[2]
    global_batch = _global_batch(config, distribution, description)
    if chief:
        write_run_header(run, config, source, image_size, channels)  # the classes only colour embeddings.png
    tf_keras.utils.set_random_seed(config.seed)

    contrastive = config.method == "contrastive"
    augment = AugmentConfig.parse(config.augment)
    train_split, val_split = source.splits["train"], source.splits.get("val")
    # NT-Xent compares the views of one batch: a last batch of one image would have no negatives.
    drop_last = contrastive and len(train_split) >= global_batch
    shape = dict(num_classes=source.num_classes, image_size=image_size, channels=channels, batch_size=global_batch)

    def dataset(split, training):
        ds = split_dataset(
            split,
            config,
            training=training,
            augment=augment if augment and not contrastive else None,
            one_hot=False,
            drop_remainder=drop_last and training,
            **shape,
        )
        if ds is None:
            return None
        if contrastive:
            seed = config.seed + (0 if training else 1)
            return models.two_views(ds, augment, seed, fixed=not training, image_shape=(*image_size, channels))
        return ds.map(lambda images, labels: (images, images / 255.0))  # labels are never read

    steps = steps_per_epoch(config, len(train_split), global_batch, drop_remainder=drop_last)
    train_ds = repeat_for_steps(config, dataset(train_split, True))
    val_ds = dataset(val_split, False)
    return _Data(source, recipe, image_size, channels, train_split, val_split, train_ds, val_ds, steps)


def pretraining_size(config: PretrainConfig, recipe, source) -> tuple:
    """The (height, width) pretraining runs at: ``config.image_size`` if given; for contrastive learning the data's
    median resolution, at least the recipe's minimum and at most its default size (upsampling small images adds
    no information and costs the square of the factor: digits' 8x8 at 32x32 is 16 times the work); for the
    autoencoders, whose decoder must give back the input's exact shape, the recipe's size."""
    default = tuple(recipe.input_shape[:2])
    if config.image_size:
        return tuple(config.image_size)
    if config.method != "contrastive":
        return default
    from ktoolkit.transfer.bases import data_resolution

    data = data_resolution(source)
    if data is None:
        return default
    size = tuple(int(min(d, max(recipe.min_size, side))) for d, side in zip(default, data))
    if size != default:
        log.info(
            "image size %s: the images' median resolution (%s); the recipe's %s would upsample them (--image-size)",
            "x".join(map(str, size)),
            "x".join(map(str, data)),
            "x".join(map(str, default)),
        )
    return size


def _fit_network(config: PretrainConfig, run: Run, distribution, data: _Data, chief: bool, progress: bool):
    """Inside the distribution's scope: the method's network built and compiled, then train's ``fit`` (no inference
    model: there is no best epoch to keep without accuracy). Returns (network, history, epoch resumed from)."""
    from ktoolkit.pretrain import models
    from ktoolkit.train.engine import _optimizer, fit

    with distribution.scope():
        network = models.build_network(
            config.method,
            data.recipe,
            (*data.image_size, data.channels),
            noise=config.noise,
            noise_strength=config.noise_strength,
            options=config.recipe_options,
        )
        optimizer, schedule_callbacks = _optimizer(config, data.steps)
        if config.method == "contrastive":
            model = models.SimCLR(network, config.temperature)
            model.compile(optimizer=optimizer)
        else:
            model = network
            model.compile(optimizer=optimizer, loss="mse")
        log.info(
            "pretraining %s (%s, %s parameters) on %d images without labels, %s, %d epochs",
            network.name,
            config.method,
            f"{network.count_params():,}",
            len(data.train_split),
            "x".join(map(str, (*data.image_size, data.channels))),
            config.epochs,
        )
        history, resumed, _ = fit(
            run,
            model,
            None,
            data.train_ds,
            data.val_ds,
            epochs=config.epochs,
            steps=data.steps,
            callbacks=schedule_callbacks,
            chief=chief,
            progress=progress,
        )
    return network, history, resumed


def _save_networks(run: Run, network, chief: bool):
    """last.keras (the whole network) and encoder.keras; returns the encoder."""
    from ktoolkit.pretrain import models
    from ktoolkit.train.callbacks import save_elsewhere

    encoder = models.transfer_encoder(network)
    for path, keras_model in ((run.last, network), (run.encoder, encoder)):
        if chief:
            save_model(keras_model, path)
        else:
            save_elsewhere(keras_model)  # saving is a collective op under MultiWorkerMirroredStrategy
    return encoder


def _finish_pretrain(config: PretrainConfig, run: Run, data: _Data, network, encoder, history, started) -> dict:
    """On the chief: reconstructions and their errors (autoencoders), the embeddings' projection,
    pretrain.json, then train's ``finish`` (curves, report, the run marked complete). Returns the measurements."""
    import numpy as np

    from ktoolkit.data import make_dataset
    from ktoolkit.train.engine import finish

    train_split, source = data.train_split, data.source
    shown = data.val_split if data.val_split is not None else train_split

    def pixels(split):
        return make_dataset(
            split,
            num_classes=source.num_classes,
            image_size=data.image_size,
            channels=data.channels,
            batch_size=64,
            one_hot=False,
        )

    measurements = {}
    if config.method != "contrastive":
        measurements = reconstruction_errors(network, pixels(shown))
        first = shown.subset(np.arange(min(8, len(shown))))
        plot_reconstructions(network, next(iter(pixels(first)))[0], run.root / RECONSTRUCTIONS)
    sample = np.random.default_rng(config.seed).permutation(len(train_split))[:PROJECTED_IMAGES]
    projected = plot_embeddings(
        encoder,
        train_split.subset(np.sort(sample)),
        source.class_names,
        run.root / EMBEDDINGS,
        image_size=data.image_size,
        channels=data.channels,
    )
    last = history[-1] if history else {}
    measurements.update({k: last[k] for k in ("loss", "val_loss") if k in last})
    write_json(
        run.root / RESULT_FILE, _result(config, run, network, encoder, train_split, shown, projected, measurements)
    )
    finish(
        run,
        source.class_names,
        "val",
        None,
        history,
        started=started,
        extra_sections=report_sections(run),
        title=f"{config.method} pretraining of {network.name} on {config.data}",
    )
    return measurements


def _result(config: PretrainConfig, run: Run, network, encoder, train_split, shown, projected, measurements) -> dict:
    """The contents of pretrain.json."""
    return {
        "method": config.method,
        "recipe": config.recipe,
        "network": network.name,
        "encoder": {
            "file": run.encoder.name,
            "input_shape": list(encoder.input_shape[1:]),
            "output_shape": list(encoder.output_shape[1:]),
            "parameters": encoder.count_params(),
        },
        "images": len(train_split),
        "measured_on": f"{shown.name} split ({len(shown)} images)",
        "embeddings_plot": projected,
        "measurements": measurements,
    }


def reconstruction_errors(network, dataset) -> dict:
    """Mean squared errors on 0..1 images of ``dataset`` (batches of 0..255 pixels, labels).

    ``reconstruction_mse``: of the output for the clean image. With a ``noise`` layer (denoising),
    also ``noisy_input_mse``, the error of the corrupted image itself, and ``denoised_mse``, the error
    of the network's output for it: denoising works where the second is well below the first.
    """
    import tensorflow as tf

    noise = next((layer for layer in network.layers if layer.name == "noise"), None)
    sums, count = {}, 0
    for images, _ in dataset:
        clean = images / 255.0
        errors = {"reconstruction_mse": network(images, training=False) - clean}
        if noise is not None:
            noisy = noise(clean, training=True)
            errors["noisy_input_mse"] = noisy - clean
            errors["denoised_mse"] = network(noisy * 255.0, training=False) - clean
        for name, error in errors.items():
            sums[name] = sums.get(name, 0.0) + float(tf.reduce_sum(tf.square(error)))
        count += int(tf.size(clean))
    return {name: total / max(count, 1) for name, total in sums.items()}


def plot_reconstructions(network, images, path) -> None:
    """A grid: the input images, the noisy inputs (denoising) and the network's outputs, one row each."""
    import numpy as np

    from ktoolkit.report import _pyplot

    clean = np.asarray(images, np.float32) / 255.0
    rows = [("input", clean)]
    inputs = images
    noise = next((layer for layer in network.layers if layer.name == "noise"), None)
    if noise is not None:
        noisy = np.asarray(noise(clean, training=True))
        rows.append(("noisy input", noisy))
        inputs = noisy * 255.0
    rows.append(("output", np.asarray(network(inputs, training=False))))
    plt = _pyplot()
    n = len(clean)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, (title, pictures) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            picture = np.clip(pictures[c], 0, 1)
            ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_embeddings(encoder, split, class_names, path, *, image_size, channels) -> dict:
    """Projects the embeddings of ``split`` (global-average-pooled when they are maps) on their two
    principal components and plots them, coloured by class when there are several. Returns what it plotted."""
    import numpy as np
    from sklearn.decomposition import PCA

    from ktoolkit.report import _pyplot
    from ktoolkit.transfer.features import extract_features

    layer = encoder.layers[-1].name
    features = extract_features(encoder, [layer], split, image_size=image_size, channels=channels, cache=None)[layer]
    if features.shape[1] == 1:  # a 1-d embedding: plotted along the first axis
        features = np.hstack([features, np.zeros_like(features)])
    pca = PCA(2, random_state=0).fit(features)
    points = pca.transform(features)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    labelled = len(class_names) > 1
    if labelled:
        cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
        for index, name in enumerate(class_names):
            chosen = split.labels == index
            ax.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.7, color=cmap(index % cmap.N), label=name)
        if len(class_names) <= 20:
            ax.legend(markerscale=3, fontsize=8, loc="best")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7)
    share = pca.explained_variance_ratio_
    ax.set_xlabel(f"principal component 1 ({share[0]:.0%} of the variance)")
    ax.set_ylabel(f"principal component 2 ({share[1]:.0%})")
    ax.set_title(
        f"{features.shape[1]}-d embeddings of {len(features)} training images"
        + (", coloured by class (not used in training)" if labelled else ""),
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return {
        "images": len(features),
        "dimensions": int(features.shape[1]),
        "coloured_by_class": labelled,
        "explained_variance": [round(float(v), 4) for v in share],
    }


def report_sections(run: Run) -> list[tuple[str, str]]:
    """The report's sections of a pretraining run: the method and measurements, the pictures and, once
    `ktool linear-eval` has run into the run folder, the linear evaluation."""
    result = json.loads((run.root / RESULT_FILE).read_text())
    encoder = result["encoder"]
    shape = encoder["output_shape"]
    embedding = (
        f"{shape[0]}-d embedding"
        if len(shape) == 1
        else f"{'x'.join(map(str, shape))} embedding map (average-pooled for linear evaluation)"
    )
    lines = [
        f"Method: **{result['method']}**, {_METHODS[result['method']]}.",
        "",
        f"Trained on {result['images']:,} images without their labels. The encoder `{encoder['file']}` takes "
        f"{'x'.join(map(str, encoder['input_shape']))} images (0..255 pixels) to a {embedding} "
        f"({encoder['parameters']:,} parameters); "
        f"use it with `ktool linear-eval --encoder {run.root}` and `ktool finetune --base {run.root}`.",
        "",
    ]
    measured = result["measurements"]
    if measured:
        lines += [f"Measured on the {result['measured_on']}:", "", "| measurement | value |", "|---|---|"]
        lines += [f"| {name.replace('_', ' ')} | {value:.5f} |" for name, value in measured.items()]
    sections = [("Pretraining", "\n".join(lines))]
    if (run.root / RECONSTRUCTIONS).exists():
        sections.append(
            (
                "Reconstructions",
                "Validation images; rows: input, noisy input (denoising), output.\n\n"
                f"![reconstructions]({RECONSTRUCTIONS})",
            )
        )
    sections.append(("Embeddings", f"![embeddings]({EMBEDDINGS})"))
    linear = run.root / LINEAR_EVAL / "linear_eval.md"
    if linear.exists():  # its pictures are beside it, in the run's linear_eval folder
        sections.append(
            (
                "Linear evaluation",
                linear.read_text().replace("](learning_curve.png)", f"]({LINEAR_EVAL}/learning_curve.png)"),
            )
        )
    return sections
