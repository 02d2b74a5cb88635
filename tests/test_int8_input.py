"""int8 files whose normalization costs nothing: with a scalar normalization ("tf", "unit") the uint8
input's quantization is the normalization, as in Google's own int8 files; a per-channel one ("torch",
"caffe") is folded into a first convolution that reads no padding, else done in float before the
first QUANTIZE; never an int8 MUL/ADD on the input path. Each file is run with LiteRT the way the
Android Task Library feeds it (uint8 inputs get the pixel bytes as they are) and must agree with the
Keras model on real handwritten digits."""

import numpy as np
import pytest

from tflite_export.compat import operators
from tflite_export.convert import to_tflite
from tflite_export.metadata import ModelInfo, add_metadata, input_normalization, read_metadata
from tflite_export.prepare import Normalization, first_conv_fold, normalization_of

AGREEMENT = 0.95  # top-1 agreement of an int8 file with its Keras model on the 300 held-out digits


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's real digits at 32x32 on the 0..255 scale, gray and as RGB (the three channels
    differ a little, so per-channel normalizations see different values): (gray, rgb, labels)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    gray = np.kron(data.images * (255.0 / 16.0), np.ones((4, 4))).round().astype("float32")[..., None]
    rgb = np.concatenate([gray, np.clip(gray * 0.9 + 20, 0, 255), np.clip(255 - gray * 0.8, 0, 255)], -1).round()
    return gray, rgb.astype("float32"), data.target


def small_net(mode: str, padding: str, channels: int = 3):
    """ImagePreprocessing(mode) -> conv(padding) -> conv -> softmax over 10 digits (about 90% after
    three epochs: agreement is then measured on confident predictions, not on noise)."""
    import tf_keras

    from recipes.layers import custom_layers

    inputs = tf_keras.Input((32, 32, channels), name="input")
    x = custom_layers("tf_keras").ImagePreprocessing(mode, name="preprocessing")(inputs)
    x = tf_keras.layers.Conv2D(8, 3, strides=2, padding=padding, activation="relu")(x)
    x = tf_keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = tf_keras.layers.Flatten()(x)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(10, activation="softmax")(x))


