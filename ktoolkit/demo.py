"""`ktool demo`: the whole journey on built-in images, no download: data, a pretrained base, transfer
learning chosen by the decision matrix, an int8 TFLite file verified against the Keras model, its
latency, and one page that links everything.

The images are scikit-learn's 1,797 real handwritten digits (8x8, shipped with scikit-learn), written
out as a class-per-folder PNG tree, the same layout your own data takes. Since nothing may be
downloaded, the "pretrained" base is made here: a CIFAR ResNet-20 trained on the digits 0-4. The new
task is the digits 5-9, classes that base has never seen; `finetune` measures the data against the
base, picks the strategy, and the rest is what you would run on your own folder:

    ktool train    --recipe cifar_resnet20 --data DEMO/data/digits_0-4 ...   (the base)
    ktool finetune --base DEMO/base --data DEMO/data/digits_5-9 ...          (the decision and the model)
    ktool export   --model DEMO/finetune --mode int8 --int8-io               (verified on the test split)
    ktool benchmark DEMO/finetune/export/*_int8.tflite --threads 1,2

Each step is its own run folder; running the demo again reuses the finished steps (and resumes an
interrupted training), ``overwrite`` starts over: the steps run again with ``--overwrite``, which
replaces only ktoolkit's own files in their run folders (anything else in ``out`` stays).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PIXEL_SCALE = 4  # 8x8 digits are written as 32x32 PNGs (each pixel a 4x4 block): the base's input size


@dataclass
class DemoResult:
    """Where everything is, and the numbers the demo printed."""

    root: Path
    report: Path
    base_accuracy: float | None
    finetune: object  # FinetuneResult
    export: object  # ktoolkit.export.ExportResult
    latency: list = field(default_factory=list)  # benchmark rows
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.export.ok)


def write_digits(root: Path) -> dict[str, Path]:
    """scikit-learn's digits as PNG folders: ``{"0-4": root/digits_0-4, "5-9": root/digits_5-9}``, one
    subfolder per class, 32x32 grayscale images. Existing complete folders are kept."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folders = {"0-4": root / "digits_0-4", "5-9": root / "digits_5-9"}
    for name, folder in folders.items():
        picked = np.flatnonzero((digits.target < 5) == (name == "0-4"))
        if folder.exists() and sum(1 for _ in folder.rglob("*.png")) == len(picked):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        tmp = folder.with_name(folder.name + ".partial")  # a killed demo never leaves half a folder
        shutil.rmtree(tmp, ignore_errors=True)
        for i in picked:
            pixels = (digits.images[i] * (255.0 / 16.0)).round().astype("uint8")
            pixels = np.kron(pixels, np.ones((PIXEL_SCALE, PIXEL_SCALE), dtype="uint8"))
            (tmp / str(digits.target[i])).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp / str(digits.target[i]) / f"{i:04d}.png")
        tmp.rename(folder)
    return folders


