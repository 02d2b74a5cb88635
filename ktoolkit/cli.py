"""The ``ktool`` command line: a thin map onto the Python API (same parameter names).

The CLI owns the terminal: library code logs and returns values, the commands print them.
TensorFlow is imported only by the commands that build or run models, so ``ktool --version`` and
``ktool recipes`` answer at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import re
import sys
import time
from pathlib import Path

import click

# TensorFlow's C++ log lines (oneDNN and CPU-feature notes, "oneDNN supports DT_UINT8 only on platforms with
# AVX-512 ...") are noise at a terminal; what fails still raises a Python exception. `-v` shows them
# (_setup_logging), unless TF_CPP_MIN_LOG_LEVEL was set by the user.
_TF_LEVEL_GIVEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ktoolkit  # noqa: E402  (kept below the setting above, which TensorFlow reads when it loads)
import recipes  # noqa: E402  the registry: names and metadata, no TensorFlow

_DATA_KINDS = "a folder with one subfolder per class, a .csv of path,label rows, an .npz, or tfds:NAME"
# Operating-system errors that are the user's situation, not a bug: what to do about each.
_OS_FIXES = {
    errno.ENOSPC: "no space left on the device; free some disk space or choose another --out",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another --out",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "permission denied; choose a writable --out (or fix the permissions)",
    errno.EPERM: "operation not permitted; choose a writable --out (or fix the permissions)",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENOTDIR: "a file is where a folder should be; choose another path",
    errno.EEXIST: "already exists; choose another path",
    errno.EISDIR: "is a folder, not a file; give a file",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """``text`` safe for any terminal or pipe: bytes that are not UTF-8 (lone surrogates from file
    names) and control characters are shown escaped, so they neither fail to encode nor act."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _one_line(text: str, keep: int = 8) -> str:
    """A message as one line: its first line, then the others (listed files) joined with "; "."""
    lines = [line.strip() for line in _printable(text).splitlines() if line.strip()]
    if len(lines) > keep + 1:
        lines = [*lines[: keep + 1], f"... and {len(lines) - keep - 1} more"]
    return " ".join(lines[:1] + ["; ".join(lines[1:])]).strip()


def _os_message(err: OSError) -> str | None:
    """ "PATH: what happened; what to do" for an OSError of the user's situation; None for others."""
    if err.errno is None:  # ktoolkit's own FileNotFoundError("... does not exist; give ...")
        return str(err)
    fix = _OS_FIXES.get(err.errno)
    if fix is None:
        return None
    paths = [os.fsdecode(p) for p in (err.filename, err.filename2) if p is not None]
    if not paths:  # e.g. a zip archive's close() when the disk is full: name the folder being written
        ctx = click.get_current_context(silent=True)
        paths = (
            [" ".join(ctx.meta["ktoolkit.out"])] if ctx and "ktoolkit.out" in ctx.meta else [err.strerror or "error"]
        )
    return f"{' -> '.join(paths)}: {fix}."


def _unicode_message(err: UnicodeEncodeError) -> str:
    """Names the text around a character that cannot be encoded: usually a file name that is not UTF-8."""
    text = err.object
    start = max(text.rfind("\n", 0, err.start) + 1, err.start - 60)
    end = text.find("\n", err.end)
    end = min(len(text) if end < 0 else end, err.end + 20)
    return (
        f"a name that is not valid UTF-8 cannot be written as text (in {text[start:end]!r}); rename that file "
        "or folder."
    )


