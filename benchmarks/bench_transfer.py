"""Transfer-learning strategies side by side, with ImageNet MobileNetV2 weights (../shared/weights).

For each dataset, on the same test images (the default stratified split, seed 0): every strategy of `ktool
finetune` (linear cold and warm, linear-early, knn, finetune, full) and `auto`, and two baselines written here:

- the careful practitioner: scikit-learn's LogisticRegressionCV (5-fold, 10 Cs, standardized features) on the
  same base's pooled top features of ALL non-test images (train + val), at the input size auto chose;
- the usual Keras recipe: the frozen base, a new Dense head, `fit` for 10 epochs (Adam 1e-3) on the train split.

Each row: test accuracy with its 95% Wilson interval and image count, and wall time. Also the floor ratio: the
cold linear strategy's time over one plain forward pass of the base over the same images (target <= 1.5), and the
speed-up of cold linear over the Keras recipe (target >= 5). Imports happen before any clock starts.

    python benchmarks/bench_transfer.py                                   # digits, fashion, cifar10, flowers5
    python benchmarks/bench_transfer.py --datasets digits --strategies linear,knn,auto
    python benchmarks/bench_transfer.py --datasets pair     # 245 photos of 2 classes, tested on 153 others
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import FLOWERS, SHARED, WEIGHTS, need, table, without_conflicts

FASHION = Path("/usr/share/datasets/fashion-mnist")
CIFAR = SHARED / "data" / "cifar10_1k"
STRATEGIES = ("linear", "linear-warm", "linear-early", "knn", "finetune", "full", "auto")


def digits_npz(folder: Path) -> str:
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    path = folder / "digits.npz"
    x = (d.images * 255 / 16).round().astype("uint8")[..., None]
    np.savez(path, x=x, y=d.target, class_names=np.array([str(i) for i in range(10)]))
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


def small_pair(folder: Path) -> tuple[str, str]:
    """The hymenoptera-like case of issue 14 from flowers5: one folder of 245 photos of two classes (rose 122,
    tulip 123: the pair flowers5 confuses most) to train on, and 153 other photos of them to test on."""
    train, test = folder / "pair-train", folder / "pair-test"
    for name, (n_train, n_test) in {"rose": (122, 76), "tulip": (123, 77)}.items():
        files = sorted((FLOWERS / name).iterdir())
        for target, chosen in ((train, files[:n_train]), (test, files[n_train : n_train + n_test])):
            (target / name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy(f, target / name / f.name)
    return str(train), str(test)


def bench_pair(args, work: Path):
    """auto on all 245 photos (no test split carved out), tested on the 153 others, vs the practitioner."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ktoolkit.data import load_data
    from ktoolkit.evaluate import evaluate_run
    from ktoolkit.stats import Accuracy
    from ktoolkit.transfer.bases import load_base
    from ktoolkit.transfer.features import FeatureCache, extract_features
    from ktoolkit.transfer.finetune import FinetuneConfig, finetune

    train, test = small_pair(work)
    os.environ["KTOOLKIT_CACHE_DIR"] = str(work / "cache-pair")
    rows = []
    for test_fraction in (0.0, 0.1):
        config = FinetuneConfig(
            base="mobilenet_v2",
            weights=args.weights,
            data=train,
            out=str(work / f"pair-{test_fraction}"),
            test_fraction=test_fraction,
        )
        started = time.perf_counter()
        result = finetune(config)
        seconds = time.perf_counter() - started
        metrics, _ = evaluate_run(str(result.run.root), data=test)
        own = Accuracy.from_metrics(result.metrics) if result.metrics.get("images") else None
        cv = result.metrics.get("cv")
        rows.append(
            [
                f"ktool finetune (auto -> {result.strategy}), test_fraction {test_fraction}",
                accuracy_cell(Accuracy.from_metrics(metrics)),
                f"{seconds:.1f}",
                (f"run's own test {accuracy_cell(own)}; " if own else "")
                + (f"CV {cv['accuracy']:.1%} on {cv['images']}" if cv else ""),
            ]
        )
        size = tuple(json.loads((result.run.root / "data.json").read_text())["image_size"])
    base = load_base("mobilenet_v2", weights=args.weights, image_size=size)
    started = time.perf_counter()

    def features(data):
        split = load_data(data, val_fraction=0.0, test_fraction=0.0).splits["train"]
        x = extract_features(
            base.model, [base.top], split, image_size=base.image_size, channels=3, cache=FeatureCache()
        )
        return x[base.top], np.asarray(split.labels)

    (x, y), (tx, ty) = features(train), features(test)
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=5, max_iter=1000)).fit(x, y)
    rows.append(
        [
            f"practitioner: LogisticRegressionCV on all {len(y)}",
            accuracy_cell(Accuracy.of(clf.predict(tx), ty)),
            f"{time.perf_counter() - started:.1f}",
            "warm features",
        ]
    )
    print(f"\n### small pair (flowers5 rose/tulip: 245 photos to learn from, 153 to test) at {size[0]}x{size[1]}\n")
    print(table(rows, ["strategy", "accuracy on the 153 [95% CI] (images)", "seconds", "notes"]))


