"""Loading a dataset into train/val/test splits: image folders, CSV files, .npz arrays and TFDS.

:func:`load_data` returns a :class:`DataSource`: the class names, the splits (file paths, images
in memory, or a ``tf.data.Dataset`` for TFDS, always with their labels) and the files it had to
skip. Data that is not split already gets a stratified train/val/test split with a fixed seed, so
every run and every machine trains and evaluates on the same images. Before splitting, a file listed
twice and identical files under different names are kept once, so no image is both trained on and
held out; labels and pixel values are checked, so a typo is an error that names it, not a model
with 100,000 classes.

Sources
-------
``source`` is one of:

* a folder with one subfolder per class (``flowers/rose/1.jpg``), or with ``train``, ``val``
  (``valid``, ``validation``) and ``test`` folders that each hold one subfolder per class.
  Every file is checked (:func:`~ktoolkit.data.scan_folder`); class folders without a good image
  are left out of ``class_names``.
* a CSV file of ``path,label`` rows, header optional (a header may add a ``split`` column of
  train/val/test). Relative paths are relative to the CSV's folder; labels are class names
  (sorted to give the indices) or integers 0..N-1 (class names "0".."N-1").
* an .npz file with arrays ``x``/``y``, ``images``/``labels``, or ``x_train``/``y_train``,
  ``x_test``/``y_test`` and optionally ``x_val``/``y_val``; optional ``class_names``. Images are
  (N, H, W) or (N, H, W, C), uint8 (floats in 0..1 or 0..255 and uint16 are converted); labels
  are integers or one-hot rows.
* ``"tfds:NAME"`` (``"tfds:NAME/CONFIG:VERSION"`` works too): a TensorFlow Datasets dataset
  already prepared in ``data_dir``; nothing is downloaded.
* with ``allow_unlabeled``, also a folder of images without class subfolders: its images are
  one class named after the folder (label 0), for training without labels (`ktool pretrain`).

Splits
------
Data that is not split gets a stratified split: every class keeps its proportions in each
split, and the same ``seed`` gives the same split. Before any split is made, a file that a CSV
lists twice and files with identical bytes under different names are kept once (the first in
sorted order; logged with the count), so no image can be both trained on and held out; two
rows or copies of one image with different labels are an error. When only some splits exist (e.g. train and
test folders), the missing val (or test) split is carved from train, stratified, with
``val_fraction`` (or ``test_fraction``) of the training examples. Empty splits are left out of
``splits``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from ktoolkit.data.scan import (
    SPLIT_FOLDERS,
    UNSPLIT,
    BadFile,
    ScanReport,
    check_images,
    is_hidden,
    scan_folder,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SOURCES = (
    "a folder with one subfolder per class (or train/val/test folders of class folders)",
    "a CSV file of path,label rows",
    "an .npz file (x/y, x_train/y_train/x_test/y_test or images/labels)",
    "tfds:NAME (a prepared TensorFlow Datasets dataset)",
)
# How many bad files a log message lists (all of them are in DataSource.bad_files).
_LOG_BAD = 20


@dataclass
class Split:
    """One split of a dataset: labels and the images, as file paths, an array, or a tf.data.Dataset.

    Attributes:
        name: "train", "val" or "test".
        labels: class index of each example (int64).
        paths: image file paths (folder and CSV sources).
        images: uint8 array (N, height, width, channels) (.npz sources); (N, height, width) gets
            a channel axis.
        dataset: ``tf.data.Dataset`` of (image uint8 (h, w, c), label) in ``labels`` order (TFDS).
        key: what the examples are, for cache file names (TFDS: name, version, split and slice).
        hashes: SHA-256 (hex) of each file, in ``paths`` order (:func:`load_data` fills it; a run's
            splits.json records it).
        index: position of each example in the part it was cut from (.npz: the row of its array).
        part: that part: ``"all"`` for data that was not split, else the split it was read as.
    """

    name: str
    labels: np.ndarray
    paths: list[str] | None = None
    images: np.ndarray | None = None
    dataset: Any = None
    key: str = ""
    hashes: list[str] | None = None
    index: np.ndarray | None = None
    part: str = ""

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        given = [k for k in ("paths", "images", "dataset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"Split {self.name!r}: give exactly one of paths, images or dataset (got {', '.join(given) or 'none'})."
            )
        if self.paths is not None:
            self.paths = [os.fspath(p) for p in self.paths]
        if self.images is not None:
            self.images = np.asarray(self.images)
            if self.images.ndim == 3:  # (N, height, width): one channel
                self.images = self.images[..., None]
        count = len(self.paths) if self.paths is not None else len(self.images) if self.images is not None else None
        if count is not None and count != len(self.labels):
            raise ValueError(f"Split {self.name!r}: {count} images but {len(self.labels)} labels.")
        if self.index is not None:
            self.index = np.asarray(self.index, dtype=np.int64).reshape(-1)
        for what, values in (("hashes", self.hashes), ("index", self.index)):
            if values is not None and len(values) != len(self.labels):
                raise ValueError(f"Split {self.name!r}: {len(values)} {what} but {len(self.labels)} labels.")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def kind(self) -> str:
        """ "paths", "images" or "dataset"."""
        return "paths" if self.paths is not None else "images" if self.images is not None else "dataset"

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Number of examples of each class."""
        return np.bincount(self.labels, minlength=num_classes)

    def subset(self, indices, name: str | None = None) -> Split:
        """The examples at ``indices`` (in that order), as a new split."""
        indices = np.asarray(indices, dtype=np.int64)
        name = name or self.name
        if self.kind == "dataset":
            indices = np.sort(indices)  # a filter keeps the dataset's order
        where = {"index": None if self.index is None else self.index[indices], "part": self.part}
        if self.kind == "paths":
            hashes = None if self.hashes is None else [self.hashes[i] for i in indices]
            return Split(name, self.labels[indices], paths=[self.paths[i] for i in indices], hashes=hashes, **where)
        if self.kind == "images":
            return Split(name, self.labels[indices], images=self.images[indices], **where)
        import tensorflow as tf

        keep = np.zeros(len(self), dtype=bool)
        keep[indices] = True
        mask = tf.constant(keep)
        dataset = self.dataset.enumerate().filter(lambda i, example: mask[i]).map(lambda i, example: example)
        digest = hashlib.sha1(indices.tobytes()).hexdigest()[:12]
        return Split(name, self.labels[indices], dataset=dataset, key=f"{self.key}[{digest}]", **where)

    def fingerprint(self) -> str:
        """A short hash of the examples (paths with their content hashes, else their sizes and dates;
        pixels; or the TFDS key) and labels: cached decoded images are reused only while it is unchanged."""
        h = hashlib.sha1(self.labels.tobytes())
        if self.kind == "paths" and self.hashes is not None:
            for path, digest in zip(self.paths, self.hashes):
                h.update(f"{path}\0{digest}\0".encode())
        elif self.kind == "paths":
            for path in self.paths:
                try:
                    st = os.stat(path)
                    h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
                except OSError:
                    h.update(f"{path}\0missing\0".encode())
        elif self.kind == "images":
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).data)
        else:
            h.update(self.key.encode())
        return h.hexdigest()[:16]


