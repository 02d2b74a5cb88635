"""Data for training: loading and splitting datasets, checking image files, the tf.data pipeline and
augmentation.

    from ktoolkit.data import load_data, make_dataset, AugmentConfig

    source = load_data("flowers/")                    # folder, CSV, .npz or "tfds:NAME"
    train = make_dataset(source.splits["train"], num_classes=source.num_classes, image_size=(224, 224),
                         training=True, augment=AugmentConfig.light(), cache="memory")

Nothing here imports TensorFlow until a function needs it.
"""

from ktoolkit.data.augment import AugmentConfig, Augmenter
from ktoolkit.data.pipeline import make_dataset, split_dataset
from ktoolkit.data.scan import BadFile, ScanReport, Verdict, cache_dir, check_images, scan_folder
from ktoolkit.data.sources import DataSource, Split, load_data, stratified_split

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "BadFile",
    "DataSource",
    "ScanReport",
    "Split",
    "Verdict",
    "cache_dir",
    "check_images",
    "load_data",
    "make_dataset",
    "scan_folder",
    "split_dataset",
    "stratified_split",
]
