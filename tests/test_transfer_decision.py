"""The transfer decision from all the evidence: the combined similar/different rule, cross-validated probes
with intervals on train+val, the size rule on train+val, and the input size from the data's resolution."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from ktoolkit.data.sources import DataSource, Split
from recipes.transfer import decide

Z = 1.959963984540054


def _source(train_counts, val_counts, test_counts=(), shape=(8, 8, 1)):
    """A DataSource of random uint8 images with the given images per class in each split."""
    rng = np.random.default_rng(0)
    splits = {}
    for name, counts in (("train", train_counts), ("val", val_counts), ("test", test_counts)):
        labels = np.repeat(np.arange(len(counts)), counts)
        if len(labels):
            images = rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8)
            splits[name] = Split(name, labels, images=images)
    classes = max(len(train_counts), len(val_counts))
    return DataSource("toy.npz", [str(c) for c in range(classes)], splits, image_shape=shape)


def _noisy_features(flips_per_class=6, per_class=60, seed=0):
    """Two classes and a feature that shows an 'apparent' class: ``flips_per_class`` images of each class
    look like the other one. A linear probe learns the apparent class, so it gets exactly
    2 * (per_class - flips_per_class) images right whatever the folds."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], per_class)
    apparent = labels.copy()
    for c in (0, 1):
        apparent[rng.choice(np.flatnonzero(labels == c), flips_per_class, replace=False)] = 1 - c
    x = (2.0 * apparent - 1.0)[:, None] + 0.05 * rng.standard_normal((len(labels), 3))
    return x, labels, apparent


# ------------------------------------------------------------------------------- the decision (pure)
def test_decide_flips_to_different_when_the_probes_say_so_whatever_the_batchnorm_number():
    similar = decide(500, 0.95, similarity_source="batch-norm", earlier_cut_better=False, probe_evidence="e")
    assert similar.strategy == "linear" and similar.evidence == "batch-norm"
    flipped = decide(500, 0.95, similarity_source="batch-norm", earlier_cut_better=True, probe_evidence="b13 +7")
    assert flipped.strategy == "linear-early" and flipped.similarity_class == "different"
    assert flipped.evidence == "probes" and "decided by the linear probes" in flipped.reasons()[1]
    assert "b13 +7" in flipped.reasons()[1] and "alone would say similar" in flipped.reasons()[1]
    both = decide(5000, 0.5, similarity_source="batch-norm", earlier_cut_better=True)
    assert both.strategy == "full" and both.evidence == "both"
    assert decide(5000, 0.5, similarity_source="batch-norm", earlier_cut_better=False).evidence == "batch-norm"
    record = flipped.to_dict()
    assert record["evidence"] == "probes" and record["earlier_cut_better"] is True
    with pytest.raises(ValueError, match="earlier_cut_better"):
        decide(500, 0.9, earlier_cut_better="yes")


def test_advise_rule_overrules_a_similar_batchnorm_number_only_beyond_the_probes_uncertainty():
    """Real probes on features: an earlier layer that separates the classes and a top layer of noise flip the
    decision; an earlier layer a point or two better (within the paired interval) does not."""
    from ktoolkit.transfer.advise import _decide, best_probe
    from ktoolkit.transfer.similarity import BatchNormDistance, compare_to_top, probe_depths

    x, labels, _ = _noisy_features()
    noise = np.random.default_rng(1).standard_normal((len(labels), 3))
    bn = BatchNormDistance(similarity=0.95, first_kl=0.05, mean_kl=0.1, layers=[("bn_Conv1", 0.05)], images=64)
    probes = probe_depths({"early": x, "top": noise}, labels, 2)
    comparison = compare_to_top(probes)
    assert comparison.earlier_cut_better and comparison.difference.low > 0
    _, kind, decision = _decide(bn, probes, comparison, 100.0, None, None)
    assert kind == "batchnorm" and decision.strategy == "linear-early" and decision.evidence == "probes"
    assert best_probe(probes).layer == "early"

    close = probe_depths({"early": x, "top": x + 0.3 * noise}, labels, 2)  # nearly the same information
    comparison = compare_to_top(close)
    assert not comparison.earlier_cut_better
    _, _, decision = _decide(bn, close, comparison, 100.0, None, None)
    assert decision.strategy == "linear" and decision.evidence == "batch-norm"
    assert best_probe(close).layer == "top"  # within the best's uncertainty: the deepest


# -------------------------------------------------------------------------------------------- probes
def test_probe_scores_every_image_once_with_the_wilson_interval_of_its_count():
    from ktoolkit.transfer.similarity import probe_depths

    x, labels, apparent = _noisy_features(flips_per_class=6, per_class=60)
    (probe,) = probe_depths({"layer": x}, labels, 2, folds=5)
    assert probe.accuracy.images == 120 and probe.accuracy.correct == 108
    np.testing.assert_array_equal(probe.correct, apparent == labels)
    n, p = 120, 108 / 120
    centre, half = (p + Z * Z / (2 * n)) / (1 + Z * Z / n), Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    low, high = probe.accuracy.interval
    assert low == pytest.approx(centre - half / (1 + Z * Z / n), abs=1e-9)
    assert high == pytest.approx(centre + half / (1 + Z * Z / n), abs=1e-9)
    assert probe.val_accuracy == pytest.approx(0.9) and len(probe.accuracy.folds) == 5
    assert probe.to_dict()["accuracy"]["correct"] == 108 and "5-fold" in probe.accuracy.how


