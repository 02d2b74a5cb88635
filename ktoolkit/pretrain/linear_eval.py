"""`ktool linear-eval`: how good is a representation? The linear-evaluation protocol.

The encoder is frozen; a linear classifier (multinomial logistic regression,
:func:`ktoolkit.transfer.features.fit_linear`) is trained on its features of the labelled training
split, its regularization chosen on the validation split, and its accuracy measured on the test
split. The same architecture at random initialization goes through the same protocol: the difference
is what pretraining learned (random convolutional features are far from useless).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ktoolkit.io import save_model, write_json, write_text
from ktoolkit.pretrain.budgets import BUDGETS, LEARNING_CURVE, label_budget_readouts, parse_budgets, plot_learning_curve
from ktoolkit.runs import resolve_encoder_path
from ktoolkit.stats import Accuracy

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    """A linear classifier on the frozen features of one model."""

    layer: str
    dimensions: int
    split: str  # where ``accuracy`` was measured: "test", else "val", else "train"
    images: int
    accuracy: float
    val_accuracy: float | None
    train_accuracy: float
    C: float
    probe: object  # ktoolkit.transfer.features.LinearProbe
    features: dict | None = field(default=None, repr=False)  # {split: (N, D) features}, for the label budgets

    @property
    def measured(self) -> Accuracy:
        """``accuracy`` as correct of ``images`` with its 95% interval."""
        return Accuracy(round(self.accuracy * self.images), self.images, how=self.split)


@dataclass
class LinearEvalResult:
    """The linear evaluation of an encoder, and of its architecture at random initialization."""

    encoder: str
    data: str
    classes: list
    pretrained: ProbeResult
    random: ProbeResult | None
    folder: Path
    seconds: float = 0.0
    readouts: list = field(default_factory=list)  # ktoolkit.pretrain.budgets.Readout, per budget

    @property
    def accuracy(self) -> float:
        return self.pretrained.accuracy

    @property
    def random_accuracy(self) -> float | None:
        return self.random.accuracy if self.random else None

    @property
    def difference(self) -> float | None:
        """Accuracy of the pretrained encoder minus that at random initialization."""
        return None if self.random is None else self.pretrained.accuracy - self.random.accuracy

    def to_dict(self) -> dict:
        def probe(p):
            if p is None:
                return None
            kept = {k: getattr(p, k) for k in p.__dataclass_fields__ if k not in ("probe", "features")}
            return {**kept, "ci95": list(p.measured.interval)}

        return {
            "encoder": self.encoder,
            "data": self.data,
            "classes": list(self.classes),
            "accuracy": self.accuracy,
            "random_accuracy": self.random_accuracy,
            "difference": self.difference,
            "pretrained": probe(self.pretrained),
            "random": probe(self.random),
            "label_budgets": [r.to_dict() for r in self.readouts],
            "seconds": round(self.seconds, 1),
        }

    def lines(self) -> list[str]:
        """What `ktool linear-eval` prints."""
        p = self.pretrained
        out = [f"linear evaluation, {p.split} split: pretrained encoder {p.measured.text()}"]
        if self.random is not None:
            out.append(
                f"  same architecture at random initialization {self.random.measured.text()}, difference "
                f"{100 * self.difference:+.1f} points"
            )
        if self.readouts:
            from ktoolkit.pretrain.budgets import gains

            out.append(f"label budgets ({self.readouts[0].accuracy.images:,} test images; pretrained minus random):")
            out += [f"  {line}" for line in gains(self.readouts)]
        return [*out, f"written to {self.folder}"]

    def markdown(self) -> str:
        p = self.pretrained
        lines = [
            f"Linear evaluation on `{self.data}`: the encoder frozen, a logistic-regression classifier on its "
            f"{p.dimensions}-d features (layer `{p.layer}`) of the training split, C = {p.C:g} chosen on the "
            f"validation split; accuracy on the **{p.split}** split ({p.images:,} images, {len(self.classes)} "
            "classes).",
            "",
            f"| encoder | {p.split} accuracy (95% CI, images) | validation accuracy |",
            "|---|---|---|",
            f"| pretrained (`{self.encoder}`) | {p.measured.text()} | {_percent(p.val_accuracy)} |",
        ]
        if self.random is not None:
            lines += [
                f"| same architecture, random initialization | {self.random.measured.text()} | "
                f"{_percent(self.random.val_accuracy)} |",
                f"| difference | {100 * self.difference:+.1f} points | |",
            ]
        lines += self._budget_section()
        lines += [
            "",
            f"The encoder with this classifier on top (0..255 pixels in, class probabilities out): "
            f"`{self.folder / 'classifier.keras'}`.",
        ]
        return "\n".join(lines) + "\n"

    def _budget_section(self) -> list[str]:
        """The label-budget table and the learning curve, when measured."""
        if not self.readouts:
            return []
        from ktoolkit.pretrain.budgets import LEARNING_CURVE, budget_table

        return [
            "",
            "Label budgets: a linear classifier (C by 5-fold cross-validation inside the budget) and k-nearest "
            "neighbours (k and cosine/L2 by the same cross-validation) on n labelled training images per class, "
            f"tested on the same {self.readouts[0].accuracy.images:,} {self.pretrained.split} images:",
            "",
            *budget_table(self.readouts),
            "",
            f"![learning curve]({LEARNING_CURVE})",
        ]


def _encoder_name(path) -> str:
    """A run folder's name for its encoder.keras, else the file's name."""
    path = Path(path)
    return path.parent.name if path.name == "encoder.keras" else path.name


def _percent(value) -> str:
    return "" if value is None else f"{value:.2%}"


def linear_probe(
    model,
    source,
    *,
    layer: str | None = None,
    image_size=None,
    channels=None,
    batch_size: int = 64,
    cache=None,
    progress: bool = False,
) -> ProbeResult:
    """Trains a linear classifier on ``model``'s frozen features at ``layer`` (default: its output,
    global-average-pooled when it is a map) of ``source``'s train split, C chosen on the val split,
    and measures it on the test split (else val, else train).

    Args:
        model: a Keras model taking 0..255 pixels.
        source: a labelled :class:`ktoolkit.data.DataSource`.
        image_size, channels: default: the model's input shape.
        cache: a :class:`ktoolkit.transfer.features.FeatureCache`, or None.
    """
    from ktoolkit.transfer.features import extract_features, fit_linear

    layer = layer or model.layers[-1].name
    shape = model.input_shape[1:]
    image_size = tuple(image_size or shape[:2])
    channels = channels or shape[2]
    if None in image_size or channels is None:
        raise ValueError(f"model {model.name!r} takes inputs of any size {shape}; give image_size and channels.")
    features = {
        name: extract_features(
            model,
            [layer],
            split,
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            cache=cache,
            progress=progress,
        )[layer]
        for name, split in source.splits.items()
    }
    labels = {name: split.labels for name, split in source.splits.items()}
    val = "val" if "val" in features else None
    probe = fit_linear(
        features["train"], labels["train"], features.get(val), labels.get(val), num_classes=source.num_classes
    )
    split = next(name for name in ("test", "val", "train") if name in features)
    return ProbeResult(
        layer,
        int(features["train"].shape[1]),
        split,
        len(labels[split]),
        probe.accuracy(features[split], labels[split]),
        probe.val_accuracy,
        probe.train_accuracy,
        probe.C,
        probe,
        features,
    )


def linear_eval(
    encoder,
    data,
    *,
    out=None,
    baseline: bool = True,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    batch_size: int = 64,
    strict: bool = False,
    data_dir: str | None = None,
    cache: bool = True,
    progress: bool = False,
    labels_per_class=BUDGETS,
) -> LinearEvalResult:
    """Linear evaluation of ``encoder`` on the labelled ``data``, against its architecture at random init.

    Args:
        encoder: a `ktool pretrain` run folder (its encoder.keras) or an encoder .keras file (0..255
            pixels in).
        data: labelled images: a class-per-folder directory, a CSV, an .npz or ``tfds:NAME``.
        out: folder for linear_eval.json, linear_eval.md and classifier.keras (the encoder with the
            classifier on top); default RUN/linear_eval (or FILE_linear_eval beside a file). In the
            run folder, the run's report gets the section too.
        baseline: also evaluate the same architecture with freshly initialized weights.
        val_fraction, test_fraction, seed: the split; default that of the pretraining run (so the
            test images of the same data are ones pretraining did not see), else 0.1, 0.1, 0.
        batch_size: images per batch when computing features.
        strict, data_dir: as for :func:`ktoolkit.data.load_data`.
        cache: keep the features in the feature cache (KTOOLKIT_CACHE_DIR) for the next time.
        progress: progress bars on the terminal.
        labels_per_class: the label budgets (:mod:`ktoolkit.pretrain.budgets`): linear and kNN readouts of
            both encoders trained on this many labelled images per class (None or "all": every one), and
            the learning curve; e.g. "10,100,all" (the default), or () for none.

    Raises:
        FileNotFoundError: no such run folder (with an encoder) or file.
        ValueError: ``data`` has fewer than two classes.
    """
    import recipes

    started = time.time()
    budgets = parse_budgets(labels_per_class) if labels_per_class not in ((), None, "") else ()
    path, run = resolve_encoder_path(encoder)
    model = recipes.load_model(path)
    given = (val_fraction, test_fraction, seed)
    source, seed = _labelled_data(run, data, given, strict=strict, data_dir=data_dir, progress=progress)
    pretrained, random = _probes(
        model, source, baseline=baseline, seed=seed, batch_size=batch_size, cache=cache, progress=progress
    )
    from ktoolkit.pretrain.engine import LINEAR_EVAL

    folder = Path(out) if out else (run.root / LINEAR_EVAL if run else path.with_name(f"{path.stem}_{LINEAR_EVAL}"))
    readouts = _budget_readouts(pretrained, random, source, budgets, seed) if budgets else []
    result = LinearEvalResult(
        str(path), str(data), list(source.class_names), pretrained, random, folder, time.time() - started, readouts
    )
    _save(result, model, run)
    return result


def _budget_readouts(pretrained, random, source, budgets, seed: int) -> list:
    """The label-budget readouts (:func:`ktoolkit.pretrain.budgets.label_budget_readouts`) of both probes' features."""
    probes = {"pretrained": pretrained, "random": random}
    features = {name: probe.features for name, probe in probes.items() if probe is not None}
    labels = {name: split.labels for name, split in source.splits.items()}
    return label_budget_readouts(features, labels, pretrained.split, budgets, num_classes=source.num_classes, seed=seed)


