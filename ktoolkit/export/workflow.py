"""`ktool export`: a trained run to files for a phone (.tflite) or a Jetson (.onnx), each one run on
the held-out split and compared with the Keras model before it is called done.

For every mode: (fine-tune with tensorflow-model-optimization) -> convert -> add metadata -> run
the file on the held-out images -> compare with the Keras model -> write the file (marked
``.FAILED`` when it loses more accuracy than the budget) -> time it -> list its operators and
what the GPU delegate and NNAPI would not take. Then one report for all of them.

The steps on files and models are :mod:`tflite_export`'s (file in, file out); this module adds what
knows about run folders: the model and data of a run, the lock, atomic writes, the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ktoolkit.io import atomic_path, write_text
from ktoolkit.runs import resolve_model_path
from tflite_export.modes import FORMATS, check_format, get_mode
from tflite_export.untrusted import confined, safe_filename, sanitize_text

log = logging.getLogger(__name__)

FAILED_MARK = ".FAILED"


@dataclass
class ExportedFile:
    """One exported file and what was measured on it."""

    mode: str
    format: str
    path: Path
    description: str
    size_bytes: int
    gzip_bytes: int | None
    verification: object  # tflite_export.verify.Verification
    latency: dict
    passed: bool
    seconds: float
    ops: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def latency_ms(self) -> float:
        return self.latency["p50_ms"]

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "format": self.format,
            "path": str(self.path),
            "description": self.description,
            "size_bytes": self.size_bytes,
            "gzip_bytes": self.gzip_bytes,
            "passed": self.passed,
            "seconds": round(self.seconds, 1),
            "verification": self.verification.to_dict(),
            "latency": self.latency,
            "ops": self.ops,
            "notes": self.notes,
        }


@dataclass
class ExportResult:
    """What `export` gives back: the files, their folder and the report's paths."""

    files: list
    folder: Path
    report: dict
    settings: dict = field(default_factory=dict)  # ExportConfig.settings(): what the report records

    @property
    def ok(self) -> bool:
        """True when every file is within the accuracy budget."""
        return all(f.passed for f in self.files)

    def lines(self) -> list[str]:
        """What `ktool export` prints: a table of the files (mode, file, size, accuracy, drop,
        agreement, latency, ok/OVER BUDGET), then the Keras model's accuracy and the report's path."""
        rows = [("mode", "file", "size", "accuracy (95% CI)", "drop", "agreement", "latency", "")]
        for f in self.files:
            v = f.verification
            size = f"{f.size_bytes / 2**20:.2f} MB" if f.size_bytes >= 2**20 else f"{f.size_bytes / 2**10:.1f} KB"
            rows.append(
                (
                    f.mode,
                    f.path.name,
                    size,
                    _with_interval(v.accuracy, v.images),
                    f"{v.accuracy_drop:+.2f}",
                    f"{v.agreement:.1%}",
                    f"{f.latency_ms:.2f} ms",
                    "ok" if f.passed else "OVER BUDGET",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        keras = self.files[0].verification
        return [
            *lines,
            f"Keras model: {_accuracy(keras.keras_accuracy, keras.images).text()} on the held-out images; "
            f"report: {self.report['md']}",
        ]

    def failure(self) -> str | None:
        """The line that says which files are over the budget; None when all are within it."""
        if self.ok:
            return None
        over = ", ".join(f.mode for f in self.files if not f.passed)
        return (
            f"{over} lost more than {self.settings['max_accuracy_drop']:g} accuracy point(s); the files are "
            f"kept, named *.FAILED.*, for inspection."
        )


def _accuracy(fraction: float, images: int):
    from ktoolkit.stats import Accuracy

    return Accuracy(round(fraction * images), images)


def _with_interval(fraction: float, images: int) -> str:
    """``91.20% [88.1, 93.6]``: a file's accuracy with its 95% Wilson interval, in the table's width."""
    low, high = _accuracy(fraction, images).interval
    return f"{fraction:.2%} [{100 * low:.1f}, {100 * high:.1f}]"


def _tunable(mode_default, doc: str):
    """A tunable that only some modes use: None means "not given" (the mode gets ``mode_default``)."""
    return field(default=None, metadata={"mode_default": mode_default, "doc": doc})


def _setting(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass
class ExportConfig:
    """The settings of `export` (and the flags of `ktool export`, same names): defaults and checks in one place.

    The tunables (``calib_samples``, ``int8_io``, ``epochs``, ``steps_per_epoch``, ``lr``, ``sparsity``,
    ``clusters``) default to None: the mode's default (:data:`TUNABLE_DEFAULTS`). One given to modes
    that all ignore it is refused, so a setting never silently does nothing.
    """

    mode: str = _setting("float32", "the export mode (see tflite_export.modes.MODES)")
    compare: str | list | None = _setting(None, 'more modes to export and compare with mode (a list or "a,b,c")')
    format: str = _setting("tflite", '"tflite", "onnx" or "saved_model"')
    out: str | None = _setting(None, "the folder for the files and the report (default: the run's export/)")
    data: str | None = _setting(None, "images to calibrate and verify on (default: the run's data and split)")
    calib_samples: int | None = _tunable(200, "training images that full-integer quantization calibrates on")
    int8_io: bool | None = _tunable(False, ".tflite full-integer modes get uint8 input and output tensors")
    max_accuracy_drop: float = _setting(1.0, "the budget, in accuracy points lost on the held-out split")
    epochs: int | None = _tunable(2, "fine-tuning epochs per step of the pruning, clustering and QAT modes")
    steps_per_epoch: int | None = _tunable(None, "cap on fine-tuning batches per epoch (None: the whole split)")
    batch_size: int = _setting(32, "batch size of fine-tuning and verification")
    lr: float | None = _tunable(1e-3, "fine-tuning learning rate (Adam)")
    sparsity: float | None = _tunable(0.8, "the fraction of zero weights pruning ends at")
    clusters: int | None = _tunable(16, "shared weight values per kernel for clustering")
    threads: int = _setting(2, "CPU threads for the latency measurement")
    latency_runs: int = _setting(30, "timed single-image runs per file")

    def modes(self) -> list:
        """The modes to export: ``mode``, then ``compare``'s, each once."""
        return _modes(self.mode, self.compare)

    def settings(self) -> dict:
        """The checked settings as the report records them: the tunables resolved for the chosen modes.

        Raises:
            ValueError: a bad value (named, with the valid ones), or a tunable that every chosen mode ignores.
        """
        modes = self.modes()
        given = {name: getattr(self, name) for name in TUNABLE_DEFAULTS}
        settings = {
            "format": self.format,
            "modes": [m.name for m in modes],
            "max_accuracy_drop": self.max_accuracy_drop,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "latency_runs": self.latency_runs,
            **_tunables(modes, self.format, given),
        }
        _check_settings(settings)
        return settings


# The tunables that only some modes use, with the value a mode that uses them gets when they are not given.
TUNABLE_DEFAULTS = {
    f.name: f.metadata["mode_default"] for f in dataclasses.fields(ExportConfig) if "mode_default" in f.metadata
}


def export(model, config: ExportConfig | None = None, *, progress: bool = False, **overrides) -> ExportResult:
    """Exports a run's model in one or several modes, verifies each file, writes the report.

    Args:
        model: a run folder (or a .keras file, with ``data``).
        config: the settings (:class:`ExportConfig`; default its defaults). ``overrides`` are its
            fields by name (``export(model, mode="int8", compare="float32,qat")``) and win over it.
            Files are written only inside ``out``, named from the model's name made safe
            (:func:`safe_filename`); a file over ``max_accuracy_drop`` is kept but named ``*.FAILED.*``
            and the result is not ``ok``.
        progress: progress bars (fine-tuning, verification).

    Returns:
        An :class:`ExportResult`; ``ok`` is False when a file is over the budget.

    Raises:
        ValueError: a bad setting (named, with the valid values), a setting that the chosen modes
            ignore, or a model the converter cannot take (the layer is named).
        FileNotFoundError: the model or its data does not exist.
        TypeError: an override that is no setting.
    """
    config = dataclasses.replace(config or ExportConfig(), **overrides)
    settings = config.settings()
    modes = config.modes()
    path, run = resolve_model_path(model)
    folder = Path(config.out) if config.out else ((run.root if run else path.parent) / "export")
    # Into a run folder (its export/): one command at a time, as training (a second one fails at once).
    inside = run is not None and folder.resolve().is_relative_to(run.root.resolve())
    with run.lock() if inside else contextlib.nullcontext():
        return _export_all(model, modes, folder, config.data, settings, progress)


def _export_all(model, modes, folder: Path, data, settings: dict, progress: bool) -> ExportResult:
    """Loads the model and its data, exports and verifies every mode into ``folder``, writes the report."""
    from ktoolkit.export.source import load_source
    from tflite_export.verify import run_over

    batch_size = settings["batch_size"]
    source = load_source(model, data=data, progress=progress)
    heldout = source.dataset(source.heldout, batch_size=batch_size)
    log.info(
        "%s: the Keras model on %d held-out images", sanitize_text(source.name), len(source.data.splits[source.heldout])
    )
    keras_probs, labels = run_over(
        lambda x: source.model(x, training=False), heldout, progress=progress, what="Keras model"
    )
    write_text(confined(folder, "labels.txt"), "\n".join(_labels(source)) + "\n")

    files = []
    for m in modes:
        files.append(
            _export_mode(m, settings["format"], source, folder, heldout, keras_probs, labels, settings, progress)
        )
        f = files[-1]
        log.info(
            "%s: %s, accuracy %.2f%% (Keras %.2f%%), top-1 agreement %.1f%%, %.2f ms%s",
            m.name,
            f.path.name,
            100 * f.verification.accuracy,
            100 * f.verification.keras_accuracy,
            100 * f.verification.agreement,
            f.latency_ms,
            "" if f.passed else "  OVER THE BUDGET",
        )

    from ktoolkit.export.report import write_report

    source_info = {
        "name": sanitize_text(source.name),
        "origin": source.origin,
        "data": str(source.data.origin),
        "split": source.heldout,
        "images": len(labels),
        "class_names": _labels(source),
        "keras_accuracy": files[0].verification.keras_accuracy,
        "keras_file_bytes": keras_file_bytes(source.model),
        "preprocessing": source.preprocessing,
    }
    report = write_report(folder, files, source_info=source_info, settings=settings)
    return ExportResult(files=files, folder=folder, report=report, settings=settings)


# tunable -> (does this mode, written as this format, use it?, the modes that do, in words)
_USED_BY = {
    "calib_samples": (lambda m, fmt: m.needs_calibration, "calibrated full-integer modes"),
    "int8_io": (lambda m, fmt: m.integer and fmt == "tflite", "full-integer int8 modes written as .tflite"),
    "epochs": (lambda m, fmt: bool(m.compress), "fine-tuning modes"),
    "steps_per_epoch": (lambda m, fmt: bool(m.compress), "fine-tuning modes"),
    "lr": (lambda m, fmt: bool(m.compress), "fine-tuning modes"),
    "sparsity": (lambda m, fmt: "prune" in m.compress, "pruning modes"),
    "clusters": (lambda m, fmt: "cluster" in m.compress, "clustering modes"),
}


def _tunables(modes, fmt, given: dict) -> dict:
    """The tunables' values (given, else their defaults); a ValueError for one that every chosen mode ignores."""
    from tflite_export.modes import MODES

    values = {}
    for name, value in given.items():
        uses, who = _USED_BY[name]
        ignored = value is not None and value is not False and not any(uses(m, fmt) for m in modes)
        if ignored:
            users = ", ".join(n for n, m in MODES.items() if uses(m, fmt)) or "none in this format"
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{name}={value!r} ({flag}) does nothing in mode {', '.join(m.name for m in modes)} "
                f"(format {fmt}): only {who} use it ({users}). Leave it out, or export one of those "
                f"modes (--mode, or --compare to add it)."
            )
        values[name] = TUNABLE_DEFAULTS[name] if value is None else value
    return values


def _check_settings(settings: dict) -> None:
    for m in settings["modes"]:
        check_format(get_mode(m), settings["format"])
    _check_numbers(
        **{k: settings[k] for k in ("calib_samples", "epochs", "batch_size", "threads", "latency_runs", "clusters")}
    )
    if settings["steps_per_epoch"] is not None:
        _check_numbers(steps_per_epoch=settings["steps_per_epoch"])
    if not 0 < settings["sparsity"] < 1:
        raise ValueError(f"sparsity={settings['sparsity']!r}: a fraction of zero weights in (0, 1), e.g. 0.8.")
    if settings["max_accuracy_drop"] < 0:
        raise ValueError(f"max_accuracy_drop={settings['max_accuracy_drop']!r}: accuracy points, >= 0 (e.g. 1.0).")
    if not settings["lr"] > 0:
        raise ValueError(f"lr={settings['lr']!r}: the fine-tuning learning rate must be > 0, e.g. 1e-3.")


def _labels(source) -> list[str]:
    """The class names as they go into files and reports: no control characters (they came from a file)."""
    return [sanitize_text(name) or str(i) for i, name in enumerate(source.class_names)]


def keras_file_bytes(model) -> int:
    """Size of ``model`` as a float32 .keras file without optimizer state: the baseline that file sizes
    and compression ratios are measured against. (A run's best.keras may also hold the optimizer's
    slots, which would flatter every ratio.)"""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ktoolkit-size-") as tmp:
        path = Path(tmp, "model.keras")
        model.save(path)  # loaded without compiling: no optimizer state
        return path.stat().st_size


def _modes(mode, compare):
    names = [mode] + ([c.strip() for c in compare.split(",")] if isinstance(compare, str) else list(compare or []))
    return [get_mode(name) for name in dict.fromkeys(n for n in names if n)]


def _check_numbers(**values):
    for name, value in values.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r}: must be a whole number >= 1.")


def _export_mode(mode, fmt, source, folder, heldout, keras_probs, labels, settings, progress) -> ExportedFile:
    from tflite_export.verify import compare, run_over

    started = time.time()
    keras_model, converted_probs, notes = source.model, None, []
    if mode.compress:
        keras_model, converted_probs, note = _fine_tune(mode, source, heldout, labels, settings, progress)
        notes.append(note)
    log.info("%s: converting to %s", mode.name, fmt)
    content, runner, notes_of_format = _convert(mode, fmt, source, keras_model, settings, folder, progress)
    notes += notes_of_format
    file_probs, _ = run_over(runner.predict, heldout, progress=progress, what=f"{mode.name} {fmt} file")
    verification = compare(keras_probs, file_probs, labels, source.class_names, converted_probs)
    passed = verification.accuracy_drop <= settings["max_accuracy_drop"] + 1e-9

    path, size, gzipped = _write(content, runner, folder, _stem(source, mode), FORMATS[fmt], passed)

    from tflite_export.runtime import benchmark

    latency = benchmark(path, threads=(settings["threads"],), runs=settings["latency_runs"])[0]
    ops = None
    if fmt == "tflite":
        from tflite_export.compat import kernel_stats, op_report

        ops = op_report(content)
        stats = kernel_stats(content)
        if "prune" in mode.compress:
            notes.append(f"zero weights in the Conv2D/Dense kernels: {stats['zero_fraction']:.1%}")
        if "cluster" in mode.compress:
            notes.append(
                f"distinct values per output channel of the Conv2D/Dense kernels: at most {stats['max_distinct']}"
            )
    return ExportedFile(
        mode=mode.name,
        format=fmt,
        path=path,
        description=mode.description,
        size_bytes=size,
        gzip_bytes=gzipped,
        verification=verification,
        latency=latency,
        passed=passed,
        seconds=time.time() - started,
        ops=ops,
        notes=notes,
    )


def _fine_tune(mode, source, heldout, labels, settings, progress):
    """The mode's tfmot steps on the training split; returns (the fine-tuned Keras model, its held-out
    probabilities, the report's note)."""
    from tflite_export.compress import compress
    from tflite_export.verify import run_over

    keras_model = compress(
        source.model,
        mode.compress,
        source,
        epochs=settings["epochs"],
        steps_per_epoch=settings["steps_per_epoch"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        sparsity=settings["sparsity"],
        clusters=settings["clusters"],
        progress=progress,
    )
    probs, _ = run_over(
        lambda x: keras_model(x, training=False), heldout, progress=progress, what=f"{mode.name} Keras model"
    )
    note = (
        f"fine-tuned {settings['epochs']} epoch(s) per step ({' + '.join(mode.compress)}); the "
        f"fine-tuned Keras model's held-out accuracy: {100 * (probs.argmax(-1) == labels).mean():.2f}%"
    )
    return keras_model, probs, note


def _stem(source, mode) -> str:
    """The exported files' name without suffix: the model's stored name (which a stranger's file sets)
    and the mode, made a plain file name, never a path."""
    return f"{safe_filename(source.name)}_{safe_filename(mode.name)}"


def _write(content, runner, folder, stem, suffix, passed):
    """Writes the file (``stem.FAILED.suffix`` when over the budget) in place of the previous export's;
    returns (path, size in bytes, gzipped size or None for a SavedModel folder). Every path is checked
    to lie directly in ``folder``."""
    for old in (confined(folder, f"{stem}{suffix}"), confined(folder, f"{stem}{FAILED_MARK}{suffix}")):
        _remove_previous(old)
    path = confined(folder, f"{stem}{'' if passed else FAILED_MARK}{suffix}")
    if content is None:  # a SavedModel folder, written beside and moved into place
        shutil.move(str(runner.folder), str(path))
        return path, sum(p.stat().st_size for p in path.rglob("*") if p.is_file()), None
    with atomic_path(path) as tmp:
        tmp.write_bytes(content)
    return path, len(content), len(gzip.compress(content, compresslevel=9))


def _remove_previous(path: Path) -> None:
    """Removes a previous export's file or SavedModel folder at ``path``. A symlink is unlinked, never
    followed; a folder that is not a SavedModel is not ktoolkit's to delete."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ValueError(
                f"{path} is a folder that is not a SavedModel ktool export wrote; move it away or "
                f"export to another --out folder."
            )
        shutil.rmtree(path)
    elif path.exists():  # a FIFO or a device file: not an export either
        raise ValueError(
            f"{path} exists and is not a file ktool export wrote; move it away or export to another --out folder."
        )


def _convert(mode, fmt, source, keras_model, settings, folder, progress):
    """Returns (file bytes or None for a folder, a runner of the result, notes)."""
    from tflite_export.runtime import SavedModelRunner, open_model

    name = sanitize_text(source.name)
    description = (
        f"{name} image classifier ({len(source.class_names)} classes), exported by ktoolkit "
        f"as {mode.name}: {mode.description}"
    )
    notes = []
    if fmt == "tflite":
        content, notes = _to_tflite(mode, source, keras_model, settings, name, description, progress)
        return content, open_model((content, "tflite")), notes
    if fmt == "onnx":
        from tflite_export.onnx_export import quantize_int8, to_onnx

        content = to_onnx(keras_model, labels=_labels(source), description=description)
        if mode.quantize == "int8":
            content = quantize_int8(content, source.calibration_images(settings["calib_samples"]), progress=progress)
        h, w, c = source.image_shape
        name = _stem(source, mode)
        notes.append(
            f"TensorRT on the device: trtexec --onnx={name}.onnx --shapes=input:1x{h}x{w}x{c} "
            + ("--int8 --fp16" if mode.quantize == "int8" else "--fp16")
            + f" --saveEngine={name}.engine"
        )
        return content, open_model((content, "onnx")), notes
    from tflite_export.convert import to_saved_model

    tmp = confined(folder, f".{_stem(source, mode)}.saved_model.tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()  # never write (or delete) through a link
    elif tmp.is_dir():
        shutil.rmtree(tmp)  # a crashed export's leftover: the name is ktoolkit's own
    to_saved_model(keras_model, tmp)
    return None, SavedModelRunner(tmp), notes


def _to_tflite(mode, source, keras_model, settings, name, description, progress):
    """The .tflite file's bytes, with its metadata (labels, 0..255 input); returns (bytes, notes)."""
    from tflite_export.convert import to_tflite
    from tflite_export.metadata import ModelInfo, add_metadata

    int8_io = settings["int8_io"] and mode.integer
    representative = source.calibration_images(settings["calib_samples"]) if mode.needs_calibration else None
    content = to_tflite(keras_model, mode.quantize, representative=representative, int8_io=int8_io, progress=progress)
    channels = source.image_shape[2]
    inside = f"; the model applies '{source.preprocessing}' normalization itself" if source.preprocessing else ""
    content = add_metadata(
        content,
        ModelInfo(
            name=name,
            description=description,
            labels=_labels(source),
            channels=channels,
            mean=[0.0] * channels,
            std=[1.0] * channels,
            input_description=f"{'RGB' if channels == 3 else 'grayscale'} pixels on the 0..255 scale "
            f"({'uint8' if int8_io else 'float32'}){inside}",
        ),
    )
    notes = []
    if int8_io:
        notes.append("uint8 input and output: the input takes pixel bytes as they are (scale 1, zero point 0)")
    return content, notes
