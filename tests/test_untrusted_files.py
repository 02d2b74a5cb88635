"""Files from strangers: a model's stored name never becomes a path, packed and beside-the-model labels
are read with bounded memory and shown without terminal escapes, broken model files end as one
ValueError naming the file, and settings a mode ignores are refused."""

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ktoolkit.cli import main
from ktoolkit.export import export
from tflite_export import open_model
from tflite_export.metadata import ModelInfo, add_metadata, packed_labels, read_metadata
from tflite_export.untrusted import (
    MAX_LABELS_BYTES,
    confined,
    read_capped,
    safe_filename,
    sanitize_text,
)

HOSTILE_LABELS = ["\x1b]0;pwned\x07cat", "\x1b[2Jdog", "bird\x9b31m"]


def tiny_model(name="tiny", classes=3):
    import tf_keras

    inputs = tf_keras.Input((8, 8, 1), name="input")
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    outputs = tf_keras.layers.Dense(classes, activation="softmax", name="predictions")(tf_keras.layers.Flatten()(x))
    return tf_keras.Model(inputs, outputs, name=name)


@pytest.fixture(scope="module")
def tflite_bytes():
    """A 3-class .tflite without metadata."""
    import tf_keras

    from tflite_export.convert import to_tflite

    tf_keras.utils.set_random_seed(0)
    return to_tflite(tiny_model())


def with_labels(content, labels):
    return add_metadata(content, ModelInfo(name="tiny", description="tiny", labels=labels, channels=1))


def appended(content: bytes, name: str, data: bytes, compression=zipfile.ZIP_STORED) -> bytes:
    """``content`` with one more member in the zip archive at its end (or a new archive)."""
    out = io.BytesIO(content)
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", compression=compression) as archive:
        archive.writestr(name, data)
    return out.getvalue()


def tree(root: Path) -> set:
    return {p for p in root.rglob("*")}


# ------------------------------------------------------------------------------------- names and paths
def test_safe_filename_and_confined():
    assert safe_filename("../../escape/NAME") == "_.._escape_NAME"
    assert safe_filename("...") == safe_filename("") == "model"
    assert safe_filename(".hidden") == "hidden" and safe_filename("a b:c\x1b") == "a_b_c_"
    assert len(safe_filename("x" * 500)) == 100
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in safe_filename("Zürich/猫\\..\x00"))
    folder = Path("/tmp/out")
    assert confined(folder, "a.tflite") == folder / "a.tflite"
    for bad in ("../a.tflite", "sub/a.tflite", "..", ".", "", "/etc/passwd"):
        with pytest.raises(ValueError, match="outside the output folder"):
            confined(folder, bad)


def test_sanitize_text_removes_terminal_control():
    assert [sanitize_text(label) for label in HOSTILE_LABELS] == ["cat", "dog", "bird"]
    assert sanitize_text("a\tb\nc\r\x00\x7f\u202e") == "a b c"
    assert sanitize_text("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\") == "link"
    assert sanitize_text("Zürich 猫 ok-1") == "Zürich 猫 ok-1"


def test_a_model_named_like_a_path_writes_only_inside_out(tmp_path):
    """A .keras file whose model is called "../../escape/NAME": every file export writes is inside --out,
    a user's file at the escape target is untouched, and a symlink left in --out is replaced, not
    followed."""
    from ktoolkit.io import save_model

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x=rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8),
        y=np.repeat(np.arange(3), 20),
        class_names=np.array(["0", "1", "2"]),
    )  # a bare .keras: 0, 1, 2
    model_path = save_model(tiny_model(name="../../escape/NAME"), tmp_path / "model.keras")
    out = tmp_path / "one" / "two" / "out"
    target = tmp_path / "one" / "escape"  # out/../../escape
    target.mkdir(parents=True)
    users = {
        target / name: f"the user's {name}".encode()
        for name in ("NAME_8x8x1_float32.tflite", "NAME_8x8x1_float32.FAILED.tflite", "NAME_8x8x1_float32.saved_model")
    }
    for path, text in users.items():
        path.write_bytes(text)
    outside, elsewhere = tmp_path / "outside.bin", tmp_path / "elsewhere"
    outside.write_bytes(b"not ktoolkit's")
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("the user's")
    out.mkdir(parents=True)
    stem = safe_filename("../../escape/NAME") + "_8x8x1_float32"
    (out / f"{stem}.tflite").symlink_to(outside)  # a previous "export" that is a link out of --out
    (out / f".{stem}.saved_model.tmp").symlink_to(elsewhere, target_is_directory=True)
    before = tree(tmp_path)

    export(model_path, data=str(tmp_path / "data.npz"), out=out, latency_runs=2)
    export(model_path, data=str(tmp_path / "data.npz"), out=out, format="saved_model", latency_runs=2)

    written = tree(tmp_path) - before
    assert written and all(out in p.parents for p in written), sorted(map(str, written - set(out.rglob("*"))))
    assert all(path.read_bytes() == text for path, text in users.items())
    assert outside.read_bytes() == b"not ktoolkit's" and (elsewhere / "keep.txt").read_text() == "the user's"
    assert tree(tmp_path) >= before - {out / f".{stem}.saved_model.tmp"}  # nothing else removed
    tflite = out / f"{stem}.tflite"
    assert not tflite.is_symlink() and open_model(tflite).labels == ["0", "1", "2"]
    assert (out / f"{stem}.saved_model" / "saved_model.pb").is_file()
    assert "# Export of ../../escape/NAME" in (out / "export_report.md").read_text()  # shown, not used as a path


