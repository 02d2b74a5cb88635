"""Run folders: --overwrite never deletes what ktoolkit did not write, one command at a time, resume after
a kill at any moment, a NaN loss fails the run, files with normal permissions, bad --out in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ktoolkit.cli import main
from ktoolkit.io import write_text
from ktoolkit.runs import MARKER, Run
from ktoolkit.train import RunExistsError, TrainConfig, train
from ktoolkit.train.callbacks import read_history
from ktoolkit.train.engine import NonFiniteLossError, RunLockedError

TINY = dict(recipe="lenet5", epochs=1, steps_per_epoch=1, batch_size=8, augment="none", lr=1e-3)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """3 classes x 12 random 16x16 grayscale PNGs (resized to lenet5's 32x32 when training)."""
    root = tmp_path_factory.mktemp("pngs") / "images"
    rng = np.random.default_rng(0)
    for label in range(3):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(60 + 70 * label, 30, (16, 16)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return root


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes: what must stay exactly as the user left it."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text("my: own settings\n")  # a user's config.yaml is not a ktoolkit marker
    (root / "notes.txt").write_text("thesis notes")
    (root / "photos").mkdir(exist_ok=True)
    (root / "photos" / "cat.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_ktoolkit_run_is_refused_and_untouched(pngs, tmp_path, overwrite):
    user = _user_folder(tmp_path / "mine")
    before = _snapshot(user)
    with pytest.raises(RunExistsError, match=r"out='.*mine' has files and is not a ktoolkit run.*choose a new --out"):
        train(data=str(pngs), out=str(user), overwrite=overwrite, **TINY)
    assert _snapshot(user) == before
    assert sorted(p.name for p in user.iterdir()) == ["config.yaml", "notes.txt", "photos"]  # no marker, no lock


def test_a_legacy_run_folder_without_the_marker_is_not_overwritten(pngs, tmp_path):
    old = tmp_path / "old_run"
    old.mkdir()
    for name in ("config.yaml", "best.keras", "history.csv"):
        (old / name).write_text(name)
    (old / "state.json").write_text('{"epochs_completed": 3, "epochs": 3, "complete": true}')  # no marker
    before = _snapshot(old)
    with pytest.raises(RunExistsError, match="older ktoolkit versions are treated the same"):
        train(data=str(pngs), out=str(old), overwrite=True, **TINY)
    assert _snapshot(old) == before


def test_out_dot_with_overwrite_removes_nothing_of_the_users(pngs, tmp_path, monkeypatch):
    home = _user_folder(tmp_path / "cwd")
    monkeypatch.chdir(home)
    before = _snapshot(home)
    result = CliRunner().invoke(
        main, ["train", "--recipe", "lenet5", "--data", str(pngs), "--out", ".", "--epochs", "1", "--overwrite"]
    )
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "not a ktoolkit run" in errors[0], result.output
    assert "Traceback" not in result.output
    assert _snapshot(home) == before


@pytest.mark.parametrize("where", ["data", "parent", "inside"])
def test_out_is_never_the_data_a_folder_above_it_or_inside_it(pngs, tmp_path, where):
    data = tmp_path / "project" / "images"
    data.mkdir(parents=True)
    for name in ("a", "b"):
        (data / name).mkdir()
        for png in sorted((pngs / "class_0").glob("*.png"))[:3]:
            (data / name / png.name).write_bytes(png.read_bytes())
    out = {"data": data, "parent": data.parent, "inside": data / "run"}[where]
    before = _snapshot(tmp_path / "project")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"out=.*(is the --data|a folder above the --data|inside the --data)"):
            train(data=str(data), out=str(out), overwrite=overwrite, **TINY)
    assert _snapshot(tmp_path / "project") == before
    assert not (data / "run").exists()


def test_overwriting_a_run_removes_only_its_own_files(pngs, tmp_path, caplog):
    out = tmp_path / "run"
    first = train(data=str(pngs), out=str(out), **TINY)
    old_marker = first.run.read_state()[MARKER]
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")  # what `ktool evaluate` writes into a run
    (out / ".best.keras.x1y2z3.keras").write_text("a killed write")  # an interrupted atomic write
    (out / "my_notes.txt").write_text("keep me")
    (out / "mine").mkdir()
    (out / "mine" / "data.json").write_text("a user's file that has one of ktoolkit's names")

    with caplog.at_level("WARNING", logger="ktoolkit.train.engine"):
        second = train(data=str(pngs), out=str(out), overwrite=True, **TINY)
    assert (out / "my_notes.txt").read_text() == "keep me"
    assert (out / "mine" / "data.json").read_text().startswith("a user's file")
    assert not (out / "eval").exists() and not (out / ".best.keras.x1y2z3.keras").exists()
    assert "my_notes.txt" in caplog.text and "mine" in caplog.text
    state = second.run.read_state()
    assert state["complete"] is True and state[MARKER] != old_marker
    assert [row["epoch"] for row in read_history(out / "history.csv")] == [0]
    assert not (out / ".lock").exists() and not (out / "backup").exists()


def test_a_second_command_on_a_locked_folder_fails_at_once_naming_the_pid(pngs, tmp_path):
    out = tmp_path / "run"
    holder = Run(out)
    out.mkdir()
    # flock locks belong to an open file description: this second open conflicts within the process too
    with holder.lock(command="ktool train --out run"):
        with pytest.raises(RunLockedError, match=rf"being written by another ktoolkit command \(pid {os.getpid()}"):
            train(data=str(pngs), out=str(out), **TINY)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused command wrote nothing
    result = train(data=str(pngs), out=str(out), **TINY)  # released: now it runs
    assert result.run.read_state()["complete"] is True
    (out / "state.json").write_text(json.dumps({**result.run.read_state(), "complete": False}))
    with holder.lock():  # a marked, interrupted run: refused before TensorFlow starts anything
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}"):
            train(data=str(pngs), out=str(out), **TINY)
    assert not (out / ".lock").exists()


def test_a_nan_loss_fails_the_run_and_says_lower_the_learning_rate(pngs, tmp_path):
    out = tmp_path / "nan"
    # ReLU: the logits grow without bound and the loss becomes NaN (tanh keeps it large but finite)
    config = TrainConfig(
        data=str(pngs),
        out=str(out),
        **{
            **TINY,
            "epochs": 3,
            "steps_per_epoch": 3,
            "optimizer": "sgd",
            "lr": 1e12,
            "recipe_options": {"activation": "relu"},
        },
    )
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at epoch 1.*Lower the learning rate \(--lr"):
        train(config)
    state = Run(out).read_state()
    assert state["complete"] is False and state["failed"].startswith("loss became")
    assert not (out / "report.md").exists() and not (out / "metrics.json").exists()
    assert not (out / "backup").exists()  # NaN weights are nothing to resume from
    assert read_history(out / "history.csv") == []
    (tmp_path / "nan.yaml").write_text(config.to_yaml())
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "nan.yaml")])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "Error:" in result.output and "failed (loss became" in result.output, result.output


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text(tmp_path / "labels.txt", "a\nb\n")
        assert (tmp_path / "labels.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_out_that_is_a_file_or_under_one_is_one_error(pngs, tmp_path):
    existing = tmp_path / "model.tflite"
    existing.write_bytes(b"user's file")
    with pytest.raises(ValueError, match=r"out='.*model.tflite': is a file; choose a folder"):
        train(data=str(pngs), out=str(existing), **TINY)
    with pytest.raises(ValueError, match=r"model.tflite is a file; choose a folder"):
        train(data=str(pngs), out=str(existing / "run"), **TINY)
    assert existing.read_bytes() == b"user's file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_error_naming_it(pngs, tmp_path):
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"cannot write in .*readonly \(permission denied\)"):
            train(data=str(pngs), out=str(locked / "run"), **TINY)
    finally:
        locked.chmod(0o755)


