"""The export report: export_report.md, export_report.json and, when several modes are compared,
export_compare.png (size, accuracy and latency of each file side by side)."""

from __future__ import annotations

from pathlib import Path

from ktoolkit.io import save_figure, write_json, write_text
from tflite_export.untrusted import confined, sanitize_text

REPORT_MD, REPORT_JSON, COMPARE_PNG = "export_report.md", "export_report.json", "export_compare.png"


def _interval(fraction: float, images: int) -> str:
    """``91.20% (95% CI 88.1-93.6%)``."""
    from ktoolkit.stats import Accuracy

    low, high = Accuracy(round(fraction * images), images).interval
    return f"{100 * fraction:.2f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%)"


def write_report(folder, results, *, source_info: dict, settings: dict) -> dict:
    """Writes the report files into ``folder`` (and nowhere else); returns their paths by kind ("md",
    "json", "png")."""
    folder = Path(folder)
    paths = {"md": confined(folder, REPORT_MD), "json": confined(folder, REPORT_JSON)}
    write_json(paths["json"], {"source": source_info, "settings": settings, "exports": [r.to_dict() for r in results]})
    if len(results) > 1:
        paths["png"] = confined(folder, COMPARE_PNG)
        plot_comparison(results, paths["png"])
    write_text(paths["md"], _markdown(results, source_info, settings, paths.get("png")))
    return paths


def _markdown(results, source_info, settings, png) -> str:
    ok = all(r.passed for r in results)
    lines = [
        f"# Export of {sanitize_text(source_info['name'])}",
        "",
        (
            f"From `{source_info['origin']}`; verified on {source_info['images']} held-out images "
            f"(the `{source_info['split']}` split of `{source_info['data']}`). Accuracy budget: at most "
            f"{settings['max_accuracy_drop']:g} point(s) below the Keras model's "
            f"{_interval(source_info['keras_accuracy'], source_info['images'])}."
        ),
        "",
        "**All files are within the budget.**"
        if ok
        else (
            "**FAILED: some files lose more accuracy than the budget allows.** They are kept, named `*.FAILED.*`; "
            "do not ship them."
        ),
        "",
        (
            f"Sizes: the file, and gzipped, with how many times smaller than the float32 .keras model "
            f"({_size(source_info['keras_file_bytes'])} without optimizer state) it is."
        ),
        "",
        (
            "| mode | file | size | gzipped | accuracy (95% CI) | drop (points) | top-1 agreement | largest class change | "
            f"latency ({settings['threads']} threads, p50) | status |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v = r.verification
        gz = f"{_size(r.gzip_bytes)} ({source_info['keras_file_bytes'] / r.gzip_bytes:.1f}x)" if r.gzip_bytes else "-"
        lines.append(
            f"| {r.mode} | `{r.path.name}` | {_size(r.size_bytes)} | {gz} | {_interval(v.accuracy, v.images)} | {v.accuracy_drop:+.2f} | "
            f"{100 * v.agreement:.1f}% | {v.max_class_change:+.1f} ({sanitize_text(v.max_class_change_class)}) | "
            f"{r.latency_ms:.2f} ms | {'ok' if r.passed else 'FAILED'} |"
        )
    if png:
        lines += ["", f"![size, accuracy and latency]({png.name})"]
    for r in results:
        lines += ["", f"## {r.mode}: `{r.path.name}`", "", r.description, ""]
        if r.notes:
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
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def plot_comparison(results, path) -> None:
    """Three panels, one bar per mode: file size, accuracy, latency."""
    from ktoolkit.report import _pyplot

    plt = _pyplot()
    names = [r.mode for r in results]
    panels = [
        ("file size (KB)", [r.size_bytes / 1024 for r in results]),
        ("held-out accuracy (%)", [100 * r.verification.accuracy for r in results]),
        ("latency p50 (ms)", [r.latency_ms for r in results]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.5 * len(results) + 2))
    colors = ["tab:blue" if r.passed else "tab:red" for r in results]
    for ax, (title, values) in zip(axes, panels):
        ax.barh(names, values, color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        for i, value in enumerate(values):
            ax.text(value, i, f" {value:.3g}", va="center", fontsize=8)
    keras = 100 * results[0].verification.keras_accuracy
    axes[1].axvline(keras, color="black", linestyle="--", linewidth=1, label=f"Keras {keras:.2f}%")
    axes[1].set_xlim(min(keras, *panels[1][1]) - 5, 100.5)
    axes[1].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
