"""The ``ktool`` command line: a thin map onto the Python API (same parameter names).

The CLI owns the terminal: library code logs and returns values, the commands print them.
TensorFlow is imported only by the commands that build or run models, so ``ktool --version`` and
``ktool recipes`` answer at once.
"""

from __future__ import annotations

import os
import sys

import click

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) is noise at a terminal; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ktoolkit


def _fail(err: Exception) -> click.ClickException:
    return click.ClickException(str(err))


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


def _setup_logging(verbose: bool = False):
    """ktoolkit's log lines go to stderr as plain sentences; TensorFlow's own logging is quieted."""
    import logging

    if not verbose:
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
    if len(numbers) != count:
        raise click.BadParameter(f"{value!r}: write {form}.", param_hint=param_hint)
    return numbers


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(ktoolkit.__version__, prog_name="ktool")
def main():
    """ktoolkit: classic CNN recipes, training, transfer learning and verified on-device export."""


@main.group("recipes", invoke_without_command=True)
@click.option("--task", type=click.Choice(["classification", "autoencoder", "contrastive"]), help="Only this task.")
@click.option("--family", help="Only this family (e.g. resnet, vgg).")
@click.option("--markdown", is_flag=True, help="Print a Markdown table (the README's).")
@click.pass_context
def recipes_cmd(ctx, task, family, markdown):
    """List the architecture recipes (name, family, parameters, input size, paper)."""
    if ctx.invoked_subcommand is not None:
        return
    import recipes

    rows = [r for r in recipes.all_recipes() if (task is None or r.task == task) and (family is None or r.family == family)]
    if not rows:
        families = sorted({r.family for r in recipes.all_recipes()})
        raise click.ClickException(f"no recipes match; families are {', '.join(families)}.")
    header = ("name", "family", "params", "input", "paper")
    table = [
        (r.name, r.family, _format_count(r.params), "x".join(str(d) for d in r.input_shape), r.paper)
        for r in rows
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
@click.option("--api", type=click.Choice(["tf_keras", "keras3"]), default="tf_keras", show_default=True,
              help="Which Keras to build with.")
def recipes_show(name, input_shape, num_classes, api):
    """Show a recipe's metadata and layer summary."""
    import recipes

    try:
        recipe = recipes.get(name)
    except recipes.UnknownRecipeError as err:
        raise _fail(err)
    click.echo(f"{recipe.name}: {recipe.description}")
    click.echo(f"  family        {recipe.family}")
    click.echo(f"  paper         {recipe.paper}")
    click.echo(f"  task          {recipe.task}")
    click.echo(f"  input         {'x'.join(str(d) for d in recipe.input_shape)} (at least {recipe.min_size}x{recipe.min_size})")
    click.echo(f"  parameters    {recipe.params:,}" + (f" (paper: {_format_count(int(recipe.paper_params))})" if recipe.paper_params else ""))
    click.echo(f"  preprocessing {recipe.preprocessing}")
    click.echo(f"  layer groups  {', '.join(f'{g} (to {layer})' for g, layer in recipe.layer_groups)}")
    click.echo(f"  head starts   {recipe.head_start}")
    _quiet_tensorflow_import()
    kwargs = {"api": api}
    if input_shape:
        kwargs["input_shape"] = _parse_numbers(input_shape, 3, "HEIGHT,WIDTH,CHANNELS, e.g. 224,224,3", "--input-shape")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = recipe.build(**kwargs)
    except ValueError as err:
        raise _fail(err)
    click.echo("")
    model.summary(print_fn=lambda line, **_: click.echo(line), line_length=110)


# ----------------------------------------------------------------------------------------------- data
@main.group("data")
def data_cmd():
    """Inspect a dataset before training."""


@data_cmd.command("check")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_check(folder, as_json):
    """Scan FOLDER (one subfolder per class): every unreadable file by path and reason, class counts.

    Exits with status 1 when it finds problems (bad files, empty classes), 0 when all is well.
    """
    _setup_logging()
    from ktoolkit.data import scan_folder

    report = scan_folder(folder, progress=_interactive())
    if as_json:
        import json

        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format())
    if not report.ok:
        sys.exit(1)  # for scripts: problems were found (training would still skip the bad files)


