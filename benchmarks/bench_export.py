"""Export benchmarks, measured side by side in one run and reported as ratios.

- size: int8 .tflite / float32 .tflite, ResNet-18 and MobileNetV2 (ImageNet) at 224x224, and the
  flowers5 MobileNetV2 at 128x128. Target <= 0.27.
- speed: int8 / float32 single-image latency with XNNPACK at 2 threads, same models, rounds
  alternating between the two files. Target <= 0.6.
- accuracy: on the held-out test split, int8 post-training quantization within 1 point and
  quantization-aware training within 0.5 point of the float32 file: LeNet-5 on scikit-learn's
  digits, and MobileNetV2 with the shared ImageNet weights on flowers5 (the base frozen, a linear
  head trained on its features; QAT then fine-tunes everything briefly).
- compression, in the spirit of Deep Compression (Han et al. 2016, LeNet-5 39x, LeNet-300-100 40x
  with no accuracy loss): pruning + clustering + int8, gzipped .tflite against the float32 .keras
  file (without optimizer state), at most 1 point of accuracy lost.

ResNet-18 has random weights (latency and size do not depend on them); the digits and flowers5
models are trained here, and their numbers come from `ktool export`'s own pipeline
(ktoolkit.export). The 224x224 speed models have no run to export and are converted directly.

    python benchmarks/bench_export.py [--flowers ../shared/data/flowers5] [--weights ../shared/weights]
                                      [--work /tmp/bench_export] [--skip-flowers]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from _common import FLOWERS, WEIGHTS, need, table

MOBILENET_NO_TOP = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
MOBILENET_TOP = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flowers", default=str(FLOWERS))
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--work", default="/tmp/bench_export", help="Folder for the runs and exported files.")
    parser.add_argument("--size", type=int, default=128, help="MobileNetV2 input size on flowers5.")
    parser.add_argument("--rounds", type=int, default=5, help="Alternating latency rounds per model.")
    parser.add_argument("--skip-flowers", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {}

    digits = make_digits(work / "digits.npz")
    results["digits"] = digits_accuracy(digits, work)
    results["compression"] = compression(digits, work)
    if not args.skip_flowers:
        results["flowers"] = flowers(
            need(Path(args.flowers), "flowers5"),
            need(Path(args.weights) / MOBILENET_NO_TOP, "MobileNetV2 weights"),
            work,
            args.size,
        )
    files = speed_files(work, Path(args.flowers), Path(args.weights))
    if "flowers" in results:
        files["mobilenet_v2_flowers_128"] = results["flowers"]["files"]
    results["speed"] = {name: latency_ratio(f, args.rounds) for name, f in files.items()}
    results["seconds"] = round(time.time() - started)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print_summary(results)


def make_digits(path: Path) -> str:
    """scikit-learn's 1,797 real 8x8 digits as a uint8 .npz, as the tests make them."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype("uint8")[..., None]
    np.savez(path, x=x, y=d.target.astype("int64"), class_names=np.array([str(i) for i in range(10)]))
    return str(path)


def train_digits(digits, work, name, recipe, options, epochs=30):
    """A trained run on the digits with a 20% held-out test split (1 image = 0.28 points)."""
    from ktoolkit.train import TrainConfig, train

    out = work / name
    if not (out / "state.json").exists() or not json.loads((out / "state.json").read_text()).get("complete"):
        train(
            TrainConfig(
                recipe=recipe,
                data=digits,
                out=str(out),
                epochs=epochs,
                lr=2e-3,
                schedule="cosine",
                augment="none",
                test_fraction=0.2,
                channels=1,
                image_size=(32, 32),
                recipe_options=options,
            ),
            overwrite=True,
        )
    return out


def summarize(result):
    rows = {}
    for f in result.files:
        v = f.verification
        rows[f.mode] = {
            "file": str(f.path),
            "bytes": f.size_bytes,
            "gzip_bytes": f.gzip_bytes,
            "accuracy": v.accuracy,
            "keras_accuracy": v.keras_accuracy,
            "drop_points": v.accuracy_drop,
            "agreement": v.agreement,
            "passed": f.passed,
            "seconds": round(f.seconds, 1),
        }
    return rows


def digits_accuracy(digits, work):
    from ktoolkit.export import export

    run = train_digits(digits, work, "lenet5_digits", "lenet5", {"activation": "relu", "subsampling": "max"})
    result = export(
        run, mode="float32", compare="int8,qat", epochs=2, max_accuracy_drop=100, out=work / "lenet5_export"
    )
    return summarize(result)


