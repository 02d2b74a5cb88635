"""`ktool train`: any recipe on any data source, on one CPU, one or several GPUs, or several machines.

``train(TrainConfig(...))`` loads and splits the data, picks the tf.distribute strategy (the
``distribution``), builds the recipe inside its scope, trains with crash recovery, evaluates the best
model on the held-out split and leaves a run folder (see ``ktoolkit.runs``). Killed and started again
with the same settings, it resumes from the last completed epoch, even when it was killed after the last one.

A run folder is written by one command at a time (``RunLock``); ``--overwrite`` removes only what
ktoolkit wrote there, in folders that carry its marker (see ``ktoolkit.runs``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ktoolkit.io import save_model, write_json, write_text
from ktoolkit.runs import MARKER, Run, RunExistsError, RunLock, RunLockedError, busy_message, folder_error
from ktoolkit.train.config import LR_AUTO, TrainConfig

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite: training stopped and the run is marked failed."""


# The locks prepare_run_folder took for the command now running (released by @run_command).
_HELD: list[RunLock] = []


def run_command(function):
    """Decorates a command that writes a run folder (train, finetune, pretrain): when it ends, the
    folder's lock is released; when it fails, a folder it created and left with nothing but its
    marker is removed (the user sees no empty run folder after a mistake)."""

    @functools.wraps(function)
    def command(*args, **kwargs):
        depth = len(_HELD)
        failed = True
        try:
            result = function(*args, **kwargs)
            failed = False
            return result
        finally:
            while len(_HELD) > depth:
                _HELD.pop().release(abandon=failed)

    return command


@dataclass
class TrainResult:
    """What a finished run gives back (everything is also in the run folder)."""

    run: Run
    config: TrainConfig
    metrics: dict
    history: list = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0

    def lines(self) -> list[str]:
        """What `ktool train` prints: the held-out accuracy with its interval and where the run is."""
        from ktoolkit.evaluate import metrics_line

        out = [metrics_line(self.metrics)] if self.metrics and self.metrics.get("images") else []
        if self.metrics.get("cv"):
            from ktoolkit.stats import Accuracy

            cv = self.metrics["cv"]
            out.append(
                f"cross-validated accuracy {Accuracy(cv['correct'], cv['images'], folds=cv.get('folds', ())).text()}"
            )
        return [*out, f"run folder: {self.run.root}  (report: {self.run.report_md})"]


@run_command
def train(
    config: TrainConfig | None = None, *, progress: bool = False, overwrite: bool = False, **overrides
) -> TrainResult:
    """Trains ``config.recipe`` on ``config.data`` and writes the run folder ``config.out``.

    Args:
        config: the settings; keyword ``overrides`` (the same names) replace single fields.
        progress: show progress bars (scanning, training, evaluating) on the terminal.
        overwrite: replace a finished run in ``config.out`` instead of refusing.

    Returns:
        A :class:`TrainResult` with the test metrics.

    Raises:
        ValueError: a bad setting (named), an interrupted run with different settings in ``out``, or
            ``out`` unusable (a file, not writable, the data folder); NonFiniteLossError: the loss
            became NaN or infinite.
        RunExistsError: ``out`` holds a finished run and ``overwrite`` is False, or files that are not
            a ktoolkit run; RunLockedError: another command is writing ``out``.
    """
    start = start_run(config or TrainConfig(), overrides, overwrite=overwrite, progress=progress)
    import recipes
    from ktoolkit.train.lr_find import recorded_lr

    auto = start.config.lr == LR_AUTO
    start.config = recorded_lr(start.run, start.config)  # a resumed --lr auto run: the rate it found
    recipe = recipes.get(start.config.recipe)
    setup = _setup(start, recipe)
    if start.config.lr == LR_AUTO:
        start.config = _find_lr(start, recipe, setup, progress)
    model, inference, history, resumed, best_model = _build_and_fit(start, recipe, setup, progress)
    save_final(start.run, inference, best_model, start.chief)
    metrics = _finish_train(start, recipe, setup, history, progress, auto=auto) if start.chief else {}
    return TrainResult(
        run=start.run,
        config=start.config,
        metrics=metrics,
        history=history,
        seconds=time.time() - start.started,
        resumed_from_epoch=resumed,
    )


