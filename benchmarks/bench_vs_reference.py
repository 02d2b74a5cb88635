"""ktoolkit's int8 MobileNetV2 against Google's own, side by side in one run.

The reference is Google's post-training int8 MobileNetV2 (``../shared/reference/``, from
google-coral/test_data: uint8 input with scale 1/127.5 and zero point 127, 1001 outputs with
"background" at index 0). ``../shared/weights/`` holds the float weights recovered from it, so both
files quantize the same network. ktoolkit's file is made as a user's would be: a keras.applications
MobileNetV2 with those ImageNet weights behind ktoolkit's ``ImagePreprocessing("tf")``, converted
with ``tflite_export.convert.to_tflite(..., "int8", int8_io=True, fold_normalization=True)`` (uint8
input and output, as Google's) and given TFLite metadata with the ImageNet labels.

Measured (targets from issue 15):
- latency, ktoolkit / Google, XNNPACK at 1 and 2 threads: the files take turns invocation by
  invocation (the order rotating), ``--runs`` single-image invocations of each per repetition; the
  median of each repetition, then the median over repetitions of the per-repetition ratio. Target
  <= 1.00. On a loaded machine the ratios move by several percent from run to run.
- size, ktoolkit / Google (both with metadata and labels). Target <= 0.93.
- top-1 agreement of each file with the float Keras model, and with each other, on every image of
  flowers5 and cifar10_1k (decoded and resized to 224x224 by ktoolkit's own input pipeline, as
  training does). Google's background output is left out of its argmax (the other 1000 line up with
  Keras's). Target: ktoolkit's agreement >= Google's; the paired difference (Newcombe's interval,
  McNemar's exact test) says whether a gap is beyond noise.

Calibration: ``--calib`` flowers5 images drawn at random (seed 0). They are among the evaluation
images, so flowers5 is also reported without them; cifar10_1k is disjoint from the calibration set.
With ``--plain`` the file without ``fold_normalization`` is measured too: the normalization left in
the int8 graph as a MUL and an ADD (by scalars since issue 15; before it, by 3-vectors).

    python benchmarks/bench_vs_reference.py [--limit N] [--plain] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import SHARED, WEIGHTS, need, table

MOBILENET_TOP = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
REFERENCE = SHARED / "reference" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
SETS = {"flowers5": SHARED / "data" / "flowers5", "cifar10_1k": SHARED / "data" / "cifar10_1k"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(WEIGHTS / MOBILENET_TOP), help="MobileNetV2 1000-class .h5.")
    parser.add_argument("--reference", default=str(REFERENCE), help="Google's int8 .tflite.")
    parser.add_argument("--calib", type=int, default=200, help="flowers5 images to calibrate on.")
    parser.add_argument("--limit", type=int, default=None, help="At most this many images per set (default all).")
    parser.add_argument("--reps", type=int, default=7, help="Interleaved timing repetitions per thread count.")
    parser.add_argument("--runs", type=int, default=40, help="Timed invocations per file per repetition.")
    parser.add_argument("--plain", action="store_true", help="Also measure the file without the fold.")
    parser.add_argument(
        "--control", action="store_true", help="Also time a byte copy of Google's file: the noise floor of the ratio."
    )
    parser.add_argument("--work", default="/tmp/bench_vs_reference", help="Folder for the exported files.")
    parser.add_argument("--json", default=None, help="Write the results here too.")
    parser.add_argument("--time-spec", default=None, help=argparse.SUPPRESS)  # the timing process
    args = parser.parse_args()
    if args.time_spec:
        print(json.dumps(time_files(json.loads(args.time_spec))))
        return
    started = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = {name: image_files(need(path, name), args.limit) for name, path in SETS.items()}
    calibration_files = [sets["flowers5"][i] for i in _pick(len(sets["flowers5"]), args.calib)]

    model = build_model(need(Path(args.weights), "MobileNetV2 weights"))
    calibration = load_images(calibration_files)
    files = {"google": need(Path(args.reference), "Google's int8 MobileNetV2").read_bytes()}
    files["ktoolkit"] = export_int8(model, calibration, fold=True, work=work)
    if args.plain:
        files["ktoolkit_plain"] = export_int8(model, calibration, fold=False, work=work)
    log(f"files ready ({time.time() - started:.0f} s); timing them")

    timed = {**files, "google_copy": files["google"]} if args.control else files  # timed only, not scored
    results = {
        "files": describe(files),
        "latency": latency(timed, threads=(1, 2), reps=args.reps, runs=args.runs, image=calibration[0], work=work),
        "calibration": {"set": "flowers5", "images": len(calibration_files), "seed": 0},
    }
    calibrated = set(calibration_files)
    results["agreement"] = {}
    for name, paths in sets.items():
        top = top1(model, files, paths)
        results["agreement"][name] = agreement(top)
        if name == "flowers5":
            keep = np.array([p not in calibrated for p in paths])
            results["agreement"]["flowers5 without calibration"] = agreement({k: v[keep] for k, v in top.items()})
    results["seconds"] = round(time.time() - started)
    print_results(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pick(n: int, count: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(n, size=min(count, n), replace=False))


def image_files(root: Path, limit: int | None) -> list[str]:
    """The images of a class-per-folder set, sorted; with ``limit``, that many drawn evenly at random (seed 1)."""
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit and limit < len(paths):
        paths = [paths[i] for i in np.sort(np.random.default_rng(1).choice(len(paths), size=limit, replace=False))]
    return paths


def batches(paths: list[str], batch_size: int = 64):
    """224x224 RGB float32 batches of 0..255 pixels, decoded and resized by ktoolkit's input pipeline."""
    from ktoolkit.data import split_dataset
    from ktoolkit.data.sources import Split

    split = Split(name="test", labels=np.zeros(len(paths), np.int64), paths=list(paths))
    dataset = split_dataset(
        split, num_classes=1, image_size=(224, 224), channels=3, batch_size=batch_size, training=False
    )
    for images, _ in dataset:
        yield np.asarray(images)


