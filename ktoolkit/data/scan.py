"""Checking image files before training: every file is decoded once and each bad one is reported by path.

A file is good when TensorFlow's ``tf.io.decode_image`` (the decoder of the training pipeline)
decodes it. Pillow reads each header first (format, colour mode, size, and a clear reason for
files that are not images at all); TensorFlow then decodes every candidate in a parallel
``tf.data`` pass. Both are needed: Pillow accepts PNGs with a bad chunk checksum or no ``IEND``
and BMPs with trailing bytes, which TensorFlow refuses; TensorFlow's own messages ("jpeg::Uncompress
failed") are poor reasons, so a failing file is re-read with Pillow to say why in words.

Every file is read once for its SHA-256 (:func:`hash_files`): the hash keys the verdict cache
and is what :func:`~ktoolkit.data.load_data` deduplicates by and a run's ``splits.json`` records.
Verdicts are cached in ``$KTOOLKIT_CACHE_DIR`` (default ``~/.cache/ktoolkit``), one small JSON
file per image folder, keyed by file name, size and content hash, so scanning the same 4,000
files again takes a fraction of a second, and a file rewritten in place (even with its old size
and modification time restored) is checked again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat as stat_mode
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: Formats ``tf.io.decode_image`` decodes (GIF: the first frame).
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
#: Folder names of a pre-split dataset and the split each one is.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
#: Name of the one "split" of a folder that is not split (one subfolder per class).
UNSPLIT = "all"
# Files that operating systems drop into folders; skipped like dotfiles (.DS_Store, ._x.jpg).
_JUNK = {"thumbs.db", "desktop.ini"}
_CACHE_FORMAT = 2  # 2: keyed by size and SHA-256 (1: size and modification time)
# Bytes read at a time when hashing: bounded memory whatever the file size.
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class BadFile:
    """A file that cannot be used for training, and why (e.g. "empty file (0 bytes)")."""

    path: str
    reason: str

    def __str__(self):
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Verdict:
    """What checking one file found: ``reason`` is None for a good image."""

    reason: str | None
    format: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None  # (width, height), as Pillow gives it

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class CheckResult:
    """Verdicts for a list of files (by absolute path), their SHA-256 (hex, by absolute path, for every
    regular file that could be read), and how many verdicts were computed or cached."""

    verdicts: dict[str, Verdict]
    checked: int = 0
    cached: int = 0
    hashes: dict[str, str] = field(default_factory=dict)


def cache_dir() -> str:
    """The folder of ktoolkit's caches: ``$KTOOLKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ktoolkit``,
    else ``~/.cache/ktoolkit``."""
    if os.environ.get("KTOOLKIT_CACHE_DIR"):
        return os.environ["KTOOLKIT_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ktoolkit")


def is_hidden(name: str) -> bool:
    """Dotfiles and OS junk files (``.DS_Store``, ``Thumbs.db``) are skipped without a report."""
    return name.startswith(".") or name.lower() in _JUNK


def check_images(paths, *, progress: bool = False, use_cache: bool = True) -> CheckResult:
    """Checks that each file is an image the training pipeline can decode.

    Every file is hashed first (one read); the verdict cache is keyed by size and hash, so only new
    or changed content is decoded again. Devices, pipes and sockets are bad files (reading one could
    block or never end).

    Args:
        paths: file paths (relative paths are taken from the current folder).
        progress: show progress bars on stderr.
        use_cache: reuse verdicts cached for unchanged files and store the new ones.

    Returns:
        A :class:`CheckResult` whose ``verdicts`` maps each absolute path to its :class:`Verdict`
        and ``hashes`` each readable file to its SHA-256.
    """
    paths = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in paths))
    cache = _VerdictCache(cache_dir()) if use_cache else None
    verdicts: dict[str, Verdict] = {}
    stats: dict[str, os.stat_result] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            verdicts[path] = Verdict("missing: no such file")
            continue
        except OSError as err:
            verdicts[path] = Verdict(f"unreadable: {err.strerror or err}")
            continue
        if not stat_mode.S_ISREG(st.st_mode):
            verdicts[path] = Verdict("not a regular file (a device, pipe or socket)")
            continue
        stats[path] = st
    hashes, errors = hash_files(list(stats), progress=progress)
    todo = []
    for path in list(stats):
        if path in errors:
            verdicts[path] = Verdict(f"unreadable: {errors[path]}")
            del stats[path]
            continue
        cached = cache.get(path, stats[path], hashes[path]) if cache else None
        if cached is not None:
            verdicts[path] = cached
        else:
            todo.append(path)
    result = CheckResult(verdicts, checked=len(todo), cached=len(stats) - len(todo), hashes=hashes)
    if todo:
        _check(todo, stats, verdicts, progress)
        if cache:
            for path in todo:
                cache.put(path, stats[path], hashes[path], verdicts[path])
            cache.save()
    return result


def file_hash(path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(paths, *, progress: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """SHA-256 of many files, read in threads (hashlib and file reads release the GIL).

    Each thread takes a batch of files: one task per small file costs more than hashing it
    (4,317 JPEGs of 7 KB: 0.12 s in batches, 0.3-0.5 s with one task each, on 2 busy cores).

    Returns:
        ({path: hex digest}, {path: why it could not be read}) for the paths as given.
    """
    from tqdm.auto import tqdm

    def batch(chunk):
        found = []
        for path in chunk:
            try:
                found.append((path, file_hash(path), None))
            except OSError as err:
                found.append((path, None, err.strerror or str(err)))
        return found

    paths = list(paths)
    hashes, errors = {}, {}
    workers = min(8, 2 * (os.cpu_count() or 1))
    size = max(1, min(256, -(-len(paths) // workers)))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(paths), desc="hashing", unit="file", disable=not progress, leave=False) as bar,
    ):
        for found in pool.map(batch, chunks):
            for path, digest, error in found:
                if digest is None:
                    errors[path] = error
                else:
                    hashes[path] = digest
            bar.update(len(found))
    return hashes, errors


def _check(paths, stats, verdicts, progress):
    """Fills ``verdicts`` for ``paths``: Pillow headers in threads, then TensorFlow decodes."""
    from tqdm.auto import tqdm

    workers = min(8, 2 * (os.cpu_count() or 1))
    candidates = []
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(paths), desc="reading headers", unit="file", disable=not progress, leave=False) as bar,
    ):
        for path, verdict in zip(paths, pool.map(lambda p: _read_header(p, stats[p].st_size), paths)):
            verdicts[path] = verdict
            if verdict.ok:
                candidates.append(path)
            bar.update()
    if not candidates:
        return
    decoded = _decode_with_tensorflow(candidates, progress)
    for path in candidates:
        if path not in decoded:
            header = verdicts[path]
            verdicts[path] = Verdict(_why_undecodable(path), header.format, header.mode, header.size)


# Pillow's own decompression-bomb threshold: larger images are refused before anything decodes them.
MAX_PIXELS = 89_478_485


def _read_header(path: str, size: int) -> Verdict:
    from PIL import Image, UnidentifiedImageError

    if size == 0:
        return Verdict("empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            fmt, mode, dims = image.format, image.mode, tuple(image.size)
            animated = bool(getattr(image, "is_animated", False))
    except UnidentifiedImageError:
        return Verdict("not an image: cannot identify image file")
    except Exception as err:  # noqa: BLE001 - OSError, DecompressionBombError, SyntaxError: all mean a bad file
        return Verdict(_describe(err))
    if fmt not in FORMATS:
        return Verdict(f"unsupported format: {fmt} (TensorFlow decodes {', '.join(FORMATS)})", fmt, mode, dims)
    if fmt == "WEBP" and animated and mode != "RGBA":
        # TensorFlow 2.21 writes such a file's RGBA frames into an RGB buffer (memory corruption, a crash)
        return Verdict(
            "animated WebP without alpha: TensorFlow cannot decode it safely; save its first frame", fmt, mode, dims
        )
    if dims[0] * dims[1] > MAX_PIXELS:  # decoding it would take gigabytes (a decompression bomb, or a scan)
        return Verdict(f"too large: {dims[0]}x{dims[1]} pixels, over {MAX_PIXELS:,}; downsize it", fmt, mode, dims)
    return Verdict(None, fmt, mode, dims)


def _decode_with_tensorflow(paths, progress) -> set[str]:
    """Returns the paths ``tf.io.decode_image`` decodes, exactly as the training pipeline does."""
    import numpy as np
    import tensorflow as tf
    from tqdm.auto import tqdm

    def decode(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
        # Returning the shape keeps the decode from being pruned as unused.
        return index, tf.shape(image)

    # File names as bytes: a name that is not valid UTF-8 still reaches the file system unchanged.
    names = [os.fsencode(p) for p in paths]
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), names))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    # A file that fails to decode is dropped here; the missing paths are the bad ones.
    ds = ds.ignore_errors().batch(256)
    good = set()
    with tqdm(total=len(paths), desc="decoding", unit="file", disable=not progress, leave=False) as bar:
        for indices, _ in ds:
            good.update(paths[i] for i in indices.numpy())
            bar.update(len(indices))
        bar.update(len(paths) - bar.n)
    return good


def _why_undecodable(path: str) -> str:
    """A reason in words for a file TensorFlow could not decode."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001 - verify() raises SyntaxError for a bad PNG checksum
        return _describe(err)
    return _tensorflow_reason(path)