@dataclass
class _Setup:
    """What train() decided before building the model: the image shape, the batches and their datasets."""

    class_names: list
    image_size: tuple
    channels: int
    global_batch: int
    train_ds: object
    val_ds: object
    test_ds: object
    steps: int
    class_weight: dict | None = None  # {class index: weight}, see class_weights


def _setup(start: RunStart, recipe) -> _Setup:
    """The run header, the precision policy and seed, and the datasets of every split."""
    import tensorflow as tf
    import tf_keras

    from ktoolkit.data import AugmentConfig, split_dataset

    config, source = start.config, start.source
    class_names = list(source.class_names)
    image_size = tuple(config.image_size or recipe.input_shape[:2])
    channels = config.channels or recipe.input_shape[2]
    global_batch = _global_batch(config, start.distribution, start.description)
    if start.chief:
        write_run_header(start.run, config, source, image_size, channels)
    if config.mixed_precision:
        policy = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
        tf_keras.mixed_precision.set_global_policy(policy)
        log.info("mixed precision: %s compute, float32 variables", policy)
    tf_keras.utils.set_random_seed(config.seed)
    augment = None if config.augment in ("", "none", None) else AugmentConfig.parse(config.augment)
    shape = dict(num_classes=len(class_names), image_size=image_size, channels=channels, batch_size=global_batch)
    train_ds = split_dataset(source.splits.get("train"), config, training=True, augment=augment, **shape)
    val_ds = split_dataset(source.splits.get("val"), config, training=False, **shape)
    test_ds = split_dataset(source.splits.get("test"), config, training=False, **shape)
    if train_ds is None:
        raise ValueError(f"data={config.data!r}: the training split is empty.")
    steps = steps_per_epoch(config, len(source.splits["train"]), global_batch)
    weights = class_weights(source.splits["train"].labels, len(class_names), config.class_weight)
    if weights:
        log.info("class weights (--class-weight %s): %s", config.class_weight, _weights_text(weights, class_names))
    return _Setup(class_names, image_size, channels, global_batch, train_ds, val_ds, test_ds, steps, weights)


def _build_and_fit(start: RunStart, recipe, setup: _Setup, progress: bool):
    """Inside the distribution's scope: the recipe built and compiled, then ``fit``. Returns (model, inference model,
    history, epoch resumed from, BestModel); the precision policy is float32 again afterwards."""
    import tf_keras

    config, distribution = start.config, start.distribution
    num_classes = len(setup.class_names)
    try:
        with distribution.scope():
            model, loss_weights = _build(recipe, config, num_classes, setup.image_size, setup.channels)
            optimizer, schedule_callbacks = _optimizer(config, setup.steps)
            outputs = list(model.output_names)
            model.compile(
                optimizer=optimizer,
                loss={
                    name: tf_keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
                    for name in outputs
                },
                loss_weights=loss_weights,
                metrics={"predictions": classifier_metrics(num_classes)},
                jit_compile=config.jit,
            )
        inference = (
            model
            if len(outputs) == 1
            else tf_keras.Model(model.inputs, model.get_layer("predictions").output, name=model.name)
        )
        train_ds = repeat_for_steps(config, _targets(setup.train_ds, outputs))
        val_ds = _targets(setup.val_ds, outputs)
        log.info(
            "training %s (%s parameters) on %d images, %d classes, %s, %d epochs",
            recipe.name,
            f"{model.count_params():,}",
            len(start.source.splits["train"]),
            num_classes,
            "x".join(map(str, (*setup.image_size, setup.channels))),
            config.epochs,
        )
        history, resumed, best_model = fit(
            start.run,
            model,
            inference,
            train_ds,
            val_ds,
            epochs=config.epochs,
            steps=setup.steps,
            callbacks=schedule_callbacks,
            early_stopping=config.early_stopping,
            class_weight=setup.class_weight,
            chief=start.chief,
            progress=progress,
        )
    finally:
        if config.mixed_precision:
            tf_keras.mixed_precision.set_global_policy("float32")
    return model, inference, history, resumed, best_model


