"""`ktool export`: a trained run to files for a phone (.tflite) or a Jetson (.onnx), each one run on
the held-out split and compared with the Keras model before it is called done.

For every mode: (fine-tune with tensorflow-model-optimization) -> convert -> add metadata -> run
the file on the held-out images -> compare with the Keras model -> write the file (marked
``.FAILED`` when it loses more accuracy than the budget) -> time it -> list its operators and
what the GPU delegate and NNAPI would not take. Then one report for all of them.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tflite_export.modes import FORMATS, check_format, get_mode

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
            "mode": self.mode, "format": self.format, "path": str(self.path), "description": self.description,
            "size_bytes": self.size_bytes, "gzip_bytes": self.gzip_bytes, "passed": self.passed,
            "seconds": round(self.seconds, 1), "verification": self.verification.to_dict(), "latency": self.latency,
            "ops": self.ops, "notes": self.notes,
        }


@dataclass
class ExportResult:
    """What `export` gives back: the files, their folder and the report's paths."""

    files: list
    folder: Path
    report: dict

    @property
    def ok(self) -> bool:
        """True when every file is within the accuracy budget."""
        return all(f.passed for f in self.files)


def export(model, *, mode: str = "float32", compare=None, format: str = "tflite", out=None, data=None,
           calib_samples: int = 200, int8_io: bool = False, max_accuracy_drop: float = 1.0, epochs: int = 2,
           steps_per_epoch: int | None = None, batch_size: int = 32, lr: float = 1e-3, sparsity: float = 0.8,
           clusters: int = 16, threads: int = 2, latency_runs: int = 30, progress: bool = False) -> ExportResult:
    """Exports a run's model in one or several modes, verifies each file, writes the report.

    Args:
        model: a run folder (or a .keras file, with ``data``).
        mode: the export mode (see :data:`tflite_export.modes.MODES`).
        compare: more modes to export and compare side by side with ``mode`` (a list or "a,b,c").
        format: "tflite", "onnx" or "saved_model".
        out: the folder for the files and the report (default: the run folder's ``export/``).
        data: images to calibrate and verify on (default: the run's data, split as in training).
        calib_samples: training images that full-integer quantization calibrates on.
        int8_io: full-integer modes get uint8 input and output tensors (camera bytes in) instead of float32.
        max_accuracy_drop: the budget, in accuracy points lost on the held-out split; a file over it
            is kept but named ``*.FAILED.*`` and the result is not ``ok``.
        epochs: fine-tuning epochs per step of the pruning, clustering and quantization-aware modes.
        steps_per_epoch: cap on fine-tuning batches per epoch (None: the whole training split).
        batch_size: batch size of fine-tuning and verification.
        lr: fine-tuning learning rate (Adam).
        sparsity: the fraction of zero weights pruning ends at.
        clusters: shared weight values per kernel for clustering.
        threads: CPU threads for the latency measurement.
        latency_runs: timed single-image runs per file.
        progress: progress bars (fine-tuning, verification).

    Returns:
        An :class:`ExportResult`; ``ok`` is False when a file is over the budget.

    Raises:
        ValueError: a bad setting (named, with the valid values), or a model the converter cannot take
            (the layer is named).
        FileNotFoundError: the model or its data does not exist.
    """
    modes = _modes(mode, compare)
    for m in modes:
        check_format(m, format)
    _check_numbers(calib_samples=calib_samples, epochs=epochs, batch_size=batch_size, threads=threads,
                   latency_runs=latency_runs, clusters=clusters)
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r}: a fraction of zero weights in (0, 1), e.g. 0.8.")
    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop={max_accuracy_drop!r}: accuracy points, >= 0 (e.g. 1.0).")
    if not lr > 0:
        raise ValueError(f"lr={lr!r}: the fine-tuning learning rate must be > 0, e.g. 1e-3.")

    from ktoolkit.io import write_text
    from ktoolkit.runs import resolve_model_path
    from tflite_export.source import load_source
    from tflite_export.verify import run_over

    path, run = resolve_model_path(model)
    folder = Path(out) if out else ((run.root if run else path.parent) / "export")
    source = load_source(model, data=data, progress=progress)
    heldout = source.dataset(source.heldout, batch_size=batch_size)
    log.info("%s: the Keras model on %d held-out images", source.name, len(source.data.splits[source.heldout]))
    keras_probs, labels = run_over(lambda x: source.model(x, training=False), heldout, progress=progress,
                                   what="Keras model")
    write_text(folder / "labels.txt", "\n".join(source.class_names) + "\n")

    settings = {"format": format, "modes": [m.name for m in modes], "calib_samples": calib_samples, "int8_io": int8_io,
                "max_accuracy_drop": max_accuracy_drop, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                "batch_size": batch_size, "lr": lr, "sparsity": sparsity, "clusters": clusters, "threads": threads,
                "latency_runs": latency_runs}
    files = []
    for m in modes:
        files.append(_export_mode(m, format, source, folder, heldout, keras_probs, labels, settings, progress))
        f = files[-1]
        log.info("%s: %s, accuracy %.2f%% (Keras %.2f%%), top-1 agreement %.1f%%, %.2f ms%s", m.name, f.path.name,
                 100 * f.verification.accuracy, 100 * f.verification.keras_accuracy, 100 * f.verification.agreement,
                 f.latency_ms, "" if f.passed else "  OVER THE BUDGET")

    from tflite_export.report import write_report

    source_info = {"name": source.name, "origin": source.origin, "data": str(source.data.origin),
                   "split": source.heldout, "images": len(labels), "class_names": source.class_names,
                   "keras_accuracy": files[0].verification.keras_accuracy,
                   "keras_file_bytes": keras_file_bytes(source.model),
                   "preprocessing": source.preprocessing}
    report = write_report(folder, files, source_info=source_info, settings=settings)
    return ExportResult(files=files, folder=folder, report=report)


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
        from tflite_export.compress import compress

        keras_model = compress(source.model, mode.compress, source, epochs=settings["epochs"],
                               steps_per_epoch=settings["steps_per_epoch"], batch_size=settings["batch_size"],
                               lr=settings["lr"], sparsity=settings["sparsity"], clusters=settings["clusters"],
                               progress=progress)
        converted_probs, _ = run_over(lambda x: keras_model(x, training=False), heldout, progress=progress,
                                      what=f"{mode.name} Keras model")
        notes.append(f"fine-tuned {settings['epochs']} epoch(s) per step ({' + '.join(mode.compress)}); the "
                     f"fine-tuned Keras model's held-out accuracy: {100 * (converted_probs.argmax(-1) == labels).mean():.2f}%")
    log.info("%s: converting to %s", mode.name, fmt)
    content, runner, notes_of_format = _convert(mode, fmt, source, keras_model, settings, folder, progress)
    notes += notes_of_format
    file_probs, _ = run_over(runner.predict, heldout, progress=progress, what=f"{mode.name} {fmt} file")
    verification = compare(keras_probs, file_probs, labels, source.class_names, converted_probs)
    passed = verification.accuracy_drop <= settings["max_accuracy_drop"] + 1e-9

    path, size, gzipped = _write(content, runner, folder, f"{source.name}_{mode.name}", FORMATS[fmt], passed)

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
            notes.append(f"distinct values per output channel of the Conv2D/Dense kernels: at most {stats['max_distinct']}")
    return ExportedFile(mode=mode.name, format=fmt, path=path, description=mode.description, size_bytes=size,
                        gzip_bytes=gzipped, verification=verification, latency=latency, passed=passed,
                        seconds=time.time() - started, ops=ops, notes=notes)


