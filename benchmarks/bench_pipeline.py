"""Input pipeline: ktoolkit's folder pipeline against a raw decode-and-resize tf.data loop.

Both read the same files, decode and resize them to the same size with the same parallelism and
batch size, and are timed alternately in one run. Target: ktoolkit >= 0.8 of the raw rate.

    python benchmarks/bench_pipeline.py [--data ../shared/data/flowers5] [--size 224] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time

from _common import FLOWERS, median, need, table, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(FLOWERS), help="class-per-folder image directory")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    need(__import__("pathlib").Path(args.data), "image folder")

    import tempfile

    os.environ["KTOOLKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-scan-")  # time a first scan, not a cached one
    import tensorflow as tf

    from ktoolkit.data import load_data, make_dataset, scan_folder

    _, first_scan = timed(scan_folder, args.data)
    _, second_scan = timed(scan_folder, args.data)
    source = load_data(args.data, val_fraction=0.0, test_fraction=0.0)
    split = source.splits["train"]
    paths = list(split.paths)
    size = (args.size, args.size)

    def raw():
        def load(path):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            return tf.image.resize(image, size)

        return (
            tf.data.Dataset.from_tensor_slices(paths)
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(args.batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    def ours():
        return make_dataset(
            split,
            num_classes=len(source.class_names),
            image_size=size,
            batch_size=args.batch_size,
            training=False,
            cache=None,
        )

    def rate(make):
        start = time.perf_counter()
        n = 0
        for batch in make():
            images = batch[0] if isinstance(batch, tuple) else batch  # (images, labels) or bare images
            n += int(images.shape[0])
        return n / (time.perf_counter() - start), n

    rates = {"raw tf.data decode+resize": [], "ktoolkit make_dataset": []}
    rate(raw)  # warm the file cache and TF's kernels once
    for _ in range(args.rounds):
        rates["raw tf.data decode+resize"].append(rate(raw)[0])
        rates["ktoolkit make_dataset"].append(rate(ours)[0])
    raw_rate = median(rates["raw tf.data decode+resize"])
    rows = [(name, f"{median(v):.0f}", f"{median(v) / raw_rate:.2f}") for name, v in rates.items()]
    print(
        f"{len(paths)} images from {args.data} at {args.size}x{args.size}, batch {args.batch_size}, "
        f"median of {args.rounds} alternating rounds"
    )
    print(table(rows, ("pipeline", "images/s", "ratio to raw")))
    print(f"scan: first {first_scan:.2f} s ({len(paths) / first_scan:.0f} files/s), cached rescan {second_scan:.2f} s")
    ratio = median(rates["ktoolkit make_dataset"]) / raw_rate
    print(f"target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'} ({ratio:.2f})")


if __name__ == "__main__":
    main()
