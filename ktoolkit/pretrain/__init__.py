"""Learning without labels: `ktool pretrain` (autoencoder, denoising, contrastive) and `ktool linear-eval`.

    from ktoolkit.pretrain import pretrain, linear_eval

    result = pretrain(method="contrastive", recipe="resnet18", data="photos/", image_size=(64, 64), epochs=100)
    evaluation = linear_eval(result.run.root, "labelled/")   # accuracy vs. the same encoder at random init

Nothing here imports TensorFlow until a function needs it.
"""

from ktoolkit.pretrain.config import DEFAULT_RECIPES, DEFAULT_VIEWS, METHODS, PretrainConfig
from ktoolkit.pretrain.engine import PretrainResult, pretrain
from ktoolkit.pretrain.linear_eval import LinearEvalResult, ProbeResult, linear_eval, linear_probe

__all__ = [
    "DEFAULT_RECIPES",
    "DEFAULT_VIEWS",
    "METHODS",
    "LinearEvalResult",
    "PretrainConfig",
    "PretrainResult",
    "ProbeResult",
    "linear_eval",
    "linear_probe",
    "pretrain",
]