def accuracy_cell(acc) -> str:
    low, high = acc.interval
    return f"{acc.value:.1%} [{100 * low:.1f}, {100 * high:.1f}] ({acc.images:,})"


def run_strategy(data: str, weights: str, out: Path, strategy: str, size, epochs, cache: Path, cold: bool):
    """One `finetune` call, timed; returns (result, seconds, accuracy on the test split)."""
    from ktoolkit.stats import Accuracy
    from ktoolkit.transfer.finetune import FinetuneConfig, finetune

    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    os.environ["KTOOLKIT_CACHE_DIR"] = str(cache)
    config = FinetuneConfig(
        base="mobilenet_v2",
        weights=weights,
        data=data,
        out=str(out),
        strategy=strategy,
        image_size=size,
        epochs=epochs,
    )
    started = time.perf_counter()
    result = finetune(config)
    seconds = time.perf_counter() - started
    return result, seconds, Accuracy.from_metrics(result.metrics)


def practitioner(data: str, weights: str, size, cache: Path):
    """LogisticRegressionCV on the base's pooled top features of train+val, scored on test."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ktoolkit.data import load_data
    from ktoolkit.stats import Accuracy
    from ktoolkit.transfer.bases import load_base
    from ktoolkit.transfer.features import FeatureCache, extract_features

    os.environ["KTOOLKIT_CACHE_DIR"] = str(cache)
    started = time.perf_counter()
    source = load_data(data)
    base = load_base("mobilenet_v2", weights=weights, image_size=size)

    def features(name):
        split = source.splits[name]
        x = extract_features(
            base.model, [base.top], split, image_size=base.image_size, channels=3, cache=FeatureCache()
        )
        return x[base.top], np.asarray(split.labels)

    parts = [features(s) for s in ("train", "val") if len(source.splits.get(s) or [])]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x, test_y = features("test")
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=5, max_iter=1000, n_jobs=1))
    clf.fit(x, y)
    return Accuracy.of(clf.predict(test_x), test_y), time.perf_counter() - started, len(y)


def forward_floor(data: str, weights: str, size) -> float:
    """Seconds of one plain forward pass of the base over every image (decode + resize + predict)."""
    from ktoolkit.data import load_data, make_dataset
    from ktoolkit.transfer.bases import load_base

    source = load_data(data)
    base = load_base("mobilenet_v2", weights=weights, image_size=size)
    started = time.perf_counter()
    for split in source.splits.values():
        if len(split):
            ds = make_dataset(
                split,
                num_classes=source.num_classes,
                image_size=base.image_size,
                channels=3,
                batch_size=64,
                training=False,
                cache=None,
            )
            base.model.predict(ds.map(lambda x, y: x), verbose=0)
    return time.perf_counter() - started


def keras_recipe(data: str, weights: str, size, epochs: int = 10):
    """The usual recipe: MobileNetV2 frozen, GAP + Dense, fit (Adam 1e-3) on the same splits."""
    import tf_keras

    from ktoolkit.data import load_data, make_dataset
    from ktoolkit.evaluate import evaluate_model
    from ktoolkit.stats import Accuracy

    started = time.perf_counter()
    source = load_data(data)
    shape = (*size, 3)
    base = tf_keras.applications.MobileNetV2(include_top=False, weights=weights, input_shape=shape)
    base.trainable = False
    inputs = tf_keras.Input(shape)
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
            image_size=size,
            channels=3,
            batch_size=32,
            training=training,
            cache="memory",
        )

    model.fit(ds("train", True), validation_data=ds("val", False), epochs=epochs, verbose=0)
    seconds = time.perf_counter() - started
    evaluation = evaluate_model(model, ds("test", False), source.class_names)
    return Accuracy(evaluation.correct, evaluation.images), seconds


def bench_dataset(name: str, data: str, args, work: Path):
    rows, results, cache = [], {}, work / f"cache-{name}"
    size = tuple(args.size) if args.size else None
    for strategy in args.strategies:
        cold = strategy == "linear"
        real = "linear" if strategy == "linear-warm" else strategy
        same = _auto_reuses(results) if real == "auto" else None
        if same is not None:  # auto's choice (the same advice, data and seed) already ran: not trained twice
            result, seconds, acc = results[same]
        else:
            result, seconds, acc = run_strategy(
                data, args.weights, work / f"{name}-{strategy}", real, size, args.epochs, cache, cold
            )
        results[strategy] = (result, seconds, acc)
        size = size or tuple(json.loads((result.run.root / "data.json").read_text())["image_size"])
        label = {"linear": "linear (cold cache)", "linear-warm": "linear (warm cache)"}.get(strategy, strategy)
        if real == "auto":
            label = f"auto -> {result.strategy}" + (f" (the {same} run: the same advice)" if same else "")
        detail = result.plan.get("features", "") if real in ("linear-early",) else ""
        epochs = f"{len(result.history)} epochs" if result.history else ""
        rows.append([label, accuracy_cell(acc), f"{seconds:.1f}", " ".join(x for x in (detail, epochs) if x)])
    p_acc, p_seconds, p_images = practitioner(data, args.weights, size, cache)
    rows.append(
        [
            f"practitioner: LogisticRegressionCV on {p_images:,} train+val",
            accuracy_cell(p_acc),
            f"{p_seconds:.1f}",
            "warm features",
        ]
    )
    if not args.no_keras_recipe:
        k_acc, k_seconds = keras_recipe(data, args.weights, size)
        rows.append(["keras recipe: frozen base + head, fit 10 epochs", accuracy_cell(k_acc), f"{k_seconds:.1f}", ""])
    else:
        k_seconds = None
    floor = forward_floor(data, args.weights, size)
    print(f"\n### {name} at {size[0]}x{size[1]} (MobileNetV2 ImageNet)\n")
    auto = results.get("auto")
    if auto:
        print("\n".join(auto[0].advice.lines()))
        print()
    print(table(rows, ["strategy", "test accuracy [95% CI] (images)", "seconds", "notes"]))
    verdicts(results, p_acc, floor, k_seconds)


def _auto_reuses(results) -> str | None:
    """The strategy auto would pick, when a run of it is already in ``results`` (every finetune run advises
    on the same data with the same seed, so its advice is auto's)."""
    for result, _, _ in results.values():
        chosen = result.advice.decision.strategy if getattr(result, "advice", None) else None
        if chosen in results:
            return chosen
    return None


def verdicts(results, practitioner_acc, floor: float, keras_seconds):
    trained = {k: v for k, v in results.items() if k != "linear-warm"}
    if "auto" in trained:
        best_name, (_, _, best) = max(
            ((k, v) for k, v in trained.items() if k != "auto"), key=lambda kv: kv[1][2].value
        )
        auto = trained["auto"][2]
        low, _ = best.interval
        print(
            f"\nauto {auto.value:.1%} vs best strategy ({best_name}) {best.value:.1%} [{100 * low:.1f}, ...]: "
            f"{'within the interval or above' if auto.value >= low else 'BELOW the interval'}; "
            f"vs practitioner {practitioner_acc.value:.1%}: {100 * (auto.value - practitioner_acc.value):+.1f} points "
            f"({'ok' if auto.value >= practitioner_acc.value - 0.005 else 'BELOW practitioner - 0.5'})"
        )
    if "linear" in results:
        cold = results["linear"][1]
        print(f"floor: one forward pass {floor:.1f} s; cold linear / forward = {cold / floor:.2f} (target <= 1.5)")
        if keras_seconds:
            print(f"speed-up of cold linear over the Keras recipe: {keras_seconds / cold:.2f}x (target >= 5)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,fashion,cifar10,flowers5")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"of {', '.join(STRATEGIES)}")
    parser.add_argument("--size", type=int, nargs=2, help="HEIGHT WIDTH (default: what ktoolkit picks for the data)")
    parser.add_argument("--epochs", type=int, help="epochs of finetune and full (default: ktoolkit's rule)")
    parser.add_argument("--fashion-images", type=int, default=6000, help="the first N Fashion-MNIST training images")
    parser.add_argument("--no-keras-recipe", action="store_true", help="skip the 10-epoch Keras recipe baseline")
    parser.add_argument(
        "--weights", default=str(WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
    )
    args = parser.parse_args()
    args.strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown:
        raise SystemExit(f"--strategies: unknown {', '.join(sorted(unknown))}; use {', '.join(STRATEGIES)}")
    need(Path(args.weights), "MobileNetV2 ImageNet weights")
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))

    import sklearn.linear_model  # noqa: F401  (imports before any clock starts)
    import tf_keras  # noqa: F401

    import ktoolkit.evaluate  # noqa: F401
    import ktoolkit.report  # noqa: F401
    import ktoolkit.transfer.finetune  # noqa: F401

    sources = {
        "digits": lambda: digits_npz(work),
        "fashion": lambda: fashion_npz(work, args.fashion_images),
        "cifar10": lambda: str(CIFAR) if CIFAR.exists() else None,
        "flowers5": lambda: without_conflicts(FLOWERS, work) if FLOWERS.exists() else None,
    }
    for name in args.datasets.split(","):
        if name == "pair":
            bench_pair(args, work)
            continue
        data = sources[name]() if name in sources else None
        if data is None:
            print(f"{name}: not available, skipped")
            continue
        bench_dataset(name, data, args, work)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