def load_images(paths: list[str]) -> np.ndarray:
    return np.concatenate(list(batches(paths)))


def build_model(weights: Path):
    """ImageNet MobileNetV2 (1000 classes) taking 0..255 RGB pixels: ktoolkit's ImagePreprocessing("tf")
    in front of keras.applications' network, as ktoolkit's transfer bases are built."""
    import tf_keras

    from recipes.layers import custom_layers

    inputs = tf_keras.Input((224, 224, 3), name="image")
    x = custom_layers("tf_keras").ImagePreprocessing("tf", name="preprocessing")(inputs)
    network = tf_keras.applications.MobileNetV2(weights=str(weights), include_top=True, input_tensor=x)
    return tf_keras.Model(inputs, network.output, name="mobilenet_v2")


def export_int8(model, calibration: np.ndarray, *, fold: bool, work: Path) -> bytes:
    """ktoolkit's int8 file (uint8 input and output) with metadata and the ImageNet labels."""
    from tflite_export.convert import to_tflite
    from tflite_export.metadata import ModelInfo, add_metadata, input_normalization

    started = time.time()
    content = to_tflite(model, "int8", representative=calibration, int8_io=True, fold_normalization=fold)
    labels = (SHARED / "reference" / "imagenet_labels.txt").read_text().splitlines()[1:1001]  # without background
    norm = input_normalization(content, "tf")
    content = add_metadata(
        content,
        ModelInfo(
            name="mobilenet_v2",
            description="ImageNet MobileNetV2 1.0 224, int8, exported by ktoolkit",
            labels=labels,
            channels=3,
            mean=norm.mean,
            std=norm.std,
            input_description=norm.description,
        ),
    )
    path = work / f"mobilenet_v2_int8_uint8io{'' if fold else '_plain'}.tflite"
    path.write_bytes(content)
    log(f"converted {path.name} in {time.time() - started:.0f} s")
    return content


def describe(files: dict) -> dict:
    """Size, input quantization and the operators before the first convolution, per file."""
    from ai_edge_litert.interpreter import Interpreter

    from tflite_export.compat import operators

    out = {}
    for name, content in files.items():
        ops = [op["op"] for op in operators(content)]
        first_conv = ops.index("CONV_2D")
        details = Interpreter(model_content=content).get_input_details()[0]
        out[name] = {
            "bytes": len(content),
            "input": f"{np.dtype(details['dtype']).name} scale {details['quantization'][0]:.6g} "
            f"zero point {details['quantization'][1]}",
            "input_path": ops[: first_conv + 1],
            "ops": len(ops),
        }
    return out


