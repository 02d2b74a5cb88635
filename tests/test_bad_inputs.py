"""A corpus of user mistakes and hostile files, each driven through the real `ktool` command line.

Every case asserts what the user sees and what happens to their files: no traceback, the documented
exit status (1: a mistake ktoolkit found; 2: a click usage error, after its "Usage:" line), exactly one
line starting with ``Error:`` that names the file or the flag, nothing written outside ``--out`` (and
the cache), and every file that was there before unchanged. The cases that need TensorFlow run
in-process with click's CliRunner (one TensorFlow import for all); the ones that must be refused
before TensorFlow loads run in subprocesses and are timed.
"""

import hashlib
import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ktoolkit.cli import main


# ---------------------------------------------------------------------------------------------- the data
def png(seed: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i}.png")
        paths[-1].write_bytes(png(seed * 100 + i))
    return paths


def _csv(root: Path, name: str, text: str) -> str:
    (root / name).write_text(text)
    return str(root / name)


def _npz(root: Path, name: str, **arrays) -> str:
    np.savez(root / name, **arrays)
    return str(root / name)


def _folders(root: Path, w: dict):
    """Image folders: good, broken files, one class, loose images, empty, not UTF-8."""
    for c in ("cat", "dog"):
        images(root / "good" / c, 6, seed=len(c) + ord(c[0]))
    images(root / "broken" / "cat", 4, seed=1)
    images(root / "broken" / "dog", 4, seed=2)
    (root / "broken" / "cat" / "empty.png").write_bytes(b"")
    whole = png(7, size=32)
    (root / "broken" / "cat" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "broken" / "dog" / "text.jpg").write_text("this is not a JPEG")
    images(root / "oneclass" / "cat", 5, seed=3)
    images(root / "loose", 4, seed=4)
    (root / "empty").mkdir()
    images(root / "notutf8" / "cat", 3, seed=5)
    bad = os.path.join(os.fsencode(root / "notutf8"), b"bad\xff")  # a name that is not UTF-8
    os.mkdir(bad)
    for i in range(3):
        with open(os.path.join(bad, f"{i}.png".encode()), "wb") as f:
            f.write(png(50 + i))
    w.update({k: str(root / k) for k in ("good", "broken", "oneclass", "loose", "empty", "notutf8")})


def _tables(root: Path, w: dict):
    """CSV and .npz files with a mistake each."""
    cat, dog = (sorted((root / "good" / c).iterdir()) for c in ("cat", "dog"))
    rows = [f"{p},{c}" for c, ps in (("cat", cat), ("dog", dog)) for p in ps]
    w["csv_empty"] = _csv(root, "empty.csv", "")
    w["csv_columns"] = _csv(root, "columns.csv", "a,b,c\n" + "\n".join(f"{r},x" for r in rows) + "\n")
    w["csv_no_path"] = _csv(root, "nopath.csv", "label,split\ncat,train\ndog,train\n")
    w["csv_split"] = _csv(root, "split.csv", "path,label,split\n" + "\n".join(f"{r},holdout" for r in rows) + "\n")
    labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 99999]
    w["csv_gap"] = _csv(root, "gap.csv", "".join(f"{p},{y}\n" for p, y in zip([*cat, *dog], labels)))
    w["csv_conflict"] = _csv(root, "conflict.csv", "path,label\n" + "\n".join(rows) + f"\n{cat[0]},dog\n")
    x = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    y = np.array([0, 1] * 6)
    w["npz_pickle"] = _npz(root, "pickle.npz", x=np.array([{"a": 1}] * 12, dtype=object), y=y)
    w["npz_keys"] = _npz(root, "keys.npz", pixels=x, classes=y)
    w["npz_shape"] = _npz(root, "shape.npz", x=x, y=y[:5])
    w["npz_zero"] = _npz(root, "zero.npz", x=np.zeros((12, 0, 0, 3), np.uint8), y=y)
    nan = x.astype(np.float32) / 255
    nan[3, 2, 2, 0] = np.nan
    w["npz_nan"] = _npz(root, "nan.npz", x=nan, y=y)


