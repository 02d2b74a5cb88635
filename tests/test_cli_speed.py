"""The command line answers at once and talks only when useful (issue 17, item 4).

Every test runs the real `ktool` (``python -m ktoolkit.cli``) in a subprocess, as a user's shell does:
a typo is refused before TensorFlow loads, the runtimes' native lines stay hidden without ``-v``, and
progress bars show on a terminal (a pseudo-terminal here) and never in a pipe.
"""

from __future__ import annotations

import os
import pty
import resource
import statistics
import subprocess
import sys
import time

import pytest

BOUND_S = 1.0  # a bad argument is refused within this, TensorFlow never loaded


def ktool(*args, cwd=None, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "ktoolkit.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def _loads_tensorflow(args, cwd) -> bool:
    """Whether `ktool ARGS` imported TensorFlow: ``-X importtime`` lists every module a process imports."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ktoolkit.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "KTOOLKIT_TF_LOGS": "1"},  # TensorFlow's import is not sent to /dev/null, nor its listing
        timeout=120,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
    assert "click" in imported, out.stderr[-2000:]  # the listing is there: the check can see imports
    return "tensorflow" in imported or "tf_keras" in imported


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A class folder tree with one real PNG per class (never read: every command here fails before)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("speed")
    for name in ("a", "b"):
        (root / "data" / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 40 if name == "a" else 200, np.uint8)).save(root / "data" / name / "1.png")
    return root


BAD = {
    "--base": (["finetune", "--base", "vgg61", "--data", "data"], "--base 'vgg61'"),
    "--recipe": (["train", "--recipe", "resnet5", "--data", "data"], "resnet5"),
    "--data": (["finetune", "--data", "missing"], "--data missing"),
    "--cut": (["finetune", "--data", "data", "--strategy", "linear-early", "--cut", "]]bad"], "--cut ]]bad"),
}


def _timed(args, cwd):
    """(result, wall seconds, CPU seconds of the child: user + system) of one `ktool ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    out = ktool(*args, cwd=cwd)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize("flag", BAD)
def test_a_bad_argument_is_refused_in_under_a_second_without_tensorflow(flag, folder):
    """Wall time is what the user waits; on a machine running more than twice as many jobs as it has cores
    it measures the other jobs, so there the child's own CPU time (the same bound) decides."""
    args, named = BAD[flag]
    walls, cpus = [], []
    for _ in range(3):  # the median: one slow start on a loaded machine does not decide
        out, wall, cpu = _timed(args, folder)
        walls.append(wall)
        cpus.append(cpu)
        assert out.returncode == 1, out.stdout + out.stderr
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
        assert named in lines[0], lines[0]
    assert statistics.median(cpus) < BOUND_S, f"{flag}: CPU seconds {cpus}"
    if os.getloadavg()[0] <= 2 * (os.cpu_count() or 1):
        assert statistics.median(walls) < BOUND_S, f"{flag}: wall seconds {walls}, load {os.getloadavg()}"
    assert not _loads_tensorflow(args, folder), f"{flag}: TensorFlow was imported before the argument was refused"
    assert not (folder / "runs").exists(), "a refused command created a run folder"


def test_the_check_sees_tensorflow_when_a_command_loads_it(folder):
    """The no-TensorFlow check above can fail: a command that builds a model is seen importing it."""
    assert _loads_tensorflow(["recipes", "show", "lenet5"], folder)


# ------------------------------------------------------------------------------ native lines, progress bars
@pytest.fixture(scope="module")
def tflite_file(tmp_path_factory):
    """A small float .tflite classifier (16x16x3, 3 classes) written by the project's converter, and an image."""
    import numpy as np
    import tf_keras
    from PIL import Image

    from tflite_export.convert import to_tflite

    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((16, 16, 3)),
            tf_keras.layers.Conv2D(4, 3, activation="relu"),
            tf_keras.layers.GlobalAveragePooling2D(),
            tf_keras.layers.Dense(3, activation="softmax"),
        ]
    )
    root = tmp_path_factory.mktemp("tflite")
    path = root / "tiny.tflite"
    path.write_bytes(to_tflite(model))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "x.png")
    return path


def test_predict_hides_the_xnnpack_line_unless_verbose(tflite_file):
    image = str(tflite_file.parent / "x.png")
    quiet = ktool("predict", "--model", str(tflite_file), image)
    assert quiet.returncode == 0, quiet.stderr
    assert "x.png: " in quiet.stdout and "XNNPACK" not in quiet.stderr + quiet.stdout, quiet.stderr
    verbose = ktool("predict", "-v", "--model", str(tflite_file), image)
    assert verbose.returncode == 0, verbose.stderr
    assert "XNNPACK" in verbose.stderr  # -v shows it: the line is hidden, not gone


def _in_a_terminal(command, cols: int = 120, timeout: float = 120) -> str:
    """What ``command`` writes to a pseudo-terminal of ``cols`` columns (stdout and stderr both); a list that
    starts with an option or a ktool command name runs `ktool`."""
    import fcntl
    import struct
    import termios

    if not command[0].startswith(os.sep):
        command = [sys.executable, "-m", "ktoolkit.cli", *command]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))  # a real terminal's size
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=max(1.0, deadline - time.time()))
    os.close(leader)
    return b"".join(chunks).decode("utf-8", "replace")


def test_benchmark_shows_a_bar_on_a_terminal_and_none_in_a_pipe(tflite_file):
    args = ["benchmark", str(tflite_file), "--threads", "1", "--runs", "300", "--warmup", "1"]
    terminal = _in_a_terminal(args)
    assert "p50 (ms)" in terminal, terminal[-2000:]
    assert "1 thread(s):" in terminal and "/300" in terminal and "run/s" in terminal, terminal[-2000:]
    assert "XNNPACK" not in terminal
    pipe = ktool(*args)
    assert pipe.returncode == 0, pipe.stderr
    assert "p50 (ms)" in pipe.stdout
    assert "/300" not in pipe.stdout + pipe.stderr and "\r" not in pipe.stdout + pipe.stderr


def test_int8_conversion_on_a_terminal_shows_the_calibration_bar_not_the_converter_lines(tmp_path):
    """The converter prints ``fully_quantize: 0, inference_type: 6, ...`` from C++; on a terminal only the
    calibration bar shows (the lines used to show whenever the bar did)."""
    script = tmp_path / "convert.py"
    script.write_text(
        "import sys, numpy as np, tf_keras\n"
        "from tflite_export.convert import to_tflite\n"
        "m = tf_keras.Sequential([tf_keras.layers.Input((8, 8, 1)), tf_keras.layers.Conv2D(2, 3), "
        "tf_keras.layers.Flatten(), tf_keras.layers.Dense(2, activation='softmax')])\n"
        "images = np.random.default_rng(0).uniform(0, 1, (64, 8, 8, 1)).astype('float32')\n"
        "content = to_tflite(m, 'int8', representative=images, progress=True)\n"
        "print('converted', len(content), 'bytes', file=sys.stderr)\n"
    )
    terminal = _in_a_terminal([sys.executable, str(script)])
    assert "converted" in terminal, terminal[-3000:]
    assert "calibrating:" in terminal and "/64" in terminal, terminal[-3000:]
    assert "fully_quantize" not in terminal and "inference_type" not in terminal, terminal[-3000:]
