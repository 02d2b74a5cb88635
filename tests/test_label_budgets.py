"""Label budgets of `ktool linear-eval` (ktoolkit/pretrain/budgets.py): which images a budget trains on,
that nothing outside it is read, the readouts' counts and intervals, the learning curve."""

import numpy as np
import pytest
from PIL import Image

from ktoolkit.pretrain.budgets import (
    budget_subset,
    budget_table,
    effective_budgets,
    gains,
    label_budget_readouts,
    parse_budgets,
    plot_learning_curve,
)
from ktoolkit.stats import wilson


def test_parse_budgets_sorts_numbers_and_keeps_all_last():
    assert parse_budgets("10,100,all") == (10, 100, None)
    assert parse_budgets("all, 100,10,10") == (10, 100, None)
    assert parse_budgets([25, None]) == (25, None)
    for bad in ("10,ten", "1", "0", "", "-5"):
        with pytest.raises(ValueError, match="--labels-per-class"):
            parse_budgets(bad)


def test_budget_subsets_are_per_class_nested_and_seeded():
    labels = np.repeat([0, 1, 2], [50, 8, 30])
    ten = budget_subset(labels, 10, seed=3)
    assert np.bincount(labels[ten]).tolist() == [10, 8, 10]  # a class with fewer keeps all of its images
    assert set(budget_subset(labels, 5, seed=3)) <= set(ten) <= set(budget_subset(labels, 20, seed=3))
    assert np.array_equal(ten, budget_subset(labels, 10, seed=3)) and not np.array_equal(ten, budget_subset(labels, 10))
    assert np.array_equal(budget_subset(labels, None), np.arange(len(labels)))
    # a budget at or above the largest class is every image: measured once, as "all"
    assert effective_budgets(labels, (10, 50, 100, None)) == [10, None]


def _blobs(rng, n_per_class, classes=4, dims=8, spread=0.6):
    centres = rng.normal(size=(classes, dims)) * 3
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + rng.normal(size=(len(labels), dims)) * spread, labels


def test_readouts_train_only_on_the_budget_and_test_on_every_test_image():
    rng = np.random.default_rng(0)
    x_train, y_train = _blobs(rng, 60)
    x_test, y_test = _blobs(np.random.default_rng(0), 40)  # same centres (same first draw), new points
    x_test = x_test + np.random.default_rng(1).normal(size=x_test.shape) * 0.6
    random = {"train": rng.normal(size=x_train.shape), "test": rng.normal(size=x_test.shape)}
    features = {"pretrained": {"train": x_train, "test": x_test}, "random": random}
    labels = {"train": y_train, "test": y_test}
    readouts = label_budget_readouts(features, labels, "test", (10, None), num_classes=4, seed=0)
    assert len(readouts) == 2 * 2 * 2  # budgets x encoders x classifiers
    for r in readouts:
        assert r.accuracy.images == 160 and r.train_images == (40 if r.labels_per_class == 10 else 240)
        low, high = wilson(r.accuracy.correct, 160)
        assert r.accuracy.interval == pytest.approx((low, high))
        if r.encoder == "pretrained":
            assert r.accuracy.value > 0.9, r
        else:
            assert r.accuracy.value < 0.5, r  # noise features: near chance (25%)

    # Poison every training image outside the 10-per-class budget: the 10-label readouts must not change.
    outside = np.setdiff1d(np.arange(len(y_train)), budget_subset(y_train, 10, seed=0))
    poisoned = x_train.copy()
    poisoned[outside] = -poisoned[outside] * 50
    features["pretrained"] = {"train": poisoned, "test": x_test}
    again = label_budget_readouts(features, labels, "test", (10,), num_classes=4, seed=0)
    before = {(r.encoder, r.classifier): r.accuracy.correct for r in readouts if r.labels_per_class == 10}
    assert {(r.encoder, r.classifier): r.accuracy.correct for r in again} == before

    table = "\n".join(budget_table(readouts))
    assert "| 10 | 40 |" in table and "| all | 240 |" in table and "95% CI" in table
    assert any(line.startswith("10 labels per class, linear: +") for line in gains(readouts))


def test_learning_curve_is_a_real_picture(tmp_path):
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 30)
    features = {"pretrained": {"train": x, "test": x}, "random": {"train": rng.normal(size=x.shape), "test": x}}
    readouts = label_budget_readouts(features, {"train": y, "test": y}, "test", (5, None), num_classes=4)
    plot_learning_curve(readouts, tmp_path / "curve.png")
    with Image.open(tmp_path / "curve.png") as image:
        pixels = np.asarray(image.convert("L"), float)
    assert image.size[0] > 400 and pixels.std() > 10
