"""The export's verdict and report: :class:`Gate` (is a file within the accuracy budget, and do the images
say so?), export_report.json (an entry per file in the folder, keyed by file name), export_report.md (the
latest export in full, then every file in the folder, newest export first) and, when one export compares
several modes, export_compare.png (size, accuracy and latency of each file side by side)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ktoolkit.io import save_figure, write_json, write_text
from ktoolkit.stats import Accuracy, PairedDifference, paired_difference
from tflite_export.untrusted import confined, read_capped, sanitize_text

log = logging.getLogger(__name__)

REPORT_MD, REPORT_JSON, COMPARE_PNG = "export_report.md", "export_report.json", "export_compare.png"
MODEL_SUFFIXES = (".tflite", ".onnx", ".saved_model")  # what ktool export writes (a SavedModel is a folder)
MAX_REPORT_BYTES = 64 * 2**20  # a report of thousands of files is a few MB; a larger one is not ktoolkit's
WITHIN, OVER, UNDECIDED = "within budget", "over budget", "cannot decide"


@dataclass(frozen=True)
class Gate:
    """The verdict on one exported file: the Keras model and the file on the same held-out images.

    ``passed`` is the point estimate (the drop is at most the budget): it decides the file's name
    (``*.FAILED.*`` when not) and ``ktool export``'s exit status, as a single number must. ``verdict`` says
    whether the images support it: "within budget" when the drop's paired 95% interval lies at or below the
    budget, "over budget" when it lies above it, "cannot decide" when it spans it (too few images for a
    budget that small: one image is ``100 / images`` points). A file that passes on the point estimate but
    "cannot decide" is written under its plain name, and the report and the CLI say the data does not
    support the verdict.

    Attributes:
        keras: the Keras model's accuracy on the images (95% Wilson interval).
        file: the file's accuracy on the same images.
        agreement: images where the two give the same top-1 class, as an accuracy of agreeing.
        drop: Keras minus the file (fractions), Newcombe's paired interval and McNemar's exact p.
        budget: the most accuracy points the file may lose.
    """

    keras: Accuracy
    file: Accuracy
    agreement: Accuracy
    drop: PairedDifference
    budget: float

    @property
    def images(self) -> int:
        return self.file.images

    @property
    def one_image(self) -> float:
        """Accuracy points one image is worth."""
        return 100.0 / self.images if self.images else float("inf")

    @property
    def drop_points(self) -> float:
        return 100.0 * self.drop.difference

    @property
    def passed(self) -> bool:
        """The point estimate is within the budget (the file's name and the exit status follow it)."""
        return self.drop_points <= self.budget + 1e-9

    @property
    def verdict(self) -> str:
        """ "within budget", "over budget" or "cannot decide" (the paired 95% interval against the budget)."""
        if self.images and 100.0 * self.drop.high <= self.budget + 1e-9:
            return WITHIN
        if self.images and 100.0 * self.drop.low > self.budget + 1e-9:
            return OVER
        return UNDECIDED

    @property
    def supported(self) -> bool:
        """The images decide: the verdict is not "cannot decide"."""
        return self.verdict != UNDECIDED

    def text(self) -> str:
        """One line: the verdict and why, e.g. ``cannot decide: 10 images, one image is 10 points; ...``."""
        low, high = 100.0 * self.drop.low, 100.0 * self.drop.high
        budget = f"{self.budget:g} point{'' if self.budget == 1 else 's'}"
        if self.verdict == WITHIN:
            return f"within budget: the drop is {self.drop.text()}; at most {high:+.1f}, within the {budget}"
        if self.verdict == OVER:
            return f"over budget: the drop is {self.drop.text()}; at least {low:+.1f}, over the {budget}"
        few = "; too few images to decide at all" if self.one_image > self.budget else ""
        return (
            f"cannot decide: {self.images:,} images, one image is {self.one_image:.3g} points; the budget is "
            f"{budget} and the drop's 95% interval ({low:+.1f} to {high:+.1f}) spans it{few}. The file is named "
            f"by the point estimate ({self.drop_points:+.2f}: {'passed' if self.passed else 'FAILED'}), "
            f"a verdict the data does not support; verify on more held-out images (--data)"
        )

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "one_image_points": self.one_image,
            "budget_points": self.budget,
            "keras": self.keras.to_dict(),
            "file": self.file.to_dict(),
            "agreement": self.agreement.to_dict(),
            "drop_points": self.drop_points,
            "drop_ci95_points": [100.0 * self.drop.low, 100.0 * self.drop.high],
            "only_keras_right": self.drop.only_a,
            "only_file_right": self.drop.only_b,
            "mcnemar_p": self.drop.p_value,
            "verdict": self.verdict,
            "passed": self.passed,
            "supported": self.supported,
            "text": self.text(),
        }


