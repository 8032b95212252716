"""BERT on fastlm's kernels: post-LN encoder with fused attention (key padding) and fused residual +
LayerNorm; the pretraining heads with the MLM loss computed only on the labelled rows. A padded batch runs
unpadded from the embeddings to the last layer (only real tokens go through the layers; varlen attention)
where varlen attention has kernels.

Parameter names are Hugging Face's (``bert.encoder.layer.0.attention.self.query.weight``, ...), so HF
checkpoints load as they are (see hub.py). Shapes: B batch, L sequence, E hidden, H heads, D head dim.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..nn import LayerNorm
from ..ops.attention import attention
from ..ops.varlen_attention import varlen_attention
from ._common import (
    HFConfig,
    PackedSequences,
    activation,
    check_ids,
    check_length,
    check_same_shape,
    init_normal,
    key_padding_mask,
    run_unpadded,
    runs_varlen_kernel,
)
from .hub import PretrainedMixin

__all__ = [
    "BertConfig",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertModel",
    "BertOutput",
]


@dataclass
class BertConfig(HFConfig):
    """BERT's hyper-parameters, named as in HF's BertConfig."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2  # BertForSequenceClassification
    problem_type: str | None = None  # "regression", "single_label_classification", "multi_label_classification"
    classifier_dropout: float | None = None  # default: hidden_dropout_prob

    model_type: ClassVar[str] = "bert"
    PRESETS: ClassVar[dict] = {
        "bert-base": {},
        "bert-large": {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
        },
        "bert-tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
    }

    def _check_values(self):
        self._check_heads("hidden_size", "num_attention_heads")
        self._check_token_ids("pad_token_id")
        self._check_activation("hidden_act")

    @classmethod
    def _check_hf(cls, config):
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"BertConfig: position_embedding_type={config['position_embedding_type']!r} is not "
                f"supported (only 'absolute')"
            )
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("BertConfig: BERT as a decoder (is_decoder / add_cross_attention) is not supported")


@dataclass
class BertOutput:
    """What the BERT models return; fields a model does not compute are None.

    loss: scalar (MLM + NSP for pretraining, the task loss for classification); mlm_loss, nsp_loss: the
    parts. logits: (B, L, V) MLM logits (only without labels: with labels the head runs on the labelled
    rows alone) or (B, num_labels) classification logits. seq_relationship_logits: (B, 2) NSP logits.
    last_hidden_state: (B, L, E); pooler_output: (B, E).
    """

    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Body
# ----------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Token + position + segment embeddings, LayerNorm (fused with the sum), dropout."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        E = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, E)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, E)
        self.LayerNorm = LayerNorm(E, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None):
        check_ids(input_ids, self.config.vocab_size)
        L = input_ids.shape[1]
        check_length(L, self.config.max_position_embeddings)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_same_shape(token_type_ids, "token_type_ids", input_ids.shape)
        check_ids(token_type_ids, self.config.type_vocab_size, "token_type_ids", table="the token types")
        positions = self.position_embeddings.weight[:L]  # (L, E), broadcast over B
        others = self.token_type_embeddings(token_type_ids) + positions  # (B, L, E)
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids), residual=others))  # (B, L, E)


_QKV = ("query", "key", "value")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # saved by older HF versions, ignored


def _split_qkv(module, state_dict, prefix, local_metadata):
    """state_dict hook: the fused ``qkv`` as HF's ``query`` / ``key`` / ``value`` tensors (copies, so that a
    checkpoint writer never sees tensors sharing storage)."""
    parts = {kind: state_dict.pop(f"{prefix}qkv.{kind}").chunk(3) for kind in ("weight", "bias")}  # 3 x (E, ...)
    for i, name in enumerate(_QKV):  # HF's order: query.weight, query.bias, key.weight, ...
        for kind in ("weight", "bias"):
            state_dict[f"{prefix}{name}.{kind}"] = parts[kind][i].clone()


