"""`ktool export`: every mode exports a small trained model, the file is run, and it must compute what
the Keras model computed, within a tolerance that fits the mode."""

import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import recipes
from ktoolkit.cli import main
from ktoolkit.export import export
from tflite_export import open_model
from tflite_export.metadata import read_metadata

README = (Path(__file__).parent.parent / "README.md").read_text()

# Minimum top-1 agreement of a file with the Keras model it was converted from, on 180 held-out digits.
# Float files compute the same function; quantized ones may flip an image near a decision boundary.
AGREEMENT = {
    "float32": 1.0,
    "float16": 0.99,
    "dynamic": 0.97,
    "int8": 0.95,
    "int16x8": 0.98,
    "qat": 0.95,
    "prune": 0.99,
    "cluster": 0.99,
    "prune-qat": 0.95,
    "cluster-qat": 0.95,
    "prune-cluster-int8": 0.95,
}


@pytest.fixture(scope="session")
def run(digits_npz, tmp_path_factory):
    """LeNet-5 trained for 3 epochs on the real digits (about 96% on the held-out split)."""
    from ktoolkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("export_runs") / "lenet"
    train(TrainConfig(recipe="lenet5", data=str(digits_npz), out=str(out), epochs=3, lr=3e-3, augment="none"))
    return out


@pytest.fixture(scope="session")
def heldout(run):
    """The run's held-out test images and labels (the split export verifies on)."""
    from ktoolkit.export.source import load_source

    source = load_source(run)
    batches = list(source.dataset("test"))
    return np.concatenate([np.asarray(x) for x, _ in batches]), np.concatenate([np.asarray(y) for _, y in batches])


@pytest.fixture(scope="session")
def post_training(run, tmp_path_factory):
    return export(run, mode="float32", compare="float16,dynamic,int8,int16x8", out=tmp_path_factory.mktemp("ptq"))


@pytest.fixture(scope="session")
def onnx_export(run, tmp_path_factory):
    return export(run, mode="float32", compare="int8", format="onnx", out=tmp_path_factory.mktemp("onnx"))


def run_tflite(path, images):
    """Runs a .tflite file with LiteRT directly (not through tflite_export), one image at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    probs = []
    for image in images:
        x = image[None]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            x = np.clip(
                np.round(x / scale + zero),
                0 if inp["dtype"] == np.uint8 else -128,
                255 if inp["dtype"] == np.uint8 else 127,
            )
        interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"]).astype(np.float32)
        if out["dtype"] != np.float32:
            y = (y - out["quantization"][1]) * out["quantization"][0]
        probs.append(y[0])
    return np.array(probs)


def kernels(path):
    """The constant weight matrices and convolution kernels stored in a .tflite file (rank 2 or 4)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    found = []
    for t in interpreter.get_tensor_details():
        if len(t["shape"]) in (2, 4) and -1 not in t["shape_signature"] and t["dtype"] in (np.float32, np.int8):
            found.append(interpreter.get_tensor(t["index"]))
    return found


def test_post_training_modes_compute_what_keras_computed(post_training, run, heldout):
    images, labels = heldout
    keras = recipes.load_model(Path(run) / "best.keras")
    keras_top = np.argmax(keras.predict(images, verbose=0), -1)
    files = {f.mode: f for f in post_training.files}
    assert list(files) == ["float32", "float16", "dynamic", "int8", "int16x8"]
    for mode, f in files.items():
        assert f.path.exists() and f.passed, mode
        top = np.argmax(run_tflite(f.path, images), -1)
        assert np.mean(top == keras_top) >= AGREEMENT[mode], mode
        assert f.verification.agreement >= AGREEMENT[mode], mode
        assert f.verification.accuracy == pytest.approx(np.mean(top == labels)), mode
        assert f.latency_ms > 0 and f.ops["ops"], mode
    assert files["float32"].verification.max_probability_change < 1e-5
    sizes = {mode: f.size_bytes for mode, f in files.items()}
    assert sizes["float32"] > sizes["float16"] > sizes["int8"]
    report = post_training.report
    md = report["md"].read_text()
    assert "All files are within the budget" in md and all(f.path.name in md for f in files.values())
    assert "GPU delegate" in md and "NNAPI" in md
    data = json.loads(report["json"].read_text())
    assert [e["mode"] for e in data["exports"]] == list(files) and data["source"]["images"] == len(labels) == 180
    assert report["png"].stat().st_size > 10_000
    assert (post_training.folder / "labels.txt").read_text().split() == [str(i) for i in range(10)]


