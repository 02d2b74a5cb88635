"""Pretraining configuration: the settings of `ktool pretrain`, validated early and written into the run.

The flags are these fields with ``-`` for ``_``; a YAML file holds the same names (``ktool pretrain
--config runs/simclr/config.yaml --epochs 100``: flags override the file).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ktoolkit.train.config import RunConfig

METHODS = ("autoencoder", "denoising", "contrastive")
NOISES = ("gaussian", "masking", "salt_pepper")  # recipes.autoencoder.NOISES, without importing TensorFlow
# The recipe each method builds when none is given.
DEFAULT_RECIPES = {
    "autoencoder": "conv_autoencoder",
    "denoising": "denoising_autoencoder",
    "contrastive": "contrastive_encoder",
}
# SimCLR's views (Chen et al. 2020, appendix A): random resized crops (which also scale; 0.2 of the area at
# least, as the CIFAR-10 reproductions use), flips, colour jitter of strength 0.5 with probability 0.8,
# grayscale with probability 0.2, Gaussian blur with probability 0.5 (its sigma scales with the image: next
# to nothing at 32x32, where SimCLR leaves it out).
DEFAULT_VIEWS = "flip,crop=0.2,jitter=0.5,grayscale=0.2,blur=0.5"


@dataclass
class PretrainConfig(RunConfig):
    """Everything a pretraining run depends on. Labels are never used for training.

    Attributes (and :class:`ktoolkit.train.config.RunConfig`'s):
        method: "autoencoder" (reconstruct the image), "denoising" (reconstruct it from a corrupted
            copy) or "contrastive" (SimCLR: two random views of an image attract, the other images
            of the batch repel).
        recipe: autoencoders: an autoencoder recipe (conv_autoencoder; denoising_autoencoder for
            "denoising"); contrastive: contrastive_encoder, or any classification recipe, which
            becomes its backbone (e.g. resnet18). None: the method's default (:data:`DEFAULT_RECIPES`).
        data: a folder of images, with or without class subfolders, a CSV, an .npz or ``tfds:NAME``.
            Labels, where there are any, only colour the embedding plot.
        out: the run folder (created; an interrupted run there is resumed).
        epochs, batch_size, optimizer, lr, momentum, schedule, weight_decay, distribute, image_size,
            channels, seed, cache, strict, deterministic, data_dir, steps_per_epoch: as for
            :class:`ktoolkit.train.TrainConfig`. For contrastive learning the batch is also the set
            of negatives: larger is better (SimCLR used 256 to 8192).
        val_fraction, test_fraction: the split, as `ktool train` makes it (same seed, same split):
            pretraining uses the training images only, so `ktool linear-eval` on the same data
            tests on images pretraining never saw.
        temperature: NT-Xent temperature (contrastive; 0.5 in SimCLR for CIFAR-10).
        noise: corruption of the denoising autoencoder: "masking" (the default: a fraction ``noise_strength``
            of the values set to 0, Vincent et al. 2010's masking noise, which makes the network fill in
            what it cannot see rather than smooth), "gaussian" (stddev ``noise_strength``) or "salt_pepper"
            (a fraction set to 0 or 1), on images scaled to 0..1.
        noise_strength: the noise's stddev or rate.
        augment: contrastive: the random transformations that make the two views (default
            :data:`DEFAULT_VIEWS`); autoencoders: augmentation of the inputs (default none). The
            names of `ktool train --augment`. Flips are wrong for digits and text: leave them out there.
        recipe_options: extra keyword arguments of the recipe builder (e.g. {"latent_dim": 64}, or
            {"projection_dim": 64, "backbone_options": {"hidden_units": [128, 16]}}).
    """

    method: str = "contrastive"
    recipe: str | None = None
    out: str = "runs/pretrain"
    epochs: int = 20
    batch_size: int = 128
    schedule: str = "warmup-cosine"
    temperature: float = 0.5
    noise: str = "masking"
    noise_strength: float = 0.5
    augment: str | None = None
    recipe_options: dict = field(default_factory=dict)

    KIND = "pretraining"
    LABELLED = False  # class folders optional: labels are never used for training
    # Settings that may differ when an interrupted run is resumed (they do not change the result).
    RESUMABLE = ("epochs", "deterministic", "strict", "cache", "data_dir", "distribute")

    def resolved(self) -> PretrainConfig:
        """A copy with the method's defaults filled in (recipe, augment), as the run folder records it."""
        import dataclasses

        augment = self.augment
        if augment is None:
            augment = DEFAULT_VIEWS if self.method == "contrastive" else "none"
        return dataclasses.replace(self, recipe=self.recipe or DEFAULT_RECIPES.get(self.method), augment=augment)

    def validate(self) -> PretrainConfig:
        """Raises a ValueError naming the first bad field, its value and the valid ones."""
        bad = self._bad
        if self.method not in METHODS:
            bad("method", f"use one of {', '.join(METHODS)}.")
        if not self.data:
            bad("data", "give the images: a folder (class subfolders are optional), a CSV, an .npz or tfds:NAME.")
        self.check_common()
        if self.method == "contrastive" and self.batch_size < 2:
            bad(
                "batch_size",
                "contrastive learning needs at least 2 images per batch (the others are the negatives); "
                "use 64 or more.",
            )
        if not self.temperature > 0:
            bad("temperature", "must be > 0, e.g. 0.5 (SimCLR on CIFAR-10) or 0.1.")
        if self.noise not in NOISES:
            bad("noise", f"use one of {', '.join(NOISES)}.")
        if not (self.noise_strength >= 0 and (self.noise == "gaussian" or self.noise_strength < 1)):
            bad("noise_strength", f"must be >= 0 (and < 1 for noise={self.noise!r}, a rate), e.g. 0.1.")
        from ktoolkit.data import AugmentConfig

        augment = AugmentConfig.parse(self.resolved().augment)  # a ValueError names a bad option
        if augment.mixes_labels:
            bad("augment", "mixup and cutmix mix labels, and pretraining has none; leave them out.")
        if self.method == "contrastive" and not augment:
            bad(
                "augment",
                f"contrastive learning needs random views of each image, e.g. {DEFAULT_VIEWS} "
                "(crop=0.3,jitter=0.5 for digits: no flips).",
            )
        self._check_recipe()
        return self

    def _check_recipe(self):
        import recipes

        name = self.recipe or DEFAULT_RECIPES.get(self.method)
        recipe = recipes.get(name)  # UnknownRecipeError with close matches
        if self.method == "contrastive":
            if recipe.task not in ("contrastive", "classification"):
                raise ValueError(
                    f"recipe={name!r} is an {recipe.task} model; --method contrastive takes "
                    "contrastive_encoder or a classification recipe as its backbone (e.g. resnet18)."
                )
            return
        autoencoders = recipes.names(task="autoencoder")
        denoising = "noise" in recipe.options
        if recipe.task != "autoencoder":
            raise ValueError(
                f"recipe={name!r} is not an autoencoder; --method {self.method} takes {', '.join(autoencoders)}."
            )
        if self.method == "denoising" and not denoising:
            raise ValueError(
                f"recipe={name!r} has no noise layer; --method denoising takes "
                f"{', '.join(n for n in autoencoders if 'noise' in recipes.get(n).options)}."
            )
        if self.method == "autoencoder" and denoising:
            raise ValueError(f"recipe={name!r} corrupts its inputs; use --method denoising with it.")