def _fuse_qkv(module, state_dict, prefix, *args):
    """load_state_dict pre-hook: HF's ``query`` / ``key`` / ``value`` tensors concatenated into ``qkv``."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in _QKV]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])  # (3E, ...)


class BertSelfAttention(nn.Module):
    """Query, key and value projections stored fused, ``qkv``: weight (3E, E) = [query; key; value] and
    bias (3E,), one GEMM; fastlm.attention with key padding. state_dict() and load_state_dict() use HF's
    separate ``query`` / ``key`` / ``value`` names (E, E) / (E,)."""

    def __init__(self, config):
        super().__init__()
        E = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(E, 3 * E)
        self.dropout_p = config.attention_probs_dropout_prob
        self.register_state_dict_post_hook(_split_qkv)
        self.register_load_state_dict_pre_hook(_fuse_qkv)

    def forward(self, x, mask):
        """x (B, L, E) with mask the (B, L) bool key padding mask or None; or packed tokens x (T, E) with mask
        their PackedSequences."""
        H = self.num_heads
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(mask, PackedSequences):
            T, E = x.shape
            q, k, v = self.qkv(x).view(T, 3, H, E // H).unbind(1)  # (T, 3E) -> (T, 3, H, D) -> 3 x (T, H, D)
            cu, longest = mask.cu_seqlens, mask.max_seqlen
            return varlen_attention(q, k, v, cu, cu, longest, longest, dropout_p=dropout_p).reshape(T, E)
        B, L, E = x.shape
        qkv = self.qkv(x).view(B, L, 3, H, E // H)  # (B, L, 3E) -> (B, L, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D), views
        out = attention(q, k, v, key_padding_mask=mask, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(B, L, E)  # (B, H, L, D) -> (B, L, H, D) -> (B, L, E)


class BertResidualOutput(nn.Module):
    """Post-LN sub-layer exit: dense, dropout, then LayerNorm(out + residual) in one fused kernel."""

    def __init__(self, config, in_features):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)), residual=residual)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config, config.hidden_size)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One post-LN encoder block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config, config.intermediate_size)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    """tanh(dense(h[CLS]))."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))  # (B, E)


