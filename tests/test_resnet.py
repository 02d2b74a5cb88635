"""ResNet family: the papers' parameter counts, layer-for-layer equivalence with
keras.applications ResNet50/101/152, squeeze-and-excitation and option A shortcuts."""

import numpy as np
import pytest

import recipes
from recipes.resnet import resnet


def trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def layer_types(model):
    return {layer.name: type(layer).__name__ for layer in model.layers}


def randomize(model, seed=0):
    """Random values in every weight, BN statistics included, so a weight in the wrong layer shows."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            shape, wname = tuple(w.shape), w.name.split("/")[-1]
            if "moving_variance" in wname:
                values.append(rng.uniform(0.5, 1.5, shape))
            elif "gamma" in wname:
                values.append(rng.uniform(0.5, 1.0, shape))
            elif "kernel" in wname:
                fan_in = np.prod(shape[:-1])
                values.append(rng.normal(0, np.sqrt(1.0 / fan_in), shape))
            else:  # beta, moving_mean, biases
                values.append(rng.normal(0, 0.1, shape))
        if values:
            layer.set_weights([v.astype("float32") for v in values])


# Trainable counts: torchvision's for 18/34 (He et al. give FLOPs only), Table 6 for CIFAR
# (0.27M, 0.46M, 0.66M, 0.85M, 1.7M; exact option A counts), Hu et al. for SE-ResNet-50 (28.09M).
@pytest.mark.parametrize(
    "name, expected, paper",
    [
        ("resnet18", 11_689_512, 11.7e6),
        ("resnet34", 21_797_672, 21.8e6),
        ("resnet50", 25_583_592, 25.6e6),  # keras.applications ResNet50 (conv biases)
        ("se_resnet50", 28_088_024, 28.09e6),
        ("cifar_resnet20", 269_722, 0.27e6),
        ("cifar_resnet32", 464_154, 0.46e6),
        ("cifar_resnet44", 658_586, 0.66e6),
        ("cifar_resnet56", 853_018, 0.85e6),
        ("cifar_resnet110", 1_727_962, 1.7e6),
    ],
)
def test_trainable_parameters_match_the_papers(name, expected, paper):
    model = recipes.get(name).build(input_shape=(32, 32, 3))
    assert trainable(model) == expected
    assert abs(expected - paper) / paper < (0.03 if name.startswith("cifar") else 0.01)
    if name.startswith("cifar"):  # 6n+2 weighted layers, the last stage at 8x8x64, 10 classes
        n = (int(name.removeprefix("cifar_resnet")) - 2) // 6
        weighted = [t for t in layer_types(model).values() if t in ("Conv2D", "Dense")]
        assert len(weighted) == 6 * n + 2
        assert model.get_layer(f"stage3_block{n}_out").output_shape == (None, 8, 8, 64)
        assert model.output_shape == (None, 10)


def _compare_with_keras(keras_cls, ours, tmp_path):
    import tf_keras

    shape = (64, 64, 3)
    reference = keras_cls(weights=None, input_shape=shape, classifier_activation=None)
    randomize(reference)
    path = str(tmp_path / "reference.h5")
    reference.save_weights(path)
    model = ours(input_shape=shape, weights=path, classifier_activation=None)
    # the same layers, in the same order, with the same names (after our preprocessing layer)
    assert [layer.name for layer in model.layers[2:]] == [layer.name for layer in reference.layers[1:]]
    assert model.count_params() == reference.count_params()
    x = np.random.default_rng(1).uniform(0, 255, (2, *shape)).astype("float32")
    expected = reference(tf_keras.applications.resnet.preprocess_input(x.copy()), training=False).numpy()
    got = model(x, training=False).numpy()
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))


def test_resnet50_is_keras_applications_resnet50(tmp_path):
    import tf_keras

    _compare_with_keras(tf_keras.applications.ResNet50, recipes.resnet50, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [101, 152])
def test_resnet101_152_are_keras_applications(depth, tmp_path):
    import tf_keras

    _compare_with_keras(getattr(tf_keras.applications, f"ResNet{depth}"), getattr(recipes, f"resnet{depth}"), tmp_path)


def test_headless_resnet50_loads_keras_notop_weights(tmp_path):
    import tf_keras

    reference = tf_keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    randomize(reference, seed=3)
    reference.save_weights(str(tmp_path / "notop.h5"))
    model = recipes.resnet50(
        input_shape=(32, 32, 3), include_top=False, weights=str(tmp_path / "notop.h5"), include_preprocessing=False
    )
    x = np.random.default_rng(2).normal(0, 50, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), reference(x).numpy(), rtol=1e-5, atol=1e-5)


def test_squeeze_excitation_only_where_asked():
    se = recipes.se_resnet50(input_shape=(32, 32, 3))
    plain = recipes.resnet50(input_shape=(32, 32, 3))
    se_types = layer_types(se)
    # one SE unit per block (16 blocks), before the residual addition
    assert sum(t == "Multiply" for t in se_types.values()) == 16
    assert not any(t == "Multiply" or "_se_" in n for n, t in layer_types(plain).items())
    assert se.get_layer("conv2_block1_se_reduce").output_shape == (None, 1, 1, 256 // 16)
    assert se.get_layer("conv5_block3_se_expand").output_shape == (None, 1, 1, 2048)
    assert se.get_layer("conv5_block3_se_expand").get_config()["activation"] == "sigmoid"
    add_inputs = {t._keras_history.layer.name for t in se.get_layer("conv4_block6_add").input}
    assert add_inputs == {"conv4_block6_se_excite", "conv4_block5_out"}

    # the option works on any variant: ResNet-18 + SE adds 2*C^2/16 + C/16 + C per block
    def se_params(channels):
        return sum(2 * (c * c // 16) + c // 16 + c for c in channels)

    se18 = recipes.resnet18(input_shape=(32, 32, 3), se_ratio=16)
    assert trainable(se18) - 11_689_512 == se_params([64, 64, 128, 128, 256, 256, 512, 512])
    # without its SE units, SE-ResNet-50 is torchvision's ResNet-50 (no conv biases): 25,557,032
    assert trainable(se) - se_params([256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3) == 25_557_032


def test_option_a_cifar_resnets_have_no_shortcut_convolutions():
    model = recipes.cifar_resnet20()
    types = layer_types(model)
    assert not any(n.endswith("_0_conv") or n.endswith("_0_bn") for n in types)
    assert types["stage2_block1_0_pool"] == "MaxPooling2D" and types["stage2_block1_0_pad"] == "ChannelPad"
    assert "stage1_block1_0_pad" not in types  # same shape: identity
    assert all(not layer.use_bias for layer in model.layers if type(layer).__name__ == "Conv2D")
    # the padded shortcut carries the block's input on the middle channels, zeros elsewhere
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    import tf_keras

    probe = tf_keras.Model(
        model.input, [model.get_layer("stage1_block3_out").output, model.get_layer("stage2_block1_0_pad").output]
    )
    before, padded = (t.numpy() for t in probe(x))
    np.testing.assert_array_equal(padded[..., 8:24], before[:, ::2, ::2, :])
    assert not padded[..., :8].any() and not padded[..., 24:].any()

    projected = recipes.cifar_resnet20(shortcut="projection")
    assert {"stage2_block1_0_conv", "stage3_block1_0_conv"} <= set(layer_types(projected))
    assert trainable(projected) - trainable(model) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_strided_basic_blocks_keep_shortcut_and_residual_on_one_grid():
    # odd sizes too: the padded 3x3/2 convolution and the 1x1/2 shortcut give the same map
    for size in (8, 9, 11):
        model = recipes.cifar_resnet20(input_shape=(size, size, 3))
        assert model(np.zeros((1, size, size, 3), "float32")).shape == (1, 10)
    model = recipes.resnet18(input_shape=(33, 45, 3), include_top=False)
    assert model.output_shape == (None, 2, 2, 512)


def test_layer_groups_and_head():
    r50, cifar = recipes.get("resnet50"), recipes.get("cifar_resnet56")
    assert r50.layer_groups == (
        ("conv1", "pool1_pool"),
        ("conv2", "conv2_block3_out"),
        ("conv3", "conv3_block4_out"),
        ("conv4", "conv4_block6_out"),
        ("conv5", "conv5_block3_out"),
    )
    assert recipes.get("resnet152").group_output("conv4") == "conv4_block36_out"
    assert cifar.group_names() == ["stem", "stage1", "stage2", "stage3"]
    assert cifar.group_output("stage3") == "stage3_block9_out" and cifar.head_start == "avg_pool"
    assert (r50.preprocessing, recipes.get("resnet18").preprocessing) == ("caffe", "torch")


def test_dropout_and_weight_decay_options():
    model = recipes.cifar_resnet20(dropout=0.3, weight_decay=1e-4)
    assert model.get_layer("head_dropout").rate == 0.3
    assert len(model.losses) == 20  # 19 convolutions + predictions
    assert model.layers[-1].name == "predictions"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"se_ratio": -1}, "se_ratio=-1"),
        ({"shortcut": "identity"}, "shortcut='identity'.*projection, zeros"),
        ({"dropout": 1.5}, "dropout=1.5"),
        ({"input_shape": (16, 16, 3)}, "at least 32"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recipes.resnet18(**kwargs)


def test_unknown_config_lists_the_variants():
    with pytest.raises(ValueError, match="config='resnet200'.*cifar_resnet110"):
        resnet("resnet200")
