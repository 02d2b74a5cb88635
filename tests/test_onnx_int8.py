"""int8 ONNX for TensorRT: what the files are made of (symmetric int8 QDQ, float input, normalization,
biases and softmax), that they compute what Keras computed, and quantization-aware runs written as ONNX.

The graph checks read the file with the onnx package itself, not with ktoolkit's own checker."""

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from tflite_export.modes import check_format, get_mode
from tflite_export.onnx_export import grid_scales, qat_to_qdq, quantize_int8, to_onnx

# Minimum top-1 agreement with the Keras model on the 360 held-out digits (test and validation splits).
# Measured (onnxruntime 1.31, 200 calibration images): 0.997 percentile, 0.997 entropy, 1.000 min/max,
# and 0.997 for the previous symmetric-input min/max file: LeNet's tanh activations are bounded, so the
# methods differ in the probabilities (mean change 0.00017 against 0.00084 before), not in top-1. 0.98
# leaves room for 7 of 360 images near a decision boundary to flip with 48 calibration images.
AGREEMENT = 0.98
CALIBRATION_IMAGES = 48


@pytest.fixture(scope="module")
def run(digits_npz, tmp_path_factory):
    """LeNet-5 (32x32, 'unit' normalization inside) trained for 3 epochs on the real digits."""
    from ktoolkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("onnx_int8_runs") / "lenet"
    train(TrainConfig(recipe="lenet5", data=str(digits_npz), out=str(out), epochs=3, lr=3e-3, augment="none"))
    return out


@pytest.fixture(scope="module")
def source(run):
    from ktoolkit.export.source import load_source

    return load_source(run)


@pytest.fixture(scope="module")
def heldout(source):
    """The test and validation splits' images and labels (360 digits)."""
    batches = list(source.dataset("test")) + list(source.dataset("val"))
    return np.concatenate([np.asarray(x) for x, _ in batches]), np.concatenate([np.asarray(y) for _, y in batches])


@pytest.fixture(scope="module")
def int8_file(source):
    content = to_onnx(source.model, labels=source.class_names)
    return quantize_int8(content, source.calibration_images(CALIBRATION_IMAGES))


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def producers(model):
    return {output: node for node in model.graph.node for output in node.output}


def run_onnx(content, images):
    session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


def test_int8_file_is_symmetric_qdq_with_float_io_and_float_biases(int8_file):
    model = onnx.load_from_string(int8_file)
    onnx.checker.check_model(model, full_check=True)
    inits = initializers(model)
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name
    dequantized = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantized) >= 10
    for node in dequantized + [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name  # symmetric int8: what TensorRT takes
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert inits[node.input[0]].dtype == np.int8, node.name  # no int32 bias DequantizeLinear
    for conv in [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]:
        weight = producers(model)[conv.input[1]]
        assert weight.op_type == "DequantizeLinear"
        assert inits[weight.input[1]].size == inits[weight.input[0]].shape[0 if conv.op_type == "Conv" else 1]
        assert inits[conv.input[2]].dtype == np.float32  # the bias is a float initializer, not dequantized
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert producers(model)[softmax.input[0]].op_type != "DequantizeLinear"  # float logits


def test_the_raw_pixels_are_never_quantized(int8_file):
    """The input and the in-model normalization stay float; the first quantized tensor is the normalized
    image (0..1 here), at about 1/127 per step, not 0..255 at 2 pixel levels per step."""
    model = onnx.load_from_string(int8_file)
    inits, made_by = initializers(model), producers(model)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "input" for n in model.graph.node)
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    quantize = made_by[made_by[first_conv.input[0]].input[0]]
    assert quantize.op_type == "QuantizeLinear"
    assert float(inits[quantize.input[1]]) < 1.5 / 127
    path, name = [], quantize.input[0]
    while name != "input":  # back to the input through float nodes only
        node = made_by[name]
        assert node.op_type not in ("QuantizeLinear", "DequantizeLinear")
        path.append(node.op_type)
        name = next(i for i in node.input if i not in inits)
    assert "Mul" in path


def test_int8_file_agrees_with_keras(int8_file, source, heldout):
    images, labels = heldout
    keras = source.model.predict(images, verbose=0)
    probs = run_onnx(int8_file, images)
    assert len(images) >= 300
    assert np.mean(probs.argmax(-1) == keras.argmax(-1)) >= AGREEMENT
    assert np.abs(probs - keras).max() < 0.2
    assert abs(np.mean(probs.argmax(-1) == labels) - np.mean(keras.argmax(-1) == labels)) <= 0.02


