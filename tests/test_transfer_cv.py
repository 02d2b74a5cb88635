"""Cross-validated classifiers on cached features: the linear probe with C by stratified k-fold CV over
every labelled image, and the k-nearest-neighbour classifier (checked against scikit-learn), as functions,
as saved Keras models and as `ktool finetune` strategies.

Features are scikit-learn's real digits (8x8 pixels, through a fixed random projection where a test
needs continuous values) or a tiny convolutional network's pooled features of them.
"""

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype("float32"), data.target.astype("int64")


@pytest.fixture(scope="module")
def projected(digits):
    """Digits as 24 continuous non-negative features (a fixed random ReLU projection): no exact distance ties."""
    images, labels = digits
    rng = np.random.default_rng(0)
    features = np.maximum(images.reshape(len(images), -1) @ rng.normal(size=(64, 24)), 0) + rng.uniform(
        0, 0.01, (len(images), 24)
    )
    return features, labels


# ----------------------------------------------------------------------------------- linear, CV
def test_cv_probe_is_refit_on_every_image_with_the_C_of_the_best_out_of_fold_accuracy(projected):
    from ktoolkit.transfer.features import _probe_path, fit_linear_cv

    x, y = projected[0][:300], projected[1][:300]
    Cs = (0.01, 0.1, 1.0)
    probe = fit_linear_cv(x, y, num_classes=10, Cs=Cs, folds=5, seed=0)
    assert probe.images == 300 and probe.folds == 5 and probe.val_accuracy is None
    assert probe.cv.images == 300 and probe.cv.how == "5-fold cross-validated" and len(probe.cv.folds) == 5
    assert probe.cv.correct == int((probe.cv_predictions == y).sum())
    assert probe.cv.value == pytest.approx(max(probe.cv_scores.values()))
    assert probe.C == min(C for C, score in probe.cv_scores.items() if score == max(probe.cv_scores.values()))
    # the final classifier is the warm-started path on all 300 images (standardized with all of them)
    *_, refit = _probe_path(x.astype(np.float64), y, [C for C in Cs if C <= probe.C], 10, 300)
    np.testing.assert_array_equal(probe.kernel, refit.kernel)
    np.testing.assert_allclose(probe.mean, x.mean(axis=0), rtol=1e-5)
    # a class of 3 images: 3 folds, every image still predicted once
    few = np.concatenate([np.flatnonzero(y != 0), np.flatnonzero(y == 0)[:3]])
    small = fit_linear_cv(x[few], y[few], num_classes=10, Cs=(1.0,))
    assert small.folds == 3 and small.cv.images == len(few) == small.images


def test_the_C_walk_stops_after_patience_cs_without_a_new_best_and_scores_every_c_it_tried(projected):
    """The folds walk the grid from the strongest regularization up; past the best C only C_PATIENCE more are
    fit. The walk's scores equal each C fit on its own (warm starts change where the solver starts, not
    what it converges to, within its tolerance)."""
    from ktoolkit.transfer.features import C_PATIENCE, fit_linear_cv

    x, y = projected[0][:400], projected[1][:400]
    grid = tuple(np.logspace(-4, 3, 15))
    probe = fit_linear_cv(x, y, num_classes=10, Cs=grid, seed=0)
    tried = sorted(probe.cv_scores)
    assert tried == sorted(grid)[: len(tried)]
    best_at = tried.index(probe.C)
    assert len(tried) < len(grid), "the walk went to the end of a 15-value grid"
    assert len(tried) - 1 - best_at == C_PATIENCE
    assert all(probe.cv_scores[C] <= probe.cv_scores[probe.C] for C in tried)
    alone = fit_linear_cv(x, y, num_classes=10, Cs=(probe.C,), seed=0)
    assert abs(alone.cv.value - probe.cv.value) <= 2 / len(y)  # the same C, fit cold: at most 2 images apart


def test_classifiers_fit_with_one_blas_thread():
    """The CV fits run with BLAS limited to one thread (OpenBLAS threads spinning on a loaded machine made
    them 8-18x slower); the caller's limit is back afterwards."""
    from threadpoolctl import threadpool_info

    from ktoolkit.transfer.features import one_blas_thread

    def blas_threads():
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    before = blas_threads()
    assert one_blas_thread(blas_threads)() == {1}
    assert blas_threads() == before


