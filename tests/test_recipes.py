"""Every registered recipe, the same way: metadata true, builds, runs, saves and reloads in safe
mode with identical outputs, builds under Keras 3 with the same parameter count."""

import numpy as np
import pytest

import recipes
from recipes.layers import PREPROCESSING_MODES

ALL = recipes.names()
IMAGE_CLASSIFIERS = recipes.names(task="classification")
# Deeper variants that only repeat a shallower recipe's blocks: resnet34 (resnet18's basic block), resnet101/152
# (resnet50's bottleneck, 3-4-23-3 and 3-8-36-3 times instead of 3-4-6-3), cifar_resnet32-110 (cifar_resnet20's
# block), vgg_b/d/e (vgg_a's 3x3 stacks; vgg_c keeps its 1x1 convolutions, vgg_a_lrn its LRN). Their depth is
# checked against the papers' parameter counts (test_canonical_parameter_count_matches_registry); building,
# running, saving and reloading them again in the three tests below added about 2.5 minutes of CI time and no
# layer type, no code path.
REPEATS = {"resnet34", "resnet101", "resnet152", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"}
REPEATS |= {"cifar_resnet110", "vgg_b", "vgg_d", "vgg_e"}
BUILT = [name for name in ALL if name not in REPEATS]


def small_shape(recipe):
    return (recipe.min_size, recipe.min_size, recipe.input_shape[-1])


def pixels(shape, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, *shape)).astype("float32")


def as_arrays(outputs):
    if isinstance(outputs, dict):
        return [np.asarray(outputs[k]) for k in sorted(outputs)]
    if isinstance(outputs, (list, tuple)):
        return [np.asarray(o) for o in outputs]
    return [np.asarray(outputs)]


def test_every_product_family_is_registered():
    families = {r.family for r in recipes.all_recipes()}
    expected = {
        "lenet",
        "alexnet",
        "vgg",
        "googlenet",
        "inception",
        "resnet",
        "linear",
        "mlp",
        "autoencoder",
        "contrastive",
    }
    assert expected <= families, expected - families
    assert {
        "vgg_a",
        "vgg_a_lrn",
        "vgg_b",
        "vgg_c",
        "vgg_d",
        "vgg_e",
        "resnet18",
        "resnet152",
        "cifar_resnet110",
        "se_resnet50",
        "alexnet_grouped",
        "zfnet",
        "googlenet",
        "inception_v3",
    } <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_metadata_is_well_formed(name):
    recipe = recipes.get(name)
    assert recipe.preprocessing in PREPROCESSING_MODES
    assert len(recipe.input_shape) == 3 and recipe.min_size <= min(recipe.input_shape[:2])
    assert recipe.paper and recipe.description and recipe.params > 0
    assert recipe.layer_groups, "transfer learning needs layer groups"
    assert len(set(recipe.group_names())) == len(recipe.layer_groups)
    if recipe.paper_params:
        # the stored count is the built one (tested below); here: it is near what the paper says
        assert abs(recipe.params - recipe.paper_params) / recipe.paper_params < 0.10, (
            recipe.params,
            recipe.paper_params,
        )


@pytest.mark.parametrize("name", ALL)
def test_canonical_parameter_count_matches_registry(name):
    recipe = recipes.get(name)
    model = recipe.build()
    assert model.count_params() == recipe.params
    assert tuple(model.input_shape[1:]) == tuple(recipe.input_shape)
    layer_names = {layer.name for layer in model.layers}
    for group, last_layer in recipe.layer_groups:
        assert last_layer in layer_names, f"group {group}: no layer {last_layer!r}"
    if recipe.head_start is not None:
        assert recipe.head_start in layer_names


@pytest.mark.parametrize("name", BUILT)
def test_builds_runs_saves_and_reloads_in_safe_mode(name, tmp_path):
    recipe = recipes.get(name)
    shape = small_shape(recipe)
    model = recipe.build(input_shape=shape, num_classes=7)
    x = pixels(shape) / (255.0 if recipe.preprocessing == "none" else 1.0)
    before = as_arrays(model(x, training=False))
    for out in before:
        assert np.all(np.isfinite(out))
    if recipe.task == "classification":
        assert before[0].shape == (2, 7)
    assert not any(type(layer).__name__ == "Lambda" for layer in model.layers)

    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = recipes.load_model(path)
    after = as_arrays(reloaded(x, training=False))
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in model.layers]


@pytest.mark.parametrize("name", BUILT)
def test_keras3_build_has_the_same_parameters(name):
    import keras

    recipe = recipes.get(name)
    shape = small_shape(recipe)
    k2 = recipe.build(input_shape=shape, num_classes=7)
    k3 = recipe.build(input_shape=shape, num_classes=7, api="keras3")
    assert isinstance(k3, keras.Model)
    assert k3.count_params() == k2.count_params()
    assert [layer.name for layer in k3.layers] == [layer.name for layer in k2.layers]
    out = as_arrays(k3(pixels(shape), training=False))
    assert all(np.all(np.isfinite(o)) for o in out)
    keras.backend.clear_session()


