"""`ktool export`'s verdict and bookkeeping (issue 15): the gate's intervals and McNemar's p on known counts, an
honest "cannot decide" when the held-out images are too few, file names that keep exports with different I/O
apart, a report that lists every file in the folder, a re-export that replaces only its own file, and latency
measured on all files together, interleaved."""

import json
import logging
import math

import numpy as np
import pytest

from ktoolkit.export import export
from ktoolkit.export.report import OVER, UNDECIDED, WITHIN, judge
from ktoolkit.stats import paired_difference

BUDGET = 1.0


def per_image(n, both, only_keras, only_file):
    """Per-image correctness of the Keras model and a file with the given 2x2 counts (the rest: both wrong);
    agreement is taken as "both right or both wrong" (wrong answers agree here: one wrong class)."""
    keras = np.zeros(n, bool)
    file = np.zeros(n, bool)
    keras[: both + only_keras] = True
    file[:both] = True
    file[both + only_keras : both + only_keras + only_file] = True
    return keras, file, keras == file


# ------------------------------------------------------------------------------------------ the gate
def test_gate_intervals_and_mcnemar_on_known_counts():
    keras, file, agree = per_image(400, both=354, only_keras=6, only_file=2)  # Keras 360/400, file 356/400
    gate = judge(keras, file, agree, BUDGET)
    assert (gate.keras.correct, gate.file.correct, gate.agreement.correct, gate.images) == (360, 356, 392, 400)
    # Wilson's interval, by its formula: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / ...
    z = 1.959963984540054
    for acc, correct in ((gate.keras, 360), (gate.file, 356)):
        p, n = correct / 400, 400
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert acc.interval == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert gate.drop_points == pytest.approx(1.0)  # (360 - 356) / 400
    # McNemar's exact p: 6 vs 2 discordant images, two-sided, 2 * P(Binomial(8, 1/2) <= 2) = 2 * 37 / 256
    assert gate.drop.p_value == pytest.approx(2 * 37 / 256) and (gate.drop.only_a, gate.drop.only_b) == (6, 2)
    expected = paired_difference(keras, file)  # Newcombe's paired interval, Keras minus file
    assert (gate.drop.low, gate.drop.high) == (expected.low, expected.high)
    assert gate.drop.low < 0.01 < gate.drop.high
    # the point estimate is on the budget (passed), but the interval spans it: the images cannot decide
    assert gate.passed and gate.verdict == UNDECIDED and not gate.supported
    assert gate.one_image == pytest.approx(0.25)
    assert gate.text().startswith("cannot decide: 400 images, one image is 0.25 points; the budget is 1 point")
    assert "(+1.00: passed), a verdict the data does not support" in gate.text()
    assert judge(keras, file, agree, 5.0).verdict == WITHIN  # the whole interval is under 5 points
    data = gate.to_dict()
    assert data["keras"]["correct"] == 360 and data["keras"]["ci95"] == [round(v, 6) for v in gate.keras.interval]
    assert data["drop_ci95_points"] == [100 * gate.drop.low, 100 * gate.drop.high] and data["verdict"] == UNDECIDED


def test_gate_decides_within_and_over_budget_when_the_images_suffice():
    same = judge(*per_image(5000, both=4500, only_keras=0, only_file=0), BUDGET)  # an identical file, 5,000 images
    assert same.verdict == WITHIN and same.passed and 100 * same.drop.high < BUDGET
    assert same.text().startswith("within budget: the drop is +0.0 points")
    worse = judge(*per_image(400, both=300, only_keras=60, only_file=2), BUDGET)  # 14.5 points lost
    assert worse.verdict == OVER and not worse.passed and 100 * worse.drop.low > BUDGET
    assert worse.drop.p_value < 1e-12 and worse.text().startswith("over budget: the drop is +14.5 points")


