"""One image path: `ktool predict` decodes and resizes every image exactly as training does, with TensorFlow
or without it, and runs any .tflite/.onnx classifier with the input and labels its file declares."""

import io
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ktoolkit.cli import main
from ktoolkit.data.sources import Split
from ktoolkit.predict import predict_files, read_image, resize_bilinear

SHAPES = [(17, 23, 3), (40, 52, 3), (64, 80, 1), (9, 7, 1)]  # down- and upscaling, RGB and gray models


def _smooth(h, w, c, seed=0):
    """A photo-like image: gradients plus noise (JPEG, WebP and the resize all have work to do)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 7 + y * 3 + k * 50) % 256 for k in range(c)], -1).astype(np.float64)
    return np.clip(base + np.random.default_rng(seed).normal(0, 20, (h, w, c)), 0, 255).astype(np.uint8)


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA), written by hand: Pillow cannot write 16-bit color."""
    h, w, c = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _gif_with_offset_frame(seed=0) -> bytes:
    """A GIF whose only frame (10x8, transparent index 1) sits at (3, 2) on a 20x16 screen."""
    rng = np.random.default_rng(seed)
    out = b"GIF89a" + struct.pack("<HHBBB", 20, 16, 0xF7, 5, 0) + rng.integers(0, 256, 768, dtype=np.uint8).tobytes()
    out += b"\x21\xf9\x04\x01\x00\x00\x01\x00" + b"\x2c" + struct.pack("<HHHHB", 3, 2, 10, 8, 0)
    codes = []
    for i, index in enumerate(rng.integers(0, 8, 80)):
        codes += [256] * (i % 64 == 0) + [int(index)]  # a clear code now and then keeps codes 9 bits wide
    bits = sum(code << (9 * i) for i, code in enumerate([*codes, 257]))
    data = bits.to_bytes((9 * (len(codes) + 1) + 7) // 8, "little")
    blocks = b"".join(bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255))
    return out + b"\x08" + blocks + b"\x00\x3b"


