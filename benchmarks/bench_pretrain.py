"""Learning without labels on real photos: linear-evaluation accuracy of the autoencoder, denoising
and contrastive encoders of `ktool pretrain`, each against the same architecture at random
initialization, and against the supervised ImageNet MobileNetV2 (no pretraining here, its features).

The labels are hidden from pretraining literally: the training split's images (the split `ktool
linear-eval` makes, same seed) are linked into one folder without class folders, and each method
pretrains on that. Linear evaluation then trains a logistic regression on the frozen features of the
same training split (with labels), picks C on the validation split and tests on the test split,
images pretraining never saw.

    python benchmarks/bench_pretrain.py [--data ../shared/data/flowers5] [--size 64] [--epochs 4,4,4]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from _common import FLOWERS, WEIGHTS, need, table

METHODS = ("autoencoder", "denoising", "contrastive")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(FLOWERS))
    parser.add_argument(
        "--weights",
        default=str(WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
        help="keras.applications MobileNetV2 no-top ImageNet weights",
    )
    parser.add_argument("--size", type=int, default=64, help="image size for pretraining and evaluation")
    parser.add_argument("--mobilenet-sizes", default="64,128", help="sizes MobileNetV2's features are taken at")
    parser.add_argument("--epochs", default="4,4,4", help="epochs of autoencoder, denoising, contrastive")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args()
    data = need(Path(args.data), "image folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from ktoolkit.data import load_data
    from ktoolkit.pretrain import linear_eval, linear_probe, pretrain
    from ktoolkit.transfer.features import FeatureCache

    epochs = dict(zip(METHODS, (int(e) for e in args.epochs.split(","))))
    size = (args.size, args.size)
    source = load_data(str(data))  # the split linear-eval uses (seed 0, 10% val, 10% test)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_pretrain_"))
    unlabelled = out / "unlabelled"
    unlabelled.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(source.splits["train"].paths):
        link = unlabelled / f"{i:05d}{Path(path).suffix}"
        if not link.exists():
            os.symlink(os.path.abspath(path), link)
    settings = {  # the recipes' defaults, a deeper autoencoder (64x64 -> 8x8x128) and masking noise
        "autoencoder": {"recipe_options": {"filters": [32, 64, 128]}, "batch_size": 64},
        "denoising": {
            "recipe_options": {"filters": [32, 64, 128]},
            "batch_size": 64,
            "noise": "masking",
            "noise_strength": 0.25,
        },
        "contrastive": {"recipe": "cifar_resnet20", "batch_size": 128, "augment": "flip,crop=0.2,color=40"},
    }
    rows = []
    for method in args.methods.split(","):
        started = time.time()
        run = pretrain(
            method=method,
            data=str(unlabelled),
            out=str(out / method),
            image_size=size,
            epochs=epochs[method],
            val_fraction=0.1,
            test_fraction=0.0,
            overwrite=True,
            **settings[method],
        ).run
        seconds = time.time() - started
        result = linear_eval(run.root, str(data), val_fraction=0.1, test_fraction=0.1, seed=0)
        rows.append(
            (
                method,
                f"{result.accuracy:.1%}",
                f"{result.random_accuracy:.1%}",
                f"{100 * result.difference:+.1f}",
                f"{result.pretrained.dimensions}",
                f"{epochs[method]} epochs, {seconds / 60:.1f} min",
            )
        )
        print(table(rows[-1:], ("encoder", "linear eval", "random init", "points", "dims", "pretraining")), flush=True)

    from ktoolkit.transfer.bases import load_base

    weights = need(Path(args.weights), "MobileNetV2 ImageNet weights")
    for mobile_size in (int(s) for s in args.mobilenet_sizes.split(",")):
        base = load_base("mobilenet_v2", weights=str(weights), image_size=(mobile_size, mobile_size))
        probe = linear_probe(base.model, source, cache=FeatureCache())
        rows.append(
            (
                f"MobileNetV2, ImageNet (supervised), {mobile_size}x{mobile_size}",
                f"{probe.accuracy:.1%}",
                "",
                "",
                f"{probe.dimensions}",
                "none (ImageNet weights)",
            )
        )
    print(
        f"\n{data}: {len(source.class_names)} classes; linear evaluation on the test split "
        f"({len(source.splits['test'])} images), pretraining at {args.size}x{args.size} on the "
        f"{len(source.splits['train'])} training images without labels\n"
    )
    print(table(rows, ("encoder", "linear eval", "random init", "points", "dims", "pretraining")))
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()
