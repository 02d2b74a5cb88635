"""Parity of ktoolkit's .tflite files with the real Android clients, on the same pixels (issue 15, item 7).

A phone app does not run ``ktool predict``: it hands the file to MediaPipe Tasks' ``ImageClassifier`` or to
the TFLite Task Library's ``ImageClassifier``, which read the input normalization, the output's quantization
and the class names from the file's metadata. This script checks that both give the same top-1 (and the same
scores and names) as ``ktool predict`` on every exported variant, and that Google's metadata tools accept the
metadata. In one run:

1. A real classifier with the product's own commands: ``ktool finetune`` (MobileNetV2, the ImageNet weights
   of ../shared/weights, ``--strategy linear --image-size 224,224``) on flowers5 (without the 4 photos saved
   under two labels, which ktoolkit refuses), then ``ktool export`` as int8 with uint8 I/O (``--int8-io``),
   int8 with float I/O, float16 and float32. ``--run RUN`` reuses a run folder; exports made by an earlier
   run of this script for the same run folder are reused (``--fresh-exports`` makes them again).
2. ``--images`` test images of the run (its recorded test split, as ``ktool evaluate`` reads it), drawn with
   ``--seed``, decoded and resized by the product's one image path (``ktoolkit.predict.read_image``) and
   saved as PNGs of exactly those pixels, so no client resizes anything.
3. ``ktoolkit.predict.predict_files`` (what ``ktool predict`` runs) on every file and PNG: all scores.
4. Two virtual environments, made once under ``--cache`` (default ~/.cache/ktoolkit-bench) and reused:
   ``mediapipe==1.2.3`` and ``tflite-support==0.4.4`` (neither installs next to the pinned stack:
   mediapipe needs absl-py~=2.3 and constraints.txt pins 1.4.0). A small client script, written into the
   work folder, classifies every PNG with every file in each (``max_results`` all classes, score threshold
   0); in the Task Library's environment it also reads each file's metadata with
   ``tflite_support.metadata.MetadataDisplayer`` (the labels file must list the run's classes) and has
   ``MetadataPopulator`` populate the same metadata and files again, which validates them against the model.
5. One table: file x client, top-1 agreement with ``ktool predict`` (count of N with a 95% Wilson interval;
   an image whose two top-1 classes have exactly the same top score on both sides counts as agreeing, and
   the table shows how many did: quantized outputs tie, and each client orders equal scores its own way),
   the largest |score difference| over all classes and images, whether the class names agree index by
   index; the metadata check per file. Google's reference int8 MobileNetV2 (../shared/reference; its labels
   come from TENSOR_AXIS_LABELS metadata) goes through both clients and ktool predict too (agreement).
6. Exit status 1, with the reasons, when an agreement is below 100%, a client fails, names differ or a
   metadata check fails.

The Task Library's native code links libusb-1.0 (Debian: ``apt-get install libusb-1.0-0``); the script
says so when it is missing.

    python benchmarks/bench_clients.py [--run RUN] [--images 200] [--work /tmp/bench_clients]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import FLOWERS, SHARED, WEIGHTS, need, table

REFERENCE = SHARED / "reference" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
NO_TOP = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
# name -> (pip requirements, the distribution whose version is printed)
CLIENTS = {
    "mediapipe": (["mediapipe==1.2.3"], "mediapipe"),
    "tasklib": (["tflite-support==0.4.4"], "tflite-support"),
}
# the four exports, as ktool export flags (files are named by mode and I/O, so they never replace each other)
EXPORTS = [["--mode", "int8", "--int8-io"], ["--mode", "float32", "--compare", "float16,int8"]]
ALL = 1_000_000  # max_results / top_k: every class

CLIENT_SCRIPT = r'''
"""Classifies every image with every model in one client; written and run by benchmarks/bench_clients.py.

    python client.py JOB.json OUT.json   (JOB: {"client", "models", "images", "metadata", "labels"})
