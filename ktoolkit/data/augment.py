"""Data augmentation for training, applied by the tf.data pipeline to batches of float32 images in 0..255.

Augmentation lives in the input pipeline, not in the model, so saved and exported models hold no
random layers and the CPU prepares the next batches while the accelerator trains.

The geometric operations (flip, random resized crop, rotation, zoom, stretch, perspective) are
composed into one projective transform per image and applied with a single
``ImageProjectiveTransformV3`` (bilinear, reflected borders), so an image is resampled once however
many of them are on. Flip and crop alone use ``tf.image.crop_and_resize`` instead: it samples the
same points about four times faster on a CPU.

After the geometry come the colour operations: the colour cast, then SimCLR's colour jitter,
grayscale and Gaussian blur (Chen et al. 2020, appendix A; what ``ktool pretrain --method
contrastive`` needs for views that cannot be matched by their colours alone), each drawn per image.

Randomness is stateless and drawn from a per-batch seed, so a run with the same seed sees the same
augmented batches. For that reason MixUp and CutMix are written here rather than taken from
``keras_cv`` (whose layers work in tf.data but draw from their own stateful generators).
RandAugment is ``keras_cv.layers.RandAugment`` (Keras 3 on the TensorFlow backend, on plain tensors
inside tf.data); with it on, augmented batches are not bit-for-bit repeatable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

# The value a bare option name in AugmentConfig.parse gets ("crop" means crop=0.25).
DEFAULTS = {
    "flip": True,
    "crop": 0.25,
    "rotation": 15.0,
    "zoom": 0.2,
    "stretch": 0.2,
    "perspective": 0.1,
    "color": 20.0,
    "jitter": 0.5,
    "grayscale": 0.2,
    "blur": 0.5,
    "randaugment": 0.5,
    "mixup": 0.2,
    "cutmix": 1.0,
}
# Valid values of each option (0 turns an option off) and what the option means, for error messages.
_RANGES = {
    "crop": (0.0, 1.0, "the smallest fraction of the image area a random crop keeps, 0.08 as in Inception"),
    "rotation": (0.0, 180.0, "the largest rotation in degrees"),
    "zoom": (0.0, 0.9, "the largest zoom in or out, as a fraction (0.2: 80% to 120%)"),
    "stretch": (0.0, 1.0, "the largest change of aspect ratio, as a fraction (0.2: up to 1.2 times wider or taller)"),
    "perspective": (0.0, 0.45, "the strength of the random perspective tilt (0.1 light, 0.3 strong)"),
    "color": (0.0, 255.0, "the largest shift added to each colour channel, in pixel values"),
    "jitter": (0.0, 1.0, "the SimCLR colour jitter strength s (0.5 as in SimCLR's CIFAR runs, 1.0 for ImageNet)"),
    "grayscale": (0.0, 1.0, "the probability that an image is turned to gray, 0.2 as in SimCLR"),
    "blur": (0.0, 1.0, "the probability of a random Gaussian blur, 0.5 as in SimCLR"),
    "randaugment": (0.0, 1.0, "the RandAugment magnitude"),
    "mixup": (0.0, math.inf, "the MixUp Beta(alpha, alpha) parameter, 0.2 is usual"),
    "cutmix": (0.0, math.inf, "the CutMix Beta(alpha, alpha) parameter, 1.0 is usual"),
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations the training pipeline applies, and how strongly. 0 (or False) is off.

    Attributes:
        flip: random horizontal flip (half of the images).
        crop: random resized crop: keep a random region of ``crop`` to 100% of the area, aspect
            ratio 3/4 to 4/3, scaled back to the image size (Szegedy et al. 2015, Inception; they
            use 0.08). The crop is taken from the already resized image.
        rotation: random rotation up to this many degrees either way.
        zoom: random zoom in or out by up to this fraction.
        stretch: random aspect-ratio change by up to this fraction (area kept).
        perspective: random projective tilt of this strength.
        color: colour cast: a random shift up to this many pixel values added to each channel.
        jitter: SimCLR's colour jitter (Chen et al. 2020, appendix A) of strength ``s``, on each
            image with probability 0.8, in this fixed order: brightness (multiply by a factor in
            [1 - 0.8s, 1 + 0.8s]), contrast (blend with the image's mean gray level, same range),
            saturation (blend with the image's grayscale, same range), hue (a shift in
            [-0.2s, 0.2s] of the colour wheel). One-channel images get brightness and contrast only.
        grayscale: the probability that an image becomes its luminance (kept as 3 channels).
        blur: the probability of a Gaussian blur with sigma in [0.1, 2.0] pixels of a 224-pixel
            image, scaled to the image's size (so the blur is the same fraction of the picture,
            and nearly nothing below about 64 pixels); off for images under 20 pixels.
        randaugment: RandAugment (Cubuk et al. 2020) at this magnitude in 0..1, two operations per
            image (``keras_cv.layers.RandAugment``; not seeded per batch, see the module docstring).
        mixup: MixUp (Zhang et al. 2018) with this alpha; mixes the one-hot labels too.
        cutmix: CutMix (Yun et al. 2019) with this alpha; mixes the one-hot labels too. With both
            MixUp and CutMix, each batch gets one of the two at random.
    """

    flip: bool = False
    crop: float = 0.0
    rotation: float = 0.0
    zoom: float = 0.0
    stretch: float = 0.0
    perspective: float = 0.0
    color: float = 0.0
    jitter: float = 0.0
    grayscale: float = 0.0
    blur: float = 0.0
    randaugment: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self):
        if not isinstance(self.flip, bool):
            raise TypeError(f"AugmentConfig: flip={self.flip!r} must be True or False.")
        for name, (low, high, meaning) in _RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool):  # randaugment=True: on, at the default strength
                value = DEFAULTS[name] if value else 0.0
            if not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(
                    f"AugmentConfig: {name}={value!r} must be a number from {low:g} to {high:g} "
                    f"({meaning}), or 0 to turn it off."
                )
            object.__setattr__(self, name, float(value))

    @classmethod
    def light(cls) -> AugmentConfig:
        """A sensible default for fine-tuning on a small dataset: horizontal flip and random crops."""
        return cls(flip=True, crop=DEFAULTS["crop"])

    @classmethod
    def parse(cls, text: str) -> AugmentConfig:
        """Builds a config from a command-line string such as ``"flip,crop,color=20,mixup=0.2"``.

        A bare name takes its :data:`DEFAULTS` value; ``"none"`` (or an empty string) is no
        augmentation and ``"light"`` is :meth:`light` (it can be combined: ``"light,mixup=0.2"``).

        Raises:
            ValueError: an unknown option (the message lists the valid ones) or a bad value.
            TypeError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"AugmentConfig.parse: expected a string like 'flip,crop,color=20', got {text!r}.")
        values = {}
        for item in text.split(","):
            item = item.strip()
            if not item or item.lower() == "none":
                continue
            name, has_value, value = (s.strip() for s in item.partition("="))
            name = name.lower()
            if name == "light" and not has_value:
                values.update({k: v for k, v in asdict(cls.light()).items() if v})
                continue
            if name not in DEFAULTS:
                raise ValueError(
                    f"augment: unknown option {name!r} in {text!r}; valid options are "
                    f"{', '.join(DEFAULTS)} (and the presets light, none), e.g. 'flip,crop=0.25,color=20'."
                )
            if not has_value:
                values[name] = DEFAULTS[name]
            elif name == "flip":
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError(f"augment: flip={value!r} must be true or false (or just 'flip').")
                values[name] = value.lower() in _TRUE
            elif value.lower() in (_TRUE | _FALSE) - {"0", "1"}:
                values[name] = value.lower() in _TRUE
            else:
                try:
                    values[name] = float(value)
                except ValueError:
                    raise ValueError(
                        f"augment: {name}={value!r} is not a number; write e.g. {name}={DEFAULTS[name]:g}."
                    ) from None
        return cls(**values)

    @property
    def active(self) -> list[str]:
        """Names of the augmentations that are on."""
        return [f.name for f in fields(self) if getattr(self, f.name)]

    @property
    def mixes_labels(self) -> bool:
        """MixUp or CutMix: the labels must be one-hot (they are mixed)."""
        return bool(self.mixup or self.cutmix)

    def to_dict(self) -> dict:
        return asdict(self)

    def __bool__(self) -> bool:
        return bool(self.active)

    def __str__(self) -> str:
        """The :meth:`parse` string of this config (``parse(str(c)) == c``)."""
        return ",".join("flip" if n == "flip" else f"{n}={getattr(self, n):g}" for n in self.active) or "none"


class Augmenter:
    """Applies an :class:`AugmentConfig` to a batch: ``images, labels = augmenter(images, labels, seed)``.

    ``images`` is float32 (batch, height, width, channels) in 0..255 and stays so; ``labels`` are
    one-hot float32 when MixUp or CutMix is on (they are mixed), anything otherwise; ``seed`` is an
    int tensor of shape (2,), a different one per batch (the pipeline draws them from its seed).
    Create it outside ``tf.data`` functions: it owns the keras_cv RandAugment layer.
    """

    def __init__(self, config: AugmentConfig, seed: int = 0):
        if not isinstance(config, AugmentConfig):
            raise TypeError(
                f"Augmenter: config={config!r} must be an AugmentConfig (e.g. AugmentConfig.parse('flip,crop'))."
            )
        self.config = config
        self._randaugment = None
        if config.randaugment:
            # keras_cv imports Keras 3 (seconds), so only when RandAugment is asked for.
            import keras_cv

            self._randaugment = keras_cv.layers.RandAugment(
                value_range=(0, 255), magnitude=config.randaugment, seed=seed
            )

    def __call__(self, images, labels, seed):
        import tensorflow as tf

        c = self.config
        images = tf.convert_to_tensor(images, tf.float32)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)
        shape = images.shape
        if c.flip or c.crop or c.rotation or c.zoom or c.stretch or c.perspective:
            images = tf.ensure_shape(self._geometry(images, seeds[0]), shape)  # blur's kernel needs the static size
        if c.color:
            channels = images.shape[-1]
            shift = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, channels], seeds[1], -c.color, c.color)
            images = tf.clip_by_value(images + shift, 0.0, 255.0)
        if c.jitter or c.grayscale or c.blur:
            images = _colour(images, c, seeds[3])
        if self._randaugment is not None:
            images = self._rand_augment(images)
        if c.mixup or c.cutmix:
            images, labels = self._mix(images, labels, seeds[2])
        return images, labels

    def _rand_augment(self, images):
        import tensorflow as tf

        gray = images.shape[-1] == 1
        if gray:  # keras_cv's RandAugment only takes RGB
            images = tf.tile(images, [1, 1, 1, 3])
        images = tf.clip_by_value(tf.cast(self._randaugment(images, training=True), tf.float32), 0.0, 255.0)
        return tf.image.rgb_to_grayscale(images) if gray else images

    def _mix(self, images, labels, seed):
        """MixUp or CutMix with a random partner from the same batch (one of the two per batch)."""
        import tensorflow as tf

        labels = tf.convert_to_tensor(labels)
        if not labels.dtype.is_floating or labels.shape.rank != 2:
            raise ValueError("MixUp/CutMix mix the labels: make the dataset with one_hot=True.")
        c = self.config
        keys = tf.random.experimental.stateless_split(seed, num=3)
        batch = tf.shape(images)[0]
        partner = tf.argsort(tf.random.stateless_uniform([batch], keys[0]))
        if c.mixup and c.cutmix:
            use_mixup = tf.random.stateless_uniform([], keys[1]) < 0.5
            return tf.cond(
                use_mixup,
                lambda: _mixup(images, labels, partner, c.mixup, keys[2]),
                lambda: _cutmix(images, labels, partner, c.cutmix, keys[2]),
            )
        if c.mixup:
            return _mixup(images, labels, partner, c.mixup, keys[2])
        return _cutmix(images, labels, partner, c.cutmix, keys[2])

    def _geometry(self, images, seed, axis_aligned=True):
        """Flip, crop, rotation, zoom, stretch and perspective as one projective transform.

        ``axis_aligned=False`` forces the general transform where flip and crop alone would use
        ``crop_and_resize`` (the tests check that both give the same images)."""
        import tensorflow as tf

        c = self.config
        batch = tf.shape(images)[0]
        height = tf.cast(tf.shape(images)[1], tf.float32)
        width = tf.cast(tf.shape(images)[2], tf.float32)
        m = self._geometry_matrix(batch, height, width, seed)
        if axis_aligned and not (c.rotation or c.zoom or c.stretch or c.perspective):
            return _crop_and_resize(images, m, batch, height, width)
        return _projective_transform(images, m, batch)

    def _geometry_matrix(self, batch, height, width, seed):
        """Per image, the (batch, 3, 3) matrix that maps an output pixel to the input pixel it samples."""
        import tensorflow as tf

        c = self.config
        keys = tf.random.experimental.stateless_split(seed, num=9)

        def uniform(i, low, high):
            return tf.random.stateless_uniform([batch], keys[i], low, high)

        ones, zeros = tf.ones([batch]), tf.zeros([batch])

        def matrix(rows):  # rows of per-image values -> (batch, 3, 3)
            return tf.stack([tf.stack(r, axis=-1) for r in rows], axis=-2)

        # Output pixel -> input pixel, composed right to left: centre the output, then perspective,
        # stretch, zoom, rotation, flip, crop scale, and move to the crop's centre in the input.
        cx, cy = (width - 1) / 2, (height - 1) / 2
        m = matrix([[ones, zeros, -cx * ones], [zeros, ones, -cy * ones], [zeros, zeros, ones]])
        if c.perspective:
            g = uniform(0, -c.perspective, c.perspective) / ((width - 1) / 2)
            h = uniform(1, -c.perspective, c.perspective) / ((height - 1) / 2)
            m = matrix([[ones, zeros, zeros], [zeros, ones, zeros], [g, h, ones]]) @ m
        sx, sy = ones, ones
        if c.stretch:
            ratio = tf.exp(uniform(2, -math.log1p(c.stretch), math.log1p(c.stretch)))
            sx, sy = sx * tf.sqrt(ratio), sy / tf.sqrt(ratio)
        if c.zoom:
            scale = uniform(3, 1 - c.zoom, 1 + c.zoom)
            sx, sy = sx * scale, sy * scale
        m = matrix([[sx, zeros, zeros], [zeros, sy, zeros], [zeros, zeros, ones]]) @ m
        if c.rotation:
            angle = uniform(4, -c.rotation, c.rotation) * (math.pi / 180)
            cos, sin = tf.cos(angle), tf.sin(angle)
            # Rotating about the centre in pixel units keeps non-square images unsheared.
            m = matrix([[cos, -sin, zeros], [sin, cos, zeros], [zeros, zeros, ones]]) @ m
        if c.flip:
            sign = tf.where(uniform(5, 0.0, 1.0) < 0.5, -1.0, 1.0)
            m = matrix([[sign, zeros, zeros], [zeros, ones, zeros], [zeros, zeros, ones]]) @ m
        if c.crop:
            area = uniform(6, c.crop, 1.0)
            log_ratio = uniform(7, math.log(3 / 4), math.log(4 / 3))
            crop_w = tf.minimum(tf.sqrt(area * tf.exp(log_ratio)), 1.0)
            crop_h = tf.minimum(tf.sqrt(area / tf.exp(log_ratio)), 1.0)
            where = tf.random.stateless_uniform([2, batch], keys[8])  # the crop's position
            centre_x = (crop_w / 2 + where[0] * (1 - crop_w)) * width - 0.5
            centre_y = (crop_h / 2 + where[1] * (1 - crop_h)) * height - 0.5
            return matrix([[crop_w, zeros, centre_x], [zeros, crop_h, centre_y], [zeros, zeros, ones]]) @ m
        return matrix([[ones, zeros, cx * ones], [zeros, ones, cy * ones], [zeros, zeros, ones]]) @ m


def _crop_and_resize(images, m, batch, height, width):
    """Flip and crop only: the sampled box lies inside the image, and crop_and_resize samples the same
    points as the projective transform ``m``, about 4x faster on a CPU."""
    import tensorflow as tf

    x1, x2 = m[:, 0, 2], m[:, 0, 0] * (width - 1) + m[:, 0, 2]
    y1, y2 = m[:, 1, 2], m[:, 1, 1] * (height - 1) + m[:, 1, 2]
    boxes = tf.stack(
        [
            y1 / tf.maximum(height - 1, 1.0),
            x1 / tf.maximum(width - 1, 1.0),
            y2 / tf.maximum(height - 1, 1.0),
            x2 / tf.maximum(width - 1, 1.0),
        ],
        axis=-1,
    )
    # Clipped: a coordinate a rounding error past the edge would sample the zero extrapolation.
    boxes = tf.clip_by_value(boxes, 0.0, 1.0)
    out = tf.image.crop_and_resize(images, boxes, tf.range(batch), tf.shape(images)[1:3])
    return tf.clip_by_value(out, 0.0, 255.0)


def _projective_transform(images, m, batch):
    """The images sampled through the per-image output -> input matrices ``m`` (bilinear, reflected edges)."""
    import tensorflow as tf

    transforms = tf.reshape(m / m[:, 2:3, 2:3], [batch, 9])[:, :8]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return tf.clip_by_value(out, 0.0, 255.0)


# ITU-R 601 luminance, as tf.image.rgb_to_grayscale.
_LUMA = (0.2989, 0.5870, 0.1140)


def _colour(images, c, seed):
    """SimCLR's colour and blur operations (Chen et al. 2020, appendix A): colour jitter with probability
    0.8, grayscale with probability ``c.grayscale``, then Gaussian blur with probability ``c.blur``.

    Each operation draws from its own key of ``seed``, so turning one on or off leaves the others'
    draws unchanged. Float32 images in 0..255 in and out; vectorized over the batch."""
    import tensorflow as tf

    keys = tf.random.experimental.stateless_split(seed, num=3)
    if c.jitter:
        images = _jitter(images, c.jitter, keys[0])
    if c.grayscale and images.shape[-1] == 3:
        images = _where_chosen(images, _luminance(images), c.grayscale, keys[1])
    if c.blur:
        images = _blur(images, c.blur, keys[2])
    return images


def _luminance(images):
    """The (batch, height, width, 1) luminance of RGB images (a matrix product: a reduction over the
    last axis of size 3 is several times slower on a CPU)."""
    import tensorflow as tf

    return tf.linalg.matvec(images, tf.constant(_LUMA, images.dtype))[..., None]


def _where_chosen(images, changed, probability, seed):
    """``changed`` for a random ``probability`` of the images, ``images`` for the others (exactly).

    A blend with a 0/1 weight per image (``w * changed + (1 - w) * images`` is exact for both), which
    broadcasts ``changed`` (one gray channel) without a copy: several times faster than ``tf.where`` on a CPU."""
    import tensorflow as tf

    chosen = tf.cast(tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed) < probability, images.dtype)
    return chosen * changed + (1.0 - chosen) * images


def _jitter(images, strength, seed):
    """SimCLR's colour jitter of strength ``s`` on each image with probability 0.8, in a fixed order:
    brightness, contrast, saturation, hue (the last two for RGB only), clipped to 0..255 after each step.

    The factors are uniform in [1 - 0.8s, 1 + 0.8s] and the hue shift in [-0.2s, 0.2s] of the colour
    wheel, per image; an image that is not chosen is returned unchanged."""
    import tensorflow as tf

    keys = tf.random.experimental.stateless_split(seed, num=5)
    batch = tf.shape(images)[0]
    rgb = images.shape[-1] == 3

    def factor(i):
        return tf.random.stateless_uniform([batch, 1, 1, 1], keys[i], 1 - 0.8 * strength, 1 + 0.8 * strength)

    out = tf.clip_by_value(images * factor(0), 0.0, 255.0)  # brightness
    gray = _luminance(out) if rgb else out
    mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
    out = tf.clip_by_value(mean + factor(1) * (out - mean), 0.0, 255.0)  # contrast
    if rgb:
        gray = _luminance(out)
        out = tf.clip_by_value(gray + factor(2) * (out - gray), 0.0, 255.0)  # saturation
        shift = tf.random.stateless_uniform([batch, 1, 1], keys[3], -0.2 * strength, 0.2 * strength)
        out = tf.clip_by_value(_shift_hue(out, shift), 0.0, 255.0)
    return _where_chosen(images, out, 0.8, keys[4])


def _shift_hue(images, shift):
    """RGB images with their HSV hue turned by ``shift`` (a fraction of the colour wheel, per image).

    The same as rgb_to_hsv, adding the shift mod 1 and hsv_to_rgb (value and saturation, so each
    pixel's largest and smallest channel, are kept), written out in elementwise operations: about
    twice as fast on a CPU as the two conversions. Gray and black pixels (no hue) stay as they are."""
    import tensorflow as tf

    r, g, b = tf.unstack(images, axis=-1)
    high = tf.maximum(tf.maximum(r, g), b)
    chroma = high - tf.minimum(tf.minimum(r, g), b)
    safe = tf.where(chroma > 0, chroma, 1.0)
    hue = tf.where(  # in sixths of the wheel, 0 for gray pixels (chroma 0)
        high == r, (g - b) / safe, tf.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    hue += 6.0 * shift
    channels = []
    for offset in (5.0, 3.0, 1.0):  # hsv -> rgb: channel = value - chroma * clip(min(k, 4 - k), 0, 1)
        k = tf.math.floormod(offset + hue, 6.0)
        channels.append(high - chroma * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0))
    return tf.stack(channels, axis=-1)


def _blur(images, probability, seed):
    """A separable Gaussian blur on each image with ``probability``, sigma uniform in [0.1, 2.0] pixels
    of a 224-pixel image scaled to this one (SimCLR's kernel is a tenth of the side), reflected edges.

    Each image has its own kernel: the batch is moved into the channels and blurred with one
    depthwise convolution per axis (about six times faster than summing shifted copies). An image
    that is not chosen gets the unit kernel. Images under 20 pixels (a one-pixel kernel) are returned
    as they are."""
    import tensorflow as tf

    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    if height is None or width is None or channels is None:
        raise ValueError("augment: blur needs images of a known height and width; resize them before augmenting.")
    side = min(height, width)
    radius = (side // 10) // 2  # SimCLR: kernel_size = side // 10, radius = kernel_size // 2
    if radius == 0:
        return images
    keys = tf.random.experimental.stateless_split(seed, num=2)
    batch = tf.shape(images)[0]
    sigma = tf.random.stateless_uniform([batch, 1], keys[0], 0.1, 2.0) * (side / 224)
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)[None, :]
    kernel = tf.exp(-(taps**2) / (2 * sigma**2))
    kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)
    chosen = tf.random.stateless_uniform([batch, 1], keys[1]) < probability
    kernel = tf.where(chosen, kernel, tf.cast(tf.equal(taps, 0.0), tf.float32))
    kernel = tf.transpose(tf.repeat(kernel, channels, axis=0))  # (taps, batch * channels)
    x = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, -1])
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    x = tf.nn.depthwise_conv2d(x, kernel[None, :, :, None], [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, kernel[:, None, :, None], [1, 1, 1, 1], "VALID")
    x = tf.transpose(tf.reshape(x, [height, width, batch, channels]), [2, 0, 1, 3])
    return tf.clip_by_value(x, 0.0, 255.0)


def _beta(shape, alpha, seed):
    """Beta(alpha, alpha) samples from two stateless gamma draws."""
    import tensorflow as tf

    keys = tf.random.experimental.stateless_split(seed, num=2)
    x = tf.random.stateless_gamma(shape, keys[0], alpha)
    y = tf.random.stateless_gamma(shape, keys[1], alpha)
    return x / tf.maximum(x + y, 1e-12)


def _mixup(images, labels, partner, alpha, seed):
    """MixUp (Zhang et al. 2018): ``lam * a + (1 - lam) * b`` for images and labels, lam ~ Beta(alpha, alpha)."""
    import tensorflow as tf

    lam = _beta([tf.shape(images)[0]], alpha, seed)
    mixed = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * tf.gather(images, partner)
    mixed_labels = lam[:, None] * labels + (1 - lam[:, None]) * tf.gather(labels, partner)
    return mixed, mixed_labels


def _cutmix(images, labels, partner, alpha, seed):
    """CutMix (Yun et al. 2019): a box of the partner image pasted in; labels mixed by the box's area."""
    import tensorflow as tf

    keys = tf.random.experimental.stateless_split(seed, num=2)
    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    side = tf.sqrt(1.0 - _beta([batch], alpha, keys[0]))  # the box's side, as a fraction of the image's
    centre = tf.random.stateless_uniform([2, batch], keys[1])
    top = tf.clip_by_value(tf.round(centre[0] * h - side * h / 2), 0.0, h)
    bottom = tf.clip_by_value(tf.round(centre[0] * h + side * h / 2), 0.0, h)
    left = tf.clip_by_value(tf.round(centre[1] * w - side * w / 2), 0.0, w)
    right = tf.clip_by_value(tf.round(centre[1] * w + side * w / 2), 0.0, w)
    rows = tf.cast(tf.range(height), tf.float32)[None, :, None]
    cols = tf.cast(tf.range(width), tf.float32)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < bottom[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < right[:, None, None])
    )
    mixed = tf.where(inside[..., None], tf.gather(images, partner), images)
    kept = 1.0 - (bottom - top) * (right - left) / (h * w)  # the area that stays the image's own
    mixed_labels = kept[:, None] * labels + (1 - kept[:, None]) * tf.gather(labels, partner)
    return mixed, mixed_labels