def demo(
    out="runs/demo",
    *,
    base: str | None = None,
    weights: str | None = None,
    base_epochs: int = 8,
    epochs: int = 2,
    overwrite: bool = False,
    progress: bool = False,
    echo=log.info,
    started: float | None = None,
) -> DemoResult:
    """Runs the demo into ``out``; see the module docstring. ``echo`` receives the progress lines.

    Args:
        out: the demo's folder (data/, base/, finetune/ with export/ inside, DEMO.md).
        base: transfer from this base instead of the one the demo trains (a keras.applications name, a
            recipe or a run folder, as for `ktool finetune --base`).
        weights: weights for ``base`` (as `ktool finetune --weights`).
        base_epochs: epochs of the base's training on the digits 0-4.
        epochs: epochs of the finetune/full strategies, and of quantization-aware training if int8
            post-training quantization misses the accuracy budget.
        started: when the command began (``time.time()``; default now), so the total includes its start-up.
    """
    started = time.time() if started is None else started
    root = Path(out)
    step = _step_printer(5 if base is None else 4, echo)
    with step("data: scikit-learn's 1,797 handwritten digits, written as class folders of 32x32 PNGs"):
        folders = write_digits(root / "data")
        echo(f"      {folders['0-4']} (to pretrain a base)  and  {folders['5-9']} (the new task)")

    base_accuracy = None
    if base is None:
        with step(
            f"base: cifar_resnet20 trained on the digits 0-4 for {base_epochs} epochs, the demo's stand-in for a "
            "network pretrained on ImageNet"
        ):
            base_run, base_accuracy = _train_base(root / "base", folders["0-4"], base_epochs, overwrite, progress, echo)
        base, weights = str(base_run), None

    tuned_run = root / "finetune"
    with step(f"transfer: `ktool finetune --base {base} --data {folders['5-9']}`: measure, decide, train"):
        tuned = _finetune(tuned_run, base, weights, folders["5-9"], epochs, overwrite, progress, echo)

    finished = None if overwrite or tuned is not None else _finished(root, tuned_run)
    with step("export: int8 TFLite (uint8 camera bytes in and out), run on the test split and compared with Keras"):
        exported = _export_int8(tuned_run, epochs, progress, echo, finished)
    tflite = exported.files[0]
    _record(root, tuned_run, tflite, exported.ok)

    with step("benchmark: latency of the .tflite file with LiteRT (XNNPACK), 1 and 2 threads"):
        latency = _benchmark(tflite, echo, finished)
    _record(root, tuned_run, tflite, exported.ok, latency)

    result = DemoResult(root, root / "DEMO.md", base_accuracy, tuned, exported, latency, time.time() - started)
    _write_page(result, folders, base, tflite)
    verdict = "the int8 file is within the accuracy budget" if result.ok else "OVER THE ACCURACY BUDGET"
    echo(f"done in {time.time() - started:.0f} s in all (loading TensorFlow included): {verdict}")
    echo(f"report: {result.report}")
    return result


def _step_printer(steps: int, echo):
    """``step(text)``, a context manager: echoes the next step's ``[i/steps] text`` line, and when the step
    ends its own duration (not the time since the start, which the final line gives)."""
    numbers = iter(range(1, steps + 1))

    @contextlib.contextmanager
    def step(text):
        number, began = next(numbers), time.time()
        echo(f"[{number}/{steps}] {text}")
        yield
        echo(f"      [{number}/{steps}] took {time.time() - began:.1f} s")

    return step


def _train_base(base_run: Path, data: Path, base_epochs: int, overwrite: bool, progress: bool, echo):
    """The demo's stand-in for a pretrained base: cifar_resnet20 on the digits 0-4 -> (its run folder, accuracy)."""
    from ktoolkit.train import TrainConfig, train

    config = TrainConfig(
        recipe="cifar_resnet20",
        data=str(data),
        out=str(base_run),
        epochs=base_epochs,
        image_size=(32, 32),
        channels=3,
        batch_size=16,
        lr=3e-3,
        schedule="cosine",
        cache="memory",
    )
    result = _reuse_or_run(base_run, lambda: train(config, progress=progress, overwrite=overwrite), echo, overwrite)
    base_accuracy = result.metrics.get("accuracy") if result else _accuracy(base_run)
    echo(f"      base: test accuracy {_measured(base_run)} on the digits 0-4  ->  {base_run}")
    return base_run, base_accuracy


def _finetune(tuned_run: Path, base, weights, data: Path, epochs: int, overwrite: bool, progress: bool, echo):
    """`ktool finetune` from ``base`` on the new task; its advice and result are echoed (None if reused)."""
    from ktoolkit.transfer.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        base=base,
        weights=weights,
        data=str(data),
        out=str(tuned_run),
        epochs=epochs,
        test_fraction=0.2,
        seed=0,
    )
    tuned = _reuse_or_run(tuned_run, lambda: finetune(config, progress=progress, overwrite=overwrite), echo, overwrite)
    if tuned is not None:
        for line in tuned.advice.lines():
            echo(f"      {line}")
        echo(f"      strategy: {tuned.strategy}; test accuracy {_measured(tuned_run)}  ->  {tuned_run}")
    return tuned