def judge(keras_correct, file_correct, agree, budget: float, how: str = "held-out") -> Gate:
    """The :class:`Gate` of a file from per-image booleans on the same images.

    Args:
        keras_correct: the Keras model's top-1 is the label, per image.
        file_correct: the file's top-1 is the label, per image.
        agree: the two top-1 classes are the same, per image.
        budget: the most accuracy points the file may lose.
        how: where the images come from, for the accuracies ("test + val", ...).
    """
    keras_correct, file_correct, agree = (np.asarray(a, bool) for a in (keras_correct, file_correct, agree))
    if not keras_correct.shape == file_correct.shape == agree.shape:
        raise ValueError(f"{keras_correct.size}, {file_correct.size} and {agree.size} images: judge needs the same.")
    n = int(keras_correct.size)
    return Gate(
        keras=Accuracy(int(keras_correct.sum()), n, how),
        file=Accuracy(int(file_correct.sum()), n, how),
        agreement=Accuracy(int(agree.sum()), n, how),
        drop=paired_difference(keras_correct, file_correct),
        budget=float(budget),
    )


def write_report(folder, results, *, source_info: dict, settings: dict, changed_png: Path | None = None) -> dict:
    """Writes the report files into ``folder`` (and nowhere else); returns their paths by kind ("md",
    "json", "png").

    export_report.json keeps ``source``, ``settings`` and ``exports`` of this export (as before) and
    ``files``: an entry per file in the folder, keyed by file name, newest export first. An entry of an
    earlier export stays until its file is replaced or gone; a file this export rewrote gets its new entry.
    ``changed_png``: this export's export_changed.png (:func:`write_changed_picture`), shown in the report.
    """
    folder = Path(folder)
    paths = {"md": confined(folder, REPORT_MD), "json": confined(folder, REPORT_JSON)}
    at = datetime.now(UTC).isoformat(timespec="milliseconds")
    current = {
        r.path.name: {**r.to_dict(), "exported_at": at, "source": source_info, "settings": settings} for r in results
    }
    previous = _previous_entries(folder)
    merged = {**current, **{name: e for name, e in previous.items() if name not in current}}
    files = {name: e for name, e in merged.items() if _still_there(folder, name)}
    files = dict(sorted(files.items(), key=lambda kv: str(kv[1].get("exported_at") or ""), reverse=True))
    doc = {"source": source_info, "settings": settings, "exports": [r.to_dict() for r in results], "files": files}
    write_json(paths["json"], doc)
    if len(results) > 1:
        paths["png"] = confined(folder, COMPARE_PNG)
        plot_comparison(results, paths["png"])
    md = _markdown(results, source_info, settings, paths.get("png"))
    if changed_png is not None:
        paths["changed_png"] = Path(changed_png)
        md += "\nImages whose top-1 class an exported file changes:\n\n"
        md += f"![changed predictions]({Path(changed_png).name})\n"
    write_text(paths["md"], md + _folder_markdown(folder, files, set(current)))
    return paths


def _previous_entries(folder: Path) -> dict:
    """The ``files`` of the export_report.json already in ``folder`` (an older one's ``exports`` by file
    name); {} when there is none. One that cannot be read is moved aside (``.unreadable``), with a warning."""
    path = confined(folder, REPORT_JSON)
    if path.is_symlink() or not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            doc = json.loads(read_capped(f, MAX_REPORT_BYTES, str(path)))
        if not isinstance(doc, dict):
            raise ValueError("it is not a JSON object")
    except (OSError, ValueError) as err:
        aside = confined(folder, REPORT_JSON + ".unreadable")
        log.warning("%s could not be read (%s); moved to %s, and a new report started", path, err, aside.name)
        path.replace(aside)
        return {}
    files = doc.get("files")
    if isinstance(files, dict):
        return {str(k): v for k, v in files.items() if isinstance(v, dict)}
    older = {}  # a report of an older ktoolkit: the last export's files only
    for e in doc.get("exports") or ():
        if isinstance(e, dict) and isinstance(e.get("path"), str):
            older[Path(e["path"]).name] = {**e, "source": doc.get("source"), "settings": doc.get("settings")}
    return older