def test_a_model_without_normalization_keeps_its_first_layer_float():
    """A stranger's model whose first convolution reads the pixels: that layer stays float, the rest is int8."""
    import tf_keras

    inputs = tf_keras.Input((16, 16, 3), name="input")
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(x)
    outputs = tf_keras.layers.Dense(3, activation="softmax")(tf_keras.layers.Flatten()(x))
    model = tf_keras.Model(inputs, outputs)
    images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    quantized = onnx.load_from_string(quantize_int8(to_onnx(model, labels=["a", "b", "c"]), images))
    convs = [n for n in quantized.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    made_by = producers(quantized)
    assert convs[0].input[0] == "input" or made_by[convs[0].input[0]].op_type != "DequantizeLinear"
    assert made_by[convs[1].input[0]].op_type == "DequantizeLinear"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "input" for n in quantized.graph.node)
    same = run_onnx(quantized.SerializeToString(), images).argmax(-1) == np.asarray(model(images)).argmax(-1)
    assert same.sum() >= 7  # an untrained model: 8 images, one may sit on a decision boundary


def test_calibration_methods(source):
    content = to_onnx(source.model, labels=source.class_names)
    images = source.calibration_images(16)
    scales = {}
    for method in ("entropy", "minmax"):
        model = onnx.load_from_string(quantize_int8(content, images, calibration=method))
        first = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
        scales[method] = float(initializers(model)[first.input[1]])
    assert 0 < scales["entropy"] <= scales["minmax"] * 1.001  # entropy clips, min/max keeps every value
    with pytest.raises(ValueError, match="calibration='kl'"):
        quantize_int8(content, images, calibration="kl")


def test_asymmetric_activations_for_onnxruntime(source, heldout):
    """symmetric=False: uint8 activations with their own zero points (onnxruntime only), the rest as before."""
    images, _ = heldout
    content = quantize_int8(
        to_onnx(source.model, labels=source.class_names), source.calibration_images(16), symmetric=False
    )
    model = onnx.load_from_string(content)
    inits = initializers(model)
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(inits[n.input[2]].dtype == np.uint8 for n in activations)
    assert any(inits[n.input[2]] != 0 for n in activations)
    assert not any(n.input[0] == "input" for n in activations)
    keras = source.model.predict(images, verbose=0)
    assert np.mean(run_onnx(content, images).argmax(-1) == keras.argmax(-1)) >= AGREEMENT


def test_grid_scales_recover_a_quantization_aware_grid():
    rng = np.random.default_rng(0)
    steps = np.array([0.01, 0.002, 0.05], np.float32)
    units = rng.integers(-120, 121, (3, 2, 3, 3)).astype(np.float32)  # the largest below 127: a stale range
    weights = units * steps[:, None, None, None]
    scales, exact = grid_scales(weights, axis=0)
    assert exact
    levels = np.round(weights / scales[:, None, None, None])
    assert np.abs(levels).max() <= 127
    np.testing.assert_allclose(levels * scales[:, None, None, None], weights, rtol=0, atol=1e-6)
    floats = rng.normal(size=(4, 8)).astype(np.float32)
    scales, exact = grid_scales(floats, axis=1)
    assert not exact and np.allclose(scales, np.abs(floats).max(axis=0) / 127)


def test_qat_to_qdq_refuses_a_float_model(source):
    with pytest.raises(ValueError, match="quantize_int8"):
        qat_to_qdq(to_onnx(source.model, labels=source.class_names))


def test_every_int8_mode_can_be_written_as_onnx():
    for name in ("int8", "qat", "prune-qat", "cluster-qat", "prune-cluster-int8"):
        assert check_format(get_mode(name), "onnx") == "onnx"
    for name in ("dynamic", "int16x8", "float16"):
        with pytest.raises(ValueError, match="not onnx"):
            check_format(get_mode(name), "onnx")