def test_out_of_fold_predictions_come_from_models_that_never_saw_the_image(projected):
    """Exactly: each fold's predictions are those of the path fit (and standardized) on the other folds only.
    And in effect: on random labels a model memorizes what it saw (training accuracy 100%), while the
    out-of-fold accuracy stays near chance."""
    from ktoolkit.stats import stratified_folds
    from ktoolkit.transfer.features import _probe_path, fit_linear_cv

    x, y = projected[0][:200].astype(np.float64), projected[1][:200]
    probe = fit_linear_cv(x, y, num_classes=10, Cs=(0.1, 1.0), seed=3)
    for fit, held in stratified_folds(y, 5, 3):
        *_, fold_model = _probe_path(x[fit], y[fit], [C for C in (0.1, 1.0) if C <= probe.C], 10, 300)
        np.testing.assert_array_equal(probe.cv_predictions[held], fold_model.predict_proba(x[held]).argmax(1))

    rng = np.random.default_rng(1)
    noise, random_labels = rng.normal(size=(120, 400)), rng.integers(0, 4, 120)
    memorizer = fit_linear_cv(noise, random_labels, num_classes=4, Cs=(10.0,))
    assert memorizer.train_accuracy == 1.0
    assert memorizer.cv.value < 0.45, memorizer.cv.text()  # chance is 0.25


def test_fit_linear_keeps_its_train_and_validation_behaviour(projected):
    from ktoolkit.transfer.features import fit_linear

    x, y = projected
    probe = fit_linear(x[:300], y[:300], x[300:400], y[300:400], num_classes=10)
    assert probe.val_accuracy == max(
        fit_linear(x[:300], y[:300], x[300:400], y[300:400], num_classes=10, Cs=(C,)).val_accuracy
        for C in (0.01, 0.1, 1.0)
    )
    assert probe.cv is None and probe.images == 300
    assert fit_linear(x[:300], y[:300], num_classes=10).C == 1.0  # no validation data: C=1


# --------------------------------------------------------------------------------------------- kNN
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_matches_scikit_learn_and_its_cv_predictions_are_out_of_fold(projected, metric):
    """Same predictions and class shares as KNeighborsClassifier (even k: tied votes go to the lowest class),
    and the out-of-fold predictions are those of sklearn fit on the other folds (l2: standardized with them)."""
    from sklearn.neighbors import KNeighborsClassifier

    from ktoolkit.stats import stratified_folds
    from ktoolkit.transfer.features import standardization
    from ktoolkit.transfer.knn import fit_knn

    x, y = projected
    train, test = np.arange(0, 600), np.arange(600, 900)

    def space(fit_x, query_x):
        if metric == "cosine":
            return fit_x, query_x
        mean, scale = standardization(fit_x)
        return (fit_x - mean) / scale, (query_x - mean) / scale

    for k in (1, 4, 7):
        knn = fit_knn(x[train], y[train], num_classes=10, ks=(k,), metrics=(metric,))
        sk = KNeighborsClassifier(n_neighbors=k, metric="cosine" if metric == "cosine" else "euclidean")
        fit_x, query_x = space(x[train], x[test])
        sk.fit(fit_x, y[train])
        np.testing.assert_array_equal(knn.predict_proba(x[test]).argmax(1), sk.predict(query_x))
        np.testing.assert_allclose(knn.predict_proba(x[test]), sk.predict_proba(query_x))
    for fit, held in stratified_folds(y[train], 5, 0):
        fit_x, query_x = space(x[train][fit], x[train][held])
        sk.fit(fit_x, y[train][fit])
        np.testing.assert_array_equal(knn.cv_predictions[held], sk.predict(query_x))


def test_knn_chooses_k_and_metric_by_cv_and_refuses_too_many_references(projected):
    from ktoolkit.transfer.knn import fit_knn, knn_probe

    x, y = projected[0][:400], projected[1][:400]
    knn = fit_knn(x, y, num_classes=10, seed=0)
    assert knn.cv.value == pytest.approx(max(knn.cv_scores.values()))
    assert knn.cv_scores[f"{knn.metric} k={knn.k}"] == pytest.approx(knn.cv.value)
    assert len(knn.cv_scores) == 14 and knn.images == 400 and knn.cv.how == "5-fold cross-validated"
    assert knn_probe(x, y, num_classes=10, seed=0) == knn.cv
    with pytest.raises(ValueError, match="strategy=knn: 400 labelled images is more than the 100 references"):
        fit_knn(x, y, max_references=100)
    with pytest.raises(ValueError, match="metric='manhattan'"):
        fit_knn(x, y, metrics=("manhattan",))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_saved_keras_knn_model_loads_safely_and_predicts_as_fit_knn(digits, metric, tmp_path):
    import tf_keras

    import recipes
    from ktoolkit.transfer.features import feature_model
    from ktoolkit.transfer.knn import fit_knn, knn_classifier_model

    images, labels = digits[0][..., None][:700], digits[1][:700]
    inputs = tf_keras.Input((8, 8, 1))
    hidden = tf_keras.layers.Conv2D(16, 3, activation="relu", name="c1")(inputs)
    base = tf_keras.Model(inputs, tf_keras.layers.Conv2D(32, 3, activation="relu", name="c2")(hidden))
    features = feature_model(base, ["c2"]).predict(images, verbose=0)
    knn = fit_knn(features[:500], labels[:500], num_classes=10, metrics=(metric,), ks=(1, 5))
    model = knn_classifier_model(base, "c2", knn)
    model.save(tmp_path / "knn.keras")
    loaded = recipes.load_model(tmp_path / "knn.keras")
    assert loaded.output_shape == (None, 10) and type(loaded.get_layer("predictions")).__name__ == "NeighbourVote"
    from_model = loaded.predict(images[500:], verbose=0)
    from_features = knn.predict_proba(features[500:])
    clear = ~knn.near_ties(features[500:])
    assert clear.mean() > 0.9
    np.testing.assert_allclose(from_model[clear], from_features[clear], atol=1e-6)
    np.testing.assert_array_equal(from_model.argmax(1)[clear], from_features.argmax(1)[clear])


