"""Training: configuration, the tf.distribute engine, crash-safe callbacks."""

from ktoolkit.train.config import TrainConfig
from ktoolkit.train.engine import RunExistsError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "RunExistsError", "train"]