# ---------------------------------------------------------------------------------------------- train
def _train_options(f):
    """The TrainConfig fields as flags (same names, - for _). Defaults come from TrainConfig/--config."""
    from ktoolkit.train.config import DISTRIBUTES, OPTIMIZERS, SCHEDULES

    options = [
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                     help="YAML file with these settings (e.g. a run's config.yaml); flags override it."),
        click.option("--recipe", help="Architecture (see `ktool recipes`)."),
        click.option("--data", help="Class-per-folder directory, CSV (path,label), .npz, or tfds:NAME."),
        click.option("--out", help="Run folder (default runs/train). An interrupted run there is resumed."),
        click.option("--epochs", type=int),
        click.option("--batch-size", type=int, help="Per replica; the global batch is this times the replicas."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS)),
        click.option("--lr", type=float, help="Learning rate."),
        click.option("--momentum", type=float),
        click.option("--schedule", type=click.Choice(SCHEDULES)),
        click.option("--weight-decay", type=float),
        click.option("--label-smoothing", type=float),
        click.option("--mixed-precision/--no-mixed-precision", default=None),
        click.option("--jit/--no-jit", default=None, help="XLA-compile the training step."),
        click.option("--distribute", type=click.Choice(DISTRIBUTES)),
        click.option("--image-size", help="HEIGHT,WIDTH to train at (default: the recipe's)."),
        click.option("--channels", type=click.Choice(["1", "3"])),
        click.option("--val-fraction", type=float),
        click.option("--test-fraction", type=float),
        click.option("--seed", type=int),
        click.option("--augment", help="e.g. flip,crop or flip,crop,color=20,mixup=0.2; 'none' for none."),
        click.option("--cache", help="memory, none, or a folder for tf.data's cache files."),
        click.option("--early-stopping", type=int, help="Patience in epochs on the validation loss (0: off)."),
        click.option("--strict/--no-strict", default=None, help="Fail on unreadable images instead of skipping."),
        click.option("--deterministic/--no-deterministic", default=None),
        click.option("--data-dir", help="tensorflow-datasets folder for tfds: sources."),
        click.option("--steps-per-epoch", type=int, help="Cap the steps per epoch (quick trials)."),
        click.option("--overwrite", is_flag=True, help="Replace a finished run in --out."),
        click.option("-v", "--verbose", is_flag=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _train_config(config_file, **values):
    from ktoolkit.train.config import TrainConfig

    if values.get("image_size"):
        values["image_size"] = _parse_numbers(values["image_size"], 2, "HEIGHT,WIDTH, e.g. 224,224", "--image-size")
    if values.get("channels"):
        values["channels"] = int(values["channels"])
    values = {k: v for k, v in values.items() if v is not None}
    return TrainConfig.from_yaml(config_file, **values) if config_file else TrainConfig.from_dict(values)


@main.command("train")
@_train_options
def train_cmd(config_file, overwrite, verbose, **values):
    """Train a recipe on your data; leaves a run folder with models, curves and a report."""
    _setup_logging(verbose)
    import recipes
    from ktoolkit.train import RunExistsError, train

    try:
        config = _train_config(config_file, **values)
        result = train(config, progress=_interactive(), overwrite=overwrite)
    except (ValueError, FileNotFoundError, RunExistsError, recipes.UnknownRecipeError) as err:
        raise _fail(err)
    _print_result(result)


def _print_result(result):
    m = result.metrics
    if m:
        top5 = f", top-5 {m['top5']:.1%}" if m.get("top5") is not None else ""
        click.echo(f"{m['split']} accuracy {m['accuracy']:.1%}{top5} on {m['images']} images")
    click.echo(f"run folder: {result.run.root}  (report: {result.run.report_md})")


# ------------------------------------------------------------------------------------ evaluate/predict
@main.command("evaluate")
@click.option("--model", required=True, help="A run folder or a .keras file.")
@click.option("--data", help="Data to evaluate on (default: the run's own data, its test split).")
@click.option("--split", type=click.Choice(["test", "val", "train", "all"]), default=None,
              help="Which split (default: test for the run's data, all of other data).")
@click.option("--out", help="Folder for metrics.json and confusion_matrix.png (default: the run folder's eval/).")
@click.option("--batch-size", type=int, default=32, show_default=True)
def evaluate_cmd(model, data, split, out, batch_size):
    """Accuracy, top-5, per-class precision/recall/F1, confusion matrix, most confused pairs."""
    _setup_logging()
    from ktoolkit.evaluate import evaluate_run

    try:
        metrics, folder = evaluate_run(model, data=data, split=split, out=out, batch_size=batch_size,
                                       progress=_interactive())
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err)
    top5 = f", top-5 {metrics['top5']:.1%}" if metrics.get("top5") is not None else ""
    click.echo(f"{metrics['split']}: accuracy {metrics['accuracy']:.1%}{top5} on {metrics['images']} images, "
               f"macro F1 {metrics['macro_f1']:.3f}")
    for c in metrics["per_class"]:
        click.echo(f"  {c['class']:<20} precision {c['precision']:.3f}  recall {c['recall']:.3f}  "
                   f"F1 {c['f1']:.3f}  ({c['support']} images)")
    if metrics["most_confused"]:
        click.echo("most confused (true -> predicted):")
        for m in metrics["most_confused"][:5]:
            click.echo(f"  {m['true']} -> {m['predicted']}: {m['count']}")
    click.echo(f"written to {folder}")


@main.command("predict")
@click.option("--model", required=True, help="A run folder or a .keras file.")
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", type=int, default=5, show_default=True)
def predict_cmd(model, images, top_k):
    """Top-k labels with probabilities for each image file."""
    _setup_logging()
    from ktoolkit.predict import predict_files

    try:
        results = predict_files(model, images, top_k=top_k)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err)
    failed = 0
    for r in results:
        if r.error:
            failed += 1
            click.echo(f"{r.path}: {r.error}", err=True)
            continue
        click.echo(f"{r.path}: " + ", ".join(f"{label} {p:.1%}" for label, p in r.top))
    if failed == len(results):
        raise click.ClickException("no image could be read.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
