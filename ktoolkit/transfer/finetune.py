"""`ktool finetune`: transfer a pretrained base to your data with the strategy the data calls for.

``finetune(FinetuneConfig(base="mobilenet_v2", data="mydir"))`` loads the data and the base, measures
size and similarity (``advise``), picks one of the four strategies of recipes.transfer (or the one
asked for, or knn), runs it, evaluates on the held-out split and leaves a run folder like `ktool train`'s,
with decision.json and the decision, plan and probes in the report.

- linear / linear-early: logistic regression on cached features (top layer / the best probed cut), C chosen
  by stratified 5-fold cross-validation over train+val and refit on all of it, folded into a Dense layer on
  the cut base: no epochs, seconds once the features are cached; the CV accuracy is reported with the test one.
- knn: k-nearest neighbours on the cached top features (cosine or L2, k by the same CV), kept in the model as
  a Dense layer of the references and a vote (NeighbourVote): a plain Keras classifier that exports.
- finetune (LP-FT): the head starts as the standardized linear classifier on the frozen top features, then the top
  ``unfreeze`` groups train with it, each group deeper at ``lr_decay`` times the learning rate of the
  one above (one optimizer per group). Frozen layers stay in inference mode; batch normalization stays
  in inference mode everywhere (its statistics are kept; see ``_trainable_model``).
- full: every layer trains, from the pretrained weights (or from scratch with weights none).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Literal

from ktoolkit.io import copy_file, save_model, write_json
from ktoolkit.train.config import CLASS_WEIGHTS, LR_AUTO, RunConfig, TrainConfig
from ktoolkit.train.engine import TrainResult, run_command

log = logging.getLogger(__name__)

STRATEGY_CHOICES = ("auto", "linear", "linear-early", "knn", "finetune", "full")
# The strategies that fit a classifier on cached features of the frozen base (no epochs).
_FEATURE_STRATEGIES = ("linear", "linear-early", "knn")
# The epochs of finetune and full when --epochs is not given: about STEP_BUDGET optimizer steps, within
# EPOCH_RANGE (see default_epochs); early stopping on the validation accuracy usually ends them sooner.
STEP_BUDGET = 3000
EPOCH_RANGE = (3, 30)
# What a Keras layer name is made of (scopes add "/"): anything else in --cut is a typo.
_LAYER_NAME = re.compile(r"[\w.\-/]{1,256}")


@dataclass
class FinetuneConfig(RunConfig):
    """Everything a transfer-learning run depends on (the flags of `ktool finetune`).

    Attributes:
        base: keras.applications name (vgg16, resnet50, mobilenet_v2, efficientnet_b0, ...), a recipe
            name, or a run folder of `ktool train`/`finetune`/`pretrain`.
        data: a class-per-folder directory, a CSV, an .npz, or ``tfds:NAME``.
        out: the run folder.
        weights: "imagenet", a weights file, or "none"; default: imagenet for keras.applications bases,
            the run's own for run folders, none for recipes.
        strategy: auto (decided from the data), linear, linear-early, knn, finetune or full.
        cut: the layer for linear-early (default: the best held-out probe).
        unfreeze: how many of the base's top groups (cut points) train in the finetune strategy.
        lr: learning rate of the head (finetune) or of everything (full); default 1e-4 with pretrained
            weights, 1e-3 from scratch; "auto": found by the learning-rate finder on the strategy's model
            (the groups keep their lr_decay ratios), written into config.yaml and the report.
        lr_decay: each unfrozen group deeper trains at this times the learning rate of the group above.
        dropout: dropout before the new classifier (finetune, full).
        small_threshold: fewer training images per class than this is "small" (default 1,000).
        similarity_threshold: a similarity at or above this is "similar" (default: recipes.transfer).
        epochs: epochs of finetune and full; default (None) from the data size, :func:`default_epochs`:
            about :data:`STEP_BUDGET` optimizer steps, 3 to 30 epochs. The linear strategies have none.
        schedule: as for `ktool train`; cosine decay over the epochs by default.
        early_stopping: patience in epochs on the validation accuracy (finetune, full; 0: off). The model
            kept (best.keras) is the epoch with the best validation accuracy. Off without a validation split.
        class_weight: "auto" (balanced weights when the largest class has more than
            :data:`~ktoolkit.train.config.IMBALANCE_THRESHOLD` (1.5) times the training images of the
            smallest) or "none".
        label_smoothing: as for `ktool train` (TrainConfig).
        The other fields are :class:`ktoolkit.train.config.RunConfig`'s.
    """

    base: str = "mobilenet_v2"
    out: str = "runs/finetune"
    weights: str | None = None
    strategy: str = "auto"
    cut: str | None = None
    unfreeze: int = 2
    epochs: int | None = None
    schedule: str = "cosine"
    lr: float | Literal["auto"] | None = None
    lr_decay: float = 0.3
    label_smoothing: float = 0.0
    dropout: float = 0.2
    early_stopping: int = 3
    class_weight: str = "auto"
    small_threshold: float | None = None
    similarity_threshold: float | None = None
    # channels (RunConfig's) is not a setting here: the base decides (kept for the shared checks)

    KIND = "finetune"
    RESUMABLE = TrainConfig.RESUMABLE

    def lr_sweep(self, steps: int | None = None, progress: bool = False):
        """The learning-rate range test of the model this config's finetune or full strategy trains
        (:func:`lr_find_finetune`); what ``ktoolkit.train.lr_find.lr_find`` calls for a finetune config."""
        return lr_find_finetune(self, steps=steps, progress=progress)

    def validate(self) -> FinetuneConfig:
        """Raises a ValueError naming the first bad field, its value and the valid ones."""
        bad = self._bad
        if not self.data:
            bad("data", "give the training data: a folder with one subfolder per class, a CSV, an .npz or tfds:NAME.")
        if not self.base:
            bad(
                "base",
                "give a base: mobilenet_v2, resnet50, vgg16, ... (`ktool finetune --help`), a recipe or a run folder.",
            )
        self.check_common()
        if self.strategy not in STRATEGY_CHOICES:
            bad("strategy", f"use one of {', '.join(STRATEGY_CHOICES)}.")
        if not (isinstance(self.unfreeze, int) and self.unfreeze >= 1):
            bad("unfreeze", "must be a whole number >= 1 (groups of the base to train).")
        if not 0 < self.lr_decay <= 1:
            bad("lr_decay", "must be in (0, 1], e.g. 0.3.")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1).")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", "must be in [0, 1), e.g. 0.1.")
        for name in ("small_threshold", "similarity_threshold"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                bad(name, "must be >= 0.")
        if self.early_stopping < 0:
            bad("early_stopping", "is a patience in epochs; 0 turns it off.")
        if self.class_weight not in CLASS_WEIGHTS:
            bad("class_weight", f"use one of {', '.join(CLASS_WEIGHTS)}.")
        if self.cut is not None and not _LAYER_NAME.fullmatch(self.cut):
            bad(
                "cut",
                "is not a layer name (letters, digits and _ . / -); give a layer of the base, e.g. "
                "block_13_expand_relu, or leave it out for the best held-out probe.",
            )
        from ktoolkit.data.augment import AugmentConfig
        from ktoolkit.transfer.bases import check_base

        AugmentConfig.parse(self.augment)  # a ValueError names a bad option
        check_base(self.base, self.weights)  # by name, before TensorFlow loads
        return self


@dataclass
class FinetuneResult(TrainResult):
    """A TrainResult plus the decision and what was done."""

    strategy: str = ""
    advice: object = None
    plan: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """What `ktool finetune` prints: the numbers behind the decision, the strategy, then train's lines."""
        return [*self.advice.lines(), f"strategy: {self.strategy}", *super().lines()]


