"""Pictures and the run report: training curves, the confusion matrix, report.md and report.html."""

from __future__ import annotations

import html
import json
import re

import numpy as np

from ktoolkit.io import save_figure, write_text
from ktoolkit.runs import Run
from ktoolkit.stats import Accuracy


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path, title: str = "") -> None:
    """Loss, accuracy and learning rate per epoch, training and validation side by side.

    The accuracy panel is left out when the history has no accuracy (e.g. `ktool pretrain`'s).
    """
    plt = _pyplot()
    columns = set(history[0]) if history else set()
    panels = [
        (key, label)
        for key, label in (("loss", "loss"), ("accuracy", "accuracy"), ("lr", "learning rate"))
        if key != "accuracy" or any(c == key or c.endswith(f"_{key}") for c in columns)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(13 * len(panels) / 3, 3.6))
    epochs = [row["epoch"] + 1 for row in history]
    for ax, (key, label) in zip(axes, panels):
        for prefix, style in (("", "-"), ("val_", "--")):
            names = [
                k for k in (history[0] if history else {}) if k == prefix + key or k == f"{prefix}predictions_{key}"
            ]
            if names:
                ax.plot(
                    epochs,
                    [row.get(names[0], np.nan) for row in history],
                    style,
                    marker="o",
                    markersize=3,
                    label="validation" if prefix else "training",
                )
        ax.set_xlabel("epoch")
        ax.set_title(label)
        if key == "lr":
            ax.set_yscale("log")
        elif ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
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
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_xticks(range(n), class_names, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticks(range(n), class_names)
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
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(run: Run, extra_sections: list[tuple[str, str]] | None = None) -> None:
    """Writes report.md and report.html from what the run folder holds.

    ``extra_sections`` are (heading, Markdown body) pairs that other commands add (e.g. the transfer
    learning decision).
    """
    import yaml

    config = yaml.safe_load(run.config.read_text()) if run.config.exists() else {}
    data = json.loads(run.data.read_text()) if run.data.exists() else {}
    metrics = json.loads(run.metrics.read_text()) if run.metrics.exists() else {}
    state = run.read_state()
    model = config.get("base") or config.get("recipe", "?")
    lines = [f"# Run report: {model} on {config.get('data', '?')}", ""]
    if state:
        epochs = (
            f"Epochs completed: {state['epochs_completed']} of {state.get('epochs', '?')}; "
            if state.get("epochs_completed") is not None
            else "No epochs (a classifier fit on cached features); "
        )
        lines += [
            epochs
            + f"{'finished' if state.get('complete') else 'not finished'}"
            + (f" in {state['seconds']:.0f} s." if state.get("seconds") else "."),
            "",
        ]
    if metrics:
        lines += _results_section(metrics)
    for heading, body in extra_sections or []:
        lines += [f"## {heading}", "", body.rstrip(), ""]
    if run.curves.exists():
        lines += ["## Training", "", "![training curves](curves.png)", ""]
    if data:
        lines += _data_section(data)
    if config:
        lines += ["## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    markdown = "\n".join(lines)
    write_text(run.report_md, markdown)
    write_text(run.report_html, _markdown_to_html(markdown, title=lines[0].lstrip("# ")))


def _results_section(metrics: dict) -> list[str]:
    """The Results section: the metrics table, the confusion matrix, per-class scores, most confused pairs."""
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


def _data_section(data: dict) -> list[str]:
    """The Data section: source, classes, image size, images per split, skipped files."""
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
    return lines


def _markdown_to_html(markdown: str, title: str) -> str:
    """A small converter for the report's own Markdown (headings, tables, images, lists, code)."""
    out, table, code = [], [], False

    def inline(text):
        text = html.escape(text)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:100%">', text)
        text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)

    def flush_table():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            out.append(
                "<table>"
                + "".join(
                    "<tr>"
                    + "".join(f"<{'th' if i == 0 else 'td'}>{inline(c)}</{'th' if i == 0 else 'td'}>" for c in row)
                    + "</tr>"
                    for i, row in enumerate(cells)
                )
                + "</table>"
            )
            table.clear()

    for line in markdown.splitlines():
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
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(out)}</body></html>\n"
    )
