"""The linear classifier and MLP (CS231n notes), the autoencoders and the SimCLR encoder: they
learn what they should on scikit-learn's digits, their losses match NumPy references, and their
encoders are the sub-models the later training code takes."""

import numpy as np
import pytest

import recipes
from recipes.autoencoder import encoder_of, linear_autoencoder
from recipes.contrastive import nt_xent_loss


@pytest.fixture(scope="module")
def digits():
    """8x8 digits as (8, 8, 1) images on the 0..255 scale, split 75/25 (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images[..., None] * (255.0 / 16.0)).astype("float32")
    return train_test_split(images, data.target, test_size=0.25, random_state=0, stratify=data.target)


def hinge_reference(scores, labels, delta=1.0):
    """CS231n: L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + delta), averaged over the batch."""
    losses = []
    for s, y in zip(scores, labels):
        losses.append(sum(max(0.0, s[j] - s[y] + delta) for j in range(len(s)) if j != y))
    return float(np.mean(losses))


# --- linear classifier and MLP -------------------------------------------------------------------


def test_linear_classifier_is_wx_plus_b_on_the_flattened_pixels():
    model = recipes.linear_classifier()
    assert model.count_params() == 32 * 32 * 3 * 10 + 10 == recipes.get("linear_classifier").params
    assert [layer.name for layer in model.layers] == ["input", "preprocessing", "flatten", "predictions"]
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    w, b = model.get_layer("predictions").get_weights()
    scores = recipes.linear_classifier(classifier_activation=None)
    scores.get_layer("predictions").set_weights([w, b])
    np.testing.assert_allclose(scores(x).numpy(), (x / 255.0).reshape(3, -1) @ w + b, rtol=1e-5, atol=1e-5)
    headless = recipes.linear_classifier(include_top=False, pooling="avg")
    assert headless.output_shape == (None, 3072)


@pytest.mark.parametrize("loss", ["softmax", "hinge"])
def test_linear_classifier_learns_digits(digits, loss):
    import tf_keras

    x_train, x_test, y_train, y_test = digits
    hinge = loss == "hinge"
    model = recipes.linear_classifier(
        input_shape=(8, 8, 1), num_classes=10, classifier_activation=None if hinge else "softmax"
    )
    model.compile(
        tf_keras.optimizers.Adam(0.01),
        recipes.multiclass_hinge() if hinge else "sparse_categorical_crossentropy",
        metrics=["sparse_categorical_accuracy"],
    )  # argmax: right for scores and probabilities
    model.fit(x_train, y_train, batch_size=64, epochs=25, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy > 0.90, accuracy


def test_multiclass_hinge_is_the_cs231n_formula_in_both_apis():
    import keras

    from recipes.losses import custom_losses

    # the notes' worked example: scores (3.2, 5.1, -1.7) for the cat (class 0): max(0, 2.9) + max(0, -3.9)
    example = np.array([[3.2, 5.1, -1.7]], "float32")
    assert float(recipes.multiclass_hinge()(np.array([0]), example)) == pytest.approx(2.9, abs=1e-5)

    rng = np.random.default_rng(3)
    scores = rng.normal(size=(16, 7)).astype("float32") * 2
    labels = rng.integers(0, 7, size=16)
    for delta in (1.0, 0.5):
        expected = hinge_reference(scores, labels, delta)
        tf_loss = recipes.multiclass_hinge(delta)(labels, scores)
        k3_loss = custom_losses("keras3").MulticlassHinge(delta=delta)(labels, scores)
        assert float(tf_loss) == pytest.approx(expected, rel=1e-5)
        assert float(np.asarray(k3_loss)) == pytest.approx(expected, rel=1e-5)
    keras.backend.clear_session()


def test_mlp_layers_and_regularization_losses(digits):
    import tf_keras

    model = recipes.mlp(input_shape=(8, 8, 1), hidden_units=(32, 16), dropout=0.2, weight_decay=1e-3)
    names = [layer.name for layer in model.layers]
    assert names == [
        "input",
        "preprocessing",
        "flatten",
        "fc1",
        "fc1_act",
        "fc1_dropout",
        "fc2",
        "fc2_act",
        "fc2_dropout",
        "predictions",
    ]
    assert model.count_params() == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    assert len(model.losses) == 3  # one L2 term per kernel: fc1, fc2, predictions
    kernels = [model.get_layer(n).kernel.numpy() for n in ("fc1", "fc2", "predictions")]
    assert float(sum(model.losses)) == pytest.approx(1e-3 * sum((k**2).sum() for k in kernels), rel=1e-5)
    assert recipes.mlp(input_shape=(8, 8, 1)).losses == []

    x_train, x_test, y_train, y_test = digits
    model.compile(tf_keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=64, epochs=15, verbose=0)
    assert model.evaluate(x_test, y_test, verbose=0)[1] > 0.90

    headless = recipes.mlp(include_top=False, batch_norm=True, dropout=0.5)
    assert headless.output_shape == (None, 128)
    assert headless.layers[-1].name == "fc2_act"  # the last hidden layer, before any dropout
    assert "fc1_bn" in [layer.name for layer in headless.layers]
    assert not headless.get_layer("fc1").use_bias  # batch norm replaces the bias


def test_mlp_bad_options_are_named():
    with pytest.raises(ValueError, match=r"hidden_units=\(\)"):
        recipes.mlp(hidden_units=())
    with pytest.raises(ValueError, match="dropout=1.0"):
        recipes.mlp(dropout=1.0)


# --- autoencoders --------------------------------------------------------------------------------


def test_conv_autoencoder_shapes_names_and_parameters():
    model = recipes.conv_autoencoder()
    assert model.output_shape == model.input_shape == (None, 32, 32, 3)
    # encoder 3->32->64 (3x3, no bias, BN), decoder 64->64->32 transposed, 3x3 sigmoid conv to 3 channels
    expected = (
        (27 * 32 + 4 * 32)
        + (9 * 32 * 64 + 4 * 64)  # encoder
        + (9 * 64 * 64 + 4 * 64)
        + (9 * 64 * 32 + 4 * 32)
        + (9 * 32 * 3 + 3)
    )  # decoder, reconstruction
    assert model.count_params() == expected == recipes.get("conv_autoencoder").params
    assert model.get_layer("embedding").output_shape == (None, 8, 8, 64)
    assert model.get_layer("reconstruction").activation.__name__ == "sigmoid"

    dense = recipes.conv_autoencoder(input_shape=(16, 16, 1), latent_dim=10, filters=(8, 16, 32))
    assert dense.output_shape == (None, 16, 16, 1)
    assert dense.get_layer("embedding").output_shape == (None, 10)
    encoder = encoder_of(dense)
    assert encoder.output_shape == (None, 10) and encoder.layers[-1].name == "embedding"
    headless = recipes.conv_autoencoder(input_shape=(16, 16, 1), latent_dim=10, filters=(8, 16, 32), include_top=False)
    assert [layer.name for layer in headless.layers] == [layer.name for layer in encoder.layers]
    pooled = recipes.conv_autoencoder(include_top=False, pooling="max")
    assert pooled.output_shape == (None, 64)


def test_autoencoder_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiples of 4"):
        recipes.conv_autoencoder(input_shape=(30, 30, 3))
    with pytest.raises(ValueError, match="at least 8"):
        recipes.conv_autoencoder(input_shape=(4, 4, 3), filters=(8, 8, 8))
    with pytest.raises(ValueError, match="latent_dim=0"):
        recipes.conv_autoencoder(latent_dim=0)
    with pytest.raises(ValueError, match="noise='blur'"):
        recipes.denoising_autoencoder(noise="blur")
    with pytest.raises(ValueError, match="noise_strength=1.5"):
        recipes.denoising_autoencoder(noise="masking", noise_strength=1.5)
    with pytest.raises(ValueError, match="no layer named 'embedding'"):
        encoder_of(recipes.lenet5())


def test_conv_autoencoder_trains_with_compile_and_fit(digits):
    import tf_keras

    x = digits[0][:512] / 255.0
    mean_image_mse = np.mean((x - x.mean(axis=0)) ** 2)  # what predicting the average digit costs
    model = recipes.conv_autoencoder(input_shape=(8, 8, 1), filters=(16, 32), latent_dim=16)
    model.compile(tf_keras.optimizers.Adam(3e-3), "mse")
    history = model.fit(x, x, batch_size=64, epochs=15, verbose=0)
    # training-mode loss: after 120 steps the batch norms' moving averages still lag behind
    assert history.history["loss"][-1] < 0.25 * mean_image_mse  # measured: 0.010 vs 0.072
    out = model.predict(x[:8], verbose=0)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize(
    "noise, layer_class",
    [("gaussian", "GaussianNoise"), ("masking", "RandomMasking"), ("salt_pepper", "SaltAndPepper")],
)
def test_denoising_noise_is_right_after_the_input_and_only_in_training(noise, layer_class):
    model = recipes.denoising_autoencoder(input_shape=(16, 16, 1), noise=noise, noise_strength=0.3)
    assert model.layers[1].name == "noise" and type(model.layers[1]).__name__ == layer_class
    x = np.random.default_rng(0).uniform(0.2, 0.8, (4, 16, 16, 1)).astype("float32")
    layer = model.get_layer("noise")
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x)
    corrupted = layer(x, training=True).numpy()
    changed = np.mean(corrupted != x)
    if noise == "gaussian":
        assert changed > 0.99 and np.std(corrupted - x) == pytest.approx(0.3, rel=0.1)
    else:
        assert changed == pytest.approx(0.3, abs=0.06)
        assert set(np.unique(corrupted[corrupted != x])) <= ({0.0} if noise == "masking" else {0.0, 1.0})
    # at inference it is the plain autoencoder with the same weights
    plain = recipes.conv_autoencoder(input_shape=(16, 16, 1))
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(model(x, training=False).numpy(), plain(x, training=False).numpy(), atol=1e-6)


def test_linear_autoencoder_learns_the_pca_subspace(digits):
    """Baldi and Hornik 1989: the MSE optimum of a linear autoencoder spans the top principal
    components. Digits (64-D, centered), latent 8: every principal angle is near zero."""
    import tf_keras
    from scipy.linalg import subspace_angles
    from sklearn.decomposition import PCA

    x = np.concatenate([digits[0], digits[1]]).reshape(-1, 64) / 255.0
    x = x - x.mean(axis=0)  # PCA's subspace is that of the centered data
    pca = PCA(8).fit(x)
    model = linear_autoencoder(64, 8)
    model.compile(tf_keras.optimizers.Adam(0.03), "mse")
    model.fit(x, x, batch_size=len(x), epochs=600, verbose=0)  # full batch: ~3 s
    decoder = model.get_layer("reconstruction").kernel.numpy()  # (8, 64): rows span the subspace
    angles = np.degrees(subspace_angles(decoder.T, pca.components_.T))
    assert angles.max() < 2.0, angles  # measured: 0.05 degrees at most over seeds 0-5
    # and its reconstruction error is PCA's, the best any rank-8 linear map can do
    pca_mse = np.mean((pca.inverse_transform(pca.transform(x)) - x) ** 2)
    assert model.evaluate(x, x, verbose=0) == pytest.approx(pca_mse, rel=0.01)
    assert encoder_of(model).output_shape == (None, 8)


# --- contrastive encoder -------------------------------------------------------------------------


def test_contrastive_encoder_is_backbone_embedding_and_projection_head():
    model = recipes.contrastive_encoder()
    recipe = recipes.get("contrastive_encoder")
    backbone = recipes.get("cifar_resnet20")
    headless_params = backbone.params - (64 * 10 + 10)  # without its 64 -> 10 classifier
    head = 64 * 64 + 4 * 64 + (64 * 128 + 128)  # hidden (no bias) + BN + projection
    assert model.count_params() == headless_params + head == recipe.params
    assert model.get_layer("embedding").output_shape == (None, 64)
    assert model.output_shape == (None, 128) and model.layers[-1].name == "projection"
    # the backbone's layers are in the same graph, not a nested model
    assert "stage3_block3_out" in [layer.name for layer in model.layers]
    # the registry's metadata is the default backbone's
    assert recipe.preprocessing == backbone.preprocessing and recipe.min_size == backbone.min_size
    assert recipe.layer_groups[: len(backbone.layer_groups)] == backbone.layer_groups
    encoder = encoder_of(model)
    headless = recipes.contrastive_encoder(include_top=False)
    assert encoder.output_shape == headless.output_shape == (None, 64)
    assert [layer.name for layer in headless.layers] == [layer.name for layer in encoder.layers]


def test_contrastive_encoder_with_another_backbone_trains_and_reloads_in_both_apis(tmp_path):
    import keras
    import tf_keras

    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    model = recipes.contrastive_encoder(
        input_shape=(32, 32, 1), backbone="lenet5", projection_dim=16, hidden_dim=32, pooling="max"
    )
    assert model.get_layer("embedding").output_shape == (None, 120)  # lenet5's C5
    assert model.get_layer("projection_hidden").output_shape == (None, 32)
    before = [w.copy() for w in model.get_weights()]
    model.compile(tf_keras.optimizers.SGD(0.1), "mse")
    model.fit(x, np.ones((8, 16), "float32"), epochs=1, verbose=0)
    assert not np.allclose(before[0], model.get_weights()[0])  # the backbone learns too

    k3 = recipes.contrastive_encoder(input_shape=(16, 16, 3), backbone="cifar_resnet20", api="keras3")
    images = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    k3.save(tmp_path / "simclr.keras")
    again = recipes.load_model(tmp_path / "simclr.keras", api="keras3")
    np.testing.assert_allclose(np.asarray(k3(images)), np.asarray(again(images)), atol=1e-6)
    keras.backend.clear_session()

    with pytest.raises(ValueError, match="backbone='conv_autoencoder' must be the name of a classification"):
        recipes.contrastive_encoder(backbone="conv_autoencoder")


def nt_xent_reference(z1, z2, t):
    """SimCLR eq. 1, literally: 2N vectors, each anchor's positive is its other view."""
    z = np.concatenate([z1, z2]).astype("float64")
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denominator = sum(np.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        total += -np.log(np.exp(z[i] @ z[j] / t) / denominator)
    return total / n2


@pytest.mark.parametrize("temperature", [0.5, 0.1, 1.0])
def test_nt_xent_matches_a_numpy_reference(temperature):
    rng = np.random.default_rng(7)
    z1, z2 = rng.normal(size=(6, 9)), rng.normal(size=(6, 9))
    loss = float(nt_xent_loss(z1, z2, temperature))
    assert loss == pytest.approx(nt_xent_reference(z1, z2, temperature), rel=1e-5)
    # matching views of mutually orthogonal vectors: the loss is lower than for random pairs
    eye = np.eye(6, 9) * 3.0
    assert float(nt_xent_loss(eye, eye * 2, temperature)) < loss
    with pytest.raises(ValueError, match="temperature=0"):
        nt_xent_loss(z1, z2, 0)
