"""Compact BERT, GPT-2 and T5 built on fastlm's kernels, loading and saving Hugging Face checkpoints.

Each family lives in one file (bert.py, gpt.py, t5.py) with a dataclass config and named presets;
hub.py reads and writes HF's format, generation.py holds the decoding loop, finetune.py the
fine-tuning helpers.
"""

from ._common import PackedSequences
from .bert import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    BertOutput,
)
from .finetune import freeze_all_but, linear_probe, new_head, trainable_parameters
from .gpt import GPTConfig, GPTLMHeadModel, GPTModel, GPTOutput
from .t5 import T5Config, T5ForConditionalGeneration, T5Output

__all__ = [
    "PackedSequences",
    "BertConfig",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertModel",
    "BertOutput",
    "GPTConfig",
    "GPTLMHeadModel",
    "GPTModel",
    "GPTOutput",
    "T5Config",
    "T5ForConditionalGeneration",
    "T5Output",
    "freeze_all_but",
    "linear_probe",
    "new_head",
    "trainable_parameters",
]