def _labelled_data(run, data, given, *, strict: bool, data_dir, progress: bool):
    """(the labelled data split, its seed): the pretraining run's recorded split when ``data`` is its
    own and no split setting is ``given``, else ``data`` split with :func:`_split_settings`, without
    the pretraining run's training images in val and test. A ValueError for fewer than two classes."""
    from ktoolkit.data import load_data

    val_fraction, test_fraction, seed = _split_settings(run, given)
    source = _run_split(run, data, given, progress)
    if source is None:
        source = load_data(
            data,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            strict=strict,
            data_dir=data_dir,
            progress=progress,
        )
        source = _without_pretraining_images(run, source, data)
    if source.num_classes < 2:
        raise ValueError(
            f"data={data!r} has {source.num_classes} class; linear evaluation needs labels: a folder with "
            "one subfolder per class, a CSV of path,label, or an .npz with labels."
        )
    return source, seed


def _split_settings(run, given) -> tuple:
    """(val_fraction, test_fraction, seed): those ``given`` (None: not given), else the pretraining
    run's (its config.yaml), else 0.1, 0.1, 0."""
    settings = {}
    if run is not None and run.config.exists():
        import yaml

        settings = yaml.safe_load(run.config.read_text()) or {}
    defaults = {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
    return tuple(settings.get(k, d) if v is None else v for v, (k, d) in zip(given, defaults.items()))


def _probes(model, source, *, baseline: bool, seed: int, batch_size: int, cache: bool, progress: bool):
    """The linear probe of ``model``, and (``baseline``) of the same architecture freshly initialized."""
    import tf_keras

    from ktoolkit.transfer.features import FeatureCache

    feature_cache = FeatureCache() if cache else None
    pretrained = linear_probe(model, source, batch_size=batch_size, cache=feature_cache, progress=progress)
    log.info("pretrained encoder: %s accuracy %s (C=%g)", pretrained.split, pretrained.measured.text(), pretrained.C)
    random = None
    if baseline:
        tf_keras.utils.set_random_seed(seed)
        fresh = tf_keras.models.clone_model(model)  # the same layers, newly initialized weights
        random = linear_probe(fresh, source, batch_size=batch_size, cache=feature_cache, progress=progress)
        log.info("random initialization: %s accuracy %s", random.split, random.measured.text())
    return pretrained, random


def _save(result: LinearEvalResult, model, run) -> None:
    """classifier.keras, classes.json, labels.txt, linear_eval.json and .md in ``result.folder``; the
    run's report gets the section when the folder is the run's own."""
    from ktoolkit.pretrain.engine import LINEAR_EVAL, RESULT_FILE, report_sections
    from ktoolkit.report import write_report
    from ktoolkit.transfer.features import linear_classifier_model

    folder, pretrained = result.folder, result.pretrained
    save_model(linear_classifier_model(model, pretrained.layer, pretrained.probe), folder / "classifier.keras")
    write_json(folder / "classes.json", list(result.classes))
    write_text(folder / "labels.txt", "\n".join(result.classes) + "\n")
    if result.readouts:
        plot_learning_curve(
            result.readouts,
            folder / LEARNING_CURVE,
            title=f"{_encoder_name(result.encoder)} on {Path(result.data).name}: where pretraining pays",
        )
    write_json(folder / "linear_eval.json", result.to_dict())
    write_text(folder / "linear_eval.md", result.markdown())
    if run is not None and (run.root / RESULT_FILE).exists() and folder.resolve() == (run.root / LINEAR_EVAL).resolve():
        write_report(run, extra_sections=report_sections(run))


def _run_split(run, data, given, progress: bool):
    """The pretraining run's recorded split of ``data`` (its splits.json), when ``data`` is the run's
    own data and no split setting was given; else None. Unchanged files only, counted in a warning."""
    from ktoolkit.data import manifest

    if run is None or any(v is not None for v in given):
        return None
    doc = manifest.read(run)
    if doc is None or not manifest.same_source(doc, data) or len(doc["class_names"]) < 2:
        return None  # not recorded, other data, or pretrained without labels: load_data says what is wrong
    source, verification = manifest.load_recorded(run, progress=progress, doc=doc)
    verification.check([next((s for s in ("test", "val") if s in verification.counts), "train")], "measuring on")
    return source


def _without_pretraining_images(run, source, data):
    """``source`` without the pretraining run's training images in its val and test splits, so the
    accuracy is measured on images pretraining never saw."""
    from ktoolkit.data import manifest

    doc = manifest.read(run) if run is not None else None
    if doc is None:
        return source
    source, left_out = manifest.leave_out_training(source, doc, splits=("val", "test"))
    if left_out:
        log.warning(
            "%d held-out images of data=%s were training images of the pretraining run; left out", left_out, data
        )
    return source
