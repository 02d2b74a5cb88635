"""`ktool finetune`: transfer a pretrained base to your data with the strategy the data calls for.

``finetune(FinetuneConfig(base="mobilenet_v2", data="mydir"))`` loads the data and the base, measures
size and similarity (``advise``), picks one of the four strategies of recipes.transfer (or the one
asked for), runs it, evaluates on the held-out split and leaves a run folder like `ktool train`'s,
with decision.json and the decision, plan and probes in the report.

- linear / linear-early: logistic regression on cached features (top layer / the best probed cut),
  folded into a Dense layer on the cut base: no epochs, seconds once the features are cached.
- finetune: the head starts as the linear classifier on the frozen top features, then the top
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

from ktoolkit.io import copy_file, save_model, write_json
from ktoolkit.train.config import RunConfig, TrainConfig
from ktoolkit.train.engine import TrainResult, run_command

log = logging.getLogger(__name__)

STRATEGY_CHOICES = ("auto", "linear", "linear-early", "finetune", "full")
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
        strategy: auto (decided from the data), linear, linear-early, finetune or full.
        cut: the layer for linear-early (default: the best held-out probe).
        unfreeze: how many of the base's top groups (cut points) train in the finetune strategy.
        lr: learning rate of the head (finetune) or of everything (full); default 1e-4 with pretrained
            weights, 1e-3 from scratch.
        lr_decay: each unfrozen group deeper trains at this times the learning rate of the group above.
        dropout: dropout before the new classifier (finetune, full).
        small_threshold: fewer training images per class than this is "small" (default 1,000).
        similarity_threshold: a similarity at or above this is "similar" (default: recipes.transfer).
        label_smoothing, early_stopping: as for `ktool train` (TrainConfig).
        The other fields are :class:`ktoolkit.train.config.RunConfig`'s.
    """

    base: str = "mobilenet_v2"
    out: str = "runs/finetune"
    weights: str | None = None
    strategy: str = "auto"
    cut: str | None = None
    unfreeze: int = 2
    epochs: int = 5
    lr: float | None = None
    lr_decay: float = 0.3
    label_smoothing: float = 0.0
    dropout: float = 0.2
    early_stopping: int = 0
    small_threshold: float | None = None
    similarity_threshold: float | None = None
    # channels (RunConfig's) is not a setting here: the base decides (kept for the shared checks)

    KIND = "finetune"
    RESUMABLE = TrainConfig.RESUMABLE

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


@run_command  # releases the run folder's lock when it ends
def finetune(
    config: FinetuneConfig | None = None, *, progress: bool = False, overwrite: bool = False, **overrides
) -> FinetuneResult:
    """Runs transfer learning as ``config`` says; see the module docstring. Raises like ``train``."""
    from ktoolkit.train.engine import start_run

    start = start_run(config or FinetuneConfig(), overrides, overwrite=overwrite, progress=progress)
    job = _prepare(start, progress)
    history, resumed, linear = [], 0, None
    if job.strategy in ("linear", "linear-early"):
        model, plan, linear = _fit_linear(job)
    else:
        model, plan, history, resumed = _fit_trained(job, progress)
    metrics = _finish_finetune(job, model, plan, linear, history, progress) if job.chief else {}
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
        base = load_base(config.base, weights=config.weights, image_size=config.image_size)
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


def _probe_at(job: _Job, layer):
    """Logistic regression on the frozen base's (cached) features at ``layer``, fit on train, scored on val."""
    from ktoolkit.transfer.features import extract_features, fit_linear

    splits = job.splits
    feats = {
        s: extract_features(job.base.model, [layer], splits[s], **job.feature_kwargs)[layer]
        for s in ("train", "val")
        if s in splits
    }
    return fit_linear(
        feats["train"],
        splits["train"].labels,
        feats.get("val"),
        splits["val"].labels if "val" in splits else None,
        num_classes=len(job.class_names),
    )


