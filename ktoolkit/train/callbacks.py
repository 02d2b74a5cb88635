"""Callbacks that make a run folder survive crashes.

Order matters and is set by the engine: ``RunLog`` and ``BestModel`` write at the end of an epoch
*before* Keras's ``BackupAndRestore`` saves the checkpoint. A kill between the two makes the resumed
run repeat that epoch, and ``RunLog`` drops the history rows of epochs the checkpoint does not have,
so history.csv always holds each completed epoch once.

A NaN or infinite loss stops training at that batch: ``RunLog`` marks the run failed in state.json
(the engine then raises), and ``BestModel`` never keeps the model of such an epoch.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time

import tf_keras

from ktoolkit.io import save_model, write_json, write_text
from ktoolkit.runs import Run

log = logging.getLogger(__name__)


def current_learning_rate(optimizer) -> float:
    lr = optimizer.learning_rate
    if isinstance(lr, tf_keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(optimizer.iterations)
    return float(tf_keras.backend.get_value(lr))


def read_history(path) -> list[dict]:
    """Rows of a history.csv as dicts of floats (epoch as int)."""
    try:
        text = open(path).read()
    except FileNotFoundError:
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v not in ("", None)})
    return rows


def write_history(path, rows: list[dict]):
    columns = ["epoch"] + sorted({k for row in rows for k in row} - {"epoch"})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text(path, out.getvalue())


class RunLog(tf_keras.callbacks.Callback):
    """Keeps history.csv and state.json in step with the completed epochs; stops training when the
    loss is no longer finite (``failed`` then says how, e.g. "loss became nan at epoch 3")."""

    def __init__(self, run: Run, epochs: int, write: bool = True):
        super().__init__()
        self.run, self.epochs, self.write = run, epochs, write
        self._rows = None
        self._previous_end = None
        self._epoch = 0
        self.started_at_epoch = 0
        self.failed = None
        self.failed_lr = None

    def on_epoch_begin(self, epoch, logs=None):
        # An epoch's seconds run from the end of the previous one, so they include the saving that
        # BestModel and BackupAndRestore do after it: the wall-clock cost of an epoch.
        if self._previous_end is None:
            self._previous_end = time.perf_counter()
        self._epoch = epoch
        if self._rows is None:  # first epoch of this process: drop rows the checkpoint does not cover
            self.started_at_epoch = epoch
            self._rows = [row for row in read_history(self.run.history) if row["epoch"] < epoch]
            if epoch:
                log.info(
                    "resuming at epoch %d of %d (epochs 1-%d restored from %s)",
                    epoch + 1,
                    self.epochs,
                    epoch,
                    self.run.backup,
                )

    def on_train_batch_end(self, batch, logs=None):
        # Every worker sees the same (all-reduced) loss, so all of them stop at the same batch.
        self._check_loss(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._check_loss(logs)
        if self.failed:  # not a completed epoch: no history row, state.json says why
            if self.write:
                state = self.run.read_state()
                state.update({"complete": False, "failed": self.failed})
                write_json(self.run.state, state)
            return
        now = time.perf_counter()
        row = {
            "epoch": epoch,
            "lr": current_learning_rate(self.model.optimizer),
            "seconds": round(now - self._previous_end, 3),
        }
        self._previous_end = now
        row.update({k: float(v) for k, v in (logs or {}).items() if k != "learning_rate" and _finite(v)})
        self._rows.append(row)
        if self.write:
            write_history(self.run.history, self._rows)
            state = self.run.read_state()
            state.update({"epochs_completed": epoch + 1, "epochs": self.epochs, "complete": False})
            write_json(self.run.state, state)

    def on_train_end(self, logs=None):
        if self._rows is None:  # no epoch ran: the checkpoint was of the last one (killed before the report)
            self._rows = [row for row in read_history(self.run.history) if row["epoch"] < self.epochs]
            self.started_at_epoch = len(self._rows)
            log.info(
                "resuming at epoch %d of %d (epochs 1-%d restored from %s): nothing left to train",
                self.started_at_epoch + 1,
                self.epochs,
                self.started_at_epoch,
                self.run.backup,
            )

    def _check_loss(self, logs):
        loss = (logs or {}).get("loss")
        if self.failed or loss is None or _finite(loss):
            return
        self.failed = f"loss became {float(loss)} at epoch {self._epoch + 1}"
        self.failed_lr = current_learning_rate(self.model.optimizer)
        self.model.stop_training = True

    @property
    def rows(self) -> list[dict]:
        return list(self._rows or [])


class BestModel(tf_keras.callbacks.Callback):
    """Saves the inference model to best.keras (atomically) when ``monitor`` improves.

    The best value is kept in best.json, so a resumed run only replaces best.keras with a better model.
    Every worker of a multi-worker run makes the same decision (the logs are all-reduced and best.json
    is on the shared run folder) and saves; only the chief's file is kept.
    """

    def __init__(self, run: Run, monitor: str, mode: str, inference_model, write: bool = True):
        super().__init__()
        self.run, self.monitor, self.mode, self.write = run, monitor, mode, write
        self.inference_model = inference_model
        self.path = run.root / "best.json"
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.best = saved.get("value") if saved.get("monitor") == monitor else None
        self.best_epoch = saved.get("epoch")

    def _better(self, value) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor)
        diverged = not _finite(logs.get("loss", 0.0))  # a model with NaN weights may still score chance accuracy
        if value is None or not _finite(value) or diverged or not self._better(float(value)):
            return
        self.best, self.best_epoch = float(value), epoch
        if self.write:
            save_model(self.inference_model, self.run.best)
            write_json(self.path, {"monitor": self.monitor, "value": self.best, "epoch": epoch})
        else:
            save_elsewhere(self.inference_model)


def save_elsewhere(model):
    """What a non-chief worker does when the chief saves: the same save, to a file it then deletes.

    Saving reads sync-on-read variables (batch-norm statistics, metrics), which under
    MultiWorkerMirroredStrategy is a collective op every worker must join: so exactly the chief's save
    (``save_model``, which leaves out the optimizer and the compiled metrics).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ktoolkit-worker-") as tmp:
        save_model(model, f"{tmp}/model.keras")


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