def _configs(root: Path, w: dict):
    """YAML settings files with a mistake each (the data is good)."""
    good = w["good"]
    texts = {
        "yaml_syntax": f"data: {good}\nepochs: 3\n  strict: no\n",
        "yaml_strbool": f'data: {good}\nstrict: "no"\n',
        "yaml_unknown": f"data: {good}\nepoch: 3\n",
        "yaml_type": f'data: {good}\nepochs: "5"\n',
        "yaml_list": f"- data: {good}\n- epochs: 3\n",
        "yaml_size": f"data: {good}\nimage_size: [0, -1]\n",
        "yaml_seed": f"data: {good}\nseed: 1.5\n",
        "yaml_recipe": f"data: {good}\nrecipe: [lenet5]\n",
        "yaml_option": f"data: {good}\nrecipe: lenet5\nrecipe_options: {{sparkle: 1}}\n",
    }
    for name, text in texts.items():
        w[name] = _csv(root, f"{name}.yaml", text)
    w["yaml_huge"] = _csv(root, "huge.yaml", f"data: {good}\n" + "# padding\n" * 120_000)


def _models(root: Path, w: dict):
    """Model files of random bytes, and a .keras archive with a Lambda layer."""
    rng = np.random.default_rng(1)
    for suffix in ("keras", "h5", "tflite", "onnx"):
        (root / f"random.{suffix}").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        w[f"random_{suffix}"] = str(root / f"random.{suffix}")
    import tf_keras

    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Lambda(lambda t: t * 2.0, name="doubler")(inputs)
    outputs = tf_keras.layers.Dense(2, activation="softmax")(tf_keras.layers.Flatten()(x))
    tf_keras.Model(inputs, outputs).save(root / "lambda.keras")
    w["lambda_keras"] = str(root / "lambda.keras")
    (root / "afile").write_text("a file where a folder should be\n")
    w["afile"] = str(root / "afile")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The user's files: made once, hashed around every case."""
    root = tmp_path_factory.mktemp("user")
    w = {"root": str(root)}
    _folders(root, w)
    _tables(root, w)
    _configs(root, w)
    _models(root, w)
    w["image"] = str(min((root / "good" / "cat").iterdir()))
    return w


# ------------------------------------------------------------------------------------------ the checks
def snapshot(*roots) -> dict:
    """Every file under ``roots`` (as bytes paths: some names are not UTF-8) with its content hash."""
    files = {}
    for root in roots:
        for current, dirs, names in os.walk(os.fsencode(root)):
            for name in dirs + names:
                path = os.path.join(current, name)
                files[path] = (
                    None if os.path.isdir(path) else hashlib.sha256(Path(os.fsdecode(path)).read_bytes()).hexdigest()
                )
    return files


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error:")]


def check_refused(result, code: int, names) -> str:
    """The user-facing contract of one refused command; returns its Error line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    if code == 2:
        assert "Usage:" in result.stderr, result.stderr  # click's own usage errors
    for name in [names] if isinstance(names, str) else names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def ktool(world, tmp_path, monkeypatch):
    """Runs ``ktool ARGS`` in-process from an empty working folder; afterwards the user's files are
    unchanged and only ``ws/out*`` and the cache got new files."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(ws / "cache"))
    allowed = [os.fsencode(ws / "out"), os.fsencode(ws / "cache")]

    def run(*args, extra_allowed=()):
        before = snapshot(world["root"], ws)
        args = [str(a).format(**world, ws=ws) for a in args]
        result = CliRunner().invoke(main, args)
        after = snapshot(world["root"], ws)
        assert {p: h for p, h in after.items() if p in before} == before, "a file of the user changed or vanished"
        new = [p for p in after if p not in before]
        ok = allowed + [os.fsencode(a) for a in extra_allowed]
        outside = [p for p in new if not any(p == a or p.startswith(a + b"/") for a in ok)]
        assert not outside, f"written outside --out: {outside}"
        return result

    return run


TRAIN = (
    "train",
    "--recipe",
    "lenet5",
    "--image-size",
    "32,32",
    "--epochs",
    "1",
    "--steps-per-epoch",
    "1",
    "--out",
    "{ws}/out",
)