@dataclass
class DataSource:
    """A dataset split into train/val/test, as :func:`load_data` returns it.

    Attributes:
        origin: the ``source`` string it was loaded from.
        class_names: class names in label order.
        splits: the non-empty splits among "train", "val" and "test", by name.
        bad_files: files skipped because they cannot be decoded or are missing.
        image_shape: (height, width, channels) when every image has it (.npz, most TFDS), else None.
        scan: the :class:`ScanReport` of a folder source, else None.
        settings: how it was split (val_fraction, test_fraction, seed, data_dir), for a run's
            splits.json.
    """

    origin: str
    class_names: list[str]
    splits: dict[str, Split]
    bad_files: list[BadFile] = field(default_factory=list)
    image_shape: tuple[int, int, int] | None = None
    scan: ScanReport | None = None
    settings: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getitem__(self, name: str) -> Split:
        if name not in self.splits:
            raise KeyError(f"{self.origin} has no {name!r} split; it has {', '.join(self.splits) or 'none'}.")
        return self.splits[name]


def load_data(
    source: str,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    data_dir: str | None = None,
    progress: bool = False,
    allow_unlabeled: bool = False,
) -> DataSource:
    """Loads a dataset and splits it into train, val and test.

    ``source`` is a class-per-folder image tree (or train/val/test folders of them), a CSV file of
    ``path,label`` rows, an .npz file of images and labels, or ``"tfds:NAME"`` (a prepared TFDS dataset;
    nothing is downloaded). Unsplit data gets a stratified split with ``seed``; duplicates are kept once
    before splitting. The layouts each kind accepts and how missing splits are made: the module
    docstring (its Sources and Splits sections).

    Args:
        source: the folder, CSV file, .npz file or "tfds:NAME".
        val_fraction: fraction of the examples for validation (0 for none).
        test_fraction: fraction of the examples for the test split (0 for none).
        seed: seed of the split.
        strict: raise instead of skipping bad files.
        data_dir: TFDS data folder (default: TFDS's own, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
        progress: show progress bars on stderr while checking files.
        allow_unlabeled: accept a folder of images without class subfolders (see above).

    Returns:
        A :class:`DataSource`. Skipped files are in ``bad_files`` and logged in one warning.

    Raises:
        FileNotFoundError: ``source`` does not exist (for TFDS: the dataset is not prepared in ``data_dir``).
        ValueError: bad fractions, an unreadable CSV/.npz layout, no usable images, labels that
            are not class indices 0..N-1 with every class present, one image with two labels,
            .npz pixels that are NaN, infinite, out of range or of zero size, or (with ``strict``)
            bad files; each message names the files or the argument and the fix.
    """
    _check_fractions(val_fraction, test_fraction)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_data: source={source!r} must be a path or 'tfds:NAME'.")
    source = os.fspath(source)
    fractions = {"val": val_fraction, "test": test_fraction}
    settings = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed, "data_dir": data_dir}
    if source.startswith("tfds:"):
        loaded_tfds = _load_tfds(source, fractions, seed, data_dir, progress)
        loaded_tfds.settings = settings
        return loaded_tfds
    loaded = _load_local(source, progress, allow_unlabeled)
    return _finish(loaded, source, fractions, seed, strict, settings)


