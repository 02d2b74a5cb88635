"""Top-k predictions for image files, from a run folder, a saved Keras model, or an exported .tflite
or .onnx file (ktoolkit's or anyone's).

Every image is decoded and resized exactly as training does (:func:`read_image`): a run folder with
training's own TensorFlow functions, an exported file with their Pillow + numpy twin, which gives the
same pixels bit for bit, so the run and its float file agree on the same image file and exported files
run without TensorFlow (on a Jetson or a phone dev board, with ai-edge-litert or onnxruntime).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ktoolkit.runs import open_classifier, printable_names

EXPORTED = (".tflite", ".onnx")
# libpng's BT.601 weights, as tf.image.rgb_to_grayscale has them (float32, summed left to right).
_GRAY = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)


@dataclass
class Prediction:
    path: str
    top: list  # (label, probability), best first
    error: str | None = None


def is_exported(model) -> bool:
    """True for a .tflite or .onnx file (run by LiteRT or onnxruntime instead of Keras)."""
    return Path(model).suffix.lower() in EXPORTED


def predict_files(model, images, top_k: int = 5) -> list[Prediction]:
    """Predicts each image file; unreadable files get an error instead of stopping the others.

    ``model`` is a run folder, a .keras file, or a .tflite/.onnx file (class names from its metadata's
    labels file, else labels.txt beside it, else "0", "1", ...). A run or .keras file reads images with
    TensorFlow, an exported file with Pillow (:func:`read_image`): the same pixels either way.
    """
    if is_exported(model):
        predict, names, shape = _exported(model)
        decoder = "pillow"
    else:
        classifier = open_classifier(model)
        keras_model, names = classifier.model, classifier.labels
        shape = keras_model.input_shape[1:]
        predict, decoder = (lambda x: np.asarray(keras_model(x, training=False))), "tensorflow"
    results = []
    for image in images:
        path = Path(image)
        try:
            pixels = read_image(path, shape, decoder=decoder)
        except (OSError, ValueError) as err:
            reason = "file not found" if not path.exists() else f"not a readable image: {err}"
            results.append(Prediction(str(path), [], reason))
            continue
        probs = predict(pixels[None].astype(np.float32))[0]
        order = np.argsort(-probs, kind="stable")[: max(1, min(top_k, len(names)))]
        results.append(Prediction(str(path), [(names[i], float(probs[i])) for i in order]))
    return results


def _exported(model):
    """(predict, class names, input shape) of a .tflite/.onnx file. Outputs outside 0..1 (logits) are
    turned into probabilities with a softmax, so the printed percentages mean what they say."""
    from tflite_export.runtime import open_model

    runner = open_model(model)
    probe = runner.predict(np.zeros((1, *runner.input_shape), dtype=np.float32))
    n = int(probe.shape[-1])
    names = runner.labels or [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{model} has {n} outputs but its labels list {len(names)} classes.")

    def predict(images):
        out = np.asarray(runner.predict(images), dtype=np.float32).reshape(len(images), -1)
        if out.min() < 0 or out.max() > 1 + 1e-3:
            out = np.exp(out - out.max(-1, keepdims=True))
            out /= out.sum(-1, keepdims=True)
        return out

    return predict, printable_names(names), runner.input_shape


# ------------------------------------------------------------------------------------- one image path
def read_image(path, shape, *, decoder: str = "pillow") -> np.ndarray:
    """An image file decoded and resized exactly as training's pipeline does: uint8 (height, width, channels).

    Both decoders give the same pixels (tests/test_image_path.py checks every format bit for bit):
    ``"tensorflow"`` runs training's own functions (:func:`ktoolkit.data.pipeline.load_image`);
    ``"pillow"`` needs no TensorFlow: Pillow decodes (libjpeg-turbo's accurate DCT for JPEG, as training
    asks TensorFlow for), TensorFlow's conversions are redone in numpy (CMYK to RGB, GIF transparency,
    16-bit PNG to the high byte, BMP as TensorFlow reads it, alpha dropped, gray to RGB or RGB to gray
    with TensorFlow's float32 weights), then :func:`resize_bilinear` and rounding half to even.

    Files are checked first as ``ktool data check`` and training do (:func:`ktoolkit.data.scan.check_images`):
    a format TensorFlow does not decode, or more than :data:`~ktoolkit.data.scan.MAX_PIXELS` pixels, is
    refused before anything decodes it.

    Args:
        path: the image file.
        shape: (height, width, channels) of the model's input; channels 1 or 3.
        decoder: "pillow" or "tensorflow".

    Raises:
        ValueError: not an image training accepts (the message says why). OSError: unreadable.
    """
    from ktoolkit.data.scan import _read_header

    height, width, channels = (int(d) for d in shape)
    path = Path(path)
    if not path.is_file():  # not a FIFO or a device that would block or never end
        raise (ValueError("not a regular file") if path.exists() else FileNotFoundError(str(path)))
    verdict = _read_header(str(path), path.stat().st_size)
    if not verdict.ok:
        raise ValueError(verdict.reason)
    if verdict.format == "WEBP" and _animated_without_alpha(path):
        raise ValueError(
            "an animated WebP without alpha, which TensorFlow 2.21 cannot decode (it writes RGBA frames into an "
            "RGB buffer and corrupts memory); save its first frame as a still image"
        )
    if decoder == "tensorflow":
        from ktoolkit.data.pipeline import load_image

        return load_image(path, height, width, channels)
    if decoder != "pillow":
        raise ValueError(f"decoder={decoder!r}: give 'pillow' or 'tensorflow'.")
    pixels = _to_channels(_decode(path.read_bytes(), verdict.format), channels)
    return _round_uint8(resize_bilinear(pixels, height, width))


def _animated_without_alpha(path: Path) -> bool:
    """True for an animated WebP whose header says it has no alpha (Pillow reads it as RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        return bool(getattr(image, "is_animated", False)) and image.mode != "RGBA"


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``tf.image.resize(image, (height, width))`` in numpy, bit for bit: bilinear with half-pixel centers
    and no antialiasing, every step in float32 in TensorFlow's order (ResizeBilinear's CPU kernel)."""
    image = np.asarray(image, dtype=np.float32)
    y0, y1, wy = _resize_weights(height, image.shape[0])
    x0, x1, wx = _resize_weights(width, image.shape[1])
    wx, wy = wx[None, :, None], wy[:, None, None]
    top, bottom = image[y0], image[y1]
    top = top[:, x0] + (top[:, x1] - top[:, x0]) * wx
    bottom = bottom[:, x0] + (bottom[:, x1] - bottom[:, x0]) * wx
    return top + (bottom - top) * wy


def _resize_weights(out_size: int, in_size: int):
    """Lower and upper source index and weight of each output pixel (TensorFlow's HalfPixelScaler)."""
    scale = np.float32(in_size) / np.float32(out_size)
    at = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    low = np.floor(at)
    return np.maximum(low.astype(np.int64), 0), np.minimum(np.ceil(at).astype(np.int64), in_size - 1), at - low


def _round_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)  # np.round and tf.round: half to even


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (h, w, 1 or 3) to ``channels``: gray copied to RGB, or RGB weighted to gray and rounded (the
    pipeline's ``_convert_channels``; alpha is already gone)."""
    have = image.shape[-1]
    if channels == 3 and have == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and have == 3:
        rgb = image.astype(np.float32)
        return _round_uint8(rgb[..., 0:1] * _GRAY[0] + rgb[..., 1:2] * _GRAY[1] + rgb[..., 2:3] * _GRAY[2])
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels} channels; ktoolkit reads images as 1 (gray) or 3 (RGB).")
    return image