@run_command  # releases the run folder's lock when it ends
def finetune(
    config: FinetuneConfig | None = None, *, progress: bool = False, overwrite: bool = False, **overrides
) -> FinetuneResult:
    """Runs transfer learning as ``config`` says; see the module docstring. Raises like ``train``."""
    from ktoolkit.train.engine import start_run
    from ktoolkit.train.lr_find import recorded_lr

    start = start_run(config or FinetuneConfig(), overrides, overwrite=overwrite, progress=progress)
    auto = start.config.lr == LR_AUTO
    start.config = recorded_lr(start.run, start.config)  # a resumed --lr auto run: the rate it found
    job = _prepare(start, progress)
    history, resumed, linear = [], 0, None
    if job.strategy in _FEATURE_STRATEGIES:
        if auto:
            log.info("lr auto: the %s strategy fits on cached features and has no learning rate", job.strategy)
        model, plan, linear = _fit_linear(job)
    else:
        model, plan, history, resumed = _fit_trained(job, progress)
    metrics = _finish_finetune(job, model, plan, linear, history, progress, auto and not linear) if job.chief else {}
    return FinetuneResult(
        run=job.run,
        config=job.config,
        metrics=metrics,
        history=history,
        seconds=time.time() - job.started,
        resumed_from_epoch=resumed,
        strategy=job.strategy,
        advice=job.advice,
        plan=plan,
    )


@dataclass
class _Job:
    """A transfer run, set up: what ``start_run`` gave, the base, the advice and the strategy chosen."""

    config: FinetuneConfig
    run: object
    distribution: object
    chief: bool
    started: float
    class_names: list
    base: object
    advice: object
    strategy: str
    why: str
    splits: dict
    cache: object
    feature_kwargs: dict


def _prepare(start, progress: bool) -> _Job:
    """The seed, the base (inside the strategy scope), the run header, the advice and the strategy."""
    import tf_keras

    from ktoolkit.train.engine import write_run_header
    from ktoolkit.transfer.advise import advise
    from ktoolkit.transfer.bases import load_base
    from ktoolkit.transfer.features import FeatureCache

    config, source = start.config, start.source
    tf_keras.utils.set_random_seed(config.seed)
    with start.distribution.scope():
        base = load_base(config.base, weights=config.weights, image_size=config.image_size, data=source)
    if start.chief:
        write_run_header(start.run, config, source, base.image_size, base.channels)
    cache = FeatureCache()
    advice = advise(
        base,
        source,
        small_threshold=config.small_threshold,
        similarity_threshold=config.similarity_threshold,
        seed=config.seed,
        cache=cache,
        progress=progress,
    )
    strategy, why = _choose(config, base, advice)
    log.info("strategy %s: %s", strategy, why)
    return _Job(
        config=config,
        run=start.run,
        distribution=start.distribution,
        chief=start.chief,
        started=start.started,
        class_names=list(source.class_names),
        base=base,
        advice=advice,
        strategy=strategy,
        why=why,
        splits={name: split for name, split in source.splits.items() if len(split)},
        cache=cache,
        feature_kwargs=dict(image_size=base.image_size, channels=base.channels, cache=cache, progress=progress),
    )


