"""`ktool lr-find` and `--lr auto` (issue 17 item 2): the learning-rate range test on real digits."""

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from ktoolkit.cli import main
from ktoolkit.runs import Run
from ktoolkit.train import TrainConfig, train
from ktoolkit.train.engine import check_run_folder
from ktoolkit.train.lr_find import END_LR, START_LR, lr_find, recorded_lr, schedule, steep, valley


def _digits_batches(batch_size=32):
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = np.eye(10, dtype="float32")[digits.target]
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(2000, seed=0).batch(batch_size)


def _dense_model():
    import tf_keras

    model = tf_keras.Sequential(
        [tf_keras.Input((64,)), tf_keras.layers.Dense(32, activation="relu"), tf_keras.layers.Dense(10, "softmax")]
    )
    model.compile(tf_keras.optimizers.Adam(1e-3), "categorical_crossentropy")
    return model


def test_the_sweep_is_exponential_restores_the_model_and_suggests_below_the_blow_up(tmp_path):
    model = _dense_model()
    before = [w.copy() for w in model.get_weights()]
    result = lr_find(model, _digits_batches(), steps=60, out=tmp_path)

    lrs = np.asarray(result.lrs)
    assert lrs[0] == pytest.approx(START_LR)
    ratios = lrs[1:] / lrs[:-1]
    assert np.all(ratios > 1) and np.allclose(ratios, (END_LR / START_LR) ** (1 / 59))  # exponential, increasing
    # Adam up to 10 blows a Dense model up: the sweep stopped early, past 4x the smoothed minimum
    assert len(lrs) < 60 and "stopped at lr" in result.stopped
    assert result.smoothed[-1] > 4 * min(result.smoothed[:-1]) or not np.isfinite(result.smoothed[-1])
    for rate in result.suggestions.values():
        assert START_LR <= rate < lrs[-1]  # inside the sweep, below where the loss blew up
    assert result.suggestion == result.suggestions["valley"]

    after = model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert int(model.optimizer.iterations.numpy()) == 0  # a fresh optimizer's state again
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)

    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    record = json.loads((tmp_path / "lr_find.json").read_text())
    assert record["suggestion"] == result.suggestion and record["steps"] == len(lrs)
    assert any(line.startswith("suggested lr:") and "valley" in line for line in result.lines())


def test_valley_and_steep_on_a_known_curve():
    rates = schedule(9, 1e-4, 1.0)
    losses = [2.0, 1.9, 1.6, 1.0, 0.5, 0.3, 0.25, 0.9, 3.0]  # falls over indices 0-6, fastest from 2 to 3
    assert steep(rates, losses) == 2
    assert 2 <= valley(rates, losses) <= 4  # fastai's: about the middle of the longest descent