# (id, arguments, exit status, what the Error line names)
CASES = [
    # folders
    ("data-check-missing", ["data", "check", "{root}/nowhere"], 2, "nowhere"),
    ("data-check-file", ["data", "check", "{afile}"], 2, "afile"),
    ("data-check-empty", ["data", "check", "{empty}"], 1, ["empty", "no class folders"]),
    ("data-check-loose", ["data", "check", "{loose}"], 1, ["loose", "one subfolder per class", "ktool pretrain"]),
    ("data-check-not-utf8", ["data", "check", "{notutf8}"], 1, ["bad\\xff", "rename"]),
    ("train-data-missing", [*TRAIN, "--data", "{root}/nowhere"], 1, ["--data", "nowhere"]),
    ("train-data-wrong-kind", [*TRAIN, "--data", "{afile}"], 1, ["--data", "afile"]),
    ("train-data-empty", [*TRAIN, "--data", "{empty}"], 1, "empty"),
    ("train-data-one-class", [*TRAIN, "--data", "{oneclass}"], 1, ["oneclass", "at least 2"]),
    ("train-data-loose", [*TRAIN, "--data", "{loose}"], 1, ["loose", "one subfolder per class"]),
    ("train-data-not-utf8", [*TRAIN, "--data", "{notutf8}"], 1, ["bad\\xff", "rename"]),
    ("train-strict-broken", [*TRAIN, "--data", "{broken}", "--strict"], 1, ["strict", "empty.png", "truncated.png"]),
    # CSV
    ("csv-empty", [*TRAIN, "--data", "{csv_empty}"], 1, "empty.csv"),
    ("csv-columns", [*TRAIN, "--data", "{csv_columns}"], 1, "columns.csv"),
    ("csv-no-path-column", [*TRAIN, "--data", "{csv_no_path}"], 1, ["nopath.csv", "path"]),
    ("csv-bad-split", [*TRAIN, "--data", "{csv_split}"], 1, ["split.csv", "holdout"]),
    ("csv-label-gap", [*TRAIN, "--data", "{csv_gap}"], 1, ["gap.csv", "99999"]),
    ("csv-conflicting-duplicate", [*TRAIN, "--data", "{csv_conflict}"], 1, ["conflict.csv", "0.png"]),
    # .npz
    ("npz-pickle", [*TRAIN, "--data", "{npz_pickle}"], 1, ["pickle.npz", "Python objects"]),
    ("npz-missing-keys", [*TRAIN, "--data", "{npz_keys}"], 1, ["keys.npz", "x and y"]),
    ("npz-shape-mismatch", [*TRAIN, "--data", "{npz_shape}"], 1, "shape.npz"),
    ("npz-zero-size", [*TRAIN, "--data", "{npz_zero}"], 1, "zero.npz"),
    ("npz-nan", [*TRAIN, "--data", "{npz_nan}"], 1, ["nan.npz", "NaN"]),
    # YAML
    ("yaml-syntax", ["train", "--config", "{yaml_syntax}"], 1, ["yaml_syntax.yaml", "line 3"]),
    (
        "yaml-string-bool",
        ["train", "--config", "{yaml_strbool}"],
        1,
        ["yaml_strbool.yaml", "strict='no': must be true or false (not a string)"],
    ),
    (
        "yaml-unknown-key",
        ["train", "--config", "{yaml_unknown}"],
        1,
        ["yaml_unknown.yaml", "epoch (did you mean epochs?)"],
    ),
    ("yaml-wrong-type", ["train", "--config", "{yaml_type}"], 1, ["yaml_type.yaml", "epochs='5'"]),
    ("yaml-not-mapping", ["train", "--config", "{yaml_list}"], 1, ["yaml_list.yaml", "mapping"]),
    ("yaml-image-size", ["train", "--config", "{yaml_size}"], 1, ["yaml_size.yaml", "image_size=[0, -1]"]),
    ("yaml-fractional-seed", ["train", "--config", "{yaml_seed}"], 1, ["yaml_seed.yaml", "seed=1.5"]),
    ("yaml-list-for-string", ["train", "--config", "{yaml_recipe}"], 1, ["yaml_recipe.yaml", "recipe=['lenet5']"]),
    ("yaml-recipe-option", ["train", "--config", "{yaml_option}"], 1, ["yaml_option.yaml", "no option sparkle"]),
    ("yaml-huge", ["train", "--config", "{yaml_huge}"], 1, ["huge.yaml", "MiB"]),
    # flags
    ("flag-epochs-0", [*TRAIN, "--data", "{good}", "--epochs", "0"], 1, "--epochs 0"),
    ("flag-lr-negative", [*TRAIN, "--data", "{good}", "--lr", "-1"], 1, "--lr"),
    ("flag-image-size-0", [*TRAIN, "--data", "{good}", "--image-size", "0,0"], 2, "--image-size"),
    ("flag-val-fraction", [*TRAIN, "--data", "{good}", "--val-fraction", "1.5"], 1, "--val-fraction 1.5"),
    ("flag-seed-negative", [*TRAIN, "--data", "{good}", "--seed", "-1"], 1, "--seed -1"),
    ("flag-augment", [*TRAIN, "--data", "{good}", "--augment", "flip,sparkle"], 1, ["augment", "sparkle"]),
    ("flag-recipe", [*TRAIN, "--data", "{good}", "--recipe", "resnet5"], 1, ["resnet5", "resnet50"]),
    ("flag-recipe-show", ["recipes", "show", "resnet5"], 1, "resnet5"),
    ("flag-base", ["finetune", "--base", "vgg61", "--data", "{good}", "--out", "{ws}/out"], 1, ["--base", "vgg61"]),
    ("flag-advise-base", ["advise", "--base", "vgg61", "--data", "{good}"], 1, ["--base", "vgg61"]),
    ("flag-cut", ["finetune", "--cut", "block 3!", "--data", "{good}", "--out", "{ws}/out"], 1, "--cut block 3!"),
    ("flag-weights", ["finetune", "--weights", "{root}/none.h5", "--data", "{good}"], 1, ["--weights", "none.h5"]),
    ("flag-threads-0", ["benchmark", "--threads", "0", "{random_tflite}"], 2, "--threads"),
    ("flag-top-k-0", ["predict", "--top-k", "0", "--model", "{random_onnx}", "{image}"], 2, "--top-k"),
    # hostile model files
    ("predict-random-keras", ["predict", "--model", "{random_keras}", "{image}"], 1, "random.keras"),
    ("predict-random-h5", ["predict", "--model", "{random_h5}", "{image}"], 1, "random.h5"),
    ("predict-random-tflite", ["predict", "--model", "{random_tflite}", "{image}"], 1, "random.tflite"),
    ("predict-random-onnx", ["predict", "--model", "{random_onnx}", "{image}"], 1, "random.onnx"),
    (
        "evaluate-random-keras",
        ["evaluate", "--model", "{random_keras}", "--data", "{good}", "--out", "{ws}/out"],
        1,
        "random.keras",
    ),
    (
        "evaluate-missing-model",
        ["evaluate", "--model", "{root}/nothing.keras", "--data", "{good}"],
        1,
        ["--model", "nothing.keras"],
    ),
    ("benchmark-random-tflite", ["benchmark", "--runs", "2", "--warmup", "0", "{random_tflite}"], 1, "random.tflite"),
    ("benchmark-random-onnx", ["benchmark", "--runs", "2", "--warmup", "0", "{random_onnx}"], 1, "random.onnx"),
    ("predict-lambda-keras", ["predict", "--model", "{lambda_keras}", "{image}"], 1, ["lambda.keras", "Lambda"]),
    # output folders
    ("out-is-a-file", [*TRAIN[:-2], "--data", "{good}", "--out", "{afile}"], 1, ["--out", "afile", "is a file"]),
    ("out-under-a-file", [*TRAIN[:-2], "--data", "{good}", "--out", "{afile}/run"], 1, ["--out", "afile"]),
    ("evaluate-out-is-a-file", ["evaluate", "--model", "{random_keras}", "--out", "{afile}"], 1, ["--out", "afile"]),
]