def _user_errors(command):
    """Turns the user's mistakes into one line ``Error: ...`` on stderr and exit status 1.

    ValueError (UnicodeError too), the OSErrors of :data:`_OS_FIXES` (FileNotFoundError,
    PermissionError, disk full, ...) and UnknownRecipeError are the user's; their messages name the
    file or flag. Anything else is a bug and keeps its traceback. ``-v`` prints the traceback too.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, OSError, recipes.UnknownRecipeError) as err:
            message = _os_message(err) if isinstance(err, OSError) else str(err)
            if isinstance(err, UnicodeEncodeError) and isinstance(err.object, str):
                message = _unicode_message(err)
            if message is None:
                raise
            if kwargs.get("verbose"):
                import traceback

                traceback.print_exc()
            raise click.ClickException(_one_line(message)) from None

    return wrapper


def _check_data(value, flag: str = "--data"):
    """Refuses, before TensorFlow loads, data that cannot be a source: missing, or a file of another kind."""
    if value is None:
        return
    text = os.fspath(value)
    if text.startswith("tfds:"):
        if not text[5:].strip():
            raise ValueError(f"{flag} {text}: give the dataset after 'tfds:', e.g. tfds:mnist.")
        return
    path = Path(text)
    if path.is_dir():
        return
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".npz"):
            kind = f"a {path.suffix} file" if path.suffix else "a file without an extension"
            raise ValueError(f"{flag} {text}: {kind} is not a data source; give {_DATA_KINDS}.")
        return
    if not text:
        raise ValueError(f"{flag}: give the data: {_DATA_KINDS}.")
    raise FileNotFoundError(f"{flag} {text}: no such file or folder; give {_DATA_KINDS}.")


def _check_out(value, flag: str = "--out"):
    """Refuses an output folder that is a file, or lies under a file or a folder that cannot be written."""
    if value is None:
        return
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # for an error without a file name (disk full while a zip archive closes)
        ctx.meta["ktoolkit.out"] = (flag, os.fspath(value))
    path = Path(os.fspath(value))
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {value}: is a file, not a folder; choose a folder (it is created if missing).")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {value}: {existing} is a file, not a folder; choose another {flag}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} {value}: {existing} is not writable (a read-only file system or no permission); "
            f"choose a writable {flag}."
        )


def _check_exists(value, flag: str, what: str):
    if value is not None and not os.path.exists(value):
        raise FileNotFoundError(f"{flag} {value}: no such file or folder; give {what}.")


# What a command writes into a new folder before its real work (the run's metadata, the export's labels,
# the lock): a failed command whose new folder holds only these leaves no folder behind.
_PREPARATION_FILES = frozenset(
    {"config.yaml", "classes.json", "labels.txt", "data.json", "splits.json", "state.json", "train_images.png"}
    | {".lock"}
)


@contextlib.contextmanager
def _no_folder_left_on_failure(folder):
    """Removes ``folder``, and the parents this command created for it, when the block fails and left in it
    nothing but :data:`_PREPARATION_FILES` (no model, no epoch, nothing of the user's).

    Only folders that did not exist when the command started are ever removed; a folder that existed,
    or holds anything else (a subfolder, another file, a link, a run with epochs), is left as it is.
    """
    created = []
    path = Path(os.fspath(folder)) if folder is not None else None
    while path is not None and not os.path.lexists(path) and path != path.parent:
        created.append(path)
        path = path.parent
    try:
        yield
    except BaseException:
        if created and _only_preparation(created[0]):
            for entry in created[0].iterdir():
                entry.unlink()
            for made in created:
                try:
                    made.rmdir()  # only when empty
                except OSError:
                    break
        raise


def _only_preparation(folder: Path) -> bool:
    """Whether ``folder`` is a real folder that holds only files of :data:`_PREPARATION_FILES` and no
    trained epoch."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    if any(e.is_symlink() or not e.is_file() or e.name not in _PREPARATION_FILES for e in entries):
        return False
    state = folder / "state.json"
    return not state.exists() or "epochs_completed" not in state.read_text(errors="replace")


def _quiet_tensorflow_import():
    """Imports TensorFlow (and probes its devices) with file descriptor 2 sent to /dev/null.

    TF 2.21 logs its start-up through absl before ``absl::InitializeLog``, which ignores
    TF_CPP_MIN_LOG_LEVEL: oneDNN notes and CUDA probing errors on CPU-only machines. Python
    exceptions are unaffected (they are raised after stderr is restored). ``KTOOLKIT_TF_LOGS=1``
    keeps TensorFlow's lines.
    """
    if "tensorflow" in sys.modules or os.environ.get("KTOOLKIT_TF_LOGS"):
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _setup_logging(verbose: bool = False, tensorflow: bool = True):
    """ktoolkit's log lines go to stderr as plain sentences; TensorFlow's own logging (imported here unless
    not ``tensorflow``: predict and benchmark of exported files run without it) and the native libraries'
    stderr lines are quieted, unless ``verbose`` (`-v`)."""
    import logging

    if verbose and not _TF_LEVEL_GIVEN:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # read when TensorFlow loads
    if not verbose and tensorflow:
        _quiet_tensorflow_import()

    logging.basicConfig(level=logging.INFO if not verbose else logging.DEBUG, format="%(message)s", force=True)
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _interactive() -> bool:
    return sys.stderr.isatty()


def _format_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _parse_numbers(value: str | None, count: int, form: str, param_hint: str):
    """Parses "224,224,3" (or "224x224x3") into ``count`` integers; one number for a square size."""
    if value is None:
        return None
    try:
        numbers = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        numbers = ()
    if count == 2 and len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != count or min(numbers) < 1:
        raise click.BadParameter(f"{value!r}: write {form} (whole numbers >= 1).", param_hint=param_hint)
    return numbers


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(ktoolkit.__version__, prog_name="ktool")
@click.pass_context
def main(ctx):
    """ktoolkit: classic CNN recipes, training, transfer learning and verified on-device export."""
    ctx.meta["ktoolkit.started"] = _process_start()  # the command's start, for the demo's true total


def _process_start() -> float:
    """When this process started (``time.time()`` scale) if it is the ``ktool`` command, Python's start-up
    included (Linux); else now, e.g. for a command invoked inside another program."""
    if Path(sys.argv[0]).name not in ("ktool", "cli.py"):
        return time.time()
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


@main.group("recipes", invoke_without_command=True)
@click.option("--task", type=click.Choice(["classification", "autoencoder", "contrastive"]), help="Only this task.")
@click.option("--family", help="Only this family (e.g. resnet, vgg).")
@click.option("--markdown", is_flag=True, help="Print a Markdown table (the README's).")
@click.pass_context
def recipes_cmd(ctx, task, family, markdown):
    """List the architecture recipes (name, family, parameters, input size, paper)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = [
        r for r in recipes.all_recipes() if (task is None or r.task == task) and (family is None or r.family == family)
    ]
    if not rows:
        families = sorted({r.family for r in recipes.all_recipes()})
        raise click.ClickException(f"no recipes match; families are {', '.join(families)}.")
    header = ("name", "family", "params", "input", "paper")
    table = [
        (r.name, r.family, _format_count(r.params), "x".join(str(d) for d in r.input_shape), r.paper) for r in rows
    ]
    if markdown:
        click.echo("| " + " | ".join(header) + " |")
        click.echo("|" + "---|" * len(header))
        for row in table:
            click.echo("| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(row)) + " |")
        return
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(4)]
    for row in [header, *table]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])


@recipes_cmd.command("show")
@click.argument("name")
@click.option("--input-shape", help="Build at HEIGHT,WIDTH,CHANNELS instead of the paper's size.")
@click.option("--num-classes", type=int, help="Number of classes (default: the paper's).")
@click.option(
    "--api",
    type=click.Choice(["tf_keras", "keras3"]),
    default="tf_keras",
    show_default=True,
    help="Which Keras to build with.",
)
@_user_errors
def recipes_show(name, input_shape, num_classes, api):
    """Show a recipe's metadata and layer summary."""
    recipe = recipes.get(name)
    click.echo(f"{recipe.name}: {recipe.description}")
    click.echo(f"  family        {recipe.family}")
    click.echo(f"  paper         {recipe.paper}")
    click.echo(f"  task          {recipe.task}")
    click.echo(
        f"  input         {'x'.join(str(d) for d in recipe.input_shape)} (at least {recipe.min_size}x{recipe.min_size})"
    )
    click.echo(
        f"  parameters    {recipe.params:,}"
        + (f" (paper: {_format_count(int(recipe.paper_params))})" if recipe.paper_params else "")
    )
    click.echo(f"  preprocessing {recipe.preprocessing}")
    click.echo(f"  layer groups  {', '.join(f'{g} (to {layer})' for g, layer in recipe.layer_groups)}")
    click.echo(f"  head starts   {recipe.head_start}")
    _quiet_tensorflow_import()
    kwargs = {"api": api}
    if input_shape:
        kwargs["input_shape"] = _parse_numbers(input_shape, 3, "HEIGHT,WIDTH,CHANNELS, e.g. 224,224,3", "--input-shape")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = recipe.build(**kwargs)
    click.echo("")
    model.summary(print_fn=lambda line, **_: click.echo(line), line_length=110)


# ----------------------------------------------------------------------------------------------- data
@main.group("data")
def data_cmd():
    """Inspect a dataset before training."""


@data_cmd.command("check")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_user_errors
def data_check(folder, as_json):
    """Scan FOLDER (one subfolder per class): every unreadable file by path and reason, class counts.

    Exits with status 1 when it finds problems (bad files, empty classes), 0 when all is well.
    """
    _setup_logging()
    from ktoolkit.data import scan_folder

    report = scan_folder(folder, progress=_interactive())
    if as_json:
        import json

        click.echo(json.dumps(report.to_dict(), indent=2))  # ensure_ascii: names that are not UTF-8 come escaped
    else:
        click.echo(_printable(report.format()))
    if not report.ok:
        sys.exit(1)  # for scripts: problems were found (training would still skip the bad files)


# ---------------------------------------------------------------------------------------------- train
def _field_default(config_class, name):
    """The default of ``config_class``'s field ``name`` (for a tunable of ExportConfig, the mode's default);
    None for a name that is no field of it (a flag of another command: tests/test_config_flags.py checks
    that every command's flags are its config's fields)."""
    f = {f.name: f for f in dataclasses.fields(config_class)}.get(name)
    if f is None:
        return None
    if "mode_default" in f.metadata:
        return f.metadata["mode_default"]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _shown(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _flag(config_class, name, *decls, help: str = "", **kwargs):
    """The click option of ``config_class``'s field ``name`` (``--name-with-dashes`` unless ``decls`` say):
    its default is None ("not given": --config's value or the field's), and its help ends with the
    field's default, read from the dataclass (``[default: 10]``), where it has one."""
    default = _field_default(config_class, name)
    if default not in (None, "", {}):
        help = f"{help}  [default: {_shown(default)}]".strip()
    return click.option(*(decls or ("--" + name.replace("_", "-"),)), name, default=None, help=help, **kwargs)


def _train_flags(config_class=None) -> dict:
    """The run config's fields as flags (same names, - for _), by field name, in --help order; the other
    run commands reuse the ones they share, with their own defaults (``config_class``: TrainConfig,
    PretrainConfig, FinetuneConfig). Defaults come from the config class or --config."""
    from ktoolkit.train.config import (
        CLASS_WEIGHTS,
        DISTRIBUTES,
        IMBALANCE_THRESHOLD,
        OPTIMIZERS,
        SCHEDULES,
        TrainConfig,
    )

    flag = functools.partial(_flag, config_class or TrainConfig)
    return {
        "config_file": click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False),
            help="YAML file with these settings (e.g. a run's config.yaml); flags win.",
        ),
        "recipe": flag("recipe", help="Architecture (see `ktool recipes`)."),
        "data": flag("data", help="Class-per-folder directory, CSV (path,label), .npz, or tfds:NAME."),
        "out": flag("out", help="Run folder. An interrupted run there is resumed."),
        "epochs": flag("epochs", type=int),
        "batch_size": flag("batch_size", type=int, help="Per replica; the global batch is this times the replicas."),
        "optimizer": flag("optimizer", type=click.Choice(OPTIMIZERS)),
        "lr": _lr_flag(flag, config_class or TrainConfig),
        "momentum": flag("momentum", type=float),
        "schedule": flag("schedule", type=click.Choice(SCHEDULES)),
        "weight_decay": flag("weight_decay", type=float),
        "label_smoothing": flag("label_smoothing", type=float),
        "mixed_precision": flag("mixed_precision", "--mixed-precision/--no-mixed-precision"),
        "jit": flag("jit", "--jit/--no-jit", help="XLA-compile the training step."),
        "distribute": flag("distribute", type=click.Choice(DISTRIBUTES)),
        "image_size": flag("image_size", help="HEIGHT,WIDTH to train at (default: the recipe's)."),
        "channels": flag("channels", type=click.Choice(["1", "3"])),
        "val_fraction": flag("val_fraction", type=float),
        "test_fraction": flag("test_fraction", type=float),
        "seed": flag("seed", type=int),
        "augment": flag("augment", help="e.g. flip,crop or flip,crop,color=20,mixup=0.2; 'none' for none."),
        "cache": flag("cache", help="memory, none, or a folder for tf.data's cache files."),
        "early_stopping": flag("early_stopping", type=int, help="Patience in epochs on the validation loss (0: off)."),
        "class_weight": flag(
            "class_weight",
            type=click.Choice(CLASS_WEIGHTS),
            help=f"auto: balanced class weights (n / (classes * count)) when the largest class has more than "
            f"{IMBALANCE_THRESHOLD:g}x the training images of the smallest; none: never.",
        ),
        "strict": flag("strict", "--strict/--no-strict", help="Fail on unreadable images instead of skipping."),
        "deterministic": flag("deterministic", "--deterministic/--no-deterministic"),
        "data_dir": flag("data_dir", help="tensorflow-datasets folder for tfds: sources."),
        "steps_per_epoch": flag("steps_per_epoch", type=int, help="Cap the steps per epoch (quick trials)."),
        "overwrite": click.option("--overwrite", is_flag=True, help="Replace a finished run in --out."),
        "verbose": click.option("-v", "--verbose", is_flag=True),
    }


