"""Held out means held out: a run records its split by content (splits.json), evaluation and export
use exactly that split whatever happened to the folder since, duplicates never straddle splits, and
label and pixel values are checked before anything is allocated for them."""

import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from ktoolkit.data import load_data, manifest, scan_folder
from ktoolkit.runs import Run

CLASSES = ("ant", "bee", "cow")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))


def picture(seed: int, size: int = 8) -> Image.Image:
    """A small RGB image that differs from every other seed's (so no two files are duplicates)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_folder(root, per_class: int = 10, start: int = 0):
    """``per_class`` PNGs in each of three class folders; seeds from ``start``, so calls add new images."""
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(start, start + per_class):
            picture(1000 * c + i).save(os.path.join(root, name, f"{i:03d}.png"))
    return str(root)


def recorded_run(tmp_path, data, **split):
    """A run folder holding only the splits.json that training would write for ``data``."""
    source = load_data(data, **split)
    run = Run(tmp_path / "run")
    run.root.mkdir(exist_ok=True)
    manifest.write(run.splits, manifest.record(source))
    return run, source


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_splits_json_records_every_file_of_every_split_with_its_hash(tmp_path):
    data = make_folder(tmp_path / "data")
    run, source = recorded_run(tmp_path, data)
    doc = json.loads(run.splits.read_text())
    assert doc["kind"] == "paths" and doc["root"] == os.path.abspath(data) and doc["source"] == data
    assert doc["class_names"] == list(CLASSES) and doc["columns"] == ["path", "size", "sha256", "label"]
    assert set(doc["splits"]) == set(source.splits) == {"train", "val", "test"}
    for name, split in source.splits.items():
        rows = doc["splits"][name]
        assert len(rows) == len(split)
        for (rel, size, digest, label), path, expected in zip(rows, split.paths, split.labels):
            full = os.path.join(doc["root"], rel)
            assert os.path.samefile(full, path) and not os.path.isabs(rel)
            assert size == os.path.getsize(full) and digest == sha256(full) and label == expected
    assert sum(len(rows) for rows in doc["splits"].values()) == 30


def test_the_recorded_split_survives_new_files_another_working_directory_and_a_trailing_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder("data")
    run, source = recorded_run(tmp_path, "data")  # a relative path, as config.yaml would hold it
    recorded = {name: list(split.paths) for name, split in source.splits.items()}
    make_folder("data", per_class=1, start=10)  # three new images since training

    again, verification = manifest.load_recorded(run)
    assert {name: split.paths for name, split in again.splits.items()} == recorded
    assert again["test"].labels.tolist() == source["test"].labels.tolist()
    assert verification.counts["test"] == {"recorded": 3, "unchanged": 3, "changed": 0, "missing": 0}
    doc = manifest.read(run)
    assert manifest.same_source(doc, "data/") and manifest.same_source(doc, str(tmp_path / "data"))

    elsewhere = tmp_path / "elsewhere"
    make_folder(elsewhere / "data", per_class=4, start=50)  # another folder of the same relative name
    monkeypatch.chdir(elsewhere)
    moved, _ = manifest.load_recorded(run)
    assert {name: split.paths for name, split in moved.splits.items()} == recorded
    assert not manifest.same_source(doc, "data")  # here, "data" is the other folder
    own = manifest.data_for_run(run, str(tmp_path / "data") + "/", verify=["test"])
    assert own.own and own.source["test"].paths == recorded["test"] and list(own.source.splits) == ["test"]


def test_changed_missing_and_copied_training_images_are_left_out_of_the_test_split_and_counted(tmp_path, caplog):
    data = make_folder(tmp_path / "data", per_class=20)
    run, source = recorded_run(tmp_path, data, test_fraction=0.2)
    test, train = source["test"].paths, source["train"].paths
    assert len(test) == 12
    with open(test[0], "r+b") as f:  # corrupted in place, same size
        f.seek(20)
        f.write(b"\xff\xff")
    os.remove(test[1])
    shutil.copyfile(train[0], test[2])  # a test file replaced by a copy of a training image

    again, verification = manifest.load_recorded(run, splits=["test"])
    assert again["test"].paths == test[3:]
    assert verification.counts["test"] == {"recorded": 12, "unchanged": 9, "changed": 2, "missing": 1}
    with caplog.at_level(logging.WARNING, logger="ktoolkit"):
        verification.check(["test"], "evaluating")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "3 of 12 test images changed or are missing since training" in warning
    assert "evaluating the 9 unchanged ones" in warning

    for path in test[3:]:
        os.remove(path)
    _, gone = manifest.load_recorded(run, splits=["test"])
    with pytest.raises(ValueError, match=r"all 12 test images .*splits\.json.*--data") as err:
        gone.check(["test"])
    assert os.path.abspath(data) in str(err.value)


def test_a_damaged_or_hostile_splits_json_is_one_error_or_reads_nothing_but_regular_files(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4)
    run, _ = recorded_run(tmp_path, data)
    doc = json.loads(run.splits.read_text())
    doc["splits"]["test"] = [["/dev/zero", 0, row[2], row[3]] for row in doc["splits"]["test"]]
    run.splits.write_text(json.dumps(doc))
    _, verification = manifest.load_recorded(run, splits=["test"])  # a device is never opened (it never ends)
    assert verification.counts["test"]["missing"] == len(doc["splits"]["test"]) > 0
    for text in (
        "{not json",
        json.dumps({**doc, "format": 99}),
        json.dumps({**doc, "root": "relative/path"}),
        json.dumps({**doc, "splits": {"test": [["a.png", 1, "nothex", 0]]}}),
        "[" * 100000,
    ):
        run.splits.write_text(text)
        with pytest.raises(ValueError, match=r"splits\.json is not a valid splits\.json .*--data") as err:
            manifest.read(run)
        assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_other_data_is_evaluated_without_this_runs_training_images(tmp_path, caplog):
    data = make_folder(tmp_path / "data")
    run, source = recorded_run(tmp_path, data)
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    make_folder(copy, per_class=2, start=10)  # plus six images nobody trained on
    with caplog.at_level(logging.WARNING, logger="ktoolkit"):
        found = manifest.data_for_run(run, str(copy))
    assert not found.own
    names = {os.path.relpath(p, copy) for p in found.source["train"].paths}  # whole: all in "train"
    trained = {os.path.relpath(p, data) for p in source["train"].paths}
    assert len(names) == 36 - len(trained) and not names & trained
    assert f"{len(trained)} images of data={copy} (--data) were training images of this run; left out" in caplog.text


def test_a_csv_row_listed_twice_is_kept_once_and_conflicting_rows_are_errors(tmp_path, caplog):
    data = make_folder(tmp_path / "data", per_class=4)
    rows = [f"{name}/{i:03d}.png,{name}" for name in CLASSES for i in range(4)]
    csv = tmp_path / "data" / "labels.csv"
    csv.write_text("\n".join(rows + [rows[0], "./" + rows[1]]) + "\n")
    with caplog.at_level(logging.WARNING, logger="ktoolkit"):
        source = load_data(str(csv), val_fraction=0.0, test_fraction=0.25)
    every = [p for split in source.splits.values() for p in split.paths]
    assert len(every) == len(set(every)) == 12
    assert "2 rows list a file an earlier row lists" in caplog.text

    csv.write_text("\n".join(rows + ["ant/000.png,bee"]) + "\n")
    with pytest.raises(ValueError, match=r"labels\.csv lines 1 and 13 both list .*ant/000\.png.*'ant' and 'bee'"):
        load_data(str(csv))
    csv.write_text("path,label,split\n" + "\n".join(r + ",train" for r in rows) + "\nant/000.png,ant,test\n")
    with pytest.raises(ValueError, match=r"lines 2 and 14 put .*ant/000\.png in both the train and the test split"):
        load_data(str(csv))
    assert os.path.isdir(data)


def test_identical_files_under_two_names_are_kept_once_and_two_labels_are_an_error(tmp_path, caplog):
    data = make_folder(tmp_path / "data")
    for i in range(5):  # five copies inside the same class
        shutil.copyfile(os.path.join(data, "ant", f"{i:03d}.png"), os.path.join(data, "ant", f"copy{i}.png"))
    with caplog.at_level(logging.WARNING, logger="ktoolkit"):
        source = load_data(data, val_fraction=0.2, test_fraction=0.2)
    hashes = [h for split in source.splits.values() for h in split.hashes]
    assert len(hashes) == len(set(hashes)) == 30
    assert "left out 5 duplicate images" in caplog.text
    kept = {os.path.basename(p) for split in source.splits.values() for p in split.paths}
    assert not any(name.startswith("copy") for name in kept)  # "000.png" sorts before "copy0.png"

    shutil.copyfile(os.path.join(data, "ant", "000.png"), os.path.join(data, "cow", "same.png"))
    with pytest.raises(
        ValueError,
        match=r"ant/000\.png \(label 'ant'\) and .*cow/same\.png \(label 'cow'\) are the "
        r"same image",
    ):
        load_data(data)
    report = scan_folder(data)  # `ktool data check` says so before training does
    group = [os.path.join(data, *p) for p in (("ant", "000.png"), ("ant", "copy0.png"), ("cow", "same.png"))]
    assert not report.ok and report.conflicts == [group]
    assert len(report.duplicates) == 5 and "Same image under two classes (1;" in report.format()


def test_a_label_typo_is_an_error_that_names_it_without_allocating_classes(tmp_path):
    make_folder(tmp_path / "data", per_class=3)
    labels = {"ant": 0, "bee": 1, "cow": 2}
    rows = [f"{name}/{i:03d}.png,{labels[name]}" for name in CLASSES for i in range(3)]
    csv = tmp_path / "data" / "ints.csv"
    csv.write_text("\n".join(rows[:-1] + ["cow/002.png,99999"]) + "\n")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"ints\.csv has label 99999 \(line 9\).*0\.\.N-1.*99999 looks like a typo"):
        load_data(str(csv))
    csv.write_text("\n".join(f"{name}/{i:03d}.png,{labels[name] + 1}" for name in CLASSES for i in range(3)) + "\n")
    with pytest.raises(ValueError, match="start at 1"):
        load_data(str(csv))

    x = np.zeros((12, 4, 4), np.uint8)
    np.savez(tmp_path / "typo.npz", x=x, y=np.array([0, 1, 2] * 3 + [0, 1, 99999]))
    with pytest.raises(ValueError, match=r"typo\.npz has label 99999 \(y\[11\]\)"):
        load_data(str(tmp_path / "typo.npz"))
    np.savez(tmp_path / "names.npz", x=x, y=np.zeros(12, int), class_names=np.array([str(i) for i in range(100)]))
    with pytest.raises(ValueError, match="100 class_names but only 12 images"):
        load_data(str(tmp_path / "names.npz"))
    assert time.perf_counter() - started < 5  # no 100,000-class anything


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((6, 0, 0, 3), np.uint8), "zero size"),
        (np.where(np.arange(6 * 16).reshape(6, 4, 4) == 20, np.nan, 0.5), "NaN or infinite pixels in 1 images"),
        (np.full((6, 4, 4), np.inf, np.float32), "NaN or infinite pixels in 6 images"),
        (np.full((6, 4, 4), -0.5), "pixel values -0.5..-0.5"),
        (np.zeros((6, 4, 4), np.complex64), "dtype complex64"),
        (np.zeros((6, 4, 4, 2), np.uint8), "1, 3 or 4 channels"),
    ],
)
def test_npz_pixels_that_cannot_be_images_are_errors_naming_the_array(tmp_path, x, message):
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(6) % 2)
    with pytest.raises(ValueError, match=r"bad\.npz\[x\]") as err:
        load_data(str(tmp_path / "bad.npz"))
    assert message in str(err.value)


def test_an_npz_split_is_recorded_by_rows_and_a_changed_file_is_refused(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (40, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 4)
    run, source = recorded_run(tmp_path, str(tmp_path / "d.npz"))
    again, _ = manifest.load_recorded(run)
    for name, split in source.splits.items():
        np.testing.assert_array_equal(again[name].images, split.images)
        np.testing.assert_array_equal(again[name].labels, split.labels)
    np.savez(tmp_path / "d.npz", x=x[::-1], y=np.arange(40) % 4)
    _, changed = manifest.load_recorded(run)
    with pytest.raises(ValueError, match=r"all 4 test images .*changed \(4\)"):
        changed.check(["test"])


def test_the_scan_cache_rechecks_a_file_corrupted_in_place_with_its_date_restored(tmp_path):
    data = make_folder(tmp_path / "data", per_class=3)
    first = scan_folder(data)
    assert (first.checked, first.cached, len(first.bad_files)) == (9, 0, 0)
    victim = os.path.join(data, "bee", "001.png")
    st = os.stat(victim)
    with open(victim, "rb") as f:
        png = bytearray(f.read())
    crc = png.find(b"IDAT") + 4 + int.from_bytes(png[png.find(b"IDAT") - 4 : png.find(b"IDAT")], "big")
    png[crc] ^= 0xFF  # a wrong IDAT checksum: same size, TensorFlow refuses it
    with open(victim, "r+b") as f:
        f.write(png)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(victim).st_size, os.stat(victim).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = scan_folder(data)
    assert (second.checked, second.cached) == (1, 8)
    assert [b.path for b in second.bad_files] == [victim]


def test_evaluate_and_export_use_the_recorded_split(tmp_path, caplog):
    from ktoolkit.evaluate import evaluate_run
    from ktoolkit.export.source import load_source
    from ktoolkit.train import train

    data = make_folder(tmp_path / "data")
    result = train(
        recipe="lenet5",
        data=data,
        out=str(tmp_path / "run"),
        epochs=1,
        steps_per_epoch=1,
        image_size=(32, 32),
        test_fraction=0.2,
        batch_size=8,
    )
    run = result.run
    doc = json.loads(run.splits.read_text())
    recorded = [os.path.join(doc["root"], row[0]) for row in doc["splits"]["test"]]
    assert result.metrics["images"] == len(recorded) == 6
    make_folder(data, per_class=3, start=10)  # nine new images

    metrics, _ = evaluate_run(run.root)
    assert metrics["split"] == "test" and metrics["images"] == 6
    exported = load_source(run.root)
    assert exported.heldout == "test" and exported.data["test"].paths == recorded
    assert exported.data["train"].paths == [os.path.join(doc["root"], r[0]) for r in doc["splits"]["train"]]

    os.remove(recorded[0])
    with caplog.at_level(logging.WARNING, logger="ktoolkit"):
        metrics, _ = evaluate_run(run.root, data=data + "/")
    assert metrics["images"] == 5 and "1 of 6 test images changed or are missing" in caplog.text

    os.rename(run.splits, tmp_path / "splits.json")  # a run folder of an older ktoolkit
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ktoolkit"):
        metrics, _ = evaluate_run(run.root)
    assert "no splits.json" in caplog.text and "cannot be verified" in caplog.text


def test_an_image_too_large_to_decode_safely_is_a_bad_file(tmp_path):
    """A decompression bomb: a small PNG whose header says 9,500 x 9,500 pixels (90 million; 270 MB as RGB)."""
    data = make_folder(tmp_path / "data", per_class=3)
    bomb = os.path.join(data, "ant", "bomb.png")
    Image.new("1", (9500, 9500)).save(bomb)
    assert os.path.getsize(bomb) < 100_000
    report = scan_folder(data)
    assert [(b.path, b.reason) for b in report.bad_files] == [
        (bomb, "too large: 9500x9500 pixels, over 89,478,485; downsize it")
    ]
