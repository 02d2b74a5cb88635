"""Transfer learning: the decision matrix, bases, the feature cache, and every strategy end to end.

The pretrained base is made by the tests: cifar_resnet20 trained on digits 0-4, transferred to
digits 5-9 (real images from scikit-learn, classes the base never saw).
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import recipes
from recipes.transfer import SIMILARITY_THRESHOLD, SMALL_IMAGES_PER_CLASS, decide


# ------------------------------------------------------------------------------------ decision matrix
@pytest.mark.parametrize(
    "per_class, similarity, strategy",
    [
        (100, 0.99, "linear"),
        (100, 0.1, "linear-early"),
        (50_000, 0.99, "finetune"),
        (50_000, 0.1, "full"),
    ],
)
def test_the_four_quadrants(per_class, similarity, strategy):
    decision = decide(per_class, similarity)
    assert decision.strategy == strategy
    assert (
        decision.quadrant
        == {
            "linear": "small and similar",
            "linear-early": "small and different",
            "finetune": "large and similar",
            "full": "large and different",
        }[strategy]
    )


def test_boundaries_belong_to_large_and_similar_and_thresholds_are_overridable():
    assert decide(SMALL_IMAGES_PER_CLASS, SIMILARITY_THRESHOLD).strategy == "finetune"
    assert decide(SMALL_IMAGES_PER_CLASS - 1, SIMILARITY_THRESHOLD).strategy == "linear"
    assert decide(SMALL_IMAGES_PER_CLASS, np.nextafter(SIMILARITY_THRESHOLD, 0)).strategy == "full"
    assert decide(200, 0.5, small_threshold=100, similarity_threshold=0.4).strategy == "finetune"
    reasons = decide(200, 0.5, small_threshold=100, similarity_threshold=0.6).reasons()
    assert "200 training images per class >= 100: large" in reasons[0]
    assert "0.500 < 0.600: different" in reasons[1] and "full" in reasons[2]


@pytest.mark.parametrize("bad", [{"images_per_class": -1}, {"similarity": float("nan")}, {"small_threshold": "x"}])
def test_bad_decision_inputs_are_named(bad):
    args = {"images_per_class": 10, "similarity": 0.5, **bad}
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        decide(args.pop("images_per_class"), args.pop("similarity"), **args)


# ------------------------------------------------------------------------------------------- bases
def test_cut_points_are_the_stage_ends_of_any_functional_model():
    import tf_keras

    from ktoolkit.transfer.features import cut_points

    resnet = tf_keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    assert cut_points(resnet) == [
        "conv1_relu",
        "conv2_block3_out",
        "conv3_block4_out",
        "conv4_block6_out",
        "conv5_block3_out",
    ]
    assert cut_points(recipes.build("lenet5")) == ["c1", "s2", "c3", "s4", "c5"]


def test_application_base_has_the_preprocessing_inside_and_loads_a_weights_file(tmp_path):
    import tf_keras

    from ktoolkit.transfer.bases import load_base

    reference = tf_keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))
    reference.save_weights(tmp_path / "mobilenet_v2_no_top.h5")
    base = load_base("mobilenet_v2", weights=str(tmp_path / "mobilenet_v2_no_top.h5"), image_size=(32, 32))
    assert base.preprocessing == "tf" and base.pretrained and base.top == "out_relu"
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(base.model(pixels), reference(pixels / 127.5 - 1), atol=1e-4)


def test_weights_errors_say_what_to_do(tmp_path):
    from ktoolkit.transfer.bases import _download, load_base

    with pytest.raises(ValueError, match="--weights imagenet: recipe 'resnet18' has no ImageNet download"):
        load_base("resnet18", weights="imagenet")
    with pytest.raises(FileNotFoundError, match="--weights .*nope.h5: no such file"):
        load_base("mobilenet_v2", weights=str(tmp_path / "nope.h5"), image_size=(32, 32))
    with pytest.raises(ValueError, match="not a keras.applications base"):
        load_base("mobilenet_v9")

    def offline():
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/x/mobilenet_v2_1.0_96_no_top.h5: None -- "
            "[Errno -2] Name or service not known"
        )

    with pytest.raises(ValueError) as err:
        _download("mobilenet_v2", offline)
    message = str(err.value)
    assert "Put mobilenet_v2_1.0_96_no_top.h5 in" in message and ".keras/models" in message
    assert "--weights PATH" in message


# ------------------------------------------------------------------------------------- data + base
@pytest.fixture(scope="session")
def digit_halves(digits_npz, tmp_path_factory):
    """digits 0-4 (for pretraining the base) and 5-9 (the new task), as .npz files."""
    data = np.load(digits_npz)
    root = tmp_path_factory.mktemp("halves")
    paths = {}
    for name, keep in (("low", data["y"] < 5), ("high", data["y"] >= 5)):
        paths[name] = root / f"digits_{name}.npz"
        np.savez(
            paths[name],
            x=data["x"][keep],
            y=data["y"][keep] - (0 if name == "low" else 5),
            class_names=data["class_names"][5 * (name == "high") :][:5],
        )
    return paths


@pytest.fixture(scope="session")
def pretrained_run(digit_halves, tmp_path_factory):
    """A `ktool train` run: cifar_resnet20 (with batch normalization) trained on digits 0-4. Small batches:
    enough steps for the moving statistics (momentum 0.99) to settle."""
    import tf_keras

    from ktoolkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "digits_low"
    result = train(
        TrainConfig(
            recipe="cifar_resnet20",
            data=str(digit_halves["low"]),
            out=str(out),
            epochs=4,
            image_size=(32, 32),
            channels=3,
            batch_size=16,
            lr=3e-3,
            cache="none",
        )
    )
    tf_keras.backend.clear_session()
    assert result.metrics["accuracy"] > 0.8  # the base learned something worth transferring
    return out


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))


def _finetune(digit_halves, pretrained_run, tmp_path, **options):
    from ktoolkit.transfer.finetune import FinetuneConfig, finetune

    options = {"epochs": 2, "batch_size": 32, "cache": "none", **options}
    config = FinetuneConfig(
        base=str(pretrained_run), data=str(digit_halves["high"]), out=str(tmp_path / "run"), **options
    )
    return finetune(config)


@pytest.mark.parametrize("strategy", ["linear", "linear-early", "finetune", "full"])
def test_each_strategy_transfers_to_unseen_classes_and_leaves_a_plain_keras_model(
    strategy, digit_halves, pretrained_run, tmp_path
):
    result = _finetune(
        digit_halves, pretrained_run, tmp_path, strategy=strategy, lr=3e-3 if strategy == "full" else None
    )
    assert result.strategy == strategy
    assert result.metrics["accuracy"] >= 0.6, result.metrics  # 5 classes: chance is 0.2
    run = result.run
    model = recipes.load_model(run.best)
    assert model.output_shape == (None, 5) and model.input_shape == (None, 32, 32, 3)
    decision = json.loads((run.root / "decision.json").read_text())
    assert decision["strategy"] == strategy and decision["advice"]["decision"]["quadrant"]
    report = run.report_md.read_text()
    for section in ("Transfer-learning decision", "Plan", "Linear probes by depth", "confusion matrix"):
        assert section in report
    assert run.confusion.exists() and (run.root / "probes.png").exists() and run.per_class.exists()
    if strategy == "linear-early":
        assert decision["plan"]["features"] == decision["advice"]["best_cut"]


def test_finetune_trains_the_top_groups_and_keeps_frozen_statistics(digit_halves, pretrained_run, tmp_path):
    """Frozen groups (and every batch normalization) keep their weights and moving statistics; the
    unfrozen top group and the head change. Under full, the statistics change too."""
    from ktoolkit.transfer.bases import load_base
    from ktoolkit.transfer.finetune import group_of_layers

    base = load_base(str(pretrained_run))
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in base.model.layers if layer.weights}
    groups = group_of_layers(base.model, base.groups)
    result = _finetune(digit_halves, pretrained_run, tmp_path, strategy="finetune", unfreeze=1, lr=1e-3)
    after = recipes.load_model(result.run.best)
    top = base.groups[-1]
    changed = {
        name: any(not np.array_equal(a, b) for a, b in zip(weights, after.get_layer(name).get_weights()))
        for name, weights in before.items()
    }
    bn = [n for n in changed if type(base.model.get_layer(n)).__name__ == "BatchNormalization"]
    convs_top = [n for n in changed if groups[n] == top and n not in bn]
    frozen = [n for n in changed if groups[n] != top]
    assert bn and convs_top and frozen
    assert not any(changed[n] for n in bn), "batch normalization changed under finetune"
    assert not any(changed[n] for n in frozen), [n for n in frozen if changed[n]]
    assert all(changed[n] for n in convs_top), [n for n in convs_top if not changed[n]]
    rates = {g["group"]: g["learning_rate"] for g in result.plan["groups"]}
    assert rates["head"] == pytest.approx(1e-3) and rates[top] == pytest.approx(3e-4) and rates[base.groups[0]] is None

    full = _finetune(digit_halves, pretrained_run, tmp_path / "full", strategy="full", epochs=1)
    stats = recipes.load_model(full.run.best).get_layer(bn[0])
    assert not np.array_equal(stats.moving_mean.numpy(), before[bn[0]][2])


def test_feature_cache_is_reused_and_invalidated_by_data_or_base_changes(digit_halves, pretrained_run, tmp_path):
    from ktoolkit.data import load_data
    from ktoolkit.transfer.bases import load_base
    from ktoolkit.transfer.features import FeatureCache, extract_features

    base = load_base(str(pretrained_run))
    split = load_data(str(digit_halves["high"])).splits["train"]
    cache = FeatureCache(tmp_path / "features")
    kwargs = dict(image_size=base.image_size, channels=base.channels, cache=cache)
    first = extract_features(base.model, [base.top], split, **kwargs)[base.top]
    assert (cache.hits, cache.misses) == (0, 1)
    again = extract_features(base.model, [base.top], split, **kwargs)[base.top]
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(first, again)
    fewer = split.subset(np.arange(len(split) - 1))
    extract_features(base.model, [base.top], fewer, **kwargs)
    assert cache.misses == 2  # other data
    layer = next(layer for layer in base.model.layers if layer.weights)
    layer.set_weights([w + 0.01 for w in layer.get_weights()])
    changed = extract_features(base.model, [base.top], split, **kwargs)[base.top]
    assert cache.misses == 3 and not np.allclose(changed, first)  # another base


def test_a_second_linear_run_reads_every_feature_from_the_cache(digit_halves, pretrained_run, tmp_path):
    first = _finetune(digit_halves, pretrained_run, tmp_path / "a", strategy="linear")
    second = _finetune(digit_halves, pretrained_run, tmp_path / "b", strategy="linear")
    assert second.plan["feature_cache"]["misses"] == 0 and second.plan["feature_cache"]["hits"] > 0
    assert second.metrics["accuracy"] == first.metrics["accuracy"]


def test_cli_advise_and_finetune_then_evaluate_and_predict(digit_halves, pretrained_run, tmp_path, digits_folder):
    from ktoolkit.cli import main

    runner = CliRunner()
    advice = runner.invoke(main, ["advise", "--base", str(pretrained_run), "--data", str(digit_halves["high"])])
    assert advice.exit_code == 0, advice.output
    assert "per class (median)" in advice.output and "strategy: " in advice.output and "similarity" in advice.output
    out = tmp_path / "ft"
    result = runner.invoke(
        main,
        [
            "finetune",
            "--base",
            str(pretrained_run),
            "--data",
            str(digit_halves["high"]),
            "--out",
            str(out),
            "--strategy",
            "linear-early",
            "--cut",
            "stage2_block3_out",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "strategy: linear-early" in result.output and "test accuracy" in result.output
    assert json.loads((out / "decision.json").read_text())["plan"]["features"] == "stage2_block3_out"
    evaluated = runner.invoke(main, ["evaluate", "--model", str(out)])
    assert evaluated.exit_code == 0 and "accuracy" in evaluated.output
    bad = runner.invoke(
        main,
        [
            "finetune",
            "--base",
            str(pretrained_run),
            "--data",
            str(digit_halves["high"]),
            "--out",
            str(tmp_path / "bad"),
            "--strategy",
            "linear-early",
            "--cut",
            "stage2_block3",
        ],
    )
    assert bad.exit_code != 0 and "did you mean stage2_block3_out" in bad.output


def test_readme_transfer_commands_run_offline(digit_halves, pretrained_run, digits_folder, tmp_path):
    """The README's transfer-learning block, with a MobileNetV2 weights file the test makes (no download)."""
    import re
    import shlex
    from pathlib import Path

    import tf_keras

    from ktoolkit.cli import main

    weights = tmp_path / "mobilenet_v2_no_top.h5"
    tf_keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3)).save_weights(weights)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme.split("## Transfer learning", 1)[1], re.S).group(1)
    runner = CliRunner()
    for line in block.strip().splitlines():
        line = (
            line.replace("--base mobilenet_v2", f"--base mobilenet_v2 --weights {weights} --image-size 32,32")
            .replace("runs/mine", str(pretrained_run))
            .replace("mydir", str(digits_folder))
            .replace("runs/", f"{tmp_path}/")
        )
        result = runner.invoke(main, shlex.split(line)[1:])
        assert result.exit_code == 0, (line, result.output)
    assert (tmp_path / "transfer" / "best.keras").exists() and (tmp_path / "from-mine" / "report.html").exists()