def _find_lr(start: RunStart, recipe, setup: _Setup, progress: bool):
    """``--lr auto``: the learning-rate range test (:mod:`ktoolkit.train.lr_find`) on a model built and compiled
    as the run's, on the run's training batches; the chief writes lr_find.png/.json and config.yaml with the
    rate. The seed is set again afterwards, so the model trained starts as it would with that rate given.
    Returns the config with the rate found (the valley suggestion)."""
    import tf_keras

    from ktoolkit.train import lr_find

    config = start.config
    with start.distribution.scope():
        model = lr_find.recipe_sweep_model(recipe, config, len(setup.class_names), setup.image_size, setup.channels)
    dataset = lr_find.sweep_dataset(setup.train_ds, model.output_names, setup.class_weight)
    steps = lr_find.default_steps(setup.steps)
    log.info(
        "lr auto: sweeping the learning rate from %g to %g over up to %d steps", lr_find.START_LR, lr_find.END_LR, steps
    )
    result = lr_find.sweep(model, dataset, steps=steps, progress=progress, what=f"{recipe.name}, {config.optimizer}")
    del model
    tf_keras.utils.set_random_seed(config.seed)
    if start.chief:
        return lr_find.use_result(start.run, config, result)
    return dataclasses.replace(config, lr=result.suggestion)


def _finish_train(start: RunStart, recipe, setup: _Setup, history, progress: bool, auto: bool = False) -> dict:
    """On the chief: the best model evaluated on the test split (val without one), and the report (with how
    the rate was found when it was ``--lr auto``)."""
    from ktoolkit.train.lr_find import report_section

    eval_split, eval_ds = ("test", setup.test_ds) if setup.test_ds is not None else ("val", setup.val_ds)
    return finish(
        start.run,
        setup.class_names,
        eval_split,
        eval_ds,
        history,
        title=f"{recipe.name} on {start.config.data}",
        started=start.started,
        progress=progress,
        extra_sections=report_section(start.run) if auto else None,
    )


def _global_batch(config, distribution, description: str) -> int:
    """``config.batch_size`` per replica, times the replicas (logged with the distribution's description)."""
    replicas = distribution.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    log.info(
        "%s; global batch %d = %d per replica x %d replica(s)", description, global_batch, config.batch_size, replicas
    )
    return global_batch


