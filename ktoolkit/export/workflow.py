"""`ktool export`: a trained run to files for a phone (.tflite) or a Jetson (.onnx), each one run on
the held-out split and compared with the Keras model before it is called done.

For every mode: (fine-tune with tensorflow-model-optimization) -> convert -> add metadata -> run
the file on the held-out images (the test split, plus val when the test split is small) -> judge it
against the Keras model (:class:`ktoolkit.export.report.Gate`: intervals, McNemar, a verdict that says
when the images cannot decide) -> write the file, named by model, input size, I/O type and mode (marked
``.FAILED`` when the drop's point estimate is over the budget) -> list its operators and what the GPU
delegate and NNAPI would not take. Then all files of the export are timed together, interleaved, and
the report gets an entry per file (earlier exports' files in the folder keep theirs). Every step logs
its time.

The steps on files and models are :mod:`tflite_export`'s (file in, file out); this module adds what
knows about run folders: the model and data of a run, the lock, atomic writes, the report.
"""

from __future__ import annotations

import contextlib
import contextvars
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
    verification: object  # tflite_export.verify.Verification, on the run's test split alone
    latency: dict  # interleaved_latency's, after every file of the export is written; vs_float32 added
    passed: bool  # gate.passed: the point estimate of the drop is within the budget
    seconds: float
    ops: dict | None = None
    notes: list = field(default_factory=list)
    gate: object = None  # ktoolkit.export.report.Gate: the verdict, on every held-out image used
    replaced: str | None = None  # the previous export's file this one replaced (same name or its .FAILED twin)
    input: dict = field(default_factory=dict)  # shape, dtype and output_dtype: what the file takes and gives
    probs: object = field(default=None, repr=False)  # the file's probabilities on the held-out images (not saved)

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
            "gate": None if self.gate is None else self.gate.to_dict(),
            "replaced": self.replaced,
            "input": {k: v for k, v in self.input.items() if k != "tag"},
        }


