"""`ktool train`: any recipe on any data source, on one CPU, one or several GPUs, or several machines.

``train(TrainConfig(...))`` loads and splits the data, picks the tf.distribute strategy, builds the
recipe inside its scope, trains with crash recovery, evaluates the best model on the held-out split
and leaves a run folder (see ``ktoolkit.runs``). Killed and started again with the same settings,
it resumes from the last completed epoch.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field

from ktoolkit.io import save_model, write_json, write_text
from ktoolkit.runs import Run
from ktoolkit.train.config import TrainConfig

log = logging.getLogger(__name__)


class RunExistsError(FileExistsError):
    """The run folder holds a finished run or another run's files."""


@dataclass
class TrainResult:
    """What a finished run gives back (everything is also in the run folder)."""

    run: Run
    config: TrainConfig
    metrics: dict
    history: list = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0


def train(config: TrainConfig | None = None, *, progress: bool = False, overwrite: bool = False, **overrides) -> TrainResult:
    """Trains ``config.recipe`` on ``config.data`` and writes the run folder ``config.out``.

    Args:
        config: the settings; keyword ``overrides`` (the same names) replace single fields.
        progress: show progress bars (scanning, training, evaluating) on the terminal.
        overwrite: replace a finished run in ``config.out`` instead of refusing.

    Returns:
        A :class:`TrainResult` with the test metrics.

    Raises:
        ValueError: a bad setting (named), or an interrupted run with different settings in ``out``.
        RunExistsError: ``out`` holds a finished run and ``overwrite`` is False.
    """
    start = start_run(config or TrainConfig(), overrides, overwrite=overwrite, progress=progress)
    config, run, strategy, description, chief, source = (start.config, start.run, start.strategy, start.description,
                                                         start.chief, start.source)
    started = start.started
    import tensorflow as tf
    import tf_keras

    import recipes
    from ktoolkit.data import AugmentConfig, make_dataset

    recipe = recipes.get(config.recipe)
    class_names = list(source.class_names)
    num_classes = len(class_names)
    image_size = tuple(config.image_size or recipe.input_shape[:2])
    channels = config.channels or recipe.input_shape[2]

    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    log.info("%s; global batch %d = %d per replica x %d replica(s)", description, global_batch, config.batch_size, replicas)

    if chief:
        write_run_header(run, config, source, image_size, channels)

    if config.mixed_precision:
        policy = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
        tf_keras.mixed_precision.set_global_policy(policy)
        log.info("mixed precision: %s compute, float32 variables", policy)
    tf_keras.utils.set_random_seed(config.seed)

    augment = None if config.augment in ("", "none", None) else AugmentConfig.parse(config.augment)
    cache = None if config.cache == "none" else config.cache

    def dataset(split_name, training):
        split = source.splits.get(split_name)
        if split is None or len(split) == 0:
            return None
        return make_dataset(split, num_classes=num_classes, image_size=image_size, channels=channels,
                            batch_size=global_batch, training=training, seed=config.seed,
                            cache=cache, augment=augment if training else None,
                            deterministic=config.deterministic or None)

    train_ds, val_ds, test_ds = dataset("train", True), dataset("val", False), dataset("test", False)
    if train_ds is None:
        raise ValueError(f"data={config.data!r}: the training split is empty.")
    train_steps = config.steps_per_epoch or max(1, -(-len(source.splits["train"]) // global_batch))

    try:
        with strategy.scope():
            model, loss_weights = _build(recipe, config, num_classes, image_size, channels)
            optimizer, schedule_callbacks = _optimizer(config, train_steps)
            outputs = list(model.output_names)
            compile_metrics = ["accuracy"] + ([tf_keras.metrics.TopKCategoricalAccuracy(5, name="top5")] if num_classes > 5 else [])
            model.compile(
                optimizer=optimizer,
                loss={name: tf_keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing) for name in outputs},
                loss_weights=loss_weights,
                metrics={"predictions": compile_metrics},
                jit_compile=config.jit,
            )
        inference = model if len(outputs) == 1 else tf_keras.Model(model.inputs, model.get_layer("predictions").output,
                                                                 name=model.name)

        train_ds, val_ds = _targets(train_ds, outputs), _targets(val_ds, outputs)
        if config.steps_per_epoch:
            train_ds = train_ds.repeat()
        log.info("training %s (%s parameters) on %d images, %d classes, %s, %d epochs", recipe.name,
                 f"{model.count_params():,}", len(source.splits["train"]), num_classes,
                 "x".join(map(str, (*image_size, channels))), config.epochs)
        history, resumed, best_model = fit(run, model, inference, train_ds, val_ds, epochs=config.epochs,
                                           steps=train_steps, callbacks=schedule_callbacks,
                                           early_stopping=config.early_stopping, chief=chief, progress=progress)
    finally:
        if config.mixed_precision:
            tf_keras.mixed_precision.set_global_policy("float32")

    save_final(run, inference, best_model, chief)
    metrics = {}
    if chief:
        eval_split, eval_ds = ("test", test_ds) if test_ds is not None else ("val", dataset("val", False))
        metrics = finish(run, class_names, eval_split, eval_ds, history, title=f"{recipe.name} on {config.data}",
                         started=started, progress=progress)
    return TrainResult(run=run, config=config, metrics=metrics, history=history,
                       seconds=time.time() - started, resumed_from_epoch=resumed)


@dataclass
class RunStart:
    """A classifier run, set up: the validated settings, the run folder, the strategy and the split data."""

    config: object
    run: Run
    strategy: object
    description: str
    chief: bool
    source: object
    started: float


def start_run(config, overrides: dict, *, overwrite: bool, progress: bool) -> RunStart:
    """What `ktool train` and `ktool finetune` do first: apply ``overrides`` (the non-None ones) to
    ``config`` and validate it, prepare the run folder, make the tf.distribute strategy, and load and
    split the data (at least 2 classes)."""
    import dataclasses

    from ktoolkit.data import load_data
    from ktoolkit.train.distribute import is_chief, make_strategy

    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config.validate()
    started = time.time()
    run = Run(config.out)
    prepare_run_folder(run, config, overwrite)
    # First, before TensorFlow runs any op: MultiWorkerMirroredStrategy configures the collective ops
    # at program start-up (and loading the data decodes images with TensorFlow).
    strategy, description = make_strategy(config.distribute)
    source = load_data(config.data, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                       seed=config.seed, strict=config.strict, data_dir=config.data_dir, progress=progress)
    if source.num_classes < 2:
        raise ValueError(f"data={config.data!r} has {source.num_classes} class(es) with images; "
                         "a classifier needs at least 2.")
    return RunStart(config, run, strategy, description, is_chief(strategy), source, started)


def fit(run: Run, model, inference, train_ds, val_ds, *, epochs: int, steps: int, callbacks=(), early_stopping: int = 0,
        chief: bool = True, progress: bool = False):
    """``model.fit`` with the run folder's crash recovery: history.csv, best.keras, the checkpoint.

    Call it inside the strategy scope. Returns (history rows, epoch resumed from, the BestModel callback,
    or None when ``inference`` is None).
    """
    import tf_keras

    from ktoolkit.train.callbacks import BestModel, RunLog

    run_log = RunLog(run, epochs, write=chief)
    best_model = None  # inference None: nothing to pick a best model by (e.g. pretraining without labels)
    if inference is not None:
        main = "" if len(model.output_names) == 1 else "predictions_"
        monitor = f"val_{main}accuracy" if val_ds is not None else f"{main}accuracy"
        best_model = BestModel(run, monitor, "max", inference, write=chief)
    all_callbacks = [
        run_log,
        *([best_model] if best_model else []),
        # the same folder on every worker: Keras sends the non-chief workers' writes to temporary folders
        tf_keras.callbacks.BackupAndRestore(str(run.backup), save_freq="epoch", delete_checkpoint=True),
        *callbacks,
    ]
    if early_stopping:
        all_callbacks.append(tf_keras.callbacks.EarlyStopping(
            monitor="val_loss" if val_ds is not None else "loss", patience=early_stopping))
    if chief:
        all_callbacks.append(tf_keras.callbacks.TensorBoard(str(run.tensorboard), write_graph=False, profile_batch=0))
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, steps_per_epoch=steps, callbacks=all_callbacks,
              verbose=(1 if progress else 0))
    return run_log.rows, run_log.started_at_epoch, best_model