def steps_per_epoch(config, examples: int, global_batch: int, *, drop_remainder: bool = False) -> int:
    """``config.steps_per_epoch``, or the batches of one pass over ``examples`` (at least 1)."""
    if config.steps_per_epoch:
        return config.steps_per_epoch
    return max(1, examples // global_batch if drop_remainder else -(-examples // global_batch))


def repeat_for_steps(config, train_ds):
    """The training dataset, repeated when ``config.steps_per_epoch`` fixes the epoch's length."""
    return train_ds.repeat() if config.steps_per_epoch else train_ds


def classifier_metrics(num_classes: int) -> list:
    """The metrics every classifier is compiled with: accuracy, and top-5 accuracy above 5 classes."""
    import tf_keras

    return ["accuracy"] + ([tf_keras.metrics.TopKCategoricalAccuracy(5, name="top5")] if num_classes > 5 else [])


def class_weights(labels, num_classes: int, how: str = "auto") -> dict | None:
    """Balanced class weights ``n / (classes * count_c)`` for the training labels, or None for none.

    ``how`` "auto" weights only an imbalanced split: the largest class has more than
    :data:`~ktoolkit.train.config.IMBALANCE_THRESHOLD` (1.5) times the images of the smallest (below
    that, weighting changes little and adds noise to the gradient); "none" never weights. The weights
    average 1 over the training images, so the loss keeps its scale. A class without training images
    gets weight 0 (it has nothing to weight). Returns {class index: weight}.
    """
    import numpy as np

    from ktoolkit.train.config import IMBALANCE_THRESHOLD

    if how == "none":
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    present = counts[counts > 0]
    if len(present) < 2 or present.max() <= IMBALANCE_THRESHOLD * present.min():
        return None
    n, k = int(counts.sum()), len(present)
    return {c: (n / (k * int(counts[c])) if counts[c] else 0.0) for c in range(num_classes)}


def _weights_text(weights: dict, class_names) -> str:
    return ", ".join(f"{class_names[c]} {w:.3g}" for c, w in weights.items())


def weight_by_class(dataset, class_weight: dict | None):
    """``dataset`` of (images, labels) with a third element: each image's weight, the class weights
    averaged by its label (one-hot, or soft for MixUp/CutMix). Multi-output labels (a dict) are read
    from "predictions" and the one weight applies to every output. Unchanged without weights."""
    if dataset is None or not class_weight:
        return dataset
    import tensorflow as tf

    table = tf.constant([class_weight.get(c, 0.0) for c in range(max(class_weight) + 1)], tf.float32)

    def add_weight(x, y):
        target = y["predictions"] if isinstance(y, dict) else y
        return x, y, tf.reduce_sum(tf.cast(target, tf.float32) * table, axis=-1)

    return dataset.map(add_weight, num_parallel_calls=tf.data.AUTOTUNE)


@dataclass
class RunStart:
    """A classifier run, set up: the validated settings, the run folder, the tf.distribute strategy
    (``distribution``) and the split data."""

    config: object
    run: Run
    distribution: object
    description: str
    chief: bool
    source: object
    started: float


def start_run(config, overrides: dict, *, overwrite: bool, progress: bool) -> RunStart:
    """What `ktool train`, `finetune` and `pretrain` do first: apply ``overrides`` (the non-None ones) to
    ``config``, fill its derived defaults and validate it, prepare the run folder, make the tf.distribute
    strategy (the distribution), and load and split the data (at least 2 classes for a classifier;
    pretraining's ``LABELLED = False`` takes a folder without class folders too)."""
    import dataclasses

    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config = config.resolved()
    config.validate()
    started = time.time()
    run, distribution, description, chief = open_run(config, overwrite)
    source = run_data(run, config, progress, allow_unlabeled=not config.LABELLED)
    if config.LABELLED and source.num_classes < 2:
        raise ValueError(
            f"data={config.data!r} has {source.num_classes} class(es) with images; a classifier needs at least 2."
        )
    return RunStart(config, run, distribution, description, chief, source, started)


def run_data(run: Run, config, progress: bool = False, *, allow_unlabeled: bool = False):
    """A run's data: the split an interrupted run started with (:func:`resumed_source`), else ``config.data``
    loaded and split with the run's settings."""
    return resumed_source(run, progress) or config_data(config, progress, allow_unlabeled=allow_unlabeled)


def config_data(config, progress: bool = False, **options):
    """``config.data`` loaded and split with the config's settings (fractions, seed, strict, data_dir)."""
    from ktoolkit.data import load_data

    return load_data(
        config.data,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        strict=config.strict,
        data_dir=config.data_dir,
        progress=progress,
        **options,
    )


def resumed_source(run: Run, progress: bool = False):
    """An interrupted run's data, exactly as it started: the split in its splits.json, or None for a new
    run (or one whose split could not be recorded). Files added to the data since are not used;
    a recorded file that changed or vanished is an error, since the epochs already trained saw it."""
    from ktoolkit.data import manifest

    doc = manifest.read(run) if run.splits.exists() else None
    if doc is None or doc.get("kind") == "none":
        return None
    source, verification = manifest.load_recorded(run, progress=progress, doc=doc)
    changed = {name: c for name, c in verification.counts.items() if c["unchanged"] != c["recorded"]}
    if changed:
        counts = ", ".join(
            f"{name}: {c['changed']} changed, {c['missing']} missing of {c['recorded']}" for name, c in changed.items()
        )
        raise ValueError(
            f"out={str(run.root)!r} holds an interrupted run whose images changed since it started "
            f"({counts}, under {verification.root}); restore them to resume, or pass --overwrite to "
            f"start over on the images there now."
        )
    log.info(
        "resuming on the split recorded in %s (%d images); images added since are not used",
        run.splits,
        sum(len(split) for split in source.splits.values()),
    )
    return source


def open_run(config, overwrite: bool):
    """Checks ``config.out`` (before TensorFlow is imported: a mistake is reported at once), makes the
    tf.distribute strategy, then, on the chief, prepares and locks the run folder. Call it from a
    @run_command function. Returns (run, distribution, description, chief)."""
    from ktoolkit.train.distribute import is_chief, make_distribution

    run = Run(config.out)
    # Only the chief writes and locks, and which worker is the chief is known once the distribution exists;
    # the other workers share the folder (and must not trip over the chief's lock).
    check_run_folder(run, config, overwrite, test_lock=config.distribute != "multiworker")
    # First, before TensorFlow runs any op: MultiWorkerMirroredStrategy configures the collective ops
    # at program start-up (and loading the data decodes images with TensorFlow).
    distribution, description = make_distribution(config.distribute)
    chief = is_chief(distribution)
    if chief:
        prepare_run_folder(run, config, overwrite)
    else:
        try:
            run.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise folder_error(run.root, err) from err
    return run, distribution, description, chief


def fit(
    run: Run,
    model,
    inference,
    train_ds,
    val_ds,
    *,
    epochs: int,
    steps: int,
    callbacks=(),
    early_stopping: int = 0,
    stop_on: str = "loss",
    class_weight: dict | None = None,
    chief: bool = True,
    progress: bool = False,
):
    """``model.fit`` with the run folder's crash recovery: history.csv, best.keras, the checkpoint.

    Call it inside the distribution's scope. ``early_stopping`` is a patience in epochs on ``stop_on``
    ("loss" or "accuracy", of the validation split when there is one); ``class_weight`` ({class index:
    weight}, see :func:`class_weights`) weights each training image's loss by its class (as sample
    weights, so soft MixUp/CutMix labels and multi-output models work too). Returns (history rows, epoch
    resumed from, the BestModel callback, or None when ``inference`` is None). The checkpoint is kept until
    ``finish`` has marked the run complete, so a run killed after its last epoch resumes there (with
    nothing left to train).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; state.json says so ("failed").
    """
    from ktoolkit.train.callbacks import RunLog

    run_log = RunLog(run, epochs, write=chief)
    stopping = (early_stopping, stop_on)
    best_model, all_callbacks = _fit_callbacks(run, model, inference, val_ds, run_log, callbacks, stopping, chief)
    train_ds = weight_by_class(train_ds, class_weight)
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        steps_per_epoch=steps,
        callbacks=all_callbacks,
        verbose=(1 if progress else 0),
    )
    if run_log.failed:
        if chief:  # a checkpoint of NaN weights is nothing to resume from
            shutil.rmtree(run.backup, ignore_errors=True)
        raise NonFiniteLossError(
            f"out={str(run.root)!r}: training stopped: the {run_log.failed}; the run is marked failed in state.json. "
            f"Lower the learning rate (--lr, the rate was {run_log.failed_lr:g}) or check the data, then start again "
            "with --overwrite or a new --out."
        )
    return run_log.rows, run_log.started_at_epoch, best_model