def test_ten_images_cannot_decide_a_one_point_budget():
    """On 10 images one image is 10 points: neither an identical file nor one that loses an image is decided."""
    same = judge(*per_image(10, both=9, only_keras=0, only_file=0), BUDGET)
    assert same.passed and same.verdict == UNDECIDED
    assert same.text().startswith(
        "cannot decide: 10 images, one image is 10 points; the budget is 1 point and the drop's 95% interval"
    )
    assert "too few images to decide at all" in same.text() and "passed" in same.text()
    lost = judge(*per_image(10, both=8, only_keras=1, only_file=0), BUDGET)
    assert not lost.passed and lost.verdict == UNDECIDED and "(+10.00: FAILED)" in lost.text()


# --------------------------------------------------------------------------------- exports of a tiny model
def tiny_model(name="tiny"):
    import tf_keras

    inputs = tf_keras.Input((8, 8, 1), name="input")
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    outputs = tf_keras.layers.Dense(3, activation="softmax", name="predictions")(tf_keras.layers.Flatten()(x))
    return tf_keras.Model(inputs, outputs, name=name)


@pytest.fixture
def tiny(tmp_path):
    """A .keras file and 100 images of 3 classes (other data: split 80/10/10, so 10 test and 10 val images)."""
    from ktoolkit.io import save_model

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x=rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8),
        y=np.arange(100) % 3,
        class_names=np.array(["0", "1", "2"]),  # a bare .keras file is taken to have classes 0, 1, 2
    )
    return save_model(tiny_model(), tmp_path / "model.keras"), str(tmp_path / "data.npz")


def quick(model, data, out, **settings):
    """A fast export: 4 timed runs per file, 8 calibration images when a mode calibrates."""
    calibrates = "int8" in settings.get("mode", "") + settings.get("compare", "")
    return export(model, data=data, out=out, latency_runs=4, **({"calib_samples": 8} if calibrates else {}), **settings)


def test_a_small_split_says_it_cannot_decide(tiny, tmp_path):
    model, data = tiny
    result = quick(model, data, tmp_path / "out")
    assert result.heldout == {"test": 10, "val": 10}  # the test split has fewer than 300 images: val joins it
    f = result.files[0]
    assert f.gate.images == 20 and f.verification.images == 10 and f.gate.verdict == UNDECIDED
    assert f.gate.drop_points == 0.0 and f.passed  # a float32 file: the point estimate passes
    lines = "\n".join(result.lines())
    assert "Verdicts on 20 held-out images (test 10 + val 10): one image is 5 points, the budget 1." in lines
    assert "float32: cannot decide: 20 images, one image is 5 points; the budget is 1 point" in lines
    md = result.report["md"].read_text()
    assert "**The images cannot decide for every file:**" in md and "the `val` split (10)" in md
    report = json.loads(result.report["json"].read_text())
    entry = report["files"][f.path.name]
    assert entry["gate"]["verdict"] == UNDECIDED and entry["gate"]["images"] == 20
    assert report["source"]["verdict_splits"] == {"test": 10, "val": 10} and report["source"]["images"] == 10


def test_exports_with_different_io_coexist_and_a_reexport_replaces_only_its_file(tiny, tmp_path, caplog):
    model, data = tiny
    out = tmp_path / "out"
    first = quick(model, data, out, mode="int8", int8_io=True)
    uint8 = first.files[0].path
    assert uint8.name == "tiny_8x8x1_uint8io_int8.tflite" and first.files[0].input["dtype"] == "uint8"
    kept = uint8.read_bytes(), uint8.stat().st_mtime_ns
    second = quick(model, data, out, mode="float32", compare="int8")
    names = [f.path.name for f in second.files]
    assert names == ["tiny_8x8x1_float32.tflite", "tiny_8x8x1_int8.tflite"]  # int8 with float I/O: its own name
    assert (uint8.read_bytes(), uint8.stat().st_mtime_ns) == kept and not any(f.replaced for f in second.files)
    report = json.loads(second.report["json"].read_text())
    assert list(report["files"]) == [*names, uint8.name]  # newest export first
    assert [e["mode"] for e in report["exports"]] == ["float32", "int8"]  # this export's files
    folder_table = second.report["md"].read_text().split("## Every file in this folder, newest export first")[1]
    assert all(f"`{name}`" in folder_table for name in [*names, uint8.name])

    earlier = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (uint8, second.files[1].path)}
    with caplog.at_level(logging.INFO, logger="ktoolkit"):
        third = quick(model, data, out)
    assert third.files[0].replaced == "tiny_8x8x1_float32.tflite"
    assert "replacing the previous export's tiny_8x8x1_float32.tflite" in caplog.text
    assert "float32: replaced the previous export's tiny_8x8x1_float32.tflite." in third.lines()
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (uint8, second.files[1].path)} == earlier
    files = json.loads(third.report["json"].read_text())["files"]
    assert list(files) == ["tiny_8x8x1_float32.tflite", "tiny_8x8x1_int8.tflite", uint8.name]
    assert files["tiny_8x8x1_float32.tflite"]["exported_at"] > files["tiny_8x8x1_int8.tflite"]["exported_at"]
    assert sorted(p.name for p in out.glob("*.tflite")) == sorted(files)


