"""Model and weights files from strangers: nothing in them runs code, and a file that does not fit the
model is an error naming the first layer that does not match.

The hostile files are made by hand (zipfile + json, h5py) from a real file that tf_keras wrote, the
way an attacker would edit one."""

import json
import time
import zipfile

import h5py
import numpy as np
import pytest

import recipes
from recipes.saving import UnsafeModelError, check_config


def tiny_model():
    import tf_keras

    inputs = tf_keras.Input((2,), name="x")
    return tf_keras.Model(inputs, tf_keras.layers.Dense(1, name="dense")(inputs), name="tiny")


def archive_parts(tmp_path):
    """The members of a real .keras file (a 2 -> 1 Dense model) and its parsed config."""
    path = tmp_path / "real.keras"
    tiny_model().save(path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    return members, json.loads(members["config.json"])


def write_archive(path, members, config=None):
    if config is not None:
        members = {**members, "config.json": json.dumps(config).encode()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def dense_layer(config):
    return next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")


def as_lambda(layer, function, arguments=None, function_type="function", module=None):
    """Turns the Dense layer dict into a Lambda layer of the same name calling ``function``."""
    layer.update(class_name="Lambda", module="keras.layers", registered_name=None)
    layer["config"] = {
        "name": "lambda_1",
        "trainable": True,
        "dtype": "float32",
        "function": function,
        "function_type": function_type,
        "module": module,
        "output_shape": None,
        "output_shape_type": "raw",
        "output_shape_module": None,
        "arguments": arguments or {},
    }
    layer["name"] = "lambda_1"


def appears_within(path, seconds=1.5):
    """pydoc.pipepager starts its shell without waiting for it: give the command time to run."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


def module_function(module, name):
    return {"module": module, "class_name": "function", "config": name, "registered_name": name}


@pytest.mark.parametrize(
    "function, arguments",
    [
        (module_function("pydoc", "pipepager"), {"cmd": "touch {marker}"}),
        (module_function("os", "system"), {}),
        (module_function("builtins", "exec"), {}),
        (module_function("subprocess", "getoutput"), {}),
    ],
    ids=["pydoc.pipepager", "os.system", "builtins.exec", "subprocess.getoutput"],
)
def test_a_lambda_naming_a_module_function_is_refused_before_anything_runs(tmp_path, function, arguments):
    marker = tmp_path / "MARKER"
    members, config = archive_parts(tmp_path)
    as_lambda(dense_layer(config), function, {k: v.format(marker=marker) for k, v in arguments.items()})
    path = write_archive(tmp_path / "model.keras", members, config)
    with pytest.raises(UnsafeModelError, match=r"model\.keras: layer 'lambda_1' is a Lambda layer \(arbitrary code\)"):
        recipes.load_model(path)
    assert not appears_within(marker), "the file ran a shell command"
    # every path that opens a model goes through the same check: a weights source, a run's base
    with pytest.raises(UnsafeModelError, match="lambda_1"):
        recipes.lenet5(weights=str(path))
    assert not appears_within(marker, 0.2)


def test_a_lambda_with_python_bytecode_is_refused(tmp_path):
    members, config = archive_parts(tmp_path)
    as_lambda(dense_layer(config), ["4wEAAAAAAAAA", None, None], function_type="lambda", module="__main__")
    with pytest.raises(UnsafeModelError, match="'lambda_1' is a Lambda layer"):
        recipes.load_model(write_archive(tmp_path / "bytecode.keras", members, config))


def _function_activation(layer):
    layer["config"]["activation"] = module_function("os", "system")


def _unregistered_class(layer):
    layer.update(class_name="Evil", module="evil_package.layers", registered_name="evil>Evil")


def _innocent_class_from_another_module(layer):
    layer["module"] = "subprocess"


def _function_type_key(layer):
    layer["config"]["function_type"] = "lambda"


def _python_lambda_object(layer):
    layer["config"]["kernel_initializer"] = {"class_name": "__lambda__", "config": {"value": "4wEAAAAA"}}


def _made_up_activation(layer):
    layer["config"]["activation"] = "get_file"


def _tf_op_with_side_effects(layer):
    layer.update(class_name="TFOpLambda", module="tf_keras.src.layers.core.tf_op_layer", registered_name="TFOpLambda")
    layer["config"] = {"name": "tf.io.write_file", "trainable": True, "dtype": "float32", "function": "io.write_file"}


@pytest.mark.parametrize(
    "edit, message",
    [
        (_function_activation, r"layer 'dense' uses a function from module 'os' \(os\.system\)"),
        (_unregistered_class, r"layer 'dense' is a custom class 'evil>Evil' \(module 'evil_package\.layers'\)"),
        (_innocent_class_from_another_module, r"layer 'dense' names module 'subprocess' for class 'Dense'"),
        (_function_type_key, r"layer 'dense' has function_type='lambda'"),
        (_python_lambda_object, r"layer 'dense' holds a Python lambda"),
        (_made_up_activation, r"layer 'dense' has activation='get_file', which is not a Keras activation"),
        (_tf_op_with_side_effects, r"layer 'tf\.io\.write_file' calls the TensorFlow function 'io\.write_file'"),
    ],
    ids=[
        "function_activation",
        "unregistered_class",
        "other_module",
        "function_type",
        "python_lambda",
        "made_up_activation",
        "tf_op_with_side_effects",
    ],
)
def test_anything_that_could_import_or_call_code_is_refused(tmp_path, edit, message):
    members, config = archive_parts(tmp_path)
    edit(dense_layer(config))
    path = write_archive(tmp_path / "edited.keras", members, config)
    with pytest.raises(UnsafeModelError, match=r"edited\.keras: " + message + ".*refuses to load it"):
        recipes.load_model(path)


def test_keras3_configs_are_checked_the_same_way(tmp_path):
    _, config = archive_parts(tmp_path)
    as_lambda(dense_layer(config), module_function("pydoc", "pipepager"))
    with pytest.raises(UnsafeModelError, match="'lambda_1' is a Lambda layer"):
        check_config(config, "k3.keras", api="keras3")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x01 random bytes " * 50, r"junk\.keras.*not a \.keras model archive"),
        (b"PK\x03\x04 not really a zip", r"junk\.keras.*written completely"),
    ],
)
def test_bytes_that_are_no_archive_name_the_file(tmp_path, content, message):
    path = tmp_path / "junk.keras"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        recipes.load_model(path)


def test_a_truncated_archive_and_one_without_a_config_name_the_file(tmp_path):
    members, _ = archive_parts(tmp_path)
    whole = write_archive(tmp_path / "whole.keras", members).read_bytes()
    (tmp_path / "half.keras").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"half\.keras"):
        recipes.load_model(tmp_path / "half.keras")
    no_config = write_archive(tmp_path / "noconfig.keras", {k: v for k, v in members.items() if k != "config.json"})
    with pytest.raises(ValueError, match=r"noconfig\.keras: the archive has no config\.json"):
        recipes.load_model(no_config)


@pytest.mark.parametrize("member", ["../evil", "assets/../../evil", "/tmp/evil"])
def test_a_member_named_outside_the_archive_is_refused(tmp_path, member):
    members, _ = archive_parts(tmp_path)
    inside = tmp_path / "inside"
    inside.mkdir()
    path = write_archive(inside / "model.keras", {**members, member: b"overwritten"})
    with pytest.raises(UnsafeModelError, match=r"model\.keras: archive member .*evil.* points outside the archive"):
        recipes.load_model(path)
    assert not (tmp_path / "evil").exists() and not (inside / "evil").exists()


def test_zip_bombs_are_refused_by_their_declared_sizes(tmp_path, monkeypatch):
    from recipes import saving

    members, config = archive_parts(tmp_path)
    path = write_archive(tmp_path / "model.keras", members, config)
    monkeypatch.setattr(saving, "MAX_CONFIG_BYTES", 100)
    with pytest.raises(UnsafeModelError, match=r"model\.keras: config\.json unpacks to [\d,]+ bytes"):
        recipes.load_model(path)
    monkeypatch.setattr(saving, "MAX_CONFIG_BYTES", 64 << 20)
    monkeypatch.setattr(saving, "MAX_MEMBERS", 3)
    many = write_archive(tmp_path / "many.keras", {**members, "assets/a": b"", "assets/b": b""})
    with pytest.raises(UnsafeModelError, match=r"many\.keras: the archive has 5 members"):
        recipes.load_model(many)


def test_another_layout_passes_the_same_check_first(tmp_path):
    """Archives with assets go to Keras's own loader: only after the config passed."""
    marker = tmp_path / "MARKER"
    members, config = archive_parts(tmp_path)
    as_lambda(dense_layer(config), module_function("pydoc", "pipepager"), {"cmd": f"touch {marker}"})
    path = write_archive(tmp_path / "assets.keras", {**members, "assets/vocabulary.txt": b"a\nb\n"}, config)
    with pytest.raises(UnsafeModelError, match="'lambda_1' is a Lambda layer"):
        recipes.load_model(path)
    assert not appears_within(marker)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_a_full_model_h5_is_checked_before_tf_keras_rebuilds_it(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "full.h5"
    tiny_model().save(path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        as_lambda(dense_layer(config), module_function("pydoc", "pipepager"), {"cmd": f"touch {marker}"})
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(UnsafeModelError, match=r"full\.h5: layer 'lambda_1' is a Lambda layer"):
        recipes.load_model(path)
    assert not appears_within(marker)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_a_full_model_h5_of_ktoolkit_loads(tmp_path):
    model = recipes.lenet5(num_classes=3)
    model.save(tmp_path / "lenet.h5")
    again = recipes.load_model(tmp_path / "lenet.h5")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), again(x).numpy(), atol=1e-6)


def test_random_bytes_named_h5_are_one_error(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"weights\.h5.*is not an HDF5 file"):
        recipes.load_model(path)
    with pytest.raises(ValueError, match=r"weights\.h5.*is not an HDF5 file"):
        recipes.lenet5(weights=str(path))


def test_weights_of_another_architecture_name_the_first_mismatch(tmp_path):
    path = tmp_path / "mlp.h5"
    recipes.mlp(input_shape=(32, 32, 1), num_classes=10).save_weights(path)
    with pytest.raises(
        ValueError,
        match=r"mlp\.h5.*does not fit model 'lenet5': layer 'c1' expects weights of "
        r"shapes \[\(5, 5, 1, 6\), \(6,\)\].*same configuration",
    ):
        recipes.lenet5(weights=str(path))


def test_a_file_sharing_no_layer_is_an_error_not_random_features(tmp_path):
    """What loading by name used to do silently: a file whose layer names match nothing loaded nothing."""
    from ktoolkit.transfer.bases import load_base

    path = tmp_path / "other.h5"
    recipes.get("vgg_a").build(input_shape=(32, 32, 3), include_top=False).save_weights(path)
    with pytest.raises(ValueError, match=r"--weights .*other\.h5: the file does not fit resnet18 \(layer "):
        load_base("resnet18", weights=str(path), image_size=(32, 32))


def test_a_top_missing_from_the_file_is_named_and_an_extra_top_is_fine(tmp_path):
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    full = recipes.lenet5(num_classes=3)
    full.save_weights(tmp_path / "full.h5")
    headless = recipes.lenet5(include_top=False, weights=str(tmp_path / "full.h5"))  # the top is extra: by name
    for layer in headless.layers:
        for a, b in zip(layer.get_weights(), full.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    headless.save_weights(tmp_path / "notop.h5")
    with pytest.raises(ValueError, match=r"notop\.h5.*layer 'f6' has no weights in the file"):
        recipes.lenet5(num_classes=3, weights=str(tmp_path / "notop.h5"))
    again = recipes.lenet5(include_top=False, weights=str(tmp_path / "notop.h5"))
    np.testing.assert_array_equal(headless(x).numpy(), again(x).numpy())


def test_a_keras_file_of_another_architecture_is_an_error(tmp_path):
    recipes.mlp(input_shape=(32, 32, 1), num_classes=10).save(tmp_path / "mlp.keras")
    with pytest.raises(ValueError, match=r"mlp\.keras.*layer 'c1' has no weights in the file"):
        recipes.lenet5(weights=str(tmp_path / "mlp.keras"))


def _legacy_file_for_c1(path, shape, **options):
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"c1"])
        group = f.create_group("c1")
        group.attrs["weight_names"] = np.array([b"c1/kernel:0"])
        group.create_dataset("c1/kernel:0", shape=shape, dtype="float32", **options)
    return path


def test_weights_files_that_would_take_unbounded_memory_or_other_files_are_refused(tmp_path):
    # 4 TB declared, nothing stored: reading it would try to allocate all of it
    bomb = _legacy_file_for_c1(tmp_path / "bomb.h5", (10**6, 10**6), chunks=(1, 1024), compression="gzip")
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(
        UnsafeModelError,
        match=r"bomb\.h5.* declares dataset 'c1/c1/kernel:0' of shape "
        r"\(1000000, 1000000\)",
    ):
        recipes.lenet5(weights=str(bomb))
    (tmp_path / "secret.h5").write_bytes(b"")
    with h5py.File(tmp_path / "linked.h5", "w") as f:
        f.attrs["layer_names"] = np.array([b"c1"])
        f["c1"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/")
    with pytest.raises(UnsafeModelError, match=r"linked\.h5.* links 'c1' to another file"):
        recipes.lenet5(weights=str(tmp_path / "linked.h5"))


def test_a_mobilenet_v2_saved_by_tf_keras_loads(tmp_path):
    import tf_keras

    model = tf_keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=3)
    model.save(tmp_path / "mobilenet.keras")
    again = recipes.load_model(tmp_path / "mobilenet.keras")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), again(x).numpy(), atol=1e-5)


def test_official_style_weight_files_load_into_a_keras_applications_base(tmp_path):
    """The keras.applications no-top file loads in order; the file with the top loads by name."""
    import tf_keras

    from ktoolkit.transfer.bases import load_base

    source = tf_keras.applications.MobileNetV2(weights=None, include_top=True, input_shape=(32, 32, 3), classes=4)
    source.save_weights(tmp_path / "mobilenet_v2_full.h5")
    notop = tf_keras.Model(source.input, source.get_layer("out_relu").output)
    notop.save_weights(tmp_path / "mobilenet_v2_notop.h5")
    for file in ("mobilenet_v2_notop.h5", "mobilenet_v2_full.h5"):
        base = load_base("mobilenet_v2", weights=str(tmp_path / file), image_size=(32, 32))
        for name in ("Conv1", "block_16_project_BN", "Conv_1"):
            for a, b in zip(base.model.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
                np.testing.assert_array_equal(a, b)