def _describe(err: Exception) -> str:
    """A reason for a Pillow error: truncated, unreadable (the OS refused) or corrupt."""
    message = str(err)
    if "truncat" in message.lower():
        return f"truncated: {message}"
    if isinstance(err, OSError) and err.errno is not None:
        return f"unreadable: {err.strerror or message}"
    return f"corrupt: {message}"


def _tensorflow_reason(path: str) -> str:
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
    except tf.errors.OpError as err:
        message = err.message.split("}}")[-1].strip().split(" [Op:")[0]
        return f"corrupt: TensorFlow cannot decode it ({message})"
    return "corrupt: TensorFlow cannot decode it"


class _VerdictCache:
    """Verdicts on disk, one JSON file per image folder: ``{name: [size, sha256, reason, ...]}``.

    A verdict is reused only for the same size and content hash (a modification time can be restored
    after a file is rewritten in place), and only when the Pillow and TensorFlow versions that made
    it are the installed ones.
    """

    def __init__(self, directory: str):
        self.directory = os.path.join(directory, "scan")
        self.decoders = _decoder_versions()
        self.shards: dict[str, dict] = {}
        self.touched: dict[str, set] = {}

    def _shard_file(self, folder: str) -> str:
        return os.path.join(self.directory, hashlib.sha1(os.fsencode(folder)).hexdigest()[:20] + ".json")

    def _shard(self, folder: str) -> dict:
        if folder not in self.shards:
            entries = {}
            try:
                with open(self._shard_file(folder), encoding="utf-8") as f:
                    data = json.load(f)
                if (
                    data.get("format") == _CACHE_FORMAT
                    and data.get("decoders") == self.decoders
                    and data.get("folder") == folder
                ):
                    entries = data["files"]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # no cache yet, or an unreadable one: check the files again
            self.shards[folder] = entries
        return self.shards[folder]

    def get(self, path: str, st, digest: str) -> Verdict | None:
        folder, name = os.path.split(path)
        entry = self._shard(folder).get(name)
        if not isinstance(entry, list) or len(entry) != 7 or entry[0] != st.st_size or entry[1] != digest:
            return None
        reason, fmt, mode, width, height = entry[2:7]
        return Verdict(reason, fmt, mode, None if width is None else (width, height))

    def put(self, path: str, st, digest: str, verdict: Verdict):
        folder, name = os.path.split(path)
        width, height = verdict.size or (None, None)
        self._shard(folder)[name] = [st.st_size, digest, verdict.reason, verdict.format, verdict.mode, width, height]
        self.touched.setdefault(folder, set()).add(name)

    def save(self):
        try:
            os.makedirs(self.directory, exist_ok=True)
            for folder, names in self.touched.items():
                entries = self.shards[folder]
                # Forget files that were deleted since they were cached.
                files = {n: e for n, e in entries.items() if n in names or os.path.exists(os.path.join(folder, n))}
                target = self._shard_file(folder)
                tmp = f"{target}.{os.getpid()}.tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump({"format": _CACHE_FORMAT, "decoders": self.decoders, "folder": folder, "files": files}, f)
                os.replace(tmp, target)
        except OSError as err:
            logger.warning(
                "Could not write the scan cache in %s (%s); the next scan checks every file again. "
                "Set KTOOLKIT_CACHE_DIR to a writable folder.",
                self.directory,
                err,
            )
        self.touched.clear()


