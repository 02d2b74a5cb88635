"""TFLite model metadata: the labels, input normalization and description that the Android Task
Library, MediaPipe and the LiteRT support library read from a .tflite file.

The layout is TFLite's metadata schema (tflite-support's ``metadata_schema.fbs``, file identifier
"M001"): a ``ModelMetadata`` flatbuffer stored in a model buffer named ``TFLITE_METADATA``, and
associated files (labels.txt) appended to the model as an uncompressed zip archive, which the
interpreter ignores and the Task Library reads in place. tflite-support's own writer cannot be
installed next to TensorFlow 2.21 (it needs protobuf < 4), so this module writes the flatbuffer
with the ``flatbuffers`` package, slot by slot as the schema declares the fields, and reads it back
the same way.

Normalization: ktoolkit models normalize inside (an ``ImagePreprocessing`` layer) and take RGB
pixels on the 0..255 scale, so the metadata says mean 0, std 1: the Task Library computes
``(pixel - mean) / std`` for float inputs, and that must leave the pixels unchanged. The
in-model normalization is named in the input's description. An int8 file whose uint8 input's
quantization is the normalization (as Google's int8 files, and ktoolkit's of "tf" and "unit"
models) still takes the pixel bytes; its metadata gives the normalization's mean and std
(:func:`input_normalization` reads which case a file is).
"""

from __future__ import annotations

import io
import itertools
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from tflite_export.untrusted import (
    MAX_LABELS_BYTES,
    label_lines,
    read_capped,
    sanitize_text,
)

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
PARSER_VERSION = "1.0.0"  # every field written here exists since metadata schema 1.0.0
LABELS_FILE = "labels.txt"
_MAX_FLOATS = 4096  # mean, std, min, max: one number per channel
MAX_PACKED_FILES = 64  # files in the zip appended to a model; the metadata writers pack one or two

# enum values and union tags of metadata_schema.fbs
_TENSOR_AXIS_LABELS = 2
_COLOR_SPACES = {3: 1, 1: 2}  # channels -> ColorSpaceType (RGB = 1, GRAYSCALE = 2)
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2
_NORMALIZATION_OPTIONS = 1


@dataclass
class ModelInfo:
    """What the metadata says about an image classifier."""

    name: str
    description: str
    labels: list
    channels: int = 3
    mean: list = field(default_factory=lambda: [0.0])
    std: list = field(default_factory=lambda: [1.0])
    input_description: str = "RGB pixels, 0..255"
    version: str = "1"
    author: str = "ktoolkit"
    license: str = ""