def _fit_linear(job: _Job):
    """linear / linear-early: the probe folded into a Dense layer on the cut base, saved as best and last.
    Returns (model, plan, (probe, layer))."""
    from ktoolkit.transfer.features import linear_classifier_model

    base, strategy = job.base, job.strategy
    layer = base.top if strategy == "linear" else _check_cut(job.config.cut or job.advice.best_cut, base)
    probe = _probe_at(job, layer)
    model = linear_classifier_model(base.model, layer, probe, name=f"{_model_name(base)}_{strategy.replace('-', '_')}")
    if job.chief:
        save_model(model, job.run.best)
        copy_file(job.run.best, job.run.last)  # no epochs: the last model is the best one
    plan = {
        "strategy": strategy,
        "features": layer,
        "feature_dims": int(probe.kernel.shape[0]),
        "trained": "logistic regression on cached features (the base is frozen and cut at the features layer)",
        "C": probe.C,
        "train_accuracy": probe.train_accuracy,
        "val_accuracy": probe.val_accuracy,
        "classifier_seconds": round(probe.seconds, 2),
        "feature_cache": {"hits": job.cache.hits, "misses": job.cache.misses},
    }
    return model, plan, (probe, layer)


def _fit_trained(job: _Job, progress: bool):
    """finetune / full: the classifier trained with train's ``fit``. Returns (model, plan, history, resumed)."""
    import tf_keras

    from ktoolkit.data import AugmentConfig, split_dataset
    from ktoolkit.train.engine import fit, repeat_for_steps, save_final, steps_per_epoch

    config, base, distribution = job.config, job.base, job.distribution
    # finetune: the head starts as the linear classifier on the frozen features. Not for full: once batch
    # normalization trains, the features move away from the ones that classifier was fit on.
    probe = _probe_at(job, base.top) if job.strategy == "finetune" else None
    global_batch = config.batch_size * distribution.num_replicas_in_sync
    augment = None if config.augment in ("", "none", None) else AugmentConfig.parse(config.augment)
    shape = dict(
        num_classes=len(job.class_names), image_size=base.image_size, channels=base.channels, batch_size=global_batch
    )
    train_ds = split_dataset(job.splits.get("train"), config, training=True, augment=augment, **shape)
    val_ds = split_dataset(job.splits.get("val"), config, training=False, **shape)
    steps = steps_per_epoch(config, len(job.splits["train"]), global_batch)
    train_ds = repeat_for_steps(config, train_ds)
    with distribution.scope():
        model, plan = _trainable_model(base, job.strategy, config, len(job.class_names), probe, steps)
    inference = tf_keras.Model(model.inputs, model.outputs, name=model.name)
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
            chief=job.chief,
            progress=progress,
        )
    save_final(job.run, inference, best_model, job.chief)
    return model, plan, history, resumed


def _finish_finetune(job: _Job, model, plan, linear, history, progress: bool) -> dict:
    """On the chief: decision.json, probes.png, the evaluation on the held-out split and train's ``finish``."""
    from ktoolkit.data import make_dataset
    from ktoolkit.train.engine import finish

    base, splits = job.base, job.splits
    write_json(
        job.run.root / "decision.json",
        {"strategy": job.strategy, "why": job.why, "advice": job.advice.to_dict(), "plan": plan},
    )
    _plot_probes(
        job.advice.probes, job.run.root / "probes.png", title=f"linear probes: {base.name} on {job.config.data}"
    )
    eval_name = "test" if "test" in splits else "val"
    eval_ds, evaluation = None, None
    if eval_name in splits and linear is not None:
        probe, layer = linear
        evaluation = _evaluate_linear(model, probe, base, layer, splits[eval_name], job.class_names, job.feature_kwargs)
    elif eval_name in splits:
        eval_ds = make_dataset(
            splits[eval_name],
            num_classes=len(job.class_names),
            image_size=base.image_size,
            channels=base.channels,
            batch_size=64,
            training=False,
        )
    return finish(
        job.run,
        job.class_names,
        eval_name,
        eval_ds,
        history,
        title=f"{base.name} ({job.strategy}) on {job.config.data}",
        started=job.started,
        progress=progress,
        extra_sections=_report_sections(job.advice, job.strategy, job.why, plan),
        evaluation=evaluation,
    )