def _lr_flag(flag, config_class):
    """--lr: a number, or auto (the learning-rate finder's pick) where the config takes it (not pretrain)."""
    from ktoolkit.train.config import accepts_auto, number_or_auto

    if not accepts_auto(config_class):
        return flag("lr", type=float, help="Learning rate.")
    help = "Learning rate; auto: found by `ktool lr-find` first, written into config.yaml."
    return flag("lr", type=number_or_auto, metavar="FLOAT|auto", help=help)


def _with_options(f, options):
    """Applies click ``options`` to ``f``, the first one first in --help."""
    for option in reversed(list(options)):
        f = option(f)
    return f


def _train_options(f):
    return _with_options(f, _train_flags().values())


def _train_config(config_file, config_class=None, **values):
    """The validated config (TrainConfig, or ``config_class``) of --config and the flags given (flags win),
    with its data and run folder checked: everything that can be refused before TensorFlow loads.

    A bad value is named as the user wrote it: ``--epochs 0: ...`` for a flag, ``config file F: epochs=0:
    ...`` for the file.
    """
    from ktoolkit.train.config import ConfigError, TrainConfig

    config_class = config_class or TrainConfig
    if values.get("image_size"):
        values["image_size"] = _parse_numbers(values["image_size"], 2, "HEIGHT,WIDTH, e.g. 224,224", "--image-size")
    if values.get("channels"):
        values["channels"] = int(values["channels"])
    given = {k: v for k, v in values.items() if v is not None}
    try:
        config = config_class.from_yaml(config_file, **given) if config_file else config_class.from_dict(given)
        config.validate()
    except ConfigError as err:
        if err.where or err.field in given or not config_file:
            raise (_as_flag(err) if err.field in given else err) from None
        raise err.located(f"config file {config_file}") from None
    for name, check in (("data", _check_data), ("out", _check_out)):
        check(
            getattr(config, name),
            f"--{name}" if name in given or not config_file else f"config file {config_file}: {name}",
        )
    return config


