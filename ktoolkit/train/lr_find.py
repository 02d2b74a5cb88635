"""`ktool lr-find`: the learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural
Networks"), as fastai's ``lr_find`` does it, for recipes and for ``ktool finetune``'s bases.

The model trains for a few hundred steps while the learning rate grows exponentially from 1e-7 to 10,
one step per batch (the training split repeated as often as needed). The loss is smoothed (an exponential
moving average, beta 0.98, debiased) and the sweep stops once the smoothed loss passes 4x its minimum:
the rate has become too large. The weights (and optimizer state) are put back afterwards, so the sweep
changes nothing. Two suggestions are read off the smoothed curve, without its first 10% and last 5
points (fastai's trimming):

- ``valley`` (fastai's default, from ESRI): the middle of the longest stretch over which the loss keeps
  falling (the longest decreasing subsequence): a rate well inside the region where training makes
  progress, away from both the flat start and the blow-up.
- ``steep``: where the smoothed loss falls fastest per decade of learning rate.

``valley`` is the one ``--lr auto`` uses. The plot (lr_find.png) shows the raw and smoothed loss on a
log axis with both suggestions marked and named; lr_find.json holds the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

START_LR = 1e-7
END_LR = 10.0
#: The EMA factor of the smoothed loss (fastai's Recorder).
SMOOTHING = 0.98
#: The sweep stops when the smoothed loss exceeds this times its minimum.
DIVERGENCE = 4.0
#: Steps of the sweep: one per batch; ``default_steps`` picks MIN_STEPS..MAX_STEPS from the split's size.
MIN_STEPS, MAX_STEPS = 100, 200
#: The suggestion --lr auto uses, and the one reported beside it.
METHOD, OTHER_METHOD = "valley", "steep"
PLOT, RECORD = "lr_find.png", "lr_find.json"


def default_steps(batches_per_epoch: int) -> int:
    """Steps of a sweep: two passes over the training split, within 100..200 (fewer for a small split, whose
    batches are then repeated; fastai's default is 100)."""
    return int(min(MAX_STEPS, max(MIN_STEPS, 2 * batches_per_epoch)))


def schedule(steps: int, start: float = START_LR, end: float = END_LR) -> list[float]:
    """The sweep's rates: ``start * (end / start) ** (i / (steps - 1))``, from ``start`` to ``end``."""
    if steps < 2:
        raise ValueError(f"--steps {steps}: a sweep needs at least 2 steps (100-200 is usual).")
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


@dataclass
class LRFindResult:
    """A sweep: the rates and losses of every step it took, the suggestions and where it stopped.

    Attributes:
        lrs, losses, smoothed: per step taken: the rate, the batch's loss, the smoothed loss.
        planned: the steps asked for (the sweep stops earlier when the loss blows up).
        suggestions: {"valley": rate, "steep": rate}.
        method: the suggestion used (valley).
        stopped: why the sweep ended, in words.
        what: the model and optimizer swept, in words.
        seconds: how long it took.
        plot: lr_find.png once saved.
    """

    lrs: list
    losses: list
    smoothed: list
    planned: int
    suggestions: dict
    method: str = METHOD
    stopped: str = ""
    what: str = ""
    seconds: float = 0.0
    plot: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def suggestion(self) -> float:
        """The rate ``method`` suggests (what --lr auto trains with)."""
        return self.suggestions[self.method]

    def lines(self) -> list[str]:
        """What `ktool lr-find` prints."""
        others = ", ".join(f"{m} {v:.3g}" for m, v in self.suggestions.items() if m != self.method)
        out = [
            f"lr-find: {self.what}; {len(self.lrs)} of {self.planned} steps from {self.lrs[0]:.0e} to "
            f"{self.lrs[-1]:.3g} in {self.seconds:.0f} s ({self.stopped})",
            f"suggested lr: {self.suggestion:.3g} ({self.method}: {_METHOD_WORDS[self.method]})"
            + (f"; also {others}" if others else ""),
        ]
        return out + ([f"plot: {self.plot}"] if self.plot else [])

    def summary(self) -> str:
        """One sentence for config.yaml and reports: the value and how it was found."""
        return (
            f"found by lr-find ({self.method}; {len(self.lrs)} steps from {self.lrs[0]:.0e} to {self.lrs[-1]:.3g}, "
            + ", ".join(f"{m} {v:.3g}" for m, v in self.suggestions.items())
            + ")"
        )

    def to_dict(self) -> dict:
        return {
            "suggestion": self.suggestion,
            "method": self.method,
            "suggestions": dict(self.suggestions),
            "what": self.what,
            "stopped": self.stopped,
            "planned_steps": self.planned,
            "steps": len(self.lrs),
            "start_lr": self.lrs[0],
            "end_lr": self.lrs[-1],
            "smoothing": SMOOTHING,
            "divergence": DIVERGENCE,
            "seconds": round(self.seconds, 1),
            **self.extra,
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "smoothed": list(self.smoothed),
        }

    def save(self, out) -> LRFindResult:
        """Writes lr_find.png and lr_find.json into the folder ``out``."""
        from ktoolkit.io import write_json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.plot = plot(self, out / PLOT)
        write_json(out / RECORD, self.to_dict())
        return self


_METHOD_WORDS = {
    "valley": "the middle of the longest stretch where the smoothed loss falls",
    "steep": "where the smoothed loss falls fastest",
}


def valley(lrs, losses) -> int:
    """fastai's ``valley``: the index halfway along the longest decreasing run of ``losses`` (the longest
    decreasing subsequence, ending where it ends; O(n^2), n <= a few hundred)."""
    n = len(losses)
    lds, max_start, max_end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    return min(n - 1, max(0, max_start + int(sections) + int(sections / 2)))


def steep(lrs, losses) -> int:
    """fastai's ``steep``: the index where the loss falls fastest per unit of log learning rate."""
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)]
    return min(range(len(slopes)), key=slopes.__getitem__) if slopes else 0


