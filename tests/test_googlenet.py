"""GoogLeNet: Table 1's filter counts and sizes, the parameter count against the paper's 6.8M, and
the auxiliary heads of section 5 (outputs, parameters, loss weights, one training step)."""

import numpy as np
import pytest

import recipes
from recipes.googlenet import INCEPTION, googlenet, googlenet_loss_weights

# Table 1 as printed: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj, and the output depth.
TABLE1 = {
    "3a": (64, 96, 128, 16, 32, 32, 256),
    "3b": (128, 128, 192, 32, 96, 64, 480),
    "4a": (192, 96, 208, 16, 48, 64, 512),
    "4b": (160, 112, 224, 24, 64, 64, 512),
    "4c": (128, 128, 256, 24, 64, 64, 512),
    "4d": (112, 144, 288, 32, 64, 64, 528),
    "4e": (256, 160, 320, 32, 128, 128, 832),
    "5a": (256, 160, 320, 32, 128, 128, 832),
    "5b": (384, 192, 384, 48, 128, 128, 1024),
}


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def table1_params(num_classes=1000):
    """The parameter count Table 1's filter counts imply (weights and biases)."""
    total = conv(7, 3, 64) + conv(1, 64, 64) + conv(3, 64, 192)
    cin = 192
    for n1, n3r, n3, n5r, n5, proj, out in TABLE1.values():
        total += conv(1, cin, n1) + conv(1, cin, n3r) + conv(3, n3r, n3) + conv(1, cin, n5r) + conv(5, n5r, n5)
        total += conv(1, cin, proj)
        cin = out
    return total + cin * num_classes + num_classes


def aux_params(cin, pooled_positions, num_classes=1000):
    return conv(1, cin, 128) + (128 * pooled_positions * 1024 + 1024) + (1024 * num_classes + num_classes)


def test_module_table_is_table1():
    assert {k: v for k, v in INCEPTION.items()} == {k: v[:6] for k, v in TABLE1.items()}
    for n1, _, n3, _, n5, proj, out in TABLE1.values():
        assert n1 + n3 + n5 + proj == out


def test_main_path_parameters_near_the_papers_6_8m():
    model = googlenet()
    count = model.count_params()
    assert count == table1_params() == recipes.get("googlenet").params == 6_998_552
    assert abs(count - 6.8e6) / 6.8e6 < 0.03
    # Table 1 leaves out the biases: one per filter
    biases = sum(int(np.prod(w.shape)) for w in model.weights if "bias" in w.name)
    assert biases == 64 + 64 + 192 + sum(sum(v[:6]) for v in TABLE1.values()) + 1000 == 8_280
    assert len(model.outputs) == 1 and model.output_names == ["predictions"]


def test_sizes_follow_table1():
    model = googlenet()
    expected = {
        "conv1_7x7_s2": (112, 112, 64),
        "pool1_3x3_s2": (56, 56, 64),
        "conv2_3x3": (56, 56, 192),
        "pool2_3x3_s2": (28, 28, 192),
        "pool3_3x3_s2": (14, 14, 480),
        "pool4_3x3_s2": (7, 7, 832),
        "pool5_7x7_s1": (1024,),
        "predictions": (1000,),
    }
    expected.update(
        {
            f"inception_{k}_output": ((28 if k[0] == "3" else 14 if k[0] == "4" else 7),) * 2 + (v[6],)
            for k, v in TABLE1.items()
        }
    )
    assert {name: model.get_layer(name).output_shape[1:] for name in expected} == expected
    assert model.get_layer("head_dropout").rate == 0.4
    assert sum(type(layer).__name__ == "LocalResponseNormalization" for layer in model.layers) == 2


def test_aux_heads_add_two_outputs_and_their_parameters():
    train = googlenet(aux_heads=True)
    assert train.output_names == ["predictions", "aux1", "aux2"]
    assert [tuple(o.shape[1:]) for o in train.outputs] == [(1000,)] * 3
    # 14x14 maps pooled 5x5/3 -> 4x4; 4a has 512 channels, 4d 528
    assert train.count_params() == table1_params() + aux_params(512, 16) + aux_params(528, 16) == 13_378_280
    assert train.get_layer("aux1_avg_pool").input.name.startswith("inception_4a_output")
    assert train.get_layer("aux2_avg_pool").input.name.startswith("inception_4d_output")
    assert train.get_layer("aux1_dropout").rate == 0.7
    assert googlenet_loss_weights(train) == {"predictions": 1.0, "aux1": 0.3, "aux2": 0.3}
    assert googlenet_loss_weights(googlenet(input_shape=(32, 32, 3), num_classes=3)) == {"predictions": 1.0}
    assert recipes.get("googlenet").options["aux_loss_weight"] == 0.3


def test_aux_head_arguments_are_checked():
    with pytest.raises(ValueError, match="aux_heads=True needs include_top=True"):
        googlenet(include_top=False, aux_heads=True)
    with pytest.raises(ValueError, match="at least 65"):
        googlenet(input_shape=(64, 64, 3), aux_heads=True)
    googlenet(input_shape=(64, 64, 3), num_classes=3)  # fine without the aux heads
    with pytest.raises(ValueError, match="has no 'predictions' output"):
        googlenet_loss_weights(googlenet(input_shape=(32, 32, 3), include_top=False, pooling="avg"))


def test_training_model_trains_one_step_with_weighted_aux_losses():
    import tf_keras

    model = googlenet(input_shape=(65, 65, 3), num_classes=5, aux_heads=True)
    weights = googlenet_loss_weights(model)
    losses = {name: "sparse_categorical_crossentropy" for name in weights}
    model.compile(optimizer=tf_keras.optimizers.SGD(0.01), loss=losses, loss_weights=weights)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 65, 65, 3)).astype("float32")
    y = rng.integers(0, 5, (4,))
    targets = {"predictions": y, "aux1": y, "aux2": y}
    total, main, aux1, aux2 = model.evaluate(x, targets, verbose=0)
    assert total == pytest.approx(main + 0.3 * aux1 + 0.3 * aux2, rel=1e-5)
    before = model.get_layer("aux1_fc").kernel.numpy().copy()
    loss = model.train_on_batch(x, targets)
    assert np.all(np.isfinite(loss))
    assert not np.allclose(before, model.get_layer("aux1_fc").kernel.numpy())


def test_training_weights_load_into_the_inference_model(tmp_path):
    train = googlenet(input_shape=(65, 65, 3), num_classes=4, aux_heads=True)
    path = tmp_path / "train.keras"
    train.save(path)
    infer = googlenet(input_shape=(65, 65, 3), num_classes=4, weights=str(path))
    assert len(infer.outputs) == 1
    x = np.random.default_rng(0).uniform(0, 255, (2, 65, 65, 3)).astype("float32")
    np.testing.assert_allclose(infer(x).numpy(), train(x)[0].numpy(), rtol=0, atol=1e-6)


def test_registry_metadata():
    recipe = recipes.get("googlenet")
    assert recipe.group_names() == ["stem", "inception_3", "inception_4", "inception_5"]
    assert recipe.head_start == "pool5_7x7_s1" and recipe.preprocessing == "caffe"
    assert recipe.paper_params == 6.8e6
