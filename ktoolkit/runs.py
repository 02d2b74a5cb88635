"""The run folder: what `ktool train` (and finetune, pretrain) leaves, and how to read it back.

```
RUN/
  config.yaml        the resolved configuration (rerun it with `ktool train --config RUN/config.yaml`)
  classes.json       class names, in output order (labels.txt: the same, one per line, for TFLite)
  data.json          where the data came from, split sizes, class counts, skipped files
  history.csv        one row per completed epoch
  curves.png         training curves
  best.keras         the model of the best validation epoch (inference outputs only)
  last.keras         the model after the last epoch
  metrics.json       evaluation on the held-out test split
  confusion_matrix.png, per_class.csv
  report.md, report.html
  state.json         progress; "complete": true once the run has finished
  encoder.keras      `ktool pretrain` runs: the encoder (image -> embedding), a base for `ktool finetune`
  backup/            crash-recovery checkpoint while training (removed at the end)
  tensorboard/       TensorBoard logs
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Run:
    """Paths of one run folder."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    classes = property(lambda self: self.root / "classes.json")
    labels = property(lambda self: self.root / "labels.txt")
    data = property(lambda self: self.root / "data.json")
    history = property(lambda self: self.root / "history.csv")
    curves = property(lambda self: self.root / "curves.png")
    best = property(lambda self: self.root / "best.keras")
    last = property(lambda self: self.root / "last.keras")
    metrics = property(lambda self: self.root / "metrics.json")
    confusion = property(lambda self: self.root / "confusion_matrix.png")
    per_class = property(lambda self: self.root / "per_class.csv")
    report_md = property(lambda self: self.root / "report.md")
    report_html = property(lambda self: self.root / "report.html")
    state = property(lambda self: self.root / "state.json")
    encoder = property(lambda self: self.root / "encoder.keras")  # `ktool pretrain`: image -> embedding
    backup = property(lambda self: self.root / "backup")
    tensorboard = property(lambda self: self.root / "tensorboard")

    def read_state(self) -> dict:
        return json.loads(self.state.read_text()) if self.state.exists() else {}

    def data_settings(self):
        """How the run split its data (data, val_fraction, test_fraction, seed, data_dir), read from
        config.yaml, whatever command made the run; None when there is no config.yaml."""
        if not self.config.exists():
            return None
        import types

        import yaml

        values = yaml.safe_load(self.config.read_text()) or {}
        defaults = {"data": None, "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0, "data_dir": None}
        return types.SimpleNamespace(**{k: values.get(k, v) for k, v in defaults.items()})

    def class_names(self) -> list[str]:
        if not self.classes.exists():
            raise FileNotFoundError(f"{self.root} has no classes.json; is it a ktoolkit run folder?")
        return json.loads(self.classes.read_text())


def resolve_model_path(model) -> tuple[Path, Run | None]:
    """``model`` is a run folder or a model file; returns (model file, Run or None).

    A run folder gives its best.keras (last.keras if the run has no best model yet).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        run = Run(path)
        for candidate in (run.best, run.last):
            if candidate.exists():
                return candidate, run
        raise FileNotFoundError(f"run folder {path} has no best.keras or last.keras; has training finished an epoch?")
    if not path.exists():
        raise FileNotFoundError(f"{path} is neither a run folder nor a model file.")
    parent = Run(path.parent)
    return path, parent if parent.classes.exists() else None