def _fit_callbacks(run: Run, model, inference, val_ds, run_log, callbacks, stopping: tuple, chief: bool):
    """``fit``'s callbacks, in the order that keeps a killed run consistent: RunLog, BestModel (when there is an
    ``inference`` model), BackupAndRestore, the caller's, EarlyStopping (``stopping``: (patience, "loss" or
    "accuracy")), TensorBoard. Returns (BestModel or None, the callbacks)."""
    import tf_keras

    from ktoolkit.train.callbacks import BestModel

    best_model = None  # inference None: nothing to pick a best model by (e.g. pretraining without labels)
    if inference is not None:
        main = "" if len(model.output_names) == 1 else "predictions_"
        monitor = f"val_{main}accuracy" if val_ds is not None else f"{main}accuracy"
        best_model = BestModel(run, monitor, "max", inference, write=chief)
    all_callbacks = [
        run_log,
        *([best_model] if best_model else []),
        # the same folder on every worker: Keras sends the non-chief workers' writes to temporary folders
        tf_keras.callbacks.BackupAndRestore(str(run.backup), save_freq="epoch", delete_checkpoint=False),
        *callbacks,
    ]
    patience, stop_on = stopping
    if patience:
        main = "" if len(model.output_names) == 1 or stop_on == "loss" else "predictions_"
        all_callbacks.append(
            tf_keras.callbacks.EarlyStopping(
                monitor=("val_" if val_ds is not None else "") + main + stop_on,
                patience=patience,
                mode="min" if stop_on == "loss" else "max",
            )
        )
    if chief:
        all_callbacks.append(tf_keras.callbacks.TensorBoard(str(run.tensorboard), write_graph=False, profile_batch=0))
    return best_model, all_callbacks