def _decoder_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("pillow", "tensorflow"):
        try:
            found.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            found.append(f"{package}==?")
    return " ".join(found)


@dataclass
class ScanReport:
    """What :func:`scan_folder` found in a folder of images.

    Attributes:
        root: the folder scanned (absolute).
        layout: "classes" (one subfolder per class) or "splits" (train/val/test folders, each with
            one subfolder per class).
        images: good image paths by split, then by class folder: ``images["train"]["cat"]``; a folder
            that is not split has the one split ``"all"``. Class folders without a good image are
            there with an empty list.
        bad_files: every file that cannot be used, with the reason.
        ignored: files outside the class folders (not used); dotfiles and OS junk files are
            skipped without being listed.
        hashes: SHA-256 (hex) of each good image, by path (not in :meth:`to_dict`).
        checked: files opened and decoded by this scan.
        cached: files whose verdict came from the cache.
        seconds: how long the scan took.
        formats: number of good images per format ("JPEG", "PNG", ...).
        modes: number of good images per Pillow mode ("RGB", "L", "CMYK", "I;16", ...).
        min_size: smallest (width, height) of the good images (by area), None without images.
        max_size: largest (width, height) of the good images (by area).
    """

    root: str
    layout: str
    images: dict[str, dict[str, list[str]]]
    bad_files: list[BadFile] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    checked: int = 0
    cached: int = 0
    seconds: float = 0.0
    formats: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    hashes: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def splits(self) -> list[str]:
        return list(self.images)

    @property
    def class_names(self) -> list[str]:
        """Sorted class folders with at least one good image; empty class folders are left out,
        because a class without images cannot be learned (they are listed in ``empty_classes``)."""
        return sorted({c for by_class in self.images.values() for c, paths in by_class.items() if paths})

    @property
    def empty_classes(self) -> list[str]:
        """Class folders that hold no good image in any split (left out of ``class_names``)."""
        every = {c for by_class in self.images.values() for c in by_class}
        return sorted(every - set(self.class_names))

    @property
    def empty_folders(self) -> list[str]:
        """Class folders without a good image, relative to ``root`` (e.g. "test/cat")."""
        return [
            c if split == UNSPLIT else f"{split}/{c}"
            for split, by_class in self.images.items()
            for c, paths in by_class.items()
            if not paths
        ]

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Good images per split and class: ``{"train": {"cat": 120, ...}, ...}``."""
        return {s: {c: len(p) for c, p in sorted(by_class.items())} for s, by_class in self.images.items()}

    @property
    def class_counts(self) -> dict[str, int]:
        """Good images per class in the training data (the "train" split, or the whole folder)."""
        by_class = self.images.get("train", self.images.get(UNSPLIT, {}))
        return {c: len(by_class.get(c, ())) for c in self.class_names}

    @property
    def num_images(self) -> int:
        return sum(len(p) for by_class in self.images.values() for p in by_class.values())

    @property
    def imbalance(self) -> float | None:
        """Largest class count over smallest in the training data (1.0 is balanced); None without
        images, ``inf`` when a class has no training image."""
        counts = list(self.class_counts.values())
        if not counts or max(counts) == 0:
            return None
        return float("inf") if min(counts) == 0 else max(counts) / min(counts)

    @property
    def ok(self) -> bool:
        """No bad file, no empty class folder and no image under two classes."""
        return not self.bad_files and not self.empty_folders and not self.conflicts

    @property
    def duplicates(self) -> list[list[str]]:
        """Groups of good images with identical bytes (each group sorted, two or more paths)."""
        groups: dict[str, list[str]] = {}
        for by_class in self.images.values():
            for paths in by_class.values():
                for path in paths:
                    if path in self.hashes:
                        groups.setdefault(self.hashes[path], []).append(path)
        return sorted(sorted(g) for g in groups.values() if len(g) > 1)

    @property
    def conflicts(self) -> list[list[str]]:
        """Duplicate groups whose copies sit in different class folders: one image with two labels
        (training refuses them)."""
        return [g for g in self.duplicates if len({os.path.basename(os.path.dirname(p)) for p in g}) > 1]

    def format(self, max_bad: int = 50) -> str:
        """A human-readable report (several lines) for a terminal.

        Args:
            max_bad: list at most this many bad files (the count is always given).
        """
        lines = self._layout_lines() + self._content_lines() + self._problem_lines(max_bad)
        lines.append("OK" if self.ok else "Problems found (see above)")
        return "\n".join(lines)

    def _layout_lines(self) -> list[str]:
        """The summary line, the layout, and the table of images per class and split."""
        lines = [
            (
                f"{self.root}: {_plural(self.num_images, 'good image')} in {_plural(len(self.class_names), 'class')}, "
                f"{_plural(len(self.bad_files), 'bad file')} ({self.checked:,} checked, {self.cached:,} from the "
                f"cache, {self.seconds:.1f} s)"
            )
        ]
        if self.layout == "splits":
            lines.append(f"Layout: split folders {', '.join(self.splits)}, each with one folder per class")
        else:
            lines.append("Layout: one folder per class, not split (train/val/test are made by load_data)")
        counts = self.split_counts()
        names = sorted({c for by_class in counts.values() for c in by_class})
        if names:
            width = max(len(n) for n in names + ["class"])
            heads = ["images" if s == UNSPLIT else s for s in counts]
            lines.append("  ".join(["class".ljust(width)] + [h.rjust(7) for h in heads]))
            for name in names:
                lines.append("  ".join([name.ljust(width)] + [f"{counts[s].get(name, 0):7,}" for s in counts]))
        return lines

    def _content_lines(self) -> list[str]:
        """Class imbalance, file formats and modes, image sizes (the lines that apply)."""
        lines = []
        classes = self.class_counts
        if self.imbalance is not None and classes:
            big = max(classes, key=classes.get)
            small = min(classes, key=classes.get)
            lines.append(
                f"Imbalance: {self.imbalance:.2f} (largest {big} {classes[big]:,}, smallest {small} {classes[small]:,})"
            )
        if self.formats:
            lines.append(
                "Formats: "
                + ", ".join(f"{k} {v:,}" for k, v in sorted(self.formats.items()))
                + "; modes: "
                + ", ".join(f"{k} {v:,}" for k, v in sorted(self.modes.items()))
            )
        if self.min_size:
            lines.append(
                f"Sizes (width x height): {self.min_size[0]}x{self.min_size[1]} to "
                f"{self.max_size[0]}x{self.max_size[1]}"
            )
        return lines

    def _problem_lines(self, max_bad: int) -> list[str]:
        """Empty class folders, ignored files, duplicates, conflicting copies and bad files (those found)."""
        lines = []
        if self.empty_folders:
            lines.append(
                f"Empty class folders (no good image; classes without any are left out): "
                f"{', '.join(self.empty_folders)}"
            )
        if self.ignored:
            lines.append(
                f"Ignored {_plural(len(self.ignored), 'file')} outside the class folders: "
                + ", ".join(os.path.relpath(p, self.root) for p in self.ignored[:5])
                + (", ..." if len(self.ignored) > 5 else "")
            )
        if self.duplicates:
            same = len(self.duplicates) - len(self.conflicts)
            lines.append(
                f"Duplicates: {_plural(len(self.duplicates), 'image')} stored more than once"
                + (f" ({same:,} within one class: kept once when a split is made)" if same else "")
            )
        if self.conflicts:
            lines.append(
                f"Same image under two classes ({len(self.conflicts):,}; training refuses them, delete the wrong copy):"
            )
            lines.extend("  " + " = ".join(os.path.relpath(p, self.root) for p in g) for g in self.conflicts[:max_bad])
        if self.bad_files:
            lines.append(f"Bad files ({len(self.bad_files):,}, skipped by load_data; fix or delete them):")
            lines.extend(f"  {b}" for b in self.bad_files[:max_bad])
            if len(self.bad_files) > max_bad:
                lines.append(f"  ... and {len(self.bad_files) - max_bad:,} more")
        return lines

    def to_dict(self) -> dict:
        """The report as plain JSON-serializable values."""
        return {
            "root": self.root,
            "layout": self.layout,
            "class_names": self.class_names,
            "split_counts": self.split_counts(),
            "class_counts": self.class_counts,
            "num_images": self.num_images,
            "imbalance": self.imbalance if self.imbalance not in (None, float("inf")) else None,
            "empty_classes": self.empty_classes,
            "empty_folders": self.empty_folders,
            "bad_files": [{"path": b.path, "reason": b.reason} for b in self.bad_files],
            "ignored": list(self.ignored),
            "duplicates": self.duplicates,
            "conflicting_duplicates": self.conflicts,
            "formats": dict(self.formats),
            "modes": dict(self.modes),
            "min_size": list(self.min_size) if self.min_size else None,
            "max_size": list(self.max_size) if self.max_size else None,
            "checked": self.checked,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
        }


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}{'es' if noun.endswith('s') else 's'}"


def scan_folder(root, *, progress: bool = False, use_cache: bool = True) -> ScanReport:
    """Checks every file of an image folder once and reports bad files, class counts and balance.

    The folder holds one subfolder per class (``root/cat/1.jpg``), or split folders ``train``,
    ``val`` (or ``valid``/``validation``) and ``test`` that each hold one subfolder per class.
    Images in nested folders count for their class folder. Dotfiles and OS junk files are skipped
    silently; files outside the class folders are not used and are listed in ``ignored``. Every other file is
    decoded with the training pipeline's decoder; each one that fails (empty, not an image,
    unsupported format, truncated, corrupt, unreadable) is reported with its path and the reason.
    Grayscale, RGBA, CMYK, palette and 16-bit images are good: the pipeline converts them.

    Args:
        root: the folder.
        progress: show progress bars on stderr.
        use_cache: reuse the cached verdicts of unchanged files (see :func:`cache_dir`).

    Returns:
        A :class:`ScanReport`.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: ``root`` has no class folders, or mixes split folders with other folders.
    """
    start = time.perf_counter()
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"scan_folder: root={root!r} is not a folder; give a folder with one subfolder per class "
            f"(root/cat/1.jpg, root/dog/2.jpg)."
        )
    layout, folders, ignored = _find_class_folders(root)
    files: dict[str, dict[str, list[str]]] = {}
    for split, class_dirs in folders.items():
        files[split] = {}
        for name, directory in class_dirs.items():
            files[split][name] = _walk_files(directory)
    every = [p for by_class in files.values() for paths in by_class.values() for p in paths]
    result = check_images(every, progress=progress, use_cache=use_cache)
    report = ScanReport(root, layout, {}, ignored=sorted(ignored), checked=result.checked, cached=result.cached)
    _sort_verdicts(report, files, result)
    report.seconds = time.perf_counter() - start
    return report


def _sort_verdicts(report: ScanReport, files: dict, result) -> None:
    """Fills ``report`` from the verdicts of ``check_images``: the good images per split and class, the bad
    files with their reasons, the hashes, and the formats, modes and smallest/largest sizes of the good ones."""
    formats, modes, sizes = {}, {}, []
    for split, by_class in files.items():
        report.images[split] = {}
        for name, paths in by_class.items():
            good = []
            for path in paths:
                verdict = result.verdicts[path]
                if not verdict.ok:
                    report.bad_files.append(BadFile(path, verdict.reason))
                    continue
                good.append(path)
                report.hashes[path] = result.hashes[path]
                formats[verdict.format] = formats.get(verdict.format, 0) + 1
                modes[verdict.mode] = modes.get(verdict.mode, 0) + 1
                if verdict.size:
                    sizes.append(tuple(verdict.size))
            report.images[split][name] = good
    report.formats, report.modes = formats, modes
    if sizes:
        report.min_size = min(sizes, key=lambda s: (s[0] * s[1], s))
        report.max_size = max(sizes, key=lambda s: (s[0] * s[1], s))


def _find_class_folders(root: str):
    """Returns (layout, {split: {class: folder}}, ignored files) for a dataset folder."""
    subdirs, stray = [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if is_hidden(entry.name):
            continue
        if entry.is_dir():
            _check_utf8(entry.path)
        (subdirs if entry.is_dir() else stray).append(entry)
    split_dirs = [e for e in subdirs if e.name.lower() in SPLIT_FOLDERS]
    if not split_dirs:
        if not subdirs:
            raise ValueError(
                f"{root} has no class folders; put the images in one subfolder per class "
                f"({root}/cat/1.jpg, {root}/dog/2.jpg), or in train/ val/ test/ folders that each hold "
                f"one subfolder per class (images without labels: `ktool pretrain --data {root}`)."
            )
        return "classes", {UNSPLIT: {e.name: e.path for e in subdirs}}, [e.path for e in stray]
    others = [e.name for e in subdirs if e.name.lower() not in SPLIT_FOLDERS]
    if others:
        raise ValueError(
            f"{root} mixes split folders ({', '.join(e.name for e in split_dirs)}) with other folders "
            f"({', '.join(others)}); put every class folder inside train/ (and val/, test/), or rename the "
            f"split folders if they are classes."
        )
    splits: dict[str, dict[str, str]] = {}
    ignored = [e.path for e in stray]
    for entry in split_dirs:
        split = SPLIT_FOLDERS[entry.name.lower()]
        if split in splits:
            raise ValueError(
                f"{root} has two folders for the {split} split; keep one of "
                f"{', '.join(e.name for e in split_dirs if SPLIT_FOLDERS[e.name.lower()] == split)}."
            )
        splits[split] = {}
        for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if is_hidden(sub.name):
                continue
            if sub.is_dir():
                _check_utf8(sub.path)
                splits[split][sub.name] = sub.path
            else:
                ignored.append(sub.path)
    if "train" not in splits:
        raise ValueError(
            f"{root} has {', '.join(e.name for e in split_dirs)} folders but no train/ folder; "
            f"add train/ with one subfolder per class."
        )
    order = ("train", "val", "test")
    return "splits", {s: splits[s] for s in order if s in splits}, ignored


def _check_utf8(path: str):
    """Refuses a class folder whose name is not UTF-8: class names go into labels.txt, reports and metadata."""
    name = os.path.basename(path)
    try:
        name.encode("utf-8")  # a byte that is not UTF-8 comes back from os.scandir as a lone surrogate
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "surrogateescape")
        raise ValueError(
            f"the class folder {os.path.dirname(path)}/{shown!r} has a name that is not valid UTF-8; "
            "rename it (class names go into labels.txt and the reports)."
        ) from None


def _walk_files(directory: str) -> list[str]:
    """All files under ``directory``, recursively and sorted, but hidden files and folders."""
    found = []
    for current, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(current, n) for n in sorted(names) if not is_hidden(n))
    return found