def test_int8_files_are_really_integer(run, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    result = export(run, mode="int8", int8_io=True, out=tmp_path)
    interpreter = Interpreter(model_path=str(result.files[0].path))
    tensors = interpreter.get_tensor_details()
    types = {np.dtype(t["dtype"]).name for t in tensors}
    assert types <= {"int8", "uint8", "int32"}, types  # int32: biases and shapes; no float anywhere
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert interpreter.get_output_details()[0]["dtype"] == np.uint8
    # pixel bytes as they are: the input's quantization is LeNet-5's "unit" normalization (issue 15: the
    # normalization folded into the input tensor, as Google's files do, instead of an int8 MUL in the graph)
    assert interpreter.get_input_details()[0]["quantization"] == pytest.approx((1 / 255, 0))
    assert sum(np.dtype(t["dtype"]) == np.int8 and len(t["shape"]) == 4 for t in tensors) >= 3  # conv kernels
    assert result.files[0].verification.agreement >= AGREEMENT["int8"]


def test_shared_quantization_vectors_make_the_file_smaller_and_change_nothing():
    """compact() stores each distinct zero-point/scale/shape vector once; the file runs the same."""
    import flatbuffers
    import tf_keras
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    from tflite_export.convert import to_tflite

    inputs = tf_keras.Input((16, 16, 3))
    x = inputs
    for filters in (32, 32, 64, 64):
        x = tf_keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    outputs = tf_keras.layers.Dense(4, activation="softmax")(tf_keras.layers.GlobalAveragePooling2D()(x))
    images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    shared = to_tflite(tf_keras.Model(inputs, outputs), "int8", representative=images)
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(shared, 0))
    builder = flatbuffers.Builder(len(shared))  # the same model, every vector written out again
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    plain = bytes(builder.Output())
    zero_points = sum(
        len(t.quantization.zeroPoint)
        for t in model.subgraphs[0].tensors
        if t.quantization is not None and t.quantization.zeroPoint is not None
    )
    assert len(plain) - len(shared) >= 8 * (zero_points - 64 - 64)  # all but one zero vector per length gone

    def run_file(content):
        interpreter = Interpreter(model_content=content)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images[:1])
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    np.testing.assert_array_equal(run_file(shared), run_file(plain))


def test_metadata_reads_back_the_labels_and_normalization(post_training, run):
    for f in post_training.files:
        content = f.path.read_bytes()
        meta = read_metadata(content)
        assert meta["files"]["labels.txt"].split() == json.loads((Path(run) / "classes.json").read_text())
        assert meta["input"]["mean"] == [0.0] and meta["input"]["std"] == [1.0]  # one channel; it normalizes inside
        assert meta["input"]["color_space"] == "GRAYSCALE" and meta["input"]["min"] == [0.0]
        assert meta["input"]["max"] == [255.0]
        assert "'unit' normalization" in meta["input"]["description"]
        assert meta["output"]["associated_files"][0]["name"] == "labels.txt"
        assert meta["output"]["associated_files"][0]["type"] == 2  # TENSOR_AXIS_LABELS
        assert meta["name"] == "lenet5" and meta["min_parser_version"] == "1.0.0"
        with zipfile.ZipFile(f.path) as archive:
            assert archive.getinfo("labels.txt").compress_type == zipfile.ZIP_STORED  # mapped in place on Android
        assert open_model(f.path).labels == [str(i) for i in range(10)]