def save_final(run: Run, inference, best_model, chief: bool = True):
    """last.keras (and best.keras if no epoch was ever the best). The checkpoint stays: ``finish``
    removes it once the run is marked complete."""
    from ktoolkit.train.callbacks import save_elsewhere

    # Every worker saves (saving is a collective op under MultiWorkerMirroredStrategy); only the chief keeps files.
    no_best = best_model is None or (best_model.best is None and not run.best.exists())
    for path in [run.last] + ([run.best] if no_best else []):
        if chief:
            save_model(inference, path)
        else:
            save_elsewhere(inference)


def finish(
    run: Run,
    class_names,
    eval_split: str,
    eval_ds,
    history,
    *,
    title: str,
    started: float,
    progress: bool = False,
    extra_sections=None,
    evaluation=None,
) -> dict:
    """Evaluates best.keras on ``eval_ds`` (or saves ``evaluation``, made by the caller), draws the curves,
    marks the run complete, writes the report, and only then removes the checkpoint: killed before,
    the same command resumes after the last epoch and finishes (a complete run without report.md
    counts as interrupted)."""
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
    shutil.rmtree(run.backup, ignore_errors=True)
    return metrics


def prepare_run_folder(run: Run, config, overwrite: bool) -> RunLock:
    """Makes or reuses the run folder and locks it for the command now running (a @run_command function
    releases the lock). What is refused is ``check_run_folder``'s; ``overwrite`` removes only the files
    ktoolkit wrote (unknown files stay, named in a log line). A new run's marker is written first.

    ``config`` is a TrainConfig (or subclass): the folder's config.yaml is read with its class.
    """
    check_run_folder(run, config, overwrite, test_lock=False)  # nothing is written into a folder that is not ours
    lock = run.lock()
    try:
        lock.created = _make_folders(run.root)
        lock.acquire()
        # Again, under the lock: another command may have changed the folder since the first look.
        decision = check_run_folder(run, config, overwrite, test_lock=False)
        if decision == "overwrite":
            kept = run.remove_own_files()
            log.info("out=%r: the previous run's files were removed", str(run.root))
            if kept:
                log.warning(
                    "out=%r: kept %d file(s) ktoolkit did not write: %s",
                    str(run.root),
                    len(kept),
                    ", ".join(kept[:20]) + (", ..." if len(kept) > 20 else ""),
                )
        if decision != "resume":
            lock.marker = run.mark()
    except BaseException as err:
        lock.release(abandon=True)
        if isinstance(err, OSError) and not isinstance(err, RunExistsError):  # read-only, a file in the way
            raise folder_error(run.root, err) from err
        raise
    _HELD.append(lock)
    return lock