def _export_int8(tuned_run: Path, epochs: int, progress: bool, echo, finished: dict | None = None):
    """int8 TFLite export of the finetuned run, with quantization-aware training if post-training int8 misses;
    the earlier demo's file when ``finished`` (:func:`_finished`) says it is still there, unchanged."""
    from ktoolkit.export import export

    if finished is not None:
        exported = _ReusedExport(finished)
        echo(f"      {exported.files[0].path} is already exported and verified: reused")
    else:
        exported = export(str(tuned_run), mode="int8", int8_io=True, progress=progress)
    if not exported.ok and finished is None:
        echo(
            f"      int8 lost more than 1 point ({_verdict(exported.files[0])}); trying quantization-aware training "
            f"({epochs} epochs)"
        )
        # a small learning rate: QAT starts from a trained model and only has to adapt it to int8 (at
        # export's default 1e-3 a pretrained MobileNetV2 falls to chance within two epochs)
        exported = export(str(tuned_run), mode="qat", int8_io=True, epochs=epochs, lr=1e-5, progress=progress)
    tflite = exported.files[0]
    echo(f"      {tflite.path.name}: {tflite.size_bytes / 1024:.0f} KB; {_verdict(tflite)}")
    if not tflite.passed:
        echo(
            f"      int8 did not keep this model's accuracy (docs/troubleshooting.md, Export); float16 halves the file "
            f"without integer arithmetic, verified the same way: `ktool export --model {tuned_run} --mode float16`"
        )
    return exported


def _benchmark(tflite, echo, finished: dict | None = None) -> list[dict]:
    """Latency rows of the exported file with LiteRT, 1 and 2 threads (the earlier demo's, when ``finished``
    has them)."""
    from tflite_export import benchmark

    if finished is not None and finished.get("latency"):
        latency = finished["latency"]
        echo("      latency of the same file measured by the earlier demo: reused")
    else:
        latency = benchmark(str(tflite.path), threads=(1, 2), runs=50, warmup=5)
    for row in latency:
        echo(f"      {row['threads']} thread(s): p50 {row['p50_ms']:.3f} ms, p90 {row['p90_ms']:.3f} ms")
    return latency


# The demo's own record of its export and benchmark (a run folder's state.json does this for the training steps).
_RECORD = "demo.json"