def add_metadata(tflite: bytes, info: ModelInfo) -> bytes:
    """Returns the .tflite file with ``info`` as TFLite metadata and labels.txt packed into it."""
    from ai_edge_litert import schema_py_generated as schema

    from tflite_export.convert import sharing_builder

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(tflite, 0))
    model.metadata = [m for m in (model.metadata or []) if m.name.decode() != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(_metadata_flatbuffer(info), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers) - 1
    model.metadata.append(entry)
    builder = sharing_builder(len(tflite) + 4096)  # keeps compact()'s shared vectors shared
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out = io.BytesIO(bytes(builder.Output()))
    out.seek(0, io.SEEK_END)
    # Stored, not deflated: the Task Library maps associated files in place.
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(LABELS_FILE, "\n".join(info.labels) + "\n")
    return out.getvalue()


class InputNormalization(NamedTuple):
    """What a file's input takes, for its metadata: NormalizationOptions' ``mean`` and ``std`` (one per
    channel, or one for all) and a line for the input's description."""

    mean: list
    std: list
    description: str


def input_normalization(tflite: bytes, preprocessing: str | None = None) -> InputNormalization:
    """The normalization metadata that describes ``tflite``'s input tensor, read from the file.

    - An integer input whose quantization is not scale 1, zero point 0 takes the *normalized* image and
      its quantization is the normalization (ktoolkit's int8 files of "tf"/"unit" models, Google's
      int8 files): the raw byte is the pixel, ``real = scale * (pixel - zero_point)``. The metadata
      says what the network was trained with: the mean and std of ``preprocessing`` (127.5 and 127.5
      for "tf", as Google writes, though the zero point is 127 or 128; 0 and 255 for "unit"), or, with
      no mode given, the quantization itself (mean = zero point, std = 1 / scale). The Task Library and
      MediaPipe copy uint8 pixels into such a tensor as they are.
    - Any other input (float32, or uint8 pixels with scale 1) takes 0..255 pixels and normalizes
      inside: mean 0, std 1 per channel, so that the Task Library's ``(pixel - mean) / std`` for
      float inputs leaves the pixels unchanged.
    """
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.Model.GetRootAs(tflite, 0).Subgraphs(0)
    tensor = graph.Tensors(graph.Inputs(0))
    channels = int(tensor.ShapeAsNumpy()[-1])
    kind = {schema.TensorType.UINT8: "uint8", schema.TensorType.INT8: "int8"}.get(tensor.Type(), "float32")
    q = tensor.Quantization()
    scale = float(q.Scale(0)) if q is not None and q.ScaleLength() else 0.0
    zero = int(q.ZeroPoint(0)) if q is not None and q.ZeroPointLength() else 0
    if kind == "float32" or (scale in (0.0, 1.0) and zero == (-128 if kind == "int8" else 0)):
        pixels = "RGB pixels" if channels == 3 else "grayscale pixels"
        inside = f"; the model applies '{preprocessing}' normalization itself" if preprocessing else ""
        return InputNormalization([0.0] * channels, [1.0] * channels, f"{pixels} on the 0..255 scale ({kind}){inside}")
    from tflite_export.prepare import Normalization

    norm = Normalization.of_mode(preprocessing, channels) if preprocessing not in (None, "none") else None
    if norm is not None and not norm.reverse:
        mean, std = norm.mean, norm.std
    else:
        mean, std = [float(zero)] * channels, [1.0 / scale] * channels
    if len(set(mean)) == 1 and len(set(std)) == 1:
        mean, std = mean[:1], std[:1]  # one value for all channels, as Google's files have
    named = f"'{preprocessing}' normalization" if norm is not None else "normalization"
    return InputNormalization(
        [float(m) for m in mean],
        [float(s) for s in std],
        f"{kind} pixels 0..255 as they are; the input's quantization (scale {scale:.6g}, zero point {zero}) is "
        f"the model's {named}, (pixel - mean) / std",
    )


def read_metadata(tflite: bytes) -> dict | None:
    """The metadata of a .tflite file as a dict (None when it has none), associated files included.

    Keys: name, description, version, author, license, min_parser_version, input (name, description,
    color_space, mean, std, min, max), output (name, description, min, max, associated_files), files
    (name -> text of each associated file packed into the appended zip). Strings are sanitized
    (:func:`tflite_export.untrusted.sanitize_text`); the files' text is as stored, at most
    :data:`~tflite_export.untrusted.MAX_LABELS_BYTES` each.

    Raises:
        ValueError: not a TFLite model, or a metadata flatbuffer or packed archive that is corrupt
            (every offset is checked against the buffer: a hostile file cannot crash the reader).
    """
    meta = _parse_metadata(tflite)
    if meta is not None:
        associated = meta["output"]["associated_files"]
        meta["files"] = packed_files(tflite, names=[LABELS_FILE] + [f["name"] for f in associated if f["name"]])
    return meta


def _parse_metadata(tflite: bytes) -> dict | None:
    """:func:`read_metadata` without the packed files: the flatbuffer's fields only.

    Raises:
        ValueError: not a TFLite model, or a metadata flatbuffer that is corrupt.
    """
    data = _metadata_buffer(tflite)
    if data is None:
        return None
    if data[4:8] != FILE_IDENTIFIER:
        raise ValueError(f"the {METADATA_NAME} buffer is not a metadata flatbuffer (identifier {data[4:8]!r}).")
    root = _Table.root(data)
    subgraph = _first(root, 3, "subgraph")
    inp, out = _first(subgraph, 2, "input"), _first(subgraph, 3, "output")
    units = itertools.islice(inp.tables(4), MAX_PACKED_FILES)  # process units: one or two in a real file
    norm = next((u.table(1) for u in units if u.scalar(0, "uint8") == _NORMALIZATION_OPTIONS), None)
    content = inp.table(3)
    image = content.table(1) if content and content.scalar(0, "uint8") == _IMAGE_PROPERTIES else None
    associated = [
        {"name": f.string(0), "description": f.string(1), "type": f.scalar(2, "int8")}
        for f in itertools.islice(out.tables(6), MAX_PACKED_FILES)
    ]
    return {
        "name": root.string(0),
        "description": root.string(1),
        "version": root.string(2),
        "author": root.string(4),
        "license": root.string(5),
        "min_parser_version": root.string(7),
        "input": {
            "name": inp.string(0),
            "description": inp.string(1),
            "color_space": {1: "RGB", 2: "GRAYSCALE"}.get(image.scalar(0, "int8")) if image else None,
            "mean": norm.floats(0) if norm else None,
            "std": norm.floats(1) if norm else None,
            **_range(inp.table(5)),
        },
        "output": {
            "name": out.string(0),
            "description": out.string(1),
            **_range(out.table(5)),
            "associated_files": associated,
        },
    }


def _range(stats) -> dict:
    return {"max": stats.floats(0) if stats else None, "min": stats.floats(1) if stats else None}


def _first(table, slot: int, what: str):
    first = table.table_at(slot, 0)
    if first is None:
        raise ValueError(f"the {METADATA_NAME} flatbuffer has no {what} metadata; the file is corrupt.")
    return first


def _metadata_buffer(tflite: bytes) -> bytes | None:
    """The bytes of the model buffer named TFLITE_METADATA, read with bounds checks (the generated
    schema code trusts every offset)."""
    if len(tflite) < 8 or tflite[4:8] != b"TFL3":
        raise ValueError(f"not a TFLite model (no TFL3 identifier: {bytes(tflite[4:8])!r}).")
    model = _Table.root(tflite)
    for entry in model.tables(6):  # Model.metadata: [Metadata(name, buffer)]
        if entry.string(0) == METADATA_NAME:
            index = entry.scalar(1, "uint32")
            buffer = model.table_at(4, index)  # Model.buffers: [Buffer(data, offset, size)]
            if buffer is None:
                raise ValueError(
                    f"the {METADATA_NAME} entry points at buffer {index}, past the model's last; the file is corrupt."
                )
            return buffer.ubytes(0)
    return None


def packed_files(tflite: bytes, names=(LABELS_FILE,)) -> dict[str, str]:
    """The files zipped onto a .tflite model, as {name: text}, for the members called ``names`` only
    (labels.txt and the metadata's associated files); {} when there is no archive.

    Reads are bounded: the archive's directory must be small, and a member over
    :data:`~tflite_export.untrusted.MAX_LABELS_BYTES` is refused before it is read (its declared
    size) or as it is read (a member that lies about its size).

    Raises:
        ValueError: a member over the cap, too many members, or a member that cannot be read.
    """
    if not _small_zip_directory(tflite):
        return {}
    try:
        archive = zipfile.ZipFile(io.BytesIO(tflite))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
        return {}  # no archive (or an unreadable one): the model has no packed files
    files = {}
    with archive:
        for name in dict.fromkeys(names):
            try:
                info = archive.getinfo(name)
            except KeyError:
                continue
            what = f"the packed {sanitize_text(name)!r} ({info.file_size:,} bytes declared)"
            if info.file_size > MAX_LABELS_BYTES:
                raise ValueError(
                    f"{what} is over the {MAX_LABELS_BYTES:,}-byte cap for a labels file; it was not read."
                )
            try:
                with archive.open(info) as member:
                    files[name] = read_capped(member, MAX_LABELS_BYTES, what).decode("utf-8", errors="replace")
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError, zlib.error) as err:
                raise ValueError(f"{what} cannot be read ({type(err).__name__}: {err}).") from None
    return files