def suggest(lrs, smoothed) -> dict:
    """{"valley": rate, "steep": rate} from the smoothed curve without its first 10% and last 5 points (the
    flat start and the blow-up; fastai's trimming). A sweep too short for that keeps what it has."""
    skip_start, skip_end = len(lrs) // 10, 5
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    end = (finite[-1] + 1) if finite else 0
    lo, hi = skip_start, end - skip_end
    if hi - lo < 3:
        lo, hi = 0, max(end - 1, 0)
    if hi - lo < 2:
        raise ValueError(
            f"lr-find: the loss diverged after {len(lrs)} step(s), at lr {lrs[-1]:.2g}: nothing to suggest "
            "from; check the data (labels, scale), or use a smaller --batch-size."
        )
    rates, values = lrs[lo:hi], smoothed[lo:hi]
    return {"valley": float(rates[valley(rates, values)]), "steep": float(rates[steep(rates, values)])}


def _optimizer_state(optimizers):
    """What to put back after the sweep: each optimizer's variables (its slots and step count) and rate."""
    import tf_keras

    return [
        ({id(v): v.numpy() for v in optimizer.variables}, float(tf_keras.backend.get_value(optimizer.learning_rate)))
        for optimizer, _ in optimizers
    ]


def _restore(model, weights, optimizers, state):
    """The model's weights as before the sweep; the optimizers' variables as before (variables the sweep
    created, slots and step count, back to 0: a fresh optimizer's state), and their rates."""
    import numpy as np

    model.set_weights(weights)
    for (optimizer, _), (values, rate) in zip(optimizers, state):
        for v in optimizer.variables:
            v.assign(values[id(v)] if id(v) in values else np.zeros(v.shape, v.dtype.as_numpy_dtype))
        optimizer.learning_rate = rate


def sweep(model, dataset, *, steps: int, optimizers=None, start=START_LR, end=END_LR, progress=False, what=""):
    """The range test on a compiled Keras ``model``: one ``train_on_batch`` per rate of :func:`schedule`,
    on batches of ``dataset`` (repeated), stopping once the smoothed loss exceeds :data:`DIVERGENCE` times
    its minimum or is not finite. The weights and optimizer state are restored afterwards.

    Args:
        optimizers: [(optimizer, scale)]: each gets ``rate * scale`` (groups trained at fixed ratios of one
            rate, like finetune's); default [(model.optimizer, 1)]. Their rates must be plain numbers.
        what: the model and optimizer, in words, for the result's lines.

    Returns:
        An :class:`LRFindResult` (not saved; ``.save(out)`` writes the plot and the JSON).
    """
    import tf_keras

    optimizers = optimizers or [(model.optimizer, 1.0)]
    rates = schedule(steps, start, end)
    weights, state = model.get_weights(), _optimizer_state(optimizers)
    lrs, losses, smoothed, average, best = [], [], [], 0.0, math.inf
    stopped, started = f"reached {end:g}", time.time()
    bar = _bar(steps, progress)
    try:
        for i, (rate, batch) in enumerate(zip(rates, dataset.repeat())):
            for optimizer, scale in optimizers:
                tf_keras.backend.set_value(optimizer.learning_rate, rate * scale)
            x, y, sample_weight = tf_keras.utils.unpack_x_y_sample_weight(batch)
            loss = float(
                model.train_on_batch(x, y, sample_weight=sample_weight, reset_metrics=True, return_dict=True)["loss"]
            )
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            value = average / (1 - SMOOTHING ** (i + 1)) if math.isfinite(loss) else math.inf
            lrs.append(rate)
            losses.append(loss)
            smoothed.append(value)
            bar.update(1)
            best = min(best, value)
            if not math.isfinite(value) or value > DIVERGENCE * best:
                stopped = f"stopped at lr {rate:.3g}: the smoothed loss passed {DIVERGENCE:g}x its minimum {best:.3g}"
                break
    finally:
        bar.close()
        _restore(model, weights, optimizers, state)
    result = LRFindResult(lrs, losses, smoothed, steps, suggest(lrs, smoothed), stopped=stopped, what=what)
    result.seconds = time.time() - started
    return result