def test_a_folder_that_is_not_a_saved_model_is_not_deleted(tmp_path):
    from ktoolkit.export.workflow import _remove_previous

    folder = tmp_path / "tiny_float32.saved_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a SavedModel"):
        _remove_previous(folder)
    assert (folder / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("mode", "fmt", "setting", "flag"),
    [
        ("int8", "tflite", {"sparsity": 0.5}, "--sparsity"),
        ("prune", "tflite", {"clusters": 8}, "--clusters"),
        ("float32", "tflite", {"epochs": 1}, "--epochs"),
        ("int8", "tflite", {"lr": 1e-4}, "--lr"),
        ("float32", "tflite", {"steps_per_epoch": 5}, "--steps-per-epoch"),
        ("float16", "tflite", {"int8_io": True}, "--int8-io"),
        ("int8", "onnx", {"int8_io": True}, "--int8-io"),
        ("dynamic", "tflite", {"calib_samples": 50}, "--calib-samples"),
    ],
)
def test_a_setting_the_modes_ignore_is_refused(mode, fmt, setting, flag, tmp_path):
    ((name, value),) = setting.items()
    with pytest.raises(ValueError, match=rf"^{name}={value!r} \({flag}\) does nothing in mode {mode} \(format {fmt}\)"):
        export(tmp_path / "never-read", mode=mode, format=fmt, **setting)


def test_a_setting_one_of_the_modes_uses_is_accepted():
    from ktoolkit.export.workflow import TUNABLE_DEFAULTS, _modes, _tunables

    given = dict.fromkeys(TUNABLE_DEFAULTS)
    assert _tunables(_modes("int8", "prune"), "tflite", {**given, "sparsity": 0.5})["sparsity"] == 0.5
    assert _tunables(_modes("float32", None), "tflite", {**given, "int8_io": False}) == {
        **TUNABLE_DEFAULTS
    }  # False is not a request for anything; None means the mode's default


def test_the_cli_refuses_an_ignored_flag_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path), "--mode", "int8", "--sparsity", "0.5"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: sparsity=0.5 (--sparsity) does nothing in mode int8" in result.output
    assert len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------- bounded reads
def test_a_large_member_appended_to_a_tflite_is_never_read(tflite_bytes, tmp_path):
    content = appended(with_labels(tflite_bytes, ["a", "b", "c"]), "big.bin", b"\0" * (50 * 2**20))
    path = tmp_path / "big.tflite"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        labels, meta = packed_labels(content), read_metadata(content)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels == ["a", "b", "c"] and list(meta["files"]) == ["labels.txt"]
    assert peak < 20 * 2**20, peak
    assert open_model(path).labels == ["a", "b", "c"]