def _save(image, fmt, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _image_files(folder):
    """Every kind of file training accepts, written with Pillow and numpy."""
    rgb = _smooth(40, 52, 3)
    rgba = np.concatenate([rgb, _smooth(40, 52, 1, seed=1)], -1)
    cmyk = _save(Image.fromarray(np.concatenate([rgb, _smooth(40, 52, 1, 2)], -1), "CMYK"), "JPEG")
    app14 = cmyk.index(b"\xff\xee")
    gif_frames = [Image.fromarray(_smooth(40, 52, 3, seed=s)).quantize(32) for s in range(3)]
    webp_frames = [
        Image.fromarray(np.concatenate([_smooth(24, 30, 3, s), _smooth(24, 30, 1, 9)], -1)) for s in range(3)
    ]
    rng = np.random.default_rng(0)
    files = {
        "photo.jpg": _save(Image.fromarray(rgb), "JPEG", quality=90),
        "progressive.jpg": _save(Image.fromarray(_smooth(37, 51, 3)), "JPEG", progressive=True, subsampling=2),
        "gray.jpg": _save(Image.fromarray(rgb[..., 0]), "JPEG"),
        "cmyk.jpg": cmyk,  # Adobe's inverted CMYK
        "cmyk_plain.jpg": cmyk[:app14] + cmyk[app14 + 2 + int.from_bytes(cmyk[app14 + 2 : app14 + 4], "big") :],
        "rgb16.png": _png16(rng.integers(0, 65536, (30, 20, 3))),
        "gray16.png": _png16(rng.integers(0, 65536, (30, 20, 1))),
        "la16.png": _png16(rng.integers(0, 65536, (30, 20, 2))),
        "rgba.png": _save(Image.fromarray(rgba), "PNG"),
        "palette_trns.png": _save(Image.fromarray(rgb).quantize(50), "PNG", transparency=3),
        "bits1.png": _save(Image.fromarray(rgb[..., 0] > 128), "PNG"),
        "still.gif": _save(Image.fromarray(rgb).quantize(64), "GIF", transparency=5),
        "animated.gif": _save(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], duration=50),
        "offset.gif": _gif_with_offset_frame(),
        "rgba.webp": _save(Image.fromarray(rgba), "WEBP", quality=80),
        "lossless.webp": _save(Image.fromarray(rgb), "WEBP", lossless=True),
        "animated_rgba.webp": _save(webp_frames[0], "WEBP", save_all=True, append_images=webp_frames[1:], quality=80),
        "rgb.bmp": _save(Image.fromarray(rgb), "BMP"),
        "palette.bmp": _save(Image.fromarray(rgb).quantize(50), "BMP"),  # TensorFlow: the indices as gray
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return [folder / name for name in files]


def test_pillow_and_training_decode_every_format_to_the_same_pixels(tmp_path):
    """Bit for bit: read_image's Pillow path, its TensorFlow path and training's own tf.data pipeline."""
    from ktoolkit.data import make_dataset

    paths = _image_files(tmp_path)
    for shape in SHAPES:
        split = Split("test", np.zeros(len(paths), dtype=np.int64), paths=[str(p) for p in paths])
        dataset = make_dataset(split, num_classes=1, image_size=shape[:2], channels=shape[2], batch_size=64)
        trained = np.concatenate([np.asarray(x) for x, _ in dataset])
        for path, pixels in zip(paths, trained):
            pillow = read_image(path, shape, decoder="pillow")
            assert pillow.dtype == np.uint8 and pillow.shape == shape, path.name
            np.testing.assert_array_equal(pillow, pixels, err_msg=f"{path.name} at {shape}")
            np.testing.assert_array_equal(read_image(path, shape, decoder="tensorflow"), pillow, err_msg=path.name)


def test_resize_is_tensorflows_bilinear_bit_for_bit():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for (h, w), (out_h, out_w) in [((128, 128), (224, 224)), ((375, 500), (97, 131)), ((7, 9), (30, 20))]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(resize_bilinear(image, out_h, out_w), tf.image.resize(image, (out_h, out_w)))


def test_files_training_refuses_are_refused_with_the_reason(tmp_path):
    frames = [Image.fromarray(_smooth(16, 16, 3, seed=s)) for s in range(2)]
    (tmp_path / "animated_rgb.webp").write_bytes(_save(frames[0], "WEBP", save_all=True, append_images=frames[1:]))
    (tmp_path / "bits1.bmp").write_bytes(_save(Image.fromarray(_smooth(8, 8, 1)[..., 0] > 9), "BMP"))
    (tmp_path / "picture.tiff").write_bytes(_save(Image.fromarray(_smooth(8, 8, 3)), "TIFF"))
    (tmp_path / "notes.png").write_bytes(b"not an image")
    reasons = {
        "animated_rgb.webp": "animated WebP without alpha",  # TensorFlow 2.21 would corrupt memory on it
        "bits1.bmp": "BMP TensorFlow does not decode",
        "picture.tiff": "unsupported format: TIFF",
        "notes.png": "not an image",
    }
    for name, reason in reasons.items():
        decoders = ("pillow",) if name == "bits1.bmp" else ("pillow", "tensorflow")
        for decoder in decoders:
            with pytest.raises(ValueError, match=reason):
                read_image(tmp_path / name, (8, 8, 3), decoder=decoder)


def _digit_file(folder, name, digit, k):
    """A tinted digit photo, in the k-th of five formats (JPEG, CMYK JPEG, 16-bit PNG, GIF, RGBA WebP)."""
    tinted = np.stack([digit, digit // 10 * 9, digit // 5 * 4 + 20], -1).astype(np.uint8)
    suffix = ["jpg", "cmyk.jpg", "16bit.png", "gif", "rgba.webp"][k % 5]
    content = [
        lambda: _save(Image.fromarray(tinted), "JPEG", quality=85),
        lambda: _save(Image.fromarray(tinted).convert("CMYK"), "JPEG"),
        lambda: _png16(tinted.astype(np.uint16) * 257 + k),
        lambda: _save(Image.fromarray(tinted).quantize(64), "GIF"),
        lambda: _save(Image.fromarray(np.dstack([tinted, digit])), "WEBP", quality=90),
    ][k % 5]()
    path = folder / f"{name}.{suffix}"
    path.write_bytes(content)
    return path


@pytest.fixture(scope="module")
def rgb_run(digits_folder, tmp_path_factory):
    """LeNet-5 on the digit PNGs as RGB, 4 epochs, and its float32 .tflite from `ktool export`."""
    from ktoolkit.export import export
    from ktoolkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("image_path") / "run"
    train(
        TrainConfig(
            recipe="lenet5", data=str(digits_folder), out=str(out), epochs=4, lr=3e-3, channels=3, augment="none"
        )
    )
    result = export(out, mode="float32")
    return out, next(f.path for f in result.files if f.path.suffix == ".tflite")


def test_the_run_and_its_float32_file_agree_exactly_on_the_same_image_files(rgb_run, digits_folder, tmp_path):
    run, tflite_file = rgb_run
    files = []
    for k, source in enumerate(sorted(digits_folder.glob("digit_*/001.png"))):
        digit = np.asarray(Image.open(source).convert("L").resize((45, 37)))  # a size the model does not take
        files.append(_digit_file(tmp_path, source.parent.name, digit, k))
    from_run, from_file = predict_files(run, files, top_k=3), predict_files(tflite_file, files, top_k=3)
    assert all(p.error is None for p in from_run + from_file), [p.error for p in from_run + from_file]
    for a, b in zip(from_run, from_file):
        assert [label for label, _ in a.top] == [label for label, _ in b.top], a.path
        np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], atol=1e-5)
    correct = sum(p.top[0][0] == p.path.rsplit("/", 1)[1].split(".")[0] for p in from_run)
    assert correct >= 4  # the model really reads these files (chance: 1 of 10)


# ------------------------------------------------------------------------------------- anyone's files
def _brightness_model():
    """3 outputs: background, "bright", "dark", from the mean of an input normalized to -1..1."""
    import tf_keras

    inputs = tf_keras.Input((8, 8, 3))
    mean = tf_keras.layers.GlobalAveragePooling2D()(inputs)
    dense = tf_keras.layers.Dense(3, activation="softmax")
    outputs = dense(mean)
    dense.set_weights([np.array([[0.0, 2.0, -2.0]] * 3, np.float32), np.zeros(3, np.float32)])
    return tf_keras.Model(inputs, outputs)


def _google_style_file(model, int8: bool, tmp_path, monkeypatch):
    """A file as Google writes them: the TFLite converter (uint8 in and out for int8), mean/std 127.5 in the
    metadata, the labels in an associated TENSOR_AXIS_LABELS file that is not called labels.txt."""
    import tensorflow as tf

    from tflite_export import metadata

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(0)
        extremes = [np.full((1, 8, 8, 3), v, np.float32) for v in (-1.0, 1.0)]
        samples = extremes + [rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32) for _ in range(20)]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([s] for s in samples)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.uint8
    info = metadata.ModelInfo(
        name="b", description="b", labels=["background", "bright", "dark"], mean=[127.5], std=[127.5]
    )
    with monkeypatch.context() as patch:  # the writer's labels file name, for this one file
        patch.setattr(metadata, "LABELS_FILE", "brightness_labels.txt")
        content = metadata.add_metadata(converter.convert(), info)
    assert metadata.packed_files(content, names=["labels.txt", "brightness_labels.txt"]).keys() == {
        "brightness_labels.txt"
    }
    path = tmp_path / f"google_{'uint8' if int8 else 'float'}.tflite"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("int8", [True, False], ids=["uint8-input", "float-input"])
