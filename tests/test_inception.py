"""Inception-v3: the keras.applications InceptionV3 twin (weights file, outputs, parameter count),
role-based layer names, and the auxiliary classifier."""

import numpy as np
import pytest

import recipes
from recipes.inception import AUX_MIN_SIZE, inception_v3

KERAS_PARAMS = 23_851_784


def pixels(size, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("float32")


def randomize(model, seed=1):
    """Random values for every weight, batch-norm statistics included, so that a weight landing in
    the wrong layer changes the outputs."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        shape, name = tuple(weight.shape), weight.name
        if "moving_variance" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif "moving_mean" in name or "beta" in name or "bias" in name:
            value = rng.normal(0.0, 0.1, shape)
        else:
            value = np.asarray(weight.numpy())  # the kernels' Glorot draw
        weight.assign(value.astype("float32"))


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """keras.applications InceptionV3 at 75x75 (its minimum) with random weights saved as .h5, and
    the recipe built from that file."""
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    keras_model = tf_keras.applications.InceptionV3(weights=None, input_shape=(75, 75, 3), classifier_activation=None)
    randomize(keras_model)
    path = str(tmp_path_factory.mktemp("inception") / "inception_v3.h5")
    keras_model.save_weights(path)
    ours = inception_v3(input_shape=(75, 75, 3), weights=path, classifier_activation=None)
    return keras_model, ours


def taps(model, names=("mixed2", "mixed7", "mixed10", "predictions")):
    """The model's outputs at ``names`` (keras and the recipe share these names)."""
    import tf_keras

    return tf_keras.Model(model.inputs, [model.get_layer(name).output for name in names])


def test_keras_weights_file_loads_and_gives_the_same_outputs(twins):
    import tf_keras

    keras_model, ours = twins
    assert ours.count_params() == keras_model.count_params() == KERAS_PARAMS
    assert len([layer for layer in ours.layers if layer.weights]) == len([k for k in keras_model.layers if k.weights])
    images = pixels(75)
    expected = taps(keras_model)(tf_keras.applications.inception_v3.preprocess_input(images.copy()), training=False)
    got = taps(ours)(images, training=False)  # the "tf" preprocessing is inside the recipe
    for name, e, g in zip(("mixed2", "mixed7", "mixed10", "predictions"), expected, got):
        e, g = np.asarray(e), np.asarray(g)
        assert np.std(e) > 1e-2, name  # a non-trivial comparison
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * np.abs(e).max(), err_msg=name)
    # the in-model preprocessing is keras' preprocess_input
    prep = tf_keras.Model(ours.inputs, ours.get_layer("preprocessing").output)(images)
    np.testing.assert_allclose(prep, tf_keras.applications.inception_v3.preprocess_input(images.copy()), atol=1e-6)


def test_layer_names_are_by_role(twins):
    model = twins[1]
    names = {layer.name for layer in model.layers}
    assert {f"mixed{i}" for i in range(11)} <= names
    for name in (
        "stem_conv1_conv",
        "stem_conv1_bn",
        "stem_conv1_relu",
        "stem_pool1",
        "mixed0_branch1x1_conv",
        "mixed0_branch5x5_2_conv",
        "mixed0_branch3x3dbl_3_relu",
        "mixed0_pool",
        "mixed0_branch_pool_bn",
        "mixed4_branch7x7dbl_5_conv",
        "mixed8_branch7x7x3_4_conv",
        "mixed9_branch3x3_2a_conv",
        "mixed10_branch3x3dbl_3b_bn",
        "mixed10_branch3x3dbl",
        "avg_pool",
        "predictions",
    ):
        assert name in names, name
    assert model.get_layer("mixed4_branch7x7_2_conv").kernel_size == (1, 7)
    assert model.get_layer("mixed4_branch7x7_3_conv").kernel_size == (7, 1)
    assert not any(name.startswith(("conv2d", "batch_normalization", "concatenate")) for name in names)
    recipe = recipes.get("inception_v3")
    assert recipe.head_start in names and all(last in names for _, last in recipe.layer_groups)