def compression(digits, work):
    """prune-cluster-int8 on LeNet-5 and LeNet-300-100 (the mlp recipe with 300 and 100 hidden units)."""
    from ktoolkit.export import export

    rows = {}
    for name, recipe, options, sparsity, clusters, epochs in (
        ("lenet5", "lenet5", {"activation": "relu", "subsampling": "max"}, 0.9, 4, 12),
        ("lenet_300_100", "mlp", {"hidden_units": [300, 100]}, 0.9, 4, 16),
    ):
        run = train_digits(digits, work, f"{name}_digits", recipe, options)
        result = export(
            run,
            mode="float32",
            compare="prune-cluster-int8",
            sparsity=sparsity,
            clusters=clusters,
            epochs=epochs,
            max_accuracy_drop=100,
            out=work / f"{name}_compressed",
        )
        report = json.loads(result.report["json"].read_text())
        keras_bytes = report["source"]["keras_file_bytes"]
        files = summarize(result)
        compressed = files["prune-cluster-int8"]
        rows[name] = {
            "keras_bytes": keras_bytes,
            "sparsity": sparsity,
            "clusters": clusters,
            "epochs": epochs,
            "gzip_bytes": compressed["gzip_bytes"],
            "ratio": keras_bytes / compressed["gzip_bytes"],
            "drop_points": compressed["drop_points"],
            "accuracy": compressed["accuracy"],
            "keras_accuracy": compressed["keras_accuracy"],
            "notes": [n for e in report["exports"] for n in e["notes"] if e["mode"] == "prune-cluster-int8"],
        }
    return rows


def flowers(folder, weights, work, size):
    """MobileNetV2 (ImageNet weights, frozen) + a linear head trained on its pooled features, as a run
    folder with the default 80/10/10 split, then exported as float32, int8 and QAT."""
    import numpy as np
    import tf_keras
    import yaml

    from ktoolkit.data import load_data, make_dataset
    from ktoolkit.export import export
    from ktoolkit.io import save_model, write_json, write_text
    from recipes.layers import custom_layers

    run = work / "mobilenet_v2_flowers"
    if not (run / "best.keras").exists():
        source = load_data(str(folder), val_fraction=0.1, test_fraction=0.1, seed=0)
        inputs = tf_keras.Input((size, size, 3), name="input")
        x = custom_layers("tf_keras").ImagePreprocessing("tf", name="preprocessing")(inputs)
        base = tf_keras.applications.MobileNetV2(
            include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
        )
        base.load_weights(str(weights))
        features = tf_keras.Model(inputs, base(x))

        def embed(split):
            ds = make_dataset(
                source.splits[split],
                num_classes=source.num_classes,
                image_size=(size, size),
                batch_size=64,
                one_hot=True,
            )
            return features.predict(ds, verbose=0), np.concatenate([y for _, y in ds.as_numpy_iterator()])

        (xtr, ytr), (xva, yva) = embed("train"), embed("val")
        head = tf_keras.layers.Dense(source.num_classes, activation="softmax", name="predictions")
        probe = tf_keras.Sequential([tf_keras.Input((xtr.shape[1],)), head])
        probe.compile(tf_keras.optimizers.Adam(1e-3), "categorical_crossentropy", ["accuracy"])
        probe.fit(
            xtr,
            ytr,
            validation_data=(xva, yva),
            epochs=30,
            batch_size=64,
            verbose=0,
            callbacks=[tf_keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True)],
        )
        model = tf_keras.Model(inputs, head(features.output), name="mobilenet_v2")
        save_model(model, run / "best.keras")
        write_json(run / "classes.json", list(source.class_names))
        write_text(run / "labels.txt", "\n".join(source.class_names) + "\n")
        write_text(
            run / "config.yaml",
            yaml.safe_dump(
                {
                    "recipe": "mobilenet_v2 (ImageNet) + linear head",
                    "data": str(folder),
                    "val_fraction": 0.1,
                    "test_fraction": 0.1,
                    "seed": 0,
                    "image_size": [size, size],
                }
            ),
        )
    result = export(
        run,
        mode="float32",
        compare="int8,qat",
        epochs=1,
        steps_per_epoch=60,
        lr=1e-5,
        max_accuracy_drop=100,
        out=work / "mobilenet_v2_export",
    )
    rows = summarize(result)
    return {"files": {m: r["file"] for m, r in rows.items()}, **rows}