def test_fine_tuned_modes_agree_and_are_sparse_or_clustered(run, tmp_path):
    result = export(
        run,
        mode="qat",
        compare="prune,cluster,prune-qat,cluster-qat,prune-cluster-int8",
        epochs=1,
        steps_per_epoch=8,
        sparsity=0.8,
        clusters=16,
        max_accuracy_drop=100,
        out=tmp_path,
    )
    for f in result.files:
        assert f.verification.converted_agreement >= AGREEMENT[f.mode], f.mode
        weights = kernels(f.path)
        assert len(weights) == 5, f.mode  # c1, c3, c5, f6, predictions
        if "prune" in f.mode:
            zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
            assert zeros >= 0.79, (f.mode, zeros)
        if "cluster" in f.mode:
            most = max(len(np.unique(channel)) for w in weights for channel in w.reshape(len(w), -1))
            assert most <= 16, (f.mode, most)
        if f.mode != "prune" and f.mode != "cluster":
            assert all(w.dtype == np.int8 for w in weights), f.mode


def test_over_the_budget_the_command_fails_and_marks_the_file(run, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--model",
            str(run),
            "--mode",
            "prune",
            "--sparsity",
            "0.97",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1, result.output
    assert (tmp_path / "lenet5_32x32x1_prune.FAILED.tflite").exists()
    assert not (tmp_path / "lenet5_32x32x1_prune.tflite").exists()
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["exports"][0]["passed"] is False and report["exports"][0]["verification"]["accuracy_drop"] > 1
    assert "FAILED" in (tmp_path / "export_report.md").read_text()
    # the images whose prediction the file changed, to look at (issue 17)
    assert (tmp_path / "export_changed.png").stat().st_size > 5_000
    assert "export_changed.png" in (tmp_path / "export_report.md").read_text()


def test_onnx_and_saved_model_formats(run, heldout, onnx_export, tmp_path):
    import onnx
    import onnxruntime

    images, _ = heldout
    keras_probs = recipes.load_model(Path(run) / "best.keras").predict(images, verbose=0)
    result = onnx_export
    for f in result.files:
        session = onnxruntime.InferenceSession(str(f.path), providers=["CPUExecutionProvider"])
        probs = session.run(None, {"input": images})[0]
        assert np.mean(probs.argmax(-1) == keras_probs.argmax(-1)) >= AGREEMENT[f.mode], f.mode
        assert json.loads(session.get_modelmeta().custom_metadata_map["labels"]) == [str(i) for i in range(10)]
    zero_points = [
        onnx.numpy_helper.to_array(t)
        for t in onnx.load(str(result.files[1].path)).graph.initializer
        if t.name.endswith("zero_point")
    ]
    assert zero_points and all((z == 0).all() for z in zero_points)  # symmetric: what TensorRT's INT8 takes
    saved = export(run, format="saved_model", out=tmp_path).files[0]
    assert saved.path.name == "lenet5_32x32x1_float32.saved_model" and (saved.path / "saved_model.pb").exists()
    assert saved.verification.max_probability_change < 1e-5
    with pytest.raises(ValueError, match="float16.*tflite"):
        export(run, mode="float16", format="onnx", out=tmp_path)


def test_mixed_precision_models_are_rebuilt_in_float32():
    import tf_keras

    from tflite_export.convert import to_tflite
    from tflite_export.prepare import prepare_model

    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = recipes.lenet5(input_shape=(32, 32, 1), num_classes=10)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert mixed.get_layer("c1").dtype_policy.name == "mixed_bfloat16"
    model = prepare_model(mixed)
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), mixed.get_weights()))
    content = to_tflite(model)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    assert {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()} <= {"float32", "int32"}