def save_final(run: Run, inference, best_model, chief: bool = True):
    """last.keras (and best.keras if no epoch was ever the best); removes the checkpoint folder."""
    from ktoolkit.train.callbacks import save_elsewhere

    # Every worker saves (saving is a collective op under MultiWorkerMirroredStrategy); only the chief keeps files.
    no_best = best_model is None or (best_model.best is None and not run.best.exists())
    for path in [run.last] + ([run.best] if no_best else []):
        if chief:
            save_model(inference, path)
        else:
            save_elsewhere(inference)
    if chief:
        shutil.rmtree(run.backup, ignore_errors=True)  # Keras empties it after a finished fit; the folder goes too


def finish(run: Run, class_names, eval_split: str, eval_ds, history, *, title: str, started: float,
           progress: bool = False, extra_sections=None, evaluation=None) -> dict:
    """Evaluates best.keras on ``eval_ds`` (or saves ``evaluation``, made by the caller), draws the curves,
    marks the run complete, writes the report."""
    import recipes
    from ktoolkit.evaluate import evaluate_model, save_evaluation
    from ktoolkit.report import plot_curves, write_report

    metrics = {}
    if evaluation is None and eval_ds is not None:
        evaluation = evaluate_model(recipes.load_model(run.best), eval_ds, class_names, progress=progress)
    if evaluation is not None:
        metrics = save_evaluation(evaluation, run, split=eval_split)
    if history:
        plot_curves(history, run.curves, title=title)
    state = run.read_state()
    state.update({"complete": True, "seconds": round(time.time() - started, 1)})
    write_json(run.state, state)
    write_report(run, extra_sections)
    return metrics


