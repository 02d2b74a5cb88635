"""AlexNet, its two-GPU grouped form and ZFNet: parameter counts from the layer tables, the grouped
convolutions, ZFNet's Fig. 3 sizes and the LRN switch."""

import numpy as np
import pytest

import recipes
from recipes.alexnet import alexnet, alexnet_grouped, zfnet

# (layer, kernel, in channels, out channels, groups): the papers' layer tables. fc6 takes pool5's 6x6x256.
CONVS = {
    "alexnet": [
        ("conv1", 11, 3, 96, 1),
        ("conv2", 5, 96, 256, 1),
        ("conv3", 3, 256, 384, 1),
        ("conv4", 3, 384, 384, 1),
        ("conv5", 3, 384, 256, 1),
    ],
    "alexnet_grouped": [
        ("conv1", 11, 3, 96, 1),
        ("conv2", 5, 96, 256, 2),
        ("conv3", 3, 256, 384, 1),
        ("conv4", 3, 384, 384, 2),
        ("conv5", 3, 384, 256, 2),
    ],
    "zfnet": [
        ("conv1", 7, 3, 96, 1),
        ("conv2", 5, 96, 256, 1),
        ("conv3", 3, 256, 384, 1),
        ("conv4", 3, 384, 384, 1),
        ("conv5", 3, 384, 256, 1),
    ],
}
FCS = [("fc6", 6 * 6 * 256, 4096), ("fc7", 4096, 4096), ("predictions", 4096, 1000)]
BUILDERS = {"alexnet": alexnet, "alexnet_grouped": alexnet_grouped, "zfnet": zfnet}


