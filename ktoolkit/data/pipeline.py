"""The tf.data input pipeline: decode, resize, cache, shuffle, batch, augment, prefetch.

Images leave the pipeline as float32 in 0..255: every ktoolkit model normalizes its input itself.
Between decoding and batching they are uint8, so the cache and the shuffle buffer take a quarter
of the memory float32 would.

Decoding (:func:`decode_image`) uses ``tf.io.decode_image`` with ``expand_animations=False`` (PNG, BMP,
GIF's first frame, WebP; 16-bit PNGs are cut to 8 bits) and, for JPEG, ``tf.io.decode_jpeg`` with the
accurate integer DCT (which Pillow reproduces exactly), in the file's own channels, which are then converted
to ``channels`` (alpha dropped, gray copied to RGB, RGB weighted to gray): decode_image's own
conversion fails for CMYK JPEG, GIF, BMP and WebP to one channel and RGBA WebP to three. Then
bilinear ``tf.image.resize`` to ``image_size`` (the aspect ratio is not kept). A file that still
fails to decode (changed since :func:`load_data` checked it) is skipped with a logged warning
instead of stopping an epoch, and the epoch is topped up with the first images of the next pass, so
every epoch has ``len(split)`` examples and the dataset's cardinality is known.
"""

from __future__ import annotations

import glob
import logging
import os

from ktoolkit.data.augment import AugmentConfig, Augmenter
from ktoolkit.data.sources import Split

logger = logging.getLogger(__name__)

# Memory the shuffle buffer of decoded images may take; a split that fits is shuffled completely.
SHUFFLE_BUFFER_BYTES = 512 * 2**20


def make_dataset(
    split: Split,
    *,
    num_classes: int,
    image_size,
    channels: int = 3,
    batch_size: int = 32,
    training: bool = False,
    shuffle: bool | None = None,
    seed: int = 0,
    cache=None,
    augment: AugmentConfig | str | None = None,
    deterministic: bool | None = None,
    one_hot: bool = True,
    drop_remainder: bool = False,
    shuffle_buffer: int | None = None,
):
    """Makes the ``tf.data.Dataset`` of batches that trains or evaluates a model on a split.

    Steps: (shuffle the file list), decode + resize in parallel, (cache), (shuffle), batch, (augment), prefetch;
    how files are decoded and resized, and what happens to one that fails to decode: see the module docstring.

    Args:
        split: a :class:`Split` of :func:`load_data`.
        num_classes: number of classes (labels must be below it).
        image_size: (height, width) of the output images, or one int for squares.
        channels: 3 (RGB) or 1 (grayscale).
        batch_size: examples per batch.
        training: augment (when ``augment`` is given) and, by default, shuffle.
        shuffle: shuffle every epoch, seeded; default: ``training``. Without a cache the file list is shuffled
            before decoding; with a cache, the decoded images after it.
        seed: seed of the shuffle and of the augmentation (each epoch differs, every run is the same).
        cache: None; "memory" keeps the decoded, resized images in memory after the first epoch; a folder path
            keeps them in files there, one set per split, image size and content (a changed split gets new files).
        augment: an :class:`AugmentConfig`, or its string (``"flip,crop"``); used when ``training``.
        deterministic: ``tf.data.Options.deterministic`` (None: TensorFlow's default, deterministic); False lets
            parallel steps return elements out of order, a little faster.
        one_hot: labels as one-hot float32 (batch, num_classes); else int64 (batch,). MixUp and CutMix need
            one-hot labels.
        drop_remainder: drop the last incomplete batch.
        shuffle_buffer: shuffle buffer size; default the whole split, or as many decoded images as fit in
            :data:`SHUFFLE_BUFFER_BYTES` when shuffling after decoding.

    Returns:
        A ``tf.data.Dataset`` of ``(images, labels)``: float32 (batch, height, width, channels) in 0..255; labels per ``one_hot``.

    Raises:
        ValueError: a bad argument (the message names it and the valid values), an empty split, or labels outside
            ``0..num_classes - 1``. TypeError: ``split`` is not a :class:`Split` or ``augment`` not a config or string.
    """
    height, width = _check_args(split, num_classes, image_size, channels, batch_size, cache, shuffle_buffer)
    augment = _check_augment(augment, training, one_hot)
    shuffle = training if shuffle is None else bool(shuffle)
    early_shuffle = shuffle and cache is None and split.kind != "dataset"  # with a cache: after it
    ds = _examples(split, early_shuffle, seed, shuffle_buffer)
    ds = _decoded(ds, split, (height, width, channels), cache, shuffle and not early_shuffle, seed, shuffle_buffer)
    return _batched(
        ds, num_classes, batch_size, seed, augment if training else None, deterministic, one_hot, drop_remainder
    )


