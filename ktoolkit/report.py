"""Pictures and the run report: training curves, the confusion matrix, report.md and report.html."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np

from ktoolkit.io import atomic_path, save_figure, write_text
from ktoolkit.runs import Run
from ktoolkit.stats import Accuracy


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path, title: str = "", lr_groups: dict | None = None) -> None:
    """Loss, accuracy (percent) and learning rate per epoch, training and validation side by side; whole epochs on
    the x axis.

    The accuracy panel is left out when the history has no accuracy (e.g. `ktool pretrain`'s). ``lr_groups``
    ({group: its rate over the logged one}) draws one learning-rate curve per group when several groups train
    at different rates (finetune: the logged rate is the fastest group's; the others follow the same schedule).
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    columns = set(history[0]) if history else set()
    panels = [
        (key, label)
        for key, label in (("loss", "loss"), ("accuracy", "accuracy (%)"), ("lr", "learning rate"))
        if key != "accuracy" or any(c == key or c.endswith(f"_{key}") for c in columns)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(13 * len(panels) / 3, 3.6))
    epochs = [row["epoch"] + 1 for row in history]
    for ax, (key, label) in zip(axes, panels):
        scale = 100.0 if key == "accuracy" else 1.0
        for prefix, style in (("", "-"), ("val_", "--")):
            names = [k for k in columns if k == prefix + key or k == f"{prefix}predictions_{key}"]
            if names and not (key == "lr" and lr_groups and len(lr_groups) > 1):
                values = [scale * row.get(sorted(names)[0], np.nan) for row in history]
                ax.plot(epochs, values, style, marker="o", markersize=3, label="validation" if prefix else "training")
        if key == "lr" and lr_groups and len(lr_groups) > 1 and "lr" in columns:
            for group, factor in lr_groups.items():
                ax.plot(
                    epochs, [factor * row.get("lr", np.nan) for row in history], marker="o", markersize=3, label=group
                )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        if key == "lr" and all(y > 0 for line in ax.lines for y in line.get_ydata() if np.isfinite(y)):
            ax.set_yscale("log")  # not when a schedule reaches 0 (warm-up's first step, cosine's last)
        if ax.lines and (key != "lr" or (lr_groups and len(lr_groups) > 1)):
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, parse_math=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_confusion_matrix(cm: np.ndarray, class_names, path, title: str = "") -> None:
    """The confusion matrix, rows normalized to the true class, counts written in the cells."""
    plt = _pyplot()
    n = len(class_names)
    size = min(4 + 0.45 * n, 22)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    from matplotlib.ticker import PercentFormatter

    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class", format=PercentFormatter(1.0))
    shown = [short_name(name, 24) for name in class_names]
    ax.set_xticks(range(n), shown, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center", parse_math=False)
    ax.set_yticks(range(n), shown, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    if title:
        ax.set_title(title, parse_math=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# The pictures a run folder (or an evaluation's folder) may hold, by file name, in the order the report shows them.
TRAIN_IMAGES_PNG, PREDICTIONS_PNG, TOP_LOSSES_PNG, MOST_CONFUSED_PNG = (
    "train_images.png",
    "predictions.png",
    "top_losses.png",
    "most_confused.png",
)
PICTURE_FILES = (TRAIN_IMAGES_PNG, PREDICTIONS_PNG, TOP_LOSSES_PNG, MOST_CONFUSED_PNG)
NO_IMAGES = "no such images"  # the caption of a cell that stands for an empty row
MAX_THUMBNAILS = 64  # the most images one picture shows (it stays a few hundred KB)
NAME_CHARS = 16  # class names are cut to this many characters in a picture (they come from files)
PREDICTION_SAMPLE, TOP_LOSSES, CONFUSED_EXAMPLES = 32, 16, 8  # images in predictions / top_losses / each direction


def short_name(name, limit: int = NAME_CHARS) -> str:
    """A class name made safe to draw as plain text (no control characters) and cut to ``limit`` characters."""
    from tflite_export.untrusted import sanitize_text

    text = sanitize_text(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def draw_image_grid(rows, path, *, row_labels=None, title: str = "", columns: int | None = None) -> None:
    """A grid of thumbnails, a row per list in ``rows``; each cell is (uint8 image (h, w, c) or None, caption,
    marked). A marked cell gets a red caption and frame (a wrong prediction); None is an unreadable image.

    Drawn with Pillow into one image (a matplotlib figure of 64 axes takes seconds; this takes milliseconds):
    every caption and label is plain text, and at most :data:`MAX_THUMBNAILS` cells are drawn.
    """
    from PIL import Image, ImageDraw

    kept, left = [], MAX_THUMBNAILS
    for row in rows:
        if left <= 0:
            break
        kept.append(list(row)[:left])
        left -= len(kept[-1])
    columns = columns or max((len(row) for row in kept), default=1)
    font = _font(11)
    labels_width = 120 if row_labels else 0
    top = 30 if title else 6
    width, height = labels_width + columns * _CELL[0] + 6, top + len(kept) * _CELL[1] + 6
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 8), _fit(draw, title, width - 12, font), fill="black", font=font)
    for r, row in enumerate(kept):
        y = top + r * _CELL[1]
        if row_labels:
            draw.text(
                (4, y + _CELL[1] // 2), _fit(draw, row_labels[r], labels_width - 8, font), fill="black", font=font
            )
        for c, (image, caption, marked) in enumerate(row):
            _draw_cell(canvas, draw, (labels_width + c * _CELL[0] + 3, y), image, caption, marked, font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", optimize=False)


_CELL = (112, 134)  # width, height of one grid cell in pixels: a 96-pixel thumbnail under two caption lines
_THUMB = 96


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, width: int, font) -> str:
    """Each line of ``text`` cut (with an ellipsis) to ``width`` pixels."""
    lines = []
    for line in str(text).split("\n"):
        while line and draw.textlength(line, font=font) > width:
            line = line[:-2] + "…" if len(line) > 2 else ""
        lines.append(line)
    return "\n".join(lines)


def _draw_cell(canvas, draw, origin, image, caption: str, marked: bool, font) -> None:
    from PIL import Image

    x, y = origin
    colour = (214, 39, 40) if marked else (0, 0, 0)
    lines = str(caption).split("\n")[:2] if caption else []
    for k, line in enumerate(lines):
        draw.text((x + 2, y + 2 + 13 * k), _fit(draw, line, _CELL[0] - 6, font), fill=colour, font=font)
    box = (x + (_CELL[0] - _THUMB) // 2 - 3, y + 30, x + (_CELL[0] + _THUMB) // 2 - 3, y + 30 + _THUMB)
    if image is None:
        empty = caption == NO_IMAGES
        draw.text((box[0] + 8, box[1] + _THUMB // 2 - 6), caption if empty else "unreadable", fill="black", font=font)
    else:
        pixels = np.asarray(image, np.uint8)
        picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        small = max(picture.size) < _THUMB
        picture = picture.resize((_THUMB, _THUMB), Image.NEAREST if small else Image.BILINEAR)
        canvas.paste(picture.convert("RGB"), box[:2])
    draw.rectangle(
        (box[0] - 2, box[1] - 2, box[2] + 1, box[3] + 1),
        outline=colour if marked else (187, 187, 187),
        width=3 if marked else 1,
    )


def split_images(split, indices, image_size, channels) -> list:
    """The images of ``split`` at ``indices`` as the model sees them (uint8 (h, w, c)), read through the
    training pipeline's own decoding and resizing; None for a file that no longer decodes."""
    import tensorflow as tf

    from ktoolkit.data.pipeline import load_image, model_pixels

    height, width = image_size
    indices = [int(i) for i in indices]
    if split.kind == "paths":
        out = []
        for i in indices:
            try:
                out.append(load_image(split.paths[i], height, width, channels))
            except ValueError:
                out.append(None)
        return out
    if split.kind == "images":
        return [model_pixels(tf.constant(split.images[i]), height, width, channels).numpy() for i in indices]
    ordered = sorted(set(indices))  # a dataset split: one pass over its examples, in their order
    subset = split.subset(ordered)
    found = {}
    for i, (image, _) in zip(ordered, subset.dataset):
        found[i] = model_pixels(image, height, width, channels).numpy()
    return [found.get(i) for i in indices]


def dataset_images(dataset, indices) -> dict:
    """{index: uint8 image} of the examples at ``indices`` of a batched dataset of (images, labels, ...), in one
    pass that stops after the last wanted index: the images exactly as the evaluation saw them."""
    wanted = sorted({int(i) for i in indices})
    found, start = {}, 0
    if not wanted:
        return found
    for batch in dataset:
        images = np.asarray(batch[0])
        for i in wanted:
            if start <= i < start + len(images):
                found[i] = np.clip(np.round(images[i - start]), 0, 255).astype(np.uint8)
        start += len(images)
        if start > wanted[-1]:
            break
    return found


def plot_training_images(split, class_names, image_size, channels, path, seed: int = 0) -> Path | None:
    """train_images.png: a few training images of each class, a row per class, labelled with the class name:
    the first thing to look at when a folder holds the wrong images. At most :data:`MAX_THUMBNAILS` images
    (with many classes, the first ``64 // 4`` classes, four each). Returns the path, or None without images."""
    if split is None or not len(split):
        return None
    labels = np.asarray(split.labels)
    per_class = int(np.clip(MAX_THUMBNAILS // max(1, len(class_names)), 4, 8))
    rng = np.random.default_rng(seed)
    rows, names = [], []
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels == c)
        if len(rows) * per_class >= MAX_THUMBNAILS or not len(members):
            continue
        picked = np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False))
        rows.append(picked)
        names.append(f"{short_name(name)}\n({len(members):,})")
    images = iter(split_images(split, np.concatenate(rows), image_size, channels))
    cells = [[(next(images), "", False) for _ in row] for row in rows]
    shown = f"{len(rows)} of {len(class_names)} classes" if len(rows) < len(class_names) else "every class"
    title = f"training images ({split.name} split), {shown}; training images per class in brackets"
    draw_image_grid(cells, path, row_labels=names, title=title, columns=per_class)
    return Path(path)


def evaluation_pictures(probs, labels, class_names, images_at, folder, split: str = "test") -> list[Path]:
    """predictions.png, top_losses.png and most_confused.png in ``folder`` from an evaluation's probabilities
    and labels; ``images_at(indices)`` gives {index: uint8 image} of the evaluated images. A picture with
    nothing to show (no wrong prediction) is not written, and an older one of that name is removed."""
    folder = Path(folder)
    picks = _picture_indices(probs, labels)
    groups = [picks["sample"], picks["top_losses"], *picks.get("directions", {}).values()]
    images = images_at(sorted({int(i) for group in groups for i in group}))
    names = [short_name(n) for n in class_names]
    predicted = probs.argmax(-1)
    written = []

    def cell(i, caption):
        return images.get(int(i)), caption, bool(predicted[i] != labels[i])

    sample = [
        cell(i, f"true {names[labels[i]]}\npred {names[predicted[i]]} {probs[i, predicted[i]]:.0%}")
        for i in picks["sample"]
    ]
    losses = [
        cell(
            i,
            f"pred {names[predicted[i]]} {probs[i, predicted[i]]:.0%}\n"
            f"true {names[labels[i]]} {probs[i, labels[i]]:.0%}",
        )
        for i in picks["top_losses"]
    ]
    pictures = {
        PREDICTIONS_PNG: (
            _rows(sample, 8),
            None,
            f"{split} images with their true and predicted class and its probability (wrong ones in red); "
            f"{len(sample)} of {len(labels):,}",
        ),
        TOP_LOSSES_PNG: (
            _rows(losses, 8),
            None,
            f"most confidently wrong {split} images (highest loss first): predicted and true class, each's probability",
        ),
    }
    confused = picks.get("confused")
    if confused:
        pictures[MOST_CONFUSED_PNG] = _confused_rows(picks, probs, names, cell, split)
    for name, (rows, row_labels, title) in pictures.items():
        path = folder / name
        if not any(rows):
            path.unlink(missing_ok=True)
            continue
        draw_image_grid(rows, path, row_labels=row_labels, title=title)
        written.append(path)
    if not confused:
        (folder / MOST_CONFUSED_PNG).unlink(missing_ok=True)
    return written


def _confused_rows(picks: dict, probs, names, cell, split: str) -> tuple:
    """(rows, row labels, title) of most_confused.png: a row per direction of the most confused pair."""
    (a, b), rows = picks["confused"], []
    for t, p in ((a, b), (b, a)):
        members = picks["directions"][t]
        rows.append([cell(i, f"pred {names[p]} {probs[i, p]:.0%}") for i in members] or [(None, NO_IMAGES, False)])
    count = picks["confused_counts"]
    labels = [f"true {names[t]}\npred {names[p]}\n({count[t, p]} images)" for t, p in ((a, b), (b, a))]
    return rows, labels, f"the most confused pair on the {split} split, each direction"


def _rows(cells: list, columns: int) -> list:
    return [cells[k : k + columns] for k in range(0, len(cells), columns)]


def _picture_indices(probs, labels, seed: int = 0) -> dict:
    """Which evaluated images each picture shows: a seeded sample, the highest losses among the wrong ones, and
    the examples of each direction of the most confused pair (both directions' errors counted together),
    most confident first."""
    n = len(labels)
    predicted = probs.argmax(-1)
    rng = np.random.default_rng(seed)
    picks = {"sample": np.sort(rng.choice(n, size=min(n, PREDICTION_SAMPLE), replace=False)) if n else []}
    wrong = np.flatnonzero(predicted != labels)
    loss = -np.log(np.clip(probs[np.arange(n), labels], 1e-12, 1.0))
    picks["top_losses"] = wrong[np.argsort(-loss[wrong], kind="stable")][:TOP_LOSSES]
    if len(wrong):
        k = probs.shape[1]
        counts = np.zeros((k, k), dtype=np.int64)
        np.add.at(counts, (labels[wrong], predicted[wrong]), 1)
        both = counts + counts.T
        a, b = np.unravel_index(int(np.argmax(np.triu(both, 1))), both.shape)
        a, b = (a, b) if counts[a, b] >= counts[b, a] else (b, a)
        picks["confused"], picks["confused_counts"] = (int(a), int(b)), counts
        picks["directions"] = {}
        for t, p in ((a, b), (b, a)):
            members = wrong[(labels[wrong] == t) & (predicted[wrong] == p)]
            picks["directions"][t] = members[np.argsort(-probs[members, p], kind="stable")][:CONFUSED_EXAMPLES]
    return picks


def write_report(run: Run, extra_sections: list[tuple[str, str]] | None = None) -> None:
    """Writes report.md and report.html from what the run folder holds.

    ``extra_sections`` are (heading, Markdown body) pairs that other commands add (e.g. the transfer
    learning decision).
    """
    import yaml

    config = yaml.safe_load(run.config.read_text()) if run.config.exists() else {}
    data = json.loads(run.data.read_text()) if run.data.exists() else {}
    metrics = json.loads(run.metrics.read_text()) if run.metrics.exists() else {}
    strategy = _feature_strategy(run)
    model = config.get("base") or config.get("recipe", "?")
    lines = [f"# Run report: {model} on {config.get('data', '?')}", ""]
    lines += _progress_lines(run.read_state(), config, strategy)
    if metrics:
        lines += _results_section(metrics, run.root)
    for heading, body in extra_sections or []:
        lines += [f"## {heading}", "", body.rstrip(), ""]
    if run.curves.exists():
        lines += ["## Training", "", "![training curves](curves.png)", ""]
    if data:
        lines += _data_section(data, run.root)
    if config:
        lines += _config_section(config, strategy)
    markdown = "\n".join(lines)
    write_text(run.report_md, markdown)
    write_text(run.report_html, _markdown_to_html(markdown, title=lines[0].lstrip("# ")))


def write_evaluation_report(folder, metrics: dict, *, model: str, data: str) -> Path:
    """report.md and report.html of `ktool evaluate` in ``folder``: the results (metrics, confusion matrix,
    per-class scores, the most confused pairs) and the pictures save_evaluation drew there."""
    folder = Path(folder)
    title = f"Evaluation of {model} on {data}"
    lines = [f"# {title}", "", *_results_section(metrics, folder)]
    markdown = "\n".join(lines)
    write_text(folder / "report.md", markdown)
    write_text(folder / "report.html", _markdown_to_html(markdown, title=title))
    return folder / "report.md"


# The settings the feature strategies (no epochs, no optimizer) do not read: left out of their report.
_UNUSED_BY_FEATURE_STRATEGIES = (
    "epochs",
    "optimizer",
    "lr",
    "momentum",
    "schedule",
    "weight_decay",
    "steps_per_epoch",
    "unfreeze",
    "lr_decay",
    "label_smoothing",
    "dropout",
    "early_stopping",
    "augment",
)


def _feature_strategy(run: Run) -> str | None:
    """The strategy of a finetune run that fit a classifier on cached features (linear, linear-early, knn), else
    None: read from decision.json."""
    path = run.root / "decision.json"
    try:
        strategy = json.loads(path.read_text()).get("strategy") if path.exists() else None
    except (OSError, ValueError, AttributeError):
        return None
    return strategy if strategy in ("linear", "linear-early", "knn") else None


def _progress_lines(state: dict, config: dict, strategy: str | None) -> list[str]:
    """``Epochs completed: 3 of 5; finished in 12 s.`` (never a "?": what is not known is left out)."""
    if not state:
        return []
    if strategy or state.get("epochs_completed") is None:
        what = "No epochs (a classifier fit on cached features); "
    else:
        planned = state.get("epochs") or config.get("epochs")
        what = f"Epochs completed: {state['epochs_completed']}" + (f" of {planned}; " if planned else "; ")
    done = "finished" if state.get("complete") else "not finished"
    return [what + done + (f" in {state['seconds']:.0f} s." if state.get("seconds") else "."), ""]


def _config_section(config: dict, strategy: str | None) -> list[str]:
    """The configuration as YAML; for a feature strategy without the settings it does not use (named)."""
    import yaml

    unused = [k for k in _UNUSED_BY_FEATURE_STRATEGIES if k in config] if strategy else []
    shown = {k: v for k, v in config.items() if k not in unused}
    lines = ["## Configuration", ""]
    if unused:
        lines += [
            f"Not used by the {strategy} strategy, so left out here (config.yaml keeps them): "
            + ", ".join(f"`{k}`" for k in unused)
            + ".",
            "",
        ]
    return lines + ["```yaml", yaml.safe_dump(shown, sort_keys=False).rstrip(), "```", ""]


def _results_section(metrics: dict, folder=None) -> list[str]:
    """The Results section: the metrics table, the confusion matrix, per-class scores, most confused pairs and
    the pictures of the evaluated images that are in ``folder``."""
    lines = [
        "## Results",
        "",
        f"On the held-out **{metrics.get('split')}** split ({metrics['images']} images):",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_with_interval(metrics['accuracy'], metrics.get('accuracy_ci95'))} |",
    ]
    if metrics.get("top5") is not None:
        lines.append(f"| top-5 accuracy | {_with_interval(metrics['top5'], metrics.get('top5_ci95'))} |")
    if metrics.get("cv"):
        lines.append(f"| cross-validated accuracy (train+val) | {Accuracy(**_accuracy_fields(metrics['cv'])).text()} |")
    if metrics.get("macro_f1") is not None:
        lines.append(f"| macro F1 | {metrics['macro_f1']:.3f} |")
    lines += [
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "| class | precision | recall (95% CI) | F1 | images |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f}{_recall_ci(c)} | {c['f1']:.3f} | {c['support']} |"
        for c in metrics.get("per_class", [])
    ]
    if metrics.get("most_confused"):
        lines += ["", "Most confused (true → predicted):", ""]
        lines += [
            f"- {m['true']} → {m['predicted']}: {m['count']} ({m['share']:.0%} of {m['true']})"
            for m in metrics["most_confused"][:5]
        ]
    lines.append("")
    return lines + (_picture_lines(folder, metrics) if folder is not None else [])


def _picture_lines(folder, metrics: dict) -> list[str]:
    """The evaluation's pictures that ``folder`` holds, each under a line that says what it shows."""
    split = metrics.get("split", "held-out")
    described = (
        (PREDICTIONS_PNG, f"Predictions on {split} images (wrong ones in red)", "predictions"),
        (TOP_LOSSES_PNG, "Most confidently wrong (the highest losses)", "top losses"),
        (MOST_CONFUSED_PNG, "The most confused pair, each direction", "most confused pair"),
    )
    lines = []
    for name, heading, alt in described:
        if (Path(folder) / name).exists():
            lines += [f"### {heading}", "", f"![{alt}]({name})", ""]
    return lines


def _recall_ci(c: dict) -> str:
    ci = c.get("recall_ci95")
    return f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""


def _with_interval(value: float, ci) -> str:
    """``93.50% (95% CI 89.7-95.9%)``; the value alone for metrics files written without the interval."""
    return f"{value:.2%}" + (f" (95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)" if ci else "")


def _accuracy_fields(d: dict) -> dict:
    """An Accuracy's fields from its to_dict()."""
    return {"correct": d["correct"], "images": d["images"], "how": d.get("how", ""), "folds": tuple(d.get("folds", ()))}


def _data_section(data: dict, folder) -> list[str]:
    """The Data section: source, classes, image size, images per split, skipped files, train_images.png."""
    lines = [
        "## Data",
        "",
        f"Source: `{data.get('source')}`; {len(data.get('classes', []))} classes; "
        f"images resized to {'x'.join(map(str, data.get('image_size', [])))}x{data.get('channels')}.",
        "",
        "| split | images |",
        "|---|---|",
    ]
    lines += [f"| {name} | {split['images']} |" for name, split in data.get("splits", {}).items()]
    skipped = data.get("skipped_files", [])
    if skipped:
        lines += ["", f"Skipped {len(skipped)} unreadable file(s):", ""]
        lines += [f"- `{s['path']}`: {s['reason']}" for s in skipped[:50]]
    lines.append("")
    if (Path(folder) / TRAIN_IMAGES_PNG).exists():
        lines += [
            "Training images, a few per class (check the labels):",
            "",
            f"![training images]({TRAIN_IMAGES_PNG})",
            "",
        ]
    return lines


def _html_table(lines: list[str], inline) -> str:
    """A Markdown table's lines as one <table>: the first row of header cells, the separator row left out."""
    rows = [r for r in lines if not set(r.replace("|", "").strip()) <= {"-"}]
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    return (
        "<table>"
        + "".join(
            "<tr>"
            + "".join(f"<{'th' if i == 0 else 'td'}>{inline(c)}</{'th' if i == 0 else 'td'}>" for c in row)
            + "</tr>"
            for i, row in enumerate(cells)
        )
        + "</table>"
    )


def _markdown_to_html(markdown: str, title: str) -> str:
    """A small converter for the report's own Markdown (headings, tables, images, lists, code)."""
    out, table, code, in_list = [], [], False, False

    def inline(text):
        text = html.escape(text)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:100%">', text)
        text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)

    def flush_table():
        if table:
            out.append(_html_table(table, inline))
            table.clear()

    for line in markdown.splitlines():
        if in_list and not code and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if line.startswith("```"):
            out.append("</pre>" if code else "<pre>")
            code = not code
            continue
        if code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:].strip())}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    if in_list:
        out.append("</ul>")
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}"
    )
    body = "\n".join(out)  # one element a line, so the <pre> block keeps its lines
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n{body}\n</body></html>\n"
    )