def _split_features(job: _Job, layer) -> dict:
    """{"train": features, "val": features} of the frozen base at ``layer`` (cached); never the test split."""
    from ktoolkit.transfer.features import extract_features

    return {
        s: extract_features(job.base.model, [layer], job.splits[s], **job.feature_kwargs)[layer]
        for s in ("train", "val")
        if s in job.splits
    }


def _labelled_features(job: _Job, layer):
    """The features and labels of every train and val image (train first): what the feature strategies fit on."""
    import numpy as np

    feats = _split_features(job, layer)
    x = np.concatenate([feats[s] for s in feats])
    y = np.concatenate([np.asarray(job.splits[s].labels) for s in feats]).astype(np.int64)
    counts = np.bincount(y, minlength=len(job.class_names))
    if counts[counts > 0].min() < 2:
        rare = job.class_names[int(np.flatnonzero(counts == counts[counts > 0].min())[0])]
        raise ValueError(
            f"data: class {rare!r} has 1 labelled image outside the test split; --strategy {job.strategy} "
            "cross-validates and needs at least 2 of every class: add images of it or remove the class."
        )
    return x, y


def _probe_at(job: _Job, layer, *, cross_validate: bool = False):
    """Logistic regression on the frozen base's (cached) features at ``layer``; the test split is never read.

    ``cross_validate`` (the linear strategies): C by stratified k-fold cross-validation over train+val, then
    refit on all of them (``fit_linear_cv``). Otherwise (the finetune head, which early-stops on val): fit on
    train, C picked on val.
    """
    from ktoolkit.transfer.features import fit_linear, fit_linear_cv

    num_classes = len(job.class_names)
    if cross_validate:
        x, y = _labelled_features(job, layer)
        return fit_linear_cv(x, y, num_classes=num_classes, seed=job.config.seed)
    feats, splits = _split_features(job, layer), job.splits
    return fit_linear(
        feats["train"],
        splits["train"].labels,
        feats.get("val"),
        splits["val"].labels if "val" in splits else None,
        num_classes=num_classes,
    )


def _knn_at(job: _Job, layer):
    """The kNN classifier (k and metric by cross-validation) on the train+val features at ``layer``."""
    from ktoolkit.transfer.knn import MAX_REFERENCES, fit_knn

    images = sum(len(job.splits[s]) for s in ("train", "val") if s in job.splits)
    if images > MAX_REFERENCES:  # before any feature is computed
        raise ValueError(
            f"strategy=knn: {images:,} labelled images is more than the {MAX_REFERENCES:,} references the kNN "
            "classifier keeps; use --strategy linear (or auto) for this much data."
        )
    x, y = _labelled_features(job, layer)
    return fit_knn(x, y, num_classes=len(job.class_names), seed=job.config.seed)


def _fit_linear(job: _Job):
    """linear / linear-early / knn: a classifier on the frozen base's cached features of every train and val
    image, made into a plain Keras model on the cut base, saved as best and last.
    Returns (model, plan, (classifier, layer))."""
    from ktoolkit.transfer.features import linear_classifier_model
    from ktoolkit.transfer.knn import knn_classifier_model

    base, strategy = job.base, job.strategy
    layer = _check_cut(job.config.cut or job.advice.best_cut, base) if strategy == "linear-early" else base.top
    name = f"{_model_name(base)}_{strategy.replace('-', '_')}"
    if strategy == "knn":
        classifier = _knn_at(job, layer)
        model = knn_classifier_model(base.model, layer, classifier, name=name)
    else:
        classifier = _probe_at(job, layer, cross_validate=True)
        model = linear_classifier_model(base.model, layer, classifier, name=name)
    if job.chief:
        save_model(model, job.run.best)
        copy_file(job.run.best, job.run.last)  # no epochs: the last model is the best one
    return model, _feature_plan(job, layer, classifier), (classifier, layer)


def _feature_plan(job: _Job, layer, classifier) -> dict:
    """What the feature strategies report: the cut, the images fit on, the CV estimate and the choice it made."""
    plan = {
        "strategy": job.strategy,
        "features": layer,
        "images": classifier.images,
        "fit_on": "train+val (every labelled image but the test split)",
        "folds": classifier.folds,
        "cv": classifier.cv.to_dict(),
        "cv_scores": {str(key): round(value, 6) for key, value in classifier.cv_scores.items()},
        "classifier_seconds": round(classifier.seconds, 2),
        "feature_cache": {"hits": job.cache.hits, "misses": job.cache.misses},
    }
    if job.strategy == "knn":
        plan.update(
            feature_dims=int(classifier.references.shape[1]),
            trained="k-nearest-neighbour vote on cached features (the base is frozen and cut at the features layer)",
            k=classifier.k,
            metric=classifier.metric,
            references=classifier.images,
        )
    else:
        plan.update(
            feature_dims=int(classifier.kernel.shape[0]),
            trained="logistic regression on cached features (the base is frozen and cut at the features layer)",
            C=classifier.C,
            train_accuracy=classifier.train_accuracy,
        )
    return plan