def _bar(steps: int, progress: bool):
    """A tqdm bar of the sweep's steps on the terminal; nothing without ``progress``."""
    if progress:
        from tqdm import tqdm

        return tqdm(total=steps, desc="lr-find", unit="step", leave=False)

    class _Quiet:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Quiet()


def plot(result: LRFindResult, path) -> Path:
    """lr_find.png: loss against learning rate (log x), raw and smoothed, the suggestions marked and named."""
    from ktoolkit.io import save_figure
    from ktoolkit.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="loss per batch")
    finite = [(r, v) for r, v in zip(result.lrs, result.smoothed) if math.isfinite(v)]
    ax.plot([r for r, _ in finite], [v for _, v in finite], color="C0", lw=1.8, label="smoothed loss")
    styles = {"valley": ("C3", "o"), "steep": ("C2", "s")}
    for method, rate in result.suggestions.items():
        color, marker = styles.get(method, ("C1", "^"))
        loss = min(finite, key=lambda p: abs(math.log(p[0]) - math.log(rate)))[1]
        used = " (used)" if method == result.method else ""
        ax.axvline(rate, color=color, lw=0.8, ls="--")
        ax.plot([rate], [loss], marker, color=color, ms=8, label=f"{method}: {rate:.2g}{used}")
    values = [v for _, v in finite]
    low, high = min(values), max(values[: max(1, len(values) - 3)])  # the blow-up's last points off the scale
    ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.15 * (high - low + 1e-9))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate finder: {result.what}" if result.what else "learning-rate finder", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


def lr_find(model_or_config, dataset=None, *, steps: int | None = None, out=None, progress: bool = False):
    """The learning-rate range test of a compiled model, or of the model a run's settings would train.

    Args:
        model_or_config: a compiled tf_keras model (then ``dataset`` gives its training batches), a
            :class:`~ktoolkit.train.config.TrainConfig` (its recipe on its data's training split, with its
            optimizer, batch size, augmentation and class weights), or a
            :class:`~ktoolkit.transfer.finetune.FinetuneConfig` (the finetune or full strategy's model).
        steps: steps of the sweep; default :func:`default_steps` of the training split's batches (100 for
            a model and dataset).
        out: folder for lr_find.png and lr_find.json; none written when None.

    Returns:
        An :class:`LRFindResult`; the model's weights are as they were.
    """
    from ktoolkit.train.config import RunConfig

    if isinstance(model_or_config, RunConfig):
        if hasattr(model_or_config, "lr_sweep"):  # a FinetuneConfig sweeps its strategy's model (no upward import)
            result = model_or_config.lr_sweep(steps=steps, progress=progress)
        else:
            result = _lr_find_recipe(model_or_config, steps=steps, progress=progress)
    else:
        if dataset is None:
            raise ValueError("lr_find(model, dataset): give the training batches to sweep over.")
        model = model_or_config
        result = sweep(model, dataset, steps=steps or MIN_STEPS, progress=progress, what=describe(model))
    return result.save(out) if out is not None else result


def describe(model, optimizer=None) -> str:
    """ "lenet5 (61,706 parameters), adam": what a sweep trained, for its lines and plot."""
    optimizer = optimizer or model.optimizer
    name = type(getattr(optimizer, "inner_optimizer", optimizer)).__name__.lower()
    return f"{model.name} ({model.count_params():,} parameters), {name}"


def recipe_sweep_model(recipe, config, num_classes: int, image_size, channels: int):
    """The recipe built as `ktool train` builds it (its options, auxiliary heads and loss weights), compiled
    with the run's optimizer at a constant rate (the sweep sets it) and its loss, without metrics."""
    import tf_keras

    from ktoolkit.train.engine import _build, _optimizer

    model, loss_weights = _build(recipe, config, num_classes, image_size, channels)
    optimizer, _ = _optimizer(dataclasses.replace(config, lr=START_LR, schedule="constant"), 1)
    model.compile(
        optimizer=optimizer,
        loss={
            name: tf_keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
            for name in model.output_names
        },
        loss_weights=loss_weights,
        jit_compile=config.jit,
    )
    return model