# -------------------------------------------------------------------------------- finetune strategies
@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """400 digits (8x8, uint8) as an .npz: a train/val/test split of 320/40/40."""
    from sklearn.datasets import load_digits

    data = load_digits()
    path = tmp_path_factory.mktemp("digits") / "digits400.npz"
    pixels = (data.images[:400] * (255.0 / 16.0)).round().astype("uint8")[..., None]
    np.savez(path, x=pixels, y=data.target[:400], class_names=np.array([str(i) for i in range(10)]))
    return path


def _finetune(data, out, monkeypatch, **options):
    from ktoolkit.transfer.finetune import FinetuneConfig, finetune

    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(out.parent / "cache"))
    config = FinetuneConfig(base="lenet5", weights="none", data=str(data), out=str(out), cache="none", **options)
    return finetune(config)


def test_linear_strategy_fits_on_all_of_train_and_val_and_never_the_test_split(small_digits, tmp_path, monkeypatch):
    import recipes
    from ktoolkit.data import load_data
    from ktoolkit.transfer.features import extract_features, fit_linear_cv

    result = _finetune(small_digits, tmp_path / "linear", monkeypatch, strategy="linear")
    splits = load_data(str(small_digits)).splits
    used = len(splits["train"]) + len(splits["val"])
    assert result.plan["images"] == used == result.metrics["cv"]["images"] == 360
    assert result.metrics["images"] == len(splits["test"]) == 40  # evaluated on the test split only
    decision = json.loads((result.run.root / "decision.json").read_text())
    assert decision["plan"]["cv"]["ci95"] and decision["plan"]["folds"] == 5
    assert json.loads(result.run.metrics.read_text())["cv"] == result.metrics["cv"]
    assert "5-fold stratified cross-validation" in result.run.report_md.read_text()
    # the saved classifier is the CV probe of the train+val features (in that order), and of nothing else
    saved, top = recipes.load_model(result.run.best), result.plan["features"]
    kwargs = dict(image_size=saved.input_shape[1:3], channels=saved.input_shape[3])
    feats = [extract_features(saved, [top], splits[s], **kwargs)[top] for s in ("train", "val")]
    labels = np.concatenate([splits["train"].labels, splits["val"].labels])
    probe = fit_linear_cv(np.concatenate(feats), labels, num_classes=10, seed=0)
    dense = saved.get_layer("predictions").get_weights()[0]
    assert saved.get_layer("feature_standardization")  # c5 is image-shaped (1x1): pooled, then standardized
    np.testing.assert_allclose(dense, probe.kernel * probe.scale[:, None], rtol=1e-4, atol=1e-6)

    no_test = _finetune(small_digits, tmp_path / "no_test", monkeypatch, strategy="linear", test_fraction=0.0)
    assert "images" not in no_test.metrics and no_test.metrics["cv"]["images"] == 400
    assert any(line.startswith("cross-validated accuracy") for line in no_test.lines())


def test_cli_finetune_knn_writes_a_model_that_loads_and_evaluates(small_digits, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import recipes
    from ktoolkit.cli import main

    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "knn"
    args = ["finetune", "--base", "lenet5", "--weights", "none", "--data", str(small_digits), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--strategy", "knn", "--cache", "none"])
    assert result.exit_code == 0, result.output
    assert "strategy: knn" in result.output and "cross-validated accuracy" in result.output
    plan = json.loads((out / "decision.json").read_text())["plan"]
    assert plan["strategy"] == "knn" and plan["references"] == 360 and plan["metric"] in ("cosine", "l2")
    model = recipes.load_model(out / "best.keras")
    assert model.output_shape == (None, 10) and model.get_layer("predictions").k == plan["k"]
    assert json.loads((out / "metrics.json").read_text())["accuracy"] > 0.5  # 10 classes: chance is 0.1
    evaluated = CliRunner().invoke(main, ["evaluate", "--model", str(out)])
    assert evaluated.exit_code == 0 and "accuracy" in evaluated.output, evaluated.output