def _as_flag(err) -> ValueError:
    """A ConfigError about a flag's value, said with the flag: ``--image-size 0,0: ...``."""
    value = ",".join(map(str, err.value)) if isinstance(err.value, (tuple, list)) else err.value
    return ValueError(f"--{err.field.replace('_', '-')} {value}: {err.hint}")


@main.command("train")
@_train_options
@_user_errors
def train_cmd(config_file, overwrite, verbose, **values):
    """Train a recipe on your data; leaves a run folder with models, curves and a report."""
    config = _train_config(config_file, **values)
    _check_run_folder(config, overwrite)
    _setup_logging(verbose)
    from ktoolkit.train import train

    with _no_folder_left_on_failure(config.out):
        _print_result(train(config, progress=_interactive(), overwrite=overwrite))


def _check_run_folder(config, overwrite: bool):
    """The run folder's checks (not a ktoolkit run, the data's folder, locked, finished), before TensorFlow
    loads; the run checks again when it takes the folder."""
    from ktoolkit.runs import Run
    from ktoolkit.train.engine import check_run_folder

    check_run_folder(Run(config.out), config, overwrite, test_lock=config.distribute != "multiworker")


def _print_result(result):
    """Every result type formats itself (``lines()``); the CLI only prints, escaping what the data named."""
    for line in result.lines():
        click.echo(_printable(line))


# ------------------------------------------------------------------------------ pretrain / linear-eval
# --help order of `ktool pretrain`
_PRETRAIN_ORDER = (
    *("config_file", "method", "recipe", "data", "out", "epochs", "batch_size", "optimizer", "lr", "momentum"),
    *("schedule", "weight_decay", "temperature", "noise", "noise_strength", "augment", "distribute"),
    *("image_size", "channels", "val_fraction", "test_fraction", "seed", "cache", "strict", "deterministic"),
    *("data_dir", "steps_per_epoch", "overwrite", "verbose"),
)