@pytest.fixture(scope="module")
def auto_run(digits_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "auto"
    result = train(recipe="lenet5", data=str(digits_npz), out=str(out), epochs=1, steps_per_epoch=5, lr="auto")
    return result


def test_train_lr_auto_records_the_rate_it_used(auto_run):
    run = auto_run.run
    record = json.loads((run.root / "lr_find.json").read_text())
    written = yaml.safe_load(run.config.read_text())
    assert isinstance(written["lr"], float) and written["lr"] == auto_run.config.lr == record["suggestion"]
    assert record["start_lr"] <= written["lr"] < record["end_lr"]
    assert "found by lr-find (valley" in run.config.read_text()
    assert TrainConfig.from_yaml(run.config).lr == written["lr"]  # the file reruns with the number
    report = run.report_md.read_text()
    assert "## Learning rate" in report and "![learning-rate finder](lr_find.png)" in report
    assert f"{written['lr']:.3g}" in report
    assert (run.root / "lr_find.png").exists()


def test_an_interrupted_lr_auto_run_resumes_with_the_rate_it_found(auto_run, digits_npz):
    run = Run(auto_run.run.root)
    state = json.loads(run.state.read_text())
    run.state.write_text(json.dumps({**state, "complete": False}))  # as if killed after its first epoch
    try:
        config = TrainConfig(recipe="lenet5", data=str(digits_npz), out=str(run.root), epochs=1, steps_per_epoch=5)
        auto = TrainConfig(**{**config.to_dict(), "image_size": None, "lr": "auto"})
        assert check_run_folder(run, auto, overwrite=False, test_lock=False) == "resume"
        assert recorded_lr(run, auto).lr == auto_run.config.lr
        other = TrainConfig(**{**config.to_dict(), "image_size": None, "lr": 0.5})
        with pytest.raises(ValueError, match="other settings.*lr:"):
            check_run_folder(run, other, overwrite=False, test_lock=False)
    finally:
        run.state.write_text(json.dumps(state))


def test_a_bad_lr_is_one_error_line(digits_npz, tmp_path):
    result = CliRunner().invoke(
        main, ["train", "--recipe", "lenet5", "--data", str(digits_npz), "--out", str(tmp_path / "r"), "--lr", "fast"]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --lr fast: must be a number"), result.output
    assert "auto" in lines[0] and not (tmp_path / "r").exists()
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"recipe: lenet5\ndata: {digits_npz}\nlr: fast\n")
    with pytest.raises(ValueError, match="c.yaml: lr='fast': must be a number"):
        TrainConfig.from_yaml(config_file)
    config_file.write_text(f"recipe: lenet5\ndata: {digits_npz}\nlr: auto\n")
    assert TrainConfig.from_yaml(config_file).validate().lr == "auto"


def test_lr_find_command_writes_the_plot_and_the_numbers(digits_npz, tmp_path):
    out = tmp_path / "find"
    args = ["lr-find", "--recipe", "lenet5", "--data", str(digits_npz), "--out", str(out), "--steps", "40"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "suggested lr:" in result.output and "valley" in result.output
    record = json.loads((out / "lr_find.json").read_text())
    assert record["planned_steps"] == 40 and record["method"] == "valley"
    assert f"{record['suggestion']:.3g}" in result.output
    assert (out / "lr_find.png").exists()
    both = CliRunner().invoke(main, ["lr-find", "--recipe", "lenet5", "--base", "mobilenet_v2", "--data", str(out)])
    assert both.exit_code == 1 and "give one" in both.output


def test_a_finetune_base_is_swept_with_its_groups_and_restored(digits_npz, tmp_path):
    from ktoolkit.transfer.finetune import FinetuneConfig

    config = FinetuneConfig(base="lenet5", data=str(digits_npz), strategy="full", image_size=(32, 32))
    result = lr_find(config, steps=20, out=tmp_path)
    assert len(result.lrs) <= 20 and result.lrs[0] == pytest.approx(START_LR)
    assert START_LR <= result.suggestion < result.lrs[-1]
    assert "lenet5 (full)" in result.what and (tmp_path / "lr_find.png").exists()
    with pytest.raises(ValueError, match="--strategy linear: .*no learning rate"):
        lr_find(FinetuneConfig(base="lenet5", data=str(digits_npz), strategy="linear"))


def test_a_strangers_lr_find_record_gives_no_section_and_no_traceback(tmp_path):
    """lr_find.json in a run folder is data from whoever made the folder: wrong shapes, junk or a huge file
    leave the report without its learning-rate section; nothing is trusted or raised."""
    from ktoolkit.runs import Run
    from ktoolkit.train.lr_find import RECORD, report_section

    run = Run(tmp_path)
    for content in ('{"method": ["x"], "suggestions": 3}', "not json", "[1, 2]", '{"suggestion": "fast"}'):
        (tmp_path / RECORD).write_text(content)
        assert report_section(run) == []
    (tmp_path / RECORD).write_bytes(b'{"pad": "' + b"x" * (2 << 20) + b'"}')  # over the 1 MiB cap: not read
    assert report_section(run) == []
