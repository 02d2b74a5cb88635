"""VGG (Table 1 and 2 of Simonyan and Zisserman) and LeNet-5: counts from the layer tables, and
VGG-D/E against keras.applications VGG16/VGG19 with the same weights."""

import numpy as np
import pytest
import tf_keras

import recipes
from recipes.vgg import CONFIGS

# Table 1, written out again here (not imported from the recipe) as (kernel, filters) per conv layer.
TABLE_1 = {
    "vgg_a": [(3, 64), (3, 128), (3, 256), (3, 256), (3, 512), (3, 512), (3, 512), (3, 512)],
    "vgg_b": [(3, 64), (3, 64), (3, 128), (3, 128), (3, 256), (3, 256), (3, 512), (3, 512), (3, 512), (3, 512)],
    "vgg_c": [
        (3, 64),
        (3, 64),
        (3, 128),
        (3, 128),
        (3, 256),
        (3, 256),
        (1, 256),
        (3, 512),
        (3, 512),
        (1, 512),
        (3, 512),
        (3, 512),
        (1, 512),
    ],
    "vgg_d": [(3, 64), (3, 64), (3, 128), (3, 128)] + [(3, 256)] * 3 + [(3, 512)] * 6,
    "vgg_e": [(3, 64), (3, 64), (3, 128), (3, 128)] + [(3, 256)] * 4 + [(3, 512)] * 8,
}
TABLE_1["vgg_a_lrn"] = TABLE_1["vgg_a"]
TABLE_2_MILLIONS = {"vgg_a": 133, "vgg_a_lrn": 133, "vgg_b": 133, "vgg_c": 134, "vgg_d": 138, "vgg_e": 144}


def count_from_table(convs, classes=1000, input_size=224):
    total, channels = 0, 3
    for kernel, filters in convs:
        total += kernel * kernel * channels * filters + filters
        channels = filters
    flat = (input_size // 32) ** 2 * 512
    return total + flat * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * classes + classes


@pytest.mark.parametrize("config", sorted(TABLE_1))
def test_vgg_counts_follow_tables_1_and_2(config):
    expected = count_from_table(TABLE_1[config])
    assert recipes.get(config).params == expected
    assert round(expected / 1e6) == TABLE_2_MILLIONS[config]
    assert [layer for block in CONFIGS[config] for layer in block if layer != "lrn"] == TABLE_1[config]


def test_only_a_lrn_has_lrn_and_only_c_has_1x1_convolutions():
    for config in TABLE_1:
        model = recipes.get(config).build(input_shape=(32, 32, 3), num_classes=3)
        kinds = {type(layer).__name__ for layer in model.layers}
        kernels = {layer.kernel_size for layer in model.layers if type(layer).__name__ == "Conv2D"}
        assert ("LocalResponseNormalization" in kinds) == (config == "vgg_a_lrn")
        assert ((1, 1) in kernels) == (config == "vgg_c")


@pytest.mark.parametrize(
    "ours, theirs, module",
    [
        (recipes.vgg16, tf_keras.applications.VGG16, tf_keras.applications.vgg16),
        (recipes.vgg19, tf_keras.applications.VGG19, tf_keras.applications.vgg19),
    ],
)
def test_vgg_d_and_e_are_keras_applications_vgg16_and_vgg19(ours, theirs, module, tmp_path):
    shape = (64, 64, 3)
    keras_model = theirs(weights=None, input_shape=shape)
    rng = np.random.default_rng(0)
    keras_model.set_weights([rng.normal(0, 0.02, w.shape).astype("float32") for w in keras_model.get_weights()])
    path = tmp_path / "keras.h5"  # an official-format weights file
    keras_model.save_weights(path)
    model = ours(input_shape=shape, weights=str(path))
    assert [layer.name for layer in model.layers if layer.weights] == [
        layer.name for layer in keras_model.layers if layer.weights
    ]
    x = rng.uniform(0, 255, (3, *shape)).astype("float32")
    expected = keras_model(module.preprocess_input(x.copy())).numpy()
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    # and the headless model loads the no-top file
    notop = theirs(weights=None, include_top=False, input_shape=shape)
    notop.set_weights(keras_model.get_weights()[: len(notop.get_weights())])
    notop.save_weights(tmp_path / "notop.h5")
    headless = ours(input_shape=shape, include_top=False, weights=str(tmp_path / "notop.h5"))
    np.testing.assert_allclose(
        headless(x).numpy(), notop(module.preprocess_input(x.copy())).numpy(), rtol=1e-5, atol=1e-5
    )


def test_lenet5_count_follows_the_paper_layers():
    c1 = 6 * (5 * 5 * 1 + 1)
    c3 = 16 * (5 * 5 * 6 + 1)  # full C3 connections
    c5 = 120 * (5 * 5 * 16 + 1)
    f6 = 84 * (120 + 1)
    out = 10 * (84 + 1)
    model = recipes.lenet5()
    assert model.count_params() == c1 + c3 + c5 + f6 + out == 61_706
    assert [tuple(model.get_layer(n).output_shape[1:]) for n in ("c1", "s2", "c3", "s4", "c5")] == [
        (28, 28, 6),
        (14, 14, 6),
        (10, 10, 16),
        (5, 5, 16),
        (1, 1, 120),
    ]


def test_lenet5_options():
    relu_max = recipes.lenet5(activation="relu", subsampling="max", dropout=0.5, weight_decay=1e-4)
    assert type(relu_max.get_layer("s2")).__name__ == "MaxPooling2D"
    assert relu_max.get_layer("c1").activation.__name__ == "relu"
    assert len(relu_max.losses) == 5  # L2 on c1, c3, c5, f6, predictions
    with pytest.raises(ValueError, match="subsampling='min'"):
        recipes.lenet5(subsampling="min")