def _small_zip_directory(content: bytes) -> bool:
    """True when ``content`` ends with a zip directory small enough to load: zipfile reads the whole
    central directory and makes an object per entry, so a hostile one could take gigabytes.

    Raises:
        ValueError: a directory of more than :data:`MAX_PACKED_FILES` entries, or a zip64 one.
    """
    tail = content[-(22 + 0xFFFF) :]
    at = tail.rfind(b"PK\x05\x06")  # the end-of-central-directory record
    if at < 0 or len(tail) - at < 22:
        return False
    entries, size, comment = struct.unpack_from("<HIxxxxH", tail, at + 10)
    if at + 22 + comment != len(tail):
        return False  # those four bytes are part of the model, not a record that ends the file
    if entries > MAX_PACKED_FILES or size > 1024 * MAX_PACKED_FILES or tail[max(at - 20, 0) : at - 16] == b"PK\x06\x07":
        raise ValueError(
            f"the zip archive appended to the model lists {entries:,} files ({size:,}-byte directory"
            f"{', zip64' if size == 0xFFFFFFFF or entries == 0xFFFF else ''}); TFLite metadata packs "
            f"at most a few labels files (cap {MAX_PACKED_FILES})."
        )
    return True


def packed_labels(tflite: bytes) -> list[str] | None:
    """The class names (sanitized) from the labels.txt packed into a .tflite file, or None.

    Raises:
        ValueError: a packed labels.txt over the size or line caps.
    """
    text = packed_files(tflite).get(LABELS_FILE)
    return label_lines(text.encode(), f"the packed {LABELS_FILE}") if text else None