def test_probe_sample_and_size_rule_use_train_and_val_not_test():
    from ktoolkit.transfer.advise import labelled_per_class, probe_sample

    source = _source(train_counts=(8, 8, 3), val_counts=(2, 2, 1), test_counts=(50, 50, 50))
    assert labelled_per_class(source) == 10.0  # median of 10, 10, 4; the training split alone says 8
    picked = probe_sample(source, per_class=100)
    assert set(picked) == {"train", "val"}
    assert len(picked["train"]) == 19 and len(picked["val"]) == 5  # every train and val image, no test image
    few = probe_sample(source, per_class=4)
    labels = np.concatenate([source.splits[n].labels[i] for n, i in few.items()])
    np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])
    reasons = decide(
        labelled_per_class(source), 0.9, small_threshold=10, counted="labelled images per class (train+val, median)"
    ).reasons()
    assert reasons[0] == "10 labelled images per class (train+val, median) >= 10: large"


# ---------------------------------------------------------------------------------------- input size
@pytest.mark.parametrize(
    "data, minimum, default, expected",
    [
        ((32, 32), 32, 224, (32, 32)),  # CIFAR: no upsampling to 224
        ((8, 8), 32, 224, (32, 32)),  # digits: floored at the base's minimum
        ((375, 500), 32, 224, (224, 224)),  # photos: capped at the default
        ((96, 96), 32, 224, (96, 96)),
        ((100, 150), 32, 224, (96, 160)),  # each side to the nearest multiple of 32
        ((28, 28), 75, 299, (75, 75)),  # InceptionV3's minimum
    ],
)
def test_input_size_rule(data, minimum, default, expected):
    from ktoolkit.transfer.bases import input_size_rule

    assert input_size_rule(data, minimum, default) == expected


def test_input_size_comes_from_the_data_and_image_size_overrides(tmp_path):
    from PIL import Image

    from ktoolkit.data import load_data
    from ktoolkit.transfer.bases import choose_input_size, data_resolution

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i, (w, h) in enumerate([(40, 30)] * 3 + [(400, 300)] * 2):
            Image.new("RGB", (w, h), (40 * i, 100 * c, 0)).save(tmp_path / f"c{c}" / f"{i}.png")
    source = load_data(str(tmp_path), val_fraction=0.2, test_fraction=0.0)
    assert data_resolution(source) == (30, 40)  # (height, width): the median, not the largest or smallest
    size, why = choose_input_size("mobilenet_v2", source, weights="none")
    assert size == (32, 32) and "median resolution 30x40" in why
    assert choose_input_size("mobilenet_v2", source)[0] == (96, 96)  # ImageNet weights: PRETRAINED_MIN_SIZE
    assert choose_input_size("mobilenet_v2", _source((5, 5), (1, 1), shape=(375, 500, 3)))[0] == (224, 224)
    assert choose_input_size("mobilenet_v2", _source((5, 5), (1, 1), shape=(128, 128, 3)))[0] == (128, 128)
    assert choose_input_size("mobilenet_v2", source, (64, 48)) == ((64, 48), "--image-size 64,48 (given)")
    assert choose_input_size("cifar_resnet20", source)[0] is None  # a recipe keeps its own size


# --------------------------------------------------------------------------------------- end to end
@pytest.fixture
def digits5(digits_npz, tmp_path):
    """Digits 0-4 (8x8), 40 images of each."""
    data = np.load(digits_npz)
    keep = np.zeros(len(data["y"]), bool)
    for c in range(5):
        keep[np.flatnonzero(data["y"] == c)[:40]] = True
    path = tmp_path / "digits5.npz"
    np.savez(path, x=data["x"][keep], y=data["y"][keep], class_names=data["class_names"][:5])
    return path


def test_advise_end_to_end_on_a_tiny_base_prints_intervals_and_the_deciding_evidence(digits5, tmp_path, monkeypatch):
    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    from ktoolkit.data import load_data
    from ktoolkit.transfer.advise import advise
    from ktoolkit.transfer.bases import load_base

    source = load_data(str(digits5))
    base = load_base("mobilenet_v2", weights="none", data=source)
    assert base.image_size == (32, 32) and "8x8" in base.size_reason  # not upsampled to 224
    advice = advise(base, source, probe_images_per_class=20, similarity_images=40)
    labelled = len(source.splits["train"]) + len(source.splits["val"])
    assert advice.images_per_class == np.median(
        source.splits["train"].class_counts(5) + source.splits["val"].class_counts(5)
    )
    assert advice.probe_images == 100 and all(p.accuracy.images == 100 for p in advice.probes) and labelled > 100
    assert advice.comparison.top is advice.probes[-1]
    assert advice.decision.evidence in (("probes", "both") if advice.comparison.earlier_cut_better else ("batch-norm",))
    text = "\n".join(advice.lines())
    assert "95% CI" in text and "best earlier cut vs top" in text and "decided by" in text
    assert "input size 32x32" in text
    assert json.loads(json.dumps(advice.to_dict()))["probes"][0]["accuracy"]["images"] == 100


def test_cli_advise_json_picks_the_input_size_from_the_data_and_records_the_evidence(digits5, tmp_path, monkeypatch):
    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    from ktoolkit.cli import main

    result = CliRunner().invoke(
        main, ["advise", "--base", "mobilenet_v2", "--weights", "none", "--data", str(digits5), "--json"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output[result.output.index("{") :])
    assert record["image_size"] == [32, 32] and record["evidence"] == record["decision"]["evidence"]
    assert all(len(p["accuracy"]["ci95"]) == 2 for p in record["probes"])
    assert record["earlier_vs_top"]["top"] == "out_relu" and "train+val" in record["images_per_class_counted"]
    assert "median resolution 8x8" in record["image_size_reason"]