def _check_fractions(val_fraction, test_fraction) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"load_data: {name}={value!r} must be a number in [0, 1), e.g. 0.1.")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"load_data: val_fraction + test_fraction = {val_fraction + test_fraction:g} must be "
            f"below 1, to leave images for training."
        )


def _load_local(source: str, progress: bool, allow_unlabeled: bool) -> _Loaded:
    """A folder, CSV or .npz ``source`` read by the loader of its kind (not yet deduplicated or split)."""
    if os.path.isdir(source):
        flat = allow_unlabeled and not any(e.is_dir() and not is_hidden(e.name) for e in os.scandir(source))
        return _load_flat_folder(source, progress) if flat else _load_folder(source, progress)
    if os.path.isfile(source) and source.lower().endswith(".csv"):
        return _load_csv(source, progress)
    if os.path.isfile(source) and source.lower().endswith(".npz"):
        return _load_npz(source)
    if os.path.exists(source):
        raise ValueError(
            f"load_data: source={source!r} is a file of an unknown kind; give " + "; or ".join(_SOURCES) + "."
        )
    raise FileNotFoundError(f"load_data: source={source!r} does not exist; give " + "; or ".join(_SOURCES) + ".")


def _finish(loaded: _Loaded, source: str, fractions: dict, seed: int, strict: bool, settings: dict) -> DataSource:
    """Bad files (refused with ``strict``), duplicates, the split, and one warning for every problem."""
    problems = loaded.problems
    if loaded.bad_files and strict:
        raise ValueError(
            f"load_data: {len(loaded.bad_files)} bad files in {source} (strict=True); fix or delete "
            f"them:\n" + "\n".join(f"  {b}" for b in loaded.bad_files)
        )
    if loaded.bad_files:
        listed = "\n".join(f"  {b}" for b in loaded.bad_files[:_LOG_BAD])
        more = len(loaded.bad_files) - _LOG_BAD
        problems.insert(
            0,
            f"skipped {len(loaded.bad_files)} bad files (fix or delete them; strict=True makes "
            f"this an error):\n{listed}" + (f"\n  ... and {more} more (see DataSource.bad_files)" if more > 0 else ""),
        )
    if not any(len(s) for s in loaded.splits.values()):
        raise ValueError(
            f"load_data: {source} has no usable images"
            + (f" ({len(loaded.bad_files)} bad files)" if loaded.bad_files else "")
            + "."
        )
    # Duplicates only matter (and are only dropped) when something is held out: pre-split data or a fraction.
    held_out = len(loaded.splits) > 1 or any(fractions.values())
    problems.extend(_deduplicate(loaded, held_out))
    splits = _complete_splits(loaded.splits, fractions, seed, source)
    missing = sorted(set(range(len(loaded.class_names))) - set(splits["train"].labels.tolist()))
    if missing:
        problems.append("classes without training examples: " + ", ".join(loaded.class_names[i] for i in missing))
    if problems:
        logger.warning("%s: %s", source, "\n".join(problems))
    return DataSource(source, loaded.class_names, splits, loaded.bad_files, loaded.image_shape, loaded.scan, settings)


