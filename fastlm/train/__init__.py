"""Training from the command line: pretraining (BERT MLM + NSP, GPT causal LM, T5 span corruption) and
sequence-classification fine-tuning, with atomic checkpoints, exact resume and torchrun DDP."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .pretrain import PretrainConfig, pretrain

__all__ = ["PretrainConfig", "latest_checkpoint", "load_checkpoint", "pretrain", "save_checkpoint"]
