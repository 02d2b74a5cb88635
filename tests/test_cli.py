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


# ------------------------------------------------------------------------------ help defaults (issue 17)
def _config_commands():
    from ktoolkit.export import ExportConfig
    from ktoolkit.pretrain.config import PretrainConfig
    from ktoolkit.train.config import TrainConfig
    from ktoolkit.transfer.finetune import FinetuneConfig

    return {"train": TrainConfig, "finetune": FinetuneConfig, "pretrain": PretrainConfig, "export": ExportConfig}


@pytest.mark.parametrize("command", ["train", "finetune", "pretrain", "export"])
def test_help_shows_each_config_field_default_once_and_right(command):
    """What `ktool COMMAND --help` prints for each flag of a config field: exactly one default, the field's
    (finetune's --out is runs/finetune, not train's runs/train)."""
    import dataclasses

    import click

    config_class = _config_commands()[command]
    cmd = main.commands[command]
    ctx = click.Context(cmd, info_name=command)
    shown = "".join(run(command, "--help").output.split())  # no spaces: click wraps lines, "linear-" "early" too
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for param in cmd.params:
        f = fields.get(param.name)
        record = param.get_help_record(ctx)
        if f is None or record is None:
            continue
        defaults = re.findall(r"\[default: ([^\]]*)\]", record[1])
        expected = f.metadata.get(
            "mode_default", f.default_factory() if f.default is dataclasses.MISSING else f.default
        )
        if expected in (None, "", {}):
            assert defaults == [], f"{command} --{param.name}: shows a default {defaults}, the field has none"
            continue
        assert defaults == [cli_shown(expected)], f"{command} --{param.name}: {defaults} vs the field's {expected!r}"
        assert "".join(record[1].split()) in shown  # and `--help` prints exactly that


def cli_shown(value) -> str:
    from ktoolkit import cli

    return cli._shown(value)


@pytest.mark.parametrize(
    "command, function",
    [
        ("evaluate", "ktoolkit.evaluate:evaluate_run"),
        ("demo", "ktoolkit.demo:demo"),
    ],
)
def test_help_defaults_of_function_commands_are_the_functions(command, function):
    """Commands that map flags straight onto a function's keywords show the function's defaults."""
    import importlib
    import inspect

    module, name = function.split(":")
    signature = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    import click

    compared, cmd = 0, main.commands[command]
    ctx = click.Context(cmd, info_name=command)
    for param in cmd.params:
        keyword, default = signature.get(param.name), param.get_default(ctx)
        unset = default is None or default is getattr(click.core, "UNSET", None)  # no default (click >= 8.3: UNSET)
        if keyword is None or keyword.default is inspect.Parameter.empty or unset:
            continue
        assert default == keyword.default, (
            f"{command} --{param.name}: {default!r} vs the function's {keyword.default!r}"
        )
        compared += 1
    assert compared >= 1


# ------------------------------------------------------------------------ no folder left by a failed command
def test_a_failed_training_leaves_no_run_folder(digits_folder, tmp_path):
    """vgg_a is refused at 8x8 only once the data is read and the run folder prepared: the folder goes."""
    out = tmp_path / "new" / "run"
    result = run("train", "--recipe", "vgg_a", "--data", str(digits_folder), "--image-size", "8,8", "--out", str(out))
    assert result.exit_code == 1 and "too small" in result.output, result.output
    assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))


def test_a_failed_command_removes_only_folders_it_made_that_hold_nothing_else(tmp_path):
    from ktoolkit.cli import _no_folder_left_on_failure

    def fail_writing(folder, *names):
        with pytest.raises(RuntimeError), _no_folder_left_on_failure(folder):
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                (folder / name).write_text("{}")
            raise RuntimeError("failed")

    fail_writing(tmp_path / "a" / "b", "config.yaml", "state.json", ".lock")
    assert not (tmp_path / "a").exists()  # made by the command, only its preparation: gone, parent too
    fail_writing(tmp_path / "c", "config.yaml", "notes.txt")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.yaml", "notes.txt"]  # a file not its own
    (tmp_path / "d").mkdir()
    fail_writing(tmp_path / "d", "config.yaml")
    assert (tmp_path / "d" / "config.yaml").exists()  # existed before the command: never removed
    fail_writing(tmp_path / "e", "state.json")
    (tmp_path / "f").mkdir()
    with pytest.raises(RuntimeError), _no_folder_left_on_failure(tmp_path / "f" / "g"):
        (tmp_path / "f" / "g").mkdir()
        (tmp_path / "f" / "g" / "state.json").write_text('{"epochs_completed": 1}')
        raise RuntimeError("failed after an epoch")
    assert (tmp_path / "f" / "g" / "state.json").exists()  # a trained epoch is kept (it can be resumed)
    assert not (tmp_path / "e").exists() and (tmp_path / "f").exists()
