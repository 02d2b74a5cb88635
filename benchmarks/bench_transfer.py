"""Transfer-learning strategies side by side, with real ImageNet MobileNetV2 weights (../shared/weights).

For each dataset: accuracy on the held-out test split and wall-clock time of every strategy, and of
"the usual Keras recipe" (frozen base, new head, `fit` for 10 epochs) as the baseline. The cached
linear strategy is timed twice: cold (features computed) and warm (features from the cache).

    python benchmarks/bench_transfer.py                       # flowers5 + digits (+ Fashion-MNIST if installed)
    python benchmarks/bench_transfer.py --datasets digits --size 64
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import FLOWERS, WEIGHTS, need, table

FASHION = Path("/usr/share/datasets/fashion-mnist")


def digits_npz(folder: Path) -> str:
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    path = folder / "digits.npz"
    np.savez(
        path,
        x=(d.images * 255 / 16).round().astype("uint8")[..., None],
        y=d.target,
        class_names=np.array([str(i) for i in range(10)]),
    )
    return str(path)


def fashion_npz(folder: Path, n: int = 6000) -> str | None:
    import numpy as np

    if not FASHION.exists():
        return None
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype("int64")
    path = folder / "fashion.npz"
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    np.savez(path, x=x[:n], y=y[:n], class_names=np.array(names))
    return str(path)


def keras_recipe(data: str, weights: str, size: int, epochs: int = 10):
    """The usual recipe: MobileNetV2 frozen, GAP + Dense, fit (Adam 1e-3) on the same splits."""
    import tf_keras

    from ktoolkit.data import load_data, make_dataset
    from ktoolkit.evaluate import evaluate_model

    started = time.perf_counter()
    source = load_data(data)
    base = tf_keras.applications.MobileNetV2(include_top=False, weights=weights, input_shape=(size, size, 3))
    base.trainable = False
    inputs = tf_keras.Input((size, size, 3))
    x = tf_keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    outputs = tf_keras.layers.Dense(source.num_classes, activation="softmax")(
        tf_keras.layers.GlobalAveragePooling2D()(x)
    )
    model = tf_keras.Model(inputs, outputs)
    model.compile(tf_keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])

    def ds(split, training):
        return make_dataset(
            source.splits[split],
            num_classes=source.num_classes,
            image_size=(size, size),
            channels=3,
            batch_size=32,
            training=training,
            cache="memory",
        )

    model.fit(ds("train", True), validation_data=ds("val", False), epochs=epochs, verbose=0)
    seconds = time.perf_counter() - started
    accuracy = evaluate_model(model, ds("test", False), source.class_names).accuracy
    return accuracy, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="flowers5,digits,fashion")
    parser.add_argument("--size", type=int, default=128, help="image size (square)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the finetune and full strategies")
    parser.add_argument(
        "--weights", default=str(WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
    )
    args = parser.parse_args()
    need(Path(args.weights), "MobileNetV2 ImageNet weights")
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    os.environ["KTOOLKIT_CACHE_DIR"] = str(work / "cache")

    # Imports before any clock starts (TensorFlow, tf_keras, scikit-learn: several seconds), so neither
    # side pays them.
    import sklearn.linear_model  # noqa: F401
    import tf_keras  # noqa: F401

    import ktoolkit.evaluate  # noqa: F401
    import ktoolkit.report  # noqa: F401
    from ktoolkit.transfer.finetune import FinetuneConfig, finetune

    sources = {"flowers5": str(need(FLOWERS, "flowers5")), "digits": digits_npz(work), "fashion": fashion_npz(work)}
    for name in args.datasets.split(","):
        data = sources.get(name)
        if data is None:
            print(f"{name}: not available, skipped")
            continue
        rows, decision = [], None
        baseline_acc, baseline_s = keras_recipe(data, args.weights, args.size)
        rows.append(
            ["keras recipe: frozen base + head, fit 10 epochs", f"{baseline_acc:.1%}", f"{baseline_s:.1f}", "1.00"]
        )
        runs = [
            ("linear", "linear (cold cache)"),
            ("linear", "linear (warm cache)"),
            ("linear-early", "linear-early"),
            ("finetune", f"finetune ({args.epochs} epochs)"),
            ("full", f"full ({args.epochs} epochs)"),
        ]
        for i, (strategy, label) in enumerate(runs):
            config = FinetuneConfig(
                base="mobilenet_v2",
                weights=args.weights,
                data=data,
                out=str(work / f"{name}_{i}"),
                strategy=strategy,
                image_size=(args.size, args.size),
                epochs=args.epochs,
            )
            started = time.perf_counter()
            result = finetune(config)
            seconds = time.perf_counter() - started
            decision = result.advice
            extra = f" @ {result.plan['features']}" if strategy == "linear-early" else ""
            rows.append(
                [label + extra, f"{result.metrics['accuracy']:.1%}", f"{seconds:.1f}", f"{baseline_s / seconds:.2f}"]
            )
        print(f"\n## {name} ({args.size}x{args.size}, MobileNetV2 ImageNet)\n")
        print("\n".join(decision.lines()))
        print()
        print(table(rows, ["strategy", "test accuracy", "seconds", "speed-up vs keras recipe"]))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