def _interpreter(content: bytes, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def latency(files: dict, *, threads, reps: int, runs: int, image: np.ndarray, work: Path) -> dict:
    """Median single-image latency (ms) per file and thread count (see :func:`time_files`), measured in a
    fresh process that loads LiteRT only: this one holds TensorFlow's thread pools and the Keras model."""
    spec = {"files": {}, "threads": list(threads), "reps": reps, "runs": runs, "image": str(work / "image.npy")}
    np.save(spec["image"], np.clip(np.round(image), 0, 255).astype(np.uint8)[None])
    for name, content in files.items():
        spec["files"][name] = str(work / f"timed_{name}.tflite")
        Path(spec["files"][name]).write_bytes(content)
    done = subprocess.run(
        [sys.executable, __file__, "--time-spec", json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return {int(count): value for count, value in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def time_files(spec: dict) -> dict:
    """The timing itself: for each thread count, every file gets a LiteRT interpreter (XNNPACK) and 5
    warm-up runs, then ``reps`` repetitions in which the files take turns invocation by invocation."""
    pixels = np.load(spec["image"])
    files = {name: Path(path).read_bytes() for name, path in spec["files"].items()}
    reps, runs, out = spec["reps"], spec["runs"], {}
    for count in spec["threads"]:
        interpreters = {name: _interpreter(content, count) for name, content in files.items()}
        for interpreter in interpreters.values():
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
            for _ in range(5):
                interpreter.invoke()
        medians = {name: [] for name in files}
        names = list(files)
        for _ in range(reps):
            times = {name: [] for name in files}
            for run in range(runs):  # one invocation of each file in turn: a load change hits all alike
                for name in names[run % len(names) :] + names[: run % len(names)]:
                    start = time.perf_counter()
                    interpreters[name].invoke()
                    times[name].append((time.perf_counter() - start) * 1000)
            for name in files:
                medians[name].append(statistics.median(times[name]))
        out[count] = {
            "ms": {name: statistics.median(values) for name, values in medians.items()},
            "ratio": {
                name: statistics.median(a / b for a, b in zip(values, medians["google"]))
                for name, values in medians.items()
                if name != "google"
            },
        }
    return out


def top1(model, files: dict, paths: list[str]) -> dict:
    """Top-1 ImageNet class (0..999) of the Keras model and of each file, per image."""
    interpreters = {name: _interpreter(content, 2) for name, content in files.items()}
    tops = {"keras": [], **{name: [] for name in files}, "google_background": []}
    done, started = 0, time.time()
    for images in batches(paths):
        tops["keras"].append(np.asarray(model(images, training=False)).argmax(-1))
        pixels = np.clip(np.round(images), 0, 255).astype(np.uint8)
        for name, interpreter in interpreters.items():
            scores = _run(interpreter, pixels)
            if scores.shape[-1] == 1001:  # Google's: background first
                tops["google_background"].append(scores.argmax(-1) == 0)
                scores = scores[:, 1:]
            tops[name].append(scores.argmax(-1))
        done += len(images)
        if done % 512 < len(images) or done == len(paths):
            log(f"  {done}/{len(paths)} images ({time.time() - started:.0f} s)")
    return {name: np.concatenate(values) for name, values in tops.items()}


def _run(interpreter, pixels: np.ndarray) -> np.ndarray:
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    scores = []
    for image in pixels:  # uint8 bytes as they are: what the Task Library feeds a uint8 input
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        scores.append(interpreter.get_tensor(out["index"])[0].astype(np.float32))
    return np.array(scores)


def agreement(top: dict) -> dict:
    """Top-1 agreement of each file with Keras, and of ktoolkit's with Google's, with 95% intervals."""
    from ktoolkit.stats import Accuracy, paired_difference

    keras, out = top["keras"], {"images": int(len(top["keras"]))}
    files = [name for name in top if name not in ("keras", "google_background")]
    for name in files:
        out[f"{name} vs float"] = Accuracy(int((top[name] == keras).sum()), len(keras), how="agreement")
    out["ktoolkit vs google"] = Accuracy(int((top["ktoolkit"] == top["google"]).sum()), len(keras), how="agreement")
    out["ktoolkit - google (agreement with float)"] = paired_difference(
        top["ktoolkit"] == keras, top["google"] == keras
    )
    out["google picks background"] = int(np.sum(top["google_background"]))
    return out


def print_results(results: dict) -> None:
    files = results["files"]
    rows = [
        (name, f"{f['bytes'] / 2**20:.3f} MB", f"{f['bytes'] / files['google']['bytes']:.3f}", f["input"])
        for name, f in files.items()
    ]
    print(table(rows, ("file", "size", "size / google", "input")))
    print()
    for name, f in files.items():
        print(f"input path of {name}: {' -> '.join(f['input_path'])}")
    print()
    rows = []
    for count, t in results["latency"].items():
        for name, ms in t["ms"].items():
            ratio = t["ratio"].get(name)
            rows.append((count, name, f"{ms:.2f} ms", f"{ratio:.3f}" if ratio else "1"))
    print(table(rows, ("threads", "file", "median latency", "ratio to google")))
    print()
    rows = []
    for set_name, a in results["agreement"].items():
        for key, value in a.items():
            if key != "images":
                rows.append((set_name, key, value.text() if hasattr(value, "text") else str(value)))
    print(table(rows, ("images", "top-1 agreement", "value")))
    c = results["calibration"]
    print(f"\ncalibration: {c['images']} {c['set']} images (seed {c['seed']}); {results['seconds']} s in all")


if __name__ == "__main__":
    main()
