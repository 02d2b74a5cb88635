"""A run's split, recorded by content: the run folder's ``splits.json``.

Training writes it (:func:`record`, :func:`write`): for folder and CSV sources every example of
every split as its path relative to the data's absolute root, its size, the SHA-256 of its bytes
and its label; for an .npz file the file's absolute path and SHA-256 and the rows of each split;
for TFDS the split keys. Evaluation and export read it back (:func:`load_recorded`) instead of
splitting whatever files are there now, so a held-out image stays held out: the working directory
and a trailing slash do not matter, files added since training are ignored, and a file whose bytes
changed (or that now equals a training image) is left out and counted.

    source, verification = load_recorded(Run("runs/resnet"))
    verification.check(["test"], "evaluating")   # one warning with the counts, or a ValueError

:func:`data_for_run` is the policy evaluate and export share: the recorded split for the run's own
data, a recomputed one (with a warning) for runs made before splits.json existed, and other data
whole or split anew, without the images this run trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import stat as stat_mode
from dataclasses import dataclass

import numpy as np

from ktoolkit.data.scan import file_hash, hash_files
from ktoolkit.data.sources import SPLITS, DataSource, Split

logger = logging.getLogger(__name__)

#: File name in the run folder.
FILE = "splits.json"
FORMAT = 1
# A splits.json from someone else's run folder is read whole: refuse one too large to read safely
# (about 2 million examples; evaluate such data with --data instead).
MAX_BYTES = 256 * 2**20
_COLUMNS = ["path", "size", "sha256", "label"]
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Verification:
    """What :func:`load_recorded` found, per recorded split: recorded, unchanged, changed, missing.

    Attributes:
        file: the splits.json that was read.
        root: the data's root (folder of images, CSV's folder, .npz or TFDS name).
        counts: ``{"test": {"recorded": 180, "unchanged": 177, "changed": 2, "missing": 1}, ...}``
            for the splits that were verified.
    """

    file: str
    root: str
    counts: dict

    def check(self, splits, doing: str = "evaluating") -> None:
        """One warning when some of ``splits``' images changed or vanished; a ValueError when all did.

        Args:
            splits: split names (those that were not recorded are skipped).
            doing: what is done with the unchanged images, for the message ("evaluating").

        Raises:
            ValueError: every recorded image of ``splits`` changed or is missing.
        """
        rows = [self.counts[s] for s in splits if s in self.counts]
        total = {k: sum(r[k] for r in rows) for k in ("recorded", "unchanged", "changed", "missing")}
        if not rows or total["unchanged"] == total["recorded"]:
            return
        names = " and ".join(s for s in splits if s in self.counts)
        if total["unchanged"] == 0:
            raise ValueError(
                f"all {total['recorded']} {names} images recorded in {self.file} changed "
                f"({total['changed']}) or are missing ({total['missing']}) under {self.root}; restore "
                f"them, or pass --data with another folder of the same classes (the images this run "
                f"trained on are left out of it by content)."
            )
        logger.warning(
            "%d of %d %s images changed or are missing since training (%d changed, %d missing, under %s); "
            "%s the %d unchanged ones",
            total["recorded"] - total["unchanged"],
            total["recorded"],
            names,
            total["changed"],
            total["missing"],
            self.root,
            doing,
            total["unchanged"],
        )


def record(source: DataSource) -> dict:
    """The exact examples of every split of ``source``, by content, as splits.json holds them.

    Path splits without hashes (made by hand, not by :func:`load_data`) are hashed here. An .npz
    split without row indices, or a TFDS source without its split settings, cannot be rebuilt:
    the record then says ``"kind": "none"`` and readers fall back to recomputing the split.
    """
    kinds = {split.kind for split in source.splits.values()}
    base = {
        "format": FORMAT,
        "source": str(source.origin),
        "class_names": list(source.class_names),
        "settings": dict(source.settings),
    }
    if kinds == {"paths"}:
        return {**base, **_record_paths(source)}
    if (
        kinds == {"images"}
        and os.path.isfile(source.origin)
        and all(s.index is not None for s in source.splits.values())
    ):
        path = os.path.abspath(source.origin)
        return {
            **base,
            "kind": "images",
            "path": path,
            "size": os.path.getsize(path),
            "sha256": file_hash(path),
            "splits": {name: {"part": s.part, "indices": s.index.tolist()} for name, s in source.splits.items()},
        }
    if kinds == {"dataset"} and source.settings:
        return {
            **base,
            "kind": "dataset",
            "path": str(source.origin),
            "splits": {name: {"key": s.key, "count": len(s)} for name, s in source.splits.items()},
        }
    return {**base, "kind": "none", "splits": {}}


def _record_paths(source: DataSource) -> dict:
    origin = os.path.abspath(os.path.expanduser(str(source.origin)))
    root = origin if os.path.isdir(origin) else os.path.dirname(origin)
    splits = {}
    for name, split in source.splits.items():
        hashes = split.hashes
        if hashes is None:
            found, errors = hash_files([os.path.abspath(p) for p in split.paths])
            if errors:
                raise ValueError(
                    f"cannot record the {name} split: {len(errors)} files are unreadable, e.g. {next(iter(errors))}."
                )
            hashes = [found[os.path.abspath(p)] for p in split.paths]
        rows = []
        for path, digest, label in zip(split.paths, hashes, split.labels.tolist()):
            path = os.path.abspath(path)
            rows.append([_relative(path, root), os.path.getsize(path), digest, int(label)])
        splits[name] = rows
    return {"kind": "paths", "path": origin, "root": root, "columns": list(_COLUMNS), "splits": splits}


def _relative(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:  # another drive (Windows): keep it absolute
        return path


def write(path, doc: dict):
    """Writes ``doc`` atomically, one example per line (readable, and a third of indented JSON's size)."""
    from ktoolkit.io import write_text

    lines = ["{"]
    for key, value in doc.items():
        if key != "splits":
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines.append('  "splits": {')
    names = list(doc["splits"])
    for n, name in enumerate(names):
        value = doc["splits"][name]
        end = "," if n < len(names) - 1 else ""
        if isinstance(value, list):
            rows = ",\n".join(f"      {json.dumps(row)}" for row in value)
            body = f"[\n{rows}\n    ]" if value else "[]"
            lines.append(f"    {json.dumps(name)}: {body}{end}")
        else:
            lines.append(f"    {json.dumps(name)}: {json.dumps(value)}{end}")
    lines += ["  }", "}"]
    return write_text(path, "\n".join(lines) + "\n")


def read(run) -> dict | None:
    """The run's splits.json, checked; None when there is none (or it records nothing rebuildable).

    Raises:
        ValueError: the file is too large, not JSON, or not a splits.json of this format.
    """
    path = _file(run)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    if size > MAX_BYTES:
        raise ValueError(
            f"{path} is {size / 2**20:.0f} MiB, more than a splits.json of {MAX_BYTES // 2**20} MiB that "
            f"ktoolkit reads; pass --data to choose the images."
        )
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        _validate(doc)
    except (ValueError, TypeError, KeyError, RecursionError) as err:
        why = str(err) if len(str(err)) <= 200 else str(err)[:200] + "..."
        raise ValueError(f"{path} is not a valid splits.json ({why}); pass --data to choose the images.") from None
    return None if doc["kind"] == "none" else doc


def _file(run) -> str:
    splits = getattr(run, "splits", None)
    return os.fspath(splits if splits is not None else os.path.join(os.fspath(getattr(run, "root", run)), FILE))


def _validate(doc) -> None:
    """Raises ValueError (TypeError, KeyError) unless ``doc`` has the shape :func:`record` gives."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {FORMAT}")
    names = doc["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("class_names must be a list of strings")
    if not isinstance(doc["source"], str) or not isinstance(doc.get("settings", {}), dict):
        raise TypeError("source must be a string and settings an object")
    kind, splits = doc["kind"], doc["splits"]
    if kind not in ("paths", "images", "dataset", "none") or not isinstance(splits, dict):
        raise ValueError(f"kind {kind!r}")
    if set(splits) - set(SPLITS):
        raise ValueError(f"splits {sorted(splits)}")
    if kind == "paths":
        if not isinstance(doc["root"], str) or not os.path.isabs(doc["root"]):
            raise ValueError("root must be an absolute path")
        for name, rows in splits.items():
            if not isinstance(rows, list):
                raise TypeError(f"the {name} split must be a list of rows")
            for row in rows:
                rel, size, digest, label = row
                if not (
                    isinstance(rel, str)
                    and "\0" not in rel
                    and isinstance(size, int)
                    and isinstance(digest, str)
                    and _HEX64.fullmatch(digest)
                    and isinstance(label, int)
                    and 0 <= label < len(names)
                ):
                    raise ValueError(f"bad {name} row {row!r}")
    elif kind == "images":
        if not isinstance(doc["path"], str) or not isinstance(doc["size"], int) or not _HEX64.fullmatch(doc["sha256"]):
            raise ValueError("path, size and sha256 of the .npz")
        for name, entry in splits.items():
            indices = entry["indices"]
            if not (
                isinstance(entry["part"], str)
                and isinstance(indices, list)
                and all(isinstance(i, int) and i >= 0 for i in indices)
            ):
                raise ValueError(f"bad {name} entry")
    elif kind == "dataset":
        for name, entry in splits.items():
            if not isinstance(entry["key"], str) or not isinstance(entry["count"], int):
                raise TypeError(f"bad {name} entry")


def same_source(doc: dict, data) -> bool:
    """Whether ``data`` (a --data value) is the recorded source: the same folder, CSV or .npz file
    wherever it is written from (relative, trailing slash, symlink), or the same TFDS name."""
    data = os.fspath(data)
    if doc["kind"] == "dataset" or data.startswith("tfds:"):
        return data.strip() == str(doc["source"]).strip()
    return _real(data) == _real(doc["path"])


def _real(path) -> str:
    return os.path.normcase(os.path.realpath(os.path.expanduser(os.fspath(path))))


def load_recorded(run, *, splits=None, progress: bool = False, doc: dict | None = None):
    """Rebuilds the run's split from its splits.json alone, keeping only the examples that are unchanged.

    Files are found from the recorded absolute root (the working directory does not matter), and
    each one's size and SHA-256 must still be the recorded ones; files added to the data since
    training are never seen. A held-out file whose bytes now equal a training file's is left out
    too. Report the counts with :meth:`Verification.check`.

    Args:
        run: a :class:`ktoolkit.runs.Run` (or its folder).
        splits: names of the splits to verify and return (default: every recorded split); evaluating
            the test split need not read the training images.
        progress: a progress bar while hashing.
        doc: the splits.json already read by :func:`read`.

    Returns:
        (a :class:`DataSource` with the unchanged examples of ``splits``, a :class:`Verification`).

    Raises:
        FileNotFoundError: the run has no splits.json.
        ValueError: the splits.json is not valid.
    """
    doc = doc if doc is not None else read(run)
    if doc is None:
        raise FileNotFoundError(
            f"{_file(run)} does not exist (or records no split); the run was made by an older "
            f"ktoolkit or from data it cannot record."
        )
    wanted = [s for s in doc["splits"] if splits is None or s in splits]
    builder = {"paths": _rebuild_paths, "images": _rebuild_npz, "dataset": _rebuild_tfds}[doc["kind"]]
    rebuilt, counts = builder(doc, wanted, progress)
    source = DataSource(
        str(doc["source"]),
        list(doc["class_names"]),
        {k: v for k, v in rebuilt.items() if len(v)},
        settings=dict(doc.get("settings") or {}),
    )
    return source, Verification(_file(run), str(doc.get("root") or doc["path"]), counts)


def _rebuild_paths(doc: dict, wanted, progress: bool):
    root = doc["root"]
    rows = {name: doc["splits"][name] for name in wanted}
    files = {name: [os.path.normpath(os.path.join(root, r[0])) for r in split] for name, split in rows.items()}
    regular = set()
    for path in {p for paths in files.values() for p in paths}:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat_mode.S_ISREG(st.st_mode):  # a device or pipe is never read (it could block or never end)
            regular.add((path, st.st_size))
    sizes = dict(regular)
    to_hash = sorted({p for name in rows for p, r in zip(files[name], rows[name]) if sizes.get(p) == r[1]})
    hashes, _ = hash_files(to_hash, progress=progress)
    trained = {r[2] for r in doc["splits"].get("train", ())}
    rebuilt, counts = {}, {}
    for name in wanted:
        keep, changed, missing = [], 0, 0
        for i, (path, (_, _size, digest, _label)) in enumerate(zip(files[name], rows[name])):
            if path not in sizes:
                missing += 1
            elif hashes.get(path) != digest or (name != "train" and digest in trained):
                changed += 1
            else:
                keep.append(i)
        labels = np.array([rows[name][i][3] for i in keep], np.int64)
        rebuilt[name] = Split(
            name, labels, paths=[files[name][i] for i in keep], hashes=[rows[name][i][2] for i in keep], part=name
        )
        counts[name] = {"recorded": len(rows[name]), "unchanged": len(keep), "changed": changed, "missing": missing}
    return rebuilt, counts


def _rebuild_npz(doc: dict, wanted, progress: bool):
    from ktoolkit.data.sources import _load_npz

    path = doc["path"]
    recorded = {name: len(doc["splits"][name]["indices"]) for name in wanted}
    try:
        st = os.stat(path)
        same = stat_mode.S_ISREG(st.st_mode) and st.st_size == doc["size"] and file_hash(path) == doc["sha256"]
    except OSError:
        return {}, {n: {"recorded": c, "unchanged": 0, "changed": 0, "missing": c} for n, c in recorded.items()}
    if not same:
        return {}, {n: {"recorded": c, "unchanged": 0, "changed": c, "missing": 0} for n, c in recorded.items()}
    loaded = _load_npz(path)
    if loaded.class_names != doc["class_names"]:
        raise ValueError(
            f"{path} is the recorded file but its class names changed; the splits.json is not this file's."
        )
    rebuilt = {}
    for name in wanted:
        entry = doc["splits"][name]
        part = loaded.splits.get(entry["part"])
        if part is None or (entry["indices"] and max(entry["indices"]) >= len(part)):
            raise ValueError(f"the splits.json's {name} split names rows {entry['part']!r} that {path} does not have.")
        rebuilt[name] = part.subset(entry["indices"], name)
    return rebuilt, {n: {"recorded": c, "unchanged": c, "changed": 0, "missing": 0} for n, c in recorded.items()}


def _rebuild_tfds(doc: dict, wanted, progress: bool):
    from ktoolkit.data.sources import load_data

    settings = doc.get("settings") or {}
    source = load_data(
        str(doc["source"]),
        val_fraction=settings.get("val_fraction", 0.1),
        test_fraction=settings.get("test_fraction", 0.1),
        seed=settings.get("seed", 0),
        data_dir=settings.get("data_dir"),
        progress=progress,
    )
    rebuilt, counts = {}, {}
    for name in wanted:
        entry, split = doc["splits"][name], source.splits.get(name)
        same = split is not None and split.key == entry["key"] and len(split) == entry["count"]
        if same:
            rebuilt[name] = split
        counts[name] = {
            "recorded": entry["count"],
            "unchanged": entry["count"] if same else 0,
            "changed": 0 if same else entry["count"],
            "missing": 0,
        }
    return rebuilt, counts


def leave_out_training(source: DataSource, doc: dict, *, splits=None) -> tuple[DataSource, int]:
    """``source`` without the files whose bytes are those of a training image of the recorded run.

    Args:
        source: other data (a :func:`load_data` result).
        doc: the run's splits.json (:func:`read`).
        splits: the splits of ``source`` to clean (default: all of them).

    Returns:
        (the cleaned source, without splits left empty; how many files were left out).
    """
    trained = {row[2] for row in doc["splits"].get("train", ())} if doc["kind"] == "paths" else set()
    if not trained:
        return source, 0
    cleaned, left_out = {}, 0
    for name, split in source.splits.items():
        if split.kind != "paths" or (splits is not None and name not in splits):
            cleaned[name] = split
            continue
        hashes = split.hashes
        if hashes is None:
            found, _ = hash_files([os.path.abspath(p) for p in split.paths])
            hashes = [found.get(os.path.abspath(p)) for p in split.paths]
        keep = [i for i, digest in enumerate(hashes) if digest not in trained]
        left_out += len(split) - len(keep)
        if keep:
            cleaned[name] = split.subset(keep) if len(keep) < len(split) else split
    return dataclasses.replace(source, splits=cleaned), left_out


@dataclass
class RunData:
    """The data a run's model is evaluated or exported on.

    Attributes:
        source: the :class:`DataSource`.
        own: the run's own data, split as in training (recorded, or recomputed for an older run).
        verification: what :func:`load_recorded` found (None when the split was not read from splits.json).
    """

    source: DataSource
    own: bool
    verification: Verification | None = None


def data_for_run(
    run,
    data=None,
    *,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    exclude=None,
    verify=None,
    progress: bool = False,
) -> RunData:
    """The data to evaluate or export a run's model on, held out as in training.

    * No ``data``, or ``data`` that is the recorded source: the split recorded in splits.json,
      unchanged files only (see :func:`load_recorded`; call ``verification.check``).
    * A run without splits.json (an older ktoolkit): the split recomputed from config.yaml's settings
      and the files there now, with a warning that it cannot be verified.
    * Other data: loaded with ``val_fraction``/``test_fraction`` (0, 0: whole), and the files that
      are this run's training images left out of the ``exclude`` splits (default all), with a warning.

    Args:
        run: the :class:`ktoolkit.runs.Run`, or None for a model file outside a run folder.
        data: the --data value, or None.
        val_fraction, test_fraction: how other data is split.
        exclude: splits of other data to remove the run's training images from (None: all).
        verify: the recorded splits to verify and return (None: all).
        progress: progress bars.

    Raises:
        ValueError: no data given and none recorded, or a bad splits.json.
    """
    from ktoolkit.data.sources import load_data

    doc = read(run) if run is not None else None
    if doc is not None and (data is None or same_source(doc, data)):
        source, verification = load_recorded(run, splits=verify, progress=progress, doc=doc)
        return RunData(source, True, verification)
    config = run.data_settings() if run is not None else None
    if data is None:
        if config is None or not config.data:
            where = run.root if run is not None else "the model"
            raise ValueError(f"{where} records no data (no splits.json or config.yaml); pass --data.")
        data = config.data
    if doc is None and config is not None and config.data and _same_path(data, config.data):
        return _recomputed_split(run, data, config, progress)
    source = load_data(data, val_fraction=val_fraction, test_fraction=test_fraction, progress=progress)
    if doc is not None:
        source, left_out = leave_out_training(source, doc, splits=exclude)
        if left_out:
            logger.warning("%d images of data=%s (--data) were training images of this run; left out", left_out, data)
    return RunData(source, False)


def _recomputed_split(run, data, config, progress: bool) -> RunData:
    """A run without splits.json: its split made again from config.yaml's settings and the files there now."""
    from ktoolkit.data.sources import load_data

    logger.warning(
        "%s has no splits.json recording its split (it was made by an older ktoolkit), so the split is "
        "recomputed from the files in %s now and cannot be verified: images added or changed since "
        "training can be in the held-out split",
        run.root,
        data,
    )
    source = load_data(
        data,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        data_dir=config.data_dir,
        progress=progress,
    )
    return RunData(source, True)


def _same_path(a, b) -> bool:
    a, b = os.fspath(a), os.fspath(b)
    if a.startswith("tfds:") or b.startswith("tfds:"):
        return a.strip() == b.strip()
    return a.rstrip("/\\") == b.rstrip("/\\") or _real(a) == _real(b)