def _still_there(folder: Path, name: str) -> bool:
    """The entry's file is in the folder (a name that is not a plain file name there is dropped)."""
    try:
        return os.path.lexists(confined(folder, name))
    except ValueError:
        return False


def _markdown(results, source_info, settings, png) -> str:
    """This export in full: where the images come from, the verdicts, the table, each file's details."""
    lines = [f"# Export of {sanitize_text(source_info['name'])}", "", _intro(results, source_info, settings), ""]
    lines += [*_status(results), ""]
    lines += [
        (
            f"Sizes: the file, and gzipped, with how many times smaller than the float32 .keras model "
            f"({_size(source_info['keras_file_bytes'])} without optimizer state) it is. Latency: "
            f"{settings['threads']} thread(s), every file of this export timed together, interleaved (round-robin, "
            f"{settings['latency_runs']} single-image runs each), median; x float32: its ratio to the float32 file."
        ),
        "",
        (
            "| mode | file | size | gzipped | accuracy (95% CI) | drop, points (95% CI) | McNemar p | "
            "top-1 agreement (95% CI) | largest class change | latency (p50) | x float32 | verdict | status |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r, source_info) for r in results]
    if png:
        lines += ["", f"![size, accuracy and latency]({png.name})"]
    for r in results:
        lines += _details(r)
    return "\n".join(lines) + "\n"


def _intro(results, source_info, settings) -> str:
    splits = source_info.get("verdict_splits") or {source_info["split"]: source_info["images"]}
    gate = results[0].gate
    parts = " and ".join(f"the `{name}` split ({count:,})" for name, count in splits.items())
    added = ""
    if len(splits) > 1:
        added = (
            f" (`val` added because the test split has fewer than {source_info.get('min_verdict_images', 300)} "
            f"images; val chose the run's best epoch, which flatters the Keras model's accuracy on it a little, "
            f"not the drop, a paired comparison)"
        )
    return (
        f"From `{source_info['origin']}`; the Keras model and every file run on the same {gate.images:,} held-out "
        f"images: {parts} of `{source_info['data']}`{added}, no training image among them. Accuracy budget: at "
        f"most {settings['max_accuracy_drop']:g} point(s) below the Keras model's {gate.keras.text()}; one image "
        f"is {gate.one_image:.3g} points. The verdict compares the drop's paired 95% interval (Newcombe) with "
        f"the budget; McNemar's exact p says whether file and model differ at all. (export_report.json's "
        f"`verification` is on the `{source_info['split']}` split alone, {source_info['images']:,} images, as "
        f"the run's own report measures it.)"
    )


def _status(results) -> list[str]:
    """The bold status line, and a line per file whose verdict the images do not support."""
    ok = all(r.passed for r in results)
    undecided = [r for r in results if not r.gate.supported]
    if not ok:
        status = (
            "**FAILED: some files lose more accuracy than the budget allows.** They are kept, named `*.FAILED.*`; "
            "do not ship them."
        )
    elif undecided:
        status = (
            f"**All files are within the budget** on the point estimate of the drop (their names follow it), but "
            f"the held-out images cannot decide it for {len(undecided)} of {len(results)}."
        )
    else:
        status = "**All files are within the budget.**"
    lines = [status]
    if undecided:
        lines += ["", "**The images cannot decide for every file:**", ""]
        lines += [f"- {r.mode} (`{r.path.name}`): {r.gate.text()}." for r in undecided]
    return lines


def _row(r, source_info) -> str:
    g = r.gate
    gz = f"{_size(r.gzip_bytes)} ({source_info['keras_file_bytes'] / r.gzip_bytes:.1f}x)" if r.gzip_bytes else "-"
    v = r.verification
    ratio = r.latency.get("vs_float32")
    return (
        f"| {r.mode} | `{r.path.name}` | {_size(r.size_bytes)} | {gz} | {_interval(g.file)} | "
        f"{g.drop_points:+.2f} ({100 * g.drop.low:+.1f} to {100 * g.drop.high:+.1f}) | {g.drop.p_value:.2g} | "
        f"{_interval(g.agreement)} | {v.max_class_change:+.1f} ({sanitize_text(v.max_class_change_class)}) | "
        f"{r.latency_ms:.2f} ms | {'-' if ratio is None else f'{ratio:.2f}x'} | {g.verdict} | "
        f"{'ok' if r.passed else 'FAILED'} |"
    )


def _details(r) -> list[str]:
    lines = ["", f"## {r.mode}: `{r.path.name}`", "", r.description, "", f"- verdict: {r.gate.text()}"]
    if r.replaced:
        lines.append(f"- replaced the previous export's `{r.replaced}`")
    lines += [f"- {note}" for note in r.notes]
    if r.ops:
        ops = ", ".join(f"{name} x{count}" for name, count in r.ops["ops"].items())
        lines += [f"- operators: {ops}"]
        for key, who in (("gpu_unsupported", "GPU delegate"), ("nnapi_unsupported", "NNAPI")):
            gaps = r.ops[key]
            lines.append(
                f"- {who}: "
                + (
                    "takes every operator"
                    if not gaps
                    else "would leave to the CPU: "
                    + "; ".join(f"#{g['index']} {g['op']} ({g['reason']})" for g in gaps)
                )
            )
        lines += [f"- NNAPI note: {note}" for note in r.ops["notes"]]
    return lines


def _folder_markdown(folder: Path, files: dict, current: set) -> str:
    """Every file in the folder, newest export first, from the report's entries; then the model files the
    report has no entry for (an older ktoolkit's, or not ktoolkit's)."""
    lines = [
        "",
        "## Every file in this folder, newest export first",
        "",
        "| file | mode | exported (UTC) | input | held-out images | accuracy (95% CI) | drop, points (95% CI) | "
        "verdict | latency (p50) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_entry_row(name, entry, name in current) for name, entry in files.items()]
    unknown = [name for name in _model_files(folder) if name not in files]
    if unknown:
        names = ", ".join(f"`{sanitize_text(name)}`" for name in unknown)
        lines += ["", f"Not described by this report (an older ktoolkit's, or not ktoolkit's): {names}."]
    return "\n".join(lines) + "\n"


def _entry_row(name: str, e: dict, new: bool) -> str:
    """A row of the folder's table from a report entry (earlier entries were read from disk: every field is
    checked, and shown as "?" when it is not what ktoolkit writes)."""
    gate = e.get("gate") if isinstance(e.get("gate"), dict) else {}
    ver = e.get("verification") if isinstance(e.get("verification"), dict) else {}
    images = _number(gate.get("images", ver.get("images")), "{:,.0f}")
    accuracy = _number(_get(gate, "file", "accuracy"), "{:.2%}", ver.get("accuracy"))
    ci = gate.get("drop_ci95_points")
    low, high = ci if isinstance(ci, list) and len(ci) == 2 else (None, None)
    drop = _number(gate.get("drop_points", ver.get("accuracy_drop")), "{:+.2f}")
    if _number(low, "{}") != "?" and _number(high, "{}") != "?":
        drop += f" ({low:+.1f} to {high:+.1f})"
    latency = _number(_get(e, "latency", "p50_ms"), "{:.2f} ms")
    shape, dtype = _get(e, "input", "shape"), _get(e, "input", "dtype")
    shown = (
        "x".join(str(int(d)) for d in shape)
        if isinstance(shape, list) and all(isinstance(d, int) for d in shape)
        else "?"
    )
    cells = [
        f"`{sanitize_text(name)}`" + (" (this export)" if new else ""),
        sanitize_text(e.get("mode", "?")),
        sanitize_text(e.get("exported_at") or "(an older report)"),
        f"{shown} {sanitize_text(dtype or '')}".strip(),
        images,
        accuracy,
        drop,
        sanitize_text(gate.get("verdict", "(not judged)")),
        latency,
        "ok" if e.get("passed") is True else "FAILED" if e.get("passed") is False else "?",
    ]
    return "| " + " | ".join(cells) + " |"


def _get(d, *keys):
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _number(value, form: str, fallback=None) -> str:
    """``value`` formatted when it is a number (else ``fallback``'s, else "?")."""
    for v in (value, fallback):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            return form.format(v)
    return "?"


def _model_files(folder: Path) -> list[str]:
    """Names of the model files and SavedModel folders directly in ``folder`` (links are listed, not followed)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.name.endswith(MODEL_SUFFIXES) and not e.name.startswith("."))


def _interval(acc: Accuracy) -> str:
    """``91.20% (95% CI 88.1-93.6%)``."""
    low, high = acc.interval
    return f"{100 * acc.value:.2f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%)"


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def plot_comparison(results, path) -> None:
    """Three panels, one bar per mode: file size (KB or MB), accuracy (%, with the gate's budget band below the
    Keras model's accuracy) and latency (ms); a file over the budget in red."""
    from matplotlib.ticker import FuncFormatter

    from ktoolkit.report import _pyplot

    plt = _pyplot()
    names = [r.mode for r in results]
    mb = max(r.size_bytes for r in results) >= 2**20
    unit, scale = ("MB", 2**20) if mb else ("KB", 2**10)
    accuracy = [100 * r.gate.file.value for r in results]
    latency = [r.latency_ms for r in results]
    panels = [  # (title, values, the label written at each bar)
        (f"file size ({unit})", [r.size_bytes / scale for r in results], [_size(r.size_bytes) for r in results]),
        ("held-out accuracy (%)", accuracy, [f"{v:.2f}%" for v in accuracy]),
        ("latency p50 (ms)", latency, [f"{v:.2f} ms" for v in latency]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.5 * len(results) + 2.2))
    colors = ["tab:blue" if r.passed else "tab:red" for r in results]
    for ax, (title, values, texts) in zip(axes, panels):
        ax.barh(names, values, color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))  # 8,690, never 8.69e+03
        for i, (value, text) in enumerate(zip(values, texts)):
            ax.text(value, i, f" {text}", va="center", fontsize=8)
    keras, budget = 100 * results[0].gate.keras.value, results[0].gate.budget
    axes[1].axvspan(keras - budget, keras, color="tab:green", alpha=0.3, zorder=3, label=f"budget: {budget:g} point(s)")
    axes[1].axvline(keras, color="black", linestyle="--", linewidth=1, label=f"Keras {keras:.2f}%")
    axes[1].set_xlim(min(keras - budget, *panels[1][1]) - 5, 100.5)
    axes[1].legend(loc="lower right", fontsize=8)
    for ax in (axes[0], axes[2]):
        ax.set_xlim(right=ax.get_xlim()[1] * 1.25)  # room for the value labels
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


CHANGED_PNG = "export_changed.png"


def write_changed_picture(folder, dataset, keras_probs, labels, class_names, file_probs: dict) -> Path | None:
    """export_changed.png in ``folder``: the held-out images whose top-1 class changed between the Keras model
    and an exported file, a row per file (mode) with changes, at most 8 each (the file's most confident
    changes first), captioned Keras's class and the file's with their probabilities, red where the file is
    wrong. ``file_probs``: {mode: the file's probabilities on ``dataset``, in its order}. Returns the path, or
    None (and an older picture removed) when no file changed any prediction."""
    from ktoolkit.report import dataset_images, draw_image_grid, short_name

    path = confined(Path(folder), CHANGED_PNG)
    keras_top, labels = np.asarray(keras_probs).argmax(-1), np.asarray(labels)
    picked = {}
    for mode, probs in file_probs.items():
        probs = np.asarray(probs)
        changed = np.flatnonzero(probs.argmax(-1) != keras_top)
        picked[mode] = changed[np.argsort(-probs[changed].max(-1), kind="stable")][:8]
    picked = {mode: idx for mode, idx in picked.items() if len(idx)}
    if not picked:
        path.unlink(missing_ok=True)
        return None
    images = dataset_images(dataset, sorted({int(i) for idx in picked.values() for i in idx}))
    names = [short_name(n) for n in class_names]
    rows = []
    for mode, idx in picked.items():
        probs = np.asarray(file_probs[mode])
        rows.append(
            [
                (
                    images.get(int(i)),
                    f"Keras {names[keras_top[i]]} {keras_probs[i, keras_top[i]]:.0%}\n"
                    f"file {names[probs[i].argmax()]} {probs[i].max():.0%}",
                    bool(probs[i].argmax() != labels[i]),
                )
                for i in idx
            ]
        )
    title = "held-out images whose top-1 class the exported file changes (red: the file is wrong)"
    draw_image_grid(rows, path, row_labels=[short_name(m) for m in picked], title=title, columns=8)
    return path