def _fit_trained(job: _Job, progress: bool):
    """finetune / full: the classifier trained with train's ``fit``, for the epochs :func:`_schedule` gives,
    early-stopped on the validation accuracy, with class weights where the classes are imbalanced.
    Returns (model, plan, history, resumed)."""
    import tf_keras

    from ktoolkit.data import AugmentConfig, split_dataset
    from ktoolkit.train.engine import fit, repeat_for_steps, save_final, steps_per_epoch

    base, distribution = job.base, job.distribution
    # finetune (LP-FT): the head starts as the standardized linear probe on the frozen top features. Not for
    # full: once batch normalization trains, the features move away from the ones that probe was fit on.
    probe, val_features = _head_probe(job) if job.strategy == "finetune" else (None, None)
    global_batch = job.config.batch_size * distribution.num_replicas_in_sync
    steps = steps_per_epoch(job.config, len(job.splits["train"]), global_batch)
    config, schedule = _schedule(job.config, steps, "val" in job.splits)
    augment = None if config.augment in ("", "none", None) else AugmentConfig.parse(config.augment)
    shape = dict(
        num_classes=len(job.class_names), image_size=base.image_size, channels=base.channels, batch_size=global_batch
    )
    train_ds = repeat_for_steps(
        config, split_dataset(job.splits["train"], config, training=True, augment=augment, **shape)
    )
    val_ds = split_dataset(job.splits.get("val"), config, training=False, **shape)
    weights, weighting = _class_weighting(job.splits["train"].labels, job.class_names, config.class_weight)
    if config.lr == LR_AUTO:
        config = _auto_lr(job, config, probe, steps, train_ds, weights, progress)
    with distribution.scope():
        model, plan = _trainable_model(base, job.strategy, config, len(job.class_names), probe, steps)
    plan.update(schedule, class_weight=weighting)
    inference = tf_keras.Model(model.inputs, model.outputs, name=model.name)
    if probe is not None and val_ds is not None:
        plan["start"] = _start_from_probe(job, inference, val_ds, probe, val_features)
    with distribution.scope():
        history, resumed, best_model = fit(
            job.run,
            model,
            inference,
            train_ds,
            val_ds,
            epochs=config.epochs,
            steps=steps,
            callbacks=plan.pop("_callbacks"),
            early_stopping=config.early_stopping,
            stop_on="accuracy",
            class_weight=weights,
            chief=job.chief,
            progress=progress,
        )
    save_final(job.run, inference, best_model, job.chief)
    plan["best_epoch"] = None if best_model is None or best_model.best_epoch is None else best_model.best_epoch + 1
    return model, plan, history, resumed


def _sweep(job: _Job, config, probe, steps: int, train_ds, weights, progress: bool, sweep_steps=None):
    """The learning-rate range test of the finetune/full model, built as :func:`_trainable_model` builds it
    (the LP-FT head, the unfrozen groups, frozen batch normalization) at a constant rate: the head's rate
    sweeps from 1e-7 to 10 and each deeper group's follows at its ``lr_decay`` ratio. The base's weights
    are restored afterwards and the seed set again. Returns the LRFindResult (the rate is the head's)."""
    import tf_keras

    from ktoolkit.train import lr_find
    from ktoolkit.train.engine import weight_by_class

    at_one = dataclasses.replace(config, lr=1.0, schedule="constant", epochs=config.epochs or 1)  # rates: the ratios
    with job.distribution.scope():
        model, _ = _trainable_model(job.base, job.strategy, at_one, len(job.class_names), probe, steps)
    optimizers = [(o, float(tf_keras.backend.get_value(o.learning_rate))) for o in model._group_optimizers]
    result = lr_find.sweep(
        model,
        weight_by_class(train_ds, weights),
        steps=sweep_steps or lr_find.default_steps(steps),
        optimizers=optimizers,
        progress=progress,
        what=f"{job.base.name} ({job.strategy}), {config.optimizer}",
    )
    del model
    tf_keras.utils.set_random_seed(config.seed)
    return result


def _auto_lr(job: _Job, config, probe, steps: int, train_ds, weights, progress: bool):
    """``--lr auto`` for finetune/full: :func:`_sweep`, then (on the chief) lr_find.png/.json and config.yaml
    with the rate in the run folder. Returns the config with the rate found (the valley suggestion)."""
    from ktoolkit.train import lr_find

    log.info("lr auto: sweeping the learning rate of %s (%s)", job.base.name, job.strategy)
    result = _sweep(job, config, probe, steps, train_ds, weights, progress)
    if job.chief:
        return lr_find.use_result(job.run, config, result)
    return dataclasses.replace(config, lr=result.suggestion)


def lr_find_finetune(config: FinetuneConfig, *, steps: int | None = None, progress: bool = False):
    """`ktool lr-find --base`: the range test of the finetune (LP-FT; also for --strategy auto, which would
    need the advice's probes to decide) or full strategy's model on the training split, with no run folder.
    Returns the LRFindResult."""
    import tensorflow as tf
    import tf_keras

    from ktoolkit.data import AugmentConfig, split_dataset
    from ktoolkit.train.engine import config_data, steps_per_epoch
    from ktoolkit.transfer.bases import load_base
    from ktoolkit.transfer.features import FeatureCache

    strategy = "finetune" if config.strategy == "auto" else config.strategy
    if strategy not in ("finetune", "full"):
        raise ValueError(
            f"--strategy {strategy}: fits a classifier on cached features, with no learning rate; "
            "lr-find sweeps --strategy finetune or full."
        )
    config = dataclasses.replace(config, strategy=strategy).validate()
    source = config_data(config, progress)
    tf_keras.utils.set_random_seed(config.seed)
    base = load_base(config.base, weights=config.weights, image_size=config.image_size, data=source)
    cache = FeatureCache()
    splits = {name: split for name, split in source.splits.items() if len(split)}
    if "train" not in splits:
        raise ValueError(f"data={config.data!r}: the training split is empty.")
    job = _Job(
        *(config, None, tf.distribute.get_strategy(), True, time.time(), list(source.class_names), base, None),
        *(strategy, "lr-find", splits, cache),
        feature_kwargs=dict(image_size=base.image_size, channels=base.channels, cache=cache, progress=progress),
    )
    probe = _head_probe(job)[0] if strategy == "finetune" else None
    augment = None if config.augment in ("", "none", None) else AugmentConfig.parse(config.augment)
    shape = dict(num_classes=len(job.class_names), image_size=base.image_size, channels=base.channels)
    train_ds = split_dataset(
        splits["train"], config, training=True, augment=augment, batch_size=config.batch_size, **shape
    )
    weights, _ = _class_weighting(splits["train"].labels, job.class_names, config.class_weight)
    batches = steps_per_epoch(config, len(splits["train"]), config.batch_size)
    return _sweep(job, config, probe, batches, train_ds, weights, progress, sweep_steps=steps)