def test_every_step_logs_its_time_and_all_files_are_timed_together(tiny, tmp_path, caplog):
    model, data = tiny
    with caplog.at_level(logging.INFO, logger="ktoolkit"):
        result = quick(model, data, tmp_path / "out", mode="float32", compare="float16,int8")
    for what in (
        "int8: reading 8 calibration images (training split): done in",
        "int8: converting to tflite, calibrating on 8 training images: done in",
        "float16: running the file on 20 held-out images: done in",
        "timing 3 file(s) together: 4 interleaved round(s), 4 single-image runs each, 2 thread(s): done in",
    ):
        assert what in caplog.text, what
    float32 = result.files[0].latency
    assert float32["interleaved"] and float32["vs_float32"] == pytest.approx(1.0)
    for f in result.files:
        assert f.latency["runs"] == 4 and f.latency["rounds"] == 4 and f.latency_ms > 0
        assert f.latency["vs_float32"] == pytest.approx(f.latency_ms / float32["p50_ms"])
    assert "| x float32 |" in result.report["md"].read_text()


# ------------------------------------------------------------------------------------ interleaved timing
def test_interleaved_timing_gives_medians_for_every_file(tmp_path):
    import tf_keras

    from tflite_export.convert import to_tflite
    from tflite_export.runtime import interleaved_latency

    paths = []
    for i, filters in enumerate((4, 32)):
        tf_keras.utils.set_random_seed(i)
        inputs = tf_keras.Input((16, 16, 3))
        x = tf_keras.layers.Conv2D(filters, 3, activation="relu")(inputs)
        outputs = tf_keras.layers.Dense(2, activation="softmax")(tf_keras.layers.GlobalAveragePooling2D()(x))
        paths.append(tmp_path / f"m{i}.tflite")
        paths[-1].write_bytes(to_tflite(tf_keras.Model(inputs, outputs)))
    timed = interleaved_latency(paths, threads=1, runs=7, rounds=3, warmup=1)
    assert len(timed) == 2
    for t in timed:
        assert t["runs"] == 9 and t["rounds"] == 3 and t["threads"] == 1 and t["interleaved"]  # 3 rounds of 3
        assert 0 < t["min_ms"] <= t["p50_ms"] <= t["p90_ms"]
        assert t["round_p50_ms"][0] <= t["round_p50_ms"][1]
    assert interleaved_latency([]) == []
    with pytest.raises(ValueError, match="rounds=0"):
        interleaved_latency(paths, rounds=0)


def test_interleaved_timing_goes_round_robin_in_a_rotating_order(monkeypatch):
    """Every round times every file, each first in turn, so a burst of load is shared by all of them."""
    import tflite_export.runtime as runtime

    calls = []

    class Recorder:
        input_shape = (2, 2, 1)

        def __init__(self, name):
            self.name = name

        def predict_one(self, image):
            calls.append(self.name)

    monkeypatch.setattr(runtime, "open_model", lambda model, threads=None: Recorder(model))
    runtime.interleaved_latency(["a", "b", "c"], runs=2, rounds=2, warmup=1)
    # per round, per file: 1 warm-up and 1 timed run; round 2 starts with the second file
    assert "".join(calls) == "aabbcc" + "bbccaa"