def check_run_folder(run: Run, config, overwrite: bool, *, test_lock: bool = True) -> str:
    """What preparing ``run`` would do, "new", "resume" or "overwrite", found without writing anything
    (nor importing TensorFlow).

    Raises:
        ValueError: ``out`` is a file, cannot be written, is the home or root folder, or is or holds
            the data (or base) folder; an interrupted run with other settings.
        RunExistsError: files that are not a ktoolkit run (with or without ``overwrite``); a finished or
            failed run (without ``overwrite``). RunLockedError: another command is writing it.
    """
    root = run.root
    _check_place(root, config)
    if not run.entries():
        return "new"
    if test_lock and (holder := RunLock.holder(run)) is not None:
        raise RunLockedError(busy_message(root, holder))
    state = run.read_state()
    if not isinstance(state.get(MARKER), str):
        raise RunExistsError(
            f"out={str(root)!r} has files and is not a ktoolkit run (no state.json with ktoolkit's {MARKER} marker; "
            "the run folders of older ktoolkit versions are treated the same), so ktoolkit will not write there, with "
            "or without --overwrite; nothing was changed: choose a new --out."
        )
    if overwrite:
        return "overwrite"
    if state.get("failed"):
        raise RunExistsError(
            f"out={str(root)!r} holds a run that failed ({state['failed']}); choose a new --out, or "
            "pass --overwrite to start it again."
        )
    if state.get("complete") and run.report_md.exists():
        raise RunExistsError(
            f"out={str(root)!r} holds a finished run; choose a new --out, or pass --overwrite to replace it."
        )
    if run.config.exists():
        previous = type(config).from_yaml(run.config).to_dict()
        current = config.to_dict()
        if current.get("lr") == LR_AUTO and (run.root / "lr_find.json").exists():
            current["lr"] = previous.get("lr")  # an --lr auto run resumes with the rate it found (lr_find.recorded_lr)
        changed = [k for k in current if k not in config.RESUMABLE and previous.get(k) != current[k]]
        if changed:
            diffs = ", ".join(f"{k}: {previous.get(k)!r} there, {current[k]!r} now" for k in changed)
            raise ValueError(
                f"out={str(root)!r} holds an interrupted run with other settings ({diffs}); run the same "
                "command to resume it, choose a new --out, or pass --overwrite."
            )
    return "resume"


def _check_place(root: Path, config) -> None:
    """Refuses an ``out`` that is a file, cannot be written, or where a run would mix with the user's own
    files: the home or root folder, the data (or base) itself, a folder above it or inside a data folder."""
    name = f"out={str(root)!r}"
    path = root.expanduser()
    resolved = path.resolve()
    try:
        home = Path.home().resolve()
    except (KeyError, RuntimeError):  # no home folder known
        home = None
    if resolved in (Path(resolved.anchor), home):
        raise ValueError(
            f"{name} is {'the root' if resolved == Path(resolved.anchor) else 'your home'} folder; a run "
            "fills --out with its own files: choose a folder for this run, e.g. runs/NAME."
        )
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "" if existing == path else f" {existing}"
        raise ValueError(f"{name}:{where} is a file; choose a folder (a new one, or a ktoolkit run folder).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name}: cannot write in {existing} (permission denied); choose a folder you can write to, "
            "or fix its permissions."
        )
    for setting in ("data", "data_dir", "base", "weights"):
        value = getattr(config, setting, None)
        if not isinstance(value, str) or not value or value.startswith("tfds:"):
            continue
        if not Path(value).expanduser().exists():  # a name (a recipe, "imagenet"), or missing: said elsewhere
            continue
        given = Path(value).expanduser().resolve()
        flag = "--" + setting.replace("_", "-")
        if resolved == given or resolved in given.parents:
            raise ValueError(
                f"{name} is {'the' if resolved == given else 'a folder above the'} {flag} {value!r}: the "
                "run would write its files among yours; choose an --out outside it, e.g. runs/NAME."
            )
        if setting == "data" and given.is_dir() and given in resolved.parents:
            raise ValueError(
                f"{name} is inside the {flag} folder {value!r}: its images (curves.png, ...) would be "
                "read as a class of your data next time; choose an --out outside it, e.g. runs/NAME."
            )


