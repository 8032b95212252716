"""The three pretraining objectives as tasks: which model, how examples are cut from the corpus, how a batch
is corrupted, and what the evaluation measures. A task's batches are pure functions of (examples, generator),
so a run is reproducible from its seed and step."""

import abc
import math

import torch
from torch.nn import functional as F

from .. import models
from ..data import mlm_mask, nsp_pairs, pack_blocks, span_corrupt, span_corruption_lengths

__all__ = ["TASKS", "BertTask", "GPTTask", "T5Task", "finish_metrics", "get_task"]


class Task(abc.ABC):
    """What `fastlm pretrain` needs of an objective. A task names its model (``config_class``,
    ``model_class``, ``presets``: short name -> preset name, ``dropout_fields``) and implements
    ``examples`` (the corpus cut into examples), ``batch`` (the corruption of a step's rows) and
    ``evaluate`` (summed held-out metrics). ``examples`` is a dict of CPU tensors with one row per example;
    ``batch`` must be a pure function of (rows, generator) so that a run is reproducible from its seed."""

    family = ""
    config_class = None
    model_class = None
    presets = {}
    dropout_fields = ()

    def config(self, preset, tokenizer, dropout=None):
        """The model config of ``preset`` ("tiny" or a full preset name) sized to the tokenizer's vocabulary."""
        name = self.presets.get(preset, preset)
        overrides = {"vocab_size": tokenizer.vocab_size, **self.token_overrides(tokenizer)}
        if dropout is not None and dropout >= 0:
            overrides.update(dict.fromkeys(self.dropout_fields, dropout))
        return self.config_class.preset(name, **overrides)

    def token_overrides(self, tokenizer):
        """Model-config fields taken from the tokenizer (special token ids); none by default."""
        return {}

    def max_seq_len(self, model_config):
        """The longest example the model of ``model_config`` takes (its position table), or None."""
        return None

    def tokens_per_example(self, examples):
        """Tokens the model reads per example (for the tokens/s rate)."""
        return sum(int(v.shape[1]) for k, v in examples.items() if k in ("input_ids", "tokens"))

    @abc.abstractmethod
    def examples(self, docs, tokenizer, seq_len, generator):
        """The training examples of the tokenised documents ``docs`` (list of list[int]): a dict of int64 CPU
        tensors with one row (of ``seq_len`` tokens) per example; ``generator`` seeds any random cut."""

    @abc.abstractmethod
    def batch(self, rows, tokenizer, generator, device):
        """The model inputs (keyword arguments, labels included) of the example ``rows`` (a dict as
        ``examples`` gives, B rows each) on ``device``, corrupted with ``generator`` (on ``device``)."""

    @abc.abstractmethod
    def evaluate(self, model, batch):
        """Held-out metrics of one ``batch`` as {name: (sum, count)}; `finish_metrics` turns sums into means."""


