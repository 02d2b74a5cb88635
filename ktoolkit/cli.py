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


def _format_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _parse_shape(value: str | None):
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a shape; write it as HEIGHT,WIDTH,CHANNELS, e.g. 224,224,3.")
    if len(shape) != 3:
        raise click.BadParameter(f"{value!r} has {len(shape)} numbers; write HEIGHT,WIDTH,CHANNELS, e.g. 224,224,3.")
    return shape


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
    kwargs = {"api": api}
    if input_shape:
        kwargs["input_shape"] = _parse_shape(input_shape)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = recipe.build(**kwargs)
    except ValueError as err:
        raise _fail(err)
    click.echo("")
    model.summary(print_fn=lambda line, **_: click.echo(line), line_length=110)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