def _decode(data: bytes, fmt: str) -> np.ndarray:
    """The file's pixels as ``tf.io.decode_image(channels=0)`` gives them, alpha dropped: uint8 (h, w, 1 or 3)."""
    from PIL import Image

    if fmt == "BMP":
        return _bmp(data)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if fmt == "GIF":
            return _gif(data, image)
        mode = image.mode
        pixels = np.asarray(image)
        if mode == "CMYK":  # TensorFlow's formula; Pillow hands out Adobe's inverted CMYK already inverted
            inverted = "adobe" in image.info
            cmy, k = pixels[..., :3].astype(np.int32), pixels[..., 3:].astype(np.int32)
            rgb = (255 - cmy) * (255 - k) // 255 if inverted else cmy * k // 255
            return rgb.astype(np.uint8)
        if mode == "P":
            return np.asarray(image.convert("RGB"))
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: libpng's strip_16 keeps the high byte
        return (pixels.astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)[..., None]
    if mode in ("1", "L", "LA"):
        gray = pixels if mode != "LA" else pixels[..., 0]
        return (gray.astype(np.uint8) * (255 if mode == "1" else 1))[..., None]
    if mode in ("RGB", "RGBA", "RGBX"):
        return pixels[..., :3]
    raise ValueError(f"an image mode ({mode}) that training's decoder does not produce")