def test_batch_normalization_is_folded_before_quantization_aware_training():
    import tf_keras

    from tflite_export.compress import fold_batch_norm

    layers = tf_keras.layers
    inputs = tf_keras.Input((8, 8, 3))
    x = layers.ReLU(6.0)(layers.BatchNormalization()(layers.Conv2D(4, 3, use_bias=False)(inputs)))
    y = layers.BatchNormalization()(layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x))
    outputs = layers.Dense(2, activation="softmax")(layers.GlobalAveragePooling2D()(layers.Add()([y, y])))
    model = tf_keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for bn in (layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)):  # trained statistics
        bn.set_weights([rng.uniform(0.5, 2, w.shape).astype("float32") for w in bn.get_weights()])
    images = rng.uniform(0, 1, (4, 8, 8, 3)).astype("float32")
    folded = fold_batch_norm(model)
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in folded.layers)
    assert np.abs(folded.predict(images, verbose=0) - model.predict(images, verbose=0)).max() < 1e-5


def test_auxiliary_heads_are_dropped():
    """GoogLeNet's training build has outputs predictions, aux1, aux2; the exported file has one."""
    import tf_keras

    from tflite_export.prepare import prepare_model

    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Flatten()(tf_keras.layers.Conv2D(4, 3)(inputs))
    aux = tf_keras.layers.Dense(3, activation="softmax", name="aux1")(x)
    main_head = tf_keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = prepare_model(tf_keras.Model(inputs, [main_head, aux], name="googlenet"))
    assert model.output_names == ["predictions"] and model.name == "googlenet"


def test_an_unconvertible_layer_is_named_with_the_fix():
    import tensorflow as tf
    import tf_keras

    from tflite_export.convert import ConversionError, to_tflite

    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3)(inputs)
    x = tf_keras.layers.Lambda(lambda t: tf.linalg.inv(t[..., :2, :2] + tf.eye(2)), name="matrix_inverse")(x)
    outputs = tf_keras.layers.Dense(2, activation="softmax")(tf_keras.layers.Flatten()(x))
    with pytest.raises(ConversionError, match=r"MatrixInverse.*layer 'matrix_inverse' \(Lambda\).*Rewrite that layer"):
        to_tflite(tf_keras.Model(inputs, outputs))


def nested_transfer_model(base):
    """A transfer model the way transfer learning builds one: pixels -> preprocessing -> base (one layer) -> head."""
    import tf_keras

    from recipes.layers import custom_layers

    inputs = tf_keras.Input(base.input_shape[1:], name="input")
    x = custom_layers("tf_keras").ImagePreprocessing("tf", name="preprocessing")(inputs)
    outputs = tf_keras.layers.Dense(10, activation="softmax", name="predictions")(base(x))
    return tf_keras.Model(inputs, outputs, name="transfer")


def test_a_keras_applications_mobilenet_nested_in_a_transfer_model_converts():
    import tf_keras

    from tflite_export.compress import flatten
    from tflite_export.convert import to_tflite

    base = tf_keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, include_top=False, pooling="avg"
    )
    model = nested_transfer_model(base)
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)
    flat = flatten(model)  # what pruning, clustering and QAT work on
    assert not any(isinstance(layer, tf_keras.Model) for layer in flat.layers) and len(flat.layers) > 150
    assert np.abs(flat.predict(images, verbose=0) - expected).max() < 1e-6
    runner = open_model((to_tflite(model), "tflite"))
    assert np.abs(runner.predict(images) - expected).max() < 1e-5


