"""The data layer: checking image folders, loading folders/CSV/.npz/TFDS into stratified splits,
the tf.data pipeline and augmentation. Every file is a real image (or a real broken one) written
with Pillow; scikit-learn's 8x8 digits are the real-data fixture."""

import io
import json
import logging
import os
import struct

import numpy as np
import pytest
from PIL import Image

from ktoolkit.data import (
    AugmentConfig,
    Augmenter,
    DataSource,
    ScanReport,
    Split,
    load_data,
    make_dataset,
    scan_folder,
    stratified_split,
)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))


def gradient(h=24, w=32, seed=0):
    """An RGB image with structure (so a corrupted copy differs from it)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], -1)
    return np.clip(base + rng.integers(0, 30, (1, 1, 3)), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def png_with_bad_checksum() -> bytes:
    """A PNG whose IDAT checksum is wrong: Pillow loads it, TensorFlow refuses it."""
    png = encode(Image.fromarray(gradient()), "PNG")
    i = png.find(b"IDAT")
    crc = i + 4 + struct.unpack(">I", png[i - 4 : i])[0]
    return png[:crc] + bytes([png[crc] ^ 0xFF]) + png[crc + 1 :]


@pytest.fixture
def messy(tmp_path):
    """cats/ holds every valid kind of image and three bad files, dogs/ good JPEGs and a PNG with a
    bad checksum, birds/ is empty, plus a stray file and hidden files."""
    root = tmp_path / "messy"
    cats, dogs = root / "cats", root / "dogs"
    rgb = Image.fromarray(gradient())
    jpg = encode(rgb, "JPEG", quality=95)
    good = {
        cats / "rgb.jpg": jpg,
        cats / "gray.png": encode(Image.new("L", (20, 16), 100), "PNG"),
        cats / "rgba.png": encode(Image.new("RGBA", (20, 16), (200, 50, 25, 128)), "PNG"),
        cats / "cmyk.jpg": encode(Image.new("CMYK", (20, 16), (0, 255, 255, 0)), "JPEG", quality=100),
        cats / "deep.png": encode(Image.fromarray(np.full((16, 20), 77 * 257, np.uint16)), "PNG"),
        cats / "anim.gif": encode(
            Image.new("P", (20, 16), 3), "GIF", save_all=True, append_images=[Image.new("P", (20, 16), 7)]
        ),
        cats / "pic.bmp": encode(rgb, "BMP"),
        cats / "rgba.webp": encode(Image.new("RGBA", (20, 16), (10, 220, 30, 200)), "WEBP", lossless=True),
        cats / "nested" / "deeper.jpg": jpg,
    }
    good.update({dogs / f"dog{i}.jpg": encode(Image.fromarray(gradient(seed=i)), "JPEG") for i in range(5)})
    bad = {
        cats / "truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        cats / "empty.jpg": (b"", "empty file (0 bytes)"),
        cats / "notes.jpg": (b"these are my notes, not a picture\n", "not an image"),
        cats / "scan.tiff": (encode(rgb, "TIFF"), "unsupported format: TIFF"),
        dogs / "checksum.png": (png_with_bad_checksum(), "corrupt"),
    }
    for path, data in good.items():
        write(path, data)
    for path, (data, _) in bad.items():
        write(path, data)
    write(cats / ".DS_Store", b"\0\0\0\1Bud1")
    write(root / "README.txt", b"photos of pets\n")
    (root / "birds").mkdir()
    return root, {str(p) for p in good}, {str(p): why for p, (_, why) in bad.items()}


def test_scan_reports_every_bad_file_by_path_and_reason(messy):
    root, good, bad = messy
    report = scan_folder(root)
    assert isinstance(report, ScanReport) and report.layout == "classes"
    found = {b.path: b.reason for b in report.bad_files}
    assert set(found) == set(bad)
    for path, why in bad.items():
        assert found[path].startswith(why), (path, found[path])
    assert report.class_names == ["cats", "dogs"]  # birds is empty: reported, not a class
    assert report.empty_classes == ["birds"] and report.empty_folders == ["birds"]
    assert report.class_counts == {"cats": 9, "dogs": 5}
    assert {p for by_class in report.images.values() for ps in by_class.values() for p in ps} == good
    assert report.imbalance == pytest.approx(9 / 5)
    assert report.ignored == [str(root / "README.txt")]
    assert report.modes["CMYK"] == 1 and report.modes["I;16"] == 1 and report.modes["P"] == 1
    assert not report.ok
    text = report.format()
    for path in bad:
        assert path in text
    assert "birds" in text and "Imbalance: 1.80" in text
    assert json.loads(json.dumps(report.to_dict()))["bad_files"][0].keys() == {"path", "reason"}


def test_load_data_skips_bad_files_in_one_warning_and_strict_raises(messy, caplog):
    root, good, bad = messy
    with caplog.at_level(logging.WARNING, logger="ktoolkit"):
        src = load_data(str(root), val_fraction=0.0, test_fraction=0.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("ktoolkit")]
    assert len(warnings) == 1
    for path in bad:
        assert path in warnings[0].getMessage()
    assert "birds" in warnings[0].getMessage()
    assert src.class_names == ["cats", "dogs"] and list(src.splits) == ["train"]
    assert set(src.splits["train"].paths) == good
    assert {b.path for b in src.bad_files} == set(bad)
    with pytest.raises(ValueError) as err:
        load_data(str(root), strict=True)
    for path in bad:
        assert path in str(err.value)


def test_pipeline_decodes_every_kind_of_image_over_a_full_epoch(messy):
    root, good, _ = messy
    src = load_data(str(root), val_fraction=0.0, test_fraction=0.0)
    train = src.splits["train"]
    ds = make_dataset(train, num_classes=2, image_size=(12, 10), batch_size=4)
    batches = list(ds)
    assert sum(len(x) for x, _ in batches) == len(good) == 14
    for x, y in batches:
        assert x.shape[1:] == (12, 10, 3) and x.dtype.name == "float32" and y.shape[1:] == (2,)
        assert 0 <= float(np.min(x)) and float(np.max(x)) <= 255
        np.testing.assert_array_equal(np.sum(y, 1), 1.0)
    images = np.concatenate([x for x, _ in batches])
    by_name = {os.path.basename(p): images[i] for i, p in enumerate(train.paths)}
    np.testing.assert_allclose(by_name["gray.png"], 100)  # gray -> RGB
    np.testing.assert_allclose(by_name["rgba.png"][..., 0].mean(), 200, atol=1)  # alpha dropped
    np.testing.assert_allclose(by_name["rgba.png"][..., 1:].mean((0, 1)), [50, 25], atol=1)
    np.testing.assert_allclose(by_name["deep.png"], 77, atol=1)  # 16-bit scaled to 8-bit
    assert by_name["cmyk.jpg"][..., 0].mean() > 200 and by_name["cmyk.jpg"][..., 1:].mean() < 60  # red
    np.testing.assert_allclose(by_name["rgba.webp"].mean((0, 1)), [10, 220, 30], atol=1)
    # tf.io.decode_image(channels=1) fails on CMYK JPEG, GIF, BMP and WebP; the pipeline converts itself.
    gray = make_dataset(train, num_classes=2, image_size=8, channels=1, batch_size=32, one_hot=False)
    x, y = next(iter(gray))
    assert x.shape == (14, 8, 8, 1) and y.dtype.name == "int64"
    gray_by_name = {os.path.basename(p): x[i].numpy() for i, p in enumerate(train.paths)}
    np.testing.assert_allclose(gray_by_name["gray.png"], 100)
    np.testing.assert_allclose(gray_by_name["rgba.webp"], round(0.2989 * 10 + 0.587 * 220 + 0.114 * 30), atol=1)


def test_a_bad_file_that_reaches_the_pipeline_is_skipped_not_fatal(messy):
    _, good, bad = messy
    paths = sorted(bad) + sorted(good)
    split = Split("train", np.arange(len(paths)) % 2, paths=paths)
    ds = make_dataset(split, num_classes=2, image_size=8, batch_size=5)
    assert int(ds.cardinality()) == 4  # known, so Keras starts a new pass every epoch
    images = np.concatenate([x for x, _ in ds])
    # The 5 bad files are skipped and the epoch topped up from the next pass: the first 5 good ones again.
    assert len(images) == len(paths)
    np.testing.assert_array_equal(images[-len(bad) :], images[: len(bad)])
    every_file_bad = Split("train", [0] * len(bad), paths=sorted(bad))
    assert list(make_dataset(every_file_bad, num_classes=1, image_size=8)) == []


def test_scan_cache_skips_unchanged_files_and_rechecks_modified_ones(messy):
    root, good, bad = messy
    first = scan_folder(root)
    files = len(good) + len(bad)
    assert (first.checked, first.cached) == (files, 0)
    second = scan_folder(root)
    assert (second.checked, second.cached) == (0, files)
    assert second.to_dict()["bad_files"] == first.to_dict()["bad_files"]
    victim = min(good)
    with open(victim, "rb") as f:
        data = f.read()
    write(victim, data[: len(data) // 3])
    os.utime(victim, ns=(os.stat(victim).st_atime_ns, os.stat(victim).st_mtime_ns + 10**9))
    third = scan_folder(root)
    assert (third.checked, third.cached) == (1, files - 1)
    assert victim in {b.path for b in third.bad_files}
    assert scan_folder(root, use_cache=False).checked == files


def test_stratified_split_keeps_proportions_and_is_reproducible():
    labels = np.repeat(np.arange(4), [200, 100, 40, 1])
    parts = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=3)
    assert sorted(np.concatenate(list(parts.values()))) == list(range(len(labels)))  # no overlap, nothing lost
    assert len(parts["val"]) == round(0.1 * len(labels)) and len(parts["test"]) == round(0.2 * len(labels))
    for name, fraction in (("val", 0.1), ("test", 0.2)):
        counts = np.bincount(labels[parts[name]], minlength=4)
        np.testing.assert_allclose(counts[:3], np.array([200, 100, 40]) * fraction, atol=1)
    assert 340 in parts["train"]  # the one-example class stays in training
    again = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=3)
    other = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=4)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(parts["test"], other["test"])


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    return images, d.target.astype(np.int64)


def write_digit_pngs(root, images, labels, per_class=12):
    for c in range(10):
        for i in np.flatnonzero(labels == c)[:per_class]:
            write(os.path.join(root, f"digit_{c}", f"{i}.png"), encode(Image.fromarray(images[i]), "PNG"))


def test_folder_of_digits_is_split_stratified_and_the_same_every_time(tmp_path, digits):
    write_digit_pngs(tmp_path / "digits", *digits, per_class=20)
    src = load_data(str(tmp_path / "digits"), val_fraction=0.1, test_fraction=0.2, seed=1)
    assert isinstance(src, DataSource) and src.class_names == [f"digit_{c}" for c in range(10)]
    sizes = {k: len(v) for k, v in src.splits.items()}
    assert sizes == {"train": 140, "val": 20, "test": 40}
    for name, per_class in (("train", 14), ("val", 2), ("test", 4)):
        assert src.splits[name].class_counts(10).tolist() == [per_class] * 10
    assert not set(src.splits["train"].paths) & set(src.splits["test"].paths)
    again = load_data(str(tmp_path / "digits"), val_fraction=0.1, test_fraction=0.2, seed=1)
    assert all(again.splits[k].paths == src.splits[k].paths for k in src.splits)
    x, y = next(iter(make_dataset(src.splits["test"], num_classes=10, image_size=8, batch_size=64)))
    assert x.shape == (40, 8, 8, 3) and np.argmax(y, 1).tolist() == src.splits["test"].labels.tolist()


def test_presplit_folders_are_kept_and_a_missing_val_is_carved_from_train(tmp_path, digits):
    images, labels = digits
    write_digit_pngs(tmp_path / "ds" / "train", images, labels, per_class=10)
    write_digit_pngs(tmp_path / "ds" / "test", images[1000:], labels[1000:], per_class=3)
    src = load_data(str(tmp_path / "ds"), val_fraction=0.2, test_fraction=0.5)
    assert src.scan.layout == "splits"
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 80, "val": 20, "test": 30}
    assert all("/test/" in p for p in src.splits["test"].paths)
    assert all("/train/" in p for p in src.splits["val"].paths)
    write_digit_pngs(tmp_path / "ds" / "val", images[1500:], labels[1500:], per_class=2)
    full = load_data(str(tmp_path / "ds"), val_fraction=0.2, test_fraction=0.5)
    assert {k: len(v) for k, v in full.splits.items()} == {"train": 100, "val": 20, "test": 30}
    assert all("/val/" in p for p in full.splits["val"].paths)


def test_csv_with_relative_paths_names_ints_and_a_split_column(tmp_path, digits):
    images, labels = digits
    root = tmp_path / "csvdata"
    rows = []
    for i in range(40):
        write(root / "img" / f"{i}.png", encode(Image.fromarray(images[i]), "PNG"))
        rows.append(
            (
                f"img/{i}.png",
                ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][labels[i]],
            )
        )
    (root / "labels.csv").write_text("\n".join(f"{p},{c}" for p, c in rows) + "\nimg/missing.png,one\n")
    src = load_data(str(root / "labels.csv"), val_fraction=0.0, test_fraction=0.25)
    assert src.class_names == sorted({c for _, c in rows})
    assert sum(len(s) for s in src.splits.values()) == 40 and len(src.splits["test"]) == 10
    assert [b.path for b in src.bad_files] == [str(root / "img" / "missing.png")]
    assert src.bad_files[0].reason.startswith("missing")
    first = src.splits["train"].paths[0]
    assert os.path.isabs(first)
    assert src.class_names[src.splits["train"].labels[0]] == {str(root / p): c for p, c in rows}[first]

    (root / "ints.csv").write_text(
        "path,label,split\n" + "\n".join(f"img/{i}.png,{labels[i]},{'test' if i < 10 else 'train'}" for i in range(40))
    )
    ints = load_data(str(root / "ints.csv"))
    assert ints.class_names == [str(c) for c in range(10)]
    assert len(ints.splits["test"]) == 10 and len(ints.splits["train"]) + len(ints.splits["val"]) == 30
    assert ints.splits["test"].labels.tolist() == labels[:10].tolist()


def test_npz_layouts_class_names_and_pipeline(tmp_path, digits):
    images, labels = digits
    names = np.array([f"d{c}" for c in range(10)])
    np.savez(tmp_path / "digits.npz", x=images, y=labels, class_names=names)
    src = load_data(str(tmp_path / "digits.npz"))
    assert src.class_names == names.tolist() and src.image_shape == (8, 8, 1)
    assert sum(len(s) for s in src.splits.values()) == len(labels)
    assert abs(len(src.splits["test"]) - 0.1 * len(labels)) <= 1
    ds = make_dataset(src.splits["val"], num_classes=10, image_size=(16, 16), batch_size=50)
    x, y = next(iter(ds))
    assert x.shape == (50, 16, 16, 3) and y.shape == (50, 10)
    np.testing.assert_allclose(x[..., 0], x[..., 2])  # gray copied to RGB

    np.savez(
        tmp_path / "split.npz",
        x_train=images[:1000] / 255.0,
        y_train=np.eye(10)[labels[:1000]],
        x_test=images[1000:],
        y_test=labels[1000:],
    )
    split = load_data(str(tmp_path / "split.npz"), val_fraction=0.2)
    assert {k: len(v) for k, v in split.splits.items()} == {"train": 800, "val": 200, "test": len(labels) - 1000}
    assert split.splits["train"].images.dtype == np.uint8
    assert split.class_names == [str(c) for c in range(10)]

    np.savez(tmp_path / "odd.npz", features=images)
    with pytest.raises(ValueError, match="x and y"):
        load_data(str(tmp_path / "odd.npz"))


def test_sources_that_do_not_exist_or_are_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_data(str(tmp_path / "nope"))
    write(tmp_path / "a.txt", b"x")
    with pytest.raises(ValueError, match="unknown kind"):
        load_data(str(tmp_path / "a.txt"))
    with pytest.raises(ValueError, match="val_fraction"):
        load_data(str(tmp_path), val_fraction=1.5)


def test_tfds_prepared_offline_and_missing(tmp_path):
    import tensorflow_datasets as tfds

    class KtoolkitTinyShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                supervised_keys=("image", "label"),
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(8, 8, 1)),
                        "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(60, 0), "test": self._generate_examples(12, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {"image": rng.integers(0, 255, (8, 8, 1), dtype=np.uint8), "label": i % 3}

    data_dir = str(tmp_path / "tfds")
    KtoolkitTinyShapes(data_dir=data_dir).download_and_prepare()
    src = load_data("tfds:ktoolkit_tiny_shapes", data_dir=data_dir, val_fraction=0.2)
    assert src.class_names == ["a", "b", "c"] and src.image_shape == (8, 8, 1)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 48, "val": 12, "test": 12}
    assert src.splits["val"].class_counts(3).tolist() == [4, 4, 4]
    for name, split in src.splits.items():
        labels = np.concatenate([np.argmax(y, 1) for _, y in make_dataset(split, num_classes=3, image_size=4)])
        assert labels.tolist() == split.labels.tolist(), name  # the labels array matches the dataset
    x, _ = next(iter(make_dataset(src.splits["train"], num_classes=3, image_size=4, training=True, batch_size=48)))
    assert x.shape == (48, 4, 4, 3)
    with pytest.raises(FileNotFoundError) as err:
        load_data("tfds:mnist", data_dir=str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value) and "tfds build mnist --data_dir" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        load_data("tfds:no_such_dataset_anywhere", data_dir=str(tmp_path / "empty"))


def batch_of_pictures(n=8, size=24):
    return np.stack([gradient(size, size, seed=i) for i in range(n)]).astype(np.float32)


def textured_pictures(n=8, size=112):
    """Pictures with pixel-scale detail (a blur visibly changes them), at a size where the blur is not tiny."""
    noise = np.random.default_rng(7).integers(0, 60, (n, size, size, 3))
    return np.clip(batch_of_pictures(n, size) + noise, 0, 255).astype(np.float32)


@pytest.mark.parametrize(
    "option",
    [
        "flip",
        "crop",
        "rotation",
        "zoom",
        "stretch",
        "perspective",
        "color",
        "jitter",
        "grayscale",
        "blur",
        "randaugment",
    ],
)
def test_each_augmentation_changes_images_and_keeps_shape_and_range(option):
    import tensorflow as tf

    images = textured_pictures() if option == "blur" else batch_of_pictures()
    labels = np.eye(4, dtype=np.float32)[np.arange(8) % 4]
    config = AugmentConfig.parse(option)
    assert config.active == [option]
    augment = Augmenter(config)
    out, out_labels = augment(images, labels, tf.constant([1, 2]))
    out = out.numpy()
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, images, atol=1.0)
    np.testing.assert_array_equal(out_labels, labels)
    if option != "randaugment":  # keras_cv's RandAugment draws from its own generator
        np.testing.assert_array_equal(out, augment(images, labels, tf.constant([1, 2]))[0])  # seeded
    gray = augment(images[..., :1], labels, tf.constant([1, 2]))[0].numpy()
    assert gray.shape == images[..., :1].shape and 0 <= gray.min() and gray.max() <= 255
    if option == "flip":  # exactly mirrored or exactly untouched: the transform maps pixels to pixels
        mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
        untouched = [np.array_equal(o, i) for o, i in zip(out, images)]
        assert all(m or u for m, u in zip(mirrored, untouched)) and any(mirrored) and any(untouched)


@pytest.mark.parametrize("option", ["mixup=0.4", "cutmix=1", "mixup=0.4,cutmix=1"])
def test_mixup_and_cutmix_mix_labels_that_still_sum_to_one(option):
    import tensorflow as tf

    images = batch_of_pictures(16)
    labels = np.eye(4, dtype=np.float32)[np.arange(16) % 4]
    augment = Augmenter(AugmentConfig.parse(option))
    out, mixed = augment(images, labels, tf.constant([3, 4]))
    mixed = mixed.numpy()
    np.testing.assert_array_equal(mixed, augment(images, labels, tf.constant([3, 4]))[1])  # seeded
    assert out.shape == images.shape and 0 <= np.min(out) and np.max(out) <= 255
    np.testing.assert_allclose(mixed.sum(1), 1.0, atol=1e-5)
    assert (mixed.max(1) < 0.999).any()  # some labels are mixed


def test_augment_config_parse_light_and_errors():
    c = AugmentConfig.parse("flip,crop,color=20,mixup=0.2")
    assert (c.flip, c.crop, c.color, c.mixup, c.cutmix) == (True, 0.25, 20.0, 0.2, 0.0)
    assert AugmentConfig.parse(str(c)) == c and str(AugmentConfig()) == "none"
    assert AugmentConfig.light().active == ["flip", "crop"] and AugmentConfig.parse("light") == AugmentConfig.light()
    assert AugmentConfig.parse("randaugment=true").randaugment == 0.5
    with pytest.raises(ValueError) as err:
        AugmentConfig.parse("flip,sharpen=3")
    assert "'sharpen'" in str(err.value) and "perspective" in str(err.value) and "mixup" in str(err.value)
    with pytest.raises(ValueError, match="color='lots'"):
        AugmentConfig.parse("color=lots")
    with pytest.raises(ValueError, match="crop=1.5"):
        AugmentConfig(crop=1.5)


def test_training_pipeline_shuffles_and_augments_per_epoch_reproducibly(tmp_path, digits):
    images, labels = digits
    split = Split("train", labels[:96], images=images[:96])

    def epochs(**kw):
        ds = make_dataset(split, num_classes=10, image_size=12, batch_size=32, training=True, seed=5, **kw)
        return [np.concatenate([x for x, _ in ds]) for _ in range(2)]

    first, second = epochs(augment="flip,crop,mixup=0.2")
    assert first.shape == (96, 12, 12, 3) and not np.allclose(first, second)
    np.testing.assert_array_equal(first, epochs(augment="flip,crop,mixup=0.2")[0])  # same seed, same epoch
    plain = epochs()[0]
    assert not np.allclose(plain, first)
    evaluation = np.concatenate([x for x, _ in make_dataset(split, num_classes=10, image_size=12)])
    # Shuffling reorders the same images: equal sorted pixel sums.
    np.testing.assert_allclose(np.sort(plain.sum((1, 2, 3))), np.sort(evaluation.sum((1, 2, 3))))
    with pytest.raises(ValueError, match="one_hot"):
        make_dataset(split, num_classes=10, image_size=12, training=True, augment="mixup", one_hot=False)


def test_memory_and_file_caches_give_the_same_batches(tmp_path, messy):
    root, _, _ = messy
    train = load_data(str(root), val_fraction=0, test_fraction=0).splits["train"]

    def pixels(size=(16, 16), **kw):
        return np.concatenate([x for x, _ in make_dataset(train, num_classes=2, image_size=size, **kw)])

    reference = pixels()
    np.testing.assert_array_equal(pixels(cache="memory"), reference)
    folder = tmp_path / "tfcache"
    np.testing.assert_array_equal(pixels(cache=str(folder)), reference)
    names = os.listdir(folder)
    assert any(n.startswith("train-16x16x3-") and n.endswith(".index") for n in names)
    np.testing.assert_array_equal(pixels(cache=str(folder)), reference)  # read back from the files
    # A killed first epoch leaves a lock file that TensorFlow refuses to pass; it is cleared.
    prefix = str(folder / f"train-12x12x3-{train.fingerprint()}")
    write(prefix + "_0.lockfile", b"")
    write(prefix + "_0.data-00000-of-00001.tempstate123", b"partial")
    np.testing.assert_array_equal(pixels((12, 12), cache=str(folder)), pixels((12, 12)))
    assert pixels((8, 8), cache=str(folder)).shape[1:3] == (8, 8)  # its own files, per image size
    assert any(n.startswith("train-8x8x3-") and n.endswith(".index") for n in os.listdir(folder))
    shuffled = pixels(cache="memory", shuffle=True, seed=1)
    assert not np.array_equal(shuffled, reference)
    np.testing.assert_allclose(np.sort(shuffled.sum((1, 2, 3))), np.sort(reference.sum((1, 2, 3))))


def test_make_dataset_rejects_bad_arguments(digits):
    images, labels = digits
    split = Split("val", labels[:10], images=images[:10])
    with pytest.raises(ValueError, match="num_classes=5"):
        make_dataset(split, num_classes=5, image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        make_dataset(split, num_classes=10, image_size=(8,))
    with pytest.raises(ValueError, match="channels=2"):
        make_dataset(split, num_classes=10, image_size=8, channels=2)
    with pytest.raises(ValueError, match="empty"):
        make_dataset(Split("test", [], images=images[:0]), num_classes=10, image_size=8)


def test_flip_and_crop_fast_path_matches_the_projective_transform():
    import tensorflow as tf

    augment = Augmenter(AugmentConfig(flip=True, crop=0.1))
    images = tf.constant(batch_of_pictures(8, size=20))
    seed = tf.constant([5, 6], tf.int64)
    fast = augment._geometry(images, seed).numpy()
    general = augment._geometry(images, seed, axis_aligned=False).numpy()
    assert not np.allclose(fast, images.numpy(), atol=1)
    np.testing.assert_allclose(fast, general, atol=0.05)


def test_grayscale_one_makes_every_pixel_gray_and_keeps_its_luminance():
    import tensorflow as tf

    images = batch_of_pictures()
    out = Augmenter(AugmentConfig(grayscale=1.0))(images, None, tf.constant([1, 2]))[0].numpy()
    assert out.shape == images.shape
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    np.testing.assert_allclose(out[..., 0], images @ np.array([0.2989, 0.5870, 0.1140]), atol=1e-3)
    gray = Augmenter(AugmentConfig(grayscale=1.0))(images[..., :1], None, tf.constant([1, 2]))[0].numpy()
    np.testing.assert_array_equal(gray, images[..., :1])  # already gray


def test_jitter_keeps_gray_images_gray_and_black_images_black():
    import tensorflow as tf

    levels = np.array([0.0, 1.0, 128.0, 255.0] * 4, np.float32)
    images = np.broadcast_to(levels[:, None, None, None], (16, 8, 8, 3)).copy()
    out = Augmenter(AugmentConfig(jitter=1.0))(images, None, tf.constant([3, 4]))[0].numpy()
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
    np.testing.assert_allclose(out, out[:, :1, :1, :1] * np.ones_like(out), atol=1e-3)  # constant and gray
    np.testing.assert_array_equal(out[levels == 0], 0.0)  # black: no brightness, saturation or hue to change
    assert not np.allclose(out, images, atol=1)  # the brightness still varies


def test_hue_shift_matches_tensorflow_hsv_round_trip():
    import tensorflow as tf

    from ktoolkit.data.augment import _shift_hue

    images = np.random.default_rng(0).uniform(0, 255, (6, 10, 10, 3)).astype(np.float32)
    images[0] = 77.0  # a gray image has no hue
    shift = np.linspace(-0.5, 0.9, 6, dtype=np.float32)[:, None, None]
    hsv = tf.image.rgb_to_hsv(images / 255.0).numpy()
    hsv[..., 0] = np.mod(hsv[..., 0] + shift, 1.0)
    expected = tf.image.hsv_to_rgb(hsv).numpy() * 255.0
    np.testing.assert_allclose(_shift_hue(tf.constant(images), tf.constant(shift)).numpy(), expected, atol=0.02)


def test_blur_smooths_detail_keeps_the_mean_and_skips_small_images():
    import tensorflow as tf

    images = textured_pictures(4)
    augment = Augmenter(AugmentConfig(blur=1.0))
    out = augment(images, None, tf.constant([1, 2]))[0].numpy()
    np.testing.assert_array_equal(out, augment(images, None, tf.constant([1, 2]))[0])  # seeded

    def detail(x):
        return np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))

    assert (detail(out) < 0.9 * detail(images)).all()
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3)), rtol=0.01)
    gray = augment(images[..., :1], None, tf.constant([1, 2]))[0].numpy()
    assert (detail(gray) < 0.9 * detail(images[..., :1])).all()
    small = batch_of_pictures(2, size=16)  # a one-pixel kernel: nothing to blur
    np.testing.assert_array_equal(augment(small, None, tf.constant([1, 2]))[0], small)


def test_colour_options_run_in_tf_data_like_eagerly():
    import tensorflow as tf

    images = textured_pictures(4, size=40)
    augment = Augmenter(AugmentConfig.parse("jitter,grayscale,blur"))
    ds = tf.data.Dataset.from_tensor_slices(images).batch(4).map(lambda x: augment(x, None, tf.constant([5, 6]))[0])
    np.testing.assert_allclose(next(iter(ds)).numpy(), augment(images, None, tf.constant([5, 6]))[0], atol=1e-3)


def test_colour_options_parse_round_trip_and_errors():
    c = AugmentConfig.parse("jitter,grayscale,blur")
    assert (c.jitter, c.grayscale, c.blur) == (0.5, 0.2, 0.5) and c.active == ["jitter", "grayscale", "blur"]
    assert AugmentConfig.parse(str(c)) == c and str(c) == "jitter=0.5,grayscale=0.2,blur=0.5"
    assert AugmentConfig.parse("flip,jitter=1,blur=0") == AugmentConfig(flip=True, jitter=1.0)
    for text, match in [
        ("jitter=1.5", "jitter=1.5"),
        ("grayscale=-0.2", "grayscale=-0.2"),
        ("blur=lots", "blur='lots'"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            AugmentConfig.parse(text)
        assert "\n" not in str(err.value)