def _bmp(data: bytes) -> np.ndarray:
    """A BMP as TensorFlow's decoder reads it: uncompressed 8 (the bytes as gray, no palette), 24 or 32 bits
    per pixel, the file exactly as long as its rows, bottom-up unless the height is negative."""
    if len(data) < 32:
        raise ValueError(f"an incomplete BMP ({len(data)} bytes)")
    offset, width, height = struct.unpack_from("<iii", data, 10)[0], *struct.unpack_from("<ii", data, 18)
    bpp = struct.unpack_from("<h", data, 28)[0]
    channels = int(bpp / 8)  # C's division, toward zero
    if channels not in (1, 3, 4) or width <= 0 or height == 0 or offset < 0:
        raise ValueError(f"a BMP TensorFlow does not decode ({bpp} bits per pixel, {width}x{height})")
    if width * abs(height) >= (2**31 - 1) // 8:
        raise ValueError(f"a BMP of {width}x{abs(height)} pixels, too large")
    row = (channels * width + 3) // 4 * 4
    if len(data) - offset - row * abs(height) != 0:
        raise ValueError("a BMP whose size does not match its header (TensorFlow refuses it)")
    rows = np.frombuffer(data, np.uint8, row * abs(height), offset).reshape(abs(height), row)
    pixels = rows[:, : channels * width].reshape(abs(height), width, channels)
    pixels = pixels if height < 0 else pixels[::-1]
    return pixels if channels == 1 else pixels[..., 2::-1]  # BGR(A) -> RGB


def _gif(data: bytes, image) -> np.ndarray:
    """A GIF's first frame as TensorFlow's decoder draws it: on a canvas as large as the largest frame,
    the first frame at its offset (clipped), its transparent pixels and the rest of the canvas black."""
    frames, table, transparent = _gif_layout(data)
    if not frames:
        raise ValueError("a GIF without an image")
    if table is None:
        raise ValueError("a GIF whose first frame has no color map")
    left, top, w, h = frames[0]
    x0, y0, x1, y1 = image.dispose_extent  # where Pillow drew the first frame
    raster = np.asarray(image)[y0:y1, x0:x1]
    if raster.shape != (h, w):
        raise ValueError("a GIF whose first frame lies outside its screen")
    width, height = max(f[2] for f in frames), max(f[3] for f in frames)
    canvas = np.zeros((height, width, 3), np.uint8)
    rows, cols = max(0, min(h, height - top)), max(0, min(w, width - left))
    raster = raster[:rows, :cols]
    clear = raster == transparent
    if np.any((raster >= len(table)) & ~clear):
        raise ValueError("a GIF with a color index outside its color map")
    drawn = table[np.where(clear, 0, raster)]
    drawn[clear] = 0
    canvas[top : top + rows, left : left + cols] = drawn
    return canvas


def _gif_layout(data: bytes):
    """(frames as (left, top, width, height), the first frame's color table (n, 3), its transparent index or
    -1), read from the GIF's blocks as giflib does; a truncated file gives the frames before the cut."""
    try:
        packed = data[10]
        at, table = 13, None
        if packed & 0x80:
            size = 3 << ((packed & 7) + 1)
            table, at = np.frombuffer(data, np.uint8, size, at).reshape(-1, 3), at + size
        frames, first_table, transparent, pending = [], table, -1, -1
        while at < len(data) and data[at] != 0x3B:
            if data[at] == 0x21:  # extension: a graphic control extension gives the next frame's transparency
                if data[at + 1] == 0xF9 and data[at + 2] >= 4:
                    pending = data[at + 6] if data[at + 3] & 1 else -1
                at = _gif_skip_blocks(data, at + 2)
            elif data[at] == 0x2C:  # image descriptor
                left, top, w, h, flags = struct.unpack_from("<HHHHB", data, at + 1)
                at += 10
                local = None
                if flags & 0x80:
                    size = 3 << ((flags & 7) + 1)
                    local, at = np.frombuffer(data, np.uint8, size, at).reshape(-1, 3), at + size
                if not frames:
                    first_table, transparent = (local if local is not None else table), pending
                frames.append((left, top, w, h))
                pending = -1
                at = _gif_skip_blocks(data, at + 1)  # after the LZW code size
            else:
                break
    except (IndexError, struct.error, ValueError):
        pass  # truncated: what was read so far
    return frames, first_table, transparent


def _gif_skip_blocks(data: bytes, at: int) -> int:
    """The position after a chain of GIF data sub-blocks (length-prefixed, ended by a zero length)."""
    while data[at]:
        at += data[at] + 1
    return at + 1