def _record(root: Path, tuned_run: Path, tflite, ok: bool, latency: list | None = None):
    """Writes ``root/demo.json``: the exported file (path, size, modification time, verdict), which finetune
    run it came from (its marker) and the latency rows, so the next demo can reuse both steps."""
    from ktoolkit.io import write_json
    from ktoolkit.runs import MARKER, Run

    v = tflite.verification
    stat = tflite.path.stat()
    write_json(
        root / _RECORD,
        {
            "finetune_marker": Run(tuned_run).read_state().get(MARKER),
            "file": {"path": str(tflite.path), "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "description": tflite.description,
            "passed": bool(tflite.passed),
            "ok": bool(ok),
            "verification": {k: getattr(v, k) for k in ("images", "accuracy", "keras_accuracy", "agreement")},
            "latency": latency or [],
        },
    )


def _finished(root: Path, tuned_run: Path) -> dict | None:
    """The earlier demo's record when its file is still the one it verified, from this finetune run; else None."""
    from ktoolkit.io import read_json_object
    from ktoolkit.runs import MARKER, Run

    record = read_json_object(root / _RECORD)
    try:
        path = Path(record["file"]["path"])
        stat = path.stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = (stat.st_size, stat.st_mtime_ns) == (record["file"]["size_bytes"], record["file"]["mtime_ns"])
    marker = Run(tuned_run).read_state().get(MARKER)
    return record if same and marker is not None and record.get("finetune_marker") == marker else None


@dataclass
class _ReusedExport:
    """An earlier demo's export, read back from its record: what the demo's page and lines need of an
    ExportResult."""

    record: dict

    @property
    def files(self) -> list:
        from types import SimpleNamespace

        r = self.record
        return [
            SimpleNamespace(
                path=Path(r["file"]["path"]),
                size_bytes=r["file"]["size_bytes"],
                description=r["description"],
                passed=r["passed"],
                verification=SimpleNamespace(**r["verification"]),
            )
        ]

    @property
    def ok(self) -> bool:
        return bool(self.record["ok"])


def _reuse_or_run(folder: Path, run, echo, overwrite: bool = False):
    """Runs a step, or reuses it when its run folder is already complete (returns None then)."""
    from ktoolkit.runs import Run

    if not overwrite and Run(folder).read_state().get("complete"):
        echo(f"      {folder} is already complete: reused (`ktool demo --overwrite` starts over)")
        return None
    return run()


def _accuracy(folder: Path) -> float:
    import json

    from ktoolkit.runs import Run

    return json.loads(Run(folder).metrics.read_text())["accuracy"]


def _measured(folder: Path) -> str:
    """A run folder's test accuracy with its image count and 95% interval (from its metrics.json)."""
    import json

    from ktoolkit.runs import Run
    from ktoolkit.stats import Accuracy

    return Accuracy.from_metrics(json.loads(Run(folder).metrics.read_text())).text()


def _interval(fraction: float, images: int) -> str:
    """``93.50% [89.7, 95.9]``: a verified file's accuracy with its 95% Wilson interval."""
    from ktoolkit.stats import Accuracy

    low, high = Accuracy(round(fraction * images), images).interval
    return f"{fraction:.2%} [{100 * low:.1f}, {100 * high:.1f}]"


def _verdict(f) -> str:
    v = f.verification
    return (
        f"accuracy {_interval(v.accuracy, v.images)} against {_interval(v.keras_accuracy, v.images)} for the Keras "
        f"model on {v.images} test images, "
        f"top-1 agreement {v.agreement:.1%}, {'within' if f.passed else 'OVER'} the 1-point budget"
    )


def _write_page(result: DemoResult, folders, base, tflite):
    """DEMO.md: what was done, the numbers, and links to every report."""
    import json

    from ktoolkit.io import write_text

    root = result.root
    tuned = root / "finetune"
    decision = json.loads((tuned / "decision.json").read_text())
    v = tflite.verification
    lines = [
        "# ktoolkit demo",
        "",
        f"Finished in {result.seconds:.0f} s (this run; finished steps of earlier runs are reused). Every step "
        "is a run folder with its own report.",
        "",
        f"1. **Data**: `{folders['0-4']}` and `{folders['5-9']}`, scikit-learn's handwritten digits as class folders.",
    ]
    if result.base_accuracy is not None:
        lines.append(
            f"2. **Base**: cifar_resnet20 trained on the digits 0-4, test accuracy {_measured(root / 'base')} "
            f"([report](base/report.md))."
        )
    else:
        lines.append(f"2. **Base**: `{base}`.")
    advice = decision["advice"]
    lines += [
        f"3. **Transfer** to the digits 5-9 ([report](finetune/report.md)): {advice['images_per_class']:.0f} training "
        f"images per class, similarity {advice['similarity']:.3f} -> {advice['decision']['quadrant']} -> strategy "
        f"**{decision['strategy']}**; test accuracy {_measured(tuned)} "
        "([confusion matrix](finetune/confusion_matrix.png)).",
        f"4. **Export**: `{tflite.path.relative_to(root)}`, {tflite.size_bytes / 1024:.0f} KB "
        f"({tflite.description}); on the test split {_interval(v.accuracy, v.images)} against "
        f"{_interval(v.keras_accuracy, v.images)} for the Keras "
        f"model, top-1 agreement {v.agreement:.1%}: **{'within' if tflite.passed else 'OVER'} the 1-point budget** "
        "([export report](finetune/export/export_report.md)).",
        "5. **Latency** on this machine (LiteRT, XNNPACK): "
        + ", ".join(f"{r['threads']} thread(s) p50 {r['p50_ms']:.3f} ms" for r in result.latency)
        + ".",
        "",
        "Next: the same commands on your own folder of images (README: *Transfer learning*), the .tflite file on",
        "Android (docs/android.md) or a Jetson (docs/jetson.md).",
        "",
    ]
    write_text(result.report, "\n".join(lines))
