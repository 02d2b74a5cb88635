"""ktoolkit.runs.open_classifier: the one way a classifier is read back from a run folder or a file."""

import json

import pytest

from ktoolkit.evaluate import evaluate_run
from ktoolkit.io import save_model
from ktoolkit.runs import open_classifier


def tiny_classifier(classes=3):
    import tf_keras

    inputs = tf_keras.Input((8, 8, 3))
    outputs = tf_keras.layers.Dense(classes, activation="softmax")(tf_keras.layers.Flatten()(inputs))
    return tf_keras.Model(inputs, outputs, name="tiny")


def test_a_run_folder_gives_its_best_model_and_classes_and_printable_labels(tmp_path):
    save_model(tiny_classifier(), tmp_path / "best.keras")
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "\x1b[2Jdog", "\x07"]))
    classifier = open_classifier(tmp_path)
    assert classifier.path == tmp_path / "best.keras" and classifier.run.root == tmp_path
    assert classifier.class_names == ["cat", "\x1b[2Jdog", "\x07"]
    assert classifier.labels == ["cat", "dog", "2"]


def test_a_file_without_a_run_has_numbered_classes(tmp_path):
    path = tmp_path / "model.keras"
    save_model(tiny_classifier(2), path)
    classifier = open_classifier(path)
    assert classifier.run is None and classifier.class_names == ["0", "1"]


def test_evaluate_checks_the_outputs_against_classes_json(tmp_path):
    save_model(tiny_classifier(3), tmp_path / "best.keras")
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))
    with pytest.raises(ValueError, match="has 3 outputs but its classes.json lists 2 classes"):
        evaluate_run(tmp_path, data=str(tmp_path))