def test_paper_size_structure_and_aux_head():
    """At 299x299: Table 1's grid sizes, conv + BN(no scale) everywhere, and the auxiliary head of
    Figure 8 on the 17x17x768 mixed7."""
    model = inception_v3(aux_heads=True)
    assert model.input_shape == (None, 299, 299, 3)
    assert model.output_names == ["predictions", "aux"] and model.output_shape == [(None, 1000), (None, 1000)]
    shapes = {name: model.get_layer(name).output_shape[1:] for name in ("stem_pool2", "mixed2", "mixed7", "mixed10")}
    assert shapes == {
        "stem_pool2": (35, 35, 192),
        "mixed2": (35, 35, 288),
        "mixed7": (17, 17, 768),
        "mixed10": (8, 8, 2048),
    }
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    bns = [layer for layer in model.layers if layer.__class__.__name__ == "BatchNormalization"]
    assert len(convs) == len(bns) == 94 + 2  # keras' 94, and the aux head's two
    assert not any(conv.use_bias for conv in convs)
    assert all(not bn.scale and bn.epsilon == 1e-3 for bn in bns)
    assert model.get_layer("aux_pool").output_shape[1:] == (5, 5, 768)
    assert model.get_layer("aux_conv2_conv").kernel_size == (5, 5)
    assert model.get_layer("aux_conv2_relu").output_shape[1:] == (1, 1, 768)
    # 1x1 conv 128 (+ BN beta, mean, variance), 5x5 conv 768 (+ BN), fully connected 1000
    aux_params = 768 * 128 + 3 * 128 + 5 * 5 * 128 * 768 + 3 * 768 + 768 * 1000 + 1000
    assert model.count_params() == KERAS_PARAMS + aux_params


def test_headless():
    features = inception_v3(input_shape=(75, 75, 3), include_top=False, pooling="avg")
    assert features.output_shape == (None, 2048)
    assert features.count_params() == KERAS_PARAMS - (2048 * 1000 + 1000)
    with pytest.raises(ValueError, match="aux_heads"):
        inception_v3(input_shape=(299, 299, 3), include_top=False, aux_heads=True)
    with pytest.raises(ValueError, match="aux_heads.*107"):
        inception_v3(input_shape=(AUX_MIN_SIZE - 1, AUX_MIN_SIZE - 1, 3), aux_heads=True)


def test_aux_head_trains_with_loss_weights_dropout_and_weight_decay():
    import tf_keras

    size = AUX_MIN_SIZE
    model = inception_v3(input_shape=(size, size, 3), num_classes=5, aux_heads=True, dropout=0.2, weight_decay=4e-5)
    assert model.output_shape == [(None, 5), (None, 5)]
    assert model.get_layer("head_dropout").rate == 0.2
    assert len(model.losses) == 94 + 2 + 2  # an L2 term per kernel: convs, aux convs, aux and predictions
    model.compile(
        optimizer=tf_keras.optimizers.SGD(0.01),
        run_eagerly=True,  # eager: no minute-long tracing
        loss={"predictions": "sparse_categorical_crossentropy", "aux": "sparse_categorical_crossentropy"},
        loss_weights={"predictions": 1.0, "aux": 0.4},
    )
    images, labels = pixels(size, batch=4), np.array([0, 1, 2, 3])
    l2 = float(sum(float(loss) for loss in model.losses))
    aux_kernel = model.get_layer("aux").kernel.numpy().copy()
    total, main_loss, aux_loss = model.train_on_batch(images, {"predictions": labels, "aux": labels})
    assert np.isfinite(total) and main_loss > 0 and aux_loss > 0 and l2 > 0
    assert total == pytest.approx(main_loss + 0.4 * aux_loss + l2, rel=1e-4)
    assert not np.allclose(model.get_layer("aux").kernel.numpy(), aux_kernel)  # the aux head was trained
