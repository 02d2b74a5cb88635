"""Accuracies with their uncertainty (ktoolkit/stats.py): known counts, coverage, paired comparisons."""

import numpy as np
import pytest

from ktoolkit.stats import Accuracy, mcnemar_exact, paired_difference, stratified_folds, wilson


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson).
@pytest.mark.parametrize(
    "correct, n, low, high",
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_published_values(correct, n, low, high):
    got = wilson(correct, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_edges():
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 10)[0] == 0.0
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_wilson_covers_95_percent_on_small_splits():
    """On 30 images at 90% accuracy (a typical validation split) the interval holds the truth ~95% of the time;
    the normal approximation's would not (it is ~88% there)."""
    rng = np.random.default_rng(0)
    hits = [lo <= 0.9 <= hi for lo, hi in (wilson(int(k), 30) for k in rng.binomial(30, 0.9, 4000))]
    assert 0.93 <= np.mean(hits) <= 0.99


def test_accuracy_text_and_dict():
    acc = Accuracy.of(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    assert (acc.correct, acc.images, acc.value) == (3, 4, 0.75)
    assert acc.text().startswith("75.0% (95% CI ") and "4 images" in acc.text()
    d = acc.to_dict()
    assert d["ci95"][0] < 0.75 < d["ci95"][1] and d["images"] == 4 and d["interval"] == "wilson"
    probs = np.eye(3)[[0, 1, 1, 2]]
    assert Accuracy.of(probs, np.array([0, 1, 2, 2])).correct == 3
    assert Accuracy.from_metrics({"accuracy": 0.5, "images": 8, "split": "test"}).correct == 4


def test_mcnemar_exact_is_the_binomial_test():
    from scipy.stats import binomtest

    for a, b in [(3, 12), (0, 5), (7, 7), (20, 9)]:
        assert mcnemar_exact(a, b) == pytest.approx(binomtest(min(a, b), a + b).pvalue)


def test_mcnemar_exact_holds_past_a_thousand_discordant_images():
    """2.0**1024 overflows a float: an export gate or a benchmark on thousands of images must still get its p."""
    from scipy.stats import binomtest

    for a, b in [(520, 504), (1500, 1600), (5000, 5000), (100, 2000)]:
        assert mcnemar_exact(a, b) == pytest.approx(binomtest(min(a, b), a + b).pvalue, rel=1e-6, abs=1e-300)
    assert mcnemar_exact(5000, 5000) == 1.0


def test_paired_difference_on_the_same_images():
    rng = np.random.default_rng(1)
    truth = rng.random(400)
    a, b = truth < 0.85, truth < 0.70  # A right wherever B is, and on 15% more
    d = paired_difference(a, b)
    assert d.difference == pytest.approx(a.mean() - b.mean())
    assert d.low <= d.difference <= d.high and d.significant and d.only_b == 0
    swapped = paired_difference(b, a)
    assert swapped.difference == pytest.approx(-d.difference) and swapped.high == pytest.approx(-d.low)
    same = paired_difference(a, a)
    assert same.difference == 0 and not same.significant and same.p_value == 1.0
    with pytest.raises(ValueError):
        paired_difference(a, b[:10])


def test_paired_interval_covers_the_true_difference():
    rng = np.random.default_rng(2)
    inside = 0
    for _ in range(600):
        u = rng.random(60)
        a, b = u < 0.8, (u < 0.7) ^ (rng.random(60) < 0.1)  # correlated classifiers, true difference known
        true = 0.8 - (0.7 * 0.9 + 0.3 * 0.1)
        d = paired_difference(a, b)
        inside += d.low <= true <= d.high
    assert 0.92 <= inside / 600 <= 0.995


def test_stratified_folds_hold_every_image_out_once():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 12)
    folds = stratified_folds(labels, max_folds=5, seed=0)
    assert len(folds) == 3  # the smallest class has 3 images
    held = np.concatenate([h for _, h in folds])
    assert sorted(held) == list(range(len(labels)))
    for fit, held_out in folds:
        assert not set(fit) & set(held_out)
        assert set(labels[held_out]) == {0, 1, 2}
    with pytest.raises(ValueError, match="at least 2 images"):
        stratified_folds(np.array([0, 0, 1]))


def test_every_evaluation_line_carries_its_interval_and_count(tmp_path):
    """What `ktool evaluate` and `ktool train` print: the accuracy with its image count and 95% interval, each
    class's recall with its interval; metrics.json and the report carry the same numbers."""
    from ktoolkit.evaluate import EvaluationRun, evaluate_predictions, save_evaluation
    from ktoolkit.report import _results_section
    from ktoolkit.runs import Run

    labels = np.array([0] * 20 + [1] * 10)
    predicted = labels.copy()
    predicted[:3] = 1
    evaluation = evaluate_predictions(np.eye(2)[predicted], labels, ["cat", "dog"])
    metrics = save_evaluation(evaluation, Run(tmp_path), split="test")
    assert metrics["correct"] == 27 and metrics["accuracy_ci95"] == pytest.approx(list(wilson(27, 30)))
    assert metrics["per_class"][0]["recall_ci95"] == pytest.approx(list(wilson(17, 20)))
    lines = EvaluationRun(metrics, tmp_path).lines()
    assert lines[0].startswith("test: accuracy 90.0% (95% CI 74.4-96.5%, 30 images)")
    assert "[0.64, 0.95]" in lines[1] and "(20 images)" in lines[1]
    assert "| accuracy | 90.00% (95% CI 74.4-96.5%) |" in _results_section(metrics)
    metrics, folder = EvaluationRun(metrics, tmp_path)  # unpacks as before