def _pretrain_flags() -> dict:
    """The PretrainConfig fields as flags: those shared with `ktool train`, and the methods' own."""
    from ktoolkit.pretrain.config import DEFAULT_VIEWS, METHODS, NOISES, PretrainConfig

    flag = functools.partial(_flag, PretrainConfig)
    return {
        **_train_flags(PretrainConfig),
        "method": flag("method", type=click.Choice(METHODS), help="How to learn."),
        "recipe": flag(
            "recipe",
            help="Autoencoders: conv_autoencoder, denoising_autoencoder; contrastive: "
            "contrastive_encoder, or a classification recipe as its backbone.",
        ),
        "data": flag(
            "data",
            help="Images: a folder (class subfolders optional), CSV, .npz or tfds:NAME; "
            "labels are never used for training.",
        ),
        "temperature": flag("temperature", type=float, help="NT-Xent temperature (contrastive)."),
        "noise": flag("noise", type=click.Choice(NOISES), help="Corruption (denoising)."),
        "noise_strength": flag(
            "noise_strength", type=float, help="Gaussian stddev, or masking/salt-and-pepper rate, on 0..1 images."
        ),
        "augment": flag(
            "augment",
            help=f"Contrastive: the random views (default {DEFAULT_VIEWS}; no flip "
            "for digits or text). Autoencoders: input augmentation (none).",
        ),
    }


def _pretrain_options(f):
    flags = _pretrain_flags()
    return _with_options(f, (flags[name] for name in _PRETRAIN_ORDER))


@main.command("pretrain")
@_pretrain_options
@_user_errors
def pretrain_cmd(config_file, overwrite, verbose, **values):
    """Learn a representation from images without labels: autoencoder, denoising or contrastive.

    The run folder's encoder.keras is a base for `ktool finetune --base RUN`; `ktool linear-eval
    --encoder RUN --data LABELLED` measures it.
    """
    from ktoolkit.pretrain.config import PretrainConfig

    config = _train_config(config_file, PretrainConfig, **values)
    _check_run_folder(config, overwrite)
    _setup_logging(verbose)
    from ktoolkit.pretrain import pretrain

    with _no_folder_left_on_failure(config.out):
        _print_result(pretrain(config, progress=_interactive(), overwrite=overwrite))


@main.command("linear-eval")
@click.option("--encoder", required=True, help="A `ktool pretrain` run folder, or an encoder .keras file.")
@click.option("--data", required=True, help="Labelled images: class-per-folder directory, CSV, .npz or tfds:NAME.")
@click.option("--out", help="Folder for the results (default: RUN/linear_eval).")
@click.option(
    "--baseline/--no-baseline",
    default=True,
    show_default=True,
    help="Also evaluate the same architecture at random initialization.",
)
@click.option("--val-fraction", type=float, help="The split; default the pretraining run's (else 0.1, 0.1, 0).")
@click.option("--test-fraction", type=float)
@click.option("--seed", type=int)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--strict/--no-strict", default=False, help="Fail on unreadable images instead of skipping.")
@click.option("--data-dir", help="tensorflow-datasets folder for tfds: sources.")
@click.option("--cache/--no-cache", default=True, show_default=True, help="Keep the features in the feature cache.")
@click.option(
    "--labels-per-class",
    default="10,100,all",
    show_default=True,
    help="Label budgets: linear and kNN readouts trained on this many labels per class, and the learning "
    "curve ('none': only the linear probe on every label).",
)
@_user_errors
def linear_eval_cmd(
    encoder,
    data,
    out,
    baseline,
    val_fraction,
    test_fraction,
    seed,
    batch_size,
    strict,
    data_dir,
    cache,
    labels_per_class,
):
    """Freeze the encoder, train a linear classifier on its features, report the accuracy (linear evaluation)."""
    _check_exists(encoder, "--encoder", "a `ktool pretrain` run folder or an encoder .keras file")
    _check_data(data)
    _check_out(out)
    from ktoolkit.pretrain.budgets import parse_budgets

    budgets = () if labels_per_class.strip().lower() == "none" else parse_budgets(labels_per_class)
    _setup_logging()
    from ktoolkit.pretrain import linear_eval

    result = linear_eval(
        encoder,
        data,
        out=out,
        baseline=baseline,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        batch_size=batch_size,
        strict=strict,
        data_dir=data_dir,
        cache=cache,
        progress=_interactive(),
        labels_per_class=budgets,
    )
    _print_result(result)


# --------------------------------------------------------------------------------- finetune / advise
def _base_flags() -> dict:
    from ktoolkit.transfer.finetune import FinetuneConfig

    flag = functools.partial(_flag, FinetuneConfig)
    return {
        "base": flag(
            "base",
            help="keras.applications base (vgg16, resnet50, mobilenet_v2, efficientnet_b0, ...), "
            "a recipe, or a run folder (runs/NAME).",
        ),
        "weights": flag(
            "weights",
            help="imagenet (Keras download or cache), a .h5/.keras file, or none. "
            "Default: imagenet for keras.applications bases.",
        ),
        "small_threshold": flag(
            "small_threshold", type=float, help="Fewer training images per class than this is 'small' (default 1000)."
        ),
        "similarity_threshold": flag(
            "similarity_threshold", type=float, help="A similarity at or above this is 'similar' (default 0.88)."
        ),
    }


# The flags `ktool finetune` shares with `ktool train`, in --help order (after the base's and its own).
_FINETUNE_SHARED = (
    *("config_file", "data", "out", "epochs", "batch_size", "optimizer", "lr", "momentum", "schedule"),
    *("weight_decay", "label_smoothing", "distribute", "image_size", "val_fraction", "test_fraction", "seed"),
    *("augment", "cache", "early_stopping", "class_weight", "strict", "deterministic", "data_dir", "steps_per_epoch"),
    *("overwrite", "verbose"),
)