@dataclass
class _Loaded:
    class_names: list[str]
    splits: dict[str, Split]  # "all" when not split
    bad_files: list[BadFile] = field(default_factory=list)
    image_shape: tuple | None = None
    scan: ScanReport | None = None
    problems: list[str] = field(default_factory=list)


def _deduplicate(loaded: _Loaded, held_out: bool) -> list[str]:
    """Files with identical bytes (same SHA-256) under different names, across every part.

    Two copies with different labels are an error. With a split to make (``held_out``) only the
    first copy in sorted order is kept, so one image cannot be both trained on and held out.

    Returns:
        The problem line for the load warning (empty when nothing was dropped).
    """
    parts = {name: s for name, s in loaded.splits.items() if s.kind == "paths" and s.hashes is not None}
    first: dict[str, tuple[str, int]] = {}  # hash -> (path, label) of the copy that is kept
    dropped: dict[str, list[int]] = {name: [] for name in parts}
    pairs = []
    for path, name, i in sorted((p, name, i) for name, s in parts.items() for i, p in enumerate(s.paths)):
        digest, label = parts[name].hashes[i], int(parts[name].labels[i])
        if digest not in first:
            first[digest] = (path, label)
            continue
        kept, kept_label = first[digest]
        if label != kept_label:
            names = loaded.class_names
            raise ValueError(
                f"load_data: {kept} (label {names[kept_label]!r}) and {path} (label {names[label]!r}) "
                f"are the same image (identical bytes) with two labels; delete the wrong copy."
            )
        dropped[name].append(i)
        pairs.append((path, kept))
    if not held_out or not pairs:
        return []
    for name, indices in dropped.items():
        if indices:
            loaded.splits[name] = parts[name].subset(np.setdiff1d(np.arange(len(parts[name])), indices))
    return [
        (
            f"left out {len(pairs)} duplicate images (identical bytes to an image kept under another name), so "
            f"none is both trained on and held out; e.g. {pairs[0][0]} = {pairs[0][1]}"
        )
    ]


def _complete_splits(splits: dict[str, Split], fractions: dict[str, float], seed: int, source: str):
    """Splits unsplit data, carves missing val/test splits from train, and drops empty splits."""
    if UNSPLIT in splits:
        whole = splits[UNSPLIT]
        parts = stratified_split(whole.labels, fractions, seed)
    elif "train" not in splits or not len(splits["train"]):
        raise ValueError(
            f"load_data: {source} has no training examples (splits: "
            f"{', '.join(f'{k} {len(v)}' for k, v in splits.items())}); add a train split."
        )
    else:
        whole = splits["train"]
        parts = stratified_split(whole.labels, {s: f for s, f in fractions.items() if s not in splits}, seed)
    carved = {name: whole.subset(idx, name) for name, idx in parts.items()}
    result = {}
    for name in SPLITS:
        split = carved.get(name, splits.get(name))
        if split is not None and len(split):
            result[name] = split
    return result


