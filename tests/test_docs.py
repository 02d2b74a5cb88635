"""`ktool demo` end to end, and the guides' commands and code, run for real so the docs cannot drift."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def ktool(*args, cwd, env=None, timeout=900):
    """Runs the installed `ktool` entry point the way a user does, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "ktoolkit.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture()
def mydir(digits_folder, tmp_path):
    (tmp_path / "mydir").symlink_to(digits_folder, target_is_directory=True)
    return tmp_path


# --------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_ktool_demo_end_to_end_offline(tmp_path):
    """The README's first command's job: data, base, transfer, int8 file within budget, latency, DEMO.md."""
    out = tmp_path / "demo"
    env = {"KTOOLKIT_CACHE_DIR": str(tmp_path / "cache")}
    result = ktool("demo", "--out", str(out), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    for step in range(1, 6):
        assert f"[{step}/5]" in text
    assert f"report: {out / 'DEMO.md'}" in text

    from sklearn.datasets import load_digits

    assert len(list((out / "data" / "digits_5-9").rglob("*.png"))) == int((load_digits().target >= 5).sum())
    decision = json.loads((out / "finetune" / "decision.json").read_text())
    assert decision["strategy"] in ("linear", "linear-early", "finetune", "full")
    assert decision["advice"]["decision"]["quadrant"] in text
    for name in ("best.keras", "report.md", "confusion_matrix.png", "metrics.json"):
        assert (out / "finetune" / name).exists(), name
    report = json.loads((out / "finetune" / "export" / "export_report.json").read_text())
    files = [Path(f["path"]) for f in report["exports"]]
    assert len(files) == 1 and files[0].suffix == ".tflite" and files[0].exists()
    assert ".FAILED" not in files[0].name
    verification = report["exports"][0]["verification"]
    assert verification["keras_accuracy"] - verification["accuracy"] <= 0.01  # the 1-point budget
    assert verification["keras_accuracy"] > 0.8  # transfer worked (chance is 20%)

    from tflite_export import open_model

    runner = open_model(files[0])
    assert runner.input_dtype.name == "uint8" and runner.labels == ["5", "6", "7", "8", "9"]
    page = (out / "DEMO.md").read_text()
    assert "within the 1-point budget" in page and "p50" in page

    again = ktool("demo", "--out", str(out), cwd=tmp_path, env=env)  # finished steps are reused
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already complete: reused") == 2


def test_readme_quick_start_is_install_then_demo_and_ci_runs_the_test_command():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in blocks(quick, "bash")]
    assert commands[0] == "pip install -c constraints.txt . && ktool demo"
    assert commands[1] == 'pip install -c constraints.txt ".[test]" && python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and 'eval "$cmd"' in ci


def test_readme_python_blocks_run(tmp_path):
    """The README's Python (Keras 3 recipes, the recipe signature, save and load), as written."""
    code = blocks(README, "python")
    assert len(code) >= 2
    script = tmp_path / "readme.py"
    script.write_text(
        "\n".join(code)
        + "\nassert model3.count_params() == recipes.resnet50(num_classes=10).count_params() and same.count_params() == model.count_params()\n"
    )
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "m.keras").exists()


# ------------------------------------------------------------------------------------------- guides
def test_python_api_guide_runs_as_written(mydir):
    """docs/python-api.md's blocks, in order, in one fresh Python (the demo block is the demo test's), then
    docs/jetson.md's data export for TensorRT on the run the guide made."""
    code = [b for b in blocks((DOCS / "python-api.md").read_text(), "python") if "from ktoolkit.demo" not in b]
    code += [
        b.replace("runs/mine", "runs/tuned")
        for b in blocks((DOCS / "jetson.md").read_text(), "python")
        if "load_source" in b
    ]
    script = mydir / "guide.py"
    script.write_text("\n".join(code))
    env = {**os.environ, "KTOOLKIT_CACHE_DIR": str(mydir / "cache")}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=mydir, capture_output=True, text=True, env=env, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "small and" in result.stdout  # advise printed its decision
    assert (mydir / "runs" / "tuned" / "export" / "export_report.md").exists()
    import numpy as np

    calibration, heldout = np.load(mydir / "calibration.npy"), np.load(mydir / "heldout.npz")
    assert calibration.dtype == np.float32 and calibration.shape[1:] == heldout["x"].shape[1:]
    assert len(heldout["x"]) == len(heldout["y"]) > 0 and calibration.max() > 1  # pixels 0..255, not normalized


def test_every_guide_links_to_files_that_exist():
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+?)\)", page.read_text()):
            if "://" in target or target.endswith((".png", "report.md")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_finetune_guide_commands_run_offline(digits_folder, tmp_path, monkeypatch):
    """docs/finetune-your-images.md's commands on real digit images, with a MobileNetV2 weights file the
    test makes (random: the commands must run; the numbers are the guide's own measurement)."""
    import shlex

    import tf_keras
    from click.testing import CliRunner

    from ktoolkit.cli import main

    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "mobilenet_v2_no_top.h5"
    tf_keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3)).save_weights(weights)
    image = next(digits_folder.glob("digit_3/*.png"))
    runner = CliRunner()
    for line in blocks((DOCS / "finetune-your-images.md").read_text(), "bash")[0].strip().splitlines():
        if "export/" in line:  # the file is named after the strategy the data gets
            exported = next((tmp_path / "flowers" / "export").glob("*_int8.tflite"))
            line = re.sub(r"runs/flowers/export/\S+\.tflite", str(exported), line)
        line = (
            line.replace("--base mobilenet_v2", f"--base mobilenet_v2 --weights {weights} --image-size 32,32")
            .replace("mydir/daisy/001.jpg", str(image))
            .replace("mydir", str(digits_folder))
            .replace("runs/", f"{tmp_path}/")
        )
        if "ktool export" in line:
            line += " --max-accuracy-drop 100"  # random ImageNet stand-in weights: the budget is not the point here
        result = runner.invoke(main, shlex.split(line)[1:])
        assert result.exit_code == 0, (line, result.output)
    assert "digit_3" in result.output  # predict printed labels from the file's metadata


def _documented_ktool_lines():
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for block in blocks(page.read_text(), "bash"):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if "ktool " in line:
                    # inside a shell string (the Slurm example) the line ends with the closing quote
                    yield page.name, line[line.index("ktool ") :].split(" && ")[0].split(";")[0].rstrip("\"'")


@pytest.mark.parametrize("page, line", list(_documented_ktool_lines()))
def test_every_documented_ktool_command_parses(page, line):
    """Every `ktool` line of the README and the guides names a real command with real flags and valid
    values (the tests above also run them; this catches a renamed flag in any page at once)."""
    import shlex

    import click

    from ktoolkit.cli import main

    args = shlex.split(line)[1:]
    command = main
    while isinstance(command, click.Group) and args and args[0] in command.commands:
        command, args = command.commands[args[0]], args[1:]
    try:
        command.make_context(command.name, args)
    except click.exceptions.Exit as done:  # --version, --help
        assert done.exit_code == 0
    except click.BadParameter as err:  # a file or folder of the example that is not here
        assert "does not exist" in str(err), (page, line, str(err))
    except click.UsageError as err:
        pytest.fail(f"{page}: `{line}`: {err}")