def _check_augment(augment, training: bool, one_hot: bool):
    """``augment`` as an AugmentConfig (or None); MixUp and CutMix in training need one-hot labels."""
    if isinstance(augment, str):
        augment = AugmentConfig.parse(augment)
    if augment is not None and not isinstance(augment, AugmentConfig):
        raise TypeError(
            f"make_dataset: augment={augment!r} must be None, an AugmentConfig or a string such as 'flip,crop'."
        )
    if training and augment and augment.mixes_labels and not one_hot:
        raise ValueError(
            f"make_dataset: augment={str(augment)!r} mixes labels (MixUp/CutMix), which needs one_hot=True."
        )
    return augment


def _examples(split: Split, early_shuffle: bool, seed: int, shuffle_buffer):
    """The split's (path, label), (image, label) or TFDS examples, int64 labels; shuffled here when
    ``early_shuffle`` (before decoding: file names move, not pixels)."""
    import tensorflow as tf

    if split.kind == "paths":
        # File names as bytes: a name that is not valid UTF-8 still reaches the file system unchanged.
        ds = tf.data.Dataset.from_tensor_slices(([os.fsencode(p) for p in split.paths], split.labels))
    elif split.kind == "images":
        if split.images.ndim != 4 or split.images.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(
                f"make_dataset: the {split.name!r} split's images have shape {split.images.shape}; "
                f"expected (N, height, width, channels) with 1 to 4 channels."
            )
        ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    else:
        ds = split.dataset.map(lambda image, label: (image, tf.cast(label, tf.int64)))
    if early_shuffle:
        source_bytes = 64 if split.kind == "paths" else max(1, split.images[0].nbytes)
        ds = ds.shuffle(_buffer(len(split), source_bytes, shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    return ds


def _decoded(ds, split: Split, shape, cache, shuffle: bool, seed: int, shuffle_buffer):
    """Decoded (files), converted to ``channels``, resized and rounded to uint8 in parallel; bad files skipped
    (the epoch topped up); then cached in memory or in files when ``cache`` says so, and shuffled if ``shuffle``."""
    import tensorflow as tf

    height, width, channels = shape

    def prepare(image_or_path, label):
        image = decode_image(tf.io.read_file(image_or_path)) if split.kind == "paths" else image_or_path
        return model_pixels(image, height, width, channels), label

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if split.kind == "paths":
        # The last guard (load_data left the bad files out): a file that fails to decode is skipped
        # with a warning, and the epoch is topped up from the next pass over the files, so it still
        # has len(split) examples and the cardinality stays known (Keras then re-creates the
        # iterator every epoch). If every file fails, the dataset is empty rather than endless.
        ds = ds.ignore_errors(log_warning=True).repeat().take(len(split))
    if cache == "memory":
        ds = ds.cache()
    elif cache is not None:
        ds = ds.cache(_cache_file(cache, split, height, width, channels))
    if shuffle:
        buffer = _buffer(len(split), height * width * channels, shuffle_buffer)
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    return ds


def _batched(ds, num_classes: int, batch_size: int, seed: int, augment, deterministic, one_hot, drop_remainder):
    """Batched, float32 images and (one-hot) labels, augmented (``augment`` not None), prefetched."""
    import tensorflow as tf

    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)

    def to_float(images, labels):
        images = tf.cast(images, tf.float32)
        return images, tf.one_hot(labels, num_classes, dtype=tf.float32) if one_hot else labels

    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        augmenter = Augmenter(augment, seed=seed)
        # One stateless seed per batch: reproducible and independent of parallelism.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2, drop_remainder=True)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda batch, s: augmenter(batch[0], batch[1], s), num_parallel_calls=tf.data.AUTOTUNE
        )
    ds = ds.prefetch(tf.data.AUTOTUNE)
    if deterministic is not None:
        options = tf.data.Options()
        options.deterministic = bool(deterministic)
        ds = ds.with_options(options)
    return ds


def _check_args(split, num_classes, image_size, channels, batch_size, cache, shuffle_buffer):
    if not isinstance(split, Split):
        raise TypeError(
            f"make_dataset: split must be a Split (e.g. load_data(...).splits['train']), got {type(split).__name__}."
        )
    if len(split) == 0:
        raise ValueError(f"make_dataset: the {split.name!r} split is empty; give it examples or use another split.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"make_dataset: num_classes={num_classes!r} must be a positive integer (len(source.class_names))."
        )
    if int(split.labels.max()) >= num_classes or int(split.labels.min()) < 0:
        raise ValueError(
            f"make_dataset: the {split.name!r} split has labels {int(split.labels.min())}.."
            f"{int(split.labels.max())}, outside 0..{num_classes - 1} (num_classes={num_classes})."
        )
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size or ())
    if len(size) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size):
        raise ValueError(f"make_dataset: image_size={image_size!r} must be (height, width) in pixels, e.g. (224, 224).")
    if channels not in (1, 3):
        raise ValueError(f"make_dataset: channels={channels!r} must be 3 (RGB) or 1 (grayscale).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_dataset: batch_size={batch_size!r} must be a positive integer, e.g. 32.")
    if cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise ValueError(f"make_dataset: cache={cache!r} must be None, 'memory' or a folder path.")
    if shuffle_buffer is not None and (not isinstance(shuffle_buffer, int) or shuffle_buffer < 1):
        raise ValueError(f"make_dataset: shuffle_buffer={shuffle_buffer!r} must be a positive integer or None.")
    return size