def model_labels(tflite: bytes) -> list[str] | None:
    """The class names of a .tflite classifier, sanitized, in output order; None when it names none.

    The labels file the metadata associates with the output as TENSOR_AXIS_LABELS (what the Task Library
    and MediaPipe read: ``imagenet_labels.txt`` in Google's files, with "background" at index 0 of 1001),
    else a packed labels.txt. A corrupt metadata flatbuffer is passed over (running the model does not
    need it; a packed labels.txt still names the classes).

    Raises:
        ValueError: a labels file over the size or line caps.
    """
    try:
        meta = _parse_metadata(tflite)
    except ValueError:
        meta = None
    associated = meta["output"]["associated_files"] if meta else []
    names = [f["name"] for f in associated if f["type"] == _TENSOR_AXIS_LABELS and f["name"]]
    files = packed_files(tflite, names=[*names, LABELS_FILE])
    for name in [*names, LABELS_FILE]:
        if files.get(name):
            return label_lines(files[name].encode(), f"the packed {name!r}")
    return None


def read_normalization(tflite: bytes, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) of the input's NormalizationOptions, one float32 per channel: a float input takes
    ``(pixel - mean) / std``, as the Task Library computes it. None without metadata or normalization, or
    with a corrupt metadata flatbuffer.

    Raises:
        ValueError: a normalization that cannot be applied (not one value or one per channel, a std of 0,
            or a value that is not finite).
    """
    try:
        meta = _parse_metadata(tflite)
    except ValueError:
        return None
    mean, std = (meta["input"]["mean"], meta["input"]["std"]) if meta else (None, None)
    if not mean and not std:
        return None
    mean, std = np.asarray(mean or [0.0], np.float32), np.asarray(std or [1.0], np.float32)
    if (
        len(mean) not in (1, channels)
        or len(std) not in (1, channels)
        or not np.all(np.isfinite(mean))
        or not np.all(np.isfinite(std))
        or np.any(std == 0)
    ):
        raise ValueError(
            f"its metadata's input normalization (mean {mean.tolist()[:8]}, std {std.tolist()[:8]}) cannot be "
            f"applied to {channels}-channel images: one finite value, or one per channel, with std not 0."
        )
    return np.broadcast_to(mean, (channels,)).copy(), np.broadcast_to(std, (channels,)).copy()


# ------------------------------------------------------------------------------------- flatbuffer
def _metadata_flatbuffer(info: ModelInfo) -> bytes:
    """Builds the ModelMetadata flatbuffer (children first, as flatbuffers requires)."""
    import flatbuffers

    b = flatbuffers.Builder(1024)
    s = b.CreateString
    labels = _table(
        b,
        [
            (0, "offset", s(LABELS_FILE)),
            (1, "offset", s("Class names, one per line, in the order of the output's scores.")),
            (2, "int8", _TENSOR_AXIS_LABELS),
        ],
    )

    image_props = _table(b, [(0, "int8", _COLOR_SPACES[info.channels])])
    image_content = _table(b, [(0, "uint8", _IMAGE_PROPERTIES), (1, "offset", image_props)])
    norm = _table(b, [(0, "offset", _floats(b, info.mean)), (1, "offset", _floats(b, info.std))])
    unit = _table(b, [(0, "uint8", _NORMALIZATION_OPTIONS), (1, "offset", norm)])
    in_stats = _table(b, [(0, "offset", _floats(b, [255.0])), (1, "offset", _floats(b, [0.0]))])
    input_meta = _table(
        b,
        [
            (0, "offset", s("image")),
            (1, "offset", s(info.input_description)),
            (3, "offset", image_content),
            (4, "offset", _offsets(b, [unit])),
            (5, "offset", in_stats),
        ],
    )

    feature = _table(b, [])
    out_content = _table(b, [(0, "uint8", _FEATURE_PROPERTIES), (1, "offset", feature)])
    out_stats = _table(b, [(0, "offset", _floats(b, [1.0])), (1, "offset", _floats(b, [0.0]))])
    output_meta = _table(
        b,
        [
            (0, "offset", s("probability")),
            (1, "offset", s(f"Probabilities of the {len(info.labels)} classes.")),
            (3, "offset", out_content),
            (5, "offset", out_stats),
            (6, "offset", _offsets(b, [labels])),
        ],
    )

    subgraph = _table(b, [(2, "offset", _offsets(b, [input_meta])), (3, "offset", _offsets(b, [output_meta]))])
    root = _table(
        b,
        [
            (0, "offset", s(info.name)),
            (1, "offset", s(info.description)),
            (2, "offset", s(info.version)),
            (3, "offset", _offsets(b, [subgraph])),
            (4, "offset", s(info.author)),
            (5, "offset", s(info.license)),
            (7, "offset", s(PARSER_VERSION)),
        ],
    )
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _table(b, fields) -> int:
    """A table of (slot, kind, value) fields; slots are the fields' positions in the schema."""
    b.StartObject(1 + max((slot for slot, _, _ in fields), default=-1))
    for slot, kind, value in fields:
        if kind == "offset":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "int8":
            b.PrependInt8Slot(slot, value, 0)
        else:
            b.PrependUint8Slot(slot, value, 0)
    return b.EndObject()


