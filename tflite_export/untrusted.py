"""Handling what comes out of files a stranger may have written: names, labels and file sizes.

A model file is data, not a set of instructions for this machine: a model's stored name becomes a
file name only through :func:`safe_filename` (never a path), every written path is checked to lie in
its folder (:func:`confined`), text from a file is shown only after :func:`sanitize_text` (no terminal
escape sequences), and nothing is read whole without a size cap (:func:`read_capped`).

This module imports nothing from ktoolkit or TensorFlow, so ``ktoolkit.runs`` and the runtime on a
Jetson can use it too::

    from tflite_export.untrusted import sanitize_text
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

MAX_NAME_LENGTH = 100
MAX_LABELS_BYTES = 1 << 20  # 1 MiB of class names is ~100k long ones; a real labels.txt is a few KB
MAX_LABELS = 100_000

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")

# Terminal control sequences, removed whole (not just their ESC), so "\x1b]0;title\x07" leaves no "]0;title".
_ESCAPE_SEQUENCES = re.compile(
    r"(?:\x1b[\]P_^X]|[\x9d\x90\x9f\x9e\x98]).*?(?:\x07|\x1b\\|\x9c|$)"  # OSC/DCS/APC/PM/SOS strings
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, clear screen
    r"|\x1b[ -/]*[0-~]?",  # any other ESC sequence, or a lone ESC
    re.DOTALL,
)
_WHITESPACE_CONTROLS = re.compile(r"[\t\n\r\v\f]")
# Bidirectional overrides reorder what the terminal shows ("Trojan source"); line separators break lines.
_INVISIBLE = {
    "\u202a",
    "\u202b",
    "\u202c",
    "\u202d",
    "\u202e",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
    "\u2028",
    "\u2029",
}


def safe_filename(name, fallback: str = "model") -> str:
    """``name`` as one file name: only ``[A-Za-z0-9._-]`` (the rest becomes ``_``), no leading dot,
    at most :data:`MAX_NAME_LENGTH` characters; ``fallback`` when nothing is left.

    >>> safe_filename("../../escape/NAME")
    '_.._escape_NAME'
    """
    cleaned = _UNSAFE_NAME_CHARS.sub("_", str(name)).lstrip(".")[:MAX_NAME_LENGTH]
    return cleaned or fallback


def confined(folder, name: str) -> Path:
    """``folder / name``, after checking that it is a file directly inside ``folder``.

    The last component is not resolved: a symlink there is replaced or unlinked by the writer,
    never followed.

    Raises:
        ValueError: ``name`` is not a single file name inside ``folder``.
    """
    folder = Path(folder)
    path = folder / name
    inside = folder.resolve()
    where = path.parent.resolve() / path.name
    if name in ("", ".", "..") or Path(name).name != name or not where.is_relative_to(inside) or where == inside:
        raise ValueError(
            f"{str(path)!r} would be written outside the output folder {str(folder)!r}; "
            f"file names derived from a model are made safe with safe_filename()."
        )
    return path


def sanitize_text(text) -> str:
    """``text`` without terminal control sequences or control characters (C0, DEL, C1), bidirectional
    overrides and line separators; tabs and line breaks become spaces. For strings that came from a
    file (labels, model names, descriptions) before they are printed or written into a report.

    >>> sanitize_text("\\x1b]0;pwned\\x07cat\\x1b[2J")
    'cat'
    """
    text = _ESCAPE_SEQUENCES.sub("", str(text))
    text = _WHITESPACE_CONTROLS.sub(" ", text)
    return "".join(c for c in text if unicodedata.category(c) != "Cc" and c not in _INVISIBLE).strip()


def read_capped(stream, cap: int, what: str) -> bytes:
    """At most ``cap`` bytes from a binary ``stream`` (``cap + 1`` are read, so a longer one is caught
    without reading the rest).

    Raises:
        ValueError: the stream holds more than ``cap`` bytes (``what`` names it in the message).
    """
    data = stream.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"{what} is larger than {cap:,} bytes, more than a file like it holds; it was not read.")
    return data


def label_lines(data: bytes, what: str) -> list[str]:
    """The class names in a labels file's bytes: one per non-blank line, sanitized.

    Raises:
        ValueError: more than :data:`MAX_LABELS` names.
    """
    lines = [sanitize_text(line) for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if len(lines) > MAX_LABELS:
        raise ValueError(f"{what} lists {len(lines):,} class names, more than {MAX_LABELS:,}; it is not a labels file.")
    return [line or str(i) for i, line in enumerate(lines)]
