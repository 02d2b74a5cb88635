"""Fine-tuning the way the literature does (issue 14, item 3): LP-FT, frozen batch normalization, epochs from
the data size with early stopping on the validation accuracy, and class weights for imbalanced data.

The base is cifar_resnet20 at 16x16 with weights from a file (so it counts as pretrained: the finetune
strategy starts from a linear probe); the data are scikit-learn's real digits 0-2, imbalanced 2:1:1.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import recipes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An imbalanced 3-class digits .npz (60/30/30 images) and a weights file for a 16x16 cifar_resnet20 base."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("lpft")
    digits = load_digits()
    keep = np.concatenate([np.where(digits.target == c)[0][:n] for c, n in ((0, 60), (1, 30), (2, 30))])
    x = (digits.images[keep] * (255.0 / 16.0)).round().astype("uint8")[..., None]
    data = root / "digits012.npz"
    np.savez(data, x=x, y=digits.target[keep].astype("int64"), class_names=np.array(["zero", "one", "two"]))
    base = recipes.get("cifar_resnet20").build(input_shape=(16, 16, 3), include_top=False)
    weights = root / "base.weights.h5"
    base.save_weights(str(weights))
    return {"data": str(data), "weights": str(weights)}


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))


def _config(tiny, out, **options):
    from ktoolkit.transfer.finetune import FinetuneConfig

    settings = dict(base="cifar_resnet20", weights=tiny["weights"], image_size=(16, 16), data=tiny["data"])
    settings.update(out=str(out), cache="none", val_fraction=0.2, test_fraction=0.1, **options)
    return FinetuneConfig(**settings)


# ----------------------------------------------------------------------------------------------- LP-FT
def test_lpft_head_is_the_standardized_probe_and_predicts_what_it_does(tiny):
    """Before any step the model gives the probe's probabilities on the validation images (so the same
    predictions and accuracy), with the probe's standardized-space Dense after a frozen standardization:
    what dropout sees in training are standardized features (mean 0, at most unit spread on train)."""
    import tf_keras

    from ktoolkit.data import load_data
    from ktoolkit.stats import Accuracy
    from ktoolkit.transfer.advise import load_images
    from ktoolkit.transfer.bases import load_base
    from ktoolkit.transfer.features import extract_features, fit_linear
    from ktoolkit.transfer.finetune import FinetuneConfig, _trainable_model

    base = load_base("cifar_resnet20", weights=tiny["weights"], image_size=(16, 16))
    splits = load_data(tiny["data"], val_fraction=0.2, test_fraction=0.1, seed=0).splits
    kw = dict(image_size=base.image_size, channels=base.channels)
    feats = {s: extract_features(base.model, [base.top], splits[s], **kw)[base.top] for s in ("train", "val")}
    probe = fit_linear(feats["train"], splits["train"].labels, feats["val"], splits["val"].labels, num_classes=3)
    config = FinetuneConfig(data=tiny["data"], epochs=1, dropout=0.5)
    model, plan = _trainable_model(base, "finetune", config, 3, probe, 2)

    got = np.asarray(model.predict_on_batch(load_images(splits["val"], base.image_size, base.channels)))
    want = probe.predict_proba(feats["val"].astype(np.float64))
    np.testing.assert_allclose(got, want, atol=1e-4)
    val_labels = np.asarray(splits["val"].labels)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert Accuracy.of(got, val_labels).correct == round(probe.val_accuracy * len(val_labels))

    standardize = model.get_layer("feature_standardization")
    assert not standardize.trainable and model.get_layer("predictions").trainable
    # pooled first, then standardized (per element before the pooling, int8 requantized the whole map coarsely)
    assert base.model.get_layer(base.top).output.shape[1] > 1 and standardize.input_shape[1:3] == (1, 1)
    np.testing.assert_allclose(standardize.get_weights()[0].ravel(), 1.0 / probe.scale, rtol=1e-6)
    kernel = model.get_layer("predictions").get_weights()[0]
    np.testing.assert_allclose(kernel, probe.kernel * probe.scale[:, None], rtol=1e-5, atol=1e-6)
    into_dropout = tf_keras.Model(model.inputs, model.get_layer("head_dropout").input)
    z = np.asarray(into_dropout.predict_on_batch(load_images(splits["train"], base.image_size, base.channels)))
    assert np.abs(z.mean(axis=0)).max() < 1e-3
    assert z.std(axis=0).max() == pytest.approx(1.0, abs=1e-3)
    assert "standardized linear probe" in plan["head_initialized_from"]


def test_finetune_starts_at_the_probe_keeps_batch_norm_frozen_and_weights_the_classes(tiny, tmp_path):
    """One epoch of finetune: it starts at the probe's validation accuracy (same predictions on every
    validation image), epoch 1's validation accuracy is in history.csv, batch normalization's moving
    statistics are unchanged while the top group trains, and the 2:1:1 classes are weighted n / (3 count)."""
    from ktoolkit.train.callbacks import read_history
    from ktoolkit.transfer.bases import load_base
    from ktoolkit.transfer.finetune import finetune

    result = finetune(_config(tiny, tmp_path / "run", strategy="finetune", epochs=1, unfreeze=1, lr=1e-3))
    run, plan = result.run, result.plan
    start = plan["start"]
    val_images = json.loads(run.data.read_text())["splits"]["val"]["images"]
    assert start["images"] == start["same_predictions"] == val_images
    assert start["val_accuracy"]["correct"] == start["probe_val_accuracy"]["correct"]
    history = read_history(run.history)
    assert len(result.history) == len(history) == 1 and 0 <= history[0]["val_accuracy"] <= 1
    assert plan["epochs"] == 1 and plan["epochs_rule"] == "--epochs 1" and plan["best_epoch"] == 1
    report = run.report_md.read_text()
    assert "start (before any step): validation accuracy" in report and "LP-FT" in report

    base = load_base("cifar_resnet20", weights=tiny["weights"], image_size=(16, 16))
    last = recipes.load_model(run.last)
    bn = [layer for layer in base.model.layers if type(layer).__name__ == "BatchNormalization"]
    for layer in bn:
        np.testing.assert_array_equal(layer.moving_mean.numpy(), last.get_layer(layer.name).moving_mean.numpy())
        np.testing.assert_array_equal(layer.moving_variance.numpy(), last.get_layer(layer.name).moving_variance.numpy())
    top = [layer for layer in base.model.layers if type(layer).__name__ == "Conv2D"][-1]
    assert not np.array_equal(top.get_weights()[0], last.get_layer(top.name).get_weights()[0]), "top group trained"

    per_class = json.loads(run.data.read_text())["splits"]["train"]["per_class"]
    n = sum(per_class.values())
    expected = {name: n / (3 * count) for name, count in per_class.items()}
    assert plan["class_weight"]["weights"] == pytest.approx(expected, abs=1e-4)
    assert "balanced" in plan["class_weight"]["why"]


def test_linear_strategies_have_no_epochs(tiny, tmp_path):
    from ktoolkit.transfer.finetune import finetune

    result = finetune(_config(tiny, tmp_path / "run", strategy="linear"))
    decision = json.loads((result.run.root / "decision.json").read_text())
    assert "epochs" not in result.plan and "epochs" not in decision["plan"]
    assert "epochs: null" in result.run.config.read_text()
    assert "epochs: 5" not in result.run.report_md.read_text()


# ---------------------------------------------------------------------------- epochs and early stopping
@pytest.mark.parametrize("steps, epochs", [(1, 30), (7, 30), (100, 30), (101, 30), (150, 20), (313, 10), (1563, 3)])
def test_default_epochs_are_about_3000_steps_within_3_to_30(steps, epochs):
    from ktoolkit.transfer.finetune import default_epochs

    assert default_epochs(steps) == epochs


def test_schedule_resolves_epochs_and_turns_early_stopping_off_without_validation(tiny):
    from ktoolkit.transfer.finetune import _schedule

    config = _config(tiny, "runs/x").validate()
    assert config.epochs is None and config.early_stopping == 3 and config.schedule == "cosine"
    resolved, plan = _schedule(config, 150, has_val=True)
    assert resolved.epochs == plan["epochs"] == 20 and resolved.early_stopping == 3
    assert "ceil(3000 steps / 150 steps per epoch)" in plan["epochs_rule"]
    resolved, plan = _schedule(config, 150, has_val=False)
    assert resolved.early_stopping == 0 and "no validation split" in plan["early_stopping"]
    resolved, plan = _schedule(_config(tiny, "runs/x", epochs=4), 150, has_val=True)
    assert resolved.epochs == 4 and plan["epochs_rule"] == "--epochs 4"


def _tiny_classifier():
    import tf_keras

    inputs = tf_keras.Input((4,))
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2, activation="softmax", name="predictions")(inputs))
    model.compile(tf_keras.optimizers.SGD(0.0), "categorical_crossentropy", metrics=["accuracy"])
    return model


def test_early_stopping_watches_the_validation_accuracy_when_asked(tmp_path):
    from ktoolkit.runs import Run
    from ktoolkit.train.callbacks import RunLog
    from ktoolkit.train.engine import _fit_callbacks

    model, run = _tiny_classifier(), Run(tmp_path / "run")
    run.root.mkdir()
    for stop_on, monitor, mode in (("accuracy", "val_accuracy", "max"), ("loss", "val_loss", "min")):
        _, callbacks = _fit_callbacks(run, model, model, "val", RunLog(run, 2), [], (3, stop_on), False)
        stopping = [c for c in callbacks if type(c).__name__ == "EarlyStopping"]
        assert len(stopping) == 1 and stopping[0].monitor == monitor and stopping[0].patience == 3
        assert bool(stopping[0].monitor_op(1.0, 0.0)) == (mode == "max")  # a higher value is better
    _, callbacks = _fit_callbacks(run, model, model, "val", RunLog(run, 2), [], (0, "accuracy"), False)
    assert not [c for c in callbacks if type(c).__name__ == "EarlyStopping"]


# -------------------------------------------------------------------------------------- class weights
def test_class_weights_are_balanced_above_the_threshold_and_off_with_none():
    from ktoolkit.train.engine import class_weights

    labels = [0] * 30 + [1] * 10
    weights = class_weights(labels, 2)
    assert weights == pytest.approx({0: 40 / 60, 1: 40 / 20})
    assert np.mean([weights[y] for y in labels]) == pytest.approx(1.0)  # the loss keeps its scale
    assert class_weights(labels, 2, "none") is None
    assert class_weights([0] * 15 + [1] * 10, 2) is None  # exactly 1.5x: not "more than"
    assert class_weights([0] * 16 + [1] * 10, 2) is not None
    assert class_weights([0] * 20 + [2] * 5, 3) == pytest.approx({0: 25 / 40, 1: 0.0, 2: 25 / 10})


def test_class_weights_of_an_imbalanced_folder(tmp_path):
    from PIL import Image

    from ktoolkit.data import load_data
    from ktoolkit.train.engine import class_weights

    rng = np.random.default_rng(0)
    for name, count in (("cats", 24), ("dogs", 8)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    source = load_data(str(tmp_path), val_fraction=0.25, test_fraction=0.0, seed=0)
    labels = np.asarray(source.splits["train"].labels)
    counts = np.bincount(labels, minlength=2)
    assert counts[0] > 1.5 * counts[1]
    weights = class_weights(labels, 2)
    assert weights == pytest.approx({c: len(labels) / (2 * counts[c]) for c in range(2)})
    assert class_weights(labels, 2, "none") is None


def test_fit_weights_each_image_loss_by_its_class_for_hard_and_soft_labels(tmp_path):
    """engine.fit's loss is the class-weighted mean cross-entropy (learning rate 0: the loss of the
    weights as they are); soft (MixUp) labels weigh by their mix of classes."""
    import tensorflow as tf

    from ktoolkit.runs import Run
    from ktoolkit.train.engine import fit, weight_by_class

    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[[0, 0, 0, 0, 0, 0, 1, 1]]
    y[0] = [0.25, 0.75]  # a MixUp label
    weights = {0: 8 / 12, 1: 8 / 4}
    (_, _, w), *_ = weight_by_class(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), weights)
    assert w.numpy() == pytest.approx(y @ np.array([weights[0], weights[1]]))
    model = _tiny_classifier()
    p = model.predict_on_batch(x)
    expected = float(np.mean(w.numpy() * -(y * np.log(p)).sum(axis=1)))
    run = Run(tmp_path / "run")
    run.root.mkdir()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    rows, _, _ = fit(run, model, model, ds, ds, epochs=1, steps=1, class_weight=weights)
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert rows[0]["val_loss"] == pytest.approx(float(np.mean(-(y * np.log(p)).sum(axis=1))), rel=1e-4)


def test_class_weight_flag_and_bad_value():
    from ktoolkit.cli import main
    from ktoolkit.train.config import TrainConfig
    from ktoolkit.transfer.finetune import FinetuneConfig

    runner = CliRunner()
    for command in ("finetune", "train"):
        shown = runner.invoke(main, [command, "--help"], terminal_width=200)
        assert shown.exit_code == 0 and "--class-weight" in shown.output and "1.5x" in shown.output
        refused = runner.invoke(main, [command, "--data", "x", "--class-weight", "balanced"])
        assert refused.exit_code == 2 and "--class-weight" in refused.output
    for config in (FinetuneConfig(data="x", class_weight="balanced"), TrainConfig(data="x", class_weight="yes")):
        with pytest.raises(ValueError, match="class_weight=.*use one of auto, none"):
            config.validate()