@pytest.mark.parametrize("name", [name for name in IMAGE_CLASSIFIERS if name not in REPEATS])
def test_headless_pooling(name):
    recipe = recipes.get(name)
    shape = small_shape(recipe)
    pooled = recipe.build(input_shape=shape, include_top=False, pooling="avg")
    assert len(pooled.output_shape) == 2
    assert "predictions" not in {layer.name for layer in pooled.layers}
    maxed = recipe.build(input_shape=shape, include_top=False, pooling="max")
    assert maxed.output_shape == pooled.output_shape


def test_keras3_model_saves_and_reloads_in_safe_mode(tmp_path):
    model = recipes.vgg_a_lrn(input_shape=(32, 32, 3), num_classes=3, api="keras3")
    x = pixels((32, 32, 3))
    model.save(tmp_path / "m.keras")
    reloaded = recipes.load_model(tmp_path / "m.keras", api="keras3")
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reloaded(x)), rtol=0, atol=1e-6)


def test_weights_path_round_trip(tmp_path):
    model = recipes.lenet5(num_classes=4)
    path = tmp_path / "lenet.weights.h5"
    model.save_weights(path)
    again = recipes.lenet5(num_classes=4, weights=str(path))
    x = pixels((32, 32, 1))
    np.testing.assert_array_equal(model(x).numpy(), again(x).numpy())
    # a whole .keras model works as a weights source too
    model.save(tmp_path / "lenet.keras")
    third = recipes.lenet5(num_classes=4, weights=str(tmp_path / "lenet.keras"))
    np.testing.assert_array_equal(model(x).numpy(), third(x).numpy())


def test_weights_that_do_not_fit_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "ten.weights.h5"
    recipes.lenet5(num_classes=10).save_weights(path)
    with pytest.raises(ValueError, match=r"ten\.weights\.h5.*same configuration"):
        recipes.lenet5(num_classes=4, weights=str(path))
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        recipes.lenet5(weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="imagenet"):
        recipes.lenet5(weights="imagenet")


def test_unknown_names_list_the_closest_matches():
    with pytest.raises(recipes.UnknownRecipeError) as info:
        recipes.get("resnet5")
    assert "resnet50" in info.value.suggestions and "resnet50" in str(info.value)
    assert recipes.get("VGG-D") is recipes.get("vgg_d")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pooling": "mean"}, "pooling='mean'"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"input_shape": (16, 16, 1)}, "at least 32"),
        ({"input_shape": (32, 32)}, "input_shape"),
        ({"api": "keras4"}, "api='keras4'.*tf_keras, keras3"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recipes.lenet5(**kwargs)


def test_in_model_preprocessing_matches_the_documented_formula():
    from recipes.layers import custom_layers

    pre = custom_layers("tf_keras").ImagePreprocessing
    x = pixels((4, 4, 3), batch=1)
    caffe = pre("caffe")(x).numpy()
    np.testing.assert_allclose(caffe, x[..., ::-1] - np.array([103.939, 116.779, 123.68]), atol=1e-4)
    torch = pre("torch")(x).numpy()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(torch, (x / 255.0 - mean) / std, atol=1e-4)
    np.testing.assert_allclose(pre("tf")(x).numpy(), x / 127.5 - 1, atol=1e-5)


def test_lrn_is_the_papers_formula_in_both_apis():
    import keras

    from recipes.layers import custom_layers

    x = np.random.default_rng(1).normal(size=(2, 3, 3, 8)).astype("float32") * 10
    padded = np.pad(x**2, [(0, 0), (0, 0), (0, 0), (2, 2)])
    window = sum(padded[..., i : i + 8] for i in range(5))
    expected = x / (2.0 + 1e-4 * window) ** 0.75
    for api in ("tf_keras", "keras3"):
        layer = custom_layers(api).LocalResponseNormalization()
        np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5)
    keras.backend.clear_session()


def test_load_model_restores_a_compiled_model_with_its_optimizer_state(tmp_path):
    model = recipes.lenet5(num_classes=3)
    model.compile("adam", recipes.multiclass_hinge())
    rng = np.random.default_rng(0)
    model.fit(rng.uniform(0, 255, (8, 32, 32, 1)), np.arange(8) % 3, epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    again = recipes.load_model(tmp_path / "m.keras", compile=True)
    assert int(again.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) == 2
    for a, b in zip(model.optimizer.variables(), again.optimizer.variables()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert type(again.loss).__name__ == "MulticlassHinge"


def test_load_model_names_a_broken_file(tmp_path):
    broken = tmp_path / "half.keras"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="half.keras.*written completely"):
        recipes.load_model(broken)