def trained(model, images, labels):
    import tf_keras

    model.compile(tf_keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(images[:1400], labels[:1400], epochs=3, batch_size=64, verbose=0)
    return model


def run_file(content: bytes, images: np.ndarray) -> np.ndarray:
    """Probabilities of a .tflite file, one image at a time; a uint8 input gets the pixel bytes as they
    are (what the Task Library and MediaPipe do), never the pixels re-quantized."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    probs = []
    for image in images:
        x = image[None].astype(np.uint8) if inp["dtype"] == np.uint8 else image[None].astype(np.float32)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"]).astype(np.float32)
        probs.append((y[0] - out["quantization"][1]) * out["quantization"][0] if out["dtype"] == np.uint8 else y[0])
    return np.array(probs)


def input_path(content: bytes) -> list[tuple]:
    """(operator, its input types) of the operators before the first convolution."""
    ops = operators(content)
    first_conv = next(i for i, op in enumerate(ops) if op["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D"))
    return [(op["op"], tuple(op["inputs"])) for op in ops[:first_conv]]


def input_details(content: bytes) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=content).get_input_details()[0]


def agreement(content, model, images) -> float:
    return float(np.mean(run_file(content, images).argmax(-1) == model.predict(images, verbose=0).argmax(-1)))


@pytest.mark.filterwarnings("ignore:Warning. Enabling .experimental_preserve_all_tensors")
def test_tf_normalization_is_the_uint8_input_quantization_as_in_googles_files(digits):
    """'tf' (x / 127.5 - 1): uint8 input with scale 1/127.5 and zero point 127 or 128, the pixel bytes
    fed as they are, QUANTIZE straight into the first convolution, all 256 pixel values distinct there."""
    from ai_edge_litert.interpreter import Interpreter

    _, rgb, labels = digits
    model = trained(small_net("tf", "same"), rgb, labels)
    plain = to_tflite(model, "int8", representative=rgb[:64], int8_io=True)
    content = to_tflite(model, "int8", representative=rgb[:64], int8_io=True, fold_normalization=True)
    assert ("MUL", ("INT8", "INT8")) in input_path(plain)  # what the layer becomes without the fold
    assert input_path(content) == [("QUANTIZE", ("UINT8",))]
    details = input_details(content)
    assert details["dtype"] == np.uint8
    assert details["quantization"][0] == pytest.approx(1 / 127.5) and details["quantization"][1] in (127, 128)
    assert agreement(content, model, rgb[1497:]) >= AGREEMENT

    # Every pixel value reaches the first convolution as its own int8 level.
    interpreter = Interpreter(model_content=content, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    ramp = np.resize(np.arange(256, dtype=np.uint8), (1, 32, 32, 3))
    interpreter.set_tensor(details["index"], ramp)
    interpreter.invoke()
    quantize_out = operators(content)[0]
    assert quantize_out["op"] == "QUANTIZE"
    first = next(
        t for t in interpreter.get_tensor_details() if t["dtype"] == np.int8 and list(t["shape"]) == [1, 32, 32, 3]
    )
    assert len(np.unique(interpreter.get_tensor(first["index"]))) == 256

    meta = read_metadata(add_metadata(content, info(input_normalization(content, "tf"), 3)))
    assert meta["input"]["mean"] == [127.5] and meta["input"]["std"] == [127.5]  # as Google's file says


def info(norm, channels: int) -> ModelInfo:
    return ModelInfo(
        "net", "test", [str(i) for i in range(10)], channels, norm.mean, norm.std, input_description=norm.description
    )


def test_unit_recipe_takes_pixel_bytes_with_scale_1_over_255(digits):
    """LeNet-5 ('unit', x / 255, one channel): uint8 input scale 1/255, zero point 0; metadata 0 and 255."""
    import recipes

    gray, _, labels = digits
    model = trained(recipes.get("lenet5").build(input_shape=(32, 32, 1), num_classes=10), gray, labels)
    assert normalization_of(model).scalar
    content = to_tflite(model, "int8", representative=gray[:64], int8_io=True, fold_normalization=True)
    assert input_path(content) == [("QUANTIZE", ("UINT8",))]
    assert input_details(content)["quantization"] == pytest.approx((1 / 255, 0))
    assert agreement(content, model, gray[1497:]) >= AGREEMENT
    norm = input_normalization(content, "unit")
    assert norm.mean == [0.0] and norm.std == pytest.approx([255.0])
    float_file = to_tflite(model)  # float files take pixels and normalize inside: mean 0, std 1
    assert input_normalization(float_file, "unit")[:2] == ([0.0], [1.0])


def test_per_channel_normalization_folds_exactly_into_a_valid_first_convolution(digits):
    """'torch' before a 'valid' convolution: kernel and bias absorb it (the Keras model with the folded
    weights computes the same), and the int8 file takes pixels (uint8, scale 1) straight into CONV_2D."""
    from tflite_export.prepare import preprocessing_bypassed, weights_replaced

    _, rgb, labels = digits
    model = trained(small_net("torch", "valid"), rgb, labels)
    norm = normalization_of(model)
    assert not norm.scalar
    conv, kernel, bias = first_conv_fold(model, norm)
    before = model(rgb[1497:], training=False).numpy()  # called, not predict(): that one was traced already
    with preprocessing_bypassed(model), weights_replaced(conv, [kernel, bias]):
        folded = model(rgb[1497:], training=False).numpy()
    np.testing.assert_allclose(folded, before, atol=1e-5)
    np.testing.assert_array_equal(model(rgb[1497:], training=False).numpy(), before)  # restored afterwards

    content = to_tflite(model, "int8", representative=rgb[:64], int8_io=True, fold_normalization=True)
    assert input_path(content) == [("QUANTIZE", ("UINT8",))]
    assert input_details(content)["quantization"] == pytest.approx((1.0, 0))
    assert agreement(content, model, rgb[1497:]) >= AGREEMENT
    assert input_normalization(content, "torch")[:2] == ([0.0] * 3, [1.0] * 3)


def test_per_channel_normalization_before_padding_stays_float(digits):
    """'caffe' before a 'same' convolution (its zero padding is the mean pixel, which no pixel padding
    reproduces per channel): float32 REVERSE_V2 and ADD before the QUANTIZE, from uint8 or float pixels."""
    _, rgb, labels = digits
    model = trained(small_net("caffe", "same"), rgb, labels)
    assert first_conv_fold(model, normalization_of(model)) is None
    content = to_tflite(model, "int8", representative=rgb[:64], int8_io=True, fold_normalization=True)
    assert input_path(content) == [
        ("DEQUANTIZE", ("UINT8",)),
        ("REVERSE_V2", ("FLOAT32", "INT32")),
        ("ADD", ("FLOAT32", "FLOAT32")),
        ("QUANTIZE", ("FLOAT32",)),
    ]
    assert input_details(content)["quantization"] == pytest.approx((1.0, 0))
    assert agreement(content, model, rgb[1497:]) >= AGREEMENT
    float_io = to_tflite(model, "int8", representative=rgb[:64], fold_normalization=True)
    assert [op for op, _ in input_path(float_io)] == ["REVERSE_V2", "ADD", "QUANTIZE"]
    assert agreement(float_io, model, rgb[1497:]) >= AGREEMENT


def constant_sizes(content: bytes, kinds=("MUL", "ADD")) -> list[int]:
    """Element counts of the constant inputs of the ``kinds`` operators (a float16 file's constants are
    float16 buffers behind a DEQUANTIZE: those count)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(content, 0))
    graph, names = model.subgraphs[0], {v: k for k, v in vars(schema.BuiltinOperator).items()}

    def kind(op):
        code = model.operatorCodes[op.opcodeIndex]
        return names[max(code.builtinCode, code.deprecatedBuiltinCode)]

    dequantized = {op.outputs[0]: op.inputs[0] for op in graph.operators if kind(op) == "DEQUANTIZE"}
    sizes = []
    for op in graph.operators:
        if kind(op) in kinds:
            for i in op.inputs:
                tensor = graph.tensors[dequantized.get(i, i)]
                if model.buffers[tensor.buffer].data is not None:
                    sizes.append(int(np.prod(tensor.shape)) if tensor.shape is not None else 1)
    return sizes