def _param(case):
    """A case as a pytest parameter named by its id; a case given as pytest.param keeps its marks."""
    if hasattr(case, "marks"):
        return pytest.param(*case.values[1:], id=case.values[0], marks=case.marks)
    return pytest.param(*case[1:], id=case[0])


@pytest.mark.parametrize("args, code, names", [_param(c) for c in CASES])
def test_mistake_is_one_error_line(ktool, args, code, names):
    check_refused(ktool(*args), code, names)


def test_data_check_reports_broken_images_and_exits_1(ktool):
    result = ktool("data", "check", "{broken}")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for name, reason in (("empty.png", "empty file"), ("truncated.png", "truncated"), ("text.jpg", "not an image")):
        assert any(name in line and reason in line for line in result.stdout.splitlines()), result.stdout


def test_verbose_shows_the_traceback_and_bugs_keep_theirs(ktool, monkeypatch):
    verbose = ktool(*TRAIN, "--data", "{good}", "--recipe", "resnet5", "-v")
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr
    assert len(error_lines(verbose.stderr)) == 1
    from ktoolkit.train.config import TrainConfig

    def bug(self):
        raise RuntimeError("a bug, not a mistake")

    monkeypatch.setattr(TrainConfig, "validate", bug)
    crashed = ktool(*TRAIN, "--data", "{good}")
    assert isinstance(crashed.exception, RuntimeError)  # not turned into "Error: ..."
    assert not error_lines(crashed.stderr)


