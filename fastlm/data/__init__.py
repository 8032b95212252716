"""Pretraining data: sources (files, JSONL, `datasets`, the embedded stdlib default), tokenizers, and the
objectives' corruptions — BERT's MLM masking and NSP pairs, GPT's packed blocks, T5's span corruption."""

from .masking import mlm_mask
from .packing import document_sequences, nsp_pairs, pack_blocks
from .sources import BUILTIN, load_texts, stdlib_docstrings
from .spans import span_corrupt, span_corruption_lengths
from .tokenizers import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BUILTIN",
    "Tokenizer",
    "load_texts",
    "load_tokenizer",
    "mlm_mask",
    "nsp_pairs",
    "pack_blocks",
    "document_sequences",
    "span_corrupt",
    "span_corruption_lengths",
    "stdlib_docstrings",
    "train_tokenizer",
]