def test_float_files_of_scalar_normalizations_have_scalar_constants_and_tf_float_io_int8_is_float(digits):
    """float32 and float16 files of a 'tf' model: the normalization is MUL and ADD by scalars; the
    float-input int8 file does it in float32 before QUANTIZE."""
    _, rgb, labels = digits
    model = trained(small_net("tf", "same"), rgb, labels)
    assert Normalization.of_mode("tf").scalar and not Normalization.of_mode("torch").scalar
    for quantize in (None, "float16"):
        sizes = constant_sizes(to_tflite(model, quantize))
        assert sizes and max(sizes) == 1, quantize
    content = to_tflite(model, "int8", representative=rgb[:64], fold_normalization=True)
    assert input_path(content) == [
        ("MUL", ("FLOAT32", "FLOAT32")),
        ("ADD", ("FLOAT32", "FLOAT32")),
        ("QUANTIZE", ("FLOAT32",)),
    ]
    assert max(constant_sizes(content)) == 1
    assert agreement(content, model, rgb[1497:]) >= AGREEMENT


def test_the_fold_is_refused_where_it_would_not_be_exact():
    """No fold when something comes before the normalization (passing the layer through would then
    feed normalized values to that layer), nor into a convolution that reads padding; a 1x1 'same'
    convolution reads none."""
    import tf_keras

    from recipes.layers import custom_layers
    from tflite_export.prepare import preprocessing_reads_input

    inputs = tf_keras.Input((32, 32, 3))
    x = custom_layers("tf_keras").ImagePreprocessing("torch")(tf_keras.layers.Resizing(16, 16)(inputs))
    assert not preprocessing_reads_input(tf_keras.Model(inputs, tf_keras.layers.Flatten()(x)))
    for kernel, foldable in ((3, False), (1, True)):
        inputs = tf_keras.Input((32, 32, 3))
        x = custom_layers("tf_keras").ImagePreprocessing("torch")(inputs)
        model = tf_keras.Model(inputs, tf_keras.layers.Conv2D(4, kernel, strides=2, padding="same")(x))
        assert preprocessing_reads_input(model)
        assert (first_conv_fold(model, normalization_of(model)) is not None) == foldable, kernel
