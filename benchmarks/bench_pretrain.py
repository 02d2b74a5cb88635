"""Learning without labels that pays: each method of `ktool pretrain` against the same architecture at
random initialization, read out by a linear classifier and by k-nearest neighbours at 10, 100 and all
labels per class (`ktool linear-eval`'s label budgets), on the same test images.

The labels are hidden from pretraining literally, and so are the images it is tested on: the data are
split as `ktool linear-eval` splits them (stratified, seed 0, 10% validation, 10% test), the training
split's images are linked into one folder without class folders, and each method pretrains on all of
those (no validation split inside pretraining). Linear evaluation then reads the training split's labels
(its budgets: the first n of each class), and tests on the test split: images pretraining never saw.

    python benchmarks/bench_pretrain.py                                  # cifar10_1k at 32x32, every method
    python benchmarks/bench_pretrain.py --data flowers5 --size 64 --epochs 4,4,8
    python benchmarks/bench_pretrain.py --methods contrastive --epochs 0,0,30

Each method runs with ktoolkit's defaults (PretrainConfig), except the settings printed with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from _common import FLOWERS, SHARED, need, table, without_conflicts

METHODS = ("autoencoder", "denoising", "contrastive")
DATA = {"cifar10": SHARED / "data" / "cifar10_1k", "flowers5": FLOWERS}
# What each method runs with beyond ktoolkit's defaults: none for contrastive learning.
SETTINGS = {"autoencoder": {}, "denoising": {}, "contrastive": {}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10", help="cifar10, flowers5 or a folder of class folders")
    parser.add_argument("--size", type=int, default=32, help="image size for pretraining and evaluation")
    parser.add_argument("--epochs", default="10,10,30", help="epochs of autoencoder, denoising, contrastive")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="10,100,all", help="labels per class of the readouts")
    parser.add_argument("--out", help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args()
    data = need(Path(DATA.get(args.data, args.data)), "image folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from ktoolkit.data import load_data

    epochs = dict(zip(METHODS, (int(e) for e in args.epochs.split(","))))
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_pretrain_"))
    data = Path(without_conflicts(data, out))  # flowers5's 4 photos saved under two labels are left out
    source = load_data(str(data))  # linear-eval's split: seed 0, 10% val, 10% test
    unlabelled = _unlabelled(source, out / "unlabelled")
    print(
        f"{data}: {len(source.class_names)} classes; pretraining at {args.size}x{args.size} on the "
        f"{len(source.splits['train']):,} training images without labels; readouts tested on the "
        f"{len(source.splits['test']):,} test images",
        flush=True,
    )
    rows, timing = [], []
    for method in args.methods.split(","):
        result, seconds, history = _pretrain_and_evaluate(method, unlabelled, data, out, args, epochs[method])
        rows += _rows(method, result)
        per_epoch = [h["seconds"] for h in history if "seconds" in h]
        timing.append(
            (
                method,
                f"{len(per_epoch)}",
                f"{seconds / 60:.1f}",
                f"{sorted(per_epoch)[len(per_epoch) // 2]:.1f}" if per_epoch else "",
                f"{history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}" if history else "",
            )
        )
        print(table(rows, _HEADER), "\n", flush=True)
    print(table(rows, _HEADER))
    print()
    print(table(timing, ("method", "epochs", "pretraining minutes", "seconds per epoch (median)", "loss")))
    print(f"\nruns in {out}; load average {os.getloadavg()[0]:.1f}")


_HEADER = ("method", "readout", "labels per class", "pretrained", "random init", "points")


def _unlabelled(source, folder: Path) -> Path:
    """The training split's images linked into one folder without class folders."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(source.splits["train"].paths):
        link = folder / f"{i:05d}{Path(path).suffix}"
        if not link.exists():
            os.symlink(os.path.abspath(path), link)
    return folder


def _pretrain_and_evaluate(method, unlabelled, data, out, args, epochs):
    """One method pretrained on every unlabelled image, then linear-eval with the budgets; (result, seconds, history)."""
    from ktoolkit.pretrain import linear_eval, pretrain

    started = time.time()
    run = pretrain(
        method=method,
        data=str(unlabelled),
        out=str(out / method),
        image_size=(args.size, args.size),
        epochs=epochs,
        val_fraction=0.0,
        test_fraction=0.0,
        overwrite=True,
        **SETTINGS[method],
    )
    seconds = time.time() - started
    result = linear_eval(
        run.run.root, str(data), val_fraction=0.1, test_fraction=0.1, seed=0, labels_per_class=args.budgets
    )
    return result, seconds, run.history


def _rows(method, result) -> list[tuple]:
    rows = []
    for classifier in ("linear", "knn"):
        for budget in dict.fromkeys(r.labels_per_class for r in result.readouts):
            pair = {
                r.encoder: r for r in result.readouts if r.classifier == classifier and r.labels_per_class == budget
            }
            pre, rand = pair.get("pretrained"), pair.get("random")
            rows.append(
                (
                    method,
                    classifier,
                    "all" if budget is None else str(budget),
                    pre.accuracy.text() if pre else "",
                    rand.accuracy.text() if rand else "",
                    f"{100 * (pre.accuracy.value - rand.accuracy.value):+.1f}" if pre and rand else "",
                )
            )
    return rows


if __name__ == "__main__":
    main()
