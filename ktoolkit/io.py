"""Atomic file writes: a crash or a SIGKILL never leaves a half-written model, report or JSON.

Everything is written to a temporary file in the destination's folder, flushed, then moved into
place with ``os.replace`` (atomic on POSIX and Windows): readers see the old file or the new one.
Files get the permissions any program's new file gets (0666 less the umask, e.g. 0644), not the
0600 of a temporary file, so a .tflite or labels.txt can be served and shared as written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yields a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    ``suffix`` defaults to the destination's (Keras picks the format from the extension).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix if suffix is not None else "".join(path.suffixes[-2:]), dir=path.parent
    )
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files, whatever the umask
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux /proc).

    Elsewhere it is read the only portable way, setting and restoring it: a moment in which another
    thread's new file would get the wrong mode, acceptable for a command-line tool.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        # A file name that is not UTF-8 (a lone surrogate) is written escaped, \udcff, instead of failing.
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    return Path(path)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json_object(path, limit: int = 1 << 20) -> dict | None:
    """A JSON object ktoolkit wrote into a run folder, read back as data from a file that may come from anyone:
    None when it is missing, over ``limit`` bytes, not JSON or not an object."""
    try:
        path = Path(path)
        if path.stat().st_size > limit:
            return None
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def save_model(model, path) -> Path:
    """Saves a Keras model to ``path`` (.keras) atomically, without the optimizer's state.

    A compiled functional model is saved through an uncompiled twin that shares its layers: the .keras
    format would otherwise store the optimizer's slots too (Adam: twice the weights, so a file three
    times the size). Resuming never needs them: the training checkpoint keeps its own copy.
    """
    if getattr(model, "optimizer", None) is not None and type(model).__name__ == "Functional":
        import tf_keras

        model = tf_keras.Model(model.inputs, model.outputs, name=model.name)
    with atomic_path(path) as tmp:
        os.remove(tmp)  # Keras refuses to overwrite without asking in some versions
        model.save(tmp)
    return Path(path)


def copy_file(source, destination) -> Path:
    """Copies a file atomically (the destination is never half-written)."""
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
    return Path(destination)


def save_figure(fig, path, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