def decode_image(contents):
    """A file's bytes decoded in its own channels, uint8 (height, width, 1..4), as training decodes them.

    ``tf.io.decode_image`` (first frame, 16-bit PNGs cut to their high byte), except JPEG, which is decoded
    with libjpeg's accurate integer DCT (``dct_method="INTEGER_ACCURATE"``) instead of decode_image's fixed
    fast one: the accurate DCT is exact in every libjpeg-turbo build (SIMD or not), so Pillow, which uses
    it, gives the same pixels bit for bit and ``ktool predict`` can decode exactly as training without
    TensorFlow (:func:`ktoolkit.predict.read_image`). Channels are converted by :func:`model_pixels`:
    decode_image's own conversion fails for some formats (channels=1 for CMYK JPEG, GIF, BMP, WebP;
    channels=3 for RGBA WebP).
    """
    import tensorflow as tf

    return tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=0, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(contents, channels=0, expand_animations=False),
    )


def model_pixels(image, height: int, width: int, channels: int):
    """A decoded uint8 image (any of 1..4 channels) as the model sees it: converted to ``channels``,
    resized with ``tf.image.resize`` (bilinear, half-pixel centers, no antialiasing) and rounded to uint8
    (half to even): exact for 8-bit sources, and a quarter of float32's memory in a cache or buffer."""
    import tensorflow as tf

    image = tf.image.resize(_convert_channels(image, channels), (height, width))
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def load_image(path, height: int, width: int, channels: int):
    """One image file as training's pipeline makes it: uint8 numpy (height, width, channels).

    Raises:
        ValueError: TensorFlow cannot decode the file (its message says why).
    """
    import tensorflow as tf

    try:
        image = decode_image(tf.io.read_file(os.fsencode(path)))
        return model_pixels(image, height, width, channels).numpy()
    except tf.errors.OpError as err:
        raise ValueError(err.message.split(" [Op:")[0]) from None


def _convert_channels(image, channels):
    """uint8 (h, w, c), c in 1..4 (known or not), to ``channels`` (1 or 3): alpha is dropped, gray
    copied to RGB, RGB weighted to gray (ITU-R 601, as libjpeg does)."""
    import tensorflow as tf

    def drop_alpha():
        return image[..., :-1]

    have = tf.shape(image)[-1]
    image = tf.cond(tf.logical_or(tf.equal(have, 2), tf.equal(have, 4)), drop_alpha, lambda: image)
    have = tf.shape(image)[-1]
    if channels == 3:
        image = tf.cond(tf.equal(have, 1), lambda: tf.tile(image, [1, 1, 3]), lambda: image)
    else:

        def gray():
            weighted = tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))
            return tf.cast(tf.clip_by_value(tf.round(weighted), 0.0, 255.0), tf.uint8)

        image = tf.cond(tf.equal(have, 3), gray, lambda: image)
    return tf.ensure_shape(image, [None, None, channels])


def _buffer(n: int, element_bytes: int, explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    return max(1, min(n, max(1024, SHUFFLE_BUFFER_BYTES // max(1, element_bytes))))


def _cache_file(folder, split: Split, height: int, width: int, channels: int) -> str:
    """The cache file prefix for this split, size and content, and removal of an unfinished one."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"make_dataset: cache={folder!r} is not a folder that can be created ({err}); give a "
            f"writable folder or cache='memory'."
        ) from None
    prefix = os.path.join(folder, f"{split.name}-{height}x{width}x{channels}-{split.fingerprint()}")
    # An interrupted first epoch leaves a lock file and no index; TensorFlow would then refuse to run
    # ("cache lockfile already exists"), so the partial files are removed and the cache rebuilt.
    if not os.path.exists(prefix + ".index"):
        partial = glob.glob(glob.escape(prefix) + "*")
        if partial:
            logger.warning("Removing an unfinished dataset cache (an interrupted epoch): %s*", prefix)
            for path in partial:
                os.remove(path)
    return prefix


def split_dataset(
    split, config=None, *, num_classes, image_size, channels, batch_size, training, augment=None, **options
):
    """``make_dataset`` for one split with the run's settings (seed, cache, determinism; ``augment`` in
    training only), or None for a split that is missing or empty. Without ``config`` (evaluating or
    exporting a saved model): seed 0, no cache. ``options`` go to ``make_dataset`` (and override those)."""
    if split is None or len(split) == 0:
        return None
    settings = {"seed": 0, "cache": None, "deterministic": None}
    if config is not None:
        cache = None if config.cache == "none" else config.cache
        settings = {"seed": config.seed, "cache": cache, "deterministic": config.deterministic or None}
    return make_dataset(
        split,
        num_classes=num_classes,
        image_size=image_size,
        channels=channels,
        batch_size=batch_size,
        training=training,
        augment=augment if training else None,
        **{**settings, **options},
    )