def prepare_run_folder(run: Run, config, overwrite: bool):
    """Makes the run folder; refuses a finished run (unless ``overwrite``) or an interrupted one with other
    settings. ``config`` is a TrainConfig (or subclass): the folder's config.yaml is read with its class."""
    root = run.root
    if root.exists() and any(root.iterdir()):
        state = run.read_state()
        if not run.config.exists():
            raise RunExistsError(f"out={str(root)!r} is a folder with other files, not a ktoolkit run; choose a new --out.")
        if overwrite:
            shutil.rmtree(root)
        elif state.get("complete"):
            raise RunExistsError(
                f"out={str(root)!r} holds a finished run; choose a new --out, or pass --overwrite to replace it."
            )
        else:
            previous = type(config).from_yaml(run.config).to_dict()
            current = config.to_dict()
            changed = [k for k in current if k not in config.RESUMABLE and previous.get(k) != current[k]]
            if changed:
                diffs = ", ".join(f"{k}: {previous.get(k)!r} there, {current[k]!r} now" for k in changed)
                raise ValueError(
                    f"out={str(root)!r} holds an interrupted run with other settings ({diffs}); run the same "
                    "command to resume it, choose a new --out, or pass --overwrite."
                )
    root.mkdir(parents=True, exist_ok=True)


def write_run_header(run: Run, config, source, image_size, channels):
    """config.yaml, classes.json, labels.txt and data.json: what a run folder says before training."""
    class_names = list(source.class_names)
    write_text(run.config, config.to_yaml())
    write_json(run.classes, class_names)
    write_text(run.labels, "\n".join(class_names) + "\n")
    write_json(run.data, _data_summary(source, image_size, channels))


def _build(recipe, config: TrainConfig, num_classes, image_size, channels):
    """Builds the training model; returns (model, loss weights per output)."""
    options = dict(config.recipe_options)
    aux_weight = recipe.options.get("aux_loss_weight")
    if aux_weight and options.get("aux_heads", True):
        options["aux_heads"] = True
    model = recipe.build(input_shape=(*image_size, channels), num_classes=num_classes, **options)
    weights = {name: (1.0 if name == "predictions" else float(aux_weight or 0.0)) for name in model.output_names}
    return model, weights


def _optimizer(config: TrainConfig, steps_per_epoch: int):
    import tf_keras

    total = steps_per_epoch * config.epochs
    lr = config.lr
    callbacks = []
    if config.schedule == "step":
        lr = tf_keras.optimizers.schedules.PiecewiseConstantDecay(
            [int(total * 0.5), int(total * 0.75)], [config.lr, config.lr * 0.1, config.lr * 0.01])
    elif config.schedule == "cosine":
        lr = tf_keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=max(1, total))
    elif config.schedule == "reduce-on-plateau":
        callbacks.append(tf_keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.2, patience=max(2, config.epochs // 10), min_lr=config.lr * 1e-3))
    wd = config.weight_decay or None
    opt = {
        "sgd": lambda: tf_keras.optimizers.SGD(lr, momentum=config.momentum, weight_decay=wd),
        "adam": lambda: tf_keras.optimizers.Adam(lr, weight_decay=wd),
        "adamw": lambda: tf_keras.optimizers.AdamW(lr, weight_decay=config.weight_decay),
        "rmsprop": lambda: tf_keras.optimizers.RMSprop(lr, momentum=config.momentum, weight_decay=wd),
    }[config.optimizer]()
    return opt, callbacks


def _targets(dataset, outputs):
    """Repeats the labels for every output of a multi-output (auxiliary-head) model."""
    if dataset is None or len(outputs) == 1:
        return dataset
    return dataset.map(lambda x, y: (x, {name: y for name in outputs}))


def _data_summary(source, image_size, channels) -> dict:
    import numpy as np

    splits = {}
    for name, split in source.splits.items():
        counts = np.bincount(np.asarray(split.labels, dtype=int), minlength=len(source.class_names))
        splits[name] = {"images": int(len(split)), "per_class": dict(zip(source.class_names, counts.tolist()))}
    return {
        "source": source.origin,
        "classes": list(source.class_names),
        "image_size": list(image_size),
        "channels": channels,
        "splits": splits,
        "skipped_files": [{"path": str(b.path), "reason": b.reason} for b in source.bad_files],
    }