class BertTask(Task):
    """MLM (80/10/10 at 15%, an exact count per sequence) plus NSP on [CLS] A [SEP] B [SEP] pairs."""

    family = "bert"
    config_class = models.BertConfig
    model_class = models.BertForPreTraining
    presets = {"tiny": "bert-tiny", "base": "bert-base", "large": "bert-large"}
    dropout_fields = ("hidden_dropout_prob", "attention_probs_dropout_prob")

    def token_overrides(self, tokenizer):
        return {"pad_token_id": tokenizer.pad_id}

    def max_seq_len(self, model_config):
        return model_config.max_position_embeddings

    def examples(self, docs, tokenizer, seq_len, generator):
        ids, types, nsp = nsp_pairs(
            docs, seq_len, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, generator=generator
        )
        return {"input_ids": ids, "token_type_ids": types, "next_sentence_label": nsp}

    def batch(self, rows, tokenizer, generator, device):
        ids = rows["input_ids"].to(device)
        masked, labels = mlm_mask(
            ids,
            mask_token_id=tokenizer.mask_id,
            vocab_size=tokenizer.vocab_size,
            special_ids=tokenizer.special_ids,
            generator=generator,
            exact=True,
        )
        return {
            "input_ids": masked,
            "token_type_ids": rows["token_type_ids"].to(device),
            "labels": labels,
            "next_sentence_label": rows["next_sentence_label"].to(device),
        }

    @torch.no_grad()
    def evaluate(self, model, batch):
        """Sums over the batch: MLM loss and hits over masked tokens, NSP hits over sequences."""
        out = model(batch["input_ids"], token_type_ids=batch["token_type_ids"])
        labels = batch["labels"]
        picked = labels != -100
        logits = out.logits[picked].float()  # (M, V)
        target = labels[picked]
        mlm_loss = F.cross_entropy(logits, target, reduction="sum")
        nsp_hits = (out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum()
        return {
            "mlm_loss": (float(mlm_loss), int(target.numel())),
            "mlm_accuracy": (int((logits.argmax(-1) == target).sum()), int(target.numel())),
            "nsp_accuracy": (int(nsp_hits), int(labels.shape[0])),
        }


class GPTTask(Task):
    """Next-token prediction over packed blocks of documents joined by <|endoftext|>. With pack_documents
    (``--pack-documents``), the documents in a block attend only within themselves and their positions restart
    at each document (varlen attention); the loss is as without."""

    family = "gpt"
    config_class = models.GPTConfig
    model_class = models.GPTLMHeadModel
    presets = {"tiny": "gpt2-tiny", "base": "gpt2", "medium": "gpt2-medium"}
    dropout_fields = ("resid_pdrop", "embd_pdrop", "attn_pdrop")

    def __init__(self, pack_documents=False):
        self.pack_documents = pack_documents

    def token_overrides(self, tokenizer):
        return {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}

    def max_seq_len(self, model_config):
        return model_config.n_positions

    def examples(self, docs, tokenizer, seq_len, generator):
        if not self.pack_documents:
            return {"input_ids": pack_blocks(docs, seq_len, tokenizer.eos_id)}
        blocks, starts = pack_blocks(docs, seq_len, tokenizer.eos_id, document_starts=True)
        return {"input_ids": blocks, "document_starts": starts}

    def batch(self, rows, tokenizer, generator, device):
        ids = rows["input_ids"].to(device)
        batch = {"input_ids": ids, "labels": ids}
        if "document_starts" in rows:
            batch["document_starts"] = rows["document_starts"].to(device)
        return batch

    @torch.no_grad()
    def evaluate(self, model, batch):
        logits = model(batch["input_ids"], document_starts=batch.get("document_starts")).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        return {"loss": (float(loss), int(target.numel()))}


class T5Task(Task):
    """Span corruption: 15% noise in spans of mean length 3, sentinels in the input, spans in the target."""

    family = "t5"
    config_class = models.T5Config
    model_class = models.T5ForConditionalGeneration
    presets = {"tiny": "t5-tiny", "small": "t5-small", "base": "t5-base"}
    dropout_fields = ("dropout_rate",)

    def token_overrides(self, tokenizer):
        return {
            "pad_token_id": tokenizer.pad_id,
            "eos_token_id": tokenizer.eos_id,
            "decoder_start_token_id": tokenizer.pad_id,
        }

    def examples(self, docs, tokenizer, seq_len, generator):
        span_corruption_lengths(seq_len)  # validates seq_len
        return {"tokens": pack_blocks(docs, seq_len, tokenizer.eos_id)}

    def batch(self, rows, tokenizer, generator, device):
        cpu_generator = torch.Generator().manual_seed(generator.initial_seed())  # the corruption runs on the host
        inputs, labels = span_corrupt(
            rows["tokens"], sentinel_ids=tokenizer.sentinel_ids, eos_id=tokenizer.eos_id, generator=cpu_generator
        )
        return {"input_ids": inputs.to(device), "labels": labels.to(device)}

    @torch.no_grad()
    def evaluate(self, model, batch):
        logits = model(batch["input_ids"], decoder_input_ids=model.shift_right(batch["labels"])).logits.float()
        target = batch["labels"]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        hits = (logits.argmax(-1) == target).sum()
        return {"loss": (float(loss), int(target.numel())), "token_accuracy": (int(hits), int(target.numel()))}


TASKS = {"bert": BertTask, "gpt": GPTTask, "t5": T5Task}


def get_task(family, pack_documents=False):
    """The ``Task`` of ``family`` (bert, gpt or t5); ValueError naming the choices otherwise. pack_documents:
    GPT's documents attend only within themselves (ValueError for the other families)."""
    if family not in TASKS:
        raise ValueError(f"model family must be one of {', '.join(TASKS)}, got {family!r}")
    if not pack_documents:
        return TASKS[family]()
    if family != "gpt":
        raise ValueError(f"--pack-documents is for gpt (documents packed into blocks), got {family}")
    return GPTTask(pack_documents=True)


def finish_metrics(sums):
    """Ratios of summed (numerator, count) pairs; a "loss" also gives its perplexity."""
    out = {}
    for name, (num, count) in sums.items():
        out[name] = num / max(count, 1)
        if name.endswith("loss"):
            out[name.replace("loss", "perplexity")] = math.exp(min(out[name], 50.0))
    return out