def table_params(name):
    """Per-layer parameter counts the table implies: k*k*(in/groups)*out + out, in*out + out."""
    counts = {layer: k * k * (cin // groups) * cout + cout for layer, k, cin, cout, groups in CONVS[name]}
    counts.update({layer: n_in * n_out + n_out for layer, n_in, n_out in FCS})
    return counts


@pytest.mark.parametrize("name", ["alexnet", "alexnet_grouped", "zfnet"])
def test_parameter_counts_follow_the_layer_table(name):
    model = BUILDERS[name]()
    expected = table_params(name)
    for layer, count in expected.items():
        assert model.get_layer(layer).count_params() == count, layer
    assert model.count_params() == sum(expected.values()) == recipes.get(name).params


def test_paper_totals():
    # one tower 62.4M; the paper's two-GPU network is its "60 million parameters"
    assert sum(table_params("alexnet").values()) == 62_378_344
    assert sum(table_params("alexnet_grouped").values()) == 60_965_224
    assert abs(sum(table_params("alexnet_grouped").values()) - 60e6) / 60e6 < 0.02


def test_grouped_convolutions_see_half_the_channels():
    model = alexnet_grouped(input_shape=(67, 67, 3), num_classes=3)
    shapes = {name: tuple(model.get_layer(name).kernel.shape) for name in ("conv1", "conv2", "conv3", "conv4", "conv5")}
    assert shapes == {
        "conv1": (11, 11, 3, 96),
        "conv2": (5, 5, 48, 256),
        "conv3": (3, 3, 256, 384),
        "conv4": (3, 3, 192, 384),
        "conv5": (3, 3, 192, 256),
    }
    one_tower = alexnet(input_shape=(67, 67, 3), num_classes=3)
    assert tuple(one_tower.get_layer("conv4").kernel.shape) == (3, 3, 384, 384)


def test_grouped_convolution_is_two_independent_towers():
    """conv2 of the grouped net equals two half convolutions, each on its GPU's 48 channels."""
    import tensorflow as tf

    layer = alexnet_grouped(input_shape=(67, 67, 3), num_classes=3).get_layer("conv2")
    layer.set_weights(
        [np.random.default_rng(0).normal(size=w.shape).astype("float32") * 0.05 for w in layer.get_weights()]
    )
    kernel, bias = layer.get_weights()
    x = np.random.default_rng(1).normal(size=(1, 7, 7, 96)).astype("float32")
    towers = [
        tf.nn.conv2d(x[..., 48 * g : 48 * (g + 1)], kernel[..., 128 * g : 128 * (g + 1)], 1, "SAME") for g in range(2)
    ]
    expected = np.maximum(np.concatenate([t.numpy() for t in towers], axis=-1) + bias, 0)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-4, atol=1e-4)


SIZES = {
    "alexnet": {"conv1": 55, "pool1": 27, "conv2": 27, "pool2": 13, "conv3": 13, "conv4": 13, "conv5": 13, "pool5": 6},
    # Zeiler and Fergus, Fig. 3: 110, 55, 26, 13, 13, 13, 6
    "zfnet": {"conv1": 110, "pool1": 55, "conv2": 26, "pool2": 13, "conv3": 13, "conv4": 13, "conv5": 13, "pool5": 6},
}


@pytest.mark.parametrize("name", ["alexnet", "zfnet"])
def test_spatial_sizes_match_the_papers(name):
    model = BUILDERS[name]()
    sizes = {layer: model.get_layer(layer).output_shape[1] for layer in SIZES[name]}
    assert sizes == SIZES[name]
    assert model.get_layer("pool5").output_shape[1:] == (6, 6, 256)
    assert model.get_layer("conv1").strides == ((4, 4) if name == "alexnet" else (2, 2))


@pytest.mark.parametrize("name", ["alexnet", "alexnet_grouped", "zfnet"])
def test_min_size_is_where_pool5_becomes_1x1(name):
    size = recipes.get(name).min_size
    model = BUILDERS[name](input_shape=(size, size, 3), num_classes=3)
    assert model.get_layer("pool5").output_shape[1:3] == (1, 1)
    with pytest.raises(ValueError, match=f"at least {size}"):
        BUILDERS[name](input_shape=(size - 1, size - 1, 3))


def test_lrn_order_and_switch():
    names = [layer.name for layer in alexnet(input_shape=(67, 67, 3), num_classes=3).layers]
    # AlexNet: conv -> ReLU -> LRN -> pool; ZFNet: conv -> ReLU -> pool -> contrast normalization
    assert names.index("conv1") < names.index("lrn1") < names.index("pool1") < names.index("conv2")
    z_names = [layer.name for layer in zfnet(input_shape=(53, 53, 3), num_classes=3).layers]
    assert z_names.index("conv1") < z_names.index("pool1") < z_names.index("lrn1") < z_names.index("conv2")
    assert "conv1_pad" in z_names

    for builder in (alexnet, zfnet):
        size = recipes.get(builder.recipe_name).min_size
        with_lrn = builder(input_shape=(size, size, 3), num_classes=3)
        without = builder(input_shape=(size, size, 3), num_classes=3, lrn=False)
        assert sum(type(layer).__name__ == "LocalResponseNormalization" for layer in with_lrn.layers) == 2
        assert not any(type(layer).__name__ == "LocalResponseNormalization" for layer in without.layers)
        assert {"lrn1", "lrn2"}.isdisjoint(layer.name for layer in without.layers)
        assert without.count_params() == with_lrn.count_params()
        # the registry's layer groups still exist without LRN
        layer_names = {layer.name for layer in without.layers}
        assert all(last in layer_names for _, last in recipes.get(builder.recipe_name).layer_groups)


def test_lrn_changes_the_features():
    x = np.random.default_rng(0).uniform(0, 255, (1, 67, 67, 3)).astype("float32")
    with_lrn = alexnet(input_shape=(67, 67, 3), include_top=False)
    without = alexnet(input_shape=(67, 67, 3), include_top=False, lrn=False)
    without.set_weights(with_lrn.get_weights())
    assert not np.allclose(with_lrn(x).numpy(), without(x).numpy())


def test_dropout_and_weight_decay_options():
    model = alexnet(input_shape=(67, 67, 3), num_classes=3, weight_decay=5e-4)
    assert [layer.rate for layer in model.layers if type(layer).__name__ == "Dropout"] == [0.5, 0.5]
    assert len(model.losses) == 8  # one L2 term per kernel: 5 conv + 3 dense
    plain = alexnet(input_shape=(67, 67, 3), num_classes=3, dropout=0)
    assert not any(type(layer).__name__ == "Dropout" for layer in plain.layers)
    assert not plain.losses
    with pytest.raises(ValueError, match="dropout=1.5"):
        alexnet(dropout=1.5)
    with pytest.raises(ValueError, match="config='vgg'.*alexnet, alexnet_grouped, zfnet"):
        from recipes.alexnet import alexnet_family

        alexnet_family("vgg")


def test_registry_metadata():
    for name in ("alexnet", "alexnet_grouped", "zfnet"):
        recipe = recipes.get(name)
        assert recipe.family == "alexnet" and recipe.head_start == "flatten" and recipe.preprocessing == "caffe"
        assert recipe.group_names() == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
    assert recipes.get("alexnet").input_shape == (227, 227, 3)
    assert recipes.get("zfnet").input_shape == (224, 224, 3)