def _make_folders(root: Path) -> list[Path]:
    """Makes ``root`` and its missing parents; returns the folders it made, deepest first."""
    missing = []
    path = root
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return missing


def write_run_header(run: Run, config, source, image_size, channels):
    """config.yaml, classes.json, labels.txt, data.json and splits.json: what a run folder says before
    training. splits.json records every example of every split by content, so evaluation and export
    later use exactly the held-out images (not a split recomputed from whatever files exist then).
    train_images.png shows a few training images of each class as the model gets them (with two classes or more)."""
    from ktoolkit.data import manifest
    from ktoolkit.report import TRAIN_IMAGES_PNG, plot_training_images

    class_names = list(source.class_names)
    write_text(run.config, config.to_yaml())
    write_json(run.classes, class_names)
    write_text(run.labels, "\n".join(class_names) + "\n")
    write_json(run.data, _data_summary(source, image_size, channels))
    if not run.splits.exists():  # a resumed run keeps the split it started with (see resumed_source)
        manifest.write(run.splits, manifest.record(source))
    if len(class_names) > 1:
        plot_training_images(source.splits.get("train"), class_names, image_size, channels, run.root / TRAIN_IMAGES_PNG)


def _build(recipe, config: TrainConfig, num_classes, image_size, channels):
    """Builds the training model; returns (model, loss weights per output)."""
    options = dict(config.recipe_options)
    aux_weight = recipe.options.get("aux_loss_weight")
    if aux_weight and options.get("aux_heads", True):
        options["aux_heads"] = True
    try:
        model = recipe.build(input_shape=(*image_size, channels), num_classes=num_classes, **options)
    except TypeError as err:  # an option the builder does not take (builders with **options check late)
        raise ValueError(
            f"recipe_options={dict(config.recipe_options)!r}: {recipe.name} does not take them "
            f"({err}); see `ktool recipes show {recipe.name}` and the builder's docstring."
        ) from None
    weights = {name: (1.0 if name == "predictions" else float(aux_weight or 0.0)) for name in model.output_names}
    return model, weights


# The fraction of a run's steps the warmup-cosine schedule warms up over (SimCLR: 10 of 100 epochs).
WARMUP_FRACTION = 0.1


def _optimizer(config: TrainConfig, steps_per_epoch: int):
    import tf_keras

    total = steps_per_epoch * config.epochs
    lr = config.lr
    callbacks = []
    if config.schedule == "step":
        lr = tf_keras.optimizers.schedules.PiecewiseConstantDecay(
            [int(total * 0.5), int(total * 0.75)], [config.lr, config.lr * 0.1, config.lr * 0.01]
        )
    elif config.schedule == "cosine":
        lr = tf_keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=max(1, total))
    elif config.schedule == "warmup-cosine":  # SimCLR: linear warm-up over 10% of the steps, then cosine decay
        warmup = max(1, round(total * WARMUP_FRACTION))
        lr = tf_keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=max(1, total - warmup), warmup_target=config.lr, warmup_steps=warmup
        )
    elif config.schedule == "reduce-on-plateau":
        callbacks.append(
            tf_keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.2, patience=max(2, config.epochs // 10), min_lr=config.lr * 1e-3
            )
        )
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