class BertModel(PretrainedMixin, nn.Module):
    """The BERT body: embeddings, encoder, optional pooler.

    forward(input_ids (B, L) int, attention_mask (B, L) 1 = token / 0 = padding, token_type_ids (B, L))
    -> BertOutput with last_hidden_state (B, L, E) and pooler_output (B, E) (None without the pooler).

    unpad_inputs (default True): a batch with padding runs unpadded from the embeddings to the last layer
    when fastlm.varlen_attention has kernels for it (CPU and Triton; with a forced backend that lacks them,
    the padded path runs). It computes the same values at the real tokens;
    last_hidden_state is 0 at the padding.
    """

    config_class = BertConfig
    hf_architecture = "BertModel"

    def __init__(self, config, add_pooling_layer=True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.unpad_inputs = True
        init_normal(self, config.initializer_range)

    def hf_keys(self):
        return {"prefix": "bert.", "body": True, "new": ("pooler.",), "buffers": _BUFFERS}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, E); checks input_ids
        mask = key_padding_mask(attention_mask, input_ids.shape)  # (B, L) bool, None without padding
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        if mask is not None and self.unpad_inputs and runs_varlen_kernel(x, head_dim):
            h = run_unpadded(self.encoder, x, mask)  # (B, L, E), 0 at the padding
        else:
            h = self.encoder(x, mask)  # (B, L, E)
        pooled = self.pooler(h) if self.pooler is not None else None
        return BertOutput(last_hidden_state=h, pooler_output=pooled)


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h):
        return self.LayerNorm(self.act(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    """MLM head: transform (dense, activation, LayerNorm), then the decoder tied to the word embeddings
    plus its own bias. ``loss`` runs all of it on the labelled rows only."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h, decoder_weight):
        """h (..., E) -> logits (..., V)."""
        return F.linear(self.transform(h), decoder_weight, self.bias)

    def loss(self, h, labels, decoder_weight):
        """Mean cross-entropy over the positions whose label is not -100. h (B, L, E), labels (B, L)."""
        if tuple(labels.shape) != tuple(h.shape[:2]):
            raise ValueError(f"labels must have shape (B, L) = {tuple(h.shape[:2])}, got {tuple(labels.shape)}")
        labelled = labels != -100  # (B, L)
        rows = self.transform(h[labelled])  # (N, E): only the N labelled rows go through the head
        return ops.linear_cross_entropy(rows, decoder_weight, labels[labelled], self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(PretrainedMixin, nn.Module):
    """BERT with the MLM and next-sentence-prediction heads.

    forward(input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None):
    labels (B, L) int with -100 at unmasked positions; next_sentence_label (B,) in {0, 1}. With labels,
    loss = MLM (+ NSP when next_sentence_label is given) and no (B, L, V) logits are formed; without,
    logits (B, L, V). seq_relationship_logits (B, 2) always.
    """

    config_class = BertConfig
    hf_architecture = "BertForPreTraining"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        init_normal(self.cls, config.initializer_range)

    def hf_keys(self):
        return {"prefix": "bert.", "new": ("cls.",), "dropped": ("cls.predictions.decoder.",), "buffers": _BUFFERS}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None):
        body = self.bert(input_ids, attention_mask, token_type_ids)
        h, pooled = body.last_hidden_state, body.pooler_output  # (B, L, E), (B, E)
        head = self.cls.predictions
        decoder_weight = self.bert.embeddings.word_embeddings.weight  # (V, E), tied
        nsp_logits = self.cls.seq_relationship(pooled)  # (B, 2)
        out = BertOutput(seq_relationship_logits=nsp_logits, last_hidden_state=h, pooler_output=pooled)
        if labels is None:
            out.logits = head(h, decoder_weight)  # (B, L, V)
            return out
        out.loss = out.mlm_loss = head.loss(h, labels, decoder_weight)
        if next_sentence_label is not None:
            out.nsp_loss = ops.cross_entropy(nsp_logits, next_sentence_label.reshape(-1))
            out.loss = out.loss + out.nsp_loss
        return out


class BertForMaskedLM(PretrainedMixin, nn.Module):
    """BERT with the MLM head only (no pooler). forward(input_ids, attention_mask=None,
    token_type_ids=None, labels=None): as BertForPreTraining without NSP."""

    config_class = BertConfig
    hf_architecture = "BertForMaskedLM"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        init_normal(self.cls, config.initializer_range)

    def hf_keys(self):
        return {
            "prefix": "bert.",
            "new": ("cls.",),
            "dropped": ("cls.predictions.decoder.", "bert.pooler.", "cls.seq_relationship."),
            "buffers": _BUFFERS,
        }

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        h = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, L, E)
        decoder_weight = self.bert.embeddings.word_embeddings.weight  # (V, E), tied
        if labels is None:
            return BertOutput(logits=self.cls.predictions(h, decoder_weight), last_hidden_state=h)
        loss = self.cls.predictions.loss(h, labels, decoder_weight)
        return BertOutput(loss=loss, mlm_loss=loss, last_hidden_state=h)


class BertForSequenceClassification(PretrainedMixin, nn.Module):
    """BERT with a classifier on the pooled [CLS] state (a new head on a pretrained body).

    forward(input_ids, attention_mask=None, token_type_ids=None, labels=None) -> logits (B, num_labels);
    loss as HF: regression (MSE) when num_labels == 1, cross-entropy for int labels (B,), BCE-with-logits
    for float multi-label targets (B, num_labels), or as ``config.problem_type`` says.
    """

    config_class = BertConfig
    hf_architecture = "BertForSequenceClassification"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_normal(self.classifier, config.initializer_range)

    def hf_keys(self):
        return {"prefix": "bert.", "new": ("classifier.", "bert.pooler."), "dropped": ("cls.",), "buffers": _BUFFERS}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        pooled = self.bert(input_ids, attention_mask, token_type_ids).pooler_output  # (B, E)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        out = BertOutput(logits=logits, pooler_output=pooled)
        if labels is None:
            return out
        problem = self.config.problem_type
        if problem is None:
            if self.config.num_labels == 1:
                problem = "regression"
            elif not labels.is_floating_point():
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if labels.numel() != logits.numel():
                raise ValueError(
                    f"labels of a regression must have shape (B, num_labels) = {tuple(logits.shape)} (or (B,) "
                    f"when num_labels == 1), got {tuple(labels.shape)}"
                )
            out.loss = F.mse_loss(logits, labels.to(logits.dtype).reshape(logits.shape))
        elif problem == "single_label_classification":
            out.loss = ops.cross_entropy(logits, labels.reshape(-1))
        elif problem == "multi_label_classification":
            check_same_shape(labels, "labels", logits.shape, "(B, num_labels)")
            out.loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        else:
            raise ValueError(f"BertForSequenceClassification: unknown problem_type {problem!r}")
        return out
