"""Shared bits of the benchmark scripts: where the shared data lives, timing, a result table."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from recipes import _keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
FLOWERS = SHARED / "data" / "flowers5"
WEIGHTS = SHARED / "weights"


def need(path: Path, what: str) -> Path:
    if not path.exists():
        raise SystemExit(f"{what} not found at {path}; pass the path explicitly (see --help).")
    return path


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def median(values):
    return statistics.median(values)


def table(rows, headers):
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def without_conflicts(folder: Path, work: Path) -> str:
    """flowers5 holds 4 photos saved under two labels (identical bytes); ktoolkit refuses such data, as it
    should, so the benchmark uses a copy without both copies of each (linked, not copied)."""
    import hashlib

    seen: dict[str, set] = {}
    files = [f for f in sorted(folder.glob("*/*")) if f.is_file()]
    for f in files:
        seen.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), set()).add(f.parent.name)
    conflicted = {h for h, labels in seen.items() if len(labels) > 1}
    if not conflicted:
        return str(folder)
    clean = work / f"{folder.name}-clean"
    dropped = 0
    for f in files:
        if hashlib.sha256(f.read_bytes()).hexdigest() in conflicted:
            dropped += 1
            continue
        (clean / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(f, clean / f.parent.name / f.name)
    print(f"{folder.name}: left out {dropped} files: {len(conflicted)} images saved under two labels")
    return str(clean)