def _finetune_options(f):
    from ktoolkit.transfer.finetune import STRATEGY_CHOICES, FinetuneConfig

    flag = functools.partial(_flag, FinetuneConfig)
    from ktoolkit.transfer.finetune import EPOCH_RANGE, STEP_BUDGET

    train = _train_flags(FinetuneConfig)
    train["epochs"] = flag(
        "epochs",
        type=int,
        help=f"finetune, full (the linear strategies have none). Default: from the data size, "
        f"ceil({STEP_BUDGET} steps / steps per epoch) within {EPOCH_RANGE[0]}-{EPOCH_RANGE[1]}.",
    )
    train["early_stopping"] = flag(
        "early_stopping",
        type=int,
        help="finetune, full: patience in epochs on the validation accuracy; the best epoch is kept (0: off).",
    )
    own = [
        flag(
            "strategy",
            type=click.Choice(STRATEGY_CHOICES),
            help="auto (decided from the data), linear, linear-early, knn (k-nearest neighbours on the top "
            "features), finetune or full.",
        ),
        flag("cut", help="Layer for linear-early (default: the best held-out probe)."),
        flag("unfreeze", type=int, help="finetune: top groups of the base to train."),
        flag("lr_decay", type=float, help="finetune: each deeper group's learning rate factor."),
        flag("dropout", type=float, help="Dropout before the new classifier."),
    ]
    return _with_options(f, [*_base_flags().values(), *own, *(train[k] for k in _FINETUNE_SHARED)])


@main.command("finetune")
@_finetune_options
@_user_errors
def finetune_cmd(config_file, overwrite, verbose, **values):
    """Transfer a pretrained base to your data: decides the strategy from the data, runs it, reports."""
    from ktoolkit.transfer.finetune import FinetuneConfig

    config = _train_config(config_file, config_class=FinetuneConfig, **values)
    _check_run_folder(config, overwrite)
    _setup_logging(verbose)
    from ktoolkit.transfer.finetune import finetune

    with _no_folder_left_on_failure(config.out):
        _print_result(finetune(config, progress=_interactive(), overwrite=overwrite))


# ------------------------------------------------------------------------------------------------ lr-find
# The flags `ktool lr-find` shares with `ktool train`: what the sweep depends on, in --help order.
_LR_FIND_SHARED = (
    *("config_file", "recipe", "data", "batch_size", "optimizer", "momentum", "weight_decay", "label_smoothing"),
    *("mixed_precision", "jit", "image_size", "channels", "val_fraction", "test_fraction", "seed", "augment"),
    *("cache", "class_weight", "strict", "deterministic", "data_dir"),
)
# The settings of a sweep of `ktool finetune`'s model (lr-find --base): FinetuneConfig fields.
_LR_FIND_BASE = ("weights", "strategy", "unfreeze", "lr_decay", "dropout")


def _lr_find_options(f):
    from ktoolkit.train.lr_find import MAX_STEPS, MIN_STEPS

    train = _train_flags()
    own = [
        click.option("--out", help="Folder for lr_find.png and lr_find.json.  [default: runs/lr-find]"),
        click.option(
            "--steps",
            type=click.IntRange(10),
            help=f"Steps of the sweep, one batch each.  [default: twice the training batches, {MIN_STEPS}-{MAX_STEPS}]",
        ),
        click.option(
            "--base",
            help="Sweep `ktool finetune`'s model on this base (mobilenet_v2, resnet50, ..., a run folder), "
            "not a --recipe.",
        ),
        click.option("--weights", help="--base: imagenet, a .h5/.keras file, or none (as for finetune)."),
        click.option(
            "--strategy",
            type=click.Choice(["auto", "finetune", "full"]),
            help="--base: finetune (LP-FT; also for auto) or full.  [default: finetune]",
        ),
        click.option("--unfreeze", type=int, help="--base, finetune: top groups of the base to train.  [default: 2]"),
        click.option(
            "--lr-decay", type=float, help="--base, finetune: each deeper group's rate factor.  [default: 0.3]"
        ),
        click.option("--dropout", type=float, help="--base: dropout before the new classifier.  [default: 0.2]"),
        click.option("-v", "--verbose", is_flag=True),
    ]
    return _with_options(f, [*(train[k] for k in _LR_FIND_SHARED), *own])


@main.command("lr-find")
@_lr_find_options
@_user_errors
def lr_find_cmd(config_file, out, steps, verbose, **values):
    """Find a learning rate: a short training with the rate growing from 1e-7 to 10; plots the loss and
    suggests a rate (fastai's valley; steepest descent too). `ktool train --lr auto` does this first."""
    config = _lr_find_config(config_file, out or "runs/lr-find", values)
    _setup_logging(verbose)
    from ktoolkit.train.lr_find import lr_find

    _print_result(lr_find(config, steps=steps, out=config.out, progress=_interactive()))