@dataclass
class ExportResult:
    """What `export` gives back: the files, their folder and the report's paths."""

    files: list
    folder: Path
    report: dict
    settings: dict = field(default_factory=dict)  # ExportConfig.settings(): what the report records
    heldout: dict = field(default_factory=dict)  # the splits the verdicts rest on: name -> images, in order

    @property
    def ok(self) -> bool:
        """True when every file is within the accuracy budget."""
        return all(f.passed for f in self.files)

    def lines(self) -> list[str]:
        """What `ktool export` prints: a table of the files (mode, file, size, accuracy and the drop with their
        95% intervals, McNemar's p, agreement, latency and its ratio to float32, verdict, ok/OVER BUDGET), the
        images the verdicts rest on, a line per file the images cannot decide and per file that replaced an
        earlier export's, then the Keras model's accuracy and the report's path."""
        head = ("mode", "file", "size", "accuracy (95% CI)", "drop (95% CI)", "McNemar p", "agreement", "latency")
        rows = [(*head, "x float32", "verdict", "")]
        for f in self.files:
            g, ratio = f.gate, f.latency.get("vs_float32")
            rows.append(
                (
                    f.mode,
                    f.path.name,
                    f"{f.size_bytes / 2**20:.2f} MB" if f.size_bytes >= 2**20 else f"{f.size_bytes / 2**10:.1f} KB",
                    _with_interval(g.file),
                    f"{g.drop_points:+.2f} [{100 * g.drop.low:+.1f}, {100 * g.drop.high:+.1f}]",
                    f"{g.drop.p_value:.2g}",
                    f"{g.agreement.value:.1%}",
                    f"{f.latency_ms:.2f} ms",
                    "-" if ratio is None else f"{ratio:.2f}x",
                    g.verdict,
                    "ok" if f.passed else "OVER BUDGET",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        gate = self.files[0].gate
        splits = " + ".join(f"{name} {count:,}" for name, count in self.heldout.items())
        lines.append(
            f"Verdicts on {gate.images:,} held-out images ({splits}): one image is {gate.one_image:.3g} points, "
            f"the budget {gate.budget:g}."
        )
        lines += [f"{f.mode}: {f.gate.text()}." for f in self.files if not f.gate.supported]
        lines += [f"{f.mode}: replaced the previous export's {f.replaced}." for f in self.files if f.replaced]
        return [*lines, f"Keras model: {gate.keras.text()} on the held-out images; report: {self.report['md']}"]

    def failure(self) -> str | None:
        """The line that says which files are over the budget; None when all are within it."""
        if self.ok:
            return None
        over = ", ".join(f.mode for f in self.files if not f.passed)
        return (
            f"{over} lost more than {self.settings['max_accuracy_drop']:g} accuracy point(s); the files are "
            f"kept, named *.FAILED.*, for inspection."
        )


def _with_interval(acc) -> str:
    """``91.20% [88.1, 93.6]``: an :class:`ktoolkit.stats.Accuracy` with its 95% Wilson interval, in the table's
    width."""
    low, high = acc.interval
    return f"{acc.value:.2%} [{100 * low:.1f}, {100 * high:.1f}]"


def _tunable(mode_default, doc: str):
    """A tunable that only some modes use: None means "not given" (the mode gets ``mode_default``)."""
    return field(default=None, metadata={"mode_default": mode_default, "doc": doc})


def _setting(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass
class ExportConfig:
    """The settings of `export` (and the flags of `ktool export`, same names): defaults and checks in one place.

    The tunables (``calib_samples``, ``int8_io``, ``onnx_target``, ``epochs``, ``steps_per_epoch``, ``lr``,
    ``sparsity``, ``clusters``) default to None: the mode's default (:data:`TUNABLE_DEFAULTS`). One given to
    modes that all ignore it is refused, so a setting never silently does nothing.

    ``onnx_target`` (named for whom the file is made; its values are runtimes) picks the post-training int8
    ONNX form: "tensorrt", symmetric int8 (zero points 0), the only form TensorRT builds; "onnxruntime",
    asymmetric uint8 activations, which onnxruntime's CPU kernels run fast and TensorRT cannot build. The
    second is named ``*_ort_<mode>.onnx``, so it never replaces the first (:data:`ONNX_TARGET_TAGS`).
    """

    mode: str = _setting("float32", "the export mode (see tflite_export.modes.MODES)")
    compare: str | list | None = _setting(None, 'more modes to export and compare with mode (a list or "a,b,c")')
    format: str = _setting("tflite", '"tflite", "onnx" or "saved_model"')
    out: str | None = _setting(None, "the folder for the files and the report (default: the run's export/)")
    data: str | None = _setting(None, "images to calibrate and verify on (default: the run's data and split)")
    calib_samples: int | None = _tunable(200, "training images that full-integer quantization calibrates on")
    int8_io: bool | None = _tunable(False, ".tflite full-integer modes get uint8 input and output tensors")
    onnx_target: str | None = _tunable(
        "tensorrt", 'post-training int8 .onnx: "tensorrt" (symmetric int8) or "onnxruntime" (asymmetric uint8)'
    )
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
    """Loads the model and its data, exports and verifies every mode into ``folder``, times the files together,
    writes the report. Every step logs when it starts and how long it took (``ktool export`` shows INFO lines)."""
    from ktoolkit.export.report import write_changed_picture, write_report
    from ktoolkit.export.source import load_source

    token = _STARTED.set(time.time())
    try:
        with _step("loading the model and its data"):
            source = load_source(model, data=data, progress=progress)
        heldout = _keras_on_heldout(source, settings, progress)
        write_text(confined(folder, "labels.txt"), "\n".join(_labels(source)) + "\n")
        files = [_export_mode(m, settings["format"], source, folder, heldout, settings, progress) for m in modes]
        _time_together(files, settings, progress)
        for f in files:
            _log_file(f)
        info = _source_info(source, heldout, files)
        changed = {f"{f.mode} {f.format}": f.probs for f in files if f.probs is not None}
        changed_png = write_changed_picture(
            folder, heldout.dataset, heldout.probs, heldout.labels, _labels(source), changed
        )
        report = write_report(folder, files, source_info=info, settings=settings, changed_png=changed_png)
    finally:
        _STARTED.reset(token)
    return ExportResult(files=files, folder=folder, report=report, settings=settings, heldout=heldout.splits)


# When the running export began (for the progress lines' "s into the export").
_STARTED: contextvars.ContextVar = contextvars.ContextVar("ktoolkit_export_started", default=None)
LATENCY_ROUNDS = 5  # round-robin repetitions of the latency measurement


@contextlib.contextmanager
def _step(what: str):
    """Logs ``what`` when it starts and, when it ends, how long it took and how long the export has run, so
    a minute-long int8 calibration of MobileNetV2 is not silent."""
    began = time.time()
    log.info("%s ...", what)
    yield
    now = time.time()
    log.info("%s: done in %.1f s (%.0f s into the export)", what, now - began, now - (_STARTED.get() or began))


@dataclass
class _Heldout:
    """The held-out images every file is judged on, and the Keras model's probabilities on them.

    Attributes:
        dataset: the splits one after the other, as (images, labels) batches.
        splits: split name -> images, in the order they come (the run's test split first).
        probs: the Keras model's probabilities, (images, classes).
        labels: the true classes.
    """

    dataset: object
    splits: dict
    probs: object
    labels: object

    @property
    def primary(self) -> int:
        """How many of the images are the first split's (the Verification's: the run's test split alone)."""
        return next(iter(self.splits.values()))


def _keras_on_heldout(source, settings: dict, progress: bool) -> _Heldout:
    """The Keras model on the verdict's held-out splits (:meth:`ExportSource.verdict_splits`)."""
    from tflite_export.verify import run_over

    splits = {name: len(source.data.splits[name]) for name in source.verdict_splits()}
    dataset = source.heldout_dataset(list(splits), batch_size=settings["batch_size"])
    shown = " + ".join(f"{name} {count:,}" for name, count in splits.items())
    with _step(f"{sanitize_text(source.name)}: the Keras model on {sum(splits.values()):,} held-out images ({shown})"):
        probs, labels = run_over(
            lambda x: source.model(x, training=False), dataset, progress=progress, what="Keras model"
        )
    return _Heldout(dataset, splits, probs, labels)


def _time_together(files, settings: dict, progress: bool = False) -> None:
    """Times every file of the export together, interleaved (:func:`tflite_export.runtime.interleaved_latency`),
    after all conversions; sets each file's ``latency``, with its ratio to this export's float32 file."""
    from tflite_export.runtime import interleaved_latency

    runs, threads = settings["latency_runs"], settings["threads"]
    what = (
        f"timing {len(files)} file(s) together: {min(LATENCY_ROUNDS, runs)} interleaved round(s), "
        f"{runs} single-image runs each, {threads} thread(s)"
    )
    with _step(what):
        timed = interleaved_latency(
            [f.path for f in files], threads=threads, runs=runs, rounds=LATENCY_ROUNDS, progress=progress
        )
    base = next((t["p50_ms"] for f, t in zip(files, timed) if f.mode == "float32"), None)
    for f, t in zip(files, timed):
        f.latency = {**t, "vs_float32": None if not base else t["p50_ms"] / base}


def _log_file(f) -> None:
    g, ratio = f.gate, f.latency.get("vs_float32")
    log.info(
        "%s: %s, accuracy %s (Keras %.2f%%), drop %+.2f points [%+.1f, %+.1f], McNemar p=%.2g, top-1 agreement "
        "%.1f%%, %.2f ms%s: %s%s",
        f.mode,
        f.path.name,
        _with_interval(g.file),
        100 * g.keras.value,
        g.drop_points,
        100 * g.drop.low,
        100 * g.drop.high,
        g.drop.p_value,
        100 * g.agreement.value,
        f.latency_ms,
        "" if ratio is None else f" ({ratio:.2f}x float32)",
        g.verdict,
        "" if f.passed else "  OVER THE BUDGET",
    )


def _source_info(source, heldout: _Heldout, files) -> dict:
    """What the report says about the model and the images: ``split``/``images`` are the run's test split
    (the Verification's), ``verdict_splits`` the images the verdicts rest on."""
    from ktoolkit.export.source import MIN_VERDICT_IMAGES

    return {
        "name": sanitize_text(source.name),
        "origin": source.origin,
        "data": str(source.data.origin),
        "split": source.heldout,
        "images": heldout.primary,
        "verdict_splits": heldout.splits,
        "verdict_images": len(heldout.labels),
        "min_verdict_images": MIN_VERDICT_IMAGES,
        "class_names": _labels(source),
        "keras_accuracy": files[0].verification.keras_accuracy,
        "keras": files[0].gate.keras.to_dict(),
        "keras_file_bytes": keras_file_bytes(source.model),
        "preprocessing": source.preprocessing,
    }


def _post_training_int8_onnx(mode, fmt) -> bool:
    """The mode, in this format, is calibrated by :func:`tflite_export.onnx_export.quantize_int8` (not QAT)."""
    return fmt == "onnx" and mode.quantize == "int8" and "qat" not in mode.compress


# onnx_target -> the file name's tag (after the I/O tag, before the mode): the TensorRT form keeps the plain name.
ONNX_TARGET_TAGS = {"tensorrt": "", "onnxruntime": "_ort"}

# tunable -> (does this mode, written as this format, use it?, the modes that do, in words)
_USED_BY = {
    "calib_samples": (lambda m, fmt: m.needs_calibration, "calibrated full-integer modes"),
    "int8_io": (lambda m, fmt: m.integer and fmt == "tflite", "full-integer int8 modes written as .tflite"),
    "onnx_target": (_post_training_int8_onnx, "post-training int8 modes written as .onnx (not QAT)"),
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
    if settings["onnx_target"] not in ONNX_TARGET_TAGS:
        raise ValueError(
            f"onnx_target={settings['onnx_target']!r} (--onnx-target): one of "
            f"{', '.join(map(repr, ONNX_TARGET_TAGS))}, the runtime the int8 .onnx file is made for."
        )


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


def _export_mode(mode, fmt, source, folder, heldout: _Heldout, settings, progress) -> ExportedFile:
    """One mode: (fine-tune) -> convert -> run on the held-out images -> judge -> write. Timing comes later,
    with every file of the export together (:func:`_time_together`)."""
    from tflite_export.verify import compare, run_over

    started = time.time()
    keras_model, converted_probs, notes = source.model, None, []
    if mode.compress:
        with _step(f"{mode.name}: fine-tuning ({' + '.join(mode.compress)}) on the training split"):
            keras_model, converted_probs, note = _fine_tune(
                mode, source, heldout.dataset, heldout.labels, settings, progress
            )
        notes.append(note)
    calibrating = f", calibrating on {settings['calib_samples']} training images" if mode.needs_calibration else ""
    with _step(f"{mode.name}: converting to {fmt}{calibrating}"):
        content, runner, notes_of_format = _convert(mode, fmt, source, keras_model, settings, folder, progress)
    notes += notes_of_format
    with _step(f"{mode.name}: running the file on {len(heldout.labels):,} held-out images"):
        file_probs, _ = run_over(runner.predict, heldout.dataset, progress=progress, what=f"{mode.name} {fmt} file")
    k = heldout.primary
    converted = None if converted_probs is None else converted_probs[:k]
    verification = compare(heldout.probs[:k], file_probs[:k], heldout.labels[:k], source.class_names, converted)
    gate = _judge(heldout, file_probs, settings["max_accuracy_drop"])
    io = _io(runner)
    stem = _stem(source, mode, io["tag"] + _target_tag(mode, fmt, settings))
    path, size, gzipped, replaced = _write(content, runner, folder, stem, FORMATS[fmt], gate.passed)
    ops = _ops(mode, fmt, content, notes)
    return ExportedFile(
        mode=mode.name,
        format=fmt,
        path=path,
        description=mode.description,
        size_bytes=size,
        gzip_bytes=gzipped,
        verification=verification,
        latency={},
        passed=gate.passed,
        seconds=time.time() - started,
        ops=ops,
        notes=notes,
        gate=gate,
        replaced=replaced,
        input=io,
        probs=file_probs,
    )


def _judge(heldout: _Heldout, file_probs, budget: float):
    """The file's :class:`~ktoolkit.export.report.Gate` on every held-out image, against the Keras model."""
    from ktoolkit.export.report import judge

    keras_top, file_top = heldout.probs.argmax(-1), file_probs.argmax(-1)
    how = "held-out: " + " + ".join(heldout.splits)
    return judge(keras_top == heldout.labels, file_top == heldout.labels, keras_top == file_top, budget, how=how)


def _ops(mode, fmt, content, notes: list):
    """A .tflite file's operators (and what the GPU delegate and NNAPI would not take); notes on its pruned
    or clustered kernels are appended to ``notes``. None for other formats."""
    if fmt != "tflite":
        return None
    from tflite_export.compat import kernel_stats, op_report

    ops = op_report(content)
    stats = kernel_stats(content)
    if "prune" in mode.compress:
        notes.append(f"zero weights in the Conv2D/Dense kernels: {stats['zero_fraction']:.1%}")
    if "cluster" in mode.compress:
        notes.append(f"distinct values per output channel of the Conv2D/Dense kernels: at most {stats['max_distinct']}")
    return ops


# ONNX tensor types -> numpy dtype names (what an .onnx file's input or output takes or gives)
_ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
}


def _io(runner) -> dict:
    """What the file takes and gives: input shape and dtype, output dtype, and the file name's tag for them:
    "" for float32 in and out, ``_uint8io`` when both are uint8, ``_uint8in`` / ``_uint8out`` when one is."""
    inp = out = "float32"
    if runner.kind == "tflite":
        inp = runner.interpreter.get_input_details()[0]["dtype"].__name__
        out = runner.interpreter.get_output_details()[0]["dtype"].__name__
    elif runner.kind == "onnx":
        inp = _ONNX_TYPES.get(runner.session.get_inputs()[0].type, "float32")
        out = _ONNX_TYPES.get(runner.session.get_outputs()[0].type, "float32")
    if inp == out:
        tag = "" if inp == "float32" else f"_{inp}io"
    else:
        tag = ("" if inp == "float32" else f"_{inp}in") + ("" if out == "float32" else f"_{out}out")
    return {"shape": list(runner.input_shape), "dtype": inp, "output_dtype": out, "tag": tag}


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


def _target_tag(mode, fmt, settings) -> str:
    """``_ort`` for a post-training int8 .onnx file in the onnxruntime form, else "": the two forms differ in
    what runs them, so they get different names (:data:`ONNX_TARGET_TAGS`)."""
    return ONNX_TARGET_TAGS[settings["onnx_target"]] if _post_training_int8_onnx(mode, fmt) else ""


def _stem(source, mode, io: str = "") -> str:
    """The exported file's name without suffix: everything that changes what the file takes and gives, so two
    exports that differ in any of it never replace each other: the model's stored name (which a stranger's
    file sets), the input size (height x width x channels), the I/O type when it is not float32 (``io``:
    :func:`_io`'s tag, e.g. ``_uint8io``, then :func:`_target_tag`'s ``_ort``) and, last, the mode; the suffix
    adds the format. Made a plain file name, never a path: ``lenet5_32x32x1_int8``, ``lenet5_32x32x1_uint8io_int8``
    (``*_int8.tflite`` finds both)."""
    h, w, c = source.image_shape
    return f"{safe_filename(source.name)}_{h}x{w}x{c}{io}_{safe_filename(mode.name)}"


def _write(content, runner, folder, stem, suffix, passed):
    """Writes the file (``stem.FAILED.suffix`` when over the budget) in place of a previous export of the same
    name (or its ``.FAILED`` twin), and says so in the log; returns (path, size in bytes, gzipped size or None
    for a SavedModel folder, the name of the file it replaced or None). Every path is checked to lie directly
    in ``folder``; files of other names (other modes, I/O types, sizes) are never touched."""
    replaced = None
    for old in (confined(folder, f"{stem}{suffix}"), confined(folder, f"{stem}{FAILED_MARK}{suffix}")):
        there = old.is_symlink() or old.exists()
        _remove_previous(old)
        if there:
            replaced = old.name
            log.info("replacing the previous export's %s", old.name)
    path = confined(folder, f"{stem}{'' if passed else FAILED_MARK}{suffix}")
    if content is None:  # a SavedModel folder, written beside and moved into place
        shutil.move(str(runner.folder), str(path))
        return path, sum(p.stat().st_size for p in path.rglob("*") if p.is_file()), None, replaced
    with atomic_path(path) as tmp:
        tmp.write_bytes(content)
    return path, len(content), len(gzip.compress(content, compresslevel=9)), replaced


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
        content, notes = _to_onnx(mode, source, keras_model, settings, description, progress)
        return content, open_model((content, "onnx")), notes
    from tflite_export.convert import to_saved_model

    tmp = confined(folder, f".{_stem(source, mode)}.saved_model.tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()  # never write (or delete) through a link
    elif tmp.is_dir():
        shutil.rmtree(tmp)  # a crashed export's leftover: the name is ktoolkit's own
    to_saved_model(keras_model, tmp)
    return None, SavedModelRunner(tmp), notes


def _to_onnx(mode, source, keras_model, settings, description, progress):
    """The .onnx file's bytes: float, QAT's learned ranges as QDQ, or post-training int8 in the form
    ``onnx_target`` names; returns (bytes, notes). The notes say which form it is and, for the forms TensorRT
    builds, the trtexec command."""
    from tflite_export.onnx_export import CALIBRATION, qat_to_qdq, quantize_int8, to_onnx

    content, notes = to_onnx(keras_model, labels=_labels(source), description=description), []
    tensorrt = settings["onnx_target"] == "tensorrt" or not _post_training_int8_onnx(mode, "onnx")
    if "qat" in mode.compress:  # the fake-quantization ranges QAT learned become the QDQ scales
        content = qat_to_qdq(content)
        notes.append("int8 QDQ from the quantization-aware model's learned ranges, made symmetric for TensorRT")
    elif mode.quantize == "int8":
        images = source.calibration_images(settings["calib_samples"])
        content = quantize_int8(content, images, symmetric=tensorrt, progress=progress)
        form = (
            "symmetric int8 (the TensorRT form), weights"
            if tensorrt
            else "asymmetric uint8 activations (the onnxruntime form, --onnx-target onnxruntime), int8 weights"
        )
        notes.append(
            f"int8 QDQ calibrated ({CALIBRATION}) on {len(images)} training images: {form} per channel, float "
            "input, normalization, biases and softmax"
        )
    if not tensorrt:
        notes.append(
            "for onnxruntime only: TensorRT cannot build this file (its activation zero points are not 0); "
            "export without --onnx-target onnxruntime for the TensorRT form, for a Jetson"
        )
        return content, notes
    h, w, c = source.image_shape
    name = _stem(source, mode)
    notes.append(
        f"TensorRT on the device: trtexec --onnx={name}.onnx --shapes=input:1x{h}x{w}x{c} "
        + ("--int8 --fp16" if mode.quantize == "int8" else "--fp16")
        + f" --saveEngine={name}.engine"
    )
    return content, notes


def _to_tflite(mode, source, keras_model, settings, name, description, progress):
    """The .tflite file's bytes, with its metadata (labels, 0..255 input); returns (bytes, notes)."""
    from tflite_export.convert import to_tflite
    from tflite_export.metadata import ModelInfo, add_metadata, input_normalization

    int8_io = settings["int8_io"] and mode.integer
    representative = None
    if mode.needs_calibration:
        with _step(f"{mode.name}: reading {settings['calib_samples']} calibration images (training split)"):
            representative = source.calibration_images(settings["calib_samples"])
    # Post-training integer files take the normalization out of the int8 graph (into the input's quantization,
    # the first convolution, or float ops before QUANTIZE: tflite_export.convert); not yet for tfmot-trained
    # models, whose fake-quant ranges were learned with the normalization inside.
    fold = mode.quantize in ("int8", "int16x8") and not mode.compress
    content = to_tflite(
        keras_model,
        mode.quantize,
        representative=representative,
        int8_io=int8_io,
        progress=progress,
        fold_normalization=fold,
    )
    norm = input_normalization(content, source.preprocessing)
    content = add_metadata(
        content,
        ModelInfo(
            name=name,
            description=description,
            labels=_labels(source),
            channels=source.image_shape[2],
            mean=list(norm.mean),
            std=list(norm.std),
            input_description=norm.description,
        ),
    )
    notes = []
    if int8_io:
        notes.append(f"uint8 input and output: {norm.description}")
    return content, notes
