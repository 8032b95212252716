"""T5 on fastlm's kernels: encoder-decoder with RMSNorm (fused with the residual add), T5's relative
position bias computed inside fastlm.attention (``rel_pos``; the first layer's table and one bucket
computation per forward serve every layer),
v1.0 (ReLU) and v1.1 (gated GELU) feed-forward, a tied or untied LM head, generate() with a KV cache. A padded
source runs through the encoder unpadded, and padded targets through the decoder (causal self-attention and
cross-attention on the packed encoder output) and the head, with varlen attention where it has kernels.

Parameter names are Hugging Face's (``encoder.block.0.layer.0.SelfAttention.q.weight``, ...).
Shapes: B batch, Ls source length, Lt target length, E = d_model, H heads, D = d_kv, V vocabulary.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..nn import RMSNorm
from ..ops.attention import RelativePositionBias, attention
from ..ops.varlen_attention import varlen_attention
from ._common import (
    HFConfig,
    PackedSequences,
    activation,
    check_ids,
    check_labels,
    has_holes,
    key_padding_mask,
    runs_varlen_kernel,
)
from .generation import GenerationMixin, KVCache
from .hub import PretrainedMixin

__all__ = ["CachedRelativePositionBias", "T5Config", "T5ForConditionalGeneration", "T5Output"]


@dataclass
class T5Config(HFConfig):
    """T5's hyper-parameters, named as in HF's T5Config.

    feed_forward_proj: "relu" (T5 v1.0) or "gated-gelu" (v1.1; any "gated-<act>" works).
    tie_word_embeddings: the LM head is the shared embedding (v1.0) or its own ``lm_head`` (v1.1).
    scale_decoder_outputs: multiply the decoder output by d_model**-0.5 before the head (default: when
        tied, as T5 does). HF 5.x always ties and records this flag instead.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # default num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    model_type: ClassVar[str] = "t5"
    PRESETS: ClassVar[dict] = {
        "t5-small": {},
        "t5-base": {"d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12},
        "t5-v1_1-small": {
            "d_ff": 1024,
            "num_layers": 8,
            "num_heads": 6,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
        },
        "t5-v1_1-base": {
            "d_model": 768,
            "d_ff": 2048,
            "num_layers": 12,
            "num_heads": 12,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
        },
        "t5-tiny": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
    }

    def __post_init__(self):
        super().__post_init__()
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings

    def _check_values(self):
        if self.num_heads < 1:
            raise ValueError(f"T5Config: num_heads must be >= 1, got {self.num_heads}")
        self._check_token_ids("pad_token_id", "decoder_start_token_id")
        self._check_activation("feed_forward_proj", self.act)

    @property
    def gated(self):
        """Whether the feed-forward is gated (v1.1: act(wi_0 x) * wi_1 x)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self):
        """HF's activation name of the feed-forward (gated-gelu uses the tanh GELU, as HF does)."""
        name = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else name


@dataclass
class T5Output:
    """loss: mean token loss (with labels); logits (B, Lt, V) (without labels); encoder_last_hidden_state
    (B, Ls, E); decoder_last_hidden_state (B, Lt, E), before the head's scaling. Each is 0 at the padding
    its stack ran unpadded on (see T5ForConditionalGeneration's unpad_inputs)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    decoder_last_hidden_state: torch.Tensor | None = None


@dataclass
class CachedRelativePositionBias(RelativePositionBias):
    """A RelativePositionBias that keeps the diagonal buckets of the last (Lq, Lk) it computed in ``cache``,
    so that every layer of a T5 stack (all reading the first layer's table) shares one bucket computation.

    cache: a dict, fresh by default; instances made for the same stack may share one, since its key holds
    everything the buckets depend on (lengths, bucketing, the table's device, inference mode).
    """

    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def diagonal_buckets(self, Lq, Lk):
        """(Lq + Lk - 1,) int64 buckets, as RelativePositionBias.diagonal_buckets, computed once per key."""
        key = (
            Lq,
            Lk,
            self.bidirectional,
            self.table.shape[0],
            self.max_distance,
            self.table.device,
            torch.is_inference_mode_enabled(),
        )
        entry = self.cache.get("entry")  # (key, buckets), stored as one item so that threads sharing it agree
        if entry is None or entry[0] != key:
            entry = key, super().diagonal_buckets(Lq, Lk)
            self.cache["entry"] = entry
        return entry[1]


class T5Attention(nn.Module):
    """T5 attention (no biases, no 1/sqrt(D) scaling); the first layer of each stack owns the
    relative-position table ``relative_attention_bias`` (num_buckets, H)."""

    def __init__(self, config, has_relative_attention_bias=False):
        super().__init__()
        self.H, self.D = config.num_heads, config.d_kv
        inner = self.H * self.D
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.dropout_p = config.dropout_rate
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, self.H)

    def heads(self, x):
        """(B, L, H D) -> (B, H, L, D), or packed tokens (T, H D) -> (T, H, D): a view."""
        x = x.unflatten(-1, (self.H, self.D))
        return x if x.dim() == 3 else x.transpose(1, 2)

    def forward(self, x, kv, *, mask=None, queries=None, rel_pos=None, causal=False):
        """x (B, Lq, E); kv: (k, v) each (B, H, Lk, D), already projected. Returns (B, Lq, E). Or packed
        tokens x (Tq, E) and kv each (Tk, H, D), with mask the keys' PackedSequences and queries the
        queries' (default: mask's, self-attention)."""
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(mask, PackedSequences):
            queries = mask if queries is None else queries
            out = varlen_attention(
                self.heads(self.q(x)), *kv, queries.cu_seqlens, mask.cu_seqlens, queries.max_seqlen,
                mask.max_seqlen, causal=causal, rel_pos=rel_pos, scale=1.0, dropout_p=dropout_p,
            )  # (Tq, H, D)
            return self.o(out.flatten(1))  # (Tq, H, D) -> (Tq, H D) -> (Tq, E)
        B, Lq, _ = x.shape
        out = attention(
            self.heads(self.q(x)),
            *kv,
            causal=causal,
            key_padding_mask=mask,
            rel_pos=rel_pos,
            scale=1.0,
            dropout_p=dropout_p,
        )  # (B, H, Lq, D)
        return self.o(out.transpose(1, 2).reshape(B, Lq, self.H * self.D))  # (B, Lq, H D) -> (B, Lq, E)

    def project_kv(self, memory):
        """memory (B, Lk, E) -> k, v (B, H, Lk, D) (packed tokens (T, E) -> (T, H, D))."""
        return self.heads(self.k(memory)), self.heads(self.v(memory))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config, has_relative_attention_bias):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, residual, *, mask, rel_pos, causal, cache=None, layer=0):
        h, residual = self.layer_norm(x, residual=residual, return_residual=True)  # residual += x; h = norm
        k, v = self.SelfAttention.project_kv(h)  # (B, H, L, D) each
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, past + L, D)
        return self.dropout(self.SelfAttention(h, (k, v), mask=mask, rel_pos=rel_pos, causal=causal)), residual


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, residual, *, memory_kv, memory_mask, queries=None):
        h, residual = self.layer_norm(x, residual=residual, return_residual=True)
        return self.dropout(self.EncDecAttention(h, memory_kv, mask=memory_mask, queries=queries)), residual


class T5DenseActDense(nn.Module):
    """v1.0: wo(act(wi x)); v1.1 (gated): wo(act(wi_0 x) * wi_1 x). Dropout before wo."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.act)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, h):
        a = self.act(self.wi_0(h)) * self.wi_1(h) if self.gated else self.act(self.wi(h))  # (B, L, d_ff)
        return self.wo(self.dropout(a))


class T5LayerFF(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, residual):
        h, residual = self.layer_norm(x, residual=residual, return_residual=True)
        return self.dropout(self.DenseReluDense(h)), residual


class T5Block(nn.Module):
    """Encoder block: self-attention, FF. Decoder block: causal self-attention, cross-attention, FF.
    Each sub-layer takes the previous one's output and the residual stream before it (fused add + norm)."""

    def __init__(self, config, is_decoder, has_relative_attention_bias):
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(self, x, residual, *, mask, rel_pos, memory_kv=None, memory_mask=None, cache=None, layer=0):
        x, residual = self.layer[0](
            x, residual, mask=mask, rel_pos=rel_pos, causal=self.is_decoder, cache=cache, layer=layer
        )
        if self.is_decoder:
            queries = mask if isinstance(mask, PackedSequences) else None
            x, residual = self.layer[1](x, residual, memory_kv=memory_kv, memory_mask=memory_mask, queries=queries)
        return self.layer[-1](x, residual)


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks sharing block 0's relative-position table (and, within one forward,
    its buckets), final RMSNorm."""

    def __init__(self, config, is_decoder):
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, i == 0) for i in range(n))
        self.final_layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, *, mask=None, memory_kv=None, memory_mask=None, cache=None):
        """x (B, L, E) embeddings; memory_kv: per decoder layer, the cross-attention (k, v). -> (B, L, E). Or
        packed tokens x (T, E) with mask their PackedSequences (and memory_mask the memory's) -> (T, E)."""
        rel_pos = CachedRelativePositionBias(
            self.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
            bidirectional=not self.is_decoder,
            max_distance=self.config.relative_attention_max_distance,
        )
        x, residual = self.dropout(x), None
        for i, block in enumerate(self.block):
            x, residual = block(
                x,
                residual,
                mask=mask,
                rel_pos=rel_pos,
                memory_kv=memory_kv[i] if memory_kv is not None else None,
                memory_mask=memory_mask,
                cache=cache,
                layer=i,
            )
        return self.dropout(self.final_layer_norm(x, residual=residual))


class T5ForConditionalGeneration(GenerationMixin, PretrainedMixin, nn.Module):
    """T5 encoder-decoder with the LM head.

    forward(input_ids (B, Ls), attention_mask (B, Ls) 1 = token / 0 = padding, decoder_input_ids (B, Lt)
    (default: labels shifted right behind decoder_start_token_id), labels (B, Lt) with -100 = ignored,
    decoder_attention_mask (B, Lt) or None). With labels: the mean token loss through
    fastlm.linear_cross_entropy (no (B, Lt, V) logits); without: logits (B, Lt, V).

    unpad_inputs (default True): a padded source runs through the encoder unpadded (only real tokens; varlen
    attention) when fastlm.varlen_attention has kernels for it; the encoder output is then 0 at the padding.
    Likewise padded targets run through the decoder and the head unpadded (causal varlen self-attention,
    varlen cross-attention on the packed encoder output); the target padding is decoder_attention_mask's 0s,
    or without it the trailing -100s of labels (HF's collators pad labels with -100). The logits and the
    decoder output are then 0 at the target padding, and the loss counts only real targets (the same loss
    when, as HF's collators make them, the labels at the padding are -100; else the decoder runs padded).
    A mask with padding between two tokens of a row keeps its stack padded (packing would change T5's
    relative positions). generate() always runs the decoder padded.

    generate (GenerationMixin.generate) returns (B, 1 + n) decoder tokens starting with
    decoder_start_token_id (HF's layout); it stops a row at the config's eos_token_id by default and pads
    finished rows with the config's pad_token_id.
    """

    config_class = T5Config
    hf_architecture = "T5ForConditionalGeneration"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.unpad_inputs = True
        self._init_weights()

    def _init_weights(self):
        """HF's T5 initialisation (scaled by initializer_factor)."""
        c = self.config
        f, E, D = c.initializer_factor, c.d_model, c.d_kv
        nn.init.normal_(self.shared.weight, std=f)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=f)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, f)
            elif isinstance(m, T5DenseActDense):
                for wi in (m.wi_0, m.wi_1) if m.gated else (m.wi,):
                    nn.init.normal_(wi.weight, std=f * E**-0.5)
                nn.init.normal_(m.wo.weight, std=f * c.d_ff**-0.5)
            elif isinstance(m, T5Attention):
                nn.init.normal_(m.q.weight, std=f * (E * D) ** -0.5)
                nn.init.normal_(m.k.weight, std=f * E**-0.5)
                nn.init.normal_(m.v.weight, std=f * E**-0.5)
                nn.init.normal_(m.o.weight, std=f * (m.H * D) ** -0.5)
                if hasattr(m, "relative_attention_bias"):
                    nn.init.normal_(m.relative_attention_bias.weight, std=f * E**-0.5)

    def hf_keys(self):
        dropped = (
            "encoder.embed_tokens.",
            "decoder.embed_tokens.",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.",
        )
        if self.lm_head is None:
            dropped += ("lm_head.",)
        return {"prefix": "", "body": True, "dropped": dropped}

    @staticmethod
    def _config_from_checkpoint(config, state_dict):
        # HF 5.x writes tie_word_embeddings=true for every T5 but keeps an lm_head that differs from the
        # embedding (T5 v1.1) in the file, and then does not tie: do the same.
        head, shared = state_dict.get("lm_head.weight"), state_dict.get("shared.weight")
        if config.tie_word_embeddings and head is not None and shared is not None and not torch.equal(head, shared):
            config = dataclasses.replace(config, tie_word_embeddings=False)
        return config

    def head_weight(self):
        """The (V, E) LM head: the shared embedding when tied, else lm_head.weight."""
        return self.shared.weight if self.lm_head is None else self.lm_head.weight

    def encode(self, input_ids, attention_mask=None):
        """input_ids (B, Ls) -> encoder output (B, Ls, E)."""
        return self._encoded(input_ids, attention_mask, None)[0]

    def _unpads(self, mask, x):
        """Whether a stack runs unpadded on x (B, L, E) with mask (B, L) bool (None: no padding): with padding,
        unpad_inputs, a varlen kernel for x, and no padding between two tokens of a row (the relative
        positions are those of the padded layout: packing would change them)."""
        return (
            mask is not None and self.unpad_inputs and runs_varlen_kernel(x, self.config.d_kv) and not has_holes(mask)
        )

    def _encoded(self, input_ids, attention_mask, encoder_outputs):
        """The encoder output (B, Ls, E) (``encoder_outputs`` when given, checked; else the encoder run on
        input_ids), its (B, Ls) key-padding mask or None, converted once for the encoder and every
        cross-attention, and (packed (Ts, E), its PackedSequences) when the encoder ran unpadded, else None."""
        if encoder_outputs is None:
            check_ids(input_ids, self.config.vocab_size)
            mask = key_padding_mask(attention_mask, input_ids.shape)  # (B, Ls) bool, None without padding
            x = self.shared(input_ids)  # (B, Ls, E)
            if self._unpads(mask, x):
                packed, sequences = PackedSequences.pack(x, mask)  # (Ts, E)
                packed = self.encoder(packed, mask=sequences)
                return sequences.pad(packed), mask, (packed, sequences)  # (B, Ls, E), 0 at the padding
            return self.encoder(x, mask=mask), mask, None
        E = self.config.d_model
        if (
            not isinstance(encoder_outputs, torch.Tensor)
            or encoder_outputs.dim() != 3
            or encoder_outputs.shape[-1] != E
        ):
            shape = tuple(encoder_outputs.shape) if isinstance(encoder_outputs, torch.Tensor) else type(encoder_outputs)
            raise ValueError(f"encoder_outputs must be a tensor (B, Ls, d_model={E}) (encode()'s output), got {shape}")
        return encoder_outputs, key_padding_mask(attention_mask, encoder_outputs.shape[:2]), None

    def _memory_kv(self, encoded):
        """Per decoder layer, the cross-attention (k, v), each (B, H, Ls, D), of the encoder output (B, Ls, E)."""
        return [block.layer[1].EncDecAttention.project_kv(encoded) for block in self.decoder.block]

    def _decoder_input_ids(self, decoder_input_ids, labels):
        """The decoder inputs (B, Lt), checked before any work: decoder_input_ids, or labels shifted right
        (their ids checked; the shifted ones are then valid: the config checks its start and pad ids)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5ForConditionalGeneration: pass decoder_input_ids or labels")
            check_labels(labels, self.config.vocab_size)
            return self.shift_right(labels)
        check_ids(decoder_input_ids, self.config.vocab_size, "decoder_input_ids")
        if labels is not None and tuple(labels.shape) != tuple(decoder_input_ids.shape):
            raise ValueError(
                f"labels must have the shape of decoder_input_ids {tuple(decoder_input_ids.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        return decoder_input_ids

    def _head_input(self, h):
        return h * self.config.d_model**-0.5 if self.config.scale_decoder_outputs else h

    def shift_right(self, labels):
        """Decoder inputs of labels (B, Lt): decoder_start_token_id, then labels[:, :-1] with -100 -> pad."""
        start = labels.new_full((labels.shape[0], 1), self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, Lt)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    @staticmethod
    def _target_mask(decoder_mask, labels):
        """The (B, Lt) bool mask, True = real target, the decoder unpads on: decoder_mask (decoder_attention_mask
        converted), else labels up to their last one that is not -100 (trailing -100s are HF's label padding).
        None when no target is padding, or when labels at the padding are not -100 (the loss would differ)."""
        if labels is None:
            return decoder_mask
        ignored = labels == -100  # (B, Lt)
        if decoder_mask is not None:
            return decoder_mask if bool((decoder_mask | ignored).all()) else None
        mask = (~ignored).flip(1).cummax(1).values.flip(1)  # (B, Lt): True up to the last real label
        return None if bool(mask.all()) else mask

    def forward(
        self,
        input_ids,
        attention_mask=None,
        decoder_input_ids=None,
        labels=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
    ):
        decoder_input_ids = self._decoder_input_ids(decoder_input_ids, labels)  # (B, Lt)
        decoder_mask = key_padding_mask(
            decoder_attention_mask, decoder_input_ids.shape, "(B, Lt)", "decoder_attention_mask"
        )  # (B, Lt) bool, None without padding
        encoded, memory_mask, memory = self._encoded(input_ids, attention_mask, encoder_outputs)  # (B, Ls, E)
        x = self.shared(decoder_input_ids)  # (B, Lt, E)
        target_mask = self._target_mask(decoder_mask, labels)  # (B, Lt) or None
        if self._unpads(target_mask, x):
            memory, memory_sequences = memory or PackedSequences.pack(encoded, memory_mask)  # (Ts, E)
            x, sequences = PackedSequences.pack(x, target_mask)  # (Tt, E)
            h = self.decoder(x, mask=sequences, memory_kv=self._memory_kv(memory), memory_mask=memory_sequences)
            labels = None if labels is None else labels.flatten()[sequences.indices]  # (Tt,)
        else:
            sequences = None
            h = self.decoder(x, mask=decoder_mask, memory_kv=self._memory_kv(encoded), memory_mask=memory_mask)
        out = T5Output(encoder_last_hidden_state=encoded)
        out.decoder_last_hidden_state = h if sequences is None else sequences.pad(h)  # (B, Lt, E)
        if labels is None:
            logits = F.linear(self._head_input(h), self.head_weight())  # (B, Lt, V), or packed (Tt, V)
            out.logits = logits if sequences is None else sequences.pad(logits)  # (B, Lt, V), 0 at the padding
            return out
        E = h.shape[-1]
        out.loss = ops.linear_cross_entropy(self._head_input(h).reshape(-1, E), self.head_weight(), labels.reshape(-1))
        return out

    def _special_ids(self, eos_token_id, pad_token_id):
        """generate's defaults: the config's EOS and pad ids (eos_token_id=None: never stop early)."""
        eos_token_id = self.config.eos_token_id if eos_token_id == "default" else eos_token_id
        return eos_token_id, self.config.pad_token_id if pad_token_id is None else pad_token_id

    def _start_decoding(self, input_ids, attention_mask, max_new_tokens):
        """For ``generate`` (see GenerationMixin): encode input_ids (B, Ls) (any padding), then decode from
        decoder_start_token_id with a KV cache of 1 + max_new_tokens positions."""
        encoded, memory_mask, _ = self._encoded(input_ids, attention_mask, None)  # (B, Ls, E), (B, Ls)
        memory_kv = self._memory_kv(encoded)
        cache = KVCache(1 + max_new_tokens)

        def step(tokens):  # (B, 1) -> (B, V)
            h = self.decoder(self.shared(tokens), memory_kv=memory_kv, memory_mask=memory_mask, cache=cache)
            return F.linear(self._head_input(h[:, -1]), self.head_weight())

        start = input_ids.new_full((input_ids.shape[0], 1), self.config.decoder_start_token_id)
        return start, step(start), step