def _lr_find_config(config_file, out: str, values: dict):
    """A TrainConfig for a --recipe, a FinetuneConfig for a --base (given or in --config), checked before
    TensorFlow loads; ``out`` must not be the data (or base) folder."""
    from ktoolkit.train.config import read_settings
    from ktoolkit.train.engine import _check_place
    from ktoolkit.transfer.finetune import FinetuneConfig

    in_file = read_settings(config_file) if config_file else {}
    base = values.get("base") or in_file.get("base")
    if base and (values.get("recipe") or in_file.get("recipe")):
        raise ValueError("--base and --recipe: give one (a recipe to train, or a base to finetune).")
    if not base:
        given = [k for k in ("base", *_LR_FIND_BASE) if values.get(k) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')}: a setting of a --base sweep; give --base too.")
    values = {k: v for k, v in values.items() if not (base is None and k in ("base", *_LR_FIND_BASE))}
    config = _train_config(config_file, FinetuneConfig if base else None, **values, out=out)
    _check_place(Path(out), config)
    return config


def _advise_options(f):
    return _with_options(
        f,
        [
            *_base_flags().values(),
            click.option(
                "--data", required=True, help="Class-per-folder directory, CSV (path,label), .npz, or tfds:NAME."
            ),
            click.option(
                "--image-size",
                help="HEIGHT,WIDTH (default: the data's median resolution rounded to a multiple of 32, between "
                "the base's minimum and its default size; a run folder's own size).",
            ),
            click.option("--val-fraction", type=float, default=0.1, show_default=True),
            click.option("--test-fraction", type=float, default=0.1, show_default=True),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--data-dir", help="tensorflow-datasets folder for tfds: sources."),
            click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON."),
            click.option("-v", "--verbose", is_flag=True),
        ],
    )


@main.command("advise")
@_advise_options
@_user_errors
def advise_cmd(
    base,
    weights,
    small_threshold,
    similarity_threshold,
    data,
    image_size,
    val_fraction,
    test_fraction,
    seed,
    data_dir,
    as_json,
    verbose,
):
    """Which transfer-learning strategy fits this data and base, and the numbers behind it."""
    from ktoolkit.transfer.bases import check_base

    size = _parse_numbers(image_size, 2, "HEIGHT,WIDTH, e.g. 224,224", "--image-size") if image_size else None
    check_base(base or "mobilenet_v2", weights)
    _check_data(data)
    _setup_logging(verbose)
    import json

    from ktoolkit.data import load_data
    from ktoolkit.transfer.advise import advise
    from ktoolkit.transfer.bases import load_base
    from ktoolkit.transfer.features import FeatureCache

    source = load_data(
        data,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        data_dir=data_dir,
        progress=_interactive(),
    )
    result = advise(
        load_base(base or "mobilenet_v2", weights=weights, image_size=size, data=source),
        source,
        small_threshold=small_threshold,
        similarity_threshold=similarity_threshold,
        seed=seed,
        cache=FeatureCache(),
        progress=_interactive(),
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=float))
        return
    for line in result.lines():
        click.echo(line)
    click.echo(f"strategy: {result.decision.strategy}")