def speed_files(work, flowers_folder, weights_folder):
    """float32 and int8 .tflite files at 224x224 of ResNet-18 (the recipe, random weights: latency and
    size do not depend on them) and MobileNetV2 (ImageNet, 1000 classes), calibrated on 50 flower
    photos; no run to export, so they are converted directly."""
    import numpy as np
    import tf_keras
    from PIL import Image

    import recipes
    from tflite_export.convert import to_tflite

    photos = sorted(flowers_folder.rglob("*.jpg"))[::80][:50] if flowers_folder.exists() else []
    images = (
        np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224)), dtype=np.float32) for p in photos])
        if photos
        else np.random.default_rng(0).uniform(0, 255, (50, 224, 224, 3)).astype(np.float32)
    )

    def mobilenet():
        from recipes.layers import custom_layers

        inputs = tf_keras.Input((224, 224, 3), name="input")
        base = tf_keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
        base.load_weights(str(weights_folder / MOBILENET_TOP))
        return tf_keras.Model(inputs, base(custom_layers("tf_keras").ImagePreprocessing("tf")(inputs)))

    models = {"resnet18_224": lambda: recipes.build("resnet18", input_shape=(224, 224, 3), num_classes=5)}
    if (weights_folder / MOBILENET_TOP).exists():
        models["mobilenet_v2_224"] = mobilenet
    found = {}
    for name, build in models.items():
        files = {"float32": work / name / f"{name}_float32.tflite", "int8": work / name / f"{name}_int8.tflite"}
        if not all(p.exists() for p in files.values()):
            files["float32"].parent.mkdir(exist_ok=True)
            model = build()
            files["float32"].write_bytes(to_tflite(model))
            files["int8"].write_bytes(to_tflite(model, "int8", representative=images))
        found[name] = {mode: str(path) for mode, path in files.items()}
    return found


def latency_ratio(files, rounds):
    """int8 / float32 single-image latency at 2 threads, XNNPACK; rounds alternate between the files."""
    from tflite_export.runtime import benchmark

    p50 = {"float32": [], "int8": []}
    for _ in range(rounds):
        for mode in ("float32", "int8"):
            p50[mode].append(benchmark(files[mode], threads=(2,), runs=30, warmup=5)[0]["p50_ms"])
    sizes = {mode: Path(files[mode]).stat().st_size for mode in ("float32", "int8")}
    f32, i8 = statistics.median(p50["float32"]), statistics.median(p50["int8"])
    return {
        "float32_ms": f32,
        "int8_ms": i8,
        "latency_ratio": i8 / f32,
        "float32_bytes": sizes["float32"],
        "int8_bytes": sizes["int8"],
        "size_ratio": sizes["int8"] / sizes["float32"],
        "rounds": p50,
    }


def print_summary(results):
    rows = []
    for model, s in results["speed"].items():
        rows.append(
            (
                f"{model} size int8/float32",
                f"{s['size_ratio']:.3f}",
                "<= 0.27",
                f"{s['int8_bytes'] / 2**20:.2f} / {s['float32_bytes'] / 2**20:.2f} MB",
            )
        )
        rows.append(
            (
                f"{model} latency int8/float32 (2 threads)",
                f"{s['latency_ratio']:.2f}",
                "<= 0.6",
                f"{s['int8_ms']:.1f} / {s['float32_ms']:.1f} ms (median p50 of {len(s['rounds']['int8'])} rounds)",
            )
        )
    for name in ("digits", "flowers"):
        if name not in results:
            continue
        r = results[name]
        base = r["float32"]["accuracy"]
        for mode, target in (("int8", 1.0), ("qat", 0.5)):
            drop = 100 * (base - r[mode]["accuracy"])
            rows.append(
                (
                    f"{name} {mode} drop vs float32 file (points)",
                    f"{drop:+.2f}",
                    f"<= {target}",
                    f"{100 * r[mode]['accuracy']:.2f}% vs {100 * base:.2f}%",
                )
            )
    for name, c in results["compression"].items():
        detail = (
            f"{c['gzip_bytes'] / 1024:.1f} KB vs {c['keras_bytes'] / 1024:.0f} KB; accuracy "
            f"{100 * c['accuracy']:.2f}% vs {100 * c['keras_accuracy']:.2f}% (sparsity {c['sparsity']}, "
            f"{c['clusters']} clusters, {c['epochs']} epochs/step)"
        )
        rows.append(
            (f"{name} prune+cluster+int8, gzip vs float32 .keras", f"{c['ratio']:.1f}x", "aim 35x, <= 1 point", detail)
        )
    print(table(rows, ("measure", "value", "target", "detail")))
    print(f"total {results['seconds']} s")


if __name__ == "__main__":
    main()
