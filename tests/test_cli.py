"""The `ktool` command line, and the README's commands and recipe table, which must not drift."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ktoolkit
import recipes
from ktoolkit.cli import main

README = (Path(__file__).parent.parent / "README.md").read_text()


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result


def test_version_from_the_installed_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "ktoolkit.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"ktool, version {ktoolkit.__version__}"


def test_recipes_table_lists_every_recipe_with_its_count():
    result = run("recipes")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["name", "family", "params", "input"]
    listed = {line.split()[0] for line in lines[1:]}
    assert listed == set(recipes.names())
    vgg = next(line for line in lines if line.startswith("vgg_d "))
    assert "138.4M" in vgg and "224x224x3" in vgg and "Simonyan" in vgg


def test_recipes_filter_and_unknown_family():
    result = run("recipes", "--family", "vgg")
    assert result.exit_code == 0
    assert {line.split()[0] for line in result.output.splitlines()[1:]} == set(recipes.names(family="vgg"))
    bad = run("recipes", "--family", "nope")
    assert bad.exit_code != 0 and "families are" in bad.output and "vgg" in bad.output


def test_show_prints_metadata_and_the_layer_summary():
    result = run("recipes", "show", "lenet5")
    assert result.exit_code == 0, result.output
    assert "LeCun" in result.output and "61,706" in result.output
    assert "c5 (Conv2D)" in result.output and "Total params: 61706" in result.output


def test_show_builds_at_another_size_and_api():
    result = run("recipes", "show", "vgg_a", "--input-shape", "32,32,3", "--num-classes", "5", "--api", "keras3")
    assert result.exit_code == 0, result.output
    assert "block5_pool" in result.output


def test_unknown_recipe_lists_close_matches():
    result = run("recipes", "show", "resnet5")
    assert result.exit_code == 1
    assert "unknown recipe 'resnet5'" in result.output and "resnet50" in result.output


def test_bad_shape_is_explained():
    result = run("recipes", "show", "lenet5", "--input-shape", "32,32")
    assert result.exit_code != 0 and "HEIGHT,WIDTH,CHANNELS" in result.output
    small = run("recipes", "show", "lenet5", "--input-shape", "8,8,1")
    assert small.exit_code == 1 and "at least 32" in small.output


def test_readme_recipe_table_is_the_registry():
    table = re.search(r"<!-- recipes-table -->\n(.*?)<!-- /recipes-table -->", README, re.S).group(1).strip()
    assert table == run("recipes", "--markdown").output.strip(), "regenerate it with `ktool recipes --markdown`"


def readme_ktool_commands():
    section = README.split("## Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("ktool")]


@pytest.mark.parametrize("command", readme_ktool_commands())
def test_every_readme_command_runs(command):
    result = run(*shlex.split(command)[1:])
    assert result.exit_code == 0, result.output


def test_readme_training_commands_run_on_real_images(digits_folder, tmp_path):
    """The README's training section, with `mydir` a folder of real digit PNGs and fewer epochs."""
    section = README.split("## Training on your data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    image = next(digits_folder.glob("digit_7/*.png"))
    runner = CliRunner()
    for line in block.strip().splitlines():
        line = (
            line.replace("mydir/cat/001.jpg", str(image))
            .replace("mydir", str(digits_folder))
            .replace("runs/mine", str(tmp_path / "mine"))
            .replace("--epochs 20", "--epochs 1")
        )
        result = runner.invoke(main, shlex.split(line)[1:])
        assert result.exit_code == 0, (line, result.output)
    assert (tmp_path / "mine" / "report.html").exists()
