"""Keras functional recipes for the classic CNNs, classifiers, autoencoders and a contrastive encoder.

Every image recipe has one signature::

    model = recipes.resnet50(input_shape=(224, 224, 3), num_classes=1000, include_top=True,
                             pooling=None, weights=None, name=None, api="tf_keras", **family_options)

``recipes.get(name)`` returns the registry entry (metadata), ``recipes.build(name, **kwargs)`` builds
by name, ``recipes.names()`` lists them. Models are built with tf_keras unless ``api="keras3"``.
"""

from recipes import _keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 before TensorFlow is imported)
from recipes.alexnet import alexnet, alexnet_grouped, zfnet
from recipes.autoencoder import conv_autoencoder, denoising_autoencoder, encoder_of, linear_autoencoder
from recipes.contrastive import contrastive_encoder, nt_xent_loss
from recipes.googlenet import googlenet, googlenet_loss_weights
from recipes.inception import inception_v3
from recipes.lenet import lenet5
from recipes.linear import linear_classifier, mlp
from recipes.losses import multiclass_hinge
from recipes.registry import Recipe, UnknownRecipeError, all_recipes, build, get, names
from recipes.resnet import (
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    se_resnet50,
)
from recipes.saving import UnsafeModelError, load_model
from recipes.vgg import vgg16, vgg19, vgg_a, vgg_a_lrn, vgg_b, vgg_c, vgg_d, vgg_e

__all__ = [
    "Recipe",
    "UnknownRecipeError",
    "UnsafeModelError",
    "all_recipes",
    "build",
    "get",
    "names",
    "load_model",
    "multiclass_hinge",
    "lenet5",
    "alexnet",
    "alexnet_grouped",
    "zfnet",
    "vgg_a",
    "vgg_a_lrn",
    "vgg_b",
    "vgg_c",
    "vgg_d",
    "vgg_e",
    "vgg16",
    "vgg19",
    "googlenet",
    "inception_v3",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "se_resnet50",
    "linear_classifier",
    "mlp",
    "conv_autoencoder",
    "denoising_autoencoder",
    "contrastive_encoder",
    "googlenet_loss_weights",
    "encoder_of",
    "linear_autoencoder",
    "nt_xent_loss",
]
