"""The flags of `ktool train`, `finetune`, `pretrain` and `export` are their config dataclasses' fields (issue 13).

A field without a flag, or a flag without a field, fails here; so does a flag whose help does not show
the dataclass's default (the CLI reads it from the dataclass, never copies it).
"""

from __future__ import annotations

import dataclasses

import pytest

from ktoolkit import cli
from ktoolkit.export import ExportConfig
from ktoolkit.pretrain.config import PretrainConfig
from ktoolkit.train.config import TrainConfig
from ktoolkit.transfer.finetune import FinetuneConfig

# Flags that are no field of the command's config, each for its reason.
FLAGS_WITHOUT_FIELD = {
    "config_file": "--config: the YAML file the fields are read from, not a setting itself",
    "overwrite": "--overwrite: what to do with a finished run in --out, not part of the run's settings",
    "verbose": "-v: logging of this invocation, not a setting of the run",
    "model": "export --model: what is exported (export()'s first argument), not a setting",
}

# Fields that have no flag on purpose, by command, each for its reason.
FIELDS_WITHOUT_FLAG = {
    "train": {"recipe_options": "a mapping of builder keyword arguments: set in the YAML file (--config)"},
    "pretrain": {"recipe_options": "a mapping of builder keyword arguments: set in the YAML file (--config)"},
    "finetune": {"channels": "not a setting of finetune: the base decides (kept for the shared checks)"},
    "export": {},
}

COMMANDS = {
    "train": TrainConfig,
    "finetune": FinetuneConfig,
    "pretrain": PretrainConfig,
    "export": ExportConfig,
}


def _params(command: str) -> dict:
    return {p.name: p for p in cli.main.commands[command].params}


def _default(config_class, f: dataclasses.Field):
    if "mode_default" in f.metadata:  # ExportConfig's tunables: None is "not given", the mode's default applies
        return f.metadata["mode_default"]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@pytest.mark.parametrize("command", COMMANDS)
def test_the_flags_are_the_config_fields(command):
    fields = {f.name for f in dataclasses.fields(COMMANDS[command])}
    flags = set(_params(command))
    assert flags - fields <= set(FLAGS_WITHOUT_FIELD), f"flags without a field: {sorted(flags - fields)}"
    missing = fields - flags
    assert missing == set(FIELDS_WITHOUT_FLAG[command]), f"fields without a flag: {sorted(missing)}"


@pytest.mark.parametrize("command", COMMANDS)
def test_the_help_shows_the_dataclass_defaults(command):
    config_class = COMMANDS[command]
    params = _params(command)
    for f in dataclasses.fields(config_class):
        if f.name not in params:
            continue
        param = params[f.name]
        assert param.default is None, f"--{f.name}: a flag not given is None (--config's or the field's value)"
        default = _default(config_class, f)
        if default in (None, "", {}):
            continue
        shown = cli._shown(default)
        assert f"[default: {shown}]" in (param.help or ""), f"{command} --{f.name}: help lacks [default: {shown}]"


def test_each_command_shows_its_own_defaults():
    """The flags shared by the run commands show each command's default (runs/train, runs/finetune, ...)."""
    for command, out in (("train", "runs/train"), ("finetune", "runs/finetune"), ("pretrain", "runs/pretrain")):
        assert f"[default: {out}]" in _params(command)["out"].help
    assert "[default:" not in (_params("finetune")["lr"].help or "")  # None: set per strategy