"""
import json
import sys
import time
from importlib import metadata as dists

ALL = 100000


def mediapipe_run(model, images):
    import mediapipe as mp
    from mediapipe.tasks import python as tasks
    from mediapipe.tasks.python import vision

    options = vision.ImageClassifierOptions(
        base_options=tasks.BaseOptions(model_asset_path=model), max_results=ALL, score_threshold=0.0
    )
    with vision.ImageClassifier.create_from_options(options) as classifier:
        return [categories(classifier.classify(mp.Image.create_from_file(p))) for p in images]


def tasklib_run(model, images):
    from tflite_support.task import core, processor, vision

    options = vision.ImageClassifierOptions(
        base_options=core.BaseOptions(file_name=model),
        classification_options=processor.ClassificationOptions(max_results=ALL, score_threshold=0.0),
    )
    classifier = vision.ImageClassifier.create_from_options(options)
    return [categories(classifier.classify(vision.TensorImage.create_from_file(p))) for p in images]


def categories(result):
    (head,) = result.classifications
    return [[int(c.index), c.category_name, float(c.score)] for c in head.categories]


def labels_file(meta):
    """The TENSOR_AXIS_LABELS file of the first output tensor, from the metadata JSON."""
    outputs = meta["subgraph_metadata"][0].get("output_tensor_metadata") or [{}]
    for f in outputs[0].get("associated_files") or []:
        if f.get("type") == "TENSOR_AXIS_LABELS":
            return f["name"]
    return None


def without_files(content):
    """The model without the zip of associated files that a populator appended (the flatbuffer before it):
    a populator refuses to pack a file that is packed already."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            starts = [info.header_offset for info in archive.infolist()]
    except zipfile.BadZipFile:
        return content
    return content[: min(starts)] if starts else content


def metadata_check(model, expected):
    """Reads the metadata and its files with Google's displayer, populates them again with Google's
    populator into the model without its files (the populator validates them against the model) and reads
    the result back: it must be the same."""
    from tflite_support import metadata

    content = open(model, "rb").read()
    shown = metadata.MetadataDisplayer.with_model_buffer(content)
    text = shown.get_metadata_json()
    packed = sorted(shown.get_packed_associated_file_list())
    buffers = {n: shown.get_associated_file_buffer(n) for n in packed}
    name = labels_file(json.loads(text))
    labels = buffers[name].decode("utf-8").splitlines() if name in buffers else None
    populator = metadata.MetadataPopulator.with_model_buffer(without_files(content))
    populator.load_metadata_buffer(shown.get_metadata_buffer())
    populator.load_associated_file_buffers(buffers)
    populator.populate()
    again = metadata.MetadataDisplayer.with_model_buffer(populator.get_model_buffer())
    again_files = {n: again.get_associated_file_buffer(n) for n in again.get_packed_associated_file_list()}
    same = again.get_metadata_json() == text and again_files == buffers
    problems = [] if name else ["no TENSOR_AXIS_LABELS file on the output"]
    if expected is not None and labels != expected:
        problems.append(f"labels file {name!r} lists {labels} instead of {expected}")
    if not same:
        problems.append("the re-populated file reads back different metadata")
    return {"ok": not problems, "problems": problems, "labels_file": name, "classes": len(labels or []),
            "files": packed, "repopulated_same": same, "bytes": len(content),
            "repopulated_bytes": len(populator.get_model_buffer())}


def main():
    job = json.load(open(sys.argv[1]))
    run = {"mediapipe": mediapipe_run, "tasklib": tasklib_run}[job["client"]]
    version = dists.version({"mediapipe": "mediapipe", "tasklib": "tflite-support"}[job["client"]])
    out = {"client": job["client"], "version": version, "python": sys.version.split()[0], "models": {}}
    for model in job["models"]:
        entry, start = {}, time.perf_counter()
        try:
            entry["results"] = run(model, job["images"])
        except Exception as err:  # the report says which client failed on which file, and why
            entry["error"] = f"{type(err).__name__}: {err}"
        entry["seconds"] = time.perf_counter() - start
        if job.get("metadata"):
            try:
                entry["metadata"] = metadata_check(model, job["labels"].get(model))
            except Exception as err:
                entry["metadata"] = {"ok": False, "problems": [f"{type(err).__name__}: {err}"]}
        out["models"][model] = entry
    json.dump(out, open(sys.argv[2], "w"))