def sweep_dataset(train_ds, outputs, class_weight):
    """The training batches as `ktool train` fits on them: labels for every output, class weights."""
    from ktoolkit.train.engine import _targets, weight_by_class

    return weight_by_class(_targets(train_ds, list(outputs)), class_weight)


def _lr_find_recipe(config, *, steps, progress):
    """lr_find of a TrainConfig: its data loaded and split as `ktool train` would, its recipe built and swept."""
    import tf_keras

    import recipes
    from ktoolkit.data import AugmentConfig, split_dataset
    from ktoolkit.train.engine import class_weights, config_data, steps_per_epoch

    config = config.validate()
    source = config_data(config, progress)
    if source.num_classes < 2:
        raise ValueError(f"data={config.data!r} has {source.num_classes} class(es) with images; a classifier needs 2.")
    recipe = recipes.get(config.recipe)
    image_size = tuple(config.image_size or recipe.input_shape[:2])
    channels = config.channels or recipe.input_shape[2]
    train = source.splits.get("train")
    augment = None if config.augment in ("", "none", None) else AugmentConfig.parse(config.augment)
    shape = dict(num_classes=source.num_classes, image_size=image_size, channels=channels)
    train_ds = split_dataset(train, config, training=True, augment=augment, batch_size=config.batch_size, **shape)
    if train_ds is None:
        raise ValueError(f"data={config.data!r}: the training split is empty.")
    weights = class_weights(train.labels, source.num_classes, config.class_weight)
    if config.mixed_precision:
        import tensorflow as tf

        gpu = tf.config.list_logical_devices("GPU")
        tf_keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    try:
        tf_keras.utils.set_random_seed(config.seed)
        model = recipe_sweep_model(recipe, config, source.num_classes, image_size, channels)
        steps = steps or default_steps(steps_per_epoch(config, len(train), config.batch_size))
        log.info("lr-find: %s on %d training images, %d steps", recipe.name, len(train), steps)
        dataset = sweep_dataset(train_ds, model.output_names, weights)
        return sweep(model, dataset, steps=steps, progress=progress, what=f"{recipe.name}, {config.optimizer}")
    finally:
        if config.mixed_precision:
            tf_keras.mixed_precision.set_global_policy("float32")


def recorded_lr(run, config):
    """``config`` with the rate an interrupted ``--lr auto`` run found when it started (its config.yaml
    holds the number, lr_find.json how it was found): a resumed run trains on with it, no new sweep.
    Unchanged when ``config.lr`` is a number or nothing was recorded."""
    from ktoolkit.train.config import LR_AUTO, read_settings

    if config.lr != LR_AUTO or not (run.root / RECORD).exists() or not run.config.exists():
        return config
    lr = read_settings(run.config).get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0:
        log.info("resuming with lr %.3g, found by lr-find when the run started (%s)", lr, RECORD)
        return dataclasses.replace(config, lr=float(lr))
    return config


def use_result(run, config, result: LRFindResult):
    """After a sweep for ``--lr auto``: lr_find.png and .json in the run folder, and config.yaml rewritten
    with the rate found (a comment on its line says how). Returns ``config`` with that rate."""
    from ktoolkit.io import write_text

    result.save(run.root)
    config = dataclasses.replace(config, lr=result.suggestion)
    text = config.to_yaml()
    lines = [
        line + f"  # {result.summary()}; see {RECORD}" if line.startswith("lr: ") else line
        for line in text.splitlines()
    ]
    write_text(run.config, "\n".join(lines) + "\n")
    log.info("lr auto: %.3g, %s", result.suggestion, result.summary())
    return config


def report_section(run) -> list[tuple[str, str]]:
    """The report's "Learning rate" section of an ``--lr auto`` run: the rate, how it was found, the plot."""
    from ktoolkit.io import read_json_object
    from tflite_export.untrusted import sanitize_text

    record = read_json_object(run.root / RECORD)
    if record is None:
        return []
    try:  # the folder may come from anyone: a record of the wrong shape gives no section, not a traceback
        method = sanitize_text(str(record["method"]))
        others = ", ".join(
            f"{sanitize_text(str(m))} {float(v):.3g}" for m, v in record["suggestions"].items() if m != record["method"]
        )
        body = (
            f"**{float(record['suggestion']):.3g}**, found by `ktool lr-find` before training ({method}: "
            f"{_METHOD_WORDS.get(method, method)}; also {others}): {int(record['steps'])} of "
            f"{int(record['planned_steps'])} steps from {float(record['start_lr']):.0e} to "
            f"{float(record['end_lr']):.3g} ({sanitize_text(str(record['stopped']))}), "
            f"{float(record['seconds']):.0f} s.\n\n![learning-rate finder]({PLOT})"
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        log.warning("%s: not the record lr-find writes; the report has no learning-rate section", RECORD)
        return []
    return [("Learning rate", body)]