def stratified_split(labels, fractions: dict[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """Splits example indices so that every class keeps its proportions in every split.

    Each split ``s`` gets ``round(n * fractions[s])`` examples, shared out over the classes in
    proportion to their sizes (largest remainders); every class keeps at least one training
    example. The result depends only on the labels, the fractions and the seed.

    Args:
        labels: class index per example.
        fractions: fraction of the examples per split name, e.g. ``{"val": 0.1, "test": 0.1}``.
        seed: seed of the random assignment within each class.

    Returns:
        Sorted index arrays by split name, plus "train" for the rest.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    left = counts.copy()  # examples of each class not given to a split yet
    quotas = {}
    for name, fraction in fractions.items():
        ideal = counts * fraction
        quota = np.minimum(np.floor(ideal).astype(np.int64), np.maximum(left - 1, 0))
        extra = round(len(labels) * fraction) - int(quota.sum())
        # Largest remainders first; a random tie-break so no class is always favoured.
        order = np.lexsort((rng.random(len(classes)), -(ideal - quota)))
        for i in order:
            if extra <= 0:
                break
            if left[i] - quota[i] > 1:
                quota[i] += 1
                extra -= 1
        left -= quota
        quotas[name] = quota
    parts = {name: [] for name in fractions}
    parts["train"] = []
    for c, cls in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name in fractions:
            parts[name].append(members[start : start + quotas[name][c]])
            start += quotas[name][c]
        parts["train"].append(members[start:])
    return {
        name: np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for name, p in parts.items()
    }


def _load_folder(root: str, progress: bool) -> _Loaded:
    report = scan_folder(root, progress=progress)
    names = report.class_names
    index = {n: i for i, n in enumerate(names)}
    splits = {}
    for split, by_class in report.images.items():
        paths, labels = [], []
        for name in names:
            for path in by_class.get(name, ()):
                paths.append(path)
                labels.append(index[name])
        splits[split] = Split(
            split, np.array(labels, np.int64), paths=paths, hashes=[report.hashes[p] for p in paths], part=split
        )
    problems = []
    if report.empty_classes:
        problems.append(
            "class folders without a good image, left out of the classes: " + ", ".join(report.empty_classes)
        )
    return _Loaded(names, splits, list(report.bad_files), None, report, problems)


def _load_flat_folder(root: str, progress: bool) -> _Loaded:
    """A folder of images without class subfolders: one class, named after the folder."""
    files = sorted(e.path for e in os.scandir(root) if e.is_file() and not is_hidden(e.name))
    result = check_images(files, progress=progress)
    verdicts = result.verdicts
    good = [p for p in files if verdicts[os.path.abspath(p)].ok]
    bad = [BadFile(p, verdicts[os.path.abspath(p)].reason) for p in files if not verdicts[os.path.abspath(p)].ok]
    name = os.path.basename(os.path.abspath(root))
    hashes = [result.hashes[os.path.abspath(p)] for p in good]
    return _Loaded(
        [name], {UNSPLIT: Split(UNSPLIT, np.zeros(len(good), np.int64), paths=good, hashes=hashes, part=UNSPLIT)}, bad
    )


_PATH_HEADERS = {"path", "file", "filename", "file_name", "filepath", "image", "image_path", "img"}
_LABEL_HEADERS = {"label", "class", "class_name", "category", "target", "y"}


def _load_csv(path: str, progress: bool) -> _Loaded:
    entries, has_split_column = _csv_entries(path)
    entries, repeated = _one_row_per_file(entries, path)
    class_names, label_of = _class_index([e[1] for e in entries], path, [e[3] for e in entries])
    result = check_images([e[0] for e in entries], progress=progress)
    bad = []
    by_split: dict[str, tuple[list, list]] = {}
    for file, label, split, _ in entries:
        verdict = result.verdicts[os.path.abspath(file)]
        if not verdict.ok:
            bad.append(BadFile(file, verdict.reason))
            continue
        paths, labels = by_split.setdefault(split, ([], []))
        paths.append(file)
        labels.append(label_of[label])
    splits = {
        s: Split(s, np.array(labels, np.int64), paths=paths, hashes=[result.hashes[p] for p in paths], part=s)
        for s, (paths, labels) in by_split.items()
    }
    if has_split_column and UNSPLIT in splits:
        raise ValueError(f"load_data: {path} mixes rows with and without a split.")
    problems = (
        [f"{repeated} rows list a file an earlier row lists (same label and split); each file is used once"]
        if repeated
        else []
    )
    return _Loaded(class_names, splits, bad, problems=problems)


def _csv_entries(path: str) -> tuple[list[tuple[str, str, str, int]], bool]:
    """The rows of a CSV as (absolute file, label, split, line), and whether it has a split column."""
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [
            (n, [c.strip() for c in row])
            for n, row in enumerate(csv.reader(f), start=1)
            if row and any(c.strip() for c in row)
        ]
    if not rows:
        raise ValueError(f"load_data: {path} is empty; write one 'path,label' row per image.")
    first = [c.lower() for c in rows[0][1]]
    path_col, label_col, split_col = 0, 1, None
    if first[0] in _PATH_HEADERS or (len(first) > 1 and first[1] in _LABEL_HEADERS):
        path_col = next((i for i, c in enumerate(first) if c in _PATH_HEADERS), None)
        label_col = next((i for i, c in enumerate(first) if c in _LABEL_HEADERS), None)
        split_col = first.index("split") if "split" in first else None
        if path_col is None or label_col is None:
            raise ValueError(
                f"load_data: the header of {path} ({', '.join(rows[0][1])}) needs a path column "
                f"and a label column, e.g. 'path,label' (optionally ',split')."
            )
        rows = rows[1:]
    elif len(first) != 2:
        raise ValueError(
            f"load_data: {path} line {rows[0][0]} has {len(first)} columns; without a header each "
            f"row must be 'path,label' (add a header 'path,label,split' for a split column)."
        )
    width = max(path_col, label_col, split_col or 0) + 1
    entries = []
    for line, row in rows:
        if len(row) < width or not row[path_col] or not row[label_col]:
            raise ValueError(f"load_data: {path} line {line} ({','.join(row)!r}) needs a path and a label.")
        split = UNSPLIT
        if split_col is not None:
            split = SPLIT_FOLDERS.get(row[split_col].lower())
            if split is None:
                raise ValueError(
                    f"load_data: {path} line {line}: split {row[split_col]!r} must be one of "
                    f"{', '.join(SPLIT_FOLDERS)}."
                )
        file = os.path.normpath(os.path.join(folder, os.path.expanduser(row[path_col])))
        entries.append((file, row[label_col], split, line))
    if not entries:
        raise ValueError(f"load_data: {path} has a header but no rows; write one 'path,label' row per image.")
    return entries, split_col is not None


def _one_row_per_file(entries, path: str):
    """Keeps the first row of each file (by normalized absolute path); returns (rows, rows dropped).

    A file listed twice would be counted twice, and could land in both the training and a held-out
    split; two rows of one file with different labels or splits are an error naming both lines.
    """
    first: dict[str, tuple] = {}
    kept = []
    for entry in entries:
        file, label, split, line = entry
        key = os.path.normcase(file)
        if key not in first:
            first[key] = entry
            kept.append(entry)
            continue
        _, label0, split0, line0 = first[key]
        if label != label0:
            raise ValueError(
                f"load_data: {path} lines {line0} and {line} both list {file}, with the labels "
                f"{label0!r} and {label!r}; keep one row per image, with its label."
            )
        if split != split0:
            raise ValueError(
                f"load_data: {path} lines {line0} and {line} put {file} in both the {split0} and "
                f"the {split} split; keep one row per image, so held-out images are never trained on."
            )
    return kept, len(entries) - len(kept)


def _class_index(labels: list[str], where: str, lines=None):
    """Class names and the label -> index map: integers 0..N-1 as they are, names sorted.

    Integer labels must be the class indices 0..N-1 with every class present: a gap (a typo such
    as 99999) is an error naming the label and the line (``lines``: the line of each label).
    """
    unique = sorted(set(labels))
    if all(re.fullmatch(r"[+-]?\d+", label) for label in unique):
        first_at: dict[int, str] = {}
        for label, line in zip(labels, lines if lines is not None else repeat(None)):
            first_at.setdefault(int(label), f"line {line}" if line is not None else "")
        _check_class_indices(first_at, where)
        return [str(i) for i in range(len(first_at))], {label: int(label) for label in unique}
    return unique, {label: i for i, label in enumerate(unique)}


def _check_class_indices(first_at: dict[int, str], where: str) -> None:
    """Raises unless the integer labels (keys; values say where each first occurs, e.g. "line 7")
    are exactly 0..N-1: N distinct labels with a gap mean a typo, and would make a class per missing
    index (label 99999: 100,000 outputs and a confusion matrix of 10^10 cells)."""
    values = sorted(first_at)
    at = {v: f" ({first_at[v]})" if first_at[v] else "" for v in values}
    if values and values[0] < 0:
        raise ValueError(
            f"load_data: {where} has a negative label {values[0]}{at[values[0]]}; integer labels are "
            f"class indices 0..N-1."
        )
    n = len(values)
    if not values or values[-1] == n - 1:
        return
    outside = [v for v in values if v >= n]
    missing = sorted(set(range(n)) - set(values))
    named = ", ".join(f"{v}{at[v]}" for v in outside[:5])
    named += f" and {len(outside) - 5} more" if len(outside) > 5 else ""
    if values == list(range(1, n + 1)):
        fix = "the labels start at 1; number the classes from 0 (subtract 1 from every label)"
    else:
        fix = f"{outside[0]} looks like a typo"
    raise ValueError(
        f"load_data: {where} has label {named}, but its {n} distinct labels leave class "
        f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''} without any example; "
        f"labels are class indices 0..N-1 with every class present (here 0..{n - 1}); {fix}."
    )


_NPZ_LAYOUTS = (("x", "y"), ("images", "labels"))


def _load_npz(path: str) -> _Loaded:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as err:
        raise ValueError(
            f"load_data: {path} holds Python objects ({err}); save plain arrays, e.g. "
            f"class_names as np.array(names, dtype=str)."
        ) from None
    keys = set(arrays)
    pairs = {}
    if {"x_train", "y_train"} <= keys:
        for split, (xk, yk) in {
            "train": ("x_train", "y_train"),
            "val": ("x_val", "y_val"),
            "test": ("x_test", "y_test"),
        }.items():
            for x_key, y_key in ((xk, yk), (xk.replace("val", "valid"), yk.replace("val", "valid"))):
                if x_key in keys and y_key in keys:
                    pairs[split] = (x_key, y_key)
                    break
    else:
        found = next((p for p in _NPZ_LAYOUTS if set(p) <= keys), None)
        if found is None:
            raise ValueError(
                f"load_data: {path} has arrays {', '.join(sorted(keys)) or 'none'}; it needs x and y, "
                f"images and labels, or x_train, y_train, x_test, y_test (and optionally x_val, y_val)."
            )
        pairs[UNSPLIT] = found
    splits, shape = {}, None
    for split, (x_key, y_key) in pairs.items():
        images = _as_uint8_images(arrays[x_key], f"{path}[{x_key}]")
        labels = _as_labels(arrays[y_key], f"{path}[{y_key}]")
        if len(images) != len(labels):
            raise ValueError(
                f"load_data: {path}: {x_key} has {len(images)} images but {y_key} has {len(labels)} labels."
            )
        if shape is not None and images.shape[1:] != shape:
            raise ValueError(f"load_data: {path}: {x_key} images are {images.shape[1:]} but the others are {shape}.")
        shape = images.shape[1:]
        splits[split] = Split(split, labels, images=images, index=np.arange(len(labels)), part=split)
    return _Loaded(_npz_class_names(path, arrays, pairs, splits), splits, [], tuple(int(d) for d in shape))


def _npz_class_names(path: str, arrays: dict, pairs: dict, splits: dict[str, Split]) -> list[str]:
    """The class names: the ``class_names`` array (every label below its length, and no more names
    than examples), else "0".."N-1" for labels that are exactly 0..N-1."""
    total = sum(len(s) for s in splits.values())
    if "class_names" in arrays:
        class_names = [str(n) for n in np.asarray(arrays["class_names"]).reshape(-1)]
        top = max((int(s.labels.max()) for s in splits.values() if len(s)), default=-1)
        if top >= len(class_names):
            raise ValueError(
                f"load_data: {path} has label {top} but only {len(class_names)} class_names; labels are "
                f"indices into class_names."
            )
        if len(class_names) > total:
            raise ValueError(
                f"load_data: {path} has {len(class_names):,} class_names but only {total:,} images; keep "
                f"the names of the classes it has."
            )
        return class_names
    first_at: dict[int, str] = {}
    for split, (_, y_key) in pairs.items():
        values, where = np.unique(splits[split].labels, return_index=True)
        for value, i in zip(values.tolist(), where.tolist()):
            first_at.setdefault(value, f"{y_key}[{i}]")
    _check_class_indices(first_at, path)
    return [str(i) for i in range(len(first_at))]


def _as_uint8_images(x: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W[, C]) images of any usual dtype as uint8 (N, H, W, C); NaN, infinite or out-of-range
    pixels and images of zero size are errors (a guess would train on made-up pixels)."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"load_data: {where} has shape {x.shape}; images must be (N, height, width) or "
            f"(N, height, width, channels) with 1, 3 or 4 channels."
        )
    if 0 in x.shape[1:3]:
        raise ValueError(
            f"load_data: {where} has shape {x.shape}: images of zero size; each image needs at least "
            f"one row and one column of pixels."
        )
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.uint16:
        return (x.astype(np.float32) / 257.0).round().astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        if not x.size:
            return x.astype(np.uint8)
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if not finite.all():
            raise ValueError(
                f"load_data: {where} has NaN or infinite pixels in {int((~finite).sum())} images (the "
                f"first: image {int(np.argmin(finite))}); fix or drop them before saving the .npz."
            )
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"load_data: {where} has pixel values {low:g}..{high:g}; float images must be in 0..1 or "
                f"0..255 (undo any normalization before saving)."
            )
        scale = 255.0 if high <= 1.0 else 1.0
        return np.clip(x * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"load_data: {where} has values {x.min()}..{x.max()}; integer images must be in 0..255.")
        return x.astype(np.uint8)
    raise ValueError(f"load_data: {where} has dtype {x.dtype}; images must be uint8 (or floats, uint16).")


def _as_labels(y: np.ndarray, where: str) -> np.ndarray:
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == np.bool_):
        raise ValueError(
            f"load_data: {where} has dtype {y.dtype}; labels are class indices 0..N-1 "
            f"(keep the names in a class_names array)."
        )
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot rows
        y = y.argmax(axis=1)
    y = y.reshape(-1)
    if y.size and np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ValueError(f"load_data: {where} has fractional, NaN or infinite labels; labels are class indices 0..N-1.")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"load_data: {where} has a negative label {y.min()}; labels are class indices 0..N-1.")
    return y


_TFDS_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def _load_tfds(source: str, fractions, seed, data_dir, progress) -> DataSource:
    """A prepared TFDS dataset; never downloads."""
    name = source[len("tfds:") :].strip()
    if not name:
        raise ValueError("load_data: give the dataset after 'tfds:', e.g. 'tfds:mnist'.")
    builder = _tfds_builder(name, data_dir)
    info = builder.info
    image_key, label_key, class_names, image_shape = _tfds_features(info, name)
    splits = {}
    for tfds_split in info.splits:
        split = _TFDS_SPLITS.get(tfds_split)
        if split is None or split in splits:
            continue
        labels = _tfds_labels(builder, tfds_split, image_key, label_key, progress)
        dataset = builder.as_dataset(split=tfds_split, shuffle_files=False, as_supervised=True)
        key = f"tfds:{info.full_name}:{tfds_split}"
        splits[split] = Split(split, labels, dataset=dataset, key=key)
    if not splits:
        raise ValueError(
            f"load_data: TFDS dataset {name!r} has splits {', '.join(info.splits)} but none of train, validation, test."
        )
    if "train" not in splits:
        raise ValueError(f"load_data: TFDS dataset {name!r} has no train split ({', '.join(info.splits)}).")
    splits = _complete_splits(splits, fractions, seed, source)
    return DataSource(source, class_names, splits, [], image_shape, None)


def _tfds_builder(name: str, data_dir):
    """The dataset's TFDS builder, or FileNotFoundError with how to prepare it offline when it is not prepared."""
    import tensorflow_datasets as tfds

    where = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    how = (
        f"On a machine with internet, run `tfds build {name.split(':')[0]} --data_dir DIR` (or "
        f"tfds.builder({name.split(':')[0]!r}, data_dir=DIR).download_and_prepare()), then copy DIR's "
        f"{name.split('/')[0].split(':')[0]}/ folder into {where} (or pass data_dir=DIR)."
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"load_data: TFDS dataset {name!r} is not prepared in {where} (and ktoolkit never downloads). {how}"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"load_data: TFDS dataset {name!r} is not prepared in {builder.data_dir} (and "
            f"ktoolkit never downloads). {how}"
        )
    return builder


def _tfds_features(info, name: str):
    """(image key, label key, class names, image shape or None) of an image classification dataset."""
    if not info.supervised_keys or len(info.supervised_keys) != 2:
        raise ValueError(
            f"load_data: TFDS dataset {name!r} has no (image, label) supervised keys, so it is not an "
            f"image classification dataset."
        )
    image_key, label_key = info.supervised_keys
    label_feature = info.features[label_key]
    if not hasattr(label_feature, "names"):
        raise ValueError(f"load_data: TFDS dataset {name!r}: {label_key} is not a class label.")
    class_names = list(label_feature.names)
    image_feature = info.features[image_key]
    shape = tuple(getattr(image_feature, "shape", ()) or ())
    image_shape = tuple(int(d) for d in shape) if len(shape) == 3 and all(d is not None for d in shape) else None
    return image_key, label_key, class_names, image_shape


def _tfds_labels(builder, tfds_split: str, image_key: str, label_key: str, progress: bool) -> np.ndarray:
    """The labels of one TFDS split, in order; the images are read but not decoded."""
    import tensorflow_datasets as tfds
    from tqdm.auto import tqdm

    labels_ds = builder.as_dataset(
        split=tfds_split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()}
    )
    labels = []
    with tqdm(
        total=builder.info.splits[tfds_split].num_examples,
        desc=f"reading {tfds_split} labels",
        unit="example",
        disable=not progress,
        leave=False,
    ) as bar:
        for batch in labels_ds.map(lambda ex: ex[label_key]).batch(4096):
            labels.append(batch.numpy())
            bar.update(len(labels[-1]))
    return np.concatenate(labels) if labels else np.zeros(0, np.int64)
