"""Atomic writes: a failure while writing leaves the previous file whole and no temporary files."""

import json

import pytest

from ktoolkit.io import atomic_path, save_model, write_json


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"accuracy": 0.')  # half written, then the process "dies"
            raise RuntimeError("crash")
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_models_are_replaced_whole(tmp_path):
    import recipes

    path = tmp_path / "best.keras"
    first = recipes.lenet5(num_classes=3)
    save_model(first, path)
    second = recipes.lenet5(num_classes=3)
    save_model(second, path)
    import numpy as np

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(recipes.load_model(path)(x).numpy(), second(x).numpy(), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras"]


def test_saved_models_leave_the_optimizer_state_out(tmp_path):
    """A compiled, trained model is saved with its weights only: same outputs, a third of Adam's file."""
    import io
    import zipfile

    import h5py
    import numpy as np
    import tf_keras

    import recipes

    model = recipes.build("lenet5", num_classes=3)
    model.compile(tf_keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    model.fit(x, np.arange(8) % 3, epochs=1, verbose=0)
    save_model(model, tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        assert "optimizer" not in weights
    loaded = recipes.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    model.save(tmp_path / "with_optimizer.keras")  # what Keras writes by default
    assert (tmp_path / "m.keras").stat().st_size < 0.5 * (tmp_path / "with_optimizer.keras").stat().st_size