def test_a_command_that_fails_at_start_leaves_no_folder_it_made(tmp_path):
    one_class = tmp_path / "one_class" / "only"
    one_class.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), "uint8")).save(one_class / "0.png")
    with pytest.raises(ValueError, match="at least 2"):
        train(data=str(one_class.parent), out=str(tmp_path / "new" / "run"), **TINY)
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # made by the user: it stays, empty
    with pytest.raises(ValueError, match="at least 2"):
        train(data=str(one_class.parent), out=str(empty), **TINY)
    assert empty.is_dir() and list(empty.iterdir()) == []


_KILL_IN_FINISH = """
import os, sys
import ktoolkit.train.engine as engine
engine.finish = lambda *args, **kwargs: os.kill(os.getpid(), 9)  # killed after the last epoch, before the report
from ktoolkit.cli import main
sys.argv = ["ktool"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
def test_killed_after_the_last_epoch_the_same_command_only_reports(pngs, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--recipe",
        "lenet5",
        "--data",
        str(pngs),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "8",
        "--augment",
        "none",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KTOOLKIT_CACHE_DIR": str(tmp_path / "cache")}
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_IN_FINISH, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = Run(out).read_state()
    assert state["epochs_completed"] == 2 and not state["complete"]
    assert (out / "backup").exists() and not (out / "report.md").exists()
    history = read_history(out / "history.csv")

    again = subprocess.run(
        [sys.executable, "-m", "ktoolkit.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at epoch 3 of 2" in again.stderr and "nothing left to train" in again.stderr
    assert read_history(out / "history.csv") == history  # no epoch was trained again
    assert Run(out).read_state()["complete"] is True
    assert (out / "report.md").exists() and (out / "metrics.json").exists()
    assert not (out / "backup").exists()


def test_a_resumed_run_keeps_the_split_it_started_with(tmp_path):
    """Images added to the data between a kill and the resume are not used (the recorded split is);
    an image of the split that changed since is an error, since the epochs already trained saw it."""
    import shutil

    data = tmp_path / "images"
    rng = np.random.default_rng(1)
    for label in range(3):
        (data / f"class_{label}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(data / f"class_{label}" / f"{i}.png")
    out = tmp_path / "run"
    train(data=str(data), out=str(out), **TINY)
    run = Run(out)
    recorded, summary = run.splits.read_bytes(), json.loads(run.data.read_text())["splits"]
    # As if killed after the last epoch, before the report: the state says not complete, no report.
    state = json.loads(run.state.read_text())
    write_text(run.state, json.dumps({**state, "complete": False}))
    run.report_md.unlink()
    # Added since: a copy of a class-0 image under class 1, which a new split would refuse (two labels).
    shutil.copy(data / "class_0" / "0.png", data / "class_1" / "new.png")
    train(data=str(data), out=str(out), **TINY)
    assert run.splits.read_bytes() == recorded
    assert json.loads(run.data.read_text())["splits"] == summary  # the same examples, not what is there now
    assert json.loads(run.state.read_text())["complete"] is True

    write_text(run.state, json.dumps({**json.loads(run.state.read_text()), "complete": False}))
    run.report_md.unlink()
    first = sorted((data / "class_2").iterdir())[0]
    first.write_bytes(first.read_bytes()[:-8] + b"changed!")
    with pytest.raises(ValueError, match=r"interrupted run whose images changed since it started \(.*1 changed"):
        train(data=str(data), out=str(out), **TINY)


def test_evaluate_and_export_into_a_locked_run_fail_at_once(pngs, tmp_path):
    from ktoolkit.evaluate import evaluate_run
    from ktoolkit.export import export

    out = tmp_path / "run"
    train(data=str(pngs), out=str(out), **TINY)
    with Run(out).lock("ktool train (another one)"):
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}: ktool train \(another one\)"):
            export(str(out), mode="float32")
        with pytest.raises(RunLockedError, match="is being written by another ktoolkit command"):
            evaluate_run(str(out))
    assert not (out / "export").exists() and not (out / "eval").exists()
    metrics, folder = evaluate_run(str(out))  # once the lock is free
    assert folder == out / "eval" and metrics["images"] > 0 and not (out / ".lock").exists()
