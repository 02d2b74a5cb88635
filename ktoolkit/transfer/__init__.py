"""Transfer learning: `ktool finetune` and `ktool advise` (the decision matrix is recipes.transfer)."""

from ktoolkit.transfer.advise import Advice, advise
from ktoolkit.transfer.bases import load_base
from ktoolkit.transfer.finetune import FinetuneConfig, FinetuneResult, finetune

__all__ = ["Advice", "FinetuneConfig", "FinetuneResult", "advise", "finetune", "load_base"]