def test_qat_and_prune_qat_export_as_onnx(run, heldout, tmp_path):
    """The trained quantization-aware model becomes int8 QDQ: symmetric, int8 weights behind
    DequantizeLinear, the input float, and it computes what the quantization-aware Keras model computed."""
    from ktoolkit.export import export

    # 4 steps: enough to convert, too few for 80% pruning to keep the run's accuracy, so the budget is off
    # and the file is held to the fine-tuned Keras model it was converted from (measured 1.000 and 0.989).
    result = export(
        run,
        mode="qat",
        compare="prune-qat",
        format="onnx",
        epochs=1,
        steps_per_epoch=4,
        max_accuracy_drop=100,
        out=tmp_path,
    )
    assert [f.mode for f in result.files] == ["qat", "prune-qat"] and result.ok
    images, _ = heldout
    for exported in result.files:
        content = exported.path.read_bytes()
        model = onnx.load_from_string(content)
        onnx.checker.check_model(model, full_check=True)
        inits = initializers(model)
        quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert len(quantize) >= 6 and not any(n.input[0] == "input" for n in quantize)
        for node in [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]:
            assert inits[node.input[2]].dtype == np.int8 and not inits[node.input[2]].any()
        weights = [producers(model)[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "MatMul")]
        assert weights and all(w.op_type == "DequantizeLinear" and inits[w.input[0]].dtype == np.int8 for w in weights)
        assert exported.verification.converted_agreement >= 0.95, exported.mode
        assert run_onnx(content, images[:8]).shape == (8, 10)
    pruned = onnx.load(str(result.files[1].path))
    inits = initializers(pruned)
    zeros = [
        np.mean(inits[n.input[0]] == 0)
        for n in pruned.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].size > 1000
    ]
    assert zeros and max(zeros) > 0.3  # prune-qat's sparsity survives into the int8 weights


def relu6_model(seed: int = 0):
    """An untrained MobileNetV2-like stack: ReLU6 after every convolution, read by a 3x3 depthwise
    convolution with implicit padding, one behind an explicit ZeroPadding2D, and a 1x1 convolution."""
    import tf_keras

    layers = tf_keras.layers
    tf_keras.utils.set_random_seed(seed)
    inputs = tf_keras.Input((16, 16, 3), name="input")
    x = layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = layers.ReLU(6.0)(layers.Conv2D(8, 3, strides=2, padding="same")(x))
    x = layers.ReLU(6.0)(layers.DepthwiseConv2D(3, padding="same")(x))
    x = layers.ZeroPadding2D(((0, 1), (0, 1)))(layers.ReLU(6.0)(layers.Conv2D(16, 1)(x)))
    x = layers.ReLU(6.0)(layers.DepthwiseConv2D(3, strides=2)(x))
    x = layers.ReLU(6.0)(layers.Conv2D(8, 1)(x))
    outputs = layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    model = tf_keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    for layer in model.layers[:-1]:  # larger weights than the initializer's, so that the ReLU6s reach their bound
        if layer.weights:
            layer.set_weights([3 * w if w.ndim > 1 else rng.normal(0.5, 0.5, w.shape) for w in layer.get_weights()])
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel / 10, bias])  # probabilities away from 0 and 1, where errors show
    return model


def test_center_clips_is_exact_in_float():
    """Every ReLU6 a convolution reads (4 of 5) becomes a symmetric Clip, the padding an explicit Pad with -c,
    and the model still computes what it computed; the last, read by the pooling, is left as it was."""
    from tflite_export.onnx_export import center_clips

    content = to_onnx(relu6_model(), labels=["a", "b", "c"])
    images = np.random.default_rng(1).uniform(0, 255, (16, 16, 16, 3)).astype(np.float32)
    model = onnx.load_from_string(content)
    shifted = center_clips(model)
    onnx.checker.check_model(model, full_check=True)
    inits = initializers(model)
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert len(clips) == 5 and all(float(inits[c.input[1]]) == -float(inits[c.input[2]]) == -3 for c in clips[:4])
    assert (float(inits[clips[4].input[1]]), float(inits[clips[4].input[2]])) == (0, 6)
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert len(pads) == 2 and all(float(inits[p.input[2]]) == -3 for p in pads)
    assert len(shifted) == 2 * 4 + 2 and all(r == (-3, 3) for r in shifted.values())
    np.testing.assert_allclose(run_onnx(model.SerializeToString(), images), run_onnx(content, images), atol=1e-5)