main()
'''


# ---------------------------------------------------------------------------------------- the product
def ktool(*args: str) -> int:
    """Runs the ``ktool`` command of this environment (the product, as a user runs it); its exit status."""
    exe = Path(sys.executable).parent / "ktool"
    command = [str(exe if exe.exists() else shutil.which("ktool") or "ktool"), *args]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command).returncode


def make_run(args, work: Path) -> Path:
    """The run folder: ``--run``, or a linear MobileNetV2 classifier of flowers5 at 224x224 made (once) in
    the work folder with ``ktool finetune``."""
    if args.run:
        return need(Path(args.run).resolve(), "--run")
    from bench_transfer import without_conflicts

    run = work / "run"
    if (run / "metrics.json").exists():
        print(f"reusing the run folder {run} (delete it to train again)")
        return run
    data = without_conflicts(need(Path(args.data).resolve(), "flowers5 (--data)"), work)
    weights = need(Path(args.weights), "the MobileNetV2 no-top weights (--weights)")
    start = time.perf_counter()
    status = ktool(
        "finetune", "--base", "mobilenet_v2", "--weights", str(weights), "--data", data,
        "--strategy", "linear", "--image-size", "224,224", "--out", str(run),
    )  # fmt: skip
    if status:
        raise SystemExit(f"ktool finetune failed (exit {status}); see its output above.")
    print(f"ktool finetune: {time.perf_counter() - start:.0f} s")
    return run


def make_exports(run: Path, work: Path, fresh: bool) -> list[Path]:
    """The four .tflite files of the run (int8 uint8 I/O, int8 float I/O, float16, float32), made with
    ``ktool export`` into work/export, or the ones an earlier call made for the same run folder."""
    out = work / "export"
    record = out / "bench_clients.json"
    if not fresh and record.exists():
        done = json.loads(record.read_text())
        files = [Path(f) for f in done["files"]]
        if done.get("run") == str(run) and all(f.exists() for f in files):
            print(f"reusing the exports of {run} in {out} (--fresh-exports makes them again)")
            return files
    shutil.rmtree(out, ignore_errors=True)
    for flags in EXPORTS:
        # exit 1 means a file is over the accuracy budget (named *.FAILED.*); parity is still measured on it
        status = ktool("export", "--model", str(run), "--out", str(out), "--latency-runs", "3", *flags)
        if status not in (0, 1):
            raise SystemExit(f"ktool export {' '.join(flags)} failed (exit {status}); see its output above.")
    files = sorted(out.glob("*.tflite"))
    if len(files) != 4:
        raise SystemExit(f"ktool export wrote {len(files)} .tflite files in {out}, not the 4 expected.")
    record.write_text(json.dumps({"run": str(run), "files": [str(f) for f in files]}, indent=1))
    return files


def test_pngs(run: Path, files: list[Path], n: int, seed: int, work: Path) -> list[str]:
    """``n`` images of the run's recorded test split, decoded and resized by ``read_image`` to the models'
    input size and written as PNGs of exactly those pixels (checked by reading them back)."""
    import numpy as np
    from PIL import Image

    from ktoolkit.data.manifest import data_for_run
    from ktoolkit.predict import read_image
    from ktoolkit.runs import Run
    from tflite_export.runtime import open_model

    shape = tuple(open_model(files[0]).input_shape)
    found = data_for_run(Run(run), verify=["test"])
    found.verification.check(["test"], "benchmarking")
    test = found.source.splits["test"]
    picked = np.random.default_rng(seed).permutation(len(test.paths))[:n]
    folder = work / f"pngs-{shape[0]}x{shape[1]}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pngs = []
    for rank, i in enumerate(sorted(picked)):
        pixels = read_image(test.paths[i], shape)
        png = folder / f"{rank:04d}_{Path(test.paths[i]).stem}.png"
        Image.fromarray(pixels.squeeze(-1) if shape[-1] == 1 else pixels).save(png)
        if not np.array_equal(read_image(png, shape), pixels):
            raise SystemExit(f"{png} does not read back as the pixels written into it.")
        pngs.append(str(png))
    print(f"{len(pngs)} of the {len(test.paths)} test images of {run}, as {shape[0]}x{shape[1]} PNGs in {folder}")
    return pngs


def ktool_scores(files: list[Path], pngs: list[str]) -> dict:
    """``ktool predict``'s answer (``predict_files``, every class) for every file and PNG:
    {file: {"labels": class names by index, "results": [[(name, score), ...] best first, per PNG]}}."""
    from ktoolkit.predict import predict_files
    from ktoolkit.runs import printable_names
    from tflite_export.runtime import open_model

    out = {}
    for f in files:
        predictions = predict_files(f, pngs, top_k=ALL)
        failed = [p for p in predictions if p.error]
        if failed:
            raise SystemExit(f"ktool predict could not read {failed[0].path}: {failed[0].error}")
        out[str(f)] = {"labels": printable_names(open_model(f).labels), "results": [p.top for p in predictions]}
    return out


# ---------------------------------------------------------------------------------------- the clients
def client_python(name: str, cache: Path) -> Path:
    """The Python of the client's own virtual environment, made once under ``cache`` (pinned versions)."""
    requirements, _ = CLIENTS[name]
    venv = cache / f"{name}-{'-'.join(r.replace('==', '-') for r in requirements)}"
    python = venv / "bin" / "python"
    ready = venv / "ready.txt"
    if ready.exists():
        print(f"{name}: reusing {venv}")
    else:
        shutil.rmtree(venv, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements])
        if done.returncode:
            raise SystemExit(f"{name}: pip install {' '.join(requirements)} failed (exit {done.returncode}).")
        ready.write_text("\n".join(requirements) + "\n")
        print(f"{name}: pip install {' '.join(requirements)} into {venv}: {time.perf_counter() - start:.0f} s")
    probe = {"mediapipe": "import mediapipe.tasks.python.vision", "tasklib": "import tflite_support.task.vision"}
    done = subprocess.run([str(python), "-c", probe[name]], capture_output=True, text=True)
    if done.returncode:
        hint = " (Debian: apt-get install libusb-1.0-0)" if "libusb" in done.stderr else ""
        raise SystemExit(f"{name}: {probe[name]!r} fails in {venv}{hint}:\n{done.stderr.strip()[-600:]}")
    return python


def run_client(name: str, python: Path, models: list[str], pngs: list[str], labels: dict, work: Path) -> dict:
    """Runs the client script in the client's environment on every model and PNG; its JSON answer."""
    script = work / "client.py"
    script.write_text(CLIENT_SCRIPT)
    job, answer = work / f"job-{name}.json", work / f"answer-{name}.json"
    metadata = name == "tasklib"
    job.write_text(
        json.dumps({"client": name, "models": models, "images": pngs, "metadata": metadata, "labels": labels})
    )
    start = time.perf_counter()
    env = {**os.environ, "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([str(python), str(script), str(job), str(answer)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: the client script failed (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")
    result = json.loads(answer.read_text())
    print(
        f"{name} {result['version']}: {len(models)} files x {len(pngs)} images in {time.perf_counter() - start:.0f} s"
    )
    return result


# ---------------------------------------------------------------------------------------- the comparison
def compare(ours: dict, theirs: dict) -> dict:
    """One client on one file against ``ktool predict`` on the same PNGs.

    Returns the images whose top-1 class name is the same ("same"), and those where it differs only because
    two classes have exactly the same top score (quantized uint8 outputs tie often; each client orders equal
    scores its own way, ktool by class index): "ties", counted as agreeing, since no top-1 is more right than
    the other. Also the largest |score difference| over every image and every class whose name is unique (all
    of them for ktoolkit's files), and whether the client's class names are ktool's, index by index.
    """
    if "error" in theirs:
        return {"error": theirs["error"], "seconds": theirs["seconds"]}
    labels = ours["labels"]
    unique = {n for n in labels if labels.count(n) == 1} if len(set(labels)) < len(labels) else set(labels)
    same = ties = 0
    largest, names_equal = 0.0, True
    for mine, cats in zip(ours["results"], theirs["results"], strict=True):
        names_equal &= len(cats) == len(labels) and all(0 <= i < len(labels) and labels[i] == n for i, n, _ in cats)
        scores, my_scores = {n: s for _, n, s in cats}, dict(mine)
        if cats and cats[0][1] == mine[0][0]:
            same += 1
        elif cats:  # a tie on both sides: the client's top-1 has ktool's top score and ktool's has the client's
            ties += scores.get(mine[0][0]) == cats[0][2] and my_scores.get(cats[0][1]) == mine[0][1]
        largest = max([largest, *(abs(s - scores.get(n, float("inf"))) for n, s in mine if n in unique)])
    return {
        "same": same,
        "ties": int(ties),
        "agree": same + int(ties),
        "images": len(ours["results"]),
        "max_score_difference": largest,
        "classes_compared": len(unique),
        "classes": len(labels),
        "names_equal": bool(names_equal),
        "seconds": theirs["seconds"],
    }


def parity_row(f: str, name: str, answer: dict, got: dict, failures: list) -> list:
    """The table row of one client on one file; the reasons it fails are added to ``failures``."""
    from ktoolkit.stats import Accuracy

    client = f"{name} {answer['version']}"
    if "error" in got:
        failures.append(f"{name} could not classify with {Path(f).name}: {got['error']}")
        return [Path(f).name, client, f"FAILED: {got['error'][:90]}", "", "", "", ""]
    agreement = Accuracy(got["agree"], got["images"], how=f"top-1 agreement of {name} with ktool predict")
    got["agreement"] = agreement.to_dict()
    if got["agree"] < got["images"]:
        failures.append(f"{name} on {Path(f).name}: top-1 agrees with ktool predict on {agreement.text()}")
    if not got["names_equal"]:
        failures.append(f"{name} on {Path(f).name}: class names or their order differ from ktool predict's")
    compared = "" if got["classes_compared"] == got["classes"] else f" ({got['classes_compared']} unique names)"
    return [
        Path(f).name, client, agreement.text(), f"{got['same']} + {got['ties']}",
        f"{got['max_score_difference']:.2g}{compared}", "yes" if got["names_equal"] else "NO", f"{got['seconds']:.1f}",
    ]  # fmt: skip


def report(ours: dict, answers: dict, files: list[str]) -> tuple[list, list, list, dict]:
    """The parity rows (file x client), the metadata rows, the reasons to fail, and everything as JSON."""
    rows, meta_rows, failures, parity = [], [], [], {}
    for f in files:
        for name, answer in answers.items():
            got = compare(ours[f], answer["models"][f])
            parity[f"{Path(f).name} / {name}"] = got
            rows.append(parity_row(f, name, answer, got, failures))
        check = answers.get("tasklib", {}).get("models", {}).get(f, {}).get("metadata")
        if check is not None:
            parity[f"{Path(f).name} / metadata"] = check
            what = f"{check.get('labels_file')} ({check.get('classes', 0)} classes), re-populated: "
            what += "same" if check.get("repopulated_same") else "different"
            if check.get("repopulated_bytes"):
                what += f" ({check['bytes']:,} -> {check['repopulated_bytes']:,} bytes)"
            meta_rows.append([Path(f).name, "ok" if check["ok"] else "FAILED", what, "; ".join(check["problems"])])
            if not check["ok"]:
                failures.append(f"metadata of {Path(f).name}: {'; '.join(check['problems'])}")
    return rows, meta_rows, failures, parity


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="Reuse this run folder (default: train one in --work).")
    parser.add_argument("--data", default=str(FLOWERS), help="Class-per-folder photos to train on (flowers5).")
    parser.add_argument("--weights", default=str(WEIGHTS / NO_TOP), help="MobileNetV2 no-top ImageNet .h5.")
    parser.add_argument("--images", type=int, default=200, help="Test images to classify.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the draw of the test images.")
    parser.add_argument("--reference", default=str(REFERENCE), help="Google's int8 MobileNetV2 .tflite.")
    parser.add_argument("--work", default="/tmp/bench_clients", help="Folder for the run, exports, PNGs, JSON.")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "ktoolkit-bench"), help="Client venvs.")
    parser.add_argument("--fresh-exports", action="store_true", help="Export again even if exports exist.")
    parser.add_argument("--json", help="Write the results here too (default: WORK/bench_clients.json).")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = make_run(args, work)
    files = [str(f) for f in make_exports(run, work, args.fresh_exports)]
    models = [*files, str(need(Path(args.reference).resolve(), "Google's reference .tflite (--reference)"))]
    pngs = test_pngs(run, [Path(f) for f in files], args.images, args.seed, work)
    start = time.perf_counter()
    ours = ktool_scores([Path(m) for m in models], pngs)
    print(f"ktool predict: {len(models)} files x {len(pngs)} images in {time.perf_counter() - start:.0f} s")
    from ktoolkit.runs import Run

    classes = Run(run).class_names()
    labels = {f: classes for f in files}
    cache = Path(args.cache).expanduser()
    answers = {name: run_client(name, client_python(name, cache), models, pngs, labels, work) for name in CLIENTS}
    rows, meta_rows, failures, parity = report(ours, answers, models)
    print(f"\nTop-1 agreement with ktool predict on the same {len(pngs)} PNGs ({run}):")
    headers = ["file", "client", "top-1 agreement", "same + ties", "max |score diff|", "names equal", "seconds"]
    print(table(rows, headers))
    print("\nMetadata (tflite-support's MetadataDisplayer and MetadataPopulator):")
    print(table(meta_rows, ["file", "check", "labels file", "problems"]))
    versions = {name: a["version"] for name, a in answers.items()}
    out = Path(args.json or work / "bench_clients.json")
    out.write_text(json.dumps({"run": str(run), "images": len(pngs), "versions": versions, "parity": parity}, indent=1))
    print(f"\nwritten: {out}")
    for reason in failures:
        print(f"FAILED: {reason}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