def _write(content, runner, folder, stem, suffix, passed):
    """Writes the file (``stem.FAILED.suffix`` when over the budget) in place of the previous export's;
    returns (path, size in bytes, gzipped size or None for a SavedModel folder)."""
    for old in (folder / f"{stem}{suffix}", folder / f"{stem}{FAILED_MARK}{suffix}"):
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
    path = folder / f"{stem}{'' if passed else FAILED_MARK}{suffix}"
    if content is None:  # a SavedModel folder, written beside and moved into place
        shutil.move(str(runner.folder), str(path))
        return path, sum(p.stat().st_size for p in path.rglob("*") if p.is_file()), None
    from ktoolkit.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(content)
    return path, len(content), len(gzip.compress(content, compresslevel=9))


def _convert(mode, fmt, source, keras_model, settings, folder, progress):
    """Returns (file bytes or None for a folder, a runner of the result, notes)."""
    from tflite_export.runtime import SavedModelRunner, open_model

    description = (f"{source.name} image classifier ({len(source.class_names)} classes), exported by ktoolkit "
                   f"as {mode.name}: {mode.description}")
    notes = []
    if fmt == "tflite":
        from tflite_export.convert import to_tflite
        from tflite_export.metadata import ModelInfo, add_metadata

        int8_io = settings["int8_io"] and mode.integer
        representative = source.calibration_images(settings["calib_samples"]) if mode.needs_calibration else None
        content = to_tflite(keras_model, mode.quantize, representative=representative, int8_io=int8_io,
                            progress=progress)
        channels = source.image_shape[2]
        inside = f"; the model applies '{source.preprocessing}' normalization itself" if source.preprocessing else ""
        content = add_metadata(content, ModelInfo(
            name=source.name, description=description, labels=source.class_names, channels=channels,
            mean=[0.0] * channels, std=[1.0] * channels,
            input_description=f"{'RGB' if channels == 3 else 'grayscale'} pixels on the 0..255 scale "
                              f"({'uint8' if int8_io else 'float32'}){inside}"))
        if int8_io:
            notes.append("uint8 input and output: the input takes pixel bytes as they are (scale 1, zero point 0)")
        return content, open_model((content, "tflite")), notes
    if fmt == "onnx":
        from tflite_export.onnx_export import quantize_int8, to_onnx

        content = to_onnx(keras_model, labels=source.class_names, description=description)
        if mode.quantize == "int8":
            content = quantize_int8(content, source.calibration_images(settings["calib_samples"]), progress=progress)
        h, w, c = source.image_shape
        name = f"{source.name}_{mode.name}"
        notes.append(f"TensorRT on the device: trtexec --onnx={name}.onnx --shapes=input:1x{h}x{w}x{c} "
                     + ("--int8 --fp16" if mode.quantize == "int8" else "--fp16") + f" --saveEngine={name}.engine")
        return content, open_model((content, "onnx")), notes
    from tflite_export.convert import to_saved_model

    tmp = folder / f".{source.name}_{mode.name}.saved_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    to_saved_model(keras_model, tmp)
    return None, SavedModelRunner(tmp), notes