def test_centered_relu6_gets_twice_the_int8_levels():
    """The default file: each centered ReLU6 tensor is quantized symmetric over its centered range, at half
    the step of center=False's, zero points 0, and the file computes what the float model computed. (On the
    flowers5 MobileNetV2 run centering halves the KL divergence from float; on this untrained stack the
    output errors of the two files are too small to rank: 0.0004 and 0.0005.)"""
    model = relu6_model()
    content = to_onnx(model, labels=["a", "b", "c"])
    rng = np.random.default_rng(2)
    calibration, images = (rng.uniform(0, 255, (n, 16, 16, 3)).astype(np.float32) for n in (32, 64))
    files = {center: quantize_int8(content, calibration, center=center) for center in (True, False)}
    steps = {}
    for center, data in files.items():
        quantized = onnx.load_from_string(data)
        inits, made_by = initializers(quantized), producers(quantized)
        clip_inputs = [made_by[n.input[0]] for n in quantized.graph.node if n.op_type == "Clip"]
        steps[center] = [float(inits[dq.input[1]]) for dq in clip_inputs if dq.op_type == "DequantizeLinear"]
        assert len(steps[center]) == 5
        assert not [n.name for n in quantized.graph.node if n.op_type == "QuantizeLinear" and inits[n.input[2]].any()]
    np.testing.assert_allclose(steps[True][:4], np.array(steps[False][:4]) / 2, rtol=0.05)
    np.testing.assert_allclose(steps[True][4], steps[False][4], rtol=0.05)  # read by the pooling: not centered
    reference = np.asarray(model(images))
    probabilities = run_onnx(files[True], images)
    assert np.abs(probabilities - reference).max() < 0.05
    assert np.mean(probabilities.argmax(-1) == reference.argmax(-1)) >= 0.95


def zero_points(model) -> list:
    """The zero points of every QuantizeLinear node (the activations'), as arrays."""
    inits = initializers(model)
    return [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]


def test_the_onnxruntime_form_is_its_own_file_beside_the_tensorrt_one(run, tmp_path):
    """--onnx-target onnxruntime: asymmetric uint8 activations under an ``_ort`` name, written beside the
    default (TensorRT) file of an earlier export, which it leaves alone; the report lists both, says which
    form each is, and gives trtexec advice only for the files TensorRT builds."""
    import json

    from ktoolkit.export import export

    quick = {"format": "onnx", "calib_samples": 16, "latency_runs": 2, "max_accuracy_drop": 100, "out": tmp_path}
    default = export(run, mode="int8", **quick).files[0]  # budget off: the names, not the verdicts, are tested
    before = default.path.read_bytes()
    result = export(run, mode="int8", compare="float32", onnx_target="onnxruntime", **quick)
    ort, float32 = result.files
    assert result.settings["onnx_target"] == "onnxruntime"
    assert ort.path.name == default.path.name.replace("_int8.onnx", "_ort_int8.onnx") != default.path.name
    assert ort.replaced is None and default.path.read_bytes() == before
    assert "_ort" not in float32.path.name  # the setting is only for post-training int8
    for path, dtype, any_nonzero in ((ort.path, np.uint8, True), (default.path, np.int8, False)):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        zeros = zero_points(model)
        assert len(zeros) >= 6 and all(z.dtype == dtype for z in zeros), path.name
        assert any(z.any() for z in zeros) is any_nonzero, path.name
    assert any("TensorRT cannot build" in n for n in ort.notes) and not any("trtexec" in n for n in ort.notes)
    assert any("trtexec" in n for n in default.notes) and any("trtexec" in n for n in float32.notes)
    listed = json.loads(result.report["json"].read_text())["files"]
    assert {default.path.name, ort.path.name, float32.path.name} <= set(listed)
    assert listed[default.path.name]["settings"]["onnx_target"] == "tensorrt"
    markdown = result.report["md"].read_text()
    assert default.path.name in markdown and ort.path.name in markdown


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("float32", "onnx"), ("qat", "onnx"), ("int8", "tflite")],
)
def test_onnx_target_given_to_a_mode_that_ignores_it_is_refused(mode, fmt, tmp_path):
    from ktoolkit.export import export

    with pytest.raises(ValueError, match=rf"^onnx_target='onnxruntime' \(--onnx-target\) does nothing in mode {mode}"):
        export(tmp_path / "never-read", mode=mode, format=fmt, onnx_target="onnxruntime")


def test_an_unknown_onnx_target_is_refused_in_one_line(tmp_path):
    from click.testing import CliRunner

    from ktoolkit.cli import main
    from ktoolkit.export import export

    with pytest.raises(ValueError, match=r"^onnx_target='trt' \(--onnx-target\): one of 'tensorrt', 'onnxruntime'"):
        export(tmp_path / "never-read", mode="int8", format="onnx", onnx_target="trt")
    args = ["export", "--model", str(tmp_path), "--mode", "int8", "--format", "onnx", "--onnx-target", "trt"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "Error: onnx_target='trt' (--onnx-target): one of 'tensorrt', 'onnxruntime', the runtime the int8 .onnx "
        "file is made for."
    ]
