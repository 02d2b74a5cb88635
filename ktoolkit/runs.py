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
  best.json          the value best.keras was chosen by (a resumed run replaces it only with a better model)
  backup/            crash-recovery checkpoint (removed once state.json says complete)
  tensorboard/       TensorBoard logs
  .lock              held while a command writes the folder; holds that command's pid
  export/, eval/, linear_eval/   what `ktool export`, `ktool evaluate` and `ktool linear-eval` add
```

Whose files these are. A folder is a ktoolkit run when its state.json holds ktoolkit's marker,
``"ktoolkit_run": <uuid>``, written when the folder is first prepared, before anything else.
ktoolkit writes only into an empty folder or one with the marker, and ``--overwrite`` removes only
the names ktoolkit writes: ``OWN_FILES`` and ``OWN_FOLDERS`` below, and the temporary files of atomic
writes to them. It is a fixed list rather than a manifest of written files because a list cannot
fall behind the folder (a kill between writing a file and recording it). Anything else in the folder
(a user's notes, a model copied in) is kept and named in a log line. The folder itself is never
removed, so neither is ``.``. Run folders of an older ktoolkit carry no marker: they are treated like
any other folder that is not ours, never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is then not enforced
    fcntl = None

log = logging.getLogger(__name__)

MARKER = "ktoolkit_run"  # the key in state.json that makes a folder ktoolkit's
LOCK_FILE = ".lock"
# Everything ktoolkit writes at the top of a run folder (train, finetune, pretrain, evaluate into the run).
OWN_FILES = frozenset(
    {
        "config.yaml",
        "classes.json",
        "labels.txt",
        "data.json",
        "splits.json",
        "history.csv",
        "curves.png",
        "best.keras",
        "best.json",
        "last.keras",
        "metrics.json",
        "confusion_matrix.png",
        "per_class.csv",
        "report.md",
        "report.html",
        "state.json",
        "encoder.keras",
        "decision.json",
        "probes.png",
        "pretrain.json",
        "reconstructions.png",
        "embeddings.png",
        "lr_find.png",
        "lr_find.json",
        "train_images.png",  # ktoolkit.report.PICTURE_FILES (tests/test_report_pictures.py checks they are listed)
        "predictions.png",
        "top_losses.png",
        "most_confused.png",
        LOCK_FILE,
    }
)
# Folders only ktoolkit writes into: removed whole by --overwrite.
OWN_FOLDERS = frozenset({"backup", "tensorboard", "export", "eval", "linear_eval"})
_STATE_LIMIT = 1 << 20  # a state.json over 1 MiB is not one ktoolkit wrote


class RunExistsError(FileExistsError):
    """The run folder holds a finished run or another run's files."""


class RunLockedError(RunExistsError):
    """Another command is writing the run folder."""


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
    splits = property(lambda self: self.root / "splits.json")  # every example of every split, by content
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
        """state.json as a dict; {} when it is missing, unreadable, over 1 MiB or not a JSON object (a
        file ktoolkit did not write: the folder then has no marker and is not treated as a run)."""
        try:
            if self.state.stat().st_size > _STATE_LIMIT:
                return {}
            state = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    @property
    def marker(self) -> str | None:
        """The run's ktoolkit marker (a uuid), None when the folder is not a ktoolkit run."""
        value = self.read_state().get(MARKER)
        return value if isinstance(value, str) and value else None

    def mark(self) -> str:
        """Starts a fresh state.json with a new marker: from now on the folder is ktoolkit's."""
        from ktoolkit.io import write_json

        marker = uuid.uuid4().hex
        write_json(self.state, {MARKER: marker, "complete": False})
        return marker

    def entries(self) -> list[Path]:
        """What the folder holds, but the lock file; [] when it does not exist."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name != LOCK_FILE)

    def remove_own_files(self) -> list[str]:
        """Removes what ktoolkit writes here (see the module docstring), but state.json and the lock.

        Symbolic links are never followed nor removed: ktoolkit writes none. Returns the names kept.
        """
        kept = []
        for entry in self.entries():
            name = entry.name
            if name == self.state.name:
                continue
            if not entry.is_symlink() and entry.is_dir() and name in OWN_FOLDERS:
                shutil.rmtree(entry)
            elif not entry.is_symlink() and entry.is_file() and (name in OWN_FILES or _own_temporary(name)):
                entry.unlink()
            else:
                kept.append(name)
        return kept

    def lock(self, command: str | None = None) -> RunLock:
        """The folder's lock, a context manager: ``with run.lock(): ...`` writes while holding it."""
        return RunLock(self, command)

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


def _own_temporary(name: str) -> bool:
    """A leftover of an interrupted atomic write (ktoolkit.io) to one of ktoolkit's files."""
    return name.startswith(".") and any(name.startswith(f".{own}.") for own in OWN_FILES)


def folder_error(root, err: OSError) -> ValueError:
    """The one-line error of a run folder that cannot be written (read-only, a file in the way)."""
    where = err.filename or root
    return ValueError(
        f"out={str(root)!r}: cannot write there ({err.strerror or err}: {where}); choose a folder you "
        "can write to, or fix its permissions."
    )


class RunLock:
    """An exclusive ``flock`` on RUN/.lock while a command writes the run folder.

    The file holds the holder's pid and command. The operating system frees the lock when the process
    ends, even by SIGKILL, so a stale .lock file never blocks. Releasing removes the file while still
    holding the lock; a command that locked the removed file sees it is gone and locks the new one.
    """

    def __init__(self, run: Run, command: str | None = None):
        self.run = run
        self.command = command or " ".join(sys.argv)
        self.created: list[Path] = []  # folders this command made, deepest first (removed if it fails at once)
        self.marker: str | None = None  # the marker this command wrote (a new run), if any
        self._fd = None

    @property
    def path(self) -> Path:
        return self.run.root / LOCK_FILE

    def acquire(self) -> RunLock:
        """Takes the lock, or raises RunLockedError naming the holder's pid at once (no waiting)."""
        if fcntl is None or self._fd is not None:
            return self
        try:
            for _ in range(100):  # the holder removes the file as it releases: lock the current one
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise RunLockedError(busy_message(self.run.root, holder)) from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)
            else:
                raise RunLockedError(busy_message(self.run.root, {}))
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps({"pid": os.getpid(), "command": self.command[:1000]}) + "\n").encode())
        except RunExistsError:
            raise
        except OSError as err:
            raise folder_error(self.run.root, err) from err
        self._fd = fd
        return self

    def release(self, abandon: bool = False) -> None:
        """Frees the lock. ``abandon``: the command failed; if the folder holds nothing but the marker
        this command wrote, that marker and the folders it created go too (nothing else, ever)."""
        if self._fd is not None:
            if abandon and self.marker and self._only_the_marker():
                self.run.state.unlink(missing_ok=True)
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if abandon:
            for folder in self.created:
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    break

    def _only_the_marker(self) -> bool:
        state = self.run.read_state()
        return (
            [p.name for p in self.run.entries()] == [self.run.state.name]
            and state.get(MARKER) == self.marker
            and "epochs_completed" not in state
        )

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def holder(run: Run) -> dict | None:
        """Who holds ``run``'s lock ({"pid": ..., "command": ...}), None when nobody does."""
        if fcntl is None:
            return None
        try:
            fd = os.open(run.root / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: two checks never block each other
            except BlockingIOError:
                return _holder(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def busy_message(root, holder: dict) -> str:
    pid = holder.get("pid") if isinstance(holder.get("pid"), int) else "unknown"
    command = "".join(c for c in str(holder.get("command") or "") if c.isprintable())[:200]
    holder_text = f"pid {pid}: {command}" if command else f"pid {pid}"
    return (
        f"out={str(root)!r} is being written by another ktoolkit command ({holder_text}); "
        "wait for it to end or stop it, or choose another --out."
    )


def _holder(fd) -> dict:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _same_file(fd, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


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


@dataclass(frozen=True)
class Classifier:
    """A classifier read back from a run folder or a model file (:func:`open_classifier`).

    Attributes:
        model: the Keras model (0..255 pixels in, class probabilities out).
        class_names: in output order, as recorded in the run's classes.json ("0", "1", ... without one):
            what the data's class names are matched against.
        run: the run folder the file is in, or None.
        path: the model file.
    """

    model: object
    class_names: list
    run: Run | None
    path: Path

    @property
    def labels(self) -> list[str]:
        """The class names made safe to print (:func:`printable_names`)."""
        return printable_names(self.class_names)


def printable_names(names) -> list[str]:
    """Class names that came from a file, made safe to print (no terminal control sequences); a name
    left empty becomes its index."""
    from tflite_export.untrusted import sanitize_text

    return [sanitize_text(name) or str(i) for i, name in enumerate(names)]


def open_classifier(model, *, prepare=None) -> Classifier:
    """Loads the classifier of a run folder (its best.keras, else last.keras) or of a model file, with
    the safe loader (:func:`recipes.load_model`), and its class names (the run's classes.json).

    ``prepare``: a function applied to the loaded model before its outputs are counted (export makes it
    convertible first). Raises ValueError when the model's outputs and classes.json disagree.
    """
    import recipes

    path, run = resolve_model_path(model)
    keras_model = recipes.load_model(path)
    if prepare is not None:
        keras_model = prepare(keras_model)
    n = int(keras_model.output_shape[-1])
    names = run.class_names() if run else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{path} has {n} outputs but its classes.json lists {len(names)} classes.")
    return Classifier(keras_model, list(names), run, path)


def resolve_encoder_path(encoder) -> tuple[Path, Run | None]:
    """``encoder`` is a `ktool pretrain` run folder or a .keras file; returns (file, Run or None)."""
    path = Path(encoder).expanduser()
    if path.is_dir():
        run = Run(path)
        if not run.encoder.exists():
            raise FileNotFoundError(
                f"encoder={str(path)!r} has no {run.encoder.name}; give a `ktool pretrain` run "
                "folder (finished) or a .keras file of an encoder."
            )
        return run.encoder, run
    if not path.is_file():
        raise FileNotFoundError(f"encoder={str(path)!r} is neither a run folder nor a model file.")
    return path, None
