"""Reports people would rather look at (issue 17, items 1 and 3): the pictures of training and evaluated images,
`ktool evaluate --out`, valid HTML, and a headless browser's screenshot of report.html where Chromium is installed."""

import importlib.util
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PICTURES = ("train_images.png", "predictions.png", "top_losses.png", "most_confused.png")
VOID = {"img", "meta", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    """Balanced tags, <li> only inside <ul>/<ol>, <tr> inside <table>, every <img> with alt text and a file."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder, self.stack, self.errors, self.images = folder, [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        parent = self.stack[-1] if self.stack else None
        if tag == "li" and parent not in ("ul", "ol"):
            self.errors.append(f"<li> inside <{parent}>")
        if tag == "tr" and parent not in ("table", "thead", "tbody"):
            self.errors.append(f"<tr> inside <{parent}>")
        if tag == "img":
            self.images.append(attrs.get("src"))
            if not attrs.get("alt"):
                self.errors.append(f"<img src={attrs.get('src')!r}> without alt text")
            if not attrs.get("src") or not (self.folder / attrs["src"]).is_file():
                self.errors.append(f"<img src={attrs.get('src')!r}>: no such file")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def check_html(path: Path) -> list:
    """Parses a report.html; returns the <img> sources (asserting the page is well formed)."""
    checker = _Checker(path.parent)
    checker.feed(path.read_text(encoding="utf-8"))
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    return checker.images


def assert_picture(path: Path, min_side: int = 150):
    """A real PNG of some size that is not one flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side, (path.name, image.size)
        assert np.asarray(image.convert("L"), dtype=np.float64).std() > 10, path.name


@pytest.fixture(scope="module")
def digits400(tmp_path_factory):
    """400 of scikit-learn's real digits as an .npz whose class names need escaping in HTML and TeX."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("digits") / "digits400.npz"
    pixels = (digits.images[:400] * (255.0 / 16.0)).round().astype("uint8")[..., None]
    names = np.array([f"<b>${i}$</b>" if i == 3 else f"digit {i}" for i in range(10)])
    np.savez(path, x=pixels, y=digits.target[:400], class_names=names)
    return path


@pytest.fixture(scope="module")
def run(digits400, tmp_path_factory):
    from ktoolkit.train import train

    out = tmp_path_factory.mktemp("runs") / "lenet"
    return train(recipe="lenet5", data=str(digits400), out=str(out), epochs=1, lr=3e-3, augment="none").run


def test_a_training_run_shows_its_images_and_predictions_in_both_reports(run):
    metrics = json.loads(run.metrics.read_text())
    assert metrics["correct"] < metrics["images"]  # one epoch on 320 digits: some wrong, so every picture has some
    for name in PICTURES:
        assert_picture(run.root / name)
    markdown = run.report_md.read_text()
    assert all(f"]({name})" in markdown for name in PICTURES)
    images = check_html(run.report_html)
    assert set(PICTURES) | {"curves.png", "confusion_matrix.png"} <= set(images)
    assert "&lt;b&gt;$3$&lt;/b&gt;" in run.report_html.read_text()  # the class name is text, not markup


def test_the_pictures_pick_the_sample_the_highest_losses_and_the_most_confused_pair():
    from ktoolkit.report import _picture_indices

    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0, 1, 2])
    probs = np.full((10, 3), 0.05)
    probs[np.arange(10), labels] = 0.9  # right, but:
    for i, (p, confidence) in {2: (0, 0.8), 3: (0, 0.6), 7: (1, 0.7), 4: (0, 0.5)}.items():
        probs[i] = 0.05
        probs[i, p], probs[i, labels[i]] = confidence, 1 - confidence - 0.05
    picks = _picture_indices(probs, labels)
    assert len(picks["sample"]) == 10 and list(picks["sample"]) == sorted(picks["sample"])
    assert list(picks["top_losses"]) == [2, 7, 3, 4]  # highest loss (-log p(true)) first, wrong ones only
    assert picks["confused"] == (1, 0)  # 1 -> 0 twice and 0 -> 1 once: the pair with the most errors
    assert list(picks["directions"][1]) == [2, 3] and list(picks["directions"][0]) == [7]


def test_evaluate_out_writes_a_report_with_the_confusion_matrix_and_the_pictures(run, tmp_path):
    from ktoolkit.cli import main

    out = tmp_path / "evaluation"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(run.root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert "![confusion matrix](confusion_matrix.png)" in markdown and "95% CI" in markdown
    images = check_html(out / "report.html")
    assert {"confusion_matrix.png", "predictions.png", "top_losses.png"} <= set(images)
    for name in ("predictions.png", "top_losses.png", "most_confused.png"):
        assert_picture(out / name)


def test_a_linear_finetune_report_has_no_epochs_and_shows_its_pictures(digits400, tmp_path, monkeypatch):
    from ktoolkit.transfer.finetune import FinetuneConfig, finetune

    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    config = FinetuneConfig(
        base="lenet5", weights="none", data=str(digits400), out=str(tmp_path / "linear"), strategy="linear", epochs=5
    )
    result = finetune(config)
    markdown = result.run.report_md.read_text()
    assert "No epochs" in markdown and "Epochs completed" not in markdown and "?" not in markdown.split("\n")[2]
    assert "epochs: 5" not in markdown and "`epochs`" in markdown  # named as not used, left out of the YAML
    assert "epochs: 5" in result.run.config.read_text()  # config.yaml itself keeps what was asked
    for name in ("train_images.png", "predictions.png", "probes.png"):
        assert_picture(result.run.root / name)
    assert "predictions.png" in check_html(result.run.report_html)


def test_the_html_of_lists_tables_and_code_is_well_formed(tmp_path):
    from ktoolkit.report import _markdown_to_html

    (tmp_path / "a.png").write_bytes(b"")
    markdown = (
        "# T\n\n- one\n- two\n```yaml\na: 1\nb: 2\n```\n| x | y |\n|---|---|\n| 1 | 2 |\n- three\n\n![alt](a.png)"
    )
    page = tmp_path / "report.html"
    page.write_text(_markdown_to_html(markdown, "T <x>"))
    assert check_html(page) == ["a.png"]
    text = page.read_text()
    assert text.count("<ul>") == 2 and "a: 1\nb: 2" in text  # the code block keeps its lines


def test_untrusted_class_names_are_drawn_as_text_and_cut(tmp_path):
    from ktoolkit.report import draw_image_grid, short_name

    name = "$\\frac{1}{0$ \x1b[31m" + "x" * 40
    assert len(short_name(name)) == 16 and "\x1b" not in short_name(name)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    draw_image_grid([[(image, short_name(name), True), (None, "unreadable one", False)]], tmp_path / "g.png")
    assert_picture(tmp_path / "g.png", min_side=100)


def test_export_changed_shows_the_images_whose_top1_changed(tmp_path):
    import tensorflow as tf

    from ktoolkit.export.report import write_changed_picture

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 24, 24, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 20)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    keras = np.eye(3)[labels] * 0.8 + 0.1
    changed = keras.copy()
    changed[[2, 11], :] = changed[[2, 11]][:, [1, 2, 0]]  # two images move to another class
    path = write_changed_picture(tmp_path, dataset, keras, labels, ["a", "b", "c"], {"int8": changed})
    assert path == tmp_path / "export_changed.png"
    assert_picture(path, min_side=100)
    assert write_changed_picture(tmp_path, dataset, keras, labels, ["a", "b", "c"], {"int8": keras}) is None
    assert not path.exists()  # no change: no picture, and no stale one


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "benchmarks" / "screenshot_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_headless_browser_renders_the_report_with_its_pictures(run, tmp_path):
    """Runs where Chromium (chromium, chromium-browser or google-chrome) is on PATH; skipped elsewhere."""
    shot = _screenshot_module()
    if shot.find_browser() is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH")
    result = shot.check_report(run.root, tmp_path / "report.png")
    assert result["ok"], result
    assert result["screenshot"]["inked_rows"] > result["text_only"]["inked_rows"] + 300


def test_export_compare_plots_sizes_in_kb_or_mb_and_the_budget_band(tmp_path):
    from types import SimpleNamespace

    from ktoolkit.export.report import judge, plot_comparison

    rng = np.random.default_rng(0)
    keras = rng.random(400) < 0.9
    results = [
        SimpleNamespace(mode=mode, size_bytes=size, latency_ms=ms, gate=judge(keras, file, keras == file, 1.0))
        for mode, size, ms, file in (
            ("float32", 8_900_000, 4.2, keras),
            ("int8", 2_300_000, 1.3, rng.random(400) < 0.8),
        )
    ]
    for r in results:
        r.passed = r.gate.passed
    plot_comparison(results, tmp_path / "export_compare.png")
    assert_picture(tmp_path / "export_compare.png")
    assert not results[1].passed  # about 10 points worse: drawn red, the budget band shows how far off


def test_every_picture_is_a_file_overwrite_may_remove():
    from ktoolkit.report import PICTURE_FILES
    from ktoolkit.runs import OWN_FILES

    assert set(PICTURE_FILES) <= OWN_FILES and {"lr_find.png", "lr_find.json"} <= OWN_FILES