# --------------------------------------------------------------------------------- mounts: full, read-only
@pytest.fixture
def mount(tmp_path):
    """Mounts a tmpfs with ``options`` (skips where mounting is not permitted); unmounts afterwards."""
    mounted = []

    def make(name, options):
        target = tmp_path / name
        target.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, check=False
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip()})")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_read_only_out_is_refused_before_anything_runs(ktool, mount):
    target = mount("ro", "size=64k,ro")
    line = check_refused(ktool(*TRAIN[:-2], "--data", "{good}", "--out", f"{target}/run"), 1, ["--out", str(target)])
    assert "writable" in line


def test_disk_full_is_one_line_with_the_folder_and_the_fix(ktool, mount):
    target = mount("full", "size=64k")
    result = ktool(*TRAIN[:-2], "--data", "{good}", "--out", f"{target}/run", extra_allowed=[target])
    line = check_refused(result, 1, [str(target), "no space left"])
    assert "free some disk space" in line


# ----------------------------------------------------------------------- before TensorFlow, in subprocesses
# Runs the CLI and says on exit whether TensorFlow was imported.
HOOK = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('TF-IMPORTED\\n' if 'tensorflow' in sys.modules else ''))\n"
    "from ktoolkit.cli import main\n"
    "sys.argv[0] = 'ktool'\n"
    "main()\n"
)


@pytest.mark.parametrize(
    "args, named",
    [
        (["finetune", "--base", "vgg61", "--data", "{good}"], "--base"),
        (["train", "--recipe", "resnet5", "--data", "{good}"], "resnet5"),
        (["train", "--data", "{root}/nowhere"], "--data"),
        (["finetune", "--cut", "block 3!", "--data", "{good}"], "--cut"),
        (["train", "--config", "{yaml_strbool}"], "strict"),
    ],
    ids=["base", "recipe", "data", "cut", "config"],
)
def test_typos_are_refused_before_tensorflow_loads(world, tmp_path, args, named):
    args = [a.format(**world) for a in args]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", HOOK, *args], capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 1, done.stderr
    assert "TF-IMPORTED" not in done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert seconds < 1.5, f"{seconds:.2f} s to refuse {args}"
    assert not any(tmp_path.iterdir()), "a refused command wrote files"


def test_the_entry_point_refuses_a_typo_at_once(world, tmp_path):
    ktool = Path(sys.executable).parent / "ktool"
    if not ktool.exists():
        pytest.skip("no ktool entry point next to this Python")
    import resource

    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [str(ktool), "finetune", "--base", "vgg61", "--data", world["good"]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    assert (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime) < 1.5  # TensorFlow alone takes seconds
    if os.getloadavg()[0] <= 2 * (
        os.cpu_count() or 1
    ):  # the wall clock means something only on a machine not overloaded
        assert wall < 1.5
    assert done.returncode == 1 and len(error_lines(done.stderr)) == 1 and "--base" in done.stderr, done.stderr


def test_names_that_are_not_utf8_print_escaped_through_a_c_locale_pipe(world, tmp_path):
    """A bad file under a name that is not UTF-8: the report shows it escaped, whatever the locale."""
    folder = tmp_path / "data"
    images(folder / "cat", 3, seed=8)
    images(folder / "dog", 3, seed=9)
    with open(os.path.join(os.fsencode(folder / "dog"), b"junk\xfe.png"), "wb") as f:
        f.write(b"not a png")
    env = {**os.environ, "LANG": "C", "LC_ALL": "C", "KTOOLKIT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "ktoolkit.cli", "data", "check", str(folder)],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    out, err = done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1 and "Traceback" not in out + err, err
    assert any("junk" in line and "not an image" in line for line in out.splitlines()), out


def test_lambda_archive_is_a_real_keras_file(world):
    """The Lambda case above is refused for the Lambda, not for being a broken archive."""
    with zipfile.ZipFile(world["lambda_keras"]) as archive:
        assert "Lambda" in archive.read("config.json").decode()