def test_a_nested_base_is_exported_and_compressed_layer_by_layer(run, digits_npz, tmp_path):
    """The trained LeNet-5 up to f6 as one layer (a frozen feature extractor) of a transfer model with a new
    head: exported as float32 and int8, and pruned, where pruning must reach the layers inside the base."""
    import tf_keras

    from ktoolkit.export.source import load_source
    from ktoolkit.io import save_model
    from tflite_export.compress import compress

    lenet = recipes.load_model(Path(run) / "best.keras")
    base = tf_keras.Model(lenet.inputs, lenet.get_layer("f6").output, name="base")
    base.trainable = False
    inputs = tf_keras.Input((32, 32, 1), name="input")
    model = tf_keras.Model(
        inputs, tf_keras.layers.Dense(10, activation="softmax", name="predictions")(base(inputs)), name="transfer"
    )
    path = tmp_path / "model.keras"
    data = str(digits_npz)
    source = load_source(save_model(model, path), data=data)
    model.compile(tf_keras.optimizers.Adam(1e-2), "categorical_crossentropy")
    model.fit(source.dataset("train", training=True, one_hot=True), epochs=2, verbose=0)
    base.trainable = True  # compression fine-tunes all of it
    save_model(model, path)

    result = export(path, data=data, compare="int8", out=tmp_path / "export")
    files = {f.mode: f for f in result.files}
    assert files["float32"].verification.keras_accuracy > 0.8  # a working classifier: agreement means something
    assert files["float32"].verification.max_probability_change < 1e-5
    assert files["int8"].verification.agreement >= AGREEMENT["int8"]
    assert read_metadata(files["int8"].path.read_bytes())["input"]["description"].endswith(
        "'unit' normalization itself"
    )
    pruned = compress(model, ["prune"], source, epochs=1, steps_per_epoch=2)
    assert np.mean(pruned.get_layer("c5").kernel.numpy() == 0) >= 0.79  # inside the nested base


def test_readme_export_commands_run(run, digits_folder, tmp_path):
    """The README's export section, on the trained LeNet-5 (for runs/mine) and a digit PNG, fewer epochs."""
    section = README.split("## Exporting to a phone or a Jetson", 1)[1].split("\n## ", 1)[0]
    lines = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", section, re.S)
        for line in block.splitlines()
        if line.strip().startswith("ktool")
    ]
    assert len(lines) >= 5
    image = next(digits_folder.glob("digit_7/*.png"))
    for line in lines:
        line = (
            line.replace("runs/mine", str(run))
            .replace("resnet18", "lenet5")
            .replace("224x224x3", "32x32x1")
            .replace("mydir/cat/001.jpg", str(image))
            .replace("qat", "qat --epochs 1")
        )
        result = CliRunner().invoke(main, shlex.split(line)[1:])
        assert result.exit_code == 0, (line, result.output)
        if line.startswith("ktool predict"):
            assert result.output.startswith(f"{image}: ")
        if line.startswith("ktool benchmark"):
            assert len(re.findall(r"^\s+[124]\s+\d+\.\d+", result.output, re.M)) == 3
    exported = Path(run) / "export"
    names = {"lenet5_32x32x1_uint8io_int8.tflite", "lenet5_32x32x1_int8.tflite", "lenet5_32x32x1_int8.onnx"}
    assert names | {"lenet5_32x32x1_qat.tflite", "export_report.md"} <= {p.name for p in exported.iterdir()}


def test_predict_and_benchmark_run_exported_files_without_tensorflow(post_training, onnx_export, digits_folder):
    """What a Jetson or a phone dev board with only ai-edge-litert or onnxruntime can run."""
    tflite_file = next(f.path for f in post_training.files if f.mode == "int8")
    image = next(digits_folder.glob("digit_3/*.png"))
    block = "import sys; sys.modules['tensorflow'] = None; from ktoolkit.cli import main; sys.exit(main())"
    for model in (tflite_file, onnx_export.files[1].path):
        for args in (
            ["predict", "--model", str(model), str(image), "--top-k", "2"],
            ["benchmark", str(model), "--threads", "1", "--runs", "5"],
        ):
            done = subprocess.run(
                [sys.executable, "-c", block, *args], capture_output=True, text=True, timeout=120, check=False
            )
            assert done.returncode == 0, done.stderr
            if args[0] == "predict":
                assert re.match(rf"{re.escape(str(image))}: \d \d+\.\d%, \d \d+\.\d%$", done.stdout.strip())