def test_a_google_style_file_gets_its_pixels_normalized_as_its_file_says(int8, tmp_path, monkeypatch):
    from tflite_export.runtime import open_model

    model = _brightness_model()
    path = _google_style_file(model, int8, tmp_path, monkeypatch)
    runner = open_model(path)
    assert runner.labels == ["background", "bright", "dark"]  # from the TENSOR_AXIS_LABELS file
    if int8:
        scale, zero_point = runner.interpreter.get_input_details()[0]["quantization"]
        assert runner.input_dtype == np.uint8 and scale == pytest.approx(2 / 255, rel=0.02) and zero_point in (127, 128)
    pixels = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3)).astype(np.float32)
    pixels[0], pixels[1] = 0, 255
    expected = model.predict((pixels - 127.5) / 127.5, verbose=0)
    np.testing.assert_allclose(runner.predict(pixels), expected, atol=0.02 if int8 else 1e-5)
    for value, name in ((250, "bright"), (5, "dark")):
        image = tmp_path / f"{name}.png"
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(image)
        result = CliRunner().invoke(main, ["predict", "--model", str(path), str(image), "--top-k", "1"])
        assert result.exit_code == 0 and result.output.startswith(f"{image}: {name} "), result.output


def test_a_channels_first_onnx_classifier_with_logits_runs(tmp_path):
    """PyTorch's layout (N, C, H, W) and raw logits: predict transposes and turns logits into probabilities."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.array([[0.01, -0.01], [0.0, 0.0], [0.0, 0.0]], np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["mean", "w"], ["logits"]),
        ],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [weights],
    )
    model = tmp_path / "torch_style.onnx"
    model.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    )
    image = tmp_path / "red.png"
    Image.fromarray(np.dstack([np.full((30, 20), 250, np.uint8), np.zeros((30, 20, 2), np.uint8)])).save(image)
    [prediction] = predict_files(model, [image], top_k=2)
    assert [label for label, _ in prediction.top] == ["0", "1"]  # logits 2.5 and -2.5: softmax 1 / (1 + e^-5)
    assert prediction.top[0][1] == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-5)
    result = CliRunner().invoke(main, ["benchmark", str(model), "--threads", "1", "--runs", "3", "--warmup", "1"])
    assert result.exit_code == 0 and "p50" in result.output, result.output


def test_scan_refuses_animated_webp_without_alpha(tmp_path):
    """TensorFlow 2.21 crashes decoding an animated RGB WebP (RGBA frames into an RGB buffer): the scan
    refuses it by name before any decode, so training never reaches it."""
    from PIL import Image

    from ktoolkit.data.scan import _read_header

    path = tmp_path / "anim.webp"
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    verdict = _read_header(str(path), path.stat().st_size)
    assert verdict.reason and "animated WebP without alpha" in verdict.reason
    still = tmp_path / "still.webp"
    frames[0].save(still)
    assert _read_header(str(still), still.stat().st_size).reason is None