def _evaluate_linear(model, probe, base, layer, split, class_names, feature_kwargs):
    """Evaluates the linear classifier on the split's (cached) features, after checking on a batch of
    images that the saved Keras model computes the same probabilities."""
    import numpy as np

    from ktoolkit.evaluate import evaluate_predictions
    from ktoolkit.transfer.advise import load_images
    from ktoolkit.transfer.features import extract_features

    from_features = probe.predict_proba(extract_features(base.model, [layer], split, **feature_kwargs)[layer])
    check = split.subset(np.arange(min(32, len(split))))
    from_model = np.asarray(model.predict_on_batch(load_images(check, base.image_size, base.channels)))
    gap = float(np.abs(from_model - from_features[: len(check)]).max())
    if gap > 1e-3:
        raise RuntimeError(
            f"the saved linear classifier differs from the probe it was folded from by {gap:.2g} in "
            "probability on the first test images; this is a bug, please report it."
        )
    return evaluate_predictions(from_features, np.asarray(split.labels).astype(int), class_names)


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

    x = base.model.output
    if len(x.shape) == 4:
        x = tf_keras.layers.GlobalAveragePooling2D(name="avg_pool_features")(x)
    x = tf_keras.layers.Dropout(config.dropout, name="head_dropout")(x)
    dense = tf_keras.layers.Dense(num_classes, activation="softmax", name="predictions")
    outputs = dense(x)
    if probe is not None:
        dense.set_weights([probe.kernel, probe.bias])
    from ktoolkit.transfer.grouped import GroupedLearningRates

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
        is_bn = type(layer).__name__ == "BatchNormalization"
        layer.trainable = groups[layer.name] in rates and not (strategy == "finetune" and is_bn)
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
        "head_initialized_from": "linear classifier on the cached top features" if probe is not None else "random",
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


def _plot_probes(probes, path, title: str = ""):
    if not probes:
        return
    from ktoolkit.io import save_figure
    from ktoolkit.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(probes)), 3.6))
    xs = range(len(probes))
    ax.plot(xs, [p.val_accuracy for p in probes], "o-", label="held-out")
    ax.plot(xs, [p.train_accuracy for p in probes], "o--", alpha=0.6, label="training")
    ax.set_xticks(list(xs), [p.layer for p in probes], rotation=30, ha="right")
    ax.set_ylabel("linear probe accuracy")
    ax.set_xlabel("cut point (input → output)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _rate(value) -> str:
    return "" if value is None else f"{value:.2g}"


def _report_sections(advice, strategy, why, plan) -> list[tuple[str, str]]:
    decision = "\n".join(f"- {line}" for line in advice.lines()) + f"\n\n**Strategy: {strategy}** ({why})."
    probes = "| cut point | features | held-out accuracy | training accuracy |\n|---|---|---|---|\n" + "\n".join(
        f"| {p.layer} | {p.dims} | {p.val_accuracy:.1%} | {p.train_accuracy:.1%} |" for p in advice.probes
    )
    probes += "\n\n![probes by depth](probes.png)"
    if "groups" in plan:
        rows = "\n".join(
            f"| {g['group']} | {g['layers']} | {'yes' if g['trainable'] else 'frozen'} | {_rate(g['learning_rate'])} |"
            for g in plan["groups"]
        )
        bn = "; batch normalization stays in inference mode in every group" if plan["strategy"] == "finetune" else ""
        body = (
            f"{plan['trainable_parameters']:,} trainable and {plan['frozen_parameters']:,} frozen parameters; "
            f"head initialized from the {plan['head_initialized_from']}; {plan['optimizer']}, {plan['epochs']} epochs. "
            f"Frozen layers run in inference mode{bn}.\n\n"
            "| group (ends at) | layers | trains | learning rate |\n|---|---|---|---|\n" + rows
        )
    else:
        body = (
            f"Base frozen and cut at `{plan['features']}` ({plan['feature_dims']} features); {plan['trained']}: "
            f"C={plan['C']:g}, training accuracy {plan['train_accuracy']:.1%}"
            + (f", validation {plan['val_accuracy']:.1%}" if plan["val_accuracy"] is not None else "")
            + f", fit in {plan['classifier_seconds']:.1f} s; feature cache {plan['feature_cache']['hits']} hit(s), "
            f"{plan['feature_cache']['misses']} miss(es)."
        )
    return [("Transfer-learning decision", decision), ("Plan", body), ("Linear probes by depth", probes)]