# ------------------------------------------------------------------------------------ evaluate/predict
@main.command("evaluate")
@click.option("--model", required=True, help="A run folder or a .keras file.")
@click.option("--data", help="Data to evaluate on (default: the run's own data, its test split).")
@click.option(
    "--split",
    type=click.Choice(["test", "val", "train", "all"]),
    default=None,
    help="Which split (default: test for the run's data, all of other data).",
)
@click.option("--out", help="Folder for metrics.json and confusion_matrix.png (default: the run folder's eval/).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@_user_errors
def evaluate_cmd(model, data, split, out, batch_size):
    """Accuracy, top-5, per-class precision/recall/F1, confusion matrix, most confused pairs."""
    _check_exists(model, "--model", "a run folder or a .keras file")
    _check_data(data)
    _check_out(out)
    _setup_logging()
    from ktoolkit.evaluate import evaluate_run

    _print_result(evaluate_run(model, data=data, split=split, out=out, batch_size=batch_size, progress=_interactive()))


@main.command("predict")
@click.option("--model", required=True, help="A run folder, a .keras file, or an exported .tflite or .onnx file.")
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, the runtimes' own lines included.")
@_user_errors
def predict_cmd(model, images, top_k, verbose):
    """Top-k labels with probabilities for each image file."""
    from ktoolkit.predict import is_exported, predict_files

    _check_exists(model, "--model", "a run folder, a .keras file, or an exported .tflite or .onnx file")
    # .tflite and .onnx files run without TensorFlow (a Jetson, a phone board)
    _setup_logging(verbose, tensorflow=not is_exported(model))

    results = predict_files(model, images, top_k=top_k)
    failed = 0
    for r in results:
        if r.error:
            failed += 1
            click.echo(_printable(f"{r.path}: {r.error}"), err=True)
            continue
        click.echo(_printable(f"{r.path}: " + ", ".join(f"{label} {p:.1%}" for label, p in r.top)))
    if failed == len(results):
        raise click.ClickException("no image could be read.")


# ------------------------------------------------------------------------------------- export/benchmark
def _export_modes_help() -> str:
    from tflite_export.modes import MODES

    return "; ".join(f"{m.name}: {m.description}" for m in MODES.values())


def _export_options(f):
    """ExportConfig's fields as flags. Every one defaults to None ("not given"; its help shows the
    dataclass's default): export() refuses a mode-specific tunable given to modes that ignore it,
    which it can only tell when "not given" is None."""
    from ktoolkit.export import ExportConfig

    flag = functools.partial(_flag, ExportConfig)
    return _with_options(
        f,
        [
            click.option("--model", required=True, help="A run folder (or a .keras file with --data)."),
            flag("mode", help="The export mode (listed below)."),
            flag("compare", help="More modes to export and compare side by side, e.g. float16,int8,qat."),
            flag("format", type=click.Choice(["tflite", "onnx", "saved_model"])),
            flag("out", help="Folder for the files and the report (default: the run folder's export/)."),
            flag("data", help="Images to calibrate and verify on (default: the run's data, split as in training)."),
            flag("calib_samples", type=int, help="Training images that int8 calibration sees."),
            flag(
                "int8_io",
                is_flag=True,
                help="Full-integer modes take and give uint8 (camera bytes) instead of float32.",
            ),
            flag(
                "onnx_target",
                help="Post-training int8 .onnx for: tensorrt (symmetric int8) or onnxruntime (asymmetric uint8, "
                "faster on onnxruntime's CPU kernels, not buildable by TensorRT; named *_ort_<mode>.onnx).",
            ),
            flag(
                "max_accuracy_drop",
                type=float,
                help="Budget in accuracy points; a file whose drop is over it is kept as *.FAILED.* and the command "
                "exits with 1. The verdict says whether the held-out images support that (else: cannot decide).",
            ),
            flag("epochs", type=int, help="Fine-tuning epochs per step of qat, prune and cluster modes."),
            flag("steps_per_epoch", type=int, help="Cap on fine-tuning batches per epoch."),
            flag("batch_size", type=int),
            flag("lr", type=float, help="Fine-tuning learning rate (Adam)."),
            flag("sparsity", type=float, help="Pruning's final share of zero weights."),
            flag("clusters", type=int, help="Shared values per kernel when clustering."),
            flag("threads", type=int, help="CPU threads for the latency column."),
            flag("latency_runs", type=int, help="Timed single-image runs per file."),
            click.option("-v", "--verbose", is_flag=True),
        ],
    )


@main.command("export", epilog=f"Modes: {_export_modes_help()}.")
@_export_options
@_user_errors
def export_cmd(model, verbose, **options):
    """Export a trained run for a phone (.tflite) or a Jetson (.onnx), verified on the held-out split.

    Every file is run on the held-out images (the test split, plus val when the test split has fewer
    than 300) and compared with the Keras model: accuracy and top-1 agreement with 95% intervals, the
    drop with its paired interval and McNemar's p, and a verdict: within budget, over budget, or cannot
    decide (too few images for the budget). The drop's point estimate names the file (*.FAILED.* over
    the budget) and sets the exit status. Files are named by model, input size, I/O type and mode, so
    exports never replace each other's files; re-exporting the same file replaces it and says so. The
    report (export_report.md/.json, export_compare.png) lists every file in the folder, with sizes,
    latency (all files of an export timed together, interleaved), the operators, and what the GPU
    delegate and NNAPI would not run.
    """
    _check_exists(model, "--model", "a run folder (or a .keras file with --data)")
    _check_data(options["data"])
    _check_out(options["out"])
    _setup_logging(verbose)
    from ktoolkit.export import export

    given = {name: value for name, value in options.items() if value is not None}
    folder = options["out"] or (Path(model) if os.path.isdir(model) else Path(model).parent) / "export"
    with _no_folder_left_on_failure(folder):
        result = export(model, **given, progress=_interactive())
    for line in result.lines():
        click.echo(_printable(line))
    if not result.ok:
        click.echo(f"Error: {result.failure()}", err=True)
        sys.exit(1)


@main.command("benchmark")
@click.argument("model", type=click.Path(exists=True))
@click.option("--threads", default="1,2,4", show_default=True, help="Thread counts to measure, comma-separated.")
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Timed single-image runs per thread count.",
)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, the runtimes' own lines included.")
@_user_errors
def benchmark_cmd(model, threads, runs, warmup, verbose):
    """Latency of a .tflite (LiteRT with XNNPACK) or .onnx (onnxruntime) file: p50/p90 per thread count.

    Needs no TensorFlow, so it runs as is on a Jetson or a phone dev board with ai-edge-litert.
    """
    from tflite_export.runtime import benchmark

    try:
        counts = tuple(int(t) for t in threads.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{threads!r}: write thread counts like 1,2,4.", param_hint="--threads")
    _setup_logging(verbose, tensorflow=False)
    results = benchmark(model, threads=counts, runs=runs, warmup=warmup, progress=_interactive())
    click.echo(_printable(f"{model}: single-image latency, {runs} runs after {warmup} warm-up"))
    click.echo("threads  p50 (ms)  p90 (ms)  mean (ms)")
    for r in results:
        click.echo(f"{r['threads']:>7}  {r['p50_ms']:>8.3f}  {r['p90_ms']:>8.3f}  {r['mean_ms']:>9.3f}")


# ------------------------------------------------------------------------------------------------- demo
@main.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Folder for the demo's data, runs and DEMO.md.")
@click.option("--base", help="Transfer from this base instead of training one (e.g. mobilenet_v2, a run folder).")
@click.option("--weights", help="Weights for --base: imagenet, a .h5/.keras file, or none.")
@click.option(
    "--base-epochs",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Epochs of the demo's base (cifar_resnet20 on the digits 0-4).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Epochs of fine-tuning strategies and of quantization-aware training, if needed.",
)
@click.option("--overwrite", is_flag=True, help="Start over instead of reusing finished steps.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, TensorFlow's included.")
@_user_errors
def demo_cmd(out, base, weights, base_epochs, epochs, overwrite, verbose):
    """The whole journey on built-in digits, offline: base, transfer, int8 export, verification, latency.

    Needs no download (scikit-learn's digits are the images). A few minutes on two CPU cores; prints
    every step and ends with the path of DEMO.md, which links the reports.
    """
    from ktoolkit.transfer.bases import check_base

    if base is not None:
        check_base(base, weights)
    _check_out(out)
    _setup_logging(verbose)
    from ktoolkit.demo import demo

    with _no_folder_left_on_failure(out):
        result = demo(
            out,
            base=base,
            weights=weights,
            base_epochs=base_epochs,
            epochs=epochs,
            overwrite=overwrite,
            progress=_interactive(),
            echo=click.echo,
            started=click.get_current_context().meta.get("ktoolkit.started"),
        )
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