def _offsets(b, offsets) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _floats(b, values) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=np.float32))


_SCALARS = {"int8": "<b", "uint8": "<B", "uint32": "<I"}  # struct formats of the scalar fields read here


class _Table:
    """Reads fields of a flatbuffer table by slot, checking every offset against the buffer: an
    offset or a length that points outside it raises a ValueError (never an IndexError, a
    struct.error or a read of gigabytes), whatever the file holds."""

    def __init__(self, buf, pos: int):
        self._buf, self._pos = buf, pos
        vtable = pos - self._get("<i", pos)
        self._vtable, self._vtable_size = vtable, self._get("<H", vtable)

    @classmethod
    def root(cls, buf) -> _Table:
        buf = memoryview(buf).toreadonly()
        return cls(buf, _Table._get_from(buf, "<I", 0))

    @staticmethod
    def _get_from(buf, fmt: str, at: int) -> int:
        size = struct.calcsize(fmt)
        if not 0 <= at <= len(buf) - size:
            raise ValueError(
                f"a flatbuffer offset ({at}) points outside the {len(buf)}-byte buffer; the file is "
                f"corrupt or was not written by a TFLite tool."
            )
        return struct.unpack_from(fmt, buf, at)[0]

    def _get(self, fmt: str, at: int) -> int:
        return self._get_from(self._buf, fmt, at)

    def _field(self, slot: int) -> int | None:
        """The absolute position of a field, or None when the table does not have it."""
        entry = 4 + 2 * slot
        if entry + 2 > self._vtable_size:
            return None
        offset = self._get("<H", self._vtable + entry)
        return self._pos + offset if offset else None

    def _indirect(self, at: int) -> int:
        return at + self._get("<I", at)

    def _vector(self, slot: int, item_size: int) -> tuple[int, int]:
        """(start, length) of a vector field; (0, 0) when absent. The whole vector must fit."""
        at = self._field(slot)
        if at is None:
            return 0, 0
        start = self._indirect(at)
        length = self._get("<I", start)
        if length * item_size > len(self._buf) - start - 4:
            raise ValueError(
                f"a flatbuffer vector of {length:,} items runs past the {len(self._buf)}-byte buffer; "
                f"the file is corrupt."
            )
        return start + 4, length

    def string(self, slot: int) -> str | None:
        if self._field(slot) is None:
            return None
        start, length = self._vector(slot, 1)
        return sanitize_text(bytes(self._buf[start : start + length]).decode("utf-8", errors="replace"))

    def ubytes(self, slot: int) -> bytes:
        start, length = self._vector(slot, 1)
        return bytes(self._buf[start : start + length])

    def table(self, slot: int) -> _Table | None:
        at = self._field(slot)
        return _Table(self._buf, self._indirect(at)) if at is not None else None

    def tables(self, slot: int) -> Iterator[_Table]:
        """The tables of a vector field, one at a time (a hostile vector may list millions)."""
        start, length = self._vector(slot, 4)
        return (_Table(self._buf, self._indirect(start + 4 * i)) for i in range(length))

    def table_at(self, slot: int, index: int) -> _Table | None:
        """Item ``index`` of a vector of tables; None when the vector is shorter."""
        start, length = self._vector(slot, 4)
        return _Table(self._buf, self._indirect(start + 4 * index)) if 0 <= index < length else None

    def floats(self, slot: int) -> list[float]:
        start, length = self._vector(slot, 4)
        if length > _MAX_FLOATS:
            raise ValueError(
                f"a metadata vector of {length:,} numbers where a few (one per channel) belong; the file is corrupt."
            )
        return [float(v) for v in struct.unpack_from(f"<{length}f", self._buf, start)] if length else []

    def scalar(self, slot: int, kind: str, default: int = 0) -> int:
        at = self._field(slot)
        return self._get(_SCALARS[kind], at) if at is not None else default
