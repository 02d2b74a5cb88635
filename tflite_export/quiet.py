"""The C++ libraries' own stderr lines (LiteRT's "Created TensorFlow Lite XNNPACK delegate", the TFLite
converter's "fully_quantize: 0, ...") hidden while a block runs, unless asked for: no Python logging setting
reaches them. No TensorFlow or LiteRT import here (convert.py and runtime.py both use it)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile


def native_output_wanted() -> bool:
    """Whether the C++ libraries' own stderr lines should show: ``ktool -v`` (DEBUG logging) or
    ``KTOOLKIT_TF_LOGS=1``."""
    return bool(os.environ.get("KTOOLKIT_TF_LOGS")) or logging.getLogger("tflite_export").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def native_output_hidden(replay: bool = True):
    """Hides what C++ code writes to file descriptor 2 while the block runs, and replays it if the block fails
    (unless not ``replay``: when the raised exception holds the same text).

    LiteRT prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` when it first allocates
    tensors and the TFLite converter ``fully_quantize: 0, inference_type: 6, ...``: lines the user did not
    ask for, which no Python logging setting reaches. Descriptor 2 goes to a temporary file meanwhile;
    Python's own stderr writes (progress bars, log lines) go on to the real stderr through a copy of it.
    Nothing is hidden with :func:`native_output_wanted`.
    """
    if native_output_wanted():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured, _python_stderr_to(saved):
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            if replay:
                captured.seek(0)
                sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _python_stderr_to(fd: int):
    """Points ``sys.stderr`` and the logging handlers that write to it at a copy of descriptor ``fd``."""
    old = sys.stderr
    if not hasattr(old, "fileno") or _fileno(old) != 2:  # already elsewhere (pytest's capture, a redirect)
        yield
        return
    stream = open(os.dup(fd), "w", buffering=1, encoding=old.encoding, errors="backslashreplace")  # noqa: SIM115
    handlers = [h for h in logging.root.handlers if isinstance(h, logging.StreamHandler) and h.stream is old]
    sys.stderr = stream
    for h in handlers:
        h.setStream(stream)
    try:
        yield
    finally:
        stream.flush()
        sys.stderr = old
        for h in handlers:
            h.setStream(old)
        stream.close()


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError):
        return None