def default_epochs(steps_per_epoch: int, budget: int = STEP_BUDGET, epoch_range=EPOCH_RANGE) -> int:
    """Epochs of finetune and full when --epochs is not given: ``clip(ceil(budget / steps_per_epoch), 3, 30)``.

    About 3,000 optimizer steps, the order of the fine-tuning budgets in the transfer literature (BiT's
    HyperRule gives 500 steps of 512 images to sets under 20,000 images; Keras's guide ~10 epochs), which
    early stopping on the validation accuracy cuts short once it stops improving. At least 3 epochs (so
    early stopping has epochs to compare, and a large set is still seen three times), at most 30 (a small
    set, 7 steps an epoch, would otherwise get 429 epochs of the same images)."""
    low, high = epoch_range
    return int(min(high, max(low, -(-budget // max(1, steps_per_epoch)))))


def _schedule(config, steps: int, has_val: bool):
    """The config with its epochs and patience resolved (the data-size default, no early stopping without a
    validation split), and what the plan says about them."""
    epochs = config.epochs or default_epochs(steps)
    if config.epochs:
        rule = f"--epochs {config.epochs}"
    else:
        rule = (
            f"from the data size: ceil({STEP_BUDGET} steps / {steps} steps per epoch) within "
            f"{EPOCH_RANGE[0]}-{EPOCH_RANGE[1]} (--epochs overrides)"
        )
    patience = config.early_stopping if has_val else 0
    stopping = (
        f"after {patience} epoch(s) without a better validation accuracy; the best epoch is kept"
        if patience
        else ("off (--early-stopping 0)" if has_val else "off (no validation split)")
    )
    entries = {"epochs": epochs, "epochs_rule": rule, "schedule": config.schedule, "early_stopping": stopping}
    return dataclasses.replace(config, epochs=epochs, early_stopping=patience), entries


def _class_weighting(labels, class_names, how: str):
    """(class weights for ``fit`` or None, what the plan records about them)."""
    import numpy as np

    from ktoolkit.train.config import IMBALANCE_THRESHOLD
    from ktoolkit.train.engine import class_weights

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    present = counts[counts > 0]
    ratio = float(present.max() / present.min()) if len(present) else 1.0
    weights = class_weights(labels, len(class_names), how)
    if weights:
        why = f"balanced: the largest class has {ratio:.2f}x the images of the smallest (> {IMBALANCE_THRESHOLD})"
    elif how == "none":
        why = "none (--class-weight none)"
    else:
        why = f"none: the largest class has {ratio:.2f}x the images of the smallest (<= {IMBALANCE_THRESHOLD})"
    entry = {
        "how": how,
        "imbalance": round(ratio, 4),
        "why": why,
        "weights": {class_names[c]: round(w, 4) for c, w in weights.items()} if weights else None,
    }
    return weights, entry


def _head_probe(job: _Job):
    """The linear probe LP-FT starts from: logistic regression on the frozen top features of the training
    split alone, C picked on the validation split (which then early-stops the fine-tuning, so it must not
    have been fit on). Returns (probe, the validation features or None)."""
    from ktoolkit.transfer.features import extract_features, fit_linear

    splits, top = job.splits, job.base.top
    feats = {
        s: extract_features(job.base.model, [top], splits[s], **job.feature_kwargs)[top]
        for s in ("train", "val")
        if s in splits
    }
    val_labels = splits["val"].labels if "val" in splits else None
    probe = fit_linear(
        feats["train"], splits["train"].labels, feats.get("val"), val_labels, num_classes=len(job.class_names)
    )
    return probe, feats.get("val")


def _start_from_probe(job: _Job, inference, val_ds, probe, val_features) -> dict:
    """The LP-FT starting point on the validation images, before any step: its accuracy, the probe's, and
    how many of the images both classify alike (all of them: the head is the probe)."""
    import numpy as np

    from ktoolkit.stats import Accuracy

    labels = np.asarray(job.splits["val"].labels).astype(int)
    start = np.asarray(inference.predict(val_ds, verbose=0)).argmax(axis=1)
    linear = probe.predict_proba(np.asarray(val_features, np.float64)).argmax(axis=1)
    return {
        "val_accuracy": Accuracy.of(start, labels, how="validation").to_dict(),
        "probe_val_accuracy": Accuracy.of(linear, labels, how="validation").to_dict(),
        "same_predictions": int((start == linear).sum()),
        "images": int(len(labels)),
    }


def _finish_finetune(job: _Job, model, plan, linear, history, progress: bool, auto: bool = False) -> dict:
    """On the chief: decision.json, probes.png, the evaluation on the held-out split and train's ``finish``
    (``auto``: the report says how the learning rate was found)."""
    from ktoolkit.data import make_dataset
    from ktoolkit.train.engine import finish
    from ktoolkit.train.lr_find import report_section

    base, splits = job.base, job.splits
    write_json(
        job.run.root / "decision.json",
        {"strategy": job.strategy, "why": job.why, "advice": job.advice.to_dict(), "plan": plan},
    )
    _plot_probes(
        job.advice.probes,
        job.run.root / "probes.png",
        title=f"linear probes: {base.name} on {job.config.data}",
        chosen=plan.get("features"),
    )
    eval_name = "test" if "test" in splits else "val"
    eval_ds, evaluation = None, None
    if linear is not None:  # fit on train+val: only the test split is held out, and the CV estimate is kept
        eval_name, (classifier, layer) = "test", linear
        if "test" in splits:
            evaluation = _evaluate_linear(
                model, classifier, base, layer, splits["test"], job.class_names, job.feature_kwargs
            )
    elif eval_name in splits:
        eval_ds = make_dataset(
            splits[eval_name],
            num_classes=len(job.class_names),
            image_size=base.image_size,
            channels=base.channels,
            batch_size=64,
            training=False,
        )
    metrics = finish(
        job.run,
        job.class_names,
        eval_name,
        eval_ds,
        history,
        title=f"{base.name} ({job.strategy}) on {job.config.data}",
        started=job.started,
        progress=progress,
        extra_sections=_report_sections(job.advice, job.strategy, job.why, plan)
        + (report_section(job.run) if auto else []),
        evaluation=evaluation,
    )
    if linear is not None:  # the run's metrics carry the CV estimate, with or without a test split
        metrics["cv"] = linear[0].cv.to_dict()
        if evaluation is not None:
            write_json(job.run.metrics, metrics)
    _plot_group_rates(job, plan, history)
    return metrics


def _plot_group_rates(job: _Job, plan: dict, history) -> None:
    """curves.png again, with one learning-rate curve per group when several groups train at different rates
    (the history logs the fastest group's rate; every group's optimizer runs the same schedule from its own
    rate). Not with reduce-on-plateau, which lowers the logged group's rate alone."""
    from ktoolkit.report import plot_curves

    rates = {g["group"]: g["learning_rate"] for g in plan.get("groups", ()) if g.get("learning_rate")}
    if not history or len(set(rates.values())) < 2 or plan.get("schedule") == "reduce-on-plateau":
        return
    fastest = max(rates.values())
    plot_curves(
        history,
        job.run.curves,
        title=f"{job.base.name} ({job.strategy}) on {job.config.data}",
        lr_groups={f"{g} ({r:.2g})": r / fastest for g, r in rates.items()},
    )


def _evaluate_linear(model, probe, base, layer, split, class_names, feature_kwargs):
    """Evaluates the feature classifier (linear or kNN) on the split's (cached) features, after checking on a
    batch of images that the saved Keras model computes the same probabilities (for kNN, on the images whose
    k-th and next neighbour are not a float32 near-tie)."""
    import numpy as np

    from ktoolkit.evaluate import evaluate_predictions, split_images_at
    from ktoolkit.transfer.advise import load_images
    from ktoolkit.transfer.features import extract_features

    features = extract_features(base.model, [layer], split, **feature_kwargs)[layer]
    from_features = probe.predict_proba(features)
    check = split.subset(np.arange(min(32, len(split))))
    from_model = np.asarray(model.predict_on_batch(load_images(check, base.image_size, base.channels)))
    gaps = np.abs(from_model - from_features[: len(check)]).max(axis=1)
    if hasattr(probe, "near_ties"):
        gaps = gaps[~probe.near_ties(features[: len(check)])]
    gap = float(gaps.max()) if gaps.size else 0.0
    if gap > 1e-3:
        raise RuntimeError(
            f"the saved classifier differs from the one it was made from by {gap:.2g} in "
            "probability on the first test images; this is a bug, please report it."
        )
    evaluation = evaluate_predictions(from_features, np.asarray(split.labels).astype(int), class_names)
    evaluation.images_at = split_images_at([split], base.image_size, base.channels)  # for the pictures
    return evaluation


def _choose(config, base, advice) -> tuple[str, str]:
    if config.strategy != "auto":
        return (
            config.strategy,
            f"asked for (--strategy {config.strategy}); the data's quadrant is {advice.decision.quadrant}",
        )
    if not base.pretrained:
        return "full", "weights none: there is nothing pretrained to transfer, so the whole network trains from scratch"
    return advice.decision.strategy, "; ".join(advice.decision.reasons())


def _check_cut(layer: str, base) -> str:
    names = [layer.name for layer in base.model.layers]
    if layer not in names:
        import difflib

        close = difflib.get_close_matches(layer, names, 3)
        raise ValueError(
            f"--cut {layer}: {base.name} has no such layer"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; its cut points are {', '.join(base.groups)}."
        )
    return layer


def _model_name(base) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_]+", "_", base.model.name).strip("_") or "base"


def group_of_layers(model, cuts) -> dict:
    """{layer name: group}: the group of a layer is the first cut point at or after it; "head" after the last."""
    order = {layer.name: i for i, layer in enumerate(model.layers)}
    ends = sorted((order[c], c) for c in cuts if c in order)
    groups = {}
    for i, layer in enumerate(model.layers):
        groups[layer.name] = next((c for end, c in ends if i <= end), "head")
    return groups


def _trainable_model(base, strategy, config, num_classes, probe, steps):
    """The classifier to fit, with trainable flags and one optimizer per learning-rate group."""
    import tf_keras

    from ktoolkit.train.engine import _optimizer, classifier_metrics
    from ktoolkit.transfer.grouped import GroupedLearningRates

    outputs = _head(base, num_classes, config.dropout, probe)

    lr = config.lr or (1e-4 if base.pretrained else 1e-3)
    model = GroupedLearningRates(base.model.inputs, outputs, name=f"{_model_name(base)}_{strategy}")
    groups = group_of_layers(model, base.groups)
    if strategy == "finetune":
        trained = base.groups[-config.unfreeze :] + ["head"]
        rates = {g: lr * config.lr_decay**k for k, g in enumerate(reversed(trained))}
    else:
        rates = {g: lr for g in [*base.groups, "head"]}
    for layer in model.layers:
        # finetune keeps every batch normalization in inference mode, in the unfrozen groups too (as the Keras
        # transfer-learning guide advises): their moving averages (momentum 0.99-0.999) would lag behind the
        # changing weights, and small batches give noisy statistics. full trains them like the rest.
        # The probe's standardization is a fixed change of coordinates of the features: it stays as fit.
        is_bn = type(layer).__name__ == "BatchNormalization"
        fixed = (strategy == "finetune" and is_bn) or layer.name == "feature_standardization"
        layer.trainable = groups[layer.name] in rates and not fixed
        if is_bn and layer.trainable:  # full: statistics that follow the new data within tens of steps, not thousands
            layer.momentum = min(layer.momentum, 0.9)
    optimizers, callbacks = {}, []
    for rate in sorted(set(rates.values()), reverse=True):
        opt, cbs = _optimizer(dataclasses.replace(_as_train_config(config), lr=rate), steps)
        optimizers[rate] = opt
        callbacks = callbacks or cbs
    model.set_groups({g: optimizers[r] for g, r in rates.items()}, groups)
    model.compile(
        optimizer=optimizers[max(rates.values())],
        loss=tf_keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=classifier_metrics(num_classes),
    )
    plan = _plan(model, base, strategy, config, probe, rates, groups, callbacks)
    return model, plan


def _head(base, num_classes: int, dropout: float, probe):
    """The new classifier on the base's output: pooling, dropout and a softmax Dense "predictions".

    With a probe (finetune: LP-FT, Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"), the
    head is the probe as it was fit: :func:`~ktoolkit.transfer.features.linear_classifier_model`'s
    pooling, then the per-channel standardization (a 1x1 depthwise convolution, "feature_standardization"),
    then the Dense of the probe's standardized-space weights; so before any step the model
    predicts what the probe does. Dropout is off in inference mode, so it does not move that start;
    in training it drops standardized features (what it does to any features). Without a probe (full),
    the Dense starts at random on the raw pooled features.
    """
    import tf_keras

    from ktoolkit.transfer.features import linear_classifier_model

    weights = None
    if probe is not None:
        folded = linear_classifier_model(base.model, base.top, probe).get_layer("predictions")
        x, weights = folded.input, folded.get_weights()
    else:
        x = base.model.output
        if len(x.shape) == 4:
            x = tf_keras.layers.GlobalAveragePooling2D(name="avg_pool_features")(x)
    x = tf_keras.layers.Dropout(dropout, name="head_dropout")(x)
    dense = tf_keras.layers.Dense(num_classes, activation="softmax", name="predictions")
    outputs = dense(x)
    if weights is not None:
        dense.set_weights(weights)
    return outputs


def _plan(model, base, strategy, config, probe, rates, groups, callbacks) -> dict:
    """What the trained strategies report: the groups, their learning rates, the trainable and frozen parts."""
    trainable = sum(int(w.shape.num_elements()) for w in model.trainable_weights)
    frozen_layers = [layer.name for layer in model.layers if not layer.trainable and layer.weights]
    return {
        "strategy": strategy,
        "groups": [
            {
                "group": g,
                "learning_rate": rates.get(g),
                "trainable": g in rates,
                "layers": sum(1 for n in groups.values() if n == g),
            }
            for g in [*base.groups, "head"]
        ],
        "trainable_parameters": trainable,
        "frozen_parameters": int(model.count_params() - trainable),
        "frozen_layers_with_weights": len(frozen_layers),
        "head_initialized_from": (
            f"standardized linear probe on the top features (LP-FT; C={probe.C:g}, fit on the training split)"
            if probe is not None
            else "random"
        ),
        "dropout": config.dropout,
        "optimizer": config.optimizer,
        "epochs": config.epochs,
        "_callbacks": callbacks,
    }


def _as_train_config(config) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in dataclasses.asdict(config).items() if k in names and k != "data"}
    if values.get("lr") is None:  # finetune's own default (set per strategy by the caller)
        values.pop("lr", None)
    return TrainConfig(**values, data=config.data)


def _plot_probes(probes, path, title: str = "", chosen: str | None = None):
    """probes.png: each depth's cross-validated probe accuracy (percent) with its 95% interval as error bars,
    the training accuracy, and the chosen cut (``chosen``, default the cut linear-early takes) marked."""
    if not probes:
        return
    from ktoolkit.io import save_figure
    from ktoolkit.report import _pyplot
    from ktoolkit.transfer.advise import best_probe

    chosen = chosen or best_probe(probes).layer
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(probes)), 3.8))
    xs = list(range(len(probes)))
    values = [100 * p.val_accuracy for p in probes]
    low = [v - 100 * p.accuracy.interval[0] for v, p in zip(values, probes)]
    high = [100 * p.accuracy.interval[1] - v for v, p in zip(values, probes)]
    how, images = probes[0].accuracy.how, probes[0].accuracy.images
    ax.errorbar(xs, values, yerr=[low, high], fmt="o-", capsize=4, label=f"{how}, 95% CI ({images:,} images)")
    ax.plot(xs, [100 * p.train_accuracy for p in probes], "o--", alpha=0.6, label="training")
    at = next((i for i, p in enumerate(probes) if p.layer == chosen), None)
    if at is not None:
        ax.plot([at], [values[at]], "*", markersize=16, color="tab:red", zorder=5, label=f"chosen cut: {chosen}")
    ax.set_xticks(xs, [p.layer for p in probes], rotation=30, ha="right")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_xlabel("cut point (input → output)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _rate(value) -> str:
    return "" if value is None else f"{value:.2g}"


def _trained_plan_text(plan: dict) -> str:
    """The Plan section of finetune and full: parameters, head, schedule, class weights, LP-FT's start, groups."""
    from ktoolkit.stats import Accuracy

    rows = "\n".join(
        f"| {g['group']} | {g['layers']} | {'yes' if g['trainable'] else 'frozen'} | {_rate(g['learning_rate'])} |"
        for g in plan["groups"]
    )
    bn = "; batch normalization stays in inference mode in every group" if plan["strategy"] == "finetune" else ""
    lines = [
        f"{plan['trainable_parameters']:,} trainable and {plan['frozen_parameters']:,} frozen parameters; "
        f"head initialized from the {plan['head_initialized_from']}, dropout {plan['dropout']:g}. "
        f"Frozen layers run in inference mode{bn}.",
        f"- {plan['optimizer']}, {plan['schedule']} schedule, {plan['epochs']} epoch(s) ({plan['epochs_rule']}); "
        f"early stopping: {plan['early_stopping']}.",
        f"- class weights: {plan['class_weight']['why']}"
        + (
            " (" + ", ".join(f"{name} {w:.3g}" for name, w in plan["class_weight"]["weights"].items()) + ")."
            if plan["class_weight"]["weights"]
            else "."
        ),
    ]
    start = plan.get("start")
    if start:
        accuracy = Accuracy(start["val_accuracy"]["correct"], start["val_accuracy"]["images"], how="validation")
        lines.append(
            f"- start (before any step): validation accuracy {accuracy.text()}, the same prediction as the "
            f"probe on {start['same_predictions']} of {start['images']} images."
        )
    if plan.get("best_epoch") is not None:
        lines.append(f"- kept (best.keras): epoch {plan['best_epoch']}, the best validation accuracy.")
    table = "| group (ends at) | layers | trains | learning rate |\n|---|---|---|---|\n" + rows
    return "\n".join(lines) + "\n\n" + table


def _feature_plan_text(plan: dict) -> str:
    """The Plan section of the feature strategies: the cut, what was fit on how many images, the CV estimate."""
    from ktoolkit.stats import Accuracy

    cv = plan["cv"]
    estimate = Accuracy(cv["correct"], cv["images"], cv["how"], tuple(cv.get("folds", ()))).text()
    if plan["strategy"] == "knn":
        chosen = f"k={plan['k']} ({plan['metric']}, uniform votes, {plan['references']:,} references)"
    else:
        chosen = f"C={plan['C']:g}, training accuracy {plan['train_accuracy']:.1%}"
    return (
        f"Base frozen and cut at `{plan['features']}` ({plan['feature_dims']} features); {plan['trained']}: "
        f"{chosen}. Fit on {plan['fit_on']}: {plan['images']:,} images; chosen by {plan['folds']}-fold "
        f"stratified cross-validation, whose out-of-fold accuracy is {estimate}. "
        f"Fit in {plan['classifier_seconds']:.1f} s; feature cache {plan['feature_cache']['hits']} hit(s), "
        f"{plan['feature_cache']['misses']} miss(es)."
    )


def _report_sections(advice, strategy, why, plan) -> list[tuple[str, str]]:
    decision = "\n".join(f"- {line}" for line in advice.lines()) + f"\n\n**Strategy: {strategy}** ({why})."
    how = advice.probes[0].accuracy.how if advice.probes else "cross-validated"
    probes = (
        f"| cut point | features | held-out accuracy ({how}, 95% CI) | training accuracy |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {p.layer}{' (chosen cut)' if p.layer == advice.best_cut else ''} | {p.dims} | {p.accuracy.text()} "
            f"| {p.train_accuracy:.1%} |"
            for p in advice.probes
        )
    )
    if advice.comparison is not None:
        probes += f"\n\nBest earlier cut vs top, paired on the same images: {advice.comparison.text()}."
    probes += "\n\n![probes by depth](probes.png)"
    if "groups" in plan:
        body = _trained_plan_text(plan)
    else:
        body = _feature_plan_text(plan)
    return [("Transfer-learning decision", decision), ("Plan", body), ("Linear probes by depth", probes)]