def test_packed_labels_over_the_cap_are_refused_before_they_are_read(tflite_bytes, tmp_path):
    big = tmp_path / "big_labels.tflite"
    big.write_bytes(appended(tflite_bytes, "labels.txt", b"x\n" * MAX_LABELS_BYTES))
    with pytest.raises(ValueError, match=r"big_labels\.tflite: the packed 'labels\.txt' .* over the"):
        open_model(big)
    # a zip bomb: 200 MB of labels that deflate to a few hundred KB
    bomb = appended(tflite_bytes, "labels.txt", b"a\n" * (100 * 2**20), compression=zipfile.ZIP_DEFLATED)
    assert len(bomb) < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="over the"):
            packed_labels(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak
    with pytest.raises(ValueError, match="larger than 10 bytes"):  # a member that lies about its size
        read_capped(io.BytesIO(b"y" * 1000), 10, "labels.txt")


def test_a_labels_file_beside_the_model_is_capped(tflite_bytes, tmp_path):
    path = tmp_path / "plain.tflite"
    path.write_bytes(tflite_bytes)
    (tmp_path / "labels.txt").write_bytes(b"x" * (MAX_LABELS_BYTES + 1))
    with pytest.raises(ValueError, match=r"plain\.tflite: .*labels\.txt is larger than"):
        open_model(path)
    (tmp_path / "labels.txt").write_text("\x1b[31mred\n\nblue\x07\ngreen\n")
    assert open_model(path).labels == ["red", "blue", "green"]


def test_an_archive_with_thousands_of_members_is_refused(tflite_bytes):
    out = io.BytesIO(tflite_bytes)
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a") as archive:
        for i in range(200):
            archive.writestr(f"f{i}", b"")
    with pytest.raises(ValueError, match="lists 200 files"):
        packed_labels(out.getvalue())


def test_a_model_file_over_the_size_cap_is_not_read(tflite_bytes, tmp_path, monkeypatch):
    from tflite_export import runtime

    path = tmp_path / "huge.tflite"
    path.write_bytes(tflite_bytes)
    monkeypatch.setattr(runtime, "MAX_MODEL_BYTES", len(tflite_bytes) - 1)
    with pytest.raises(ValueError, match=r"huge\.tflite is .* GiB, over the"):
        open_model(path)


# ------------------------------------------------------------------------------------- what is printed
def test_labels_with_escape_sequences_come_out_sanitized(tflite_bytes, tmp_path):
    from PIL import Image

    from ktoolkit.predict import predict_files

    model = tmp_path / "hostile.tflite"
    model.write_bytes(with_labels(tflite_bytes, HOSTILE_LABELS))
    image = tmp_path / "x.png"
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(image)
    [prediction] = predict_files(model, [image], top_k=3)
    assert sorted(label for label, _ in prediction.top) == ["bird", "cat", "dog"]
    result = CliRunner().invoke(main, ["predict", "--model", str(model), str(image), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\x1b\x07\x9b") and "cat" in result.output


# ------------------------------------------------------------------------------------- broken files
def test_random_and_truncated_files_give_one_value_error_naming_the_file(tflite_bytes, tmp_path):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["predictions"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2, 2, 1])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, [None, 2, 2, 1])],
    )
    onnx_bytes = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    assert open_model((onnx_bytes, "onnx")).input_shape == (2, 2, 1)  # the intact file loads
    rng = np.random.default_rng(0)
    files = {
        "random.tflite": rng.bytes(3000),
        "truncated.tflite": tflite_bytes[: len(tflite_bytes) // 2],
        "empty.tflite": b"",
        "random.onnx": rng.bytes(3000),
        "truncated.onnx": onnx_bytes[:-7],
        "empty.onnx": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"^{tmp_path / name}[: ]"):
            open_model(tmp_path / name)
    for args in (
        ["predict", "--model", str(tmp_path / "random.tflite"), str(tmp_path / "x.png")],
        ["benchmark", str(tmp_path / "truncated.onnx"), "--threads", "1", "--runs", "1"],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1


def test_an_onnx_file_that_reads_external_data_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weights = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", "4")):
        weights.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "w"], ["predictions"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2, 2, 1])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, [None, 2, 2, 1])],
        [weights],
    )
    path = tmp_path / "external.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"\0\0\x80\x3f")  # what onnxruntime would read from the working folder
    with pytest.raises(ValueError, match=r"external\.onnx has tensors stored in external files"):
        open_model(path)


def test_a_corrupt_metadata_flatbuffer_never_crashes_the_reader(tflite_bytes):
    content = with_labels(tflite_bytes, ["a", "b", "c"])
    start = content.index(b"M001") - 4  # the metadata flatbuffer, inside the model's buffers
    meta = bytearray(content)
    meta[start : start + 4] = (10**9).to_bytes(4, "little")  # the root table far outside the buffer
    with pytest.raises(ValueError, match="outside the"):
        read_metadata(bytes(meta))
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(400):  # random corruption anywhere in the model or its metadata, never a crash
        broken = bytearray(content)
        for at in rng.integers(0, len(tflite_bytes) + 600, rng.integers(1, 6)):
            broken[min(at, len(broken) - 1)] = int(rng.integers(0, 256))
        try:
            outcomes.add(type(read_metadata(bytes(broken))).__name__)
        except ValueError:
            outcomes.add("ValueError")
    assert "ValueError" in outcomes and outcomes <= {"ValueError", "dict", "NoneType"}
    path_like = content[:start] + b"\xff" * 40 + content[start + 40 :]  # the runner does not need the metadata
    assert open_model((path_like, "tflite")).labels == ["a", "b", "c"]


def test_an_image_input_too_large_to_allocate_is_refused():
    from tflite_export.runtime import _image_shape

    assert _image_shape([None, 224, 224, 3]) == (224, 224, 3)
    for shape in ([1, 10**6, 10**6, 3], [1, 8, 8], [1, "height", 8, 3], [1, 8, 8, 0]):
        with pytest.raises(ValueError, match="is not an image classifier ktoolkit can run"):
            _image_shape(shape)
