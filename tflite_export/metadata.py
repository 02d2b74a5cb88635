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
in-model normalization is named in the input's description.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field

import numpy as np

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
PARSER_VERSION = "1.0.0"  # every field written here exists since metadata schema 1.0.0
LABELS_FILE = "labels.txt"

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


def read_metadata(tflite: bytes) -> dict | None:
    """The metadata of a .tflite file as a dict (None when it has none), associated files included.

    Keys: name, description, version, author, license, min_parser_version, input (name, description,
    color_space, mean, std, min, max), output (name, description, min, max, associated_files), files
    (name -> text of each file in the appended zip).
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(tflite, 0)
    data = None
    for i in range(model.MetadataLength()):
        if model.Metadata(i).Name().decode() == METADATA_NAME:
            data = model.Buffers(model.Metadata(i).Buffer()).DataAsNumpy().tobytes()
    if data is None:
        return None
    if data[4:8] != FILE_IDENTIFIER:
        raise ValueError(f"the {METADATA_NAME} buffer is not a metadata flatbuffer (identifier {data[4:8]!r}).")
    root = _Table.root(data)
    subgraph = root.tables(3)[0]
    inp, out = subgraph.tables(2)[0], subgraph.tables(3)[0]
    norm = next((u.table(1) for u in inp.tables(4) if u.scalar(0, "uint8") == _NORMALIZATION_OPTIONS), None)
    image = inp.table(3).table(1) if inp.table(3) and inp.table(3).scalar(0, "uint8") == _IMAGE_PROPERTIES else None
    return {
        "name": root.string(0), "description": root.string(1), "version": root.string(2),
        "author": root.string(4), "license": root.string(5), "min_parser_version": root.string(7),
        "input": {
            "name": inp.string(0), "description": inp.string(1),
            "color_space": {1: "RGB", 2: "GRAYSCALE"}.get(image.scalar(0, "int8")) if image else None,
            "mean": norm.floats(0) if norm else None, "std": norm.floats(1) if norm else None,
            "max": inp.table(5).floats(0) if inp.table(5) else None,
            "min": inp.table(5).floats(1) if inp.table(5) else None,
        },
        "output": {
            "name": out.string(0), "description": out.string(1),
            "max": out.table(5).floats(0) if out.table(5) else None,
            "min": out.table(5).floats(1) if out.table(5) else None,
            "associated_files": [{"name": f.string(0), "description": f.string(1), "type": f.scalar(2, "int8")}
                                 for f in out.tables(6)],
        },
        "files": packed_files(tflite),
    }


def packed_files(tflite: bytes) -> dict[str, str]:
    """The files zipped onto a .tflite model (labels.txt), as {name: text}; {} when there are none."""
    try:
        with zipfile.ZipFile(io.BytesIO(tflite)) as archive:
            return {name: archive.read(name).decode() for name in archive.namelist()}
    except zipfile.BadZipFile:
        return {}


def packed_labels(tflite: bytes) -> list[str] | None:
    """The class names from the labels.txt packed into a .tflite file, or None."""
    text = packed_files(tflite).get(LABELS_FILE)
    return [line for line in text.splitlines() if line.strip()] if text else None


# ------------------------------------------------------------------------------------- flatbuffer
def _metadata_flatbuffer(info: ModelInfo) -> bytes:
    """Builds the ModelMetadata flatbuffer (children first, as flatbuffers requires)."""
    import flatbuffers

    b = flatbuffers.Builder(1024)
    s = b.CreateString
    labels = _table(b, [(0, "offset", s(LABELS_FILE)),
                        (1, "offset", s("Class names, one per line, in the order of the output's scores.")),
                        (2, "int8", _TENSOR_AXIS_LABELS)])

    image_props = _table(b, [(0, "int8", _COLOR_SPACES[info.channels])])
    image_content = _table(b, [(0, "uint8", _IMAGE_PROPERTIES), (1, "offset", image_props)])
    norm = _table(b, [(0, "offset", _floats(b, info.mean)), (1, "offset", _floats(b, info.std))])
    unit = _table(b, [(0, "uint8", _NORMALIZATION_OPTIONS), (1, "offset", norm)])
    in_stats = _table(b, [(0, "offset", _floats(b, [255.0])), (1, "offset", _floats(b, [0.0]))])
    input_meta = _table(b, [(0, "offset", s("image")), (1, "offset", s(info.input_description)),
                            (3, "offset", image_content), (4, "offset", _offsets(b, [unit])),
                            (5, "offset", in_stats)])

    feature = _table(b, [])
    out_content = _table(b, [(0, "uint8", _FEATURE_PROPERTIES), (1, "offset", feature)])
    out_stats = _table(b, [(0, "offset", _floats(b, [1.0])), (1, "offset", _floats(b, [0.0]))])
    output_meta = _table(b, [(0, "offset", s("probability")),
                             (1, "offset", s(f"Probabilities of the {len(info.labels)} classes.")),
                             (3, "offset", out_content), (5, "offset", out_stats),
                             (6, "offset", _offsets(b, [labels]))])

    subgraph = _table(b, [(2, "offset", _offsets(b, [input_meta])), (3, "offset", _offsets(b, [output_meta]))])
    root = _table(b, [(0, "offset", s(info.name)), (1, "offset", s(info.description)),
                      (2, "offset", s(info.version)), (3, "offset", _offsets(b, [subgraph])),
                      (4, "offset", s(info.author)), (5, "offset", s(info.license)),
                      (7, "offset", s(PARSER_VERSION))])
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


class _Table:
    """Reads fields of a flatbuffer table by slot."""

    def __init__(self, buf: bytes, pos: int):
        from flatbuffers import table

        self._t = table.Table(bytearray(buf) if not isinstance(buf, bytearray) else buf, pos)

    @classmethod
    def root(cls, buf: bytes) -> _Table:
        buf = bytearray(buf)
        return cls(buf, int.from_bytes(buf[:4], "little"))

    def _offset(self, slot: int) -> int:
        return self._t.Offset(4 + 2 * slot)

    def string(self, slot: int) -> str | None:
        o = self._offset(slot)
        return self._t.String(o + self._t.Pos).decode() if o else None

    def table(self, slot: int) -> _Table | None:
        o = self._offset(slot)
        return _Table(self._t.Bytes, self._t.Indirect(o + self._t.Pos)) if o else None

    def tables(self, slot: int) -> list[_Table]:
        o = self._offset(slot)
        if not o:
            return []
        start = self._t.Vector(o)
        return [_Table(self._t.Bytes, self._t.Indirect(start + 4 * i)) for i in range(self._t.VectorLen(o))]

    def floats(self, slot: int) -> list[float]:
        from flatbuffers import number_types

        o = self._offset(slot)
        return [float(v) for v in self._t.GetVectorAsNumpy(number_types.Float32Flags, o)] if o else []

    def scalar(self, slot: int, kind: str, default: int = 0) -> int:
        from flatbuffers import number_types

        flags = {"int8": number_types.Int8Flags, "uint8": number_types.Uint8Flags}[kind]
        o = self._offset(slot)
        return self._t.Get(flags, o + self._t.Pos) if o else default
